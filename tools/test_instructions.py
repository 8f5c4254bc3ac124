"""Tests of the instruction counter's pure parts (tools/instructions.py):
arguments and settings, the callgrind figures, the ratios and the report.
Nothing here starts valgrind, nginx or HAProxy.

    python3 -m unittest discover -s tools -p 'test_*.py'
"""

import json
import os
import unittest

import instructions as ins
import loadbench as lb

RESULTS = os.path.join(lb.ROOT, "benches", "results")

# The shape of a callgrind 3.19 dump (`callgrind_control -d`), cut down: the
# header's `summary:` is 0 for a dump, the count is on the closing `totals:`.
DUMP = """\
# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 12112
cmd:  /usr/sbin/nginx -p /tmp/w -c /tmp/w/nginx.conf
part: 1

desc: I1 cache: 
desc: D1 cache: 
desc: LL cache: 

desc: Timerange: Basic block 0 - 3065058
desc: Trigger: dump

positions: line
events: Ir
summary: 0


ob=(1) /usr/sbin/nginx
fn=(1) ngx_process_events_and_timers
0 7000
0 1000

totals: 12853713
"""

# callgrind_annotate --inclusive=yes of such a dump, cut down.
ANNOTATED = """\
--------------------------------------------------------------------------------
Ir                  
--------------------------------------------------------------------------------
12,853,713 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                   file:function
--------------------------------------------------------------------------------
12,853,713 (100.0%)  ???:ngx_process_events_and_timers [/usr/sbin/nginx]
 4,093,300 (31.85%)  ???:ngx_http_process_request [/usr/sbin/nginx]
   416,500 ( 3.24%)  ???:<idemproxy::upstream::UpstreamService as tower_service::Service<http::request::Request<http_body_util::combinators::box_body::UnsyncBoxBody<bytes::bytes::Bytes,alloc::boxed::Box<dyn core::error::Error>>>>>::call [/tmp/idemproxy]
"""


def counts(**per_target):
    return {t: {sc: {"instructions": v * 100, "requests": 100, "per_request": v} for sc, v in per.items()}
            for t, per in per_target.items()}


class ArgumentsTest(unittest.TestCase):
    def test_the_old_usage_counts_idemproxy_get_4000(self):
        s = ins.parse_args([], {})
        self.assertEqual(s["binary"], "target/release/idemproxy")
        self.assertEqual((s["scenarios"], s["requests"], s["warmup"]), (["get"], 4000, 400))
        self.assertEqual(s["targets"], ["idemproxy"])
        self.assertEqual(s["top"], 40)  # one target: its top functions, as before
        s = ins.parse_args(["/b/idemproxy", "post", "100"], {"KEEP_OUT": "/tmp/p.cg", "TOP": "100"})
        self.assertEqual((s["binary"], s["scenarios"], s["requests"], s["top"]), ("/b/idemproxy", ["post"], 100, 100))
        self.assertEqual((s["keep_out"], s["keep_out_suffixed"]), ("/tmp/p.cg", False))

    def test_targets_in_spaces_or_commas_and_both_scenarios(self):
        s = ins.parse_args(["b", "both"], {"TARGETS": " idemproxy, nginx haproxy  idemproxy-full "})
        self.assertEqual(s["targets"], ["idemproxy", "nginx", "haproxy", "idemproxy-full"])
        self.assertEqual(s["scenarios"], ["get", "post"])
        self.assertEqual(s["top"], 0)  # several targets: the figures only
        self.assertTrue(s["keep_out_suffixed"])
        self.assertEqual(ins.parse_args(["b", "get,post"], {})["scenarios"], ["get", "post"])

    def test_extra_env_is_idemproxy_variables(self):
        s = ins.parse_args([], {"EXTRA_ENV": "IDEMPROXY_MAX_ATTEMPTS=1 IDEMPROXY_ROUTES='GET /x retry=off'"})
        self.assertEqual(s["extra_env"], {"IDEMPROXY_MAX_ATTEMPTS": "1", "IDEMPROXY_ROUTES": "GET /x retry=off"})

    def test_bad_settings_say_what_is_expected(self):
        for argv, env, words in [
            (["b", "put"], {}, "get, post or both"),
            (["b", "get", "many"], {}, "whole numbers"),
            (["b", "get", "0"], {}, "at least 1"),
            (["b", "get", "1", "x"], {}, "usage"),
            ([], {"TARGETS": "idemproxy envoy"}, "envoy"),
            ([], {"EXTRA_ENV": "RUST_LOG=trace"}, "IDEMPROXY_NAME=value"),
        ]:
            with self.assertRaises(ValueError) as e:
                ins.parse_args(argv, env)
            self.assertIn(words, str(e.exception))


class CallgrindTest(unittest.TestCase):
    def test_totals_of_a_dump(self):
        self.assertEqual(ins.callgrind_totals(DUMP), 12853713)
        # A file with only the header's summary line (older format) gives that.
        self.assertEqual(ins.callgrind_totals("events: Ir\nsummary: 4200\n"), 4200)
        with self.assertRaises(ValueError):
            ins.callgrind_totals("events: Ir\n")

    def test_top_functions_per_request(self):
        top = ins.top_functions(ANNOTATED, 500, 40)
        self.assertEqual([ir for ir, _ in top], [25707, 8186, 833])
        self.assertEqual(top[0][1], "???:ngx_process_events_and_timers [/usr/sbin/nginx]")
        self.assertEqual(len(top[2][1]), 180)  # long names are cut
        self.assertEqual(len(ins.top_functions(ANNOTATED, 500, 2)), 2)

    def test_ratios_to_nginx(self):
        r = ins.ratios(counts(idemproxy={"get": 50_000, "post": 60_000}, nginx={"get": 25_000}))
        self.assertEqual(r["get"], {"idemproxy": 2.0, "nginx": 1.0})
        self.assertEqual(r["post"], {"idemproxy": None})  # no nginx figure, no ratio


