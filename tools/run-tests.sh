#!/usr/bin/env bash
# The test command: prepare the host (packages, libvirtd, RabbitMQ, venv, guest
# images - safe to run twice), then lint, unit and functional tests.
#
# Usage: tools/run-tests.sh [pytest args...]      (as root)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}

"$REPO/tools/prepare-host.sh"
cd "$REPO"

printf '\n==> ruff\n'
"$VENV/bin/ruff" check compute_agent tests tools

printf '\n==> pytest\n'
exec "$VENV/bin/pytest" -ra --durations=15 tests/unit tests/functional "$@"
