from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import scheduler
from service.config import CompletionSettings, Settings, load_settings
from service.db import repository
from service.db.models import Job, Series
from service.db.session import as_utc
from service.model_spec import AcceptSpec, CodeSpec, LabelSpec, ModelSpec
from service.routing import Rule
from tests.unit.conftest import DESTINATION_NAMES, T0, Clock, record

QUIET_5S = CompletionSettings(quiet_period_s=5.0)


@pytest.fixture
def two_series(session_factory: sessionmaker[Session]) -> tuple[str, str]:
    ct, mr = generate_uid(), generate_uid()
    for _ in range(3):
        assert record(session_factory, series_uid=ct, modality="CT", at=T0)
    assert record(session_factory, series_uid=mr, modality="MR", at=T0)
    return ct, mr


def _series(factory: sessionmaker[Session], uid: str) -> Series:
    with factory() as session:
        found = repository.series_by_uid(uid, session=session)
        assert found is not None
        return found


def _jobs(factory: sessionmaker[Session]) -> list[Job]:
    with factory() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def test_record_instance_counts_and_duplicates(
    session_factory: sessionmaker[Session], two_series: tuple[str, str]
) -> None:
    ct, mr = two_series
    assert _series(session_factory, ct).instance_count == 3
    assert _series(session_factory, mr).instance_count == 1
    sop = generate_uid()
    assert record(session_factory, series_uid=mr, modality="MR", at=T0, sop_uid=sop)
    assert not record(session_factory, series_uid=mr, modality="MR", at=T0, sop_uid=sop)
    assert _series(session_factory, mr).instance_count == 2


def test_complete_ready_series_with_explicit_now(
    session_factory: sessionmaker[Session], two_series: tuple[str, str]
) -> None:
    ct, mr = two_series
    with session_factory() as session:
        early = repository.complete_ready_series(
            session=session, now=T0 + timedelta(seconds=1), rules=QUIET_5S)
        session.commit()
    assert early == []
    assert _series(session_factory, ct).state == "receiving"
    assert _series(session_factory, mr).state == "receiving"

    later = T0 + timedelta(seconds=6)
    with session_factory() as session:
        done = repository.complete_ready_series(session=session, now=later, rules=QUIET_5S)
        session.commit()
    assert sorted(s.series_instance_uid for s in done) == sorted([ct, mr])
    for uid in (ct, mr):
        series = _series(session_factory, uid)
        assert series.state == "complete"
        assert series.completion_reason == "quiet_period"
        assert series.completed_at is not None and as_utc(series.completed_at) == later


def _rules(settings: Settings, *rules: dict[str, Any]) -> Settings:
    """``settings`` with these rules (validated as from YAML)."""
    return settings.model_copy(update={"rules": [Rule.model_validate(r) for r in rules]})


def _ct_only(settings: Settings) -> Settings:
    return _rules(settings, {"name": "ct", "when": {"attribute": "Modality", "equals": "CT"},
                             "models": ["radnode-builtin-ct"]})


def test_complete_and_route_creates_ct_job_only(
    session_factory: sessionmaker[Session], two_series: tuple[str, str], settings: Settings,
    clock: Clock,
) -> None:
    ct, mr = two_series
    settings = _ct_only(settings)
    clock.at(1)
    assert scheduler.complete_and_route(settings, session_factory) == 0
    assert _jobs(session_factory) == []
    assert _series(session_factory, ct).state == "receiving"

    clock.at(6)
    assert scheduler.complete_and_route(settings, session_factory) == 1
    assert _series(session_factory, ct).state == "complete"
    assert _series(session_factory, mr).state == "complete"
    (job,) = _jobs(session_factory)
    assert job.series_id == _series(session_factory, ct).id
    assert job.task_name == "radnode.analyse_series"
    assert job.model_name == "radnode-builtin-ct"
    assert job.queue == "gpu"
    assert job.state == "pending"
    assert job.destinations == DESTINATION_NAMES
    assert job.rule_names == "ct"
    assert job.priority == "routine"
    assert job.config_version == settings.config_version
    assert job.attempts == 0
    assert as_utc(job.created_at) == T0 + timedelta(seconds=6)
    assert job.queued_at is None

    clock.at(7)  # nothing new: no second job
    assert scheduler.complete_and_route(settings, session_factory) == 0
    assert len(_jobs(session_factory)) == 1


