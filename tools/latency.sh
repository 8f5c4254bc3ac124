#!/usr/bin/env bash
# A sidecar's latency overhead at fixed request rates, open loop: oha at
# 1,000 and 5,000 requests/s with coordinated-omission correction against
# direct, idemproxy, nginx and HAProxy (the load benchmark's targets,
# configurations, upstream and pinning). See benches/README.md.
#
#   tools/latency.sh                                      # ~10 minutes, writes benches/results/latency.{md,json}
#   SCENARIOS=get ROUNDS=1 DURATION=5 WAIT_QUIET=0 tools/latency.sh   # smoke run, ~1 minute
#   tools/latency.sh --help                               # the settings; installs and runs nothing
#
# Installs oha 1.16.0 with cargo when it is missing (idempotent: a present
# oha is used as it is), builds the release binary unless IDEMPROXY_BIN names
# one, then runs tools/latency.py. nginx and HAProxy come from
# tools/loadbench.sh's install. Everything runs on 127.0.0.1 and every
# process started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    -h | --help) exec python3 tools/latency.py --help ;;
esac

oha=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
if [ ! -x "$oha" ]; then
    echo "latency: oha is missing; installing it: cargo install oha --locked --version 1.16.0 (a few minutes)" >&2
    cargo install oha --locked --version 1.16.0 --quiet
    oha="$HOME/.cargo/bin/oha"
fi
echo "latency: using $("$oha" --version) at $oha" >&2
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || { echo "nginx is missing: run tools/loadbench.sh once (it installs it)" >&2; exit 2; }
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null || { echo "haproxy is missing: run tools/loadbench.sh once (it installs it)" >&2; exit 2; }

[ -n "${IDEMPROXY_BIN:-}" ] || cargo build --release --quiet --bin idemproxy

# The Python driver stops what it started; this trap stops, by pid, whatever
# it recorded if it is killed hard.
pidfile=$(mktemp)
cleanup() {
    while read -r pid; do
        kill "$pid" 2>/dev/null || true
    done <"$pidfile"
    rm -f "$pidfile"
}
trap cleanup EXIT
OHA="$oha" LOADBENCH_PIDFILE="$pidfile" python3 tools/latency.py "$@"
