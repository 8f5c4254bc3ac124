"""Tests of the fixed-rate latency run's pure parts (tools/latency.py): oha's
command line and JSON report, the summary with the latency added over
direct, the target checks and the Markdown report. Nothing here starts oha
or a proxy.

    python3 -m unittest discover -s tools -p 'test_*.py'
"""

import json
import os
import unittest
from unittest import mock

import latency as la
import loadbench as lb

RESULTS = os.path.join(lb.ROOT, "benches", "results")
HERE = os.path.dirname(os.path.abspath(__file__))

# Captured from oha 1.16.0 by a 2 s run of tools/latency.py against idemproxy:
#   oha http://127.0.0.1:PORT/v1/sessions/bench-1/state -q 1000 --latency-correction \
#       -c 50 -z 2s -w --no-tui --output-format json -H ... (the common headers)
with open(os.path.join(HERE, "testdata", "oha-1.16.0-get.json")) as f:
    OHA_GET = f.read()


def run(p50=0.5, p99=1.0, p999=2.0, rps=1000.0, failed=0, cpu=None, rnd=1):
    return {"rps": rps, "success_rate": 1.0, "total_s": 10.0, "requests": int(rps * 10), "statuses": {"200": int(rps * 10)},
            "errors": {}, "mean_ms": p50, "max_ms": p999 * 2, "p50_ms": p50, "p99_ms": p99, "p999_ms": p999,
            "failed": failed, "proxy_cpu_pct": cpu, "round": rnd}


class OhaTest(unittest.TestCase):
    def test_command_line_is_open_loop_at_a_fixed_rate(self):
        with mock.patch.object(lb, "LOAD_CORE", "0"):
            argv = la.oha_argv("/bin/oha", 4242, "get", 5000, 50, 10)
        self.assertEqual(argv[:4], ["taskset", "-c", "0", "/bin/oha"])
        self.assertEqual(
            argv[4:16],
            ["http://127.0.0.1:4242/v1/sessions/bench-1/state", "-q", "5000", "--latency-correction",
             "-c", "50", "-z", "10s", "-w", "--no-tui", "--output-format", "json"],
        )
        headers = [argv[i + 1] for i, a in enumerate(argv) if a == "-H"]
        self.assertEqual(headers, [f"{k}: {v}" for k, v in lb.COMMON_HEADERS.items()])
        self.assertNotIn("-m", argv)

    def test_post_sends_the_1_kib_document(self):
        with mock.patch.object(lb, "LOAD_CORE", None):
            argv = la.oha_argv("oha", 4242, "post", 1000, 50, 10, "/w/post.json")
        self.assertEqual(argv[0], "oha")
        self.assertEqual(argv[1], "http://127.0.0.1:4242/v1/sessions/bench-1/entries")
        self.assertEqual(argv[-6:], ["-m", "POST", "-T", "application/json", "-D", "/w/post.json"])

    def test_parses_a_captured_report(self):
        r = la.parse_oha(OHA_GET)
        j = json.loads(OHA_GET)
        self.assertAlmostEqual(r["p50_ms"], j["latencyPercentiles"]["p50"] * 1000)
        self.assertAlmostEqual(r["p99_ms"], j["latencyPercentiles"]["p99"] * 1000)
        self.assertAlmostEqual(r["p999_ms"], j["latencyPercentiles"]["p99.9"] * 1000)
        self.assertEqual(r["rps"], j["summary"]["requestsPerSec"])
        self.assertEqual(r["statuses"], {"200": r["requests"]})
        self.assertEqual((r["failed"], r["errors"]), (0, {}))
        self.assertLess(r["p50_ms"], r["p99_ms"])
        self.assertLessEqual(r["p99_ms"], r["p999_ms"])
        self.assertLessEqual(r["p999_ms"], r["max_ms"])

    def test_errors_and_other_statuses_are_failures(self):
        j = json.loads(OHA_GET)
        j["statusCodeDistribution"] = {"200": 90, "503": 7}
        j["errorDistribution"] = {"connection closed before message completed": 3}
        r = la.parse_oha(json.dumps(j))
        self.assertEqual((r["requests"], r["failed"]), (100, 10))

    def test_no_json_is_an_error_that_shows_the_output(self):
        with self.assertRaises(RuntimeError) as e:
            la.parse_oha("error: unexpected argument '--output-format'")
        self.assertIn("unexpected argument", str(e.exception))


