"""`sentinel test rules` against `promtool test rules` on a real suite: wall time and peak memory.

The suite is a folder of tests/data/rule-suites/ (default: the one with the most test
files, Wikimedia's alerts); both tools get all its test files in one invocation, from
the suite's folder, as its owners run them. `--case subquery` runs only the test file
that dominated Sentinel's time in issue 14 (a `[12h:]` subquery evaluated every minute
over 25 hours); `--case long-series` the one that set its peak memory (series of 268
million samples, evaluated for 50 minutes). Each tool runs under a small launcher
process, so the peak RSS is the tool's own (getrusage of the launcher's children). The baseline is promtool, measured
in the same run; the target is a ratio of at most 1 for both time and memory.

    python bench/ruletest_vs_promtool.py [--suite NAME | --case subquery|long-series] [--repeat N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "tests" / "data" / "rule-suites"
SUBQUERY_CASE = ("wikimedia-operations-alerts", "team-wmcs/openstack_apis_response_test.yaml")
# Input series of `0x10000000` (268 million samples each) evaluated for 50 minutes: the
# test that set the whole suite's peak memory (3.0 GB) before series were expanded only
# as far as a test group evaluates.
LONG_SERIES_CASE = ("wikimedia-operations-alerts", "team-data-persistence/mysql-replication-threads_test.yaml")
CASES = {"subquery": SUBQUERY_CASE, "long-series": LONG_SERIES_CASE}

# Runs argv, discards its output, prints "seconds peak_rss_kib exit_code".
_LAUNCHER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode\n"
    "dt = time.perf_counter() - t\n"
    "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)\n"
)


@dataclass(frozen=True)
class Measure:
    seconds: float
    peak_mib: float
    exit_code: int


def measure(argv: list[str], cwd: Path) -> Measure:
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *argv], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.split()
    return Measure(float(out[0]), int(out[1]) / 1024, int(out[2]))


def test_files(suite: Path) -> list[str]:
    """The suite's promtool test files (a top-level `tests` or `rule_files` key), relative to it."""
    sys.path.insert(0, str(ROOT))
    from tests.rule_suites import discover

    return [str(p.relative_to(suite)) for p in discover(suite)[1]]


def largest_suite() -> Path:
    return max((p for p in SUITES.iterdir() if p.is_dir()), key=lambda p: len(test_files(p)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", help="a folder name under tests/data/rule-suites (default: the largest)")
    parser.add_argument("--case", choices=sorted(CASES), help="one test file instead of a whole suite")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each tool; the median is reported")
    parser.add_argument("--prometheus-compat", type=int, choices=[2, 3], default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    promtool = shutil.which("promtool")
    if promtool is None:
        print("promtool not found: apt-get install prometheus", file=sys.stderr)
        return 2
    if args.case is not None:
        suite, files = SUITES / CASES[args.case][0], [CASES[args.case][1]]
    else:
        suite = SUITES / args.suite if args.suite else largest_suite()
        files = test_files(suite)
    ours_argv = [sys.executable, "-m", "sentinel", "test", "rules", "--prometheus-compat", str(args.prometheus_compat)]
    runs: dict[str, list[Measure]] = {"promtool": [], "sentinel": []}
    for _ in range(args.repeat):
        runs["promtool"].append(measure([promtool, "test", "rules", *files], suite))
        runs["sentinel"].append(measure([*ours_argv, *files], suite))
    result = {
        tool: {
            "seconds": statistics.median(m.seconds for m in ms),
            "peak_mib": statistics.median(m.peak_mib for m in ms),
            "exit_code": ms[-1].exit_code,
        }
        for tool, ms in runs.items()
    }
    summary = {
        "suite": suite.name,
        "test_files": len(files),
        "case": args.case or "suite",
        "prometheus_compat": args.prometheus_compat,
        "repeat": args.repeat,
        "promtool": result["promtool"],
        "sentinel": result["sentinel"],
        "time_ratio": result["sentinel"]["seconds"] / result["promtool"]["seconds"],
        "memory_ratio": result["sentinel"]["peak_mib"] / result["promtool"]["peak_mib"],
        "same_exit_code": result["sentinel"]["exit_code"] == result["promtool"]["exit_code"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    print(f"{suite.name}: {len(files)} test file(s) ({summary['case']}), median of {args.repeat}")
    for tool in ("promtool", "sentinel"):
        r = result[tool]
        print(f"  {tool:9s} {r['seconds']:8.2f} s  {r['peak_mib']:8.1f} MiB peak  exit {r['exit_code']}")
    print(f"  ratio     {summary['time_ratio']:8.2f} x  {summary['memory_ratio']:8.2f} x   (target <= 1)")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
