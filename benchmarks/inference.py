"""Volume load + inference + encoding on real series, with the peak memory of each stage.

For the 134-slice CT (and the sagittal MR head) in ../shared/data it prints the
seconds to decode the series with pydicom in a plain loop and with radnode's
loader, to run each built-in model, to encode the SEG and the TID 1500 SR, and
the peak resident memory (RSS, sampled every 5 ms) of each stage.

    .venv/bin/python benchmarks/inference.py [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from workers.inference.base import SegmentationModel, Volume
from workers.inference.volume import load_volumes
from workers.models.builtin_ct import BuiltinCTModel
from workers.models.builtin_mr import BuiltinMRModel
from workers.results.measure import measure_segments
from workers.results.seg import build_seg
from workers.results.sr import build_sr

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20


class PeakRSS:
    """Sample this process's RSS every 5 ms while the block runs."""

    def __enter__(self) -> PeakRSS:
        self.start = _rss_mib()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Median seconds over ``repeats`` runs, the peak RSS increase (MiB), the last result."""
    seconds: list[float] = []
    peak = 0.0
    result: Any = None
    for _ in range(repeats):
        result = None
        gc.collect()
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            result = fn()
            seconds.append(time.perf_counter() - t0)
        peak = max(peak, rss.peak - rss.start)
    return statistics.median(seconds), peak, result


def _plain_loop(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        total += int(pydicom.dcmread(path).pixel_array.size)
    return total


def _bench(name: str, folder: Path, model: SegmentationModel, device: str,
           repeats: int) -> list[tuple[str, float, float]]:
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".dcm" or p.suffix == "")
    rows: list[tuple[str, float, float]] = []
    seconds, peak, _ = _time(lambda: _plain_loop(paths), repeats)
    rows.append((f"{name}: decode, pydicom plain loop", seconds, peak))
    seconds, peak, volumes = _time(lambda: load_volumes(paths), repeats)
    volume: Volume = volumes[0]
    rows.append((f"{name}: decode, radnode load_volumes {tuple(volume.array.shape)}", seconds,
                 peak))
    seconds, peak, masks = _time(lambda: model.predict(volume, device=device), repeats)
    rows.append((f"{name}: model {model.name} on {device}", seconds, peak))

    def encode_seg() -> Any:
        return build_seg(volume, masks, model.segments, algorithm_name=model.name,
                         algorithm_version=model.version,
                         series_instance_uid=pydicom.uid.generate_uid(),
                         sop_instance_uid=pydicom.uid.generate_uid())

    seconds, peak, seg = _time(encode_seg, repeats)
    rows.append((f"{name}: encode SEG ({len(model.segments)} segments)", seconds, peak))
    measurements = measure_segments(volume, masks, model.segments)
    seconds, peak, _ = _time(lambda: build_sr(
        seg, volume, measurements, model.segments, algorithm_name=model.name,
        algorithm_version=model.version, series_instance_uid=pydicom.uid.generate_uid(),
        sop_instance_uid=pydicom.uid.generate_uid()), repeats)
    rows.append((f"{name}: encode TID 1500 SR", seconds, peak))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=Path(
        os.environ.get("RADNODE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared/data")))
    args = parser.parse_args()
    # highdicom's person-name check would print the Patient's Name of the data.
    warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
    import torch
    rows = _bench("CT 134x512x512", args.data / "ct_abdomen_pancreas_tcia", BuiltinCTModel(),
                  args.device, args.repeats)
    rows += _bench("MR sag 35x256x256", args.data / "mr_head_siemens_t1_sag", BuiltinMRModel(),
                   args.device, args.repeats)
    print(f"\ninference benchmark, device {args.device}, median of {args.repeats}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"process RSS now {_rss_mib():.0f} MiB")
    print(f"{'stage':<58}{'seconds':>9}{'peak +RSS MiB':>15}")
    for label, seconds, peak in rows:
        print(f"{label:<58}{seconds:9.2f}{peak:15.0f}")
    plain = {r[0].split(":")[0]: r[1] for r in rows if "plain loop" in r[0]}
    ours = {r[0].split(":")[0]: r[1] for r in rows if "load_volumes" in r[0]}
    for key in plain:
        print(f"{key}: radnode loader / plain pydicom loop = {ours[key] / plain[key]:.2f}")


if __name__ == "__main__":
    main()
