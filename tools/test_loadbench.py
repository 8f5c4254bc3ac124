"""Tests of the load benchmark's pure parts (tools/loadbench.py): wrk output
parsing, the generated wrk scripts and proxy configurations, the summary, the
target checks and the Markdown report. Nothing here starts a proxy or wrk.

    python3 -m unittest discover -s tools -p 'test_*.py'
"""

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import loadbench as lb

RESULTS = os.path.join(lb.ROOT, "benches", "results")

# Captured from wrk 4.1.0 (Debian 4.1.0-3+b2), run with the scripts that
# wrk_script() generates, against a small HTTP/1.1 server on 127.0.0.1:
#   wrk -t1 -c4 -d1s --timeout 5s -s get.lua http://127.0.0.1:18765/v1/sessions/bench-1/state
WRK_GET = """\
Running 1s test @ http://127.0.0.1:18765/v1/sessions/bench-1/state
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    44.66ms   10.10ms  63.91ms   81.82%
    Req/Sec    85.10     14.57   113.00     80.00%
  88 requests in 1.03s, 16.03KB read
Requests/sec:     85.17
Transfer/sec:     15.52KB
LOADBENCH {"requests":88,"duration_us":1033191,"bytes":16416,"connect":0,"read":0,"write":0,"status":0,"timeout":0,"p50_us":43964,"p90_us":55185,"p99_us":63913,"max_us":63913,"mean_us":44664.6}
"""

# The same server answering 503 to everything (wrk -c2): wrk counts them as
# status errors and prints its "Non-2xx" line before the script's.
WRK_503 = """\
Running 1s test @ http://127.0.0.1:18765/v1/sessions/bench-1/state
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    43.25ms    8.81ms  51.90ms   95.56%
    Req/Sec    44.80      5.51    50.00     90.00%
  45 requests in 1.00s, 8.97KB read
  Non-2xx or 3xx responses: 45
Requests/sec:     44.81
Transfer/sec:      8.93KB
LOADBENCH {"requests":45,"duration_us":1004315,"bytes":9187,"connect":0,"read":0,"write":0,"status":45,"timeout":0,"p50_us":44009,"p90_us":48010,"p99_us":51905,"max_us":51905,"mean_us":43250.6}
"""

# Nothing listening: wrk exits 1 and its done() never runs.
WRK_REFUSED = "unable to connect to 127.0.0.1:18765 Connection refused\n"

WRK_FIELDS = [
    "requests", "duration_us", "bytes", "connect", "read", "write", "status",
    "timeout", "p50_us", "p90_us", "p99_us", "max_us", "mean_us",
]


def braces_balanced(text):
    depth = 0
    for ch in text:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def run(**over):
    """One measured run as main() records it (wrk figures plus /proc readings)."""
    r = {
        "requests": 100_000, "duration_us": 8_000_000, "bytes": 20 << 20,
        "connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0,
        "p50_us": 1000, "p90_us": 1500, "p99_us": 2000, "max_us": 9000, "mean_us": 1100.0,
        "round": 1, "cpu_user_s": 1.0, "cpu_sys_s": 1.5, "cpu_s": 2.5,
        "hwm_kib": 12288, "cores_busy_pct": {"cpu0": 80.0, "cpu1": 99.0}, "errors": 0,
    }
    r.update(over)
    return r


