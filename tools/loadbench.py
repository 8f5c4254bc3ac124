#!/usr/bin/env python3
"""Load benchmark of idemproxy against nginx and HAProxy (issue 7).

Run it through `tools/loadbench.sh`, which installs the tools and builds the
release binary first. Everything here talks to 127.0.0.1 only, every load run
is bounded by `wrk -d`, and every process started here is stopped on exit.

Targets (all started once, all alive for the whole run):
  direct           wrk -> upstream nginx (the baseline of every ratio)
  idemproxy        release build, defaults (retries on, 5 attempts, keys on POST)
  idemproxy-plain  IDEMPROXY_MAX_ATTEMPTS=1, no routes: plain forwarding
  idemproxy-full   retries + route table + session sources + heartbeat
  nginx            1 worker, retrying reverse proxy (proxy_next_upstream ... non_idempotent)
  haproxy          nbthread 1, retrying reverse proxy (retry-on ...)

Scenarios, interleaved per round (A B C A B C ...):
  get      GET, 36-byte JSON answer, 64 connections
  post     POST 1 KiB JSON, 64 connections (idemproxy attaches a key, keeps a replay copy)
  download GET of a 10 MiB file, streamed, 4 connections
  idle     after the rounds: 1,000 keep-alive connections opened (one request each) and held

Settings come from the environment (defaults in brackets): DURATION [8] seconds
per run, ROUNDS [3], CONNS [64], DL_CONNS [4], IDLE_CONNS [1000], WAIT_QUIET [1200]
seconds to wait for a 1-minute load under 0.6 before starting, TARGETS and
SCENARIOS (comma lists, to run a subset), OUT [benches/results], IDEMPROXY_BIN [target/release/idemproxy],
BASELINE_BIN (another idemproxy binary, run as target "idemproxy-baseline" for before/after comparisons),
WORKERS [1] per proxy (IDEMPROXY_WORKERS, nginx worker_processes, HAProxy nbthread;
the pinning follows, see proxy_cores()).
`--help` prints this text and exits. `--print-config TARGET PORT UPSTREAM_PORT`
prints one target's generated configuration (nginx.conf, haproxy.cfg, or
idemproxy's variables) without running anything; benches/instructions.sh and
tools/latency.py start the same configurations. The pure parts (configurations, wrk output,
summary, checks, Markdown) are tested by tools/test_loadbench.py.
"""

import asyncio
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

