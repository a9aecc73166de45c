"""Production settings: PostgreSQL URLs and pool, Redis broker options, schema checks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from service import queue, scheduler
from service.cli import main
from service.config import Settings, load_settings
from service.db import migrate
from service.db.session import check_connection, describe_url, make_engine, normalize_url
from service.errors import ConfigError
from service.model_spec import ModelSpec
from service.node import DATA_DIR_MARKER, check_shared_data_dir, mark_data_dir


@pytest.mark.parametrize(("given", "expected"), [
    ("postgresql://radnode:pw@db:5432/radnode", "postgresql+psycopg://radnode:pw@db:5432/radnode"),
    ("postgres://radnode@db/radnode", "postgresql+psycopg://radnode@db/radnode"),
    ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
    ("sqlite:////var/lib/radnode/radnode.db", "sqlite:////var/lib/radnode/radnode.db"),
])
def test_plain_postgres_urls_run_on_psycopg3(given: str, expected: str) -> None:
    assert normalize_url(given) == expected
    assert Settings(database={"url": given}).database_url == expected


def test_describe_url_hides_the_password() -> None:
    described = describe_url("postgresql://radnode:s3cret-pw@db:5432/radnode")
    assert "s3cret-pw" not in described
    assert described == "postgresql+psycopg://radnode:***@db:5432/radnode"


def test_pool_is_sized_for_the_association_threads() -> None:
    assert Settings(dicom={"max_associations": 16}).database_pool_size == 20
    assert Settings(dicom={"max_associations": 40}).database_pool_size == 44
    assert Settings(database={"pool_size": 7}).database_pool_size == 7


def test_postgres_engine_gets_the_pool(postgres_url: str) -> None:
    engine = make_engine(postgres_url, pool_size=9, pool_timeout_s=3)
    try:
        check_connection(engine)
        assert engine.dialect.driver == "psycopg"
        assert engine.pool.size() == 9  # type: ignore[attr-defined]
        assert engine.pool._max_overflow == 9  # type: ignore[attr-defined]
        with engine.connect() as connection:
            assert connection.execute(text("select 1")).scalar() == 1
    finally:
        engine.dispose()


def test_unreachable_database_is_named_without_its_password() -> None:
    engine = make_engine("postgresql://radnode:s3cret@127.0.0.1:1/radnode")
    with pytest.raises(ConfigError) as caught:
        check_connection(engine)
    message = str(caught.value)
    assert "cannot reach the database at postgresql+psycopg://radnode:***@127.0.0.1:1/radnode" \
        in message
    assert "s3cret" not in message
    assert "refused" in message.lower()


def test_a_driver_that_is_not_installed_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="database.url"):
        make_engine("mysql+nosuchdriver://u@h/d")


def test_broker_url_must_be_redis(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("broker:\n  url: http://redis:6379/0\n")
    with pytest.raises(ConfigError, match=r"broker.url.*redis://HOST:PORT/DB"):
        load_settings(config)
    assert Settings(broker={"url": "rediss://redis:6380/0"}).broker.url.startswith("rediss")
    with pytest.raises(ValueError, match="key_prefix"):
        Settings(broker={"url": "redis://r/0", "key_prefix": "has space"})


def test_redis_options_priorities_prefix_and_visibility() -> None:
    settings = Settings(broker={"url": "redis://127.0.0.1:6379/3", "key_prefix": "site-a:"},
                        worker={"time_limit_s": 900})
    url, options = queue.broker_options(settings)
    assert url == "redis://127.0.0.1:6379/3"
    assert options["global_keyprefix"] == "site-a:"
    assert options["visibility_timeout"] == 900 * 2 + 60  # longer than the longest job
    assert options["priority_steps"] == [queue.PRIORITY_STAT, queue.PRIORITY_ROUTINE]
    assert options["queue_order_strategy"] == "priority"
    _, plain = queue.broker_options(Settings(broker={"url": "redis://r/0"}))
    assert "global_keyprefix" not in plain


def test_celery_declares_its_queues_and_long_job_settings() -> None:
    light = ModelSpec(name="radnode-builtin-mr", source="builtin", version="1.0.0",
                      queue="small-cpu")
    settings = Settings(broker={"url": "redis://r/0"}, models=[light])
    app = queue.make_celery(settings)
    names = {q.name for q in app.conf.task_queues}
    assert {"gpu", "cpu", "small-cpu"} <= names
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.accept_content == ["json"] and app.conf.task_serializer == "json"


class _RecordingApp:
    """Stands in for Celery: records what would be published."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, **kwargs: Any) -> None:
        self.sent.append({"name": name, **kwargs})


