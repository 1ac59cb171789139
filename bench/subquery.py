"""Subquery benchmark: `sentinel test rules` against `promtool test rules` 2.42, same suite.

The case of issue 14 (item 6): a rule with a `[12h:]` subquery, evaluated every minute
over 25 hours of 1-minute data (1,500 evaluations of 720 subquery steps each). Both
tools run the same generated rule file and test file as subprocesses, in the same run;
the figures are wall time and peak RSS of each, and their ratios (Sentinel / promtool;
lower is better, <= 1 is the target).

The test file's expectations are written so both tools pass (an alert that fires and
one that does not), so the work measured is the evaluation itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RULES = """\
groups:
  - name: slo
    interval: 1m
    rules:
      - record: job:requests:rate5m
        expr: sum by (job) (rate(http_requests_total[5m]))
      - alert: TrafficAboveHalfDayPeak
        expr: job:requests:rate5m > 1.5 * max_over_time(job:requests:rate5m[12h:])
      - alert: ErrorsOverHalfDay
        expr: max_over_time(sum by (job) (rate(http_errors_total[5m]))[12h:]) > 1000
"""


def test_file(hours: int, series: int) -> str:
    minutes = hours * 60
    lines = [
        "rule_files: [rules.yml]",
        "evaluation_interval: 1m",
        "tests:",
        "  - interval: 1m",
        "    input_series:",
    ]
    for i in range(series):
        job = f"job{i % 3}"
        lines.append(f'      - series: \'http_requests_total{{job="{job}", instance="i{i}"}}\'')
        lines.append(f"        values: '0+{10 + i}x{minutes}'")
        lines.append(f'      - series: \'http_errors_total{{job="{job}", instance="i{i}"}}\'')
        lines.append(f"        values: '0+{1 + i % 2}x{minutes}'")
    lines += [
        "    alert_rule_test:",
        f"      - eval_time: {hours}h",
        "        alertname: ErrorsOverHalfDay",
        "        exp_alerts: []",
        f"      - eval_time: {hours}h",
        "        alertname: TrafficAboveHalfDayPeak",
        "        exp_alerts: []",
    ]
    return "\n".join(lines) + "\n"


def run(argv: list[str], cwd: Path) -> tuple[float, int, str]:
    """Wall seconds, peak RSS bytes and output of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    output = proc.stdout.read() if proc.stdout else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}):\n{output}")
    return elapsed, usage.ru_maxrss * 1024, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=int, default=25)
    parser.add_argument("--series", type=int, default=6)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    promtool = shutil.which("promtool")
    if promtool is None:
        raise SystemExit("promtool not found: apt-get install prometheus")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "rules.yml").write_text(RULES)
        (work / "test.yml").write_text(test_file(args.hours, args.series))
        p_wall, p_rss, _ = run([promtool, "test", "rules", "test.yml"], work)
        s_wall, s_rss, _ = run([sys.executable, "-m", "sentinel", "test", "rules", "test.yml"], work)
    cpu = f"{platform.machine()} {platform.processor() or ''}".strip()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"case: [12h:] subqueries every 1m over {args.hours}h, {args.series * 2} input series")
    print(f"promtool 2.42   : {p_wall:7.2f} s   peak RSS {p_rss / 2**20:7.1f} MiB")
    print(f"sentinel        : {s_wall:7.2f} s   peak RSS {s_rss / 2**20:7.1f} MiB")
    print(f"ratio (sentinel/promtool): wall {s_wall / p_wall:.2f}x, memory {s_rss / p_rss:.2f}x")
    if args.json:
        print(
            json.dumps(
                {
                    "wall_s": round(s_wall, 3),
                    "peak_rss_bytes": s_rss,
                    "promtool_wall_s": round(p_wall, 3),
                    "promtool_peak_rss_bytes": p_rss,
                    "wall_ratio_vs_promtool": round(s_wall / p_wall, 3),
                    "memory_ratio_vs_promtool": round(s_rss / p_rss, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
