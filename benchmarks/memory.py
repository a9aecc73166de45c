"""Node memory while several scanners send large objects at once.

Writes N large synthetic multi-frame CT objects (distinct SOP Instance UIDs), starts
``radnode serve --no-worker`` and sends them with N concurrent dcmtk ``storescu``
processes, sampling the node's resident memory (VmRSS) every 50 ms. Prints the
node's RSS before, its peak (VmHWM) and the bytes received.

With ``--processes N`` the node runs N SCP processes (``dicom.processes``); the figures
are then the sums over the node and its SCP processes (RSS, not PSS: an upper bound).

    .venv/bin/python benchmarks/memory.py [--senders 4] [--mb 256] [--processes 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from service.dicom.phantom import write_ct_phantom


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def scp_children(pid: int) -> list[int]:
    """PIDs of the processes whose parent is *pid* (the node's SCP processes)."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:
            continue  # gone meanwhile
        ppid = next((line.split()[1] for line in lines if line.startswith("PPid:")), "")
        if ppid == str(pid):
            children.append(int(status.parent.name))
    return children


def total_kib(pids: list[int], field: str = "VmRSS") -> int:
    """Sum of *field* over *pids* (0 for one that has exited)."""
    total = 0
    for pid in pids:
        try:
            total += rss_kib(pid, field)
        except OSError:
            pass
    return total


def write_big(path: Path, megabytes: int, template: Path) -> None:
    """One Enhanced-CT-sized object: a CT slice's header with many 512x512 frames."""
    import pydicom

    ds = pydicom.dcmread(template)
    frames = max(1, megabytes * 1024 * 1024 // (512 * 512 * 2))
    ds.Rows, ds.Columns = 512, 512
    ds.NumberOfFrames = frames
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PixelData = np.zeros((frames, 512, 512), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset(ds.file_meta)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--mb", type=int, default=256, help="size of each object, MB")
    parser.add_argument("--processes", type=int, default=1,
                        help="dicom.processes of the node (SCP processes; 0: one per core)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="radnode-mem-"))
    try:
        template = write_ct_phantom(work / "template", slices=1, rows=512, columns=512)[0]
        files = []
        for index in range(args.senders):
            folder = work / f"in{index}"
            folder.mkdir()
            write_big(folder / "big.dcm", args.mb, template)
            files.append(folder / "big.dcm")
        port = free_port()
        node = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--no-worker", "--no-http", "--host",
             "127.0.0.1", "--port", str(port), "--data-dir", str(work / "node"),
             "--quiet-period", "3600"],
            env={**os.environ, "RADNODE_DICOM__PROCESSES": str(args.processes)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
                time.sleep(0.2)
            time.sleep(1 if args.processes == 1 else 4)  # SCP processes start after the port
            pids = [node.pid, *scp_children(node.pid)]
            before = total_kib(pids)
            peak = [before]
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], total_kib(pids))
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample)
            sampler.start()
            env = {**os.environ, "TCP_NODELAY": "1"}
            started = time.monotonic()
            senders = [subprocess.Popen(["storescu", "-aec", "RADNODE", "127.0.0.1", str(port),
                                         str(f)], env=env) for f in files]
            codes = [s.wait() for s in senders]
            elapsed = time.monotonic() - started
            done.set()
            sampler.join()
            hwm = total_kib(pids, "VmHWM")
        finally:
            os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=60)
        total = sum(f.stat().st_size for f in files)
        stored = list((work / "node" / "spool").rglob("*.dcm"))
        print(f"{args.senders} concurrent storescu, one {args.mb} MB object each "
              f"({total / 1e6:.0f} MB in all) in {elapsed:.1f} s; exit codes {codes}; "
              f"{len(stored)} stored")
        print(f"processes: the node and {len(pids) - 1} SCP processes" if len(pids) > 1
              else "processes: the node alone (dicom.processes: 1)")
        print(f"node RSS before: {before / 1024:.0f} MiB; peak while receiving (sampled): "
              f"{peak[0] / 1024:.0f} MiB; VmHWM: {hwm / 1024:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
