"""What security costs: DICOM TLS ingest against plain, and de-identification per instance.

1. Ingest: one ``radnode serve --no-worker`` with a plain listener and a DICOM
   TLS listener (certificates made with openssl, TLS 1.2+, client certificate
   required); dcmtk ``storescu`` sends the real CT to each, ``--repeats``
   times alternately, with ``TCP_NODELAY=1``. Prints the median seconds from
   storescu's start to its exit, instances/s, MB/s and the TLS/plain ratio;
   every repeat checks that the node holds every instance.
2. De-identification: :func:`service.deid.deidentify_file` on every CT slice
   and on real SEG and SR files (DICOM PS3.15 E.1 Basic Profile, UID mapping
   in a fresh SQLite database): the first pass makes the pseudonyms, the
   second finds them. Prints instances/s and ms per instance.

    .venv/bin/python benchmarks/security.py [--repeats 3] [--input DIR]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.config import DeidOptions  # noqa: E402
from service.db import migrate  # noqa: E402
from service.db.session import make_engine, make_session_factory  # noqa: E402
from service.deid import deidentify_file  # noqa: E402
from tests.integration.conftest import free_port, require_tool, stop, wait_for_port  # noqa: E402
from tests.pki import make_pki  # noqa: E402

SHARED = Path(os.environ.get("RADNODE_TEST_DATA", ROOT.parent / "shared" / "data"))


def _count(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return int(db.execute("select count(*) from instances").fetchone()[0])


def ingest(series: Path, repeats: int) -> None:
    """Plain against TLS into one node; a fresh data folder per repeat."""
    storescu = require_tool("storescu")
    files = sorted(series.glob("*.dcm"))
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    times: dict[str, list[float]] = {"plain": [], "TLS": []}
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp) / "pki")
        for repeat in range(repeats):
            for mode in ("plain", "TLS"):
                folder = Path(tmp) / f"run-{repeat}-{mode}"
                port, tls_port = free_port(), free_port()
                config = folder / "radnode.yaml"
                folder.mkdir()
                config.write_text(yaml.safe_dump({"dicom": {"tls": {
                    "port": tls_port, "cert_file": str(pki.server_cert),
                    "key_file": str(pki.server_key), "ca_file": str(pki.ca),
                    "require_client_cert": True}}, "http": {"enabled": False}}))
                node = subprocess.Popen(
                    [sys.executable, "-m", "service.cli", "serve", "--config", str(config),
                     "--host", "127.0.0.1", "--port", str(port), "--data-dir",
                     str(folder / "node"), "--no-worker", "--quiet-period", "600"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True, cwd=ROOT)
                try:
                    wait_for_port(tls_port, node)
                    tls = (["+tls", str(pki.client_key), str(pki.client_cert), "+cf",
                            str(pki.ca)] if mode == "TLS" else [])
                    started = time.perf_counter()
                    subprocess.run([storescu, *tls, "-aet", "BENCH", "-aec", "RADNODE",
                                    "127.0.0.1", str(tls_port if mode == "TLS" else port),
                                    *map(str, files)],
                                   check=True, capture_output=True,
                                   env={**os.environ, "TCP_NODELAY": "1"})
                    times[mode].append(time.perf_counter() - started)
                    held = _count(folder / "node" / "radnode.db")
                    if held != len(files):
                        raise SystemExit(f"{mode}: the node holds {held} of {len(files)}")
                finally:
                    stop(node)
    print(f"\nIngest: {len(files)} instances, {megabytes:.1f} MB, median of {repeats}")
    print(f"{'listener':<8} {'seconds':>8} {'inst/s':>8} {'MB/s':>7} {'ratio':>6}")
    plain = statistics.median(times["plain"])
    for mode, values in times.items():
        median = statistics.median(values)
        print(f"{mode:<8} {median:8.2f} {len(files) / median:8.1f} {megabytes / median:7.1f} "
              f"{plain / median:6.2f}")


def deidentification(series: Path, results: list[Path]) -> None:
    """Two passes over each file set: pseudonyms made, then found."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'radnode.db'}"
        migrate.upgrade(url)
        factory = make_session_factory(make_engine(url))
        options = DeidOptions()
        print("\nDe-identification (Basic Profile, SQLite mapping)")
        print(f"{'objects':<22} {'pass':<6} {'n':>4} {'inst/s':>8} {'ms each':>8}")
        for label, files in (("CT slices", sorted(series.glob("*.dcm"))),
                             ("SEG/SR (real)", results)):
            for name in ("first", "second"):
                with factory() as session:
                    started = time.perf_counter()
                    for path in files:
                        deidentify_file(path, session, scope="bench", options=options)
                        session.commit()
                    took = time.perf_counter() - started
                print(f"{label:<22} {name:<6} {len(files):4d} {len(files) / took:8.1f} "
                      f"{1000 * took / len(files):8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--input", type=Path, default=SHARED / "ct_abdomen_pancreas_tcia")
    args = parser.parse_args()
    results = [p for p in sorted((SHARED / "seg_sr").rglob("*.dcm"))
               if str(pydicom.dcmread(p, stop_before_pixels=True).get("Modality", ""))
               in ("SEG", "SR")]
    deidentification(args.input, results)
    ingest(args.input, args.repeats)


if __name__ == "__main__":
    main()
