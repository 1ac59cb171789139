"""The `sentinel` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Sequence

from sentinel import __version__
from sentinel.cli import ops as opscli
from sentinel.config.models import ConfigError, load_config, parse_duration

__all__ = ["main"]

log = logging.getLogger("sentinel")


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_compat_argument(parser: argparse.ArgumentParser) -> None:
    """`--prometheus-compat 2|3`: whose semantics the rule tools follow (default 3)."""
    parser.add_argument(
        "--prometheus-compat",
        type=int,
        choices=[2, 3],
        default=3,
        metavar="{2,3}",
        help="follow Prometheus 2 (as promtool 2.42: windows closed on the left, its rule and test file formats) "
        "or Prometheus 3 (default)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sentinel", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sentinel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", help="sentinel.yaml (default: built-in defaults)")
    run.add_argument(
        "--simulate", metavar="SCENARIO", help="use a simulated GPU host: a shipped scenario name or a scenario file"
    )
    run.add_argument("--listen", metavar="HOST:PORT", help="override the config's listen address")
    run.add_argument("--log-format", choices=["text", "json"], help="override the config's log format")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--duration",
        type=_duration_arg,
        metavar="DURATION",
        help="stop by itself after this long (e.g. 30s); for demos and smoke tests",
    )
    run.add_argument(
        "--report",
        type=_duration_arg,
        metavar="INTERVAL",
        help="print a table of the GPUs and collectors to stdout every INTERVAL",
    )

    check = sub.add_parser("check", help="validate files without running")
    check_sub = check.add_subparsers(dest="what", required=True, metavar="WHAT")
    check_config = check_sub.add_parser("config", help="validate sentinel.yaml files")
    check_config.add_argument("files", nargs="+", metavar="FILE")
    check_rules = check_sub.add_parser("rules", help="validate Prometheus rule files (as promtool check rules)")
    check_rules.add_argument("files", nargs="+", metavar="FILE")
    add_compat_argument(check_rules)
    check_rules.add_argument(
        "--lint",
        default="duplicate-rules",
        metavar="CHECKS",
        help="linting checks to apply: all, duplicate-rules, none (comma-separated; default duplicate-rules)",
    )
    check_rules.add_argument("--lint-fatal", action="store_true", help="make lint errors exit with exit code 3")

    test = sub.add_parser("test", help="run unit tests")
    test_sub = test.add_subparsers(dest="what", required=True, metavar="WHAT")
    test_rules = test_sub.add_parser("rules", help="run rule unit tests in promtool's format")
    test_rules.add_argument("files", nargs="+", metavar="FILE")
    add_compat_argument(test_rules)

    promql = sub.add_parser("promql", help="PromQL tools")
    promql_sub = promql.add_subparsers(dest="what", required=True, metavar="WHAT")
    promql_test = promql_sub.add_parser("test", help="run files in Prometheus's promqltest format")
    promql_test.add_argument("files", nargs="+", metavar="FILE")
    add_compat_argument(promql_test)
    promql_test.add_argument("-q", "--quiet", action="store_true", help="do not list skipped evals")

    logs = sub.add_parser("logs", help="log tools")
    logs_sub = logs.add_subparsers(dest="what", required=True, metavar="WHAT")
    # Handled by sentinel.logs.scan's own parser (see main); listed here for --help.
    logs_sub.add_parser("scan", help="run the log pattern catalogue over files (--json, --summary)")

    # Handled by sentinel.demo, sentinel.fleet.cli and sentinel.cli.ops (see main); listed here for --help.
    sub.add_parser(
        "demo",
        help="the whole detect-and-heal loop on a simulated host with a real tiny MoE worker "
        "(--fleet: several hosts coordinated on a real etcd)",
    )
    sub.add_parser("fleet", help="the fleet on etcd: fleet status [--json], fleet resume ALERT, fleet forget HOST")
    sub.add_parser("status", help="GPUs, workers, firing alerts and recent actions of the running daemon")
    sub.add_parser("history", help="the action journal of the running daemon")
    sub.add_parser("pause", help="stop acting on a worker (or all): pause [WORKER]")
    sub.add_parser("resume", help="act again on a worker (or all), clearing needs_human: resume [WORKER]")

    sub.add_parser("version", help="print the version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["logs", "scan"]:
        from sentinel.logs.scan import main as scan_main

        return int(scan_main(argv[2:]))
    if argv[:1] == ["demo"] and "--fleet" in argv[1:]:
        from sentinel.demo.fleet import main as fleet_demo_main

        return fleet_demo_main([a for a in argv[1:] if a != "--fleet"])
    if argv[:1] == ["demo"]:
        from sentinel.demo.local import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["fleet"]:
        from sentinel.fleet.cli import main as fleet_main

        return fleet_main(argv[1:])
    if argv and argv[0] in opscli.COMMANDS:
        return int(opscli.main(argv))
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"sentinel {__version__}")
        return 0
    if args.command == "check":
        if args.what == "config":
            return check_config(args.files)
        from sentinel.promtool.rulecheck import check_rules

        return check_rules(args.files, args.prometheus_compat, args.lint, args.lint_fatal)
    if args.command == "test":
        from sentinel.promtool.ruletest import run_files

        return 0 if run_files(args.files, sys.stdout, sys.stderr, prometheus_compat=args.prometheus_compat) else 1
    if args.command == "promql":
        from sentinel.promtool.promqltest import main as promql_test_main

        compat = ["--prometheus-compat", str(args.prometheus_compat)]
        return int(promql_test_main([*args.files, *compat, *(["--quiet"] if args.quiet else [])]))
    if args.command == "run":
        return run(args)
    raise AssertionError(args.command)


def check_config(files: Sequence[str]) -> int:
    """Exit 0 when every file is valid; otherwise print every problem and exit 1."""
    failed = False
    for file in files:
        try:
            load_config(file)
        except ConfigError as exc:
            failed = True
            print(f"FAILED: {file}: {len(exc.problems)} problem(s)", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
        else:
            print(f"SUCCESS: {file} is valid")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    from sentinel.daemon.core import Daemon
    from sentinel.daemon.logsetup import setup_logging

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"sentinel: invalid configuration:\n{exc}", file=sys.stderr)
        return 1
    setup_logging(args.log_format or config.log.format, args.log_level or config.log.level)
    try:
        daemon = Daemon(config, config_path=args.config, simulate=args.simulate, listen=args.listen)
    except (OSError, ValueError) as exc:
        print(f"sentinel: {exc}", file=sys.stderr)
        return 1

    async def main_task() -> int:
        if args.duration:
            asyncio.get_running_loop().call_later(args.duration, daemon.request_stop)
        reports: asyncio.Task[None] | None = None
        if args.report:
            from sentinel.daemon.report import print_reports

            reports = asyncio.get_running_loop().create_task(print_reports(daemon, args.report))
        try:
            return await daemon.run()
        finally:
            if reports is not None:
                reports.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reports

    rc = _run_loop(main_task())
    _exit_past_hung_threads(rc)
    return rc


def _run_loop(coro: object) -> int:
    """Like asyncio.run, but a thread stuck in a driver call or a query cannot hold up the exit.

    No `loop.shutdown_default_executor()`: on Python 3.11 it joins the executor's threads
    in a `finally` even after a timeout cancelled it, so one query stuck in the default
    executor kept a SIGTERM'd Sentinel alive for good (issue 15, build item 7).
    `loop.close()` shuts the executor down without waiting, and `_exit_past_hung_threads`
    leaves past whatever is still stuck.
    """
    loop = asyncio.new_event_loop()
    try:
        rc: int = loop.run_until_complete(coro)  # type: ignore[arg-type]
        loop.run_until_complete(loop.shutdown_asyncgens())
        return rc
    finally:
        loop.close()


def _exit_past_hung_threads(rc: int) -> None:
    # A hung NVML call leaves a non-daemon executor thread that interpreter exit would
    # join forever; systemd would then SIGKILL us. Leave at once instead.
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if stuck:
        log.warning("exiting past %d thread(s) still blocked: %s", len(stuck), ", ".join(t.name for t in stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
