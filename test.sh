#!/usr/bin/env bash
# Run NOVA's tests: set up ./.venv with the test extras, make sure the real
# clients the integration tests drive are installed, then run pytest (and
# the TestCase suites under trial as well).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v curl >/dev/null || need+=(curl)
command -v nc >/dev/null || need+=(netcat-openbsd)
command -v ssh >/dev/null || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v psql >/dev/null || need+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null || need+=(chromium)
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v systemd-analyze >/dev/null || need+=(systemd)
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null || need+=(haproxy)  # tests/test_cluster_lb.py: the cluster's balancer
command -v promtool >/dev/null || need+=(prometheus)  # promtool: tests/test_metrics.py checks rules and /metrics
# tests/test_image.py, tests/test_systemd.py: the tests' own dockerd, Compose v1, the stand-in base, nspawn
for t in dockerd:docker.io docker-compose:docker-compose debootstrap:debootstrap systemd-nspawn:systemd-container; do command -v "${t%%:*}" >/dev/null || need+=("${t#*:}"); done
command -v go >/dev/null && [ -d /usr/share/gocode/src/github.com/hashicorp/yamux ] || need+=(golang-go golang-github-hashicorp-yamux-dev)  # the benchmark's Go peer, tests/test_bench.py
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        # Install only: the packages' own services (sshd, redis, postgresql) must not start.
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
        rm -f /usr/sbin/policy-rc.d
    else
        echo "test.sh: please install: ${need[*]} (Debian/Ubuntu: sudo apt-get install ${need[*]})" >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat

.venv/bin/python -m ruff check nova tests twisted bench
.venv/bin/python -m mypy  # nova/, tests/ and bench/ (pyproject.toml)
# The full run, deploy tests included; the fast loop is
# ./test.sh -m "not integration and not deploy" (README: Tests).
.venv/bin/python -m pytest "$@"
.venv/bin/python -m twisted.trial --reporter=summary tests
