"""Verified delivery against real peers: dcmtk storescp and Orthanc (DIMSE, commitment, STOW-RS).

The delivery rows are written to a real (SQLite) database as a worker would
write them, pointing at real SEG, SR and CT files from the shared data; the
dispatcher then sends them over real associations and HTTP, and the node's
own SCP receives Orthanc's Storage Commitment reports.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.config import DicomSettings, Settings, load_settings
from service.db import migrate
from service.db.models import Delivery, Job, Result, Series
from service.db.session import make_engine, make_session_factory, utcnow
from service.delivery.dispatch import Dispatcher, deliver_due
from service.scp.handlers import StoreContext
from service.scp.server import start_scp
from tests.integration.conftest import (
    free_port,
    received_files,
    require_tool,
    stop,
    wait_for_port,
)
from tests.peers import orthanc

pytestmark = pytest.mark.integration

SEG = "seg_sr/highdicom/seg_image_ct_binary.dcm"
SR = "seg_sr/highdicom/sr_document.dcm"
LIVER_SEG = "seg_sr/dcmqi_ct_liver_seg/liver.dcm"
CT = "seg_sr/dcmqi_ct_liver_seg/ct_3slice/01.dcm"

#: A dcmtk association profile that accepts CT Image Storage only.
CT_ONLY_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[CTOnly]
PresentationContext1 = CTImageStorage\\Uncompressed

[[Profiles]]
[CT]
PresentationContexts = CTOnly
"""


@pytest.fixture
def factory(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'radnode.db'}"
    migrate.upgrade(url)
    return make_session_factory(make_engine(url))


def _settings(tmp_path: Path, destinations: list[dict[str, Any]], **delivery: Any) -> Settings:
    cfg = {"retry_backoff_s": 0.2, "max_backoff_s": 0.5, "connect_timeout_s": 3,
           "response_timeout_s": 10, **delivery}
    return load_settings(data_dir=tmp_path / "node", destinations=destinations, delivery=cfg,
                         rules=[])


def _add_results(factory: sessionmaker[Session], paths: list[Path],
                 destinations: list[str]) -> list[str]:
    """Rows as a worker writes them: a job, one result per file, one delivery per pair."""
    now = utcnow()
    uids = []
    with factory() as session:
        series = Series(series_instance_uid=pydicom.uid.generate_uid(),
                        study_instance_uid="1.2.3", modality="CT", state="complete",
                        instance_count=1, first_received_at=now, last_received_at=now,
                        routed_at=now)
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, task_name="radnode.analyse_series", queue="gpu",
                  model_name="m", state="succeeded", destinations=destinations, created_at=now)
        session.add(job)
        session.flush()
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            result = Result(job_id=job.id, kind=str(ds.Modality), path=str(path),
                            sop_class_uid=str(ds.SOPClassUID),
                            sop_instance_uid=str(ds.SOPInstanceUID),
                            series_instance_uid=str(ds.SeriesInstanceUID), created_at=now)
            session.add(result)
            session.flush()
            uids.append(str(ds.SOPInstanceUID))
            for name in destinations:
                session.add(Delivery(result_id=result.id, destination=name, created_at=now,
                                     next_attempt_at=now, state="pending", attempts=0))
        session.commit()
    return uids


def _deliveries(factory: sessionmaker[Session]) -> list[Delivery]:
    with factory() as session:
        rows = list(session.scalars(select(Delivery).order_by(Delivery.id)))
        for row in rows:
            _ = row.result.sop_instance_uid  # load before the session closes
        return rows