class ReportTest(unittest.TestCase):
    def results(self, c, **settings):
        st = {"requests": 4000, "warmup": 400, "conns": 4, "extra_env": {},
              "command": "TARGETS=\"idemproxy nginx\" OUT=benches/results benches/instructions.sh target/release/idemproxy both 4000"}
        st.update(settings)
        return {
            "date": "2026-01-02 03:04 UTC",
            "machine": {"cpu": "Test CPU", "cores": 2, "mem_mib": 4096, "kernel": "6.1", "debian": "12.11"},
            "versions": {"idemproxy": "abc1234", "rustc": "rustc 1.95.0", "nginx": "nginx/1.22.1",
                         "haproxy": "HAProxy 2.6", "valgrind": "valgrind-3.19.0"},
            "settings": st,
            "counts": c,
        }

    def test_table_with_ratios(self):
        md = ins.markdown(self.results(counts(
            idemproxy={"get": 54_288, "post": 61_000}, nginx={"get": 25_707, "post": 37_401}, haproxy={"get": 73_269}))).splitlines()
        self.assertEqual(md[0], "# Instructions per request — 2026-01-02 03:04 UTC")
        self.assertIn("Machine: Test CPU, 2 cores, 4 GiB, Linux 6.1, Debian 12.11.  ", md)
        self.assertIn("Versions: idemproxy abc1234 (rustc 1.95.0), nginx/1.22.1, HAProxy 2.6, valgrind-3.19.0.  ", md)
        self.assertIn("| target | GET, small body: instructions / request (×nginx) | POST 1 KiB JSON: instructions / request (×nginx) |", md)
        self.assertIn("| idemproxy | 54,288 (2.11×) | 61,000 (1.63×) |", md)
        self.assertIn("| nginx | 25,707 (1.00×) | 37,401 (1.00×) |", md)
        self.assertIn("| haproxy | 73,269 (2.85×) |  |", md)
        self.assertEqual(md[-1], "Reproduce: `TARGETS=\"idemproxy nginx\" OUT=benches/results benches/instructions.sh target/release/idemproxy both 4000` (see benches/README.md).")

    def test_one_scenario_without_nginx_and_extra_env(self):
        md = ins.markdown(self.results(counts(idemproxy={"post": 61_000}), extra_env={"IDEMPROXY_MAX_ATTEMPTS": "1"}))
        self.assertIn("| idemproxy | 61,000 |\n", md)
        self.assertNotIn("GET, small body", md)
        self.assertIn("idemproxy targets also had IDEMPROXY_MAX_ATTEMPTS=1.", md)

    def test_command_line_reproduces_the_settings(self):
        s = ins.parse_args(["/tmp/idemproxy", "both", "4000"], {"TARGETS": "idemproxy nginx", "EXTRA_ENV": "IDEMPROXY_MAX_ATTEMPTS=1"})
        self.assertEqual(
            ins.command_line(s),
            "TARGETS=\"idemproxy nginx\" EXTRA_ENV=IDEMPROXY_MAX_ATTEMPTS=1 OUT=benches/results "
            "benches/instructions.sh target/release/idemproxy both 4000",
        )
        self.assertEqual(ins.command_line(ins.parse_args([], {})),
                         "OUT=benches/results benches/instructions.sh target/release/idemproxy get 4000")

    def test_requests_are_the_load_benchmarks(self):
        get, post = lb.raw_request("get"), lb.raw_request("post")
        self.assertTrue(get.startswith(b"GET /v1/sessions/bench-1/state HTTP/1.1\r\nHost: 127.0.0.1\r\n"))
        self.assertTrue(get.endswith(b"\r\n\r\n"))
        for k, v in lb.COMMON_HEADERS.items():
            self.assertIn(f"\r\n{k}: {v}\r\n".encode(), get)
            self.assertIn(f"\r\n{k}: {v}\r\n".encode(), post)
        head, _, body = post.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nContent-Length: 1024", head)
        self.assertEqual(body.decode(), lb.post_body())


class CommittedResultsTest(unittest.TestCase):
    """benches/results/instructions.md is what the code makes of
    instructions.json: the docs link it, so it must not be edited by hand."""

    def test_instructions_md_is_generated_from_its_json(self):
        path = os.path.join(RESULTS, "instructions.json")
        if not os.path.exists(path):
            self.skipTest("no committed instructions.json")
        with open(path) as f:
            results = json.load(f)
        with open(os.path.join(RESULTS, "instructions.md")) as f:
            self.assertEqual(ins.markdown(results), f.read(),
                             "regenerate benches/results/instructions.md from instructions.json with instructions.markdown()")
        for per in results["counts"].values():
            for c in per.values():
                self.assertEqual(c["per_request"], c["instructions"] // c["requests"])


if __name__ == "__main__":
    unittest.main()
