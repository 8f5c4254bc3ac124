#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: a figure
# that other jobs on the machine do not disturb, for before/after comparisons
# of a hot-path change (the load benchmark's times and CPU seconds do move
# with machine noise). Kernel time (the socket writes) is not counted.
#
#   benches/instructions.sh [BINARY] [get|post] [REQUESTS]
#   benches/instructions.sh target/release/idemproxy post 4000
#   EXTRA_ENV="IDEMPROXY_MAX_ATTEMPTS=1" benches/instructions.sh
#   KEEP_OUT=/tmp/get.cg TOP=100 benches/instructions.sh   # keep the profile, show more
#
# Starts an upstream nginx (`return 200`) and the proxy under
# `valgrind --tool=callgrind` on 127.0.0.1, warms up, counts REQUESTS
# requests sent one at a time over 4 keep-alive connections, prints
# `instructions per request` and the top functions (inclusive), and stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/idemproxy}
kind=${2:-get}
n=${3:-4000}
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install valgrind" >&2; exit 2; }
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || { echo "nginx is missing: run tools/loadbench.sh once" >&2; exit 2; }

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(port); px=$(port); admin=$(port)
cat >"$work/up.conf" <<EOF
worker_processes 1; daemon off; master_process off; pid $work/up.pid; error_log $work/up-error.log warn;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $work/b; proxy_temp_path $work/p; fastcgi_temp_path $work/f;
  uwsgi_temp_path $work/u; scgi_temp_path $work/s; keepalive_requests 10000000;
  server { listen 127.0.0.1:$up; location / { default_type application/json; return 200 '{"ok":true,"id":"0123456789abcdef"}\n'; } } }
EOF
nginx -p "$work" -c "$work/up.conf" -e "$work/up-error.log" &
pids+=($!)
# shellcheck disable=SC2086
env IDEMPROXY_UPSTREAM="http://127.0.0.1:$up" IDEMPROXY_LISTEN="127.0.0.1:$px" IDEMPROXY_ADMIN_LISTEN="127.0.0.1:$admin" \
    IDEMPROXY_WORKERS=1 IDEMPROXY_LOG=warn IDEMPROXY_DRAIN_TIMEOUT=1s ${EXTRA_ENV:-} \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.out" "$bin" 2>"$work/valgrind.log" &
vg=$!
pids+=($vg)

python3 - "$px" "$kind" "$n" "$vg" "$work" <<'EOF'
import socket, subprocess, sys, time
port, kind, n, vg, work = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
headers = ("Host: 127.0.0.1\r\nAuthorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJl\r\n"
           "Mcp-Session-Id: bench-session-1\r\nAccept: application/json\r\nUser-Agent: loadbench/1\r\n")
if kind == "post":
    doc = '{"uuid":"2f1c8a54-5d0e-4b7e-9a51-6f0f0c4b1d2e","text":"' + "x" * (1024 - 57) + '"}'
    req = (f"POST /v1/sessions/bench-1/entries HTTP/1.1\r\n{headers}Content-Type: application/json\r\n"
           f"Content-Length: {len(doc)}\r\n\r\n{doc}").encode()
else:
    req = f"GET /v1/sessions/bench-1/state HTTP/1.1\r\n{headers}\r\n".encode()
deadline = time.time() + 60
while True:
    try:
        conns = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(4)]
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("the proxy did not start")
        time.sleep(0.2)

def one(s):
    s.sendall(req)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0])
    while len(body) < length:
        body += s.recv(65536)
    assert head.split(b" ")[1] == b"200", head

for i in range(400):  # warm-up: pools, buffers, lazy statics
    one(conns[i % 4])
subprocess.run(["callgrind_control", "-i", "on", vg], check=True, capture_output=True)
for i in range(n):
    one(conns[i % 4])
subprocess.run(["callgrind_control", "-i", "off", vg], check=True, capture_output=True)
subprocess.run(["callgrind_control", "-d", vg], check=True, capture_output=True)
for c in conns:
    c.close()
EOF
sleep 1
out=$(ls -t "$work"/cg.out* | head -1)
[ -z "${KEEP_OUT:-}" ] || cp "$out" "$KEEP_OUT"
annotated=$(callgrind_annotate --inclusive=yes "$out" 2>/dev/null)
total=$(awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}' <<<"$annotated")
echo "binary: $bin  scenario: $kind  requests: $n"
echo "instructions per request: $((total / n))"
echo "top functions, inclusive, per request:"
awk -v n="$n" '/^[0-9,]+ +\(/ && shown < (ENVIRON["TOP"] ? ENVIRON["TOP"] : 40) { ir=$1; gsub(",","",ir); $1=""; $2=""; printf "%9d  %s\n", ir / n, substr($0, 1, 180); shown++ }' <<<"$annotated"
