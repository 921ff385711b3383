#!/usr/bin/env bash
# Set up NOVA in ./.venv and run the local demo: a web server standing in for
# a private host, NOVAS with a route to it, and NOVAC carrying the tunnel.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .
exec .venv/bin/python -m nova.demo "$@"
