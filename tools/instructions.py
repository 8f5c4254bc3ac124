#!/usr/bin/env python3
"""User-space instructions per proxied request, counted by callgrind, for
idemproxy, nginx and HAProxy in one run. Run it through
benches/instructions.sh (same arguments and settings).

    benches/instructions.sh [BINARY] [get|post|both] [REQUESTS]

Starts the load benchmark's upstream (nginx, `return 200`) and each target
in TARGETS, one after the other, under `valgrind --tool=callgrind
--instr-atstart=no`, with the load benchmark's configurations
(tools/loadbench.py: idemproxy_env, nginx_proxy_conf, haproxy_conf; one
worker; nginx with `-g 'master_process off;'` so that the worker is the
process valgrind runs, HAProxy with -db). For each scenario it sends a
warm-up, turns instrumentation on (`callgrind_control -i on`), sends REQUESTS
requests one at a time over 4 keep-alive connections, turns it off and dumps
the counts. Every request must be answered 200.

Settings (environment): TARGETS [idemproxy] (space or comma list of
idemproxy, idemproxy-plain, idemproxy-full, nginx, haproxy), EXTRA_ENV
(IDEMPROXY_* variables for the idemproxy targets, e.g.
"IDEMPROXY_MAX_ATTEMPTS=1"), WARMUP [400] requests, TOP [40 for one target,
0 otherwise] functions shown per run (inclusive, per request), KEEP_OUT (copy
the callgrind profile there; with several runs, KEEP_OUT.TARGET.SCENARIO),
OUT (a directory: write instructions.md and instructions.json there),
IDEMPROXY_REV (the source revision of BINARY, for the results file; by
default this tree's `git rev-parse --short HEAD`).

It does not see kernel time (the socket calls: about half of a proxied
request's CPU on loopback). Everything runs on 127.0.0.1 and every process
started is stopped, by pid, on exit. The pure parts (argument parsing, the
callgrind figures, the report) are tested by tools/test_instructions.py.
"""

import datetime
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import loadbench as lb

KINDS = {"get": ["get"], "post": ["post"], "both": ["get", "post"], "get,post": ["get", "post"]}
TARGET_NAMES = ["idemproxy", "idemproxy-plain", "idemproxy-full", "nginx", "haproxy"]
CONNS = 4
TITLES = {"get": "GET, small body", "post": "POST 1 KiB JSON"}


