"""The C-STORE handler's structure check: microseconds per data set, pydicom's walk and radnode's.

Before it answers Success the SCP walks every received data set's top-level elements
(:func:`service.dicom.inspect.check_complete_and_collect`): are they whole, and what are the
six attributes it records. This prints, per folder of real files, the median time of

* ``pydicom, file``: pydicom's element generator over the open file (the handler's way for
  data sets over 256 KiB before the skipping walk);
* ``pydicom, bytes``: the same over the data set read into memory (its way for smaller ones);
* ``radnode, bytes`` / ``radnode, mmap``: the skipping walk of :mod:`service.dicom.walk` over
  the bytes, or over the file mapped with ``mmap`` (the handler's two ways now).

The files are walked as they lie in the test data folder (``RADNODE_TEST_DATA`` or
``../shared/data``): with the undefined-length sequences their modality wrote. dcmtk's
``storescu`` re-encodes sequences with defined lengths on the wire, which pydicom's walk skips
cheaply, so the gain in ``benchmarks/ingest.py`` (sent by storescu) is smaller than here.

Usage: ``.venv/bin/python benchmarks/structure_check.py [--repeats N]``
"""

from __future__ import annotations

import argparse
import io
import mmap
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydicom.filereader import read_file_meta_info  # noqa: E402
from pydicom.uid import UID  # noqa: E402

from service.dicom.inspect import _walk, check_complete_and_collect, dataset_offset  # noqa: E402
from service.dicom.scu import find_dicom_files  # noqa: E402
from service.scp.handlers import _TAGS  # noqa: E402

WANTED = _TAGS | {0x00080005}
FOLDERS = [
    ("CT 512×512, implicit VR (pancreas)", "ct_abdomen_pancreas_tcia"),
    ("CT 512×512, explicit VR (GE)", "ct_head_ge_gantry_tilt"),
    ("MR, Siemens", "mr_head_siemens_t1_sag"),
    ("enhanced multi-frame", "enhanced_multiframe"),
]


def data_dir() -> Path:
    configured = os.environ.get("RADNODE_TEST_DATA")
    return Path(configured) if configured else REPO.parent / "shared" / "data"


def timed(function: Callable[[], object], repeats: int) -> float:
    """Median microseconds of one call."""
    function()  # warm: page cache, pydicom's imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def ways(path: Path) -> dict[str, Callable[[], object]]:
    syntax = UID(read_file_meta_info(path).TransferSyntaxUID)

    def pydicom_file() -> object:
        with path.open("rb") as handle:
            handle.seek(dataset_offset(handle))
            return _walk(handle, syntax, WANTED)

    def pydicom_bytes() -> object:
        with path.open("rb") as handle:
            handle.seek(dataset_offset(handle))
            return _walk(io.BytesIO(handle.read()), syntax, WANTED)

    def radnode_bytes() -> object:
        with path.open("rb") as handle:
            handle.seek(dataset_offset(handle))
            return check_complete_and_collect(handle.read(), syntax, _TAGS)

    def radnode_mmap() -> object:
        with path.open("rb") as handle:
            offset = dataset_offset(handle)
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                mapped.seek(offset)
                return check_complete_and_collect(mapped, syntax, _TAGS)

    return {"pydicom, file": pydicom_file, "pydicom, bytes": pydicom_bytes,
            "radnode, bytes": radnode_bytes, "radnode, mmap": radnode_mmap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per file")
    parser.add_argument("--files", type=int, default=40, help="files per folder, at most")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # odd values in some files; not what is measured
    root = data_dir()
    names = list(ways(find_dicom_files([root / FOLDERS[0][1]])[0]))
    print(f"median µs per data set (each file timed {args.repeats}×, median over files)")
    print(f"{'folder':<38} {'files':>5} {'KiB':>6}  " + "  ".join(f"{n:>15}" for n in names)
          + "  speed-up")
    for label, relative in FOLDERS:
        files = find_dicom_files([root / relative])[:args.files]
        if not files:
            print(f"{label:<38} not found under {root}")
            continue
        per_way: dict[str, list[float]] = {name: [] for name in names}
        for path in files:
            for name, function in ways(path).items():
                per_way[name].append(timed(function, args.repeats))
        medians = {name: statistics.median(values) for name, values in per_way.items()}
        size = statistics.median(path.stat().st_size for path in files) / 1024
        old = min(medians["pydicom, file"], medians["pydicom, bytes"])
        new = min(medians["radnode, bytes"], medians["radnode, mmap"])
        print(f"{label:<38} {len(files):>5} {size:>6.0f}  "
              + "  ".join(f"{medians[n]:>15.0f}" for n in names) + f"  {old / new:>7.1f}×")


if __name__ == "__main__":
    main()
