#!/usr/bin/env bash
# The load benchmark in one command (issue 7): idemproxy against nginx and
# HAProxy, each a retrying reverse proxy with one worker, in front of the same
# upstream, driven by wrk at the same settings. See benches/README.md.
#
#   tools/loadbench.sh                          # full run, ~8 minutes
#   DURATION=3 ROUNDS=1 WAIT_QUIET=0 tools/loadbench.sh   # smoke run, ~2 minutes
#   tools/loadbench.sh --help                     # the settings; installs and runs nothing
#
# Installs wrk, nginx and HAProxy with apt when missing (idempotent: nothing
# is installed twice, and no service is started by the install), builds the
# release binary, then runs tools/loadbench.py, which writes
# benches/results/latest.md and latest.json. Everything runs on 127.0.0.1 and
# every process started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    -h | --help) exec python3 tools/loadbench.py --help ;;
esac

need=()
command -v wrk >/dev/null || need+=(wrk)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || need+=(nginx-light)
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null || need+=(haproxy)
command -v taskset >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
    echo "loadbench: installing ${need[*]} with apt" >&2
    sudo_=""
    [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    # Keep the packages' init scripts from starting nginx/HAProxy as services
    # (a policy-rc.d that already exists is left alone).
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo_ tee /usr/sbin/policy-rc.d >/dev/null
        $sudo_ chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    [ "$made_policy" -eq 0 ] || $sudo_ rm -f /usr/sbin/policy-rc.d
fi

# IDEMPROXY_BIN names a binary built elsewhere (e.g. the build before a change);
# otherwise this tree's release binary is built.
[ -n "${IDEMPROXY_BIN:-}" ] || cargo build --release --quiet --bin idemproxy

# The Python driver stops what it started; this trap is the safety net if it
# is killed hard: it stops, by pid, whatever the driver recorded.
pidfile=$(mktemp)
cleanup() {
    while read -r pid; do
        kill "$pid" 2>/dev/null || true
    done <"$pidfile"
    rm -f "$pidfile"
}
trap cleanup EXIT
LOADBENCH_PIDFILE="$pidfile" python3 tools/loadbench.py "$@"