class SummaryTest(unittest.TestCase):
    def runs(self):
        return {"get": {
            "1000": {
                "direct": [run(0.20, 0.40, 0.80), run(0.22, 0.50, 0.90), run(0.21, 0.45, 1.00)],
                "idemproxy": [run(0.30, 0.60, 1.20, cpu=10.0), run(0.31, 0.70, 1.40, cpu=12.0, failed=1), run(0.32, 0.65, 1.30, cpu=11.0)],
                "nginx": [run(0.28, 0.55, 1.10, cpu=8.0)],
            },
            "5000": {
                "direct": [run(0.25, 0.60, 1.50, rps=5000.0)],
                "idemproxy": [run(0.40, 1.00, 3.00, rps=4990.0)],
                "nginx": [run(0.35, 0.90, 2.00, rps=5000.0)],
                "haproxy": [],
            },
        }}

    def test_medians_and_added_latency_over_direct(self):
        s = la.summarize(self.runs())["get"]
        i = s["1000"]["idemproxy"]
        self.assertEqual((i["p50_ms"], i["p99_ms"], i["p999_ms"]), (0.31, 0.65, 1.30))
        self.assertEqual((i["proxy_cpu_pct"], i["failed"], i["rounds"]), (11.0, 1, 3))
        self.assertAlmostEqual(i["added_p50_us"], 100.0)  # 0.31 - 0.21 ms
        self.assertAlmostEqual(i["added_p99_us"], 200.0)  # 0.65 - 0.45 ms
        self.assertAlmostEqual(i["added_p999_us"], 400.0)  # 1.30 - 0.90 ms
        d = s["1000"]["direct"]
        self.assertEqual((d["added_p99_us"], d["proxy_cpu_pct"]), (0.0, None))
        self.assertNotIn("haproxy", s["5000"])  # no runs, no row
        self.assertAlmostEqual(s["5000"]["idemproxy"]["added_p99_us"], 400.0)

    def test_without_direct_nothing_is_added(self):
        runs = self.runs()
        del runs["get"]["1000"]["direct"]
        s = la.summarize(runs)["get"]["1000"]
        self.assertIsNone(s["idemproxy"]["added_p99_us"])
        self.assertEqual(la.checks({"get": s}, [1000]), [])

    def test_check_wants_idemproxy_at_most_nginx_at_every_rate(self):
        s = la.summarize(self.runs())
        (c,) = la.checks(s, [1000, 5000])
        self.assertEqual(c["target"], "GET: idemproxy's added p99 ≤ nginx's at 1,000 and 5,000 req/s")
        self.assertEqual(c["measured"], "1,000: +200 µs vs +100 µs; 5,000: +400 µs vs +300 µs")
        self.assertFalse(c["met"])
        runs = self.runs()
        runs["get"]["1000"]["nginx"] = [run(0.28, 0.65, 1.10)]
        runs["get"]["5000"]["nginx"] = [run(0.35, 1.00, 2.00)]
        (c,) = la.checks(la.summarize(runs), [1000, 5000])
        self.assertTrue(c["met"])  # equal is enough

    def results(self, quiet=True):
        return {
            "date": "2026-01-02 03:04 UTC",
            "machine": {"cpu": "Test CPU", "cores": 2, "mem_mib": 4096, "kernel": "6.1", "debian": "12.11"},
            "quiet": {"load1_at_start": 0.1 if quiet else 2.5, "quiet": quiet},
            "versions": {"idemproxy": "abc1234", "rustc": "rustc 1.95.0", "nginx": "nginx/1.22.1", "haproxy": "HAProxy 2.6", "oha": "oha 1.16.0"},
            "settings": {"rates": [1000, 5000], "conns": 50, "duration_s": 10, "rounds": 3, "workers": 1,
                         "pinning": {"proxy_under_test": "core 1", "oha_upstream": "core 0"}},
            "runs": self.runs(),
        }

    def test_markdown_tables(self):
        results = self.results(quiet=False)
        results["summary"] = la.summarize(results["runs"])
        results["checks"] = la.checks(results["summary"], [1000, 5000])
        md = la.markdown(results).splitlines()
        self.assertEqual(md[0], "# idemproxy latency at fixed rates — 2026-01-02 03:04 UTC")
        self.assertIn("Versions: idemproxy abc1234 (rustc 1.95.0), nginx/1.22.1, HAProxy 2.6, oha 1.16.0.  ", md)
        self.assertIn("Pinning: proxy under test on core 1; oha and the upstream nginx on core 0.  ", md)
        self.assertTrue(any(line.startswith("Load: oha, open loop at a fixed rate") and "50 connections, 10 s per run, 3 rounds"
                            in line and line.endswith("1 worker per proxy.  ") for line in md))
        self.assertIn("1-min load average at start: 2.5 — **the machine was NOT quiet: other jobs were running, figures are noisy**.", md)
        self.assertIn("## GET, small body", md)
        self.assertNotIn("## POST 1 KiB JSON (key attached, replay copy kept)", md)
        self.assertIn("| direct | 1,000 | 1,000 | 0.21 | 0.45 | 0.90 | +0 | +0 | +0 |  | 0 |", md)
        self.assertIn("| idemproxy | 1,000 | 1,000 | 0.31 | 0.65 | 1.30 | +100 | +200 | +400 | 11 | 1 |", md)
        self.assertIn("| idemproxy | 5,000 | 4,990 | 0.40 | 1.00 | 3.00 | +150 | +400 | +1,500 |  | 0 |", md)
        self.assertIn("| GET: idemproxy's added p99 ≤ nginx's at 1,000 and 5,000 req/s | ≤ nginx "
                      "| 1,000: +200 µs vs +100 µs; 5,000: +400 µs vs +300 µs | **no** |", md)
        self.assertEqual(md[-1], "Reproduce: `tools/latency.sh` (see benches/README.md).")

    def test_write_results_writes_both_files(self):
        import tempfile
        with tempfile.TemporaryDirectory() as out, mock.patch.object(la, "OUT", out), \
                mock.patch("sys.stdout"), mock.patch.object(la, "log"):
            results = self.results()
            la.write_results(results)
            with open(os.path.join(out, "latency.json")) as f:
                self.assertEqual(json.load(f), json.loads(json.dumps(results)))
            with open(os.path.join(out, "latency.md")) as f:
                self.assertEqual(f.read(), la.markdown(results))


class CommittedResultsTest(unittest.TestCase):
    """benches/results/latency.md is what the code makes of latency.json: the
    docs link it, so it must not be edited by hand."""

    def test_latency_md_is_generated_from_its_json(self):
        path = os.path.join(RESULTS, "latency.json")
        if not os.path.exists(path):
            self.skipTest("no committed latency.json")
        with open(path) as f:
            results = json.load(f)
        stored = json.loads(json.dumps(results))
        self.assertEqual(la.summarize(results["runs"]), stored["summary"])
        self.assertEqual(la.checks(stored["summary"], stored["settings"]["rates"]), stored["checks"])
        with open(os.path.join(RESULTS, "latency.md")) as f:
            self.assertEqual(la.markdown(stored), f.read(),
                             "regenerate benches/results/latency.md from latency.json with latency.markdown()")


if __name__ == "__main__":
    unittest.main()