def _storescp(folder: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [require_tool("storescp"), "-aet", "PACS", "-od", str(folder), "-uf", *extra,
         str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_port(port, process)
    return process


def _received(folder: Path) -> list[str]:
    """SOP Instance UIDs of every file storescp wrote (``-uf``: duplicates get own files)."""
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                  for p in received_files(folder))


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_destination_down_then_back_receives_everything_exactly_once(
    tmp_path: Path, test_data_dir: Path, factory: sessionmaker[Session]
) -> None:
    port = free_port()  # nothing listens yet: the PACS is down
    settings = _settings(tmp_path, [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                     "port": port}])
    uids = _add_results(factory, [test_data_dir / p for p in (SEG, SR, LIVER_SEG)], ["pacs"])
    for _ in range(3):
        assert deliver_due(settings, factory) == 0
        rows = _deliveries(factory)
        assert {d.state for d in rows} == {"pending"}
        assert all(d.attempts == 0 for d in rows)  # an unreachable PACS costs no attempt
        assert all("could not be opened" in (d.error or "") for d in rows), rows[0].error
        time.sleep(0.6)

    folder = tmp_path / "pacs"
    pacs = _storescp(folder, port)
    try:
        time.sleep(0.6)
        assert deliver_due(settings, factory) == 3
        assert deliver_due(settings, factory) == 0  # nothing is due any more
        assert {d.state for d in _deliveries(factory)} == {"sent"}
        assert _received(folder) == sorted(uids)  # each instance once
    finally:
        stop(pacs)


def test_refused_sop_class_fails_cleanly_while_the_other_destination_succeeds(
    tmp_path: Path, test_data_dir: Path, factory: sessionmaker[Session]
) -> None:
    profile = tmp_path / "ct-only.cfg"
    profile.write_text(CT_ONLY_PROFILE, encoding="utf-8")
    ct_port, any_port = free_port(), free_port()
    ct_only = _storescp(tmp_path / "ct-only", ct_port, "-xf", str(profile), "CT")
    anything = _storescp(tmp_path / "any", any_port)
    try:
        settings = _settings(tmp_path, [
            {"name": "ct-archive", "ae_title": "PACS", "host": "127.0.0.1", "port": ct_port},
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": any_port},
        ])
        seg_uid, ct_uid = _add_results(factory, [test_data_dir / SEG, test_data_dir / CT],
                                       ["ct-archive", "pacs"])
        dispatcher = Dispatcher()  # both destinations on their own threads
        dispatcher.tick(settings, factory)
        _wait(lambda: dispatcher.idle() and all(
            d.state in ("sent", "failed") for d in _deliveries(factory)), 30, "deliveries")
        dispatcher.shutdown()
        states = {(d.destination, d.result.sop_instance_uid): d for d in _deliveries(factory)}
        refused = states[("ct-archive", seg_uid)]
        assert refused.state == "failed"  # at once: the PACS will not change its mind
        assert refused.attempts == 1
        assert "Segmentation Storage" in (refused.error or ""), refused.error
        assert states[("ct-archive", ct_uid)].state == "sent"
        assert states[("pacs", seg_uid)].state == "sent"
        assert states[("pacs", ct_uid)].state == "sent"
        assert _received(tmp_path / "ct-only") == [ct_uid]
        assert _received(tmp_path / "any") == sorted([seg_uid, ct_uid])
    finally:
        stop(ct_only)
        stop(anything)


@pytest.fixture
def node_scp(tmp_path: Path, factory: sessionmaker[Session]) -> Iterator[int]:
    """The node's SCP (in this process), recording commitment reports in ``factory``'s DB."""
    port = free_port()
    spool = tmp_path / "spool"
    spool.mkdir()
    server = start_scp(DicomSettings(ae_title="RADNODE", host="127.0.0.1", port=port),
                       StoreContext(spool, factory))
    try:
        yield port
    finally:
        server.shutdown()