def log(msg):
    print(f"[instructions {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv, environ):
    """The run's settings from the positional arguments and the environment;
    raises ValueError on a bad one."""
    if len(argv) > 3:
        raise ValueError("usage: benches/instructions.sh [BINARY] [get|post|both] [REQUESTS]")
    binary = argv[0] if len(argv) > 0 else "target/release/idemproxy"
    kind = argv[1] if len(argv) > 1 else "get"
    if kind not in KINDS:
        raise ValueError(f"scenario {kind!r}: expected get, post or both")
    try:
        n = int(argv[2]) if len(argv) > 2 else 4000
        warmup = int(environ.get("WARMUP", "400"))
    except ValueError:
        raise ValueError("REQUESTS and WARMUP are whole numbers") from None
    if n < 1 or warmup < 0:
        raise ValueError("REQUESTS must be at least 1, WARMUP at least 0")
    targets = [t for t in re.split(r"[\s,]+", environ.get("TARGETS", "idemproxy")) if t]
    bad = [t for t in targets if t not in TARGET_NAMES]
    if bad or not targets:
        raise ValueError(f"TARGETS {bad or targets}: expected some of {' '.join(TARGET_NAMES)}")
    extra = {}
    for word in shlex.split(environ.get("EXTRA_ENV", "")):
        k, eq, v = word.partition("=")
        if not eq or not k.startswith("IDEMPROXY_"):
            raise ValueError(f"EXTRA_ENV word {word!r}: expected IDEMPROXY_NAME=value")
        extra[k] = v
    runs = len(targets) * len(KINDS[kind])
    top = environ.get("TOP")
    return {
        "binary": binary,
        "scenarios": KINDS[kind],
        "requests": n,
        "warmup": warmup,
        "targets": list(dict.fromkeys(targets)),
        "extra_env": extra,
        "top": int(top) if top else (40 if len(targets) == 1 else 0),
        "keep_out": environ.get("KEEP_OUT") or None,
        "keep_out_suffixed": runs > 1,
        "out": environ.get("OUT") or None,
        "rev": environ.get("IDEMPROXY_REV") or None,
    }


def callgrind_totals(text):
    """The instruction count (Ir) of a callgrind profile: its `totals:` line
    (older files: `summary:`)."""
    found = None
    for line in text.splitlines():
        m = re.match(r"(totals|summary):\s+(\d+)", line)
        if m and (found is None or m.group(1) == "totals"):
            found = int(m.group(2))
    if found is None:
        raise ValueError("no totals line in the callgrind profile")
    return found


def top_functions(annotated, n, limit):
    """(instructions per request, function) of callgrind_annotate's inclusive
    listing, without the PROGRAM TOTALS line, at most `limit` of them."""
    out = []
    for line in annotated.splitlines():
        m = re.match(r"^\s*([\d,]+) +\(\s*[\d.]+%\)\s+(.*)$", line)
        if not m or "PROGRAM TOTALS" in m.group(2):
            continue
        if len(out) >= limit:
            break
        out.append((int(m.group(1).replace(",", "")) // n, m.group(2)[:180]))
    return out


def ratios(counts, base="nginx"):
    """{scenario: {target: per-request count / base's}} where base was counted."""
    out = {}
    for target, per in counts.items():
        for sc, c in per.items():
            b = counts.get(base, {}).get(sc)
            out.setdefault(sc, {})[target] = c["per_request"] / b["per_request"] if b else None
    return out


def markdown(results):
    m, v, st = results["machine"], results["versions"], results["settings"]
    counts = results["counts"]
    scenarios = [sc for sc in ["get", "post"] if any(sc in per for per in counts.values())]
    r = ratios(counts)
    lines = [
        f"# Instructions per request — {results['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_mib'] // 1024} GiB, Linux {m['kernel']}, Debian {m['debian']}.  ",
        f"Versions: idemproxy {v['idemproxy']} ({v['rustc']}), {v['nginx']}, {v['haproxy']}, {v['valgrind']}.  ",
        f"Counted: user-space instructions (callgrind `Ir`, every thread of the proxy's process) of {st['requests']:,} requests "
        f"after {st['warmup']} of warm-up, sent one at a time over {st['conns']} keep-alive connections; "
        "kernel time is not counted.  ",
        f"Proxies: one worker each, the load benchmark's configurations (tools/loadbench.py), in front of its upstream "
        f"(nginx `return 200`, 36-byte body); nginx with `master_process off`, HAProxy with `-db`."
        + (f" idemproxy targets also had {' '.join(f'{k}={shlex.quote(x)}' for k, x in st['extra_env'].items())}." if st.get("extra_env") else ""),
        "",
        "| target | " + " | ".join(f"{TITLES[sc]}: instructions / request (×nginx)" for sc in scenarios) + " |",
        "|---|" + "---|" * len(scenarios),
    ]
    for target, per in counts.items():
        cells = []
        for sc in scenarios:
            c = per.get(sc)
            x = r.get(sc, {}).get(target)
            cells.append("" if c is None else f"{c['per_request']:,}" + ("" if x is None else f" ({x:.2f}×)"))
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "idemproxy: defaults (5 attempts, replay copy, `Idempotency-Key` on POST). idemproxy-full: plus a 7-route "
        "table, `IDEMPROXY_SESSION_SOURCES=header:Mcp-Session-Id` and a heartbeat. nginx and HAProxy: retrying "
        "(5 attempts), a key on POST; see benches/README.md.",
        "",
        "Instructions are not time: they leave out the kernel's share, cache misses and how much work one "
        "instruction does (a vectorised memcpy moves 32 bytes in one); the load benchmark's CPU seconds per "
        "request ([latest.md](latest.md)) are the figure that includes them.",
        "",
        f"Reproduce: `{st['command']}` (see benches/README.md).",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- the run


def one(sock, req):
    """Sends one request and reads its answer (Content-Length framed); returns the status."""
    sock.sendall(req)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed before an answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if not m:
        raise RuntimeError(f"answer without Content-Length: {head!r}")
    while len(body) < int(m.group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed inside a body")
        body += chunk
    return int(head.split(b" ", 2)[1])


def connect(port, proc, timeout=90):
    end = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.bench_name} exited with {proc.returncode}; see its log in {lb.WORK}")
        try:
            return [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(CONNS)]
        except OSError:
            if time.time() > end:
                raise RuntimeError(f"{proc.bench_name} is not listening on {port} after {timeout} s") from None
            time.sleep(0.2)


def control(args, pid):
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def count(proc, port, scenario, s):
    """The instructions of s['requests'] requests of the scenario."""
    req = lb.raw_request(scenario)
    conns = connect(port, proc)
    try:
        for i in range(s["warmup"]):  # pools, buffers, lazy statics
            if one(conns[i % CONNS], req) != 200:
                raise RuntimeError(f"{proc.bench_name} did not answer 200 in the warm-up")
        before = set(os.listdir(lb.WORK))
        control(["-i", "on"], proc.pid)
        for i in range(s["requests"]):
            status = one(conns[i % CONNS], req)
            if status != 200:
                raise RuntimeError(f"{proc.bench_name} answered {status} to request {i}")
        control(["-i", "off"], proc.pid)
        control(["-d"], proc.pid)
    finally:
        for c in conns:
            c.close()
    prefix = f"cg-{proc.bench_name}.out"
    end = time.time() + 30
    while True:
        new = sorted(f for f in set(os.listdir(lb.WORK)) - before if f.startswith(prefix))
        if new:
            path = os.path.join(lb.WORK, new[-1])
            time.sleep(0.5)  # the dump is written by the time callgrind_control returns; be safe
            with open(path) as f:
                return path, callgrind_totals(f.read())
        if time.time() > end:
            raise RuntimeError(f"no callgrind dump of {proc.bench_name} in {lb.WORK}")
        time.sleep(0.2)


def start_target(target, s, up_port, nginx_bin, haproxy_bin):
    port = lb.free_port()
    vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
          f"--callgrind-out-file={lb.WORK}/cg-{target}.out"]
    if target.startswith("idemproxy"):
        env = lb.idemproxy_env(target, port, lb.free_port(), up_port)
        env.update(s["extra_env"])
        argv = vg + [s["binary"]]
    elif target == "nginx":
        conf = lb.write(os.path.join(lb.WORK, "nginx.conf"), lb.nginx_proxy_conf(port, up_port))
        argv, env = vg + [nginx_bin, "-p", lb.WORK, "-c", conf, "-e", f"{lb.WORK}/nginx-error.log", "-g", "master_process off;"], None
    else:
        conf = lb.write(os.path.join(lb.WORK, "haproxy.cfg"), lb.haproxy_conf(port, up_port))
        argv, env = vg + [haproxy_bin, "-f", conf, "-db"], None
    return lb.start(target, argv, lb.PROXY_CORE, env=env), port


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    lb.started.remove(proc)


def rev(s):
    if s["rev"]:
        return s["rev"]
    here = os.path.realpath(os.path.join(lb.ROOT, "target", "release", "idemproxy"))
    tree = lb.git_rev()
    return tree if os.path.realpath(s["binary"]) == here else f"{tree}? ({s['binary']}; set IDEMPROXY_REV)"


def command_line(s):
    env = []
    if s["targets"] != ["idemproxy"]:
        env.append(f"TARGETS=\"{' '.join(s['targets'])}\"")
    if s["extra_env"]:
        env.append("EXTRA_ENV=" + shlex.quote(" ".join(f"{k}={v}" for k, v in s["extra_env"].items())))
    if s["warmup"] != 400:
        env.append(f"WARMUP={s['warmup']}")
    env.append("OUT=benches/results")
    kind = "both" if len(s["scenarios"]) == 2 else s["scenarios"][0]
    return " ".join(env + ["benches/instructions.sh", "target/release/idemproxy", kind, str(s["requests"])])


def main(argv):
    try:
        s = parse_args(argv, os.environ)
    except ValueError as e:
        sys.exit(str(e))
    if not os.path.exists(s["binary"]) and any(t.startswith("idemproxy") for t in s["targets"]):
        sys.exit(f"{s['binary']} is missing: cargo build --release")
    for tool in ["valgrind", "callgrind_control", "callgrind_annotate", "nginx"] + (["haproxy"] if "haproxy" in s["targets"] else []):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"{tool} is missing: apt-get install valgrind, or run tools/loadbench.sh once (nginx, haproxy)")
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    haproxy_bin = shutil.which("haproxy") or "/usr/sbin/haproxy"
    lb.WORK = tempfile.mkdtemp(prefix="instructions-")
    if lb.LOAD_CORE is not None:
        os.sched_setaffinity(0, set(lb.core_list(lb.LOAD_CORE)))
    os.makedirs(os.path.join(lb.WORK, "www"))
    up_port = lb.free_port()
    up_conf = lb.write(os.path.join(lb.WORK, "upstream.conf"), lb.upstream_conf(up_port, os.path.join(lb.WORK, "www")))
    upstream = lb.start("upstream", [nginx_bin, "-p", lb.WORK, "-c", up_conf, "-e", f"{lb.WORK}/upstream-error.log"], lb.LOAD_CORE)
    lb.wait_listening(up_port, upstream)

    counts = {}
    for target in s["targets"]:
        proc, port = start_target(target, s, up_port, nginx_bin, haproxy_bin)
        t0 = time.time()
        for sc in s["scenarios"]:
            path, total = count(proc, port, sc, s)
            per = total // s["requests"]
            counts.setdefault(target, {})[sc] = {"instructions": total, "requests": s["requests"], "per_request": per}
            what = s["binary"] if target.startswith("idemproxy") else {"nginx": nginx_bin, "haproxy": haproxy_bin}[target]
            print(f"target: {target}  binary: {what}  scenario: {sc}  requests: {s['requests']}")
            print(f"instructions per request: {per}")
            if s["keep_out"]:
                shutil.copy(path, f"{s['keep_out']}.{target}.{sc}" if s["keep_out_suffixed"] else s["keep_out"])
            if s["top"]:
                annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", path],
                                           capture_output=True, text=True, timeout=120).stdout
                print("top functions, inclusive, per request:")
                for ir, name in top_functions(annotated, s["requests"], s["top"]):
                    print(f"{ir:9d}  {name}")
            sys.stdout.flush()
        stop(proc)
        figures = " ".join(f"{sc} {c['per_request']:,}" for sc, c in counts[target].items())
        log(f"{target}: {figures} instructions/request ({time.time() - t0:.0f} s)")

    if len(counts) > 1 and "nginx" in counts:
        print("\ninstructions per request (×nginx):")
        r = ratios(counts)
        for target, per in counts.items():
            print(f"  {target:16}" + "".join(f"  {sc} {c['per_request']:>8,} ({r[sc][target]:.2f}×)" for sc, c in per.items()))
    if s["out"]:
        results = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": lb.machine(),
            "versions": {
                "idemproxy": rev(s),
                "rustc": lb.version(["rustc", "--version"]),
                "nginx": lb.version([nginx_bin, "-v"]),
                "haproxy": lb.version([haproxy_bin, "-v"]),
                "valgrind": lb.version(["valgrind", "--version"]),
            },
            "settings": {
                "requests": s["requests"],
                "warmup": s["warmup"],
                "conns": CONNS,
                "targets": s["targets"],
                "scenarios": s["scenarios"],
                "extra_env": s["extra_env"],
                "pinning": {"proxy": lb.cores_label(lb.PROXY_CORE), "driver_upstream": lb.cores_label(lb.LOAD_CORE)},
                "command": command_line(s),
            },
            "counts": counts,
        }
        os.makedirs(s["out"], exist_ok=True)
        with open(os.path.join(s["out"], "instructions.json"), "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        with open(os.path.join(s["out"], "instructions.md"), "w") as f:
            f.write(markdown(results))
        log(f"wrote {s['out']}/instructions.md and instructions.json")


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:2]):
        print(__doc__.strip())
        sys.exit(0)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        main(sys.argv[1:])
    finally:
        lb.stop_all()
        if lb.WORK and os.environ.get("KEEP_WORK") != "1":
            shutil.rmtree(lb.WORK, ignore_errors=True)
