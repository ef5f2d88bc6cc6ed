"""compute-agent: a Nova-style compute agent for libvirt/QEMU/KVM hosts."""

import os
import warnings

__version__ = "0.1.0"

# oslo.messaging imports oslo.service's eventlet backend, which warns on import
# although the agent never uses eventlet (it runs oslo.messaging's threading
# executor). Keep that noise out of the CLI's and the daemon's output.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
# For the same reason, skip eventlet's green DNS resolver (it imports all of
# dnspython: ~8 MB of RSS and 0.1 s of start-up for nothing).
os.environ.setdefault("EVENTLET_NO_GREENDNS", "yes")