def test_late_instance_reopens_and_reroutes_series(
    session_factory: sessionmaker[Session], two_series: tuple[str, str], settings: Settings,
    clock: Clock,
) -> None:
    ct, mr = two_series
    settings = _ct_only(settings)
    clock.at(6)
    assert scheduler.complete_and_route(settings, session_factory) == 1

    assert record(session_factory, series_uid=ct, modality="CT", at=T0 + timedelta(seconds=8))
    series = _series(session_factory, ct)
    assert series.state == "receiving"
    assert series.instance_count == 4
    assert as_utc(series.last_received_at) == T0 + timedelta(seconds=8)
    assert _series(session_factory, mr).state == "complete"

    clock.at(10)  # only 2 s after the late instance
    assert scheduler.complete_and_route(settings, session_factory) == 0
    clock.at(14)
    assert scheduler.complete_and_route(settings, session_factory) == 1
    jobs = _jobs(session_factory)
    assert [j.series_id for j in jobs] == [series.id, series.id]
    assert _series(session_factory, ct).state == "complete"


class FakeCelery:
    """Records send_task calls like Celery's app.send_task; may fail like a dead broker."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[str, Any, Any]] = []

    def send_task(self, name: str, args: Any = None, queue: Any = None, **_: Any) -> None:
        self.calls.append((name, args, queue))
        if self.fail:
            raise ConnectionError("broker unreachable")


def _routed_jobs(factory: sessionmaker[Session], settings: Settings, clock: Clock,
                 count: int) -> list[Job]:
    for _ in range(count):
        record(factory, series_uid=generate_uid(), modality="CT", at=T0)
    clock.at(6)
    assert scheduler.complete_and_route(settings, factory) == count
    return _jobs(factory)


def test_publish_pending_queues_jobs(
    session_factory: sessionmaker[Session], settings: Settings, clock: Clock
) -> None:
    (job,) = _routed_jobs(session_factory, settings, clock, 1)
    app = FakeCelery()
    clock.at(9)
    assert scheduler.publish_pending(app, session_factory) == 1  # type: ignore[arg-type]
    assert app.calls == [("radnode.analyse_series", [job.id], "gpu")]
    (queued,) = _jobs(session_factory)
    assert queued.state == "queued"
    assert queued.queued_at is not None and as_utc(queued.queued_at) == T0 + timedelta(seconds=9)

    # Nothing pending any more: nothing is sent again.
    assert scheduler.publish_pending(app, session_factory) == 0  # type: ignore[arg-type]
    assert len(app.calls) == 1


def test_publish_failure_keeps_jobs_pending(
    session_factory: sessionmaker[Session], settings: Settings, clock: Clock
) -> None:
    jobs = _routed_jobs(session_factory, settings, clock, 2)
    broken = FakeCelery(fail=True)
    assert scheduler.publish_pending(broken, session_factory) == 0  # type: ignore[arg-type]
    assert [j.state for j in _jobs(session_factory)] == ["pending", "pending"]
    assert all(j.queued_at is None for j in _jobs(session_factory))
    assert len(broken.calls) == 1  # stops at the first failure; retried next tick

    app = FakeCelery()
    assert scheduler.publish_pending(app, session_factory) == 2  # type: ignore[arg-type]
    assert app.calls == [("radnode.analyse_series", [j.id], "gpu") for j in jobs]
    assert [j.state for j in _jobs(session_factory)] == ["queued", "queued"]


def test_default_pipelines_route_each_modality_to_its_builtin_model(
    session_factory: sessionmaker[Session], two_series: tuple[str, str], settings: Settings,
    clock: Clock,
) -> None:
    ct, mr = two_series
    clock.at(6)
    assert scheduler.complete_and_route(settings, session_factory) == 2
    by_series = {j.series_id: j.model_name for j in _jobs(session_factory)}
    assert by_series == {_series(session_factory, ct).id: "radnode-builtin-ct",
                         _series(session_factory, mr).id: "radnode-builtin-mr"}


def _spool_file(settings: Settings, factory: sessionmaker[Session], series_uid: str,
                **attributes: str) -> None:
    """Write the first instance of a recorded series where its row says it is."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    with factory() as session:
        series = session.scalars(
            select(Series).where(Series.series_instance_uid == series_uid)).one()
        relative = repository.instance_paths(series.id, session=session)[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path = settings.spool_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(("body_part", "jobs"), [("ABDOMEN", 0), ("THORAX", 1)])
def test_model_accept_conditions_read_the_series_header(
    session_factory: sessionmaker[Session], two_series: tuple[str, str], settings: Settings,
    clock: Clock, caplog: pytest.LogCaptureFixture, tmp_path: Path, body_part: str, jobs: int,
) -> None:
    ct, _mr = two_series
    weights = tmp_path / "chest.pt"
    weights.write_bytes(b"not read by the node")
    chest = ModelSpec(
        name="chest-net", source="torchscript", path=weights,
        accepts=AcceptSpec(modalities=["CT"], conditions={"BodyPartExamined": "CHEST|THORAX"}),
        labels=[LabelSpec(value=1, label="Lung",
                          type=CodeSpec(value="39607008", meaning="Lung"))],
    )
    settings = settings.model_copy(update={
        "models": [*settings.models, chest]})
    settings = _rules(settings, {"name": "chest", "models": ["chest-net"]})
    _spool_file(settings, session_factory, ct, BodyPartExamined=body_part)
    clock.at(6)
    with caplog.at_level("INFO", logger="radnode.scheduler"):
        assert scheduler.complete_and_route(settings, session_factory) == jobs
    assert [j.model_name for j in _jobs(session_factory)] == ["chest-net"] * jobs
    if not jobs:
        assert "chest-net declines it: BodyPartExamined does not match" in caplog.text


def test_time_limits_per_model(settings: Settings, tmp_path: Path) -> None:
    weights = tmp_path / "slow.pt"
    weights.write_bytes(b"x")
    slow = ModelSpec(name="slow", source="torchscript", path=weights, time_limit_s=3600,
                     labels=[LabelSpec(value=1, label="Liver",
                                       type=CodeSpec(value="10200004", meaning="Liver"))])
    settings = settings.model_copy(update={"models": [*settings.models, slow]})
    assert scheduler.time_limits(settings, "slow") == (3600, 3240)
    assert scheduler.time_limits(settings, "radnode-builtin-ct") == (
        settings.worker.time_limit_s, int(settings.worker.time_limit_s * 0.9))


def test_a_job_not_started_is_superseded_when_the_series_completes_again(
    session_factory: sessionmaker[Session], two_series: tuple[str, str], settings: Settings,
    clock: Clock,
) -> None:
    ct, _mr = two_series
    settings = _ct_only(settings)
    clock.at(6)
    assert scheduler.complete_and_route(settings, session_factory) == 1
    assert record(session_factory, series_uid=ct, modality="CT", at=T0 + timedelta(seconds=7))
    clock.at(13)
    assert scheduler.complete_and_route(settings, session_factory) == 1
    first, second = _jobs(session_factory)
    assert (first.state, second.state) == ("superseded", "pending")
    with session_factory() as session:  # a worker that gets the old message drops it
        assert not repository.claim_job(first.id, session=session, now=T0,
                                         stale_before=T0)


def test_restart_gives_interrupted_series_a_fresh_quiet_period(
    session_factory: sessionmaker[Session], two_series: tuple[str, str], settings: Settings,
    clock: Clock,
) -> None:
    with session_factory() as session:
        assert repository.restart_completion_clock(
            session=session, now=T0 + timedelta(seconds=60)) == 2
        session.commit()
    clock.at(62)  # 62 s after the last instance, but 2 s after the restart
    assert scheduler.complete_and_route(settings, session_factory) == 0
    clock.at(66)
    assert scheduler.complete_and_route(settings, session_factory) == 2


def _job_for(factory: sessionmaker[Session], series_uid: str) -> list[Job]:
    series = _series(factory, series_uid)
    return [j for j in _jobs(factory) if j.series_id == series.id]


def test_stat_job_overtakes_routine_jobs_waiting_in_the_database(
    session_factory: sessionmaker[Session], settings: Settings, clock: Clock
) -> None:
    settings = _rules(
        settings,
        {"name": "stat-ae", "when": {"association": "calling_ae", "equals": "ER_CT"},
         "models": ["radnode-builtin-ct"], "priority": "stat"},
        {"name": "ct", "when": {"attribute": "Modality", "equals": "CT"},
         "models": ["radnode-builtin-ct"]},
    )
    settings = settings.model_copy(update={
        "worker": settings.worker.model_copy(update={"queued_ahead": 1})})
    routine = [generate_uid() for _ in range(3)]
    for uid in routine:
        record(session_factory, series_uid=uid, modality="CT", at=T0)
    clock.at(6)
    assert scheduler.complete_and_route(settings, session_factory) == 3
    app = FakeCelery()
    assert scheduler.publish_pending(app, session_factory, settings) == 1  # type: ignore[arg-type]
    first = _job_for(session_factory, routine[0])[0]
    assert app.calls[-1][1] == [first.id]

    stat_uid = generate_uid()  # the emergency scan arrives while routine jobs wait
    record(session_factory, series_uid=stat_uid, modality="CT", at=T0 + timedelta(seconds=7),
           calling_ae="ER_CT")
    clock.at(13)
    assert scheduler.complete_and_route(settings, session_factory) == 1
    (stat_job,) = _job_for(session_factory, stat_uid)
    assert stat_job.priority == "stat"
    assert stat_job.rule_names == "stat-ae,ct"
    # The window is full until a worker starts the queued job.
    assert scheduler.publish_pending(app, session_factory, settings) == 0  # type: ignore[arg-type]
    with session_factory() as session:
        assert repository.claim_job(first.id, session=session, now=T0, stale_before=T0)
        session.commit()
    assert scheduler.publish_pending(app, session_factory, settings) == 1  # type: ignore[arg-type]
    assert app.calls[-1][1] == [stat_job.id]  # ahead of the two older routine jobs


def test_rule_quiet_period_overrides_the_default(
    session_factory: sessionmaker[Session], two_series: tuple[str, str], settings: Settings,
    clock: Clock,
) -> None:
    ct, mr = two_series
    settings = _rules(
        settings,
        {"name": "ct", "when": {"attribute": "Modality", "equals": "CT"},
         "models": ["radnode-builtin-ct"], "quiet_period_s": 20},
        {"name": "mr", "when": {"attribute": "Modality", "equals": "MR"},
         "models": ["radnode-builtin-mr"]},
    )
    clock.at(6)
    assert scheduler.complete_and_route(settings, session_factory) == 1
    assert _series(session_factory, ct).state == "receiving"
    assert _series(session_factory, mr).state == "complete"
    clock.at(21)
    assert scheduler.complete_and_route(settings, session_factory) == 1
    assert _series(session_factory, ct).completion_reason == "quiet_period"


def test_study_scope_waits_for_the_whole_study(
    session_factory: sessionmaker[Session], settings: Settings, clock: Clock
) -> None:
    settings = _rules(settings, {"name": "ct-study", "models": ["radnode-builtin-ct"],
                                 "when": {"attribute": "Modality", "equals": "CT"},
                                 "completion": "study", "quiet_period_s": 10})
    first, second = generate_uid(), generate_uid()
    record(session_factory, series_uid=first, modality="CT", at=T0, study_uid="9.9")
    record(session_factory, series_uid=second, modality="CT", at=T0 + timedelta(seconds=8),
           study_uid="9.9")
    clock.at(11)  # first series quiet for 11 s, but the study only for 3 s
    assert scheduler.complete_and_route(settings, session_factory) == 0
    assert _series(session_factory, first).state == "complete"
    assert _series(session_factory, first).routed_at is None
    clock.at(17)  # the second series completes, the study has been quiet 9 s
    assert scheduler.complete_and_route(settings, session_factory) == 0
    clock.at(19)
    assert scheduler.complete_and_route(settings, session_factory) == 2
    assert len(_job_for(session_factory, first)) == len(_job_for(session_factory, second)) == 1


def test_sender_destination_and_fallback(
    session_factory: sessionmaker[Session], two_series: tuple[str, str], settings: Settings,
    clock: Clock,
) -> None:
    ct, mr = two_series
    settings = load_settings(data_dir=settings.data_dir, destinations=[
        {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104},
        {"name": "ct-console", "ae_title": "CTCONSOLE", "host": "10.0.0.9", "port": 104,
         "sender_ae_titles": ["MODALITY"]},
        {"kind": "folder", "name": "scripts", "path": str(settings.data_dir / "out")},
    ], rules=[{"name": "ct", "when": {"attribute": "Modality", "equals": "CT"},
               "models": ["radnode-builtin-ct"], "destinations": ["sender", "scripts"]}],
        fallback={"models": ["radnode-builtin-mr"]})
    clock.at(6)
    assert scheduler.complete_and_route(settings, session_factory) == 2
    (ct_job,) = _job_for(session_factory, ct)
    assert ct_job.destinations == ["ct-console", "scripts"]
    (mr_job,) = _job_for(session_factory, mr)  # no rule matched: the fallback
    assert (mr_job.model_name, mr_job.rule_names) == ("radnode-builtin-mr", "fallback")
    assert mr_job.destinations == ["pacs", "ct-console", "scripts"]  # omitted = all
