"""``python -m tests.benchmarks [--only SUITE ...] [--skip SUITE ...] [--quick]``: run the benchmarks, print one table.

Benchmarks that need a broker use ``KAFKA_BOOTSTRAP_SERVERS`` or start the local Kafka in a
temporary directory. A full run (no ``--only``/``--skip``, no ``--quick``, every suite passing)
rewrites docs/benchmarks.md and docs/benchmarks.json; any other run writes
docs/benchmarks.partial.json. A suite that raises is not hidden: it gets a FAILED row in the
table (and the JSON), its traceback is printed, the other suites still run, and the exit code is 1.
Each suite's wall time is printed as it ends and kept in the JSON.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.benchmarks.harness import REPO, Context, Result, machine, table, write_reports


def discover() -> list[str]:
    package = Path(__file__).parent
    return sorted(
        name.removeprefix("bench_") for _, name, _ in pkgutil.iter_modules([str(package)]) if name.startswith("bench_")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=None, help=f"suites to run: {', '.join(discover())}")
    parser.add_argument("--skip", nargs="*", default=[], help="suites to leave out")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for a smoke run")
    args = parser.parse_args()
    unknown = sorted((set(args.only or []) | set(args.skip)) - set(discover()))
    if unknown:
        parser.error(f"unknown suites: {', '.join(unknown)} (known: {', '.join(discover())})")
    suites = [suite for suite in args.only or discover() if suite not in args.skip]
    info = machine()
    print(f"machine: {info}", file=sys.stderr, flush=True)
    shared = Path(os.environ.get("QUOTEWATCH_SHARED_DIR") or REPO.parent / "shared")
    results: list[Result] = []
    failures: list[str] = []
    timings: dict[str, float] = {}
    run_started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qwbench-") as scratch:
        ctx = Context(
            bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
            shared_dir=shared / "data" / "coinbase",
            scratch=Path(scratch),
            quick=args.quick,
        )
        try:
            for suite in suites:
                print(f"== {suite}", file=sys.stderr, flush=True)
                started = time.monotonic()
                try:
                    module = importlib.import_module(f"tests.benchmarks.bench_{suite}")
                    results.extend(module.run(ctx))
                except Exception as exc:  # noqa: BLE001 - report every suite, then fail the run
                    failures.append(suite)
                    traceback.print_exc()
                    results.append(failed_row(suite, exc))
                timings[suite] = time.monotonic() - started
                status = "FAILED" if suite in failures else "ok"
                print(f"== {suite}: {status} in {timings[suite]:.0f} s", file=sys.stderr, flush=True)
        finally:
            ctx.close()
    print(table(results))
    info["suite_seconds"] = {suite: round(seconds, 1) for suite, seconds in timings.items()}
    info["total_minutes"] = round((time.monotonic() - run_started) / 60, 1)
    info["failed_suites"] = failures
    partial = bool(args.only) or bool(args.skip) or args.quick or bool(failures)
    write_reports(results, info, partial=partial)
    print(f"total {info['total_minutes']} min; per suite (s): {info['suite_seconds']}", file=sys.stderr)
    if failures:
        print(f"benchmark suites FAILED: {', '.join(failures)} (rows marked FAILED above)", file=sys.stderr)
        return 1
    return 0


def failed_row(suite: str, error: BaseException) -> Result:
    """The table row that says a suite did not produce its numbers, and why."""
    reason = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
    return Result(suite=suite, name="SUITE FAILED", value=float("nan"), unit="-", met=False, notes=reason)


if __name__ == "__main__":
    sys.exit(main())
