#!/usr/bin/env bash
# Measures the resident memory (VmRSS / VmHWM) of the release idemproxy, idle and
# under a little load, against the example session backend. The numbers feed the
# resources comment in deploy/kubernetes/base/deployment.yaml.
#
#   bash deploy/measure-rss.sh            # builds the release binary and example first
#   REQUESTS=20000 PARALLEL=128 bash deploy/measure-rss.sh
#
# Everything listens on 127.0.0.1 (ephemeral ports); the load is a bounded number
# of requests sent by curl --parallel; both servers are stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-6000}
PARALLEL=${PARALLEL:-64}
BODY_KIB=${BODY_KIB:-4}
ROUNDS=${ROUNDS:-1}
TARGET=${CARGO_TARGET_DIR:-target}

cargo build -q --release --bin idemproxy --example session_backend

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ -n "${KEEP:-}" ]]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$proxy/status"; }
# CPU time (user + system) of the proxy in milliseconds.
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{print int(($14 + $15) * 1000 / hz)}' "/proc/$proxy/stat"; }

backend_port=$(free_port)
"$TARGET/release/examples/session_backend" --listen "127.0.0.1:$backend_port" \
    --session-ttl 10m --fail-rate 0.05 --store-then-drop-rate 0.02 --seed 7 >"$work/backend.log" 2>&1 &
pids+=($!)

listen_port=$(free_port)
admin_port=$(free_port)
env -i PATH="$PATH" \
    IDEMPROXY_UPSTREAM="http://127.0.0.1:$backend_port" \
    IDEMPROXY_LISTEN="127.0.0.1:$listen_port" \
    IDEMPROXY_ADMIN_LISTEN="127.0.0.1:$admin_port" \
    IDEMPROXY_ROUTES="$(cat deploy/kubernetes/base/routes.txt)" \
    IDEMPROXY_LOG=warn \
    "$TARGET/release/idemproxy" >"$work/proxy.log" 2>&1 &
proxy=$!
pids+=("$proxy")

for _ in $(seq 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$admin_port/readyz" 2>/dev/null && break
    sleep 0.1
done
curl -fsS -o /dev/null "http://127.0.0.1:$admin_port/readyz"
curl -fsS -o /dev/null "http://127.0.0.1:$listen_port/healthz" # through the proxy to the backend
sleep 2
idle_rss=$(kib VmRSS)

# One session, then REQUESTS writes (half PUT /db/{doc}, half POST entries, JSON
# bodies of BODY_KIB KiB) sent PARALLEL at a time over keep-alive connections.
sid=$(curl -fsS -X POST "http://127.0.0.1:$listen_port/v1/sessions" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
python3 - "$work" "$listen_port" "$sid" "$REQUESTS" "$BODY_KIB" <<'EOF'
import json, sys, uuid
work, port, sid, n, kib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
pad = "x" * (kib * 1024)
with open(f"{work}/curl.cfg", "w") as f:
    for i in range(n):
        if i % 2:
            url, method, body = f"/db/doc-{i}", "PUT", {"n": i, "pad": pad}
        else:
            url, method, body = f"/v1/sessions/{sid}/entries", "POST", {"uuid": str(uuid.uuid4()), "pad": pad}
        f.write(f'url = "http://127.0.0.1:{port}{url}"\nrequest = {method}\n'
                f'header = "content-type: application/json"\ndata = {json.dumps(json.dumps(body))}\n'
                'output = /dev/null\nwrite-out = "%{http_code}\\n"\n' + ("next\n" if i + 1 < n else ""))
EOF

peak=0
cpu_before=$(cpu_ms)
for round in $(seq "$ROUNDS"); do
    start=$(date +%s%N)
    curl -sS --parallel --parallel-max "$PARALLEL" --config "$work/curl.cfg" >>"$work/codes" 2>"$work/curl.err" &
    load=$!
    while kill -0 "$load" 2>/dev/null; do
        rss=$(kib VmRSS); ((rss > peak)) && peak=$rss
        sleep 0.05
    done
    wait "$load" || true
    elapsed_ms=$((($(date +%s%N) - start) / 1000000))
    echo "round $round: $REQUESTS requests in ${elapsed_ms} ms; VmRSS now $(kib VmRSS) KiB, peak so far $peak KiB"
done
cpu_used=$(($(cpu_ms) - cpu_before))
sleep 2
after_rss=$(kib VmRSS)
hwm=$(kib VmHWM)

echo "$ROUNDS x $REQUESTS requests (${BODY_KIB} KiB bodies, $PARALLEL in parallel); status codes:"
sort "$work/codes" | uniq -c | sed 's/^/  /'
retries=$(curl -fsS "http://127.0.0.1:$admin_port/metrics" | awk '/^idemproxy_retries_total/ {s += $2} END {print s + 0}')
echo "retries (idemproxy_retries_total): $retries"
echo "proxy CPU time:        $cpu_used ms for $((ROUNDS * REQUESTS)) requests ($((cpu_used * 1000 / (ROUNDS * REQUESTS))) us per request)"
echo "idle VmRSS:            $((idle_rss / 1024)) MiB ($idle_rss KiB)"
echo "peak VmRSS under load: $((peak / 1024)) MiB ($peak KiB, sampled every 50 ms)"
echo "VmHWM (high-water):    $((hwm / 1024)) MiB ($hwm KiB)"
echo "VmRSS 2 s after load:  $((after_rss / 1024)) MiB ($after_rss KiB)"
