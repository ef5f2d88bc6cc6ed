#!/usr/bin/env bash
# Install compute-agent on a real hypervisor host as a systemd service:
#   /opt/compute-agent/venv             the package, in its own virtualenv
#   /etc/compute-agent/compute-agent.conf   written from the sample once, then yours
#   /var/lib/compute-agent/{instances,state,images}, /var/log/compute-agent
#   /etc/systemd/system/compute-agent.service, enabled and started
# Safe to run again (upgrades the package, keeps the config). Needs libvirt,
# QEMU and a reachable RabbitMQ (tools/prepare-host.sh installs a local one).
#
# Usage: tools/install-host.sh            (as root)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/compute-agent}
CONF=/etc/compute-agent/compute-agent.conf

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install -q --disable-pip-version-check --upgrade "$REPO"

install -d -m 755 /etc/compute-agent /var/lib/compute-agent /var/lib/compute-agent/instances \
    /var/lib/compute-agent/images /var/log/compute-agent
install -d -m 700 /var/lib/compute-agent/state
if [ ! -e "$CONF" ]; then
    install -m 640 "$REPO/etc/compute-agent/compute-agent.conf.sample" "$CONF"
    echo "wrote $CONF from the sample: set [DEFAULT] transport_url and host before starting"
fi

install -m 644 "$REPO/etc/systemd/compute-agent.service" /etc/systemd/system/
sed -i "s#/opt/compute-agent/venv#$PREFIX/venv#" /etc/systemd/system/compute-agent.service
if [ "$(ps -o comm= -p 1)" = systemd ]; then
    systemctl daemon-reload
    systemctl enable compute-agent.service
    systemctl restart compute-agent.service
    systemctl --no-pager status compute-agent.service | head -5
else
    echo "systemd is not PID 1 here: unit installed but not started; run"
    echo "  $PREFIX/venv/bin/compute-agent --config-file $CONF"
fi