def test_stat_jobs_get_the_top_broker_priority() -> None:
    app = _RecordingApp()
    queue.publish(app, task_name="t", queue="gpu", job_id=1, stat=True)  # type: ignore[arg-type]
    queue.publish(app, task_name="t", queue="gpu", job_id=2,  # type: ignore[arg-type]
                  time_limits=(100, 90))
    assert app.sent[0]["priority"] == queue.PRIORITY_STAT < queue.PRIORITY_ROUTINE
    assert app.sent[1]["priority"] == queue.PRIORITY_ROUTINE
    assert (app.sent[1]["time_limit"], app.sent[1]["soft_time_limit"]) == (100, 90)


def test_embedded_worker_queues() -> None:
    models = [ModelSpec(name="radnode-builtin-mr", source="builtin", version="1.0.0", queue="cpu")]
    assert Settings(models=models).embedded_worker_queues == ["cpu", "gpu"]
    on_node = Settings(models=models, broker={"embedded_worker_queues": ["cpu"]})
    assert on_node.embedded_worker_queues == ["cpu"]


def test_broker_down_is_said_once_then_reminded(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    app = queue.make_celery(Settings(broker={"url": "redis://:pw@127.0.0.1:1/0"}))
    state = scheduler._BrokerState()
    clock = [1000.0]
    monkeypatch.setattr(scheduler, "monotonic", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="radnode.scheduler")
    for _ in range(100):  # 50 s of ticks
        state.failed(app, ConnectionRefusedError("Connection refused"))
        clock[0] += 0.5
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "cannot reach the broker at redis://:**@127.0.0.1:1/0" in messages[0]
    assert "pw" not in messages[0].replace("published", "")
    clock[0] += 15
    state.failed(app, ConnectionRefusedError("Connection refused"))
    assert "still unreachable after 65 s" in caplog.records[-1].getMessage()
    state.succeeded()
    assert "reachable again" in caplog.records[-1].getMessage()
    assert state.down_since is None


def test_require_head_names_the_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'radnode.db'}"
    with pytest.raises(ConfigError, match=r"revision \(empty\).*radnode db upgrade"):
        migrate.require_head(url)
    assert not (tmp_path / "db" / "radnode.db").exists()  # asking created nothing
    migrate.upgrade(url, "0004")
    with pytest.raises(ConfigError, match=f"revision 0004, this radnode needs "
                                          f"{migrate.head_revision()}"):
        migrate.require_head(url)
    migrate.upgrade(url)
    migrate.require_head(url)
    assert migrate.current_revision(url) == migrate.head_revision()


def test_require_head_on_postgres(postgres_url: str) -> None:
    with pytest.raises(ConfigError, match="radnode db upgrade"):
        migrate.require_head(postgres_url)
    migrate.upgrade(postgres_url)
    migrate.require_head(postgres_url)


def test_shared_data_dir_marker(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not the node's data directory.*same path"):
        check_shared_data_dir(tmp_path)
    mark_data_dir(tmp_path)
    assert (tmp_path / DATA_DIR_MARKER).is_file()
    check_shared_data_dir(tmp_path)


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "0,1", "--concurrency", "2"], "one worker process per GPU"),
    (["--gpus", "0;rm"], "is not a GPU index or UUID"),
])
def test_worker_gpu_options_are_checked(args: list[str], message: str) -> None:
    run = CliRunner().invoke(main, ["worker", *args])
    assert run.exit_code == 2
    assert message in run.output


def test_worker_refuses_an_old_schema(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    mark_data_dir(data)
    migrate.upgrade(f"sqlite:///{data / 'radnode.db'}", "0005")
    run = CliRunner().invoke(main, ["worker"], env={"RADNODE_DATA_DIR": str(data)})
    assert run.exit_code == 1
    assert "revision 0005" in run.output and "radnode db upgrade" in run.output


def test_commitment_reports_must_reach_an_allowed_ae_title() -> None:
    pacs = {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104,
            "storage_commitment": True}
    with pytest.raises(ValueError, match=r"delivery.ae_title RADNODE_SCU is not in dicom.aes"):
        Settings(destinations=[pacs], delivery={"ae_title": "RADNODE_SCU"},
                 dicom={"ae_title": "RADNODE", "aes": [{"ae_title": "RADNODE"}]})
    ok = Settings(destinations=[pacs], delivery={"ae_title": "radnode"},
                  dicom={"ae_title": "RADNODE", "aes": [{"ae_title": "RADNODE"}]})
    assert ok.delivery.ae_title == "radnode"  # compared without regard to case
    Settings(destinations=[pacs], delivery={"ae_title": "RADNODE_SCU"})  # no policy: open
