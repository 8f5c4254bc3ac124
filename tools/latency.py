#!/usr/bin/env python3
"""A sidecar's latency overhead at fixed request rates (open loop).

Run it through `tools/latency.sh`, which installs oha and builds the release
binary first. The load benchmark (tools/loadbench.py) drives every proxy as
hard as wrk can, closed loop: it measures throughput, and its latency is that
of a saturated proxy. An agent's sidecar mostly runs far below saturation;
what it costs there is the latency it adds to each request. This run sends a
constant rate with oha, open loop, with coordinated-omission correction
(`--latency-correction`: a request's latency counts from the moment it was
due, so a stall delays every request behind it, as it would for real
clients), and reports p50, p99 and p99.9 of each target and what each proxy
adds over `direct`.

Targets, upstream, configurations and pinning are the load benchmark's
(imported from tools/loadbench.py): the upstream nginx `return 200`, and
  direct      oha -> upstream
  idemproxy   defaults, one worker
  nginx       one worker, retrying reverse proxy
  haproxy     nbthread 1, retrying reverse proxy
(also idemproxy-plain and idemproxy-full when named in TARGETS). The proxy
under test runs on core 1, oha and the upstream on core 0.

Each round runs every scenario at every rate on every target in turn
(interleaved), ROUNDS rounds; the figures are medians over rounds. Every
oha run is bounded by `-z DURATION` and a timeout; everything runs on
127.0.0.1 and every process started is stopped on exit.

Settings (environment, defaults in brackets): RATES [1000,5000] requests/s,
CONNS [50], DURATION [10] seconds per run, ROUNDS [3], SCENARIOS [get,post],
TARGETS [direct,idemproxy,nginx,haproxy], WAIT_QUIET [1200] seconds to wait
for a 1-minute load under 0.6, OUT [benches/results] (writes latency.md and
latency.json), IDEMPROXY_BIN [target/release/idemproxy], IDEMPROXY_REV (the
source revision of IDEMPROXY_BIN when it was not built from this tree), OHA
[oha on PATH, else ~/.cargo/bin/oha], WORKERS [1] (as the load benchmark's),
KEEP_WORK=1. `--help` prints this text. The pure parts (oha's command line and
output, summary, checks, report) are tested by tools/test_latency.py.
"""

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import loadbench as lb

