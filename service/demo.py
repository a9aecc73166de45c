"""``radnode demo``: the whole path on one machine, with a summary at the end.

It starts a receiving PACS (a second AE on loopback), starts ``radnode serve``
as a separate process (embedded SQLite and file-system broker, a real Celery
worker on CPU), pushes a CT series into the node over DICOM, waits until the
SEG and the SR reach the PACS, and prints what they say and how long each hop
took. It exits 0 only if both arrived.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from rich.console import Console
from rich.table import Table

from service.config import Destination
from service.db import repository
from service.db.session import as_utc, make_engine, make_session_factory
from service.dicom.scu import echo, find_dicom_files
from service.dicom.store_scp import start_folder_scp
from service.progress import send_with_progress

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33",
                  "1.2.840.10008.5.1.4.1.1.88.22"}
REAL_CT = "ct_abdomen_pancreas_tcia"


def shared_data_dir() -> Path | None:
    """``$RADNODE_TEST_DATA``, else ``../shared/data`` beside the checkout, if present."""
    env = os.environ.get("RADNODE_TEST_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parents[1]
    candidates += [here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _walk(items: Any) -> Iterator[Dataset]:
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def _meaning(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> str:
    seq = item.get(keyword)
    return str(seq[0].CodeMeaning) if seq else ""


def sr_findings(sr: Dataset) -> list[dict[str, Any]]:
    """Read the per-segment groups of a TID 1500 SR: label, volume (mL), mean (HU)."""
    findings = []
    for group in _walk(sr.get("ContentSequence")):
        if group.get("ValueType") != "CONTAINER" or "Measurement Group" not in _meaning(group):
            continue
        finding: dict[str, Any] = {"label": "", "volume_ml": None, "mean": None}
        for item in group.get("ContentSequence", []):
            name = _meaning(item)
            if name == "Tracking Identifier":
                finding["label"] = str(item.TextValue)
            elif item.get("ValueType") == "NUM" and item.get("MeasuredValueSequence"):
                value = float(item.MeasuredValueSequence[0].NumericValue)
                if name == "Volume":
                    finding["volume_ml"] = value
                else:
                    finding["mean"] = value
        findings.append(finding)
    return findings


def run_demo(*, input_dir: Path | None, data_dir: Path, quiet_period_s: float,
             timeout_s: float, report: dict[str, float] | None = None,
             phantom: bool = False) -> int:
    """Run the demo; return the exit status (0 only if SEG and SR reached the PACS).

    Parameters
    ----------
    input_dir : pathlib.Path or None
        Series to send; None: the real CT from the shared data, else a phantom.
    data_dir : pathlib.Path
        Emptied and used for the node, the PACS folder and the log.
    quiet_period_s : float
        The node's completion quiet period, seconds.
    timeout_s : float
        Longest wait for SEG and SR after the last slice was sent, seconds.
    report : dict, optional
        Filled with :func:`hop_timings` (seconds) when the results arrived.
    phantom : bool
        Send the synthetic CT phantom whatever data is available.
    """
    console = Console()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    data_dir = data_dir.resolve()

    if input_dir is None:
        shared = None if phantom else shared_data_dir()
        if shared is not None and (shared / REAL_CT).is_dir():
            input_dir = shared / REAL_CT
        else:
            from service.dicom.phantom import write_ct_phantom

            input_dir = data_dir / "phantom"
            write_ct_phantom(input_dir)
            if not phantom:
                console.print("[yellow]real CT not found: using a synthetic CT phantom[/]")
    files = find_dicom_files([input_dir])
    console.print(f"input: {input_dir} ({len(files)} files)")

    pacs_port, node_port, http_port = free_port(), free_port(), free_port()
    pacs_dir = data_dir / "pacs"
    pacs = start_folder_scp("DEMOPACS", "127.0.0.1", pacs_port, pacs_dir)
    node_dir = data_dir / "node"
    log_path = data_dir / "node.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--ae-title", "RADNODE",
           "--host", "127.0.0.1", "--port", str(node_port), "--data-dir", str(node_dir),
           "--destination", f"DEMOPACS@127.0.0.1:{pacs_port}",
           "--quiet-period", str(quiet_period_s), "--http-port", str(http_port)]
    # The dashboard needs a login: a viewer for this run, with a fresh password.
    password = secrets.token_urlsafe(12)
    subprocess.run([sys.executable, "-m", "service.cli", "users", "add", "demo", "--role",
                    "viewer", "--password-stdin", "--data-dir", str(node_dir)],
                   input=f"{password}\n", text=True, capture_output=True, check=True)
    console.print(f"PACS DEMOPACS on 127.0.0.1:{pacs_port}; node RADNODE on 127.0.0.1:{node_port}"
                  f" (log: {log_path}); dashboard http://127.0.0.1:{http_port}/ (user demo, "
                  f"password {password}, while the demo runs)")
    with log_path.open("wb") as log_file:
        node = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        return _drive(console, files, node, node_port, node_dir, pacs_dir, timeout_s,
                      quiet_period_s, report)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        pacs.shutdown()


def _drive(console: Console, files: list[Path], node: subprocess.Popen[bytes], node_port: int,
           node_dir: Path, pacs_dir: Path, timeout_s: float, quiet_period_s: float,
           report: dict[str, float] | None) -> int:
    target = Destination(ae_title="RADNODE", host="127.0.0.1", port=node_port)
    deadline = time.monotonic() + 60
    while not _listening(node_port):
        if node.poll() is not None or time.monotonic() > deadline:
            console.print("[red]the node did not start; see node.log[/]")
            return 1
        time.sleep(0.2)
    if echo(target, calling_ae="DEMOSCANNER", timeout_s=10) != 0:
        console.print("[red]the node does not answer C-ECHO; see node.log[/]")
        return 1

    outcomes = send_with_progress(target, files, calling_ae="DEMOSCANNER")
    failed = [o for o in outcomes if not o.ok]
    if failed:
        console.print(f"[red]{len(failed)} instance(s) were not accepted by the node[/]")
        return 1
    last_ack = time.monotonic()

    seg: Dataset | None = None
    sr: Dataset | None = None
    deadline = time.monotonic() + timeout_s
    with console.status("waiting for the series to complete, be analysed and delivered…"):
        while (seg is None or sr is None) and time.monotonic() < deadline:
            for path in sorted(pacs_dir.glob("*.dcm")):
                ds = dcmread(path, stop_before_pixels=True)
                if ds.SOPClassUID == SEG_SOP_CLASS:
                    seg = ds
                elif ds.SOPClassUID in SR_SOP_CLASSES:
                    sr = dcmread(path)
            if node.poll() is not None:
                break
            time.sleep(0.2)
    wall = time.monotonic() - last_ack
    if seg is None or sr is None:
        console.print(f"[red]the SEG and SR did not reach the PACS within {timeout_s:.0f} s;"
                      " see node.log[/]")
        return 1
    hops = _summary(console, seg, sr, files, node_dir, pacs_dir, wall, quiet_period_s)
    if report is not None:
        report.update(hops)
    return 0


def hop_timings(node_dir: Path, source_series_uid: str) -> tuple[dict[str, float], str]:
    """Seconds spent in each hop of the newest job of a series, from the node's database.

    Keys: ``receive`` (first → last instance), ``complete`` (last instance →
    series complete), ``queue`` (complete → job started), ``analyse`` (job
    started → SEG+SR written), ``deliver`` (written → last delivery
    acknowledged), ``end_to_end`` (last instance → last delivery
    acknowledged), plus the worker's own step timings (``load_s`` …); and
    why the series was judged complete (``series.completion_reason``).
    """
    factory = make_session_factory(make_engine(f"sqlite:///{node_dir / 'radnode.db'}"))
    out: dict[str, float] = {}
    with factory() as session:
        series = repository.series_by_uid(source_series_uid, session=session)
        if series is None:
            return out, "?"
        reason = series.completion_reason or "?"
        jobs = repository.jobs_for_series(series.id, session=session)
        if not jobs:
            return out, reason
        job = jobs[-1]
        sent = [d.sent_at for r in repository.results_for_job(job.id, session=session)
                for d in repository.deliveries_for_result(r.id, session=session) if d.sent_at]
        marks = {
            "first": series.first_received_at, "last": series.last_received_at,
            "complete": series.completed_at, "started": job.started_at,
            "finished": job.finished_at, "delivered": max(sent) if sent else None,
        }
        for name, (later, earlier) in {
            "receive": ("last", "first"), "complete": ("complete", "last"),
            "queue": ("started", "complete"), "analyse": ("finished", "started"),
            "deliver": ("delivered", "finished"), "end_to_end": ("delivered", "last"),
        }.items():
            end, begin = marks[later], marks[earlier]
            if end is not None and begin is not None:
                out[name] = (as_utc(end) - as_utc(begin)).total_seconds()
        out["instances"] = float(series.instance_count)
        for key, value in (job.timings or {}).items():
            if isinstance(value, float):
                out[key] = value
    return out, reason


def _summary(console: Console, seg: Dataset, sr: Dataset, files: list[Path], node_dir: Path,
             pacs_dir: Path, wall_s: float, quiet_period_s: float) -> dict[str, float]:
    table = Table(title=f"Findings (from the SR in the PACS: {sr.get('SeriesDescription', '')})")
    table.add_column("segment")
    table.add_column("volume (mL)", justify="right")
    table.add_column("mean (HU)", justify="right")
    for finding in sr_findings(sr):
        volume = finding["volume_ml"]
        mean = finding["mean"]
        table.add_row(finding["label"], "-" if volume is None else f"{volume:,.1f}",
                      "-" if mean is None else f"{mean:.0f}")
    console.print(table)
    console.print(f"SEG {seg.SOPInstanceUID} ({len(seg.SegmentSequence)} segments) and "
                  f"SR {sr.SOPInstanceUID} are in the PACS folder {pacs_dir}")

    hops, reason = hop_timings(node_dir, str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID))
    reason += f"; quiet period {quiet_period_s:g} s" if reason == "quiet_period" else ""
    timing = Table(title="Timings")
    timing.add_column("hop")
    timing.add_column("time", justify="right")
    for key, label in (
        ("receive", f"received ({len(files)} instances)"),
        ("complete", f"→ series complete ({reason})"),
        ("queue", "→ job started on the worker"),
        ("analyse", "→ analysed (load, model, SEG+SR encoded)"),
        ("deliver", "→ delivered to the PACS"),
        ("end_to_end", "last slice received → SEG+SR acknowledged"),
    ):
        timing.add_row(label, f"{hops[key]:.2f} s" if key in hops else "-")
    if "end_to_end" in hops and "complete" in hops:
        timing.add_row("  the same, minus the wait for completion",
                       f"{hops['end_to_end'] - hops['complete']:.2f} s")
    console.print(timing)
    steps = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in hops.items()
                      if k.endswith("_s"))
    console.print(f"worker steps: {steps}")
    console.print(f"[green]OK[/]: SEG and SR reached the PACS {wall_s:.1f} s after the last "
                  f"slice was acknowledged ({len(files)} instances sent)")
    return hops
