"""Typed settings for the node and its workers.

One :class:`Settings` object is built in each entry point. Values come, from
highest to lowest precedence, from command-line flags, environment variables
(prefix ``RADNODE_``, nested keys joined with ``__``, e.g.
``RADNODE_DICOM__PORT=11112``), the YAML file given with ``--config`` and the
defaults below. Every key is documented in README.md ("Configuration").
"""

from __future__ import annotations

import contextvars
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from service.errors import ConfigError
from service.model_spec import BUILTIN_MODELS, ModelSpec, builtin_spec, default_models

#: DICOM PS3.5 6.2: AE title, 1-16 characters of the default repertoire, no
#: backslash or control characters; leading/trailing spaces are not significant.
AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")

_yaml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "radnode_yaml_file", default=None
)


def validate_ae_title(value: str) -> str:
    """Return a stripped AE title, or raise ``ValueError`` (DICOM PS3.5 6.2, VR AE)."""
    stripped = value.strip()
    if not stripped or not AE_TITLE_RE.match(stripped):
        raise ValueError(
            f"AE title {value!r} is invalid: 1-16 printable ASCII characters, no backslash"
        )
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Destination(_Section):
    """A DICOM C-STORE peer that receives results (usually the PACS).

    Attributes
    ----------
    name : str
        Name used in logs and the database; defaults to the AE title.
    ae_title : str
        The peer's (called) AE title.
    host : str
        Host name or IP address.
    port : int
        TCP port, 1-65535.
    """

    name: str = ""
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    #: Also send a Secondary Capture series with the segment contours burned
    #: in over the source slices, for viewers that cannot show SEG. Labelled
    #: as derived and not for primary diagnosis.
    secondary_capture: bool = False

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return validate_ae_title(value)

    @model_validator(mode="after")
    def _default_name(self) -> Destination:
        if not self.name:
            self.name = self.ae_title
        return self

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@HOST:PORT`` (as given to ``--destination`` and ``--to``).

        Raises
        ------
        ConfigError
            If the text is not of that form or a part is invalid.
        """
        match = re.fullmatch(
            r"(?P<aet>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d+)", text.strip()
        )
        if not match:
            raise ConfigError(f"{text!r} is not of the form AET@HOST:PORT, e.g. PACS@10.0.0.5:104")
        try:
            return cls(ae_title=match["aet"], host=match["host"].strip("[]"),
                       port=int(match["port"]))
        except ValueError as exc:
            raise ConfigError(f"{text!r}: {exc}") from exc

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


class DicomSettings(_Section):
    """The node's DICOM SCP (C-ECHO, C-STORE)."""

    ae_title: str = "RADNODE"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    max_associations: int = Field(default=16, ge=1)
    #: Largest PDU the node accepts, bytes; 0 means no limit (DICOM PS3.8 9.3.1).
    max_pdu_size: int = Field(default=262144, ge=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    #: On SIGTERM: stop accepting associations, let those in flight finish for
    #: at most this long, then abort them.
    drain_timeout_s: float = Field(default=30.0, ge=0)

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return validate_ae_title(value)


class StorageSettings(_Section):
    """The spool's disk."""

    #: Below this much free space (MiB) on the spool's file system new
    #: instances are refused with 0xA700 (Out of Resources).
    min_free_mb: int = Field(default=1024, ge=0)


class CompletionSettings(_Section):
    """When a series counts as complete (the first signal that fires wins).

    * ``expected_count``: as many instances as Images in Acquisition (0020,1002) says;
    * ``association_released``: the sending association was released and no
      instance came for ``release_quiet_s``;
    * ``quiet_period``: no new instance for ``quiet_period_s``;
    * ``force_timeout``: still receiving ``max_wait_s`` after the first instance.
    """

    #: Seconds with no new instance after which a series is complete.
    quiet_period_s: float = Field(default=5.0, gt=0)
    #: Shorter quiet period once the association that sent the series was
    #: released; 0 turns this signal off (senders that open one association
    #: per instance).
    release_quiet_s: float = Field(default=1.0, ge=0)
    #: Complete as soon as the instance count reaches Images in Acquisition.
    use_expected_count: bool = True
    #: Complete a series still receiving this long after its first instance.
    max_wait_s: float = Field(default=1800.0, gt=0)
    #: How often the node looks for complete series and due deliveries, seconds.
    check_interval_s: float = Field(default=0.5, gt=0)


class RetentionSettings(_Section):
    """When received instances leave the spool (their database rows stay)."""

    #: Hours after the last result of a series was delivered; 0 = never.
    after_delivery_h: float = Field(default=24.0, ge=0)
    #: Days after the last instance for series whose results were not (all)
    #: delivered or that no pipeline analyses; 0 = never.
    max_age_days: float = Field(default=30.0, ge=0)
    #: How often retention runs, seconds.
    check_interval_s: float = Field(default=300.0, gt=0)


class Pipeline(_Section):
    """Which series are analysed, by which model, on which queue.

    A completed series is analysed by every pipeline whose modality matches
    and whose model accepts it (``models[].accepts``). Series that match none
    are stored and not analysed.
    """

    #: Modality (0008,0060) this pipeline takes; empty: what the model accepts.
    modality: str = ""
    model: str = "radnode-builtin-ct"
    task: str = "radnode.analyse_series"
    queue: str = "gpu"


class DatabaseSettings(_Section):
    """Where the node keeps its state."""

    #: SQLAlchemy URL; empty means SQLite at ``<data_dir>/radnode.db``.
    url: str = ""
    #: Run Alembic migrations when ``radnode serve`` starts.
    auto_upgrade: bool = True


class BrokerSettings(_Section):
    """The Celery broker that carries "run job N" messages."""

    #: Celery broker URL (e.g. ``redis://127.0.0.1:6379/0``); empty means the
    #: embedded file-system broker under ``<data_dir>/broker``.
    url: str = ""
    #: Start a Celery worker process next to the node (``radnode serve``).
    embedded_worker: bool = True


class WorkerSettings(_Section):
    """Celery workers that run models and encode SEG/SR."""

    #: torch device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda:0``.
    device: str = "auto"
    queues: list[str] = Field(default_factory=lambda: ["gpu"])
    concurrency: int = Field(default=1, ge=1)
    #: Hard time limit of one analysis, seconds; the job fails after it.
    time_limit_s: int = Field(default=900, ge=10)
    #: How often a running job renews its lease, seconds.
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    #: A running job whose lease is older than this lost its worker: it is
    #: queued again (same result UIDs) or failed after ``max_attempts``.
    heartbeat_timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    #: Models each worker process keeps loaded (least recently used leave first).
    max_warm_models: int = Field(default=4, ge=1)
    #: Before loading a model onto a GPU, unload least recently used models
    #: until at least this much GPU memory (MiB) is free.
    min_free_gpu_mb: int = Field(default=2048, ge=0)
    #: Load every pipeline's model when a worker process starts (not on the
    #: first job); at most ``max_warm_models``.
    warm_up: bool = True
    #: A queued job not started after this long is published again (its
    #: broker message may be lost); duplicates are dropped by the worker.
    republish_after_s: float = Field(default=300.0, gt=0)


class DeliverySettings(_Section):
    """How results are sent to destinations."""

    #: AE title radnode uses as the calling AE when it sends results.
    ae_title: str = "RADNODE"
    max_attempts: int = Field(default=5, ge=1)
    #: First retry delay, seconds; doubles after each failure.
    retry_backoff_s: float = Field(default=10.0, gt=0)
    #: Longest wait for one C-STORE response, seconds; on expiry the
    #: association is aborted and the instance is sent again on a new one.
    response_timeout_s: float = Field(default=15.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return validate_ae_title(value)


class Settings(BaseSettings):
    """All of radnode's settings.

    Raises
    ------
    pydantic.ValidationError
        On a wrong type, an out-of-range value or an unknown key.
    """

    model_config = SettingsConfigDict(
        env_prefix="RADNODE_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path = Path("radnode-data")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    destinations: list[Destination] = Field(default_factory=list)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    models: list[ModelSpec] = Field(default_factory=default_models)
    pipelines: list[Pipeline] = Field(default_factory=lambda: [
        Pipeline(model=name) for name in BUILTIN_MODELS])
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)

    @field_validator("destinations", mode="before")
    @classmethod
    def _destination_strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [Destination.parse(v) if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _check_models(self) -> Settings:
        names = [spec.name for spec in self.models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"models: each name once; repeated: {', '.join(repeated)}")
        for name in BUILTIN_MODELS:  # built-ins are always available
            if name not in names:
                self.models.append(builtin_spec(name))
        known = {spec.name for spec in self.models}
        for i, pipeline in enumerate(self.pipelines):
            if pipeline.model not in known:
                raise ValueError(f"pipelines[{i}]: model {pipeline.model!r} is not declared "
                                 f"under models (declared: {', '.join(sorted(known))})")
        return self

    def model(self, name: str) -> ModelSpec:
        """The declaration of model ``name``.

        Raises
        ------
        KeyError
            If no model of that name is declared.
        """
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(f"no model named {name!r} is declared")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags, then environment, then the YAML file, then defaults."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_file.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    # -- derived values -------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        """Where received instances are kept: ``<data_dir>/spool``."""
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        """Where encoded SEG and SR objects are kept: ``<data_dir>/results``."""
        return self.data_dir / "results"

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL in use (SQLite under ``data_dir`` by default)."""
        return self.database.url or f"sqlite:///{(self.data_dir / 'radnode.db').resolve()}"

    @property
    def embedded_broker(self) -> bool:
        """True when no broker URL is set and the file-system broker is used."""
        return not self.broker.url


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from flags (``overrides``), environment and YAML file.

    Parameters
    ----------
    config_file : pathlib.Path, optional
        A YAML file whose keys mirror :class:`Settings`.
    **overrides
        Values from command-line flags; ``None`` values are ignored.

    Raises
    ------
    ConfigError
        If the file is missing or not valid YAML, or a value is invalid; the
        message names the key.
    """
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        try:
            content = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_file} is not valid YAML: {exc}") from exc
        if content is not None and not isinstance(content, dict):
            raise ConfigError(f"{config_file}: the top level must be a mapping of keys")
    token = _yaml_file.set(config_file)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        where = f" in {config_file}" if config_file else ""
        raise ConfigError(f"invalid configuration{where}:\n{exc}") from exc
    finally:
        _yaml_file.reset(token)


def dump_settings(settings: Settings, path: Path) -> None:
    """Write the effective settings as YAML (used to hand them to a worker process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = settings.model_dump(mode="json")
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
