"""End-to-end latency: last slice acknowledged → SEG + SR acknowledged by the PACS.

Runs the same path as ``radnode demo`` (node and Celery worker as separate
processes, SQLite, embedded broker, a PACS on loopback) several times and
prints each hop's seconds and the median.

    .venv/bin/python benchmarks/end_to_end.py [--runs 3] [--quiet-period 2] [--input DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from service.demo import run_demo
from service.logging import configure

KEYS = ["receive", "complete", "queue", "analyse", "deliver", "end_to_end",
        "load_s", "inference_s", "encode_s", "write_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quiet-period", type=float, default=2.0)
    parser.add_argument("--input", type=Path, default=None)
    args = parser.parse_args()
    configure("WARNING")
    reports: list[dict[str, float]] = []
    for run in range(args.runs):
        report: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            status = run_demo(input_dir=args.input, data_dir=Path(tmp) / "bench",
                              quiet_period_s=args.quiet_period, timeout_s=600, report=report)
        if status != 0:
            raise SystemExit(f"run {run + 1} failed")
        reports.append(report)
    print(f"\nend-to-end benchmark, {args.runs} runs, quiet period {args.quiet_period:g} s, "
          f"{int(reports[0].get('instances', 0))} instances")
    print(f"{'hop':<28}" + "".join(f"{'run ' + str(i + 1):>9}" for i in range(args.runs))
          + f"{'median':>9}")
    for key in KEYS:
        values = [r[key] for r in reports if key in r]
        if len(values) == len(reports):
            print(f"{key:<28}" + "".join(f"{v:9.2f}" for v in values)
                  + f"{statistics.median(values):9.2f}")
    minus = [r["end_to_end"] - r["complete"] for r in reports]
    print(f"{'end_to_end - complete':<28}" + "".join(f"{v:9.2f}" for v in minus)
          + f"{statistics.median(minus):9.2f}")


if __name__ == "__main__":
    main()