def test_storage_commitment_with_orthanc_finds_and_repairs_a_missing_instance(
    tmp_path: Path, test_data_dir: Path, factory: sessionmaker[Session], node_scp: int
) -> None:
    with orthanc(tmp_path, modalities={"radnode": ("RADNODE", "127.0.0.1", node_scp)}) as pacs:
        settings = _settings(tmp_path, [{
            "name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1",
            "port": pacs.dicom_port, "storage_commitment": True}])
        seg_uid, sr_uid = _add_results(factory, [test_data_dir / SEG, test_data_dir / SR],
                                       ["orthanc"])
        # The SR's row says "sent", but it never reached the PACS: the complaint
        # "it says sent but the PACS doesn't have it". Commitment finds it out.
        with factory() as session:
            row = session.scalars(select(Delivery).join(Result).where(
                Result.sop_instance_uid == sr_uid)).one()
            row.state, row.sent_at = "sent", utcnow()
            session.commit()

        assert deliver_due(settings, factory) == 1  # the SEG; commitment asked for both

        def states() -> dict[str, str]:
            return {d.result.sop_instance_uid: d.state for d in _deliveries(factory)}

        _wait(lambda: states()[seg_uid] == "committed" and states()[sr_uid] == "pending",
              30, f"Orthanc's commitment report (states {states()})")
        sr_row = next(d for d in _deliveries(factory) if d.result.sop_instance_uid == sr_uid)
        assert "storage commitment failed" in (sr_row.error or "")
        assert not pacs.has_instance(sr_uid)

        deliver_due(settings, factory)  # sends the SR, asks again
        _wait(lambda: set(states().values()) == {"committed"}, 30, "the second report")
        assert pacs.has_instance(sr_uid) and pacs.has_instance(seg_uid)
        assert all(d.committed_at is not None for d in _deliveries(factory))


def test_stow_rs_and_folder_destinations(
    tmp_path: Path, test_data_dir: Path, factory: sessionmaker[Session]
) -> None:
    (tmp_path / "out").mkdir()  # a folder destination is never created (an unmounted share)
    with orthanc(tmp_path, users={"radnode": "s3cret"}) as pacs:
        settings = _settings(tmp_path, [
            {"kind": "stow", "name": "web", "url": pacs.dicomweb_url, "username": "radnode",
             "password": "s3cret"},
            {"kind": "folder", "name": "scripts", "path": str(tmp_path / "out")},
        ])
        seg_uid, sr_uid = _add_results(factory, [test_data_dir / SEG, test_data_dir / SR],
                                       ["web", "scripts"])
        assert deliver_due(settings, factory) == 4
        assert {d.state for d in _deliveries(factory)} == {"sent"}
        assert pacs.has_instance(seg_uid) and pacs.has_instance(sr_uid)
    written = sorted(p.name for p in (tmp_path / "out").rglob("*.dcm"))
    assert written == sorted([f"{seg_uid}.dcm", f"{sr_uid}.dcm"])


def test_commitment_asked_of_a_pacs_without_it_keeps_the_instances_sent(
    tmp_path: Path, test_data_dir: Path, factory: sessionmaker[Session]
) -> None:
    port = free_port()
    pacs = _storescp(tmp_path / "pacs", port)  # dcmtk storescp has no Storage Commitment
    try:
        settings = _settings(tmp_path, [{"name": "pacs", "ae_title": "PACS",
                                         "host": "127.0.0.1", "port": port,
                                         "storage_commitment": True}])
        (uid,) = _add_results(factory, [test_data_dir / SEG], ["pacs"])
        assert deliver_due(settings, factory) == 1
        (row,) = _deliveries(factory)
        assert row.state == "sent"  # delivered; confirmation still wanted
        assert row.transaction_uid is None and row.commit_attempts == 0
        assert "storage commitment request not accepted" in (row.error or "")
        assert _received(tmp_path / "pacs") == [uid]
        time.sleep(0.3)  # asked again after retry_backoff_s, still without counting
        deliver_due(settings, factory)
        (row,) = _deliveries(factory)
        assert (row.state, row.commit_attempts) == ("sent", 0)
        assert _received(tmp_path / "pacs") == [uid]  # never sent twice
    finally:
        stop(pacs)
