"""``python -m tests.benchmarks [--only SUITE ...] [--quick]``: run the benchmarks, print one table.

Benchmarks that need a broker use ``KAFKA_BOOTSTRAP_SERVERS`` or start the local Kafka in a
temporary directory. A full run (no ``--only``) rewrites docs/benchmarks.md and docs/benchmarks.json.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import tempfile
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
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for a smoke run")
    args = parser.parse_args()
    suites = args.only or discover()
    shared = Path(os.environ.get("QUOTEWATCH_SHARED_DIR") or REPO.parent / "shared")
    results: list[Result] = []
    failures = []
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
                try:
                    module = importlib.import_module(f"tests.benchmarks.bench_{suite}")
                    results.extend(module.run(ctx))
                except Exception:  # noqa: BLE001 - report every suite, then fail the run
                    failures.append(suite)
                    traceback.print_exc()
        finally:
            ctx.close()
    print(table(results))
    write_reports(results, machine(), partial=bool(args.only) or args.quick or bool(failures))
    if failures:
        print(f"benchmark suites failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
