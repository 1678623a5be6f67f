"""The run report on large synthetic runs: wall time and peak memory.

Each size runs in a child process (so each peak RSS is its own): it writes a synthetic
run (``ensemble_async.testing.synthetic``: records plus a quarter as many rejects), then
times ``build_report`` + ``write_report``.  Baseline: reading the same records file into
a list of dicts (``json.loads`` per line, what a non-streaming tool would do first), at
the sizes where that fits in memory.  Target: seconds for 100k records; peak RSS at 1M
within a few tens of MB of 100k (memory bounded, not growing with the file).

    python bench/report.py [--sizes 100000,1000000] [--baseline-max 100000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, folder: Path, n: int) -> None:
    """Runs in a child process; prints one JSON line."""
    if mode == "write":
        from ensemble_async.testing.synthetic import write_synthetic_run

        started = time.perf_counter()
        path = write_synthetic_run(folder, n, seed=1)
        print(json.dumps({"wall_s": time.perf_counter() - started, "bytes": path.stat().st_size}))
        return
    base = peak_mb()
    started = time.perf_counter()
    if mode == "report":
        from ensemble_async.report import build_report, find_run_files, write_report

        report = build_report(find_run_files(folder))
        write_report(report, folder)
        kept = report["funnel"][-1]["count"]
    else:  # baseline
        with (folder / "records.jsonl").open("rb") as f:
            rows = [json.loads(line) for line in f]
        kept = len(rows)
    wall = time.perf_counter() - started
    print(json.dumps({"wall_s": wall, "peak_mb": peak_mb(), "start_mb": base, "records": kept}))


def run_child(mode: str, folder: Path, n: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(folder), str(n)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--baseline-max", type=int, default=100_000)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, folder, n = args.child
        child(mode, Path(folder), int(n))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        "| records | file MB | report s | records/s | peak RSS MB | baseline s | baseline peak MB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
            folder = Path(tmp)
            written = run_child("write", folder, n)
            rep = run_child("report", folder, n)
            assert rep["records"] == n
            base = run_child("baseline", folder, n) if n <= args.baseline_max else None
            print(
                f"| {n:,} | {written['bytes'] / 2**20:,.0f} | {rep['wall_s']:.1f} | "
                f"{n / rep['wall_s']:,.0f} | {rep['peak_mb']:.0f} | "
                + (
                    f"{base['wall_s']:.1f} ({rep['wall_s'] / base['wall_s']:.1f}x) | "
                    f"{base['peak_mb']:.0f} ({rep['peak_mb'] / base['peak_mb']:.2f}x) |"
                    if base
                    else "- | - |"
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
