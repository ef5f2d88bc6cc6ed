#!/usr/bin/env bash
# The quick start: prepare this host, run compute-agent as a daemon, and boot
# the Linux test guest through RabbitMQ with compute-agent-ctl. Safe to run
# twice: the config is written once, a running agent is reused, and an active
# "quickstart" guest is shown instead of booting another.
#
# Usage: tools/quickstart.sh          (as root)
# Env:   VIRT_TYPE=qemu|kvm (default qemu: a real Linux guest needs TCG on hosts
#        whose KVM cannot run it, see README)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
GUEST_DIR=${GUEST_DIR:-/var/cache/compute-agent/guest}
CONF=/etc/compute-agent/compute-agent.conf
IMAGES=/var/lib/compute-agent/images
LOG=/var/log/compute-agent/compute-agent.log
PIDFILE=/run/compute-agent.pid
CTL=("$VENV/bin/compute-agent-ctl" --config-file "$CONF")

"$REPO/tools/prepare-host.sh"

echo; echo "==> Configuration $CONF"
mkdir -p /etc/compute-agent /var/lib/compute-agent/instances /var/lib/compute-agent/state \
         "$IMAGES" /var/log/compute-agent
chmod 755 /var/lib/compute-agent /var/lib/compute-agent/instances
if [ ! -e "$CONF" ]; then
    cat > "$CONF" <<CONFEOF
[DEFAULT]
host = $(hostname)
instances_path = /var/lib/compute-agent/instances
state_path = /var/lib/compute-agent/state
transport_url = rabbit://guest:guest@127.0.0.1:5672/
debug = true
log_file = $LOG

[libvirt]
virt_type = ${VIRT_TYPE:-qemu}
# host-model needs a CPU the hypervisor can expose fully; 'none' is safe everywhere.
cpu_mode = none

[image]
local_image_dir = $IMAGES
CONFEOF
    echo "written"
else
    echo "kept (already exists)"
fi

echo; echo "==> Image linux-guest in the local image service"
if ! cmp -s "$GUEST_DIR/linux-guest.raw" "$IMAGES/linux-guest" 2>/dev/null; then
    cp "$GUEST_DIR/linux-guest.raw" "$IMAGES/linux-guest.tmp"
    mv "$IMAGES/linux-guest.tmp" "$IMAGES/linux-guest"
    sum=$(sha512sum "$IMAGES/linux-guest" | cut -d' ' -f1)
    printf '{"name": "linux-guest", "disk_format": "raw", "os_hash_algo": "sha512", "os_hash_value": "%s"}\n' \
        "$sum" > "$IMAGES/linux-guest.json"
fi
ls -l "$IMAGES"

echo; echo "==> compute-agent daemon"
if [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "already running (pid $(cat "$PIDFILE"))"
else
    nohup "$VENV/bin/compute-agent" --config-file "$CONF" >/dev/null 2>>"$LOG.stderr" &
    echo $! > "$PIDFILE"
    echo "started (pid $!), log $LOG"
fi
for _ in $(seq 1 60); do
    "${CTL[@]}" --timeout 5 host-status >/dev/null 2>&1 && break
    sleep 1
done
"${CTL[@]}" host-status

echo; echo "==> Boot the guest through RPC"
existing=$("${CTL[@]}" -f json list | "$VENV/bin/python" -c \
    'import json,sys; print(next((i["uuid"] for i in json.load(sys.stdin) if i["name"] == "quickstart" and i["vm_state"] == "active"), ""))')
if [ -n "$existing" ]; then
    echo "an active quickstart guest exists: $existing"
    uuid=$existing
else
    uuid=$(cat /proc/sys/kernel/random/uuid)
    "${CTL[@]}" boot --uuid "$uuid" --name quickstart --image linux-guest --memory 256 \
        --root-gb 1 --wait
fi

echo; echo "==> Waiting for the guest's ready marker on its serial console"
for _ in $(seq 1 120); do
    "${CTL[@]}" console-log "$uuid" --lines 200 | grep -q GUEST-READY && break
    sleep 1
done
"${CTL[@]}" console-log "$uuid" --lines 15
"${CTL[@]}" console-log "$uuid" --lines 200 | grep -q GUEST-READY
echo; echo "Guest $uuid is up. Try: ${CTL[*]} show $uuid"
