"""Differential runs of `sentinel check rules` / `sentinel test rules` against promtool.

The public rule suites under tests/data/rule-suites/ (each with a SOURCE and a LICENSE)
hold rule files and `promtool test rules` files written by other teams. Each file is
given to both tools alone, from the same working directory and with the same argument,
so the reports name it alike. Sentinel runs in this process (a subprocess per file
would cost a Python start-up each, minutes over the whole corpus); the test file adds a
few real subprocess runs of the `sentinel` command itself.

    python -m tests.rule_suites [--suite NAME] [--verbose]

prints the agreement counts and every disagreement.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

SUITES = Path(__file__).with_name("data") / "rule-suites"


@dataclass(frozen=True)
class Run:
    """What one tool did with one file: exit status and both streams."""

    rc: int
    stdout: str
    stderr: str

    def verdict(self) -> str:
        """check rules: `SUCCESS: N rules found` or `FAILED`; test rules: SUCCESS or FAILED."""
        for line in self.stdout.splitlines():
            if line.strip().startswith("SUCCESS"):
                return line.strip()
        return "FAILED"


@dataclass(frozen=True)
class Comparison:
    command: str  # "check" | "test"
    file: Path
    promtool: Run
    sentinel: Run

    @property
    def same_verdict(self) -> bool:
        return self.promtool.rc == self.sentinel.rc and self.promtool.verdict() == self.sentinel.verdict()

    @property
    def identical(self) -> bool:
        return self.promtool == self.sentinel

    def describe(self) -> str:
        return (
            f"== {self.command} {self.file}\n"
            f"-- promtool rc={self.promtool.rc}\n{self.promtool.stdout}{self.promtool.stderr}"
            f"-- sentinel rc={self.sentinel.rc}\n{self.sentinel.stdout}{self.sentinel.stderr}"
        )


def discover(root: Path = SUITES) -> tuple[list[Path], list[Path]]:
    """(rule files, test files) under root; a test file has `tests` or `rule_files` at its top."""
    rule_files: list[Path] = []
    test_files: list[Path] = []
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".yml", ".yaml") or not path.is_file():
            continue
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
        except (yaml.YAMLError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict) and ("tests" in data or "rule_files" in data):
            test_files.append(path)
        else:
            rule_files.append(path)
    return rule_files, test_files


def promtool_path() -> str | None:
    return shutil.which("promtool")


def run_promtool(promtool: str, argv: Sequence[str], cwd: Path, timeout: float = 600) -> Run:
    proc = subprocess.run([promtool, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    return Run(proc.returncode, proc.stdout, proc.stderr)


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_sentinel(argv: Sequence[str], cwd: Path) -> Run:
    """`sentinel ARGV` in this process; a traceback becomes rc 99 with the traceback on stderr."""
    from sentinel.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _cwd(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # a crash is the finding, not the end of the run
            err.write(traceback.format_exc())
            rc = 99
    return Run(rc, out.getvalue(), err.getvalue())


def compare(command: str, file: Path, promtool: str, extra: Sequence[str] = ()) -> Comparison:
    """Run `check rules` or `test rules` on one file under both tools, from its suite's root."""
    suite_root = _suite_root(file)
    rel = str(file.relative_to(suite_root))
    p_args = [command, "rules", rel]
    s_args = [command, "rules", *extra, rel]
    return Comparison(command, file, run_promtool(promtool, p_args, suite_root), run_sentinel(s_args, suite_root))


def _suite_root(file: Path) -> Path:
    parts = file.resolve().relative_to(SUITES.resolve()).parts
    return SUITES / parts[0]


def sentinel_args(command: str) -> list[str]:
    """The Prometheus 2 mode for both commands (the suites are compared with promtool 2.42)."""
    return ["--prometheus-compat", "2"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", help="only this suite (a folder name under tests/data/rule-suites)")
    parser.add_argument("--only", choices=["check", "test"], help="only one command")
    parser.add_argument("--no-compat", action="store_true", help="run sentinel without --prometheus-compat 2")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every disagreement in full")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="files compared at once (processes)")
    args = parser.parse_args(argv)
    promtool = promtool_path()
    if promtool is None:
        print("promtool not found: apt-get install prometheus", file=sys.stderr)
        return 2
    root = SUITES / args.suite if args.suite else SUITES
    rule_files, test_files = discover(root)
    extra = [] if args.no_compat else ["--prometheus-compat", "2"]
    results: list[Comparison] = []
    jobs = [("check", f) for f in rule_files] + [("test", f) for f in test_files]
    jobs = [(command, file) for command, file in jobs if not args.only or command == args.only]
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(compare, command, file, promtool, extra) for command, file in jobs]
        for future in futures:
            result = future.result()
            results.append(result)
            mark = "=" if result.identical else ("~" if result.same_verdict else "X")
            print(f"{mark} {result.command} {result.file.relative_to(SUITES)}", flush=True)
            if not result.identical and args.verbose:
                print(result.describe(), flush=True)
    for command in ("check", "test"):
        mine = [r for r in results if r.command == command]
        same = sum(r.same_verdict for r in mine)
        identical = sum(r.identical for r in mine)
        print(f"{command} rules: {len(mine)} files, same verdict and exit code {same}, byte-identical {identical}")
        for r in mine:
            if not r.same_verdict:
                print(f"  verdict differs: {r.file} (promtool rc={r.promtool.rc}, sentinel rc={r.sentinel.rc})")
    total = len(results)
    agree = sum(r.same_verdict and (r.command == "check" or r.identical) for r in results)
    print(f"agreement: {agree} of {total}")
    return 0 if agree == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
