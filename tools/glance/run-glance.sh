#!/usr/bin/env bash
# Run a real Glance API (v2) for the functional tests: sqlite database,
# filesystem store, no Keystone (any token is admin), under gunicorn with one
# worker and one thread (sqlite). Foreground; the caller backgrounds and stops it.
#
# Usage: tools/glance/run-glance.sh STATE_DIR PORT
# Env:   GLANCE_VENV (default: <repo>/.glance-venv)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
GLANCE_VENV=${GLANCE_VENV:-$REPO/.glance-venv}
STATE=$1
PORT=$2

mkdir -p "$STATE"/{conf,images,staging,tasks,locks}
cp "$GLANCE_VENV/etc/glance/glance-api-paste.ini" "$STATE/conf/"
cat > "$STATE/conf/policy.yaml" <<POLICY
"context_is_admin": "@"
"default": "@"
POLICY
cat > "$STATE/conf/glance-api.conf" <<CONF
[DEFAULT]
bind_host = 127.0.0.1
bind_port = $PORT
enabled_backends = fs:file
log_file = $STATE/glance-api.log
debug = false
[database]
connection = sqlite:///$STATE/glance.sqlite
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = $STATE/images/
[os_glance_staging_store]
filesystem_store_datadir = $STATE/staging/
[os_glance_tasks_store]
filesystem_store_datadir = $STATE/tasks/
[oslo_concurrency]
lock_path = $STATE/locks
[oslo_policy]
policy_file = $STATE/conf/policy.yaml
enforce_new_defaults = false
enforce_scope = false
CONF

if [ ! -e "$STATE/glance.sqlite" ]; then
    "$GLANCE_VENV/bin/glance-manage" --config-file "$STATE/conf/glance-api.conf" db_sync \
        >"$STATE/db_sync.log" 2>&1
fi
export OS_GLANCE_CONFIG_DIR=$STATE/conf
exec "$GLANCE_VENV/bin/gunicorn" --workers 1 --threads 1 --no-control-socket \
    --bind "127.0.0.1:$PORT" --access-logfile "$STATE/access.log" \
    --error-logfile "$STATE/gunicorn.log" --timeout 300 'glance.wsgi.api:application'