RATES = [int(r) for r in os.environ.get("RATES", "1000,5000").split(",") if r]
CONNS = int(os.environ.get("CONNS", "50"))
DURATION = int(os.environ.get("DURATION", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
ALL_TARGETS = ["direct", "idemproxy", "idemproxy-plain", "idemproxy-full", "nginx", "haproxy"]
TARGETS = [t for t in os.environ.get("TARGETS", "direct,idemproxy,nginx,haproxy").split(",") if t]
SCENARIOS = [s for s in os.environ.get("SCENARIOS", "get,post").split(",") if s]
OUT = os.environ.get("OUT", os.path.join(lb.ROOT, "benches", "results"))
PERCENTILES = [("p50", "p50"), ("p99", "p99"), ("p99.9", "p999")]  # oha's key, ours
TITLES = {"get": "GET, small body", "post": "POST 1 KiB JSON (key attached, replay copy kept)"}


def log(msg):
    print(f"[latency {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def oha_path(environ=os.environ):
    return environ.get("OHA") or shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha")


def oha_argv(oha, port, scenario, rate, conns, duration, body_file=None):
    """oha at a fixed rate, open loop, latency measured from each request's
    due time; in-flight requests are waited for at the deadline (-w), so none
    is cut off and counted as an error."""
    path = {"get": lb.GET_PATH, "post": lb.POST_PATH}[scenario]
    argv = [oha, f"http://127.0.0.1:{port}{path}", "-q", str(rate), "--latency-correction",
            "-c", str(conns), "-z", f"{duration}s", "-w", "--no-tui", "--output-format", "json"]
    for k, v in lb.COMMON_HEADERS.items():
        argv += ["-H", f"{k}: {v}"]
    if scenario == "post":
        argv += ["-m", "POST", "-T", "application/json", "-D", body_file]
    return lb.pinned(lb.LOAD_CORE, argv)


def parse_oha(text):
    """The figures of one oha run from its JSON report (seconds -> ms)."""
    try:
        j = json.loads(text)
    except json.JSONDecodeError:
        raise RuntimeError(f"oha gave no JSON report: {text[:500]}") from None
    s, p = j["summary"], j["latencyPercentiles"]
    statuses = {str(k): int(v) for k, v in (j.get("statusCodeDistribution") or {}).items()}
    errors = {str(k): int(v) for k, v in (j.get("errorDistribution") or {}).items()}
    out = {
        "rps": s["requestsPerSec"],
        "success_rate": s["successRate"],
        "total_s": s["total"],
        "requests": sum(statuses.values()) + sum(errors.values()),
        "statuses": statuses,
        "errors": errors,
        "mean_ms": (s.get("average") or 0) * 1000,
        "max_ms": (s.get("slowest") or 0) * 1000,
    }
    for key, ours in PERCENTILES:
        v = p.get(key)
        out[f"{ours}_ms"] = None if v is None else v * 1000
    out["failed"] = sum(errors.values()) + sum(n for code, n in statuses.items() if code != "200")
    return out


def run_oha(oha, port, scenario, rate, body_file, name, duration):
    argv = oha_argv(oha, port, scenario, rate, CONNS, duration, body_file)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"oha exited with {out.returncode}: {out.stderr[-2000:]}")
    lb.write(os.path.join(lb.WORK, f"oha-{name}-{scenario}-{rate}.json"), out.stdout)  # the last run's, for KEEP_WORK=1
    return parse_oha(out.stdout)


# ---------------------------------------------------------------- summary


def summarize(runs):
    """{scenario: {rate: {target: medians}}} with each proxy's added latency
    over direct (from the medians) when direct was run."""
    summary = {}
    for sc, per_rate in runs.items():
        for rate, per_target in per_rate.items():
            row = {}
            for target, rs in per_target.items():
                if not rs:
                    continue
                m = {
                    "rps": lb.med([r["rps"] for r in rs]),
                    "failed": sum(r["failed"] for r in rs),
                    "requests": sum(r["requests"] for r in rs),
                    "rounds": len(rs),
                }
                for _, ours in PERCENTILES:
                    vals = [r[f"{ours}_ms"] for r in rs if r[f"{ours}_ms"] is not None]
                    m[f"{ours}_ms"] = lb.med(vals)
                cpu = [r["proxy_cpu_pct"] for r in rs if r.get("proxy_cpu_pct") is not None]
                m["proxy_cpu_pct"] = lb.med(cpu)
                row[target] = m
            d = row.get("direct")
            for target, m in row.items():
                for _, ours in PERCENTILES:
                    v, base = m[f"{ours}_ms"], d and d[f"{ours}_ms"]
                    m[f"added_{ours}_us"] = None if v is None or base is None else (v - base) * 1000
            summary.setdefault(sc, {})[str(rate)] = row
    return summary


def checks(summary, rates):
    """Per scenario: idemproxy's added p99 at most nginx's, at every rate."""
    out = []
    for sc, per_rate in summary.items():
        parts, ok, complete = [], True, True
        for rate in rates:
            row = per_rate.get(str(rate), {})
            i = row.get("idemproxy", {}).get("added_p99_us")
            n = row.get("nginx", {}).get("added_p99_us")
            if i is None or n is None:
                complete = False
                continue
            parts.append(f"{rate:,}: {i:+,.0f} µs vs {n:+,.0f} µs")
            ok = ok and i <= n
        if complete and parts:
            label = {"get": "GET", "post": "POST 1 KiB"}.get(sc, sc)
            at = " and ".join(f"{r:,}" for r in rates)
            out.append({
                "target": f"{label}: idemproxy's added p99 ≤ nginx's at {at} req/s",
                "wanted": "≤ nginx",
                "measured": "; ".join(parts),
                "met": ok,
            })
    return out


def fmt(v, spec=".2f"):
    return "" if v is None else format(v, spec)


def markdown(results):
    m, v, st, q = results["machine"], results["versions"], results["settings"], results["quiet"]
    lines = [
        f"# idemproxy latency at fixed rates — {results['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_mib'] // 1024} GiB, Linux {m['kernel']}, Debian {m['debian']}.  ",
        f"Versions: idemproxy {v['idemproxy']} ({v['rustc']}), {v['nginx']}, {v['haproxy']}, {v['oha']}.  ",
        f"Pinning: proxy under test on {st['pinning']['proxy_under_test']}; oha and the upstream nginx on {st['pinning']['oha_upstream']}.  ",
        f"Load: oha, open loop at a fixed rate with coordinated-omission correction (`-q RATE --latency-correction`: "
        f"latency counts from each request's due time), {st['conns']} connections, {st['duration_s']} s per run, "
        f"{st['rounds']} rounds interleaved; medians over rounds. {st['workers']} worker{'' if st['workers'] == 1 else 's'} per proxy.  ",
        f"1-min load average at start: {q['load1_at_start']}"
        + ("" if q["quiet"] else " — **the machine was NOT quiet: other jobs were running, figures are noisy**") + ".",
        "",
    ]
    for sc in [s for s in ["get", "post"] if s in results["summary"]]:
        lines += [
            f"## {TITLES[sc]}",
            "",
            "| target | rate req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms | added p50 µs | added p99 µs | added p99.9 µs | proxy CPU % | failed |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for rate, row in results["summary"][sc].items():
            for target, r in row.items():
                lines.append(
                    f"| {target} | {int(rate):,} | {r['rps']:,.0f} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['p999_ms'])} "
                    f"| {fmt(r['added_p50_us'], '+,.0f')} | {fmt(r['added_p99_us'], '+,.0f')} | {fmt(r['added_p999_us'], '+,.0f')} "
                    f"| {fmt(r['proxy_cpu_pct'], '.0f')} | {r['failed']} |"
                )
        lines.append("")
    lines += [
        "Added: the target's percentile minus direct's, from the medians over rounds (direct: oha talks to the upstream "
        "itself). Proxy CPU %: utime+stime of the proxy's processes over the run, in % of one core. Failed: errors and "
        "non-200 answers over all rounds.",
        "",
        "## Targets",
        "",
        "| target | wanted | measured | met |",
        "|---|---|---|---|",
    ]
    for c in results["checks"]:
        lines.append(f"| {c['target']} | {c['wanted']} | {c['measured']} | {'yes' if c['met'] else '**no**'} |")
    lines += ["", "Reproduce: `tools/latency.sh` (see benches/README.md).", ""]
    return "\n".join(lines)


def write_results(results):
    results["summary"] = summarize(results["runs"])
    results["checks"] = checks(results["summary"], results["settings"]["rates"])
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "latency.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    md = markdown(results)
    with open(os.path.join(OUT, "latency.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {OUT}/latency.md and latency.json")


# ---------------------------------------------------------------- the run


def main():
    oha = oha_path()
    if not os.path.exists(oha):
        sys.exit("oha is missing: run tools/latency.sh (it installs it)")
    bad = [t for t in TARGETS if t not in ALL_TARGETS] + [s for s in SCENARIOS if s not in TITLES]
    if bad:
        sys.exit(f"unknown target or scenario: {bad}")
    binary = os.environ.get("IDEMPROXY_BIN") or os.path.join(lb.ROOT, "target", "release", "idemproxy")
    if not os.path.exists(binary):
        sys.exit(f"{binary} is missing: run tools/latency.sh (it builds it)")
    for tool in ["nginx", "haproxy", "taskset"]:
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"{tool} is missing: run tools/loadbench.sh once (it installs it)")
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    haproxy_bin = shutil.which("haproxy") or "/usr/sbin/haproxy"
    lb.WORK = tempfile.mkdtemp(prefix="latency-")
    if lb.LOAD_CORE is not None:
        os.sched_setaffinity(0, set(lb.core_list(lb.LOAD_CORE)))
    load1, quiet = lb.wait_quiet()
    log(f"work dir {lb.WORK}; 1-min load {load1}; oha {oha}")
    body_file = lb.write(os.path.join(lb.WORK, "post.json"), lb.post_body())

    os.makedirs(os.path.join(lb.WORK, "www"))
    up_port = lb.free_port()
    up_conf = lb.write(os.path.join(lb.WORK, "upstream.conf"), lb.upstream_conf(up_port, os.path.join(lb.WORK, "www")))
    upstream = lb.start("upstream", [nginx_bin, "-p", lb.WORK, "-c", up_conf, "-e", f"{lb.WORK}/upstream-error.log"], lb.LOAD_CORE)
    lb.wait_listening(up_port, upstream)

    targets = {}
    for name in TARGETS:
        if name == "direct":
            targets[name] = {"port": up_port, "proc": None}
            continue
        port = lb.free_port()
        if name.startswith("idemproxy"):
            p = lb.start(name, [binary], lb.PROXY_CORE, env=lb.idemproxy_env(name, port, lb.free_port(), up_port, lb.WORKERS))
        elif name == "nginx":
            conf = lb.write(os.path.join(lb.WORK, "nginx.conf"), lb.nginx_proxy_conf(port, up_port, lb.WORKERS))
            p = lb.start(name, [nginx_bin, "-p", lb.WORK, "-c", conf, "-e", f"{lb.WORK}/nginx-error.log"], lb.PROXY_CORE)
        else:
            conf = lb.write(os.path.join(lb.WORK, "haproxy.cfg"), lb.haproxy_conf(port, up_port, lb.WORKERS))
            p = lb.start(name, [haproxy_bin, "-f", conf, "-db"], lb.PROXY_CORE)
        targets[name] = {"port": port, "proc": p}
    for name, t in targets.items():
        t["pids"] = []
        if t["proc"] is not None:
            lb.wait_listening(t["port"], t["proc"])
            time.sleep(0.5)
            t["pids"] = lb.tree(t["proc"].pid)
        status, _ = lb.http_get(t["port"], lb.GET_PATH)
        if status != 200:
            raise RuntimeError(f"{name} answered {status} to a probe")
        log(f"{name} ready on {t['port']} (pids {t['pids']})")

    # Warm-up: every target, every scenario, 2 s at the lowest rate.
    for sc in SCENARIOS:
        for name, t in targets.items():
            run_oha(oha, t["port"], sc, min(RATES), body_file, "warm-up", 2)

    runs = {sc: {str(rate): {n: [] for n in targets} for rate in RATES} for sc in SCENARIOS}
    t0 = time.time()
    for rnd in range(1, ROUNDS + 1):
        for sc in SCENARIOS:
            for rate in RATES:
                for name, t in targets.items():
                    c0 = lb.cpu_ticks(t["pids"])
                    r = run_oha(oha, t["port"], sc, rate, body_file, name, DURATION)
                    c1 = lb.cpu_ticks(t["pids"])
                    cpu_s = (c1[0] + c1[1] - c0[0] - c0[1]) / lb.CLK_TCK
                    r["round"] = rnd
                    r["proxy_cpu_pct"] = 100 * cpu_s / r["total_s"] if t["pids"] else None
                    runs[sc][str(rate)][name].append(r)
                    log(f"round {rnd} {sc:4} {rate:5}/s {name:16} {r['rps']:7.0f} req/s p50 {r['p50_ms']:6.2f} "
                        f"p99 {r['p99_ms']:6.2f} p99.9 {r['p999_ms']:6.2f} ms failed {r['failed']}")
    log(f"{ROUNDS} rounds in {time.time() - t0:.0f} s")

    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": lb.machine(),
        "quiet": {"load1_at_start": load1, "quiet": quiet},
        "versions": {
            "idemproxy": os.environ.get("IDEMPROXY_REV") or lb.git_rev(),
            "rustc": lb.version(["rustc", "--version"]),
            "nginx": lb.version([nginx_bin, "-v"]),
            "haproxy": lb.version([haproxy_bin, "-v"]),
            "oha": lb.version([oha, "--version"]),
        },
        "settings": {
            "rates": RATES,
            "conns": CONNS,
            "duration_s": DURATION,
            "rounds": ROUNDS,
            "workers": lb.WORKERS,
            "pinning": {"proxy_under_test": lb.cores_label(lb.PROXY_CORE), "oha_upstream": lb.cores_label(lb.LOAD_CORE)},
            "oha": "oha URL -q RATE --latency-correction -c CONNS -z DURATION -w --no-tui --output-format json",
            "order": "each round runs every scenario at every rate on every target in turn; the figure is the median over rounds",
        },
        "runs": runs,
    }
    write_results(results)


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:2]):
        print(__doc__.strip())
        sys.exit(0)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        main()
    finally:
        lb.stop_all()
        if lb.WORK and os.environ.get("KEEP_WORK") != "1":
            shutil.rmtree(lb.WORK, ignore_errors=True)