class WorkDir(unittest.TestCase):
    """Points the module's WORK (set by __main__ in a real run) at a temp dir."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        patcher = mock.patch.object(lb, "WORK", self.tmp.name, create=True)
        patcher.start()
        self.addCleanup(patcher.stop)


class WrkOutputTest(unittest.TestCase):
    def test_parses_the_script_line_of_a_captured_run(self):
        r = lb.parse_wrk_output(WRK_GET)
        self.assertEqual(list(r), WRK_FIELDS)
        self.assertEqual(r["requests"], 88)
        self.assertEqual(r["duration_us"], 1033191)
        self.assertEqual(r["bytes"], 16416)
        self.assertEqual((r["p50_us"], r["p90_us"], r["p99_us"], r["max_us"]), (43964, 55185, 63913, 63913))
        self.assertEqual(r["mean_us"], 44664.6)
        self.assertEqual([r[k] for k in ["connect", "read", "write", "status", "timeout"]], [0] * 5)
        # The script's figures agree with wrk's own report above them.
        self.assertAlmostEqual(r["requests"] / (r["duration_us"] / 1e6), 85.17, places=2)

    def test_status_errors_of_a_captured_run(self):
        r = lb.parse_wrk_output(WRK_503)
        self.assertEqual(r["requests"], 45)
        self.assertEqual(r["status"], 45)
        self.assertEqual(r["bytes"], 9187)

    def test_no_script_line_is_an_error_that_shows_wrk_output(self):
        with self.assertRaises(RuntimeError) as e:
            lb.parse_wrk_output("", WRK_REFUSED)
        self.assertIn("wrk gave no result", str(e.exception))
        self.assertIn("Connection refused", str(e.exception))
        # wrk's human-readable report alone is not a result either.
        with self.assertRaises(RuntimeError):
            lb.parse_wrk_output(WRK_GET.replace("LOADBENCH ", "loadbench "))

    def test_run_wrk_command_line(self):
        done = subprocess.CompletedProcess([], 0, stdout=WRK_GET, stderr="")
        with mock.patch.object(lb, "LOAD_CORE", "0"), \
                mock.patch.object(lb, "SCRIPTS", {"post": "/w/post.lua"}, create=True), \
                mock.patch.object(lb.subprocess, "run", return_value=done) as sub:
            r = lb.run_wrk(4242, "post", 8, 64)
        self.assertEqual(r["requests"], 88)
        argv = sub.call_args.args[0]
        self.assertEqual(
            argv,
            ["taskset", "-c", "0", "wrk", "-t1", "-c64", "-d8s", "--timeout", "5s", "-s", "/w/post.lua",
             "http://127.0.0.1:4242/v1/sessions/bench-1/entries"],
        )
        self.assertEqual(sub.call_args.kwargs["timeout"], 38)


class WrkScriptTest(WorkDir):
    def read(self, scenario):
        path = lb.wrk_script(scenario)
        self.assertEqual(path, os.path.join(self.tmp.name, f"{scenario}.lua"))
        with open(path) as f:
            return f.read()

    def test_every_scenario_sends_the_common_headers(self):
        for scenario in ["get", "post", "download"]:
            text = self.read(scenario)
            self.assertTrue(text.startswith("-- generated by tools/loadbench.py\n"))
            for k, v in lb.COMMON_HEADERS.items():
                self.assertIn(f'wrk.headers["{k}"] = "{v}"\n', text)
            self.assertEqual("wrk.method" in text, scenario == "post")

    def test_post_body_is_1_kib_of_json(self):
        text = self.read("post")
        self.assertIn('wrk.method = "POST"', text)
        self.assertIn('wrk.headers["Content-Type"] = "application/json"', text)
        body = re.search(r"^wrk\.body = '(.*)'$", text, re.M).group(1)
        self.assertEqual(len(body.encode()), 1024)
        self.assertEqual(json.loads(body)["uuid"], "2f1c8a54-5d0e-4b7e-9a51-6f0f0c4b1d2e")

    def test_done_prints_the_fields_the_parser_and_summary_read(self):
        text = self.read("get")
        fmt = re.search(r"'LOADBENCH (\{.*\})\\n'", text).group(1)
        self.assertEqual(re.findall(r'"(\w+)":', fmt), WRK_FIELDS)
        # One argument per placeholder, in the same order.
        args = text.split("LOADBENCH", 1)[1].split("\\n',", 1)[1]
        self.assertEqual(len(re.findall(r"%[d.0-9f]+", fmt)), len(WRK_FIELDS))
        self.assertEqual(args.count(","), len(WRK_FIELDS) - 1)
        self.assertEqual(re.findall(r"latency:percentile\((\d+)\)", args), ["50", "90", "99"])
        self.assertIn("latency.max, latency.mean))", args)
        # With the placeholders filled in, the line is what parse_wrk_output reads.
        filled = re.sub(r"%\.1f", "1.5", re.sub(r"%d", "7", fmt))
        self.assertEqual(lb.parse_wrk_output("LOADBENCH " + filled)["mean_us"], 1.5)


class ConfigurationTest(WorkDir):
    def test_upstream_answers_the_get_body_and_serves_the_blob(self):
        conf = lb.upstream_conf(7001, "/srv/www")
        self.assertTrue(braces_balanced(conf))
        self.assertIn("listen 127.0.0.1:7001 backlog=4096;", conf)
        self.assertIn("return 200 '" + lb.GET_BODY.strip() + "\\n';", conf)
        self.assertIn("root /srv/www;", conf)
        self.assertIn("worker_processes 1;", conf)
        self.assertIn(f"pid {self.tmp.name}/upstream.pid;", conf)
        self.assertEqual(len(lb.GET_BODY), 36)

    def test_nginx_retries_like_idemproxy_defaults(self):
        conf = lb.nginx_proxy_conf(7002, 7001)
        self.assertTrue(braces_balanced(conf))
        self.assertIn("listen 127.0.0.1:7002 backlog=4096;", conf)
        # One server line per attempt: nginx retries on the "next" server.
        self.assertEqual(conf.count("server 127.0.0.1:7001 max_fails=0;"), 5)
        self.assertIn("proxy_next_upstream_tries 5;", conf)
        self.assertIn("proxy_next_upstream error timeout http_500 http_502 http_503 http_504 non_idempotent;", conf)
        self.assertIn("proxy_buffering off;", conf)
        self.assertIn("keepalive 128;", conf)
        self.assertIn("access_log off;", conf)
        self.assertIn("proxy_set_header Idempotency-Key $idem_key;", conf)
        self.assertIn("map $request_method $idem_new { POST $request_id; PATCH $request_id; default \"\"; }", conf)
        self.assertEqual(re.findall(r"^worker_processes (\d+);", conf, re.M), ["1"])
        self.assertIn(f"pid {self.tmp.name}/nginx.pid;", conf)

    def test_haproxy_retries_like_idemproxy_defaults(self):
        conf = lb.haproxy_conf(7003, 7001)
        self.assertTrue(braces_balanced(conf))
        self.assertIn("bind 127.0.0.1:7003\n", conf)
        self.assertIn("server up 127.0.0.1:7001\n", conf)
        self.assertIn("nbthread 1\n", conf)
        self.assertIn("retries 4\n", conf)  # 5 attempts
        self.assertIn("retry-on conn-failure empty-response response-timeout 500 502 503 504\n", conf)
        self.assertIn("option forwardfor\n", conf)
        keys = [line.strip() for line in conf.splitlines() if "Idempotency-Key %[uuid]" in line]
        self.assertEqual(len(keys), 2)
        self.assertIn("if METH_POST !{ req.hdr(idempotency-key) -m found }", keys[0])
        self.assertIn("if { method PATCH } !{ req.hdr(idempotency-key) -m found }", keys[1])

    def test_idemproxy_env_per_variant(self):
        outside = {"PATH": "/usr/bin", "IDEMPROXY_MAX_ATTEMPTS": "9", "IDEMPROXY_ROUTES": "x", "RUST_LOG": "trace"}
        with mock.patch.dict(os.environ, outside, clear=True):
            envs = {v: lb.idemproxy_env(v, 7010, 7011, 7001) for v in ["idemproxy", "idemproxy-plain", "idemproxy-full"]}
            self.assertEqual(os.environ["IDEMPROXY_MAX_ATTEMPTS"], "9")  # the caller's environment is left alone
        base = {
            "PATH": "/usr/bin",
            "IDEMPROXY_UPSTREAM": "http://127.0.0.1:7001",
            "IDEMPROXY_LISTEN": "127.0.0.1:7010",
            "IDEMPROXY_ADMIN_LISTEN": "127.0.0.1:7011",
            "IDEMPROXY_WORKERS": "1",
            "IDEMPROXY_LOG": "warn",
            "IDEMPROXY_LOG_FORMAT": "text",
            "IDEMPROXY_DRAIN_TIMEOUT": "1s",
        }
        # The caller's IDEMPROXY_* and RUST_LOG never leak into a target.
        self.assertEqual(envs["idemproxy"], base)
        self.assertEqual(envs["idemproxy-plain"], dict(base, IDEMPROXY_MAX_ATTEMPTS="1"))
        full = envs["idemproxy-full"]
        self.assertEqual({k: v for k, v in full.items() if k in base}, base)
        self.assertEqual(full["IDEMPROXY_ROUTES"], lb.FULL_ROUTES)
        self.assertEqual(full["IDEMPROXY_SESSION_SOURCES"], "header:Mcp-Session-Id")
        self.assertEqual(full["IDEMPROXY_HEARTBEAT"], "POST /v1/sessions/{session}/heartbeat")
        self.assertEqual(full["IDEMPROXY_HEARTBEAT_BODY"], '{"id":"{session}"}')
        self.assertNotIn("IDEMPROXY_MAX_ATTEMPTS", full)

    def test_full_route_table_matches_the_benchmark_requests(self):
        routes = [line.split() for line in lb.FULL_ROUTES.splitlines()]
        self.assertEqual(len(routes), 7)

        def matches(template, path):
            pattern = "^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)) + "$"
            return re.match(pattern, path) is not None

        get = [r for r in routes if r[0] == "GET" and matches(r[1], lb.GET_PATH)]
        post = [r for r in routes if r[0] == "POST" and matches(r[1], lb.POST_PATH)]
        self.assertEqual(get, [["GET", "/v1/sessions/{sid}/state", "session=path:sid"]])
        self.assertEqual(post, [["POST", "/v1/sessions/{sid}/entries", "session=path:sid"]])

    def test_pinned(self):
        self.assertEqual(lb.pinned(None, ["wrk", "-t1"]), ["wrk", "-t1"])
        self.assertEqual(lb.pinned("1", ["wrk", "-t1"]), ["taskset", "-c", "1", "wrk", "-t1"])

    def test_workers_set_every_proxys_worker_count(self):
        self.assertEqual(re.findall(r"^worker_processes (\d+);", lb.nginx_proxy_conf(7002, 7001, 2), re.M), ["2"])
        self.assertIn("    nbthread 2\n", lb.haproxy_conf(7003, 7001, 2))
        self.assertEqual(lb.idemproxy_env("idemproxy-full", 7010, 7011, 7001, 2)["IDEMPROXY_WORKERS"], "2")

    def test_pinning_follows_the_workers(self):
        # One worker: core 1 alone, the load on core 0, as before.
        self.assertEqual(lb.proxy_cores(2, 1), ("1", "0"))
        # As many workers as cores: the proxy may use every core, the load stays on core 0.
        self.assertEqual(lb.proxy_cores(2, 2), ("0-1", "0"))
        # More cores than workers: the proxy gets cores of its own.
        self.assertEqual(lb.proxy_cores(4, 2), ("1-2", "0"))
        self.assertEqual(lb.proxy_cores(1, 1), (None, None))
        self.assertEqual(lb.core_list("1"), [1])
        self.assertEqual(lb.core_list("0-2"), [0, 1, 2])
        self.assertEqual(lb.core_list("0,3-4"), [0, 3, 4])
        self.assertEqual(lb.cores_label("1"), "core 1")
        self.assertEqual(lb.cores_label("0-1"), "cores 0-1")
        self.assertEqual(lb.cores_label(None), "not pinned")
        self.assertEqual(lb.busy(run(cores_busy_pct={"cpu0": 50.0, "cpu1": 90.0}), "0-1"), 70.0)
        self.assertEqual(lb.busy(run(cores_busy_pct={"cpu0": 50.0, "cpu1": 90.0}), "1"), 90.0)

    def test_print_config_is_what_a_run_starts(self):
        nginx = lb.print_config(["nginx", "7002", "7001", "--work", "/w", "--workers", "2"])
        with mock.patch.object(lb, "WORK", "/w"):
            self.assertEqual(nginx, lb.nginx_proxy_conf(7002, 7001, 2))
            self.assertEqual(lb.print_config(["haproxy", "7003", "7001", "--workers", "1"]), lb.haproxy_conf(7003, 7001))
        with mock.patch.dict(os.environ, {"PATH": "/usr/bin"}, clear=True):
            env = lb.print_config(["idemproxy-full", "7010", "7001", "--workers", "1"]).splitlines()
        self.assertIn("IDEMPROXY_ADMIN_LISTEN=127.0.0.1:7011", env)  # PORT + 1 by default
        self.assertIn("IDEMPROXY_SESSION_SOURCES=header:Mcp-Session-Id", env)
        self.assertIn("IDEMPROXY_HEARTBEAT='POST /v1/sessions/{session}/heartbeat'", env)
        self.assertFalse([line for line in env if line.startswith("PATH=")])
        out = subprocess.run([sys.executable, os.path.join(lb.ROOT, "tools", "loadbench.py"), "--print-config", "haproxy", "7003", "7001"],
                             capture_output=True, text=True, timeout=30, env=dict(os.environ, WORKERS="1"))
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout, lb.haproxy_conf(7003, 7001))


class SummaryTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        for name, value in {"OUT": self.tmp.name, "PROXY_CORE": "1", "LOAD_CORE": "0", "CONNS": 64, "IDLE_CONNS": 1000}.items():
            patcher = mock.patch.object(lb, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)

    def results(self, runs, idle_rss=None, idle=None, quiet=True):
        return {
            "machine": {"cpu": "Test CPU", "cores": 2, "mem_mib": 4096, "kernel": "6.1", "debian": "12.11"},
            "date": "2026-01-02 03:04 UTC",
            "quiet": {"load1_at_start": 0.1 if quiet else 2.5, "quiet": quiet},
            "versions": {"idemproxy": "abc1234", "rustc": "rustc 1.95.0", "nginx": "nginx/1.22.1", "haproxy": "HAProxy 2.6", "wrk": "wrk 4.1.0"},
            "settings": {"duration_s": 8, "rounds": 3, "conns": 64, "download_conns": 4, "idle_conns": 1000,
                         "pinning": {"proxy_under_test": "core 1", "wrk_upstream_idle_client": "core 0"}},
            "idle_rss_kib": idle_rss or {},
            "runs": runs,
            "idle": idle or {},
        }

    def test_median(self):
        self.assertIsNone(lb.med([]))
        self.assertEqual(lb.med([3, 1, 2]), 2)
        self.assertEqual(lb.med([4, 1, 3, 2]), 2.5)

    def test_core_busy(self):
        before = {0: (100, 1000), 1: (0, 1000), 2: (5, 5)}
        after = {0: (600, 2000), 1: (1000, 2000), 2: (5, 5)}
        self.assertEqual(lb.core_busy(before, after), {"cpu0": 50.0, "cpu1": 100.0, "cpu2": 0.0})

    def test_summary_is_the_median_over_rounds(self):
        rounds = [
            run(round=1, requests=80_000, p50_us=1200, p99_us=3000, cpu_s=2.0, cpu_user_s=0.8, cpu_sys_s=1.2, hwm_kib=11264,
                cores_busy_pct={"cpu0": 70.0, "cpu1": 97.0}),
            run(round=2, requests=120_000, p50_us=900, p99_us=2500, cpu_s=3.0, cpu_user_s=1.2, cpu_sys_s=1.8, hwm_kib=13312,
                errors=2, cores_busy_pct={"cpu0": 90.0, "cpu1": 99.0}),
            run(round=3, requests=100_000, p50_us=1000, p99_us=4000, cpu_s=2.6, cpu_user_s=1.0, cpu_sys_s=1.6, hwm_kib=12288,
                errors=1, cores_busy_pct={"cpu0": 80.0, "cpu1": 98.0}),
        ]
        direct = [run(round=i, hwm_kib=None, requests=160_000) for i in (1, 2, 3)]
        results = self.results({"get": {"direct": direct, "idemproxy": rounds, "nginx": []}})
        with mock.patch("sys.stdout"), mock.patch.object(lb, "log"):
            lb.summarize(results)
        s = results["summary"]["get"]
        self.assertNotIn("nginx", s)  # no runs, no row
        i = s["idemproxy"]
        self.assertEqual(i["rps"], 12_500)  # 100,000 requests in 8 s
        self.assertEqual((i["rps_min"], i["rps_max"]), (10_000, 15_000))
        self.assertEqual(i["p50_ms"], 1.0)
        self.assertEqual(i["p99_ms"], 3.0)
        self.assertEqual(i["errors"], 3)  # a sum, not a median
        self.assertAlmostEqual(i["mib_per_s"], 2.5)  # 20 MiB in 8 s
        self.assertAlmostEqual(i["cpu_s_per_100k"], 2.5)  # 2.0/0.8, 3.0/1.2, 2.6/1.0 per 100k requests
        self.assertAlmostEqual(i["cpu_user_s_per_100k"], 1.0)
        self.assertAlmostEqual(i["cpu_sys_s_per_100k"], 1.5)
        self.assertAlmostEqual(i["cpu_s_per_gib"], 2.6 / (20 / 1024))
        self.assertAlmostEqual(i["proxy_cpu_pct"], 32.5)  # 2.6 s of CPU in 8 s
        self.assertEqual(i["peak_rss_mib"], 13.0)  # the maximum, not the median
        self.assertEqual(i["proxy_core_busy_pct"], 98.0)
        self.assertEqual(i["load_core_busy_pct"], 80.0)
        # No process of its own (hwm_kib None): no CPU or memory figures.
        d = s["direct"]
        self.assertEqual(d["rps"], 20_000)
        for key in ["cpu_s_per_100k", "proxy_cpu_pct", "peak_rss_mib"]:
            self.assertNotIn(key, d)
        # Both files are written, and the JSON holds everything.
        with open(os.path.join(self.tmp.name, "latest.json")) as f:
            self.assertEqual(json.load(f), json.loads(json.dumps(results)))
        with open(os.path.join(self.tmp.name, "latest.md")) as f:
            self.assertEqual(f.read(), lb.markdown(results))

    def summary(self, **per_target):
        return {"get": per_target}

    def test_checks_against_nginx_and_haproxy(self):
        results = self.results({})
        results["summary"] = self.summary(
            idemproxy={"rps": 130.0, "p99_ms": 2.0, "cpu_s_per_100k": 1.5, "peak_rss_mib": 23.9},
            nginx={"rps": 100.0, "p99_ms": 2.0, "cpu_s_per_100k": 2.0},
            haproxy={"rps": 131.0},
        )
        results["idle_rss_kib"] = {"idemproxy": 8192}
        results["idle"] = {"idemproxy": {"added_kib": 10 * 1024}}
        got = {c["target"]: c for c in lb.checks(results)}
        self.assertEqual(
            got["GET req/s vs nginx"],
            {"target": "GET req/s vs nginx", "wanted": ">= 1.00x", "measured": "1.30x (130 vs 100)", "met": True},
        )
        self.assertEqual(got["GET req/s vs HAProxy"]["measured"], "0.99x (130 vs 131)")
        self.assertFalse(got["GET req/s vs HAProxy"]["met"])
        self.assertNotIn("GET p99 vs nginx", got)  # judged at fixed rates, not here
        self.assertEqual(got["GET CPU per 100k req vs nginx"]["measured"], "0.75x (1.50 s vs 2.00 s)")
        self.assertTrue(got["GET CPU per 100k req vs nginx"]["met"])
        self.assertEqual(got["idle RSS at start"]["measured"], "8.0 MiB")
        self.assertFalse(got["idle RSS at start"]["met"])  # strictly under 8 MiB
        self.assertTrue(got["peak RSS under load (64 conns, GET/POST)"]["met"])
        self.assertEqual(got["RSS added by 1000 idle connections"]["measured"], "10.0 MiB")
        self.assertFalse(got["RSS added by 1000 idle connections"]["met"])  # at most 4 MiB
        results["idle"]["idemproxy"]["added_kib"] = 4 * 1024
        self.assertTrue({c["target"]: c for c in lb.checks(results)}["RSS added by 1000 idle connections"]["met"])
        # The thresholds themselves: just under nginx's throughput is a miss, equal is enough.
        results["summary"]["get"]["idemproxy"]["rps"] = 99.9
        self.assertFalse({c["target"]: c for c in lb.checks(results)}["GET req/s vs nginx"]["met"])
        results["summary"]["get"]["idemproxy"]["rps"] = 100.0
        self.assertTrue({c["target"]: c for c in lb.checks(results)}["GET req/s vs nginx"]["met"])
        # No POST figures, no idemproxy-plain: no checks for them.
        self.assertFalse([t for t in got if t.startswith("POST") or "plain" in t or "full layers" in t])

    def test_checks_of_the_layers_against_plain_forwarding(self):
        results = self.results({})
        results["summary"] = {"post": {
            "idemproxy": {"rps": 94.0},
            "idemproxy-plain": {"rps": 100.0},
            "idemproxy-full": {"rps": 95.0},
        }}
        got = {c["target"]: c for c in lb.checks(results)}
        full = got["POST 1 KiB: full layers (retries+routes+sessions+heartbeat) vs plain"]
        self.assertEqual((full["measured"], full["met"]), ("0.950x", True))
        dflt = got["POST 1 KiB: retries on (default) vs MAX_ATTEMPTS=1"]
        self.assertEqual((dflt["measured"], dflt["met"]), ("0.940x", False))
        self.assertEqual(len(got), 2)

    def test_markdown_tables(self):
        results = self.results({}, idle_rss={"idemproxy": 7168, "nginx": 14131},
                               idle={"idemproxy": {"added_kib": 18022, "alive_after_hold": 1000}}, quiet=False)
        results["summary"] = {
            "get": {
                "direct": {"rps": 68_000.0, "p50_ms": 0.7, "p99_ms": 1.0, "errors": 0},
                "idemproxy": {"rps": 34_000.0, "p50_ms": 1.4, "p99_ms": 3.0, "cpu_s_per_100k": 2.4,
                              "proxy_cpu_pct": 99.4, "peak_rss_mib": 12.14, "errors": 3},
                "nginx": {"rps": 51_000.0, "p50_ms": 1.05, "p99_ms": 2.0, "cpu_s_per_100k": 1.6,
                          "proxy_cpu_pct": 96.0, "peak_rss_mib": 16.4, "errors": 0},
            },
            "download": {
                "direct": {"rps": 139.2, "mib_per_s": 1392.0, "p50_ms": 19.6, "p99_ms": 47.4, "errors": 0},
                "idemproxy": {"rps": 148.1, "mib_per_s": 1485.0, "p50_ms": 25.6, "p99_ms": 49.5, "cpu_s_per_100k": 1.0,
                              "cpu_s_per_gib": 0.61, "proxy_cpu_pct": 89.0, "peak_rss_mib": 10.8, "errors": 0},
            },
        }
        results["checks"] = [{"target": "idle RSS at start", "wanted": "< 8 MiB", "measured": "7.0 MiB", "met": True},
                             {"target": "GET p99 vs nginx", "wanted": "<= nginx", "measured": "3.00 ms vs 2.00 ms", "met": False}]
        md = lb.markdown(results).splitlines()
        self.assertEqual(md[0], "# idemproxy load benchmark — 2026-01-02 03:04 UTC")
        self.assertIn("1-min load average at start: 2.5 — **the machine was NOT quiet: other jobs were running, figures are noisy**.", md)
        self.assertIn("| direct | 68,000 (1.00×) | 0.70 (1.00×) | 1.00 (1.00×) |  |  |  | 0 |", md)
        self.assertIn("| idemproxy | 34,000 (0.50×) | 1.40 (2.00×) | 3.00 (3.00×) | 2.40 (1.50×) | 99 | 12.1 | 3 |", md)
        self.assertIn("| nginx | 51,000 (0.75×) | 1.05 (1.50×) | 2.00 (2.00×) | 1.60 (1.00×) | 96 | 16.4 | 0 |", md)
        self.assertIn("| idemproxy | 1,485 (1.07×) | 148.1 | 25.6 (1.31×) | 49.5 (1.04×) | 0.61 | 89 | 10.8 | 0 |", md)
        self.assertNotIn("## POST 1 KiB JSON (key attached, replay copy kept)", md)  # not run, no table
        self.assertIn("| idemproxy | 7.0 | 17.6 | 1000/1000 |", md)
        self.assertIn("| nginx | 13.8 |  |  |", md)
        self.assertIn("| idle RSS at start | < 8 MiB | 7.0 MiB | yes |", md)
        self.assertIn("| GET p99 vs nginx | <= nginx | 3.00 ms vs 2.00 ms | **no** |", md)
        self.assertEqual(md[-1], "Reproduce: `tools/loadbench.sh` (see benches/README.md).")
        self.assertFalse([line for line in md if line.startswith("Workers:")])  # one worker: as the README says
        results["settings"].update(workers=2, pinning={"proxy_under_test": "cores 0-1", "wrk_upstream_idle_client": "core 0"})
        md = lb.markdown(results).splitlines()
        self.assertIn("Pinning: proxy under test on cores 0-1; wrk (1 thread), upstream nginx and the idle-connection client on core 0.  ", md)
        self.assertIn("Workers: 2 per proxy (IDEMPROXY_WORKERS, nginx worker_processes, HAProxy nbthread); the upstream has 1.  ", md)


class CommittedResultsTest(unittest.TestCase):
    """benches/results/latest.md is what the benchmark's code makes of
    latest.json: the docs link it, so it must not be edited by hand."""

    def setUp(self):
        with open(os.path.join(RESULTS, "latest.json")) as f:
            self.results = json.load(f)
        st = self.results["settings"]
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        core = {p: (None if v == "not pinned" else v.split()[-1]) for p, v in st["pinning"].items()}
        for name, value in {
            "OUT": self.tmp.name,
            "CONNS": st["conns"],
            "IDLE_CONNS": st["idle_conns"],
            "PROXY_CORE": core["proxy_under_test"],
            "LOAD_CORE": core["wrk_upstream_idle_client"],
        }.items():
            patcher = mock.patch.object(lb, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_latest_md_is_generated_from_latest_json(self):
        with open(os.path.join(RESULTS, "latest.md")) as f:
            self.assertEqual(lb.markdown(self.results), f.read(),
                             "regenerate benches/results/latest.md from latest.json with loadbench.markdown()")

    def test_summary_and_checks_recompute_from_the_runs(self):
        stored = json.loads(json.dumps(self.results))
        again = {k: v for k, v in self.results.items() if k not in ("summary", "checks")}
        with mock.patch("sys.stdout"), mock.patch.object(lb, "log"):
            lb.summarize(again)
        self.assertEqual(again["summary"], stored["summary"])
        self.assertEqual(again["checks"], stored["checks"])


class IdleConnectionTest(unittest.TestCase):
    def read_all(self, data, count):
        async def go():
            reader = asyncio.StreamReader()
            reader.feed_data(data)
            reader.feed_eof()
            statuses = [await lb.read_response(reader) for _ in range(count)]
            return statuses, await reader.read()

        return asyncio.run(go())

    def test_read_response_consumes_exactly_one_answer(self):
        data = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 36\r\n\r\n"
            + lb.GET_BODY.encode()
            + b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n"
            + b"HTTP/1.1 204 No Content\r\n\r\n"
            + b"rest"
        )
        statuses, rest = self.read_all(data, 3)
        self.assertEqual(statuses, [200, 503, 204])
        self.assertEqual(rest, b"rest")


class ProcTest(unittest.TestCase):
    def test_readings_of_this_process(self):
        pid = os.getpid()
        self.assertEqual(lb.tree(pid)[0], pid)
        rss = lb.rss_kib([pid])
        self.assertGreater(rss, 1024)
        self.assertEqual(rss, lb.status_kib(pid, "VmRSS"))
        self.assertGreaterEqual(lb.hwm_kib([pid]), rss - 1024)
        user, system = lb.cpu_ticks([pid])
        self.assertGreaterEqual(user + system, 0)
        cores = lb.core_times()
        self.assertTrue(cores)
        self.assertTrue(all(isinstance(c, int) for c in cores))
        self.assertTrue(all(0 <= busy <= total for busy, total in cores.values()))


if __name__ == "__main__":
    unittest.main()
