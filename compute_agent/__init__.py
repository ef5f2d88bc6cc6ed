"""compute-agent: a Nova-style compute agent for libvirt/QEMU/KVM hosts."""

import warnings

__version__ = "0.1.0"

# oslo.messaging imports oslo.service's eventlet backend, which warns on import
# although the agent never uses eventlet (it runs oslo.messaging's threading
# executor). Keep that noise out of the CLI's and the daemon's output.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