DURATION = int(os.environ.get("DURATION", "8"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
CONNS = int(os.environ.get("CONNS", "64"))
DL_CONNS = int(os.environ.get("DL_CONNS", "4"))
IDLE_CONNS = int(os.environ.get("IDLE_CONNS", "1000"))
WAIT_QUIET = int(os.environ.get("WAIT_QUIET", "1200"))
OUT = os.environ.get("OUT", os.path.join(ROOT, "benches", "results"))
ALL_TARGETS = ["direct", "idemproxy", "idemproxy-plain", "idemproxy-full", "nginx", "haproxy"]
TARGETS = [t for t in os.environ.get("TARGETS", ",".join(ALL_TARGETS)).split(",") if t]
ALL_SCENARIOS = ["get", "post", "download", "idle"]
SCENARIOS = [s for s in os.environ.get("SCENARIOS", ",".join(ALL_SCENARIOS)).split(",") if s]
WORKERS = int(os.environ.get("WORKERS", "1"))
DOWNLOAD_TARGETS = ["direct", "idemproxy", "nginx", "haproxy", "idemproxy-baseline"]
# A second idemproxy binary (e.g. the build before a change) run as target
# "idemproxy-baseline" with the default settings.
BASELINE_BIN = os.environ.get("BASELINE_BIN")

NCPU = os.cpu_count() or 1


def proxy_cores(ncpu, workers):
    """(proxy cores, load cores) as taskset lists. The load generator and the
    upstream share core 0 (the upstream answers from memory and is cheap). The
    proxy under test owns cores 1..workers alone when there are that many, so
    its throughput, latency and CPU are its own; with fewer (WORKERS=2 on 2
    cores) it may run on every core, core 0 included, and its figures share
    that core with the load. With one core nothing is pinned."""
    if ncpu < 2:
        return None, None
    if workers < ncpu:
        return ("1" if workers == 1 else f"1-{workers}"), "0"
    return f"0-{ncpu - 1}", "0"


def core_list(spec):
    """The cores of a taskset list: "1" -> [1], "0-2" -> [0, 1, 2], "0,3" -> [0, 3]."""
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def cores_label(spec):
    if spec is None:
        return "not pinned"
    return ("core " if len(core_list(spec)) == 1 else "cores ") + spec


PROXY_CORE, LOAD_CORE = proxy_cores(NCPU, WORKERS)

GET_PATH = "/v1/sessions/bench-1/state"
POST_PATH = "/v1/sessions/bench-1/entries"
DOWNLOAD_PATH = "/blob/10m"
GET_BODY = '{"ok":true,"id":"0123456789abcdef"}\n'  # 36 bytes
# Every request of every target carries the same head: a bearer token and a
# session header, as an agent's requests do.
COMMON_HEADERS = {
    "Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJl",
    "Mcp-Session-Id": "bench-session-1",
    "Accept": "application/json",
    "User-Agent": "loadbench/1",
}

# idemproxy-full's extra configuration: the DESIGN example's kind of table; the
# benchmark's requests match `GET .../state` and `POST .../entries` (session by
# path, no verification rule: verification runs only on a 409).
FULL_ROUTES = """\
PUT    /db/{doc}                          verify=same match=json-subset
GET    /v1/sessions/{sid}/await           session=path:sid timeout=10m retry=off
DELETE /v1/sessions/{sid}                 session=path:sid session-end
GET    /v1/sessions/{sid}/entries/{eid}   session=path:sid
PATCH  /v1/sessions/{sid}/entries/{eid}   session=path:sid verify=same
GET    /v1/sessions/{sid}/state           session=path:sid
POST   /v1/sessions/{sid}/entries         session=path:sid
"""

WORK = None  # the run's temporary directory (configurations, logs, temp paths)
started = []  # Popen objects, stopped in reverse order on exit
PIDFILE = os.environ.get("LOADBENCH_PIDFILE")


def log(msg):
    print(f"[loadbench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(core, argv):
    return (["taskset", "-c", core] + argv) if core is not None else argv


def start(name, argv, core, env=None, cwd=None):
    out = open(os.path.join(WORK, f"{name}.log"), "wb")
    p = subprocess.Popen(
        pinned(core, argv),
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    p.bench_name = name
    started.append(p)
    if PIDFILE:
        with open(PIDFILE, "a") as f:
            f.write(f"{p.pid}\n")
    return p


def stop_all():
    for p in reversed(started):
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 5
    for p in reversed(started):
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    started.clear()


def wait_listening(port, proc, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.bench_name} exited with {proc.returncode}; see {WORK}/{proc.bench_name}.log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.bench_name} is not listening on {port}")


def http_get(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


# ---------------------------------------------------------------- /proc readings


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def tree(pid):
    out = [pid]
    for c in children(pid):
        out.extend(tree(c))
    return out


def cpu_ticks(pids):
    """(user, system) clock ticks of the processes, all threads included."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])  # utime
        system += int(fields[12])  # stime
    return user, system


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_kib(pids):
    return sum(status_kib(p, "VmRSS") for p in pids)


def hwm_kib(pids):
    return sum(status_kib(p, "VmHWM") for p in pids)


def reset_hwm(pids):
    for p in pids:
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            pass


def core_times():
    """Busy and total jiffies per CPU from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+) (.*)", line)
            if m:
                v = [int(x) for x in m.group(2).split()]
                idle = v[3] + v[4]
                out[int(m.group(1))] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def core_busy(before, after):
    return {
        f"cpu{c}": round(100 * (after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1]), 1)
        for c in after
    }


# ---------------------------------------------------------------- configurations


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def upstream_conf(port, root):
    return f"""
worker_processes 1;
daemon off;
master_process off;
pid {WORK}/upstream.pid;
error_log {WORK}/upstream-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {WORK}/up-body;
    proxy_temp_path {WORK}/up-proxy;
    fastcgi_temp_path {WORK}/up-fcgi;
    uwsgi_temp_path {WORK}/up-uwsgi;
    scgi_temp_path {WORK}/up-scgi;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    client_body_buffer_size 16k;
    sendfile on;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{GET_BODY.strip()}\\n';
        }}
        location /blob/ {{
            root {root};
            default_type application/octet-stream;
        }}
    }}
}}
"""


def nginx_proxy_conf(port, upstream_port, workers=1):
    # Retries like idemproxy's defaults: 5 attempts, on errors, timeouts and
    # 500/502/503/504, for every method (non_idempotent), the request body kept
    # for replay (proxy_request_buffering on, nginx's default). With one
    # server nginx has no "next" one to retry on, so the upstream is listed
    # once per attempt. Responses stream (proxy_buffering off), as idemproxy's
    # and HAProxy's do; upstream connections are pooled (keepalive 128, as
    # IDEMPROXY_UPSTREAM_MAX_IDLE). POST and PATCH without a key get one
    # ($request_id, 32 random hex digits); a client's key is kept. No access
    # log: idemproxy and HAProxy here log no line per request either.
    servers = "\n".join(f"        server 127.0.0.1:{upstream_port} max_fails=0;" for _ in range(5))
    return f"""
worker_processes {workers};
daemon off;
pid {WORK}/nginx.pid;
error_log {WORK}/nginx-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {WORK}/nx-body;
    proxy_temp_path {WORK}/nx-proxy;
    fastcgi_temp_path {WORK}/nx-fcgi;
    uwsgi_temp_path {WORK}/nx-uwsgi;
    scgi_temp_path {WORK}/nx-scgi;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    upstream backend {{
{servers}
        keepalive 128;
        keepalive_requests 10000000;
        keepalive_timeout 60s;
    }}
    map $request_method $idem_new {{ POST $request_id; PATCH $request_id; default ""; }}
    map $http_idempotency_key $idem_key {{ "" $idem_new; default $http_idempotency_key; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header Idempotency-Key $idem_key;
            proxy_connect_timeout 3s;
            proxy_read_timeout 30s;
            proxy_next_upstream error timeout http_500 http_502 http_503 http_504 non_idempotent;
            proxy_next_upstream_tries 5;
            proxy_next_upstream_timeout 30s;
            proxy_buffering off;
        }}
    }}
}}
"""


def haproxy_conf(port, upstream_port, workers=1):
    # Retries like idemproxy's defaults: 4 retries (5 attempts) on connection
    # failures, empty responses, timeouts and 500/502/503/504; HAProxy keeps
    # the request (up to its 16 KiB buffer) to replay it. Responses stream;
    # server connections are reused. POST and PATCH without a key get a UUID.
    return f"""
global
    nbthread {workers}
    maxconn 8192
defaults
    mode http
    timeout connect 3s
    timeout client 60s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 75s
    option http-keep-alive
    option forwardfor
    retries 4
    retry-on conn-failure empty-response response-timeout 500 502 503 504
frontend fe
    bind 127.0.0.1:{port}
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header Idempotency-Key %[uuid] if METH_POST !{{ req.hdr(idempotency-key) -m found }}
    http-request set-header Idempotency-Key %[uuid] if {{ method PATCH }} !{{ req.hdr(idempotency-key) -m found }}
    default_backend be
backend be
    http-reuse safe
    server up 127.0.0.1:{upstream_port}
"""


def idemproxy_env(variant, port, admin, upstream_port, workers=1):
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("IDEMPROXY_") or k == "RUST_LOG":
            del env[k]
    env.update(
        IDEMPROXY_UPSTREAM=f"http://127.0.0.1:{upstream_port}",
        IDEMPROXY_LISTEN=f"127.0.0.1:{port}",
        IDEMPROXY_ADMIN_LISTEN=f"127.0.0.1:{admin}",
        IDEMPROXY_WORKERS=str(workers),
        IDEMPROXY_LOG="warn",
        IDEMPROXY_LOG_FORMAT="text",
        IDEMPROXY_DRAIN_TIMEOUT="1s",
    )
    if variant == "idemproxy-plain":
        env["IDEMPROXY_MAX_ATTEMPTS"] = "1"
    elif variant == "idemproxy-full":
        env.update(
            IDEMPROXY_ROUTES=FULL_ROUTES,
            IDEMPROXY_SESSION_SOURCES="header:Mcp-Session-Id",
            IDEMPROXY_HEARTBEAT="POST /v1/sessions/{session}/heartbeat",
            IDEMPROXY_HEARTBEAT_BODY='{"id":"{session}"}',
        )
    return env


# ---------------------------------------------------------------- requests


def post_body():
    """The POST scenario's 1,024-byte JSON document."""
    doc = '{"uuid":"2f1c8a54-5d0e-4b7e-9a51-6f0f0c4b1d2e","text":"' + "x" * (1024 - 55 - 2) + '"}'
    assert len(doc) == 1024, len(doc)
    return doc


def raw_request(scenario, host="127.0.0.1"):
    """The bytes of one GET or POST request of the scenario, with the common
    headers, as a client that writes its own requests sends them."""
    head = "".join(f"{k}: {v}\r\n" for k, v in COMMON_HEADERS.items())
    if scenario == "post":
        doc = post_body()
        return (f"POST {POST_PATH} HTTP/1.1\r\nHost: {host}\r\n{head}Content-Type: application/json\r\n"
                f"Content-Length: {len(doc)}\r\n\r\n{doc}").encode()
    return f"GET {GET_PATH} HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode()


# ---------------------------------------------------------------- wrk


def wrk_script(scenario):
    lines = ["-- generated by tools/loadbench.py"]
    for k, v in COMMON_HEADERS.items():
        lines.append(f'wrk.headers["{k}"] = "{v}"')
    if scenario == "post":
        doc = post_body()
        lines += ['wrk.method = "POST"', f"wrk.body = '{doc}'", 'wrk.headers["Content-Type"] = "application/json"']
    lines.append(
        """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'LOADBENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""
    )
    return write(os.path.join(WORK, f"{scenario}.lua"), "\n".join(lines) + "\n")


def run_wrk(port, scenario, duration, conns):
    path = {"get": GET_PATH, "post": POST_PATH, "download": DOWNLOAD_PATH}[scenario]
    argv = pinned(
        LOAD_CORE,
        ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "5s", "-s", SCRIPTS[scenario], f"http://127.0.0.1:{port}{path}"],
    )
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    return parse_wrk_output(out.stdout, out.stderr)


def parse_wrk_output(stdout, stderr=""):
    """The figures of one wrk run: the JSON object on the `LOADBENCH ` line
    that the generated script's done() prints after wrk's own report."""
    for line in stdout.splitlines():
        if line.startswith("LOADBENCH "):
            return json.loads(line[len("LOADBENCH "):])
    raise RuntimeError(f"wrk gave no result: {stdout}\n{stderr}")


# ---------------------------------------------------------------- idle connections


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if m:
        await reader.readexactly(int(m.group(1)))
    elif re.search(rb"(?i)\r\ntransfer-encoding:\s*chunked", head):
        while True:
            size = int((await reader.readline()).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def hold_idle(port, n, pids, hold):
    """Opens n keep-alive connections (at most CONNS requests at once), one GET
    each, holds them idle, and returns the RSS added and the survivors."""
    request = (
        f"GET {GET_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in COMMON_HEADERS.items())
        + "\r\n"
    ).encode()
    sem = asyncio.Semaphore(CONNS)
    conns = []

    async def one():
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
            status = await read_response(reader)
            conns.append((reader, writer))
            return status

    before = rss_kib(pids)
    reset_hwm(pids)
    statuses = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n)), return_exceptions=True), 60)
    ok = sum(1 for s in statuses if s == 200)
    await asyncio.sleep(hold)
    held = rss_kib(pids)
    peak = hwm_kib(pids)

    async def again(rw):
        async with sem:
            reader, writer = rw
            writer.write(request)
            await writer.drain()
            return await asyncio.wait_for(read_response(reader), 5)

    alive = await asyncio.gather(*(again(rw) for rw in conns), return_exceptions=True)
    alive_ok = sum(1 for s in alive if s == 200)
    for _, w in conns:
        w.close()
    await asyncio.sleep(0.5)
    return {
        "rss_before_kib": before,
        "rss_held_kib": held,
        "added_kib": held - before,
        "peak_kib": peak,
        "opened_ok": ok,
        "alive_after_hold": alive_ok,
        "hold_s": hold,
    }


# ---------------------------------------------------------------- the run


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    try:
        distro = open("/etc/debian_version").read().strip()
    except OSError:
        distro = "?"
    return {
        "cpu": model,
        "cores": NCPU,
        "mem_mib": mem,
        "kernel": platform.release(),
        "debian": distro,
    }


def version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "?"
    except OSError:
        return "not installed"


def git_rev():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty(src)" if dirty else "")
    except OSError:
        return "?"


def wait_quiet():
    end = time.time() + WAIT_QUIET
    while True:
        load1 = float(open("/proc/loadavg").read().split()[0])
        if load1 < 0.6:
            return load1, True
        if time.time() >= end:
            log(f"machine not quiet (1-min load {load1}) after {WAIT_QUIET}s; running anyway")
            return load1, False
        log(f"1-min load {load1} >= 0.6: waiting for a quiet machine")
        time.sleep(30)


def main():
    global WORK, SCRIPTS
    os.makedirs(OUT, exist_ok=True)
    WORK = tempfile.mkdtemp(prefix="loadbench-")
    if LOAD_CORE is not None:
        os.sched_setaffinity(0, {int(LOAD_CORE)})
    binary = os.environ.get("IDEMPROXY_BIN") or os.path.join(ROOT, "target", "release", "idemproxy")
    if not os.path.exists(binary):
        sys.exit("target/release/idemproxy is missing: run tools/loadbench.sh (it builds it)")
    for tool in ["wrk", "nginx", "haproxy", "taskset"]:
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"{tool} is missing: run tools/loadbench.sh (it installs it)")
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    haproxy_bin = shutil.which("haproxy") or "/usr/sbin/haproxy"

    load1, quiet = wait_quiet()
    log(f"work dir {WORK}; 1-min load {load1}")
    SCRIPTS = {s: wrk_script(s) for s in ["get", "post", "download"]}

    # The upstream: nginx, one worker, `return 200` from memory and a 10 MiB
    # file by sendfile. A C server that costs little per request leaves core 0
    # to the load generator; a hyper upstream would measure hyper twice.
    blob = os.path.join(WORK, "www", "blob")
    os.makedirs(blob)
    with open(os.path.join(blob, "10m"), "wb") as f:
        f.write(os.urandom(10 << 20))
    up_port = free_port()
    up_conf = write(os.path.join(WORK, "upstream.conf"), upstream_conf(up_port, os.path.join(WORK, "www")))
    upstream = start("upstream", [nginx_bin, "-p", WORK, "-c", up_conf, "-e", f"{WORK}/upstream-error.log"], LOAD_CORE)
    wait_listening(up_port, upstream)

    targets = {}
    if "direct" in TARGETS:
        targets["direct"] = {"port": up_port, "proc": None}
    for variant in ["idemproxy", "idemproxy-plain", "idemproxy-full"]:
        if variant in TARGETS:
            port, admin = free_port(), free_port()
            p = start(variant, [binary], PROXY_CORE, env=idemproxy_env(variant, port, admin, up_port, WORKERS))
            targets[variant] = {"port": port, "proc": p}
    if BASELINE_BIN:
        # Another build with idemproxy's default settings, interleaved with the
        # others: a before/after comparison of a change within one run.
        port, admin = free_port(), free_port()
        p = start("idemproxy-baseline", [BASELINE_BIN], PROXY_CORE, env=idemproxy_env("idemproxy", port, admin, up_port, WORKERS))
        targets["idemproxy-baseline"] = {"port": port, "proc": p}
    if "nginx" in TARGETS:
        port = free_port()
        conf = write(os.path.join(WORK, "nginx.conf"), nginx_proxy_conf(port, up_port, WORKERS))
        p = start("nginx", [nginx_bin, "-p", WORK, "-c", conf, "-e", f"{WORK}/nginx-error.log"], PROXY_CORE)
        targets["nginx"] = {"port": port, "proc": p}
    if "haproxy" in TARGETS:
        port = free_port()
        conf = write(os.path.join(WORK, "haproxy.cfg"), haproxy_conf(port, up_port, WORKERS))
        p = start("haproxy", [haproxy_bin, "-f", conf, "-db"], PROXY_CORE)
        targets["haproxy"] = {"port": port, "proc": p}

    results = {"machine": machine()}
    idle_rss = {}
    for name, t in targets.items():
        if t["proc"] is None:
            t["pids"] = []
            continue
        wait_listening(t["port"], t["proc"])
        time.sleep(1.0)
        t["pids"] = tree(t["proc"].pid)
        idle_rss[name] = rss_kib(t["pids"])  # before its first request
        status, _ = http_get(t["port"], GET_PATH)
        if status != 200:
            raise RuntimeError(f"{name} answered {status} to a probe")
        log(f"{name} ready on {t['port']} (pids {t['pids']}, idle RSS {idle_rss[name]} KiB)")

    # Warm-up: every target, both request scenarios, 2 s each.
    for scenario in [s for s in ["get", "post"] if s in SCENARIOS]:
        for name, t in targets.items():
            run_wrk(t["port"], scenario, 2, CONNS)

    runs = {s: {n: [] for n in targets} for s in ["get", "post", "download"]}
    for rnd in range(1, ROUNDS + 1):
        for scenario in [s for s in ["get", "post", "download"] if s in SCENARIOS]:
            conns = DL_CONNS if scenario == "download" else CONNS
            for name, t in targets.items():
                if scenario == "download" and name not in DOWNLOAD_TARGETS:
                    continue
                pids = t["pids"]
                reset_hwm(pids)
                c0, cores0 = cpu_ticks(pids), core_times()
                r = run_wrk(t["port"], scenario, DURATION, conns)
                c1, cores1 = cpu_ticks(pids), core_times()
                r["round"] = rnd
                r["cpu_user_s"] = (c1[0] - c0[0]) / CLK_TCK
                r["cpu_sys_s"] = (c1[1] - c0[1]) / CLK_TCK
                r["cpu_s"] = r["cpu_user_s"] + r["cpu_sys_s"]
                r["hwm_kib"] = hwm_kib(pids) if pids else None
                r["cores_busy_pct"] = core_busy(cores0, cores1)
                r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
                runs[scenario][name].append(r)
                secs = r["duration_us"] / 1e6
                log(
                    f"round {rnd} {scenario:8} {name:16} {r['requests'] / secs:9.0f} req/s "
                    f"p50 {r['p50_us'] / 1000:6.2f} ms p99 {r['p99_us'] / 1000:6.2f} ms "
                    f"cpu {r['cpu_s']:5.2f}s errors {r['errors']} cores {r['cores_busy_pct']}"
                )

    idle = {}
    if "idle" in SCENARIOS:
        for name, t in targets.items():
            if not t["pids"]:
                continue
            time.sleep(1.0)
            idle[name] = asyncio.run(hold_idle(t["port"], IDLE_CONNS, t["pids"], hold=3.0))
            log(f"idle {name:16} {idle[name]}")

    results.update(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        quiet={"load1_at_start": load1, "quiet": quiet},
        versions={
            "idemproxy": git_rev(),
            "rustc": version(["rustc", "--version"]),
            "nginx": version([nginx_bin, "-v"]),
            "haproxy": version([haproxy_bin, "-v"]),
            "wrk": version(["wrk", "-v"]),
        },
        settings={
            "duration_s": DURATION,
            "rounds": ROUNDS,
            "conns": CONNS,
            "download_conns": DL_CONNS,
            "idle_conns": IDLE_CONNS,
            "wrk_threads": 1,
            "workers": WORKERS,
            "pinning": {
                "proxy_under_test": cores_label(PROXY_CORE),
                "wrk_upstream_idle_client": cores_label(LOAD_CORE),
            },
            "order": "each round runs every scenario on every target in turn (A B C A B C ...); the figure is the median over rounds (peak RSS: the maximum)",
        },
        idle_rss_kib=idle_rss,
        runs=runs,
        idle=idle,
    )
    summarize(results)


# ---------------------------------------------------------------- summary


def med(xs):
    return statistics.median(xs) if xs else None


def busy(run, spec):
    """A run's mean busy % over the cores of a taskset list."""
    cores = core_list(spec)
    return sum(run["cores_busy_pct"].get(f"cpu{c}", 0) for c in cores) / len(cores)


def summarize(results):
    summary = {}
    for scenario, per_target in results["runs"].items():
        for name, rs in per_target.items():
            if not rs:
                continue
            rps = [r["requests"] / (r["duration_us"] / 1e6) for r in rs]
            s = {
                "rps": med(rps),
                "rps_min": min(rps),
                "rps_max": max(rps),
                "p50_ms": med([r["p50_us"] / 1000 for r in rs]),
                "p99_ms": med([r["p99_us"] / 1000 for r in rs]),
                "mib_per_s": med([r["bytes"] / (r["duration_us"] / 1e6) / (1 << 20) for r in rs]),
                "errors": sum(r["errors"] for r in rs),
                "proxy_core_busy_pct": med([busy(r, PROXY_CORE) for r in rs]) if PROXY_CORE else None,
                "load_core_busy_pct": med([busy(r, LOAD_CORE) for r in rs]) if LOAD_CORE else None,
            }
            if rs[0]["hwm_kib"] is not None:
                s["cpu_s_per_100k"] = med([r["cpu_s"] / r["requests"] * 100_000 for r in rs])
                s["cpu_user_s_per_100k"] = med([r["cpu_user_s"] / r["requests"] * 100_000 for r in rs])
                s["cpu_sys_s_per_100k"] = med([r["cpu_sys_s"] / r["requests"] * 100_000 for r in rs])
                s["cpu_s_per_gib"] = med([r["cpu_s"] / (r["bytes"] / (1 << 30)) for r in rs])
                s["proxy_cpu_pct"] = med([100 * r["cpu_s"] / (r["duration_us"] / 1e6) for r in rs])
                s["peak_rss_mib"] = max(r["hwm_kib"] for r in rs) / 1024
            summary.setdefault(scenario, {})[name] = s
    results["summary"] = summary
    results["checks"] = checks(results)
    stamp = results["date"]
    with open(os.path.join(OUT, "latest.json"), "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
    md = markdown(results)
    with open(os.path.join(OUT, "latest.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {OUT}/latest.md and latest.json ({stamp})")


def checks(results):
    s = results["summary"]
    idle_rss = results["idle_rss_kib"]
    idle = results["idle"]
    out = []

    def add(what, wanted, measured, ok):
        out.append({"target": what, "wanted": wanted, "measured": measured, "met": ok})

    def get(sc, t, k):
        return s.get(sc, {}).get(t, {}).get(k)

    # The targets of the hot-path work: one worker's throughput at least
    # nginx's, at no more CPU a request. (Latency is judged at fixed rates,
    # by tools/latency.sh: wrk's closed loop understates it.)
    for sc, label in [("get", "GET"), ("post", "POST 1 KiB")]:
        i, n, h = get(sc, "idemproxy", "rps"), get(sc, "nginx", "rps"), get(sc, "haproxy", "rps")
        if i and n:
            add(f"{label} req/s vs nginx", ">= 1.00x", f"{i / n:.2f}x ({i:,.0f} vs {n:,.0f})", i >= n)
        if i and h:
            add(f"{label} req/s vs HAProxy", ">= 1.00x", f"{i / h:.2f}x ({i:,.0f} vs {h:,.0f})", i >= h)
        ic, nc = get(sc, "idemproxy", "cpu_s_per_100k"), get(sc, "nginx", "cpu_s_per_100k")
        if ic and nc:
            add(f"{label} CPU per 100k req vs nginx", "<= 1.00x", f"{ic / nc:.2f}x ({ic:.2f} s vs {nc:.2f} s)", ic <= nc)
    if "idemproxy" in idle_rss:
        v = idle_rss["idemproxy"] / 1024
        add("idle RSS at start", "< 8 MiB", f"{v:.1f} MiB", v < 8)
    peaks = [get(sc, "idemproxy", "peak_rss_mib") for sc in ["get", "post"]]
    peaks = [p for p in peaks if p is not None]
    if peaks:
        add(f"peak RSS under load ({CONNS} conns, GET/POST)", "< 24 MiB", f"{max(peaks):.1f} MiB", max(peaks) < 24)
    if "idemproxy" in idle:
        a = idle["idemproxy"]["added_kib"] / 1024
        add(f"RSS added by {IDLE_CONNS} idle connections", "<= 4 MiB", f"{a:.1f} MiB", a <= 4)
    for sc, label in [("get", "GET"), ("post", "POST 1 KiB")]:
        plain, full, dflt = get(sc, "idemproxy-plain", "rps"), get(sc, "idemproxy-full", "rps"), get(sc, "idemproxy", "rps")
        if plain and full:
            add(f"{label}: full layers (retries+routes+sessions+heartbeat) vs plain", ">= 0.95x", f"{full / plain:.3f}x", full >= 0.95 * plain)
        if plain and dflt:
            add(f"{label}: retries on (default) vs MAX_ATTEMPTS=1", ">= 0.95x", f"{dflt / plain:.3f}x", dflt >= 0.95 * plain)
    return out


def markdown(results):
    s = results["summary"]
    m = results["machine"]
    st = results["settings"]
    v = results["versions"]
    q = results["quiet"]
    lines = [
        f"# idemproxy load benchmark — {results['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_mib'] // 1024} GiB, Linux {m['kernel']}, Debian {m['debian']}.  ",
        f"Versions: idemproxy {v['idemproxy']} ({v['rustc']}), {v['nginx']}, {v['haproxy']}, {v['wrk']}.  ",
        f"Pinning: proxy under test on {st['pinning']['proxy_under_test']}; wrk (1 thread), upstream nginx and the idle-connection client on {st['pinning']['wrk_upstream_idle_client']}.  ",
    ]
    if st.get("workers", 1) != 1:
        lines.append(f"Workers: {st['workers']} per proxy (IDEMPROXY_WORKERS, nginx worker_processes, HAProxy nbthread); the upstream has 1.  ")
    lines += [
        f"Load: wrk, {st['conns']} connections ({st['download_conns']} for the download), {st['duration_s']} s per run, {st['rounds']} rounds interleaved; medians over rounds.  ",
        f"1-min load average at start: {q['load1_at_start']}" + ("" if q["quiet"] else " — **the machine was NOT quiet: other jobs were running, figures are noisy**") + ".",
        "",
    ]
    direct = {sc: s.get(sc, {}).get("direct") for sc in s}

    def ratio(val, base, fmt="{:.2f}"):
        if val is None or not base:
            return ""
        return f" ({fmt.format(val / base)}×)"

    titles = {"get": "GET, small body", "post": "POST 1 KiB JSON (key attached, replay copy kept)", "download": "GET 10 MiB, streamed"}
    for sc in ["get", "post", "download"]:
        if sc not in s:
            continue
        d = direct.get(sc) or {}
        lines += [f"## {titles[sc]}", ""]
        if sc == "download":
            lines += [
                "| target | MiB/s (×direct) | req/s | p50 ms (×direct) | p99 ms (×direct) | proxy CPU s per GiB | proxy CPU % | peak RSS MiB | errors |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
        else:
            lines += [
                "| target | req/s (×direct) | p50 ms (×direct) | p99 ms (×direct) | proxy CPU s / 100k req (×nginx) | proxy CPU % | peak RSS MiB | errors |",
                "|---|---|---|---|---|---|---|---|",
            ]
        nginx_cpu = s[sc].get("nginx", {}).get("cpu_s_per_100k")
        for name, r in s[sc].items():
            cpu = r.get("cpu_s_per_100k")
            rss = r.get("peak_rss_mib")
            pct = r.get("proxy_cpu_pct")
            if sc == "download":
                lines.append(
                    f"| {name} | {r['mib_per_s']:,.0f}{ratio(r['mib_per_s'], d.get('mib_per_s'))} | {r['rps']:,.1f} "
                    f"| {r['p50_ms']:.1f}{ratio(r['p50_ms'], d.get('p50_ms'))} | {r['p99_ms']:.1f}{ratio(r['p99_ms'], d.get('p99_ms'))} "
                    f"| {'' if cpu is None else format(r['cpu_s_per_gib'], '.2f')} | {'' if pct is None else format(pct, '.0f')} "
                    f"| {'' if rss is None else format(rss, '.1f')} | {r['errors']} |"
                )
            else:
                lines.append(
                    f"| {name} | {r['rps']:,.0f}{ratio(r['rps'], d.get('rps'))} "
                    f"| {r['p50_ms']:.2f}{ratio(r['p50_ms'], d.get('p50_ms'))} | {r['p99_ms']:.2f}{ratio(r['p99_ms'], d.get('p99_ms'))} "
                    f"| {'' if cpu is None else format(cpu, '.2f')}{'' if cpu is None else ratio(cpu, nginx_cpu)} "
                    f"| {'' if pct is None else format(pct, '.0f')} | {'' if rss is None else format(rss, '.1f')} | {r['errors']} |"
                )
        lines.append("")
    lines += [
        "## Memory at rest and with idle connections",
        "",
        f"| target | idle RSS at start MiB | RSS added by {IDLE_CONNS} idle keep-alive connections MiB | connections still alive after the hold |",
        "|---|---|---|---|",
    ]
    for name, kib in results["idle_rss_kib"].items():
        i = results["idle"].get(name)
        added = "" if not i else f"{i['added_kib'] / 1024:.1f}"
        alive = "" if not i else f"{i['alive_after_hold']}/{IDLE_CONNS}"
        lines.append(f"| {name} | {kib / 1024:.1f} | {added} | {alive} |")
    lines += [
        "",
        "RSS of nginx is master + worker. CPU is utime+stime of the proxy's processes (/proc/PID/stat); "
        "\"proxy CPU %\" is of one core: near 100 means the proxy saturated its core.",
        "",
        "## Targets",
        "",
        "| target | wanted | measured | met |",
        "|---|---|---|---|",
    ]
    for c in results["checks"]:
        lines.append(f"| {c['target']} | {c['wanted']} | {c['measured']} | {'yes' if c['met'] else '**no**'} |")
    lines += ["", "Reproduce: `tools/loadbench.sh` (see benches/README.md).", ""]
    return "\n".join(lines)


PROXY_TARGETS = ["idemproxy", "idemproxy-plain", "idemproxy-full", "nginx", "haproxy"]


def print_config(argv):
    """`--print-config TARGET PORT UPSTREAM_PORT [--admin PORT] [--work DIR]
    [--workers N]`: the text a target is started with. nginx and haproxy:
    the configuration file; an idemproxy variant: its IDEMPROXY_* variables,
    one `NAME=value` a line, shell-quoted; upstream: the upstream's nginx.conf."""
    import argparse
    import shlex

    global WORK
    ap = argparse.ArgumentParser(prog="loadbench.py --print-config")
    ap.add_argument("target", choices=PROXY_TARGETS + ["upstream"])
    ap.add_argument("port", type=int)
    ap.add_argument("upstream_port", type=int)
    ap.add_argument("--admin", type=int, help="idemproxy's admin port [PORT + 1]")
    ap.add_argument("--work", default="/tmp/loadbench", help="directory of pid, log and temp files [/tmp/loadbench]")
    ap.add_argument("--workers", type=int, default=WORKERS)
    a = ap.parse_args(argv)
    WORK = a.work
    if a.target == "nginx":
        return nginx_proxy_conf(a.port, a.upstream_port, a.workers)
    if a.target == "haproxy":
        return haproxy_conf(a.port, a.upstream_port, a.workers)
    if a.target == "upstream":
        return upstream_conf(a.port, os.path.join(WORK, "www"))
    env = idemproxy_env(a.target, a.port, a.admin or a.port + 1, a.upstream_port, a.workers)
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(env.items()) if k.startswith("IDEMPROXY_"))


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:2]):
        print(__doc__.strip())
        sys.exit(0)
    if sys.argv[1:2] == ["--print-config"]:
        sys.stdout.write(print_config(sys.argv[2:]))
        sys.exit(0)
    SCRIPTS = {}

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        main()
    finally:
        stop_all()
        if WORK and os.environ.get("KEEP_WORK") != "1":
            shutil.rmtree(WORK, ignore_errors=True)
