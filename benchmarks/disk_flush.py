"""How long the spool's disk takes to flush a file, held at the pace of an ingest.

Every instance radnode acknowledges costs two flushes before its Success: the
received file's ``fdatasync`` and the database commit's (SQLite's WAL, or
PostgreSQL's). One association waits for each response, so a flush that
stalls stalls the sender. This benchmark shows what the disk alone does,
without radnode: it creates a file, writes ``--size`` bytes, times its
``fdatasync``, sleeps ``--pause-ms`` (the CPU an instance costs between its
flushes), and repeats for ``--seconds``, for each size. It prints the
distribution of flush times and how much of the time went to stalls.

A disk whose flushes are all short makes durability cheap; a virtual disk
that throttles its operations makes the same flushes stall for tens or
hundreds of milliseconds, and durability then costs what the stalls add up
to, whatever the node does.

    .venv/bin/python benchmarks/disk_flush.py      # a temporary folder beside the repository
    .venv/bin/python benchmarks/disk_flush.py --dir /var/lib/radnode/spool
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: A flush slower than this counts as a stall (the median is a fraction of a millisecond).
STALL_S = 0.010


def flush_times(folder: Path, size: int, seconds: float, pause_s: float) -> list[float]:
    """Seconds of each ``fdatasync`` of a new ``size``-byte file, for ``seconds``."""
    data = os.urandom(size)
    times: list[float] = []
    names: list[Path] = []
    end = time.perf_counter() + seconds
    try:
        while time.perf_counter() < end:
            path = folder / f"flush-{len(names)}"
            names.append(path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                start = time.perf_counter()
                os.fdatasync(fd)
                times.append(time.perf_counter() - start)
            finally:
                os.close(fd)
            if pause_s > 0:
                time.sleep(pause_s)
    finally:
        for path in names:
            path.unlink(missing_ok=True)
    return times


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=REPO.parent,
                        help="folder on the disk to measure (a temporary folder is made in it)")
    parser.add_argument("--seconds", type=float, default=6.0, help="per size")
    parser.add_argument("--pause-ms", type=float, default=1.5,
                        help="sleep between flushes: the CPU an instance costs (ms)")
    parser.add_argument("--sizes", default="9000,530000",
                        help="bytes per file, comma-separated (a 64×64 and a 512×512 CT slice)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="radnode-disk-flush-", dir=args.dir))
    try:
        device = os.stat(folder).st_dev
        print(f"fdatasync of a new file in {folder} (device {os.major(device)}:"
              f"{os.minor(device)}), {args.pause_ms} ms between flushes, "
              f"{args.seconds:g} s per run")
        print(f"{'bytes':>8} {'run':>4} {'flushes':>8} {'per s':>6} {'median ms':>10} "
              f"{'p99 ms':>8} {'max ms':>8} {'stalls':>7} {'flush s':>8} {'in stalls':>10}")
        for size in (int(s) for s in args.sizes.split(",")):
            for run in range(1, args.repeats + 1):
                times = flush_times(folder, size, args.seconds, args.pause_ms / 1000)
                stalls = [t for t in times if t > STALL_S]
                total = sum(times)
                median_ms = statistics.median(times) * 1e3
                print(f"{size:>8} {run:>4} {len(times):>8} {len(times) / args.seconds:>6.0f} "
                      f"{median_ms:>10.2f} {quantile(times, 0.99) * 1e3:>8.2f} "
                      f"{max(times) * 1e3:>8.1f} {len(stalls):>7} {total:>8.2f} "
                      f"{sum(stalls) / total:>9.0%}", flush=True)
        print(f"stalls: flushes over {STALL_S * 1e3:g} ms; "
              "in stalls: their share of all flush time")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
