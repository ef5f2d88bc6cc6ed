#!/usr/bin/env bash
# Prepare a Debian 12 host for compute-agent: packages, /dev/kvm, virtlogd,
# libvirtd and RabbitMQ running, the Python virtualenv with the package, and
# the test guest images. Safe to run any number of times: each step checks
# before it acts.
#
# Usage: tools/prepare-host.sh            (as root)
# Env:   VENV (default: <repo>/.venv), GLANCE_VENV (default: <repo>/.glance-venv),
#        GUEST_DIR (default: /var/cache/compute-agent/guest)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
GLANCE_VENV=${GLANCE_VENV:-$REPO/.glance-venv}
GUEST_DIR=${GUEST_DIR:-/var/cache/compute-agent/guest}
PACKAGES=(libvirt-daemon-system libvirt-clients libvirt-dev pkg-config qemu-system-x86
          qemu-utils rabbitmq-server libxml2-utils python3-venv python3-dev gcc
          mtools dosfstools syslinux syslinux-common busybox-static cpio
          iproute2 iptables procps ebtables dnsmasq-base iputils-ping netcat-openbsd tcpdump
          tgt qemu-block-extra libiscsi-bin ceph-mon ceph-osd ceph-common)

say() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "prepare-host.sh must run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

have_systemd() { [ "$(ps -o comm= -p 1 2>/dev/null)" = systemd ]; }

say "Debian packages"
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "all present"
fi

say "/dev/kvm"
if [ -e /dev/kvm ]; then
    chgrp kvm /dev/kvm && chmod 660 /dev/kvm
    ls -l /dev/kvm
else
    echo "no /dev/kvm: only virt_type=qemu (TCG) will work on this host"
fi

say "virtlogd and libvirtd"
mkdir -p /var/log/libvirt /run/libvirt
if have_systemd; then
    systemctl start virtlogd.socket libvirtd.service
else
    # No systemd as PID 1 (containers, CI sandboxes): run the daemons directly.
    pgrep -x virtlogd >/dev/null || virtlogd -d
    pgrep -x libvirtd >/dev/null || libvirtd -d
fi
# The first connection after a fresh install can take a minute while libvirt
# probes QEMU's capabilities.
for _ in $(seq 1 180); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 1
done
virsh -c qemu:///system version | sed -n 1,3p

say "RabbitMQ"
rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! rabbit_up; then
    if have_systemd; then
        systemctl start rabbitmq-server
    elif ! pgrep -f beam.smp >/dev/null; then
        # Never call -detached twice: a second one returns 0 and confuses pid files.
        /usr/sbin/rabbitmq-server -detached
    fi
    for _ in $(seq 1 120); do rabbit_up && break; sleep 1; done
fi
/usr/sbin/rabbitmqctl -q await_startup
echo "listening on 127.0.0.1:5672"

say "Python virtualenv $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO[test]"
"$VENV/bin/compute-agent-ctl" --help >/dev/null && echo "compute-agent installed"

say "Glance (for the functional tests) in $GLANCE_VENV"
# Its own virtualenv: Glance's pins must not constrain the agent's.
[ -x "$GLANCE_VENV/bin/python" ] || python3 -m venv "$GLANCE_VENV"
"$GLANCE_VENV/bin/python" -c 'import glance, gunicorn' 2>/dev/null || \
    "$GLANCE_VENV/bin/pip" install -q --disable-pip-version-check 'glance==33.0.0' gunicorn
"$GLANCE_VENV/bin/python" -c 'import glance; print("glance", glance.__file__)'

say "Test guest images in $GUEST_DIR"
mkdir -p "$GUEST_DIR"
"$REPO/tools/guest/build-linux-guest.sh" "$GUEST_DIR/linux-guest.raw"
"$VENV/bin/python" "$REPO/tools/guest/build-bootsector-guest.py" "$GUEST_DIR/bootsector-guest.raw"
ls -l "$GUEST_DIR"
