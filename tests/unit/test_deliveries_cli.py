"""``radnode deliveries list|resend|retry`` on a real SQLite database."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from pydicom.uid import generate_uid
from sqlalchemy import select

from service.cli import main
from service.db import migrate
from service.db.models import Delivery, Job, Result, Series
from service.db.session import make_engine, make_session_factory, utcnow

STUDY = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    path = tmp_path / "radnode.yaml"
    path.write_text(yaml.safe_dump({
        "data_dir": str(data),
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {"kind": "folder", "name": "scripts", "path": str(tmp_path)},
        ]}), encoding="utf-8")
    url = f"sqlite:///{(data / 'radnode.db').resolve()}"
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    now = utcnow()
    with factory() as session:
        series = Series(series_instance_uid=generate_uid(), study_instance_uid=STUDY,
                        modality="CT", state="complete", instance_count=3,
                        first_received_at=now, last_received_at=now, routed_at=now)
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, task_name="radnode.analyse_series", queue="gpu",
                  model_name="radnode-builtin-ct", state="succeeded", destinations=["pacs"],
                  created_at=now)
        session.add(job)
        session.flush()
        for kind, state in (("SEG", "failed"), ("SR", "sent")):
            result = Result(job_id=job.id, kind=kind, sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                            sop_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
                            path=str(tmp_path / f"{kind}.dcm"), created_at=now)
            session.add(result)
            session.flush()
            session.add(Delivery(result_id=result.id, destination="pacs", state=state,
                                 attempts=5, status=0xA700, error="Out of Resources",
                                 created_at=now, next_attempt_at=now))
        session.commit()
    return path


def _rows(config: Path) -> list[tuple[str, str, str, int]]:
    data = yaml.safe_load(config.read_text())["data_dir"]
    factory = make_session_factory(make_engine(f"sqlite:///{Path(data) / 'radnode.db'}"))
    with factory() as session:
        return [(d.result.kind, d.destination, d.state, d.attempts)
                for d in session.scalars(select(Delivery).order_by(Delivery.id))]


def test_list_shows_states_and_errors(config: Path) -> None:
    run = CliRunner().invoke(main, ["deliveries", "list", "--config", str(config)],
                             env={"COLUMNS": "250"})
    assert run.exit_code == 0, run.output
    assert "failed" in run.output and "sent" in run.output
    assert "Out of Resources" in run.output and "0xA700" in run.output
    only = CliRunner().invoke(main, ["deliveries", "list", "--config", str(config),
                                     "--state", "failed"], env={"COLUMNS": "250"})
    assert "SEG" in only.output and "SR " not in only.output


def test_retry_schedules_failed_deliveries_only(config: Path) -> None:
    run = CliRunner().invoke(main, ["deliveries", "retry", "--config", str(config)])
    assert run.exit_code == 0, run.output
    assert "1 failed delivery scheduled again" in run.output
    assert _rows(config) == [("SEG", "pacs", "pending", 0), ("SR", "pacs", "sent", 5)]


def test_resend_a_study_to_a_new_destination(config: Path) -> None:
    run = CliRunner().invoke(main, ["deliveries", "resend", "--config", str(config),
                                    "--study", STUDY, "--to", "scripts"])
    assert run.exit_code == 0, run.output
    assert "2 deliveries scheduled" in run.output
    assert sorted(_rows(config)) == sorted([
        ("SEG", "pacs", "failed", 5), ("SR", "pacs", "sent", 5),
        ("SEG", "scripts", "pending", 0), ("SR", "scripts", "pending", 0)])


def test_resend_by_id_and_refusals(config: Path) -> None:
    run = CliRunner().invoke(main, ["deliveries", "resend", "--config", str(config), "2"])
    assert run.exit_code == 0, run.output
    assert _rows(config)[1] == ("SR", "pacs", "pending", 0)
    unknown = CliRunner().invoke(main, ["deliveries", "resend", "--config", str(config), "99"])
    assert unknown.exit_code != 0 and "no delivery with id 99" in unknown.output
    nowhere = CliRunner().invoke(main, ["deliveries", "resend", "--config", str(config),
                                        "--study", STUDY, "--to", "nowhere"])
    assert nowhere.exit_code != 0 and "no destination named 'nowhere'" in nowhere.output
