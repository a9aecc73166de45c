"""Typed settings for the node and its workers.

One :class:`Settings` object is built in each entry point. Values come, from
highest to lowest precedence, from command-line flags, environment variables
(prefix ``RADNODE_``, nested keys joined with ``__``, e.g.
``RADNODE_DICOM__PORT=11112``), the YAML file given with ``--config`` and the
defaults below. Every key is documented in README.md ("Configuration").
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from service.db.session import normalize_url
from service.errors import ConfigError
from service.model_spec import BUILTIN_MODELS, ModelSpec, builtin_spec, default_models
from service.routing import Fallback, Rule, default_rules, validate_rules

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


class TlsSettings(_Section):
    """TLS for a DICOM association (DICOM PS3.15 B.1, "Basic TLS Secure Transport").

    Attributes
    ----------
    ca_file : pathlib.Path or None
        PEM file of the certificate authorities that sign the peer's
        certificate; None uses the system's trust store.
    cert_file, key_file : pathlib.Path or None
        radnode's own certificate and private key (PEM), for peers that ask
        for client authentication.
    check_hostname : bool
        Check that the peer's certificate names ``host``.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True


class DeidOptions(_Section):
    """De-identification of what a destination receives (DICOM PS3.15 E.1, Basic Profile).

    ``deidentify: true`` on a destination means these defaults; give a mapping
    to change them. See docs/deidentification.md.

    Attributes
    ----------
    retain_longitudinal : str
        Retain Longitudinal Temporal Information option (PS3.15 E.3.6):
        ``off`` (dates and times are emptied or replaced as the Basic Profile
        says), ``full`` (Full Dates Option: kept as they are) or ``modified``
        (Modified Dates Option: every date shifted by a random number of days
        that is the same for all data of one patient).
    clean_descriptors : bool
        Clean Descriptors option (PS3.15 E.3.5): keep Study/Series
        Description, Protocol Name, comments and other descriptors, with any
        of the data set's own identifying values removed from them, instead
        of removing them.
    patient_id_prefix : str
        Start of the pseudonym that replaces Patient ID and Patient's Name.
    scope : str
        Name of the pseudonym mapping to use; empty means the destination's
        name. Destinations with the same scope see the same pseudonyms.
    """

    retain_longitudinal: Literal["off", "full", "modified"] = "off"
    clean_descriptors: bool = False
    patient_id_prefix: str = Field(default="ANON-", max_length=24,
                                   pattern=r"^[A-Za-z0-9._-]*$")
    scope: str = Field(default="", max_length=64)


class Destination(_Section):
    """A DICOM C-STORE peer that receives results (usually the PACS).

    Attributes
    ----------
    kind : str
        ``dicom`` (the default when ``kind`` is left out).
    name : str
        Name used in rules, logs and the database; defaults to the AE title.
    ae_title : str
        The peer's (called) AE title.
    host : str
        Host name or IP address.
    port : int
        TCP port, 1-65535.
    tls : TlsSettings or None
        Use TLS on the association.
    storage_commitment : bool
        Ask the peer for Storage Commitment (Push Model, DICOM PS3.4 J) after
        sending; deliveries count as committed only when it confirms.
    sender_ae_titles : list[str]
        Calling AE titles for which this peer is "the sender": a rule whose
        destinations include ``sender`` returns results here for series
        received from these AE titles (the peer's own AE title always counts).
    secondary_capture : bool
        Also send a Secondary Capture series with the segment contours burned
        in over the source slices, for viewers that cannot show SEG. Labelled
        as derived and not for primary diagnosis.
    deidentify : bool or DeidOptions
        De-identify every object before it is sent here (DICOM PS3.15 E.1);
        ``true`` for the default :class:`DeidOptions`.
    """

    kind: Literal["dicom"] = "dicom"
    name: str = ""
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TlsSettings | None = None
    storage_commitment: bool = False
    sender_ae_titles: list[str] = Field(default_factory=list)
    secondary_capture: bool = False
    deidentify: bool | DeidOptions = False

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return validate_ae_title(value)

    @field_validator("sender_ae_titles")
    @classmethod
    def _check_senders(cls, value: list[str]) -> list[str]:
        return [validate_ae_title(v) for v in value]

    @model_validator(mode="after")
    def _default_name(self) -> Destination:
        if not self.name:
            self.name = self.ae_title
        return self

    def is_sender(self, calling_ae_title: str) -> bool:
        """True if results of series sent by ``calling_ae_title`` return to this peer.

        AE titles are compared without regard to case, as the routing rules do.
        """
        calling = calling_ae_title.strip().upper()
        return bool(calling) and calling in {self.ae_title.upper(),
                                             *(t.upper() for t in self.sender_ae_titles)}

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


class StowDestination(_Section):
    """A DICOMweb server that receives results with STOW-RS (DICOM PS3.18 10.5).

    Attributes
    ----------
    name : str
        Name used in rules, logs and the database (required).
    url : str
        The DICOMweb service root, e.g. ``https://pacs.example.org/dicom-web``;
        instances are POSTed to ``<url>/studies``.
    username, password : str or None
        HTTP basic authentication.
    token : str or None
        HTTP bearer token (instead of basic authentication).
    ca_file : pathlib.Path or None
        PEM file of the certificate authorities for ``https`` URLs; None uses
        the system's trust store.
    timeout_s : float
        Longest wait for the server's answer, seconds.
    secondary_capture : bool
        As for :class:`Destination`.
    deidentify : bool or DeidOptions
        As for :class:`Destination`.
    """

    kind: Literal["stow"]
    name: str = Field(min_length=1, max_length=64)
    url: str = Field(pattern=r"^https?://\S+$")
    username: str | None = None
    password: str | None = None
    token: str | None = None
    ca_file: Path | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    secondary_capture: bool = False
    deidentify: bool | DeidOptions = False

    def __str__(self) -> str:
        return f"STOW-RS {self.url}"


class FolderDestination(_Section):
    """A folder that receives result files, for integration with scripts.

    Files are written as ``<path>/<Study Instance UID>/<Series Instance
    UID>/<SOP Instance UID>.dcm`` (temporary file, fsync, atomic rename), so a
    script watching the folder never sees a partial file.
    """

    kind: Literal["folder"]
    name: str = Field(min_length=1, max_length=64)
    path: Path
    secondary_capture: bool = False
    #: De-identify every object before it is written (as for :class:`Destination`).
    deidentify: bool | DeidOptions = False

    def __str__(self) -> str:
        return f"folder {self.path}"


#: Any destination; YAML entries without ``kind`` are DICOM C-STORE peers.
AnyDestination = Annotated[
    Destination | StowDestination | FolderDestination, Field(discriminator="kind")
]


class ScpTlsSettings(_Section):
    """The SCP's TLS listener (DICOM PS3.15 B.9, BCP 195 TLS Secure Transport).

    It runs beside the plain listener (``dicom.port``), on the same host
    address, with the same AE titles, policy and handlers. TLS 1.2 is the
    oldest version accepted.

    Attributes
    ----------
    port : int
        TCP port; 2762 is the port IANA registered for DICOM over TLS.
    cert_file, key_file : pathlib.Path
        The node's certificate (PEM, may carry the intermediate CAs after it)
        and its private key (PEM, unencrypted).
    ca_file : pathlib.Path or None
        PEM bundle of the CAs whose client certificates are accepted. Without
        it, client certificates are not asked for.
    require_client_cert : bool
        Refuse a peer that presents no certificate signed by ``ca_file``
        (mutual TLS). With ``ca_file`` and ``false``, a peer may present no
        certificate, but one it presents must verify.
    """

    port: int = Field(default=2762, ge=1, le=65535)
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _client_ca(self) -> ScpTlsSettings:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("dicom.tls.require_client_cert needs dicom.tls.ca_file, the CAs "
                             "that sign the client certificates")
        return self


class AePolicy(_Section):
    """One AE title the node answers to, and who may call it.

    Attributes
    ----------
    ae_title : str
        A Called AE Title the node accepts (routing rules can tell them apart
        with ``association: called_ae``).
    calling_ae_titles : list[str]
        Calling AE Titles allowed to call it; empty: any.
    peer_addresses : list[str]
        IP addresses or networks (CIDR, IPv4 or IPv6) allowed to call it;
        empty: any.
    """

    ae_title: str
    calling_ae_titles: list[str] = Field(default_factory=list)
    peer_addresses: list[str] = Field(default_factory=list)

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return validate_ae_title(value)

    @field_validator("calling_ae_titles")
    @classmethod
    def _check_callers(cls, value: list[str]) -> list[str]:
        return [validate_ae_title(v) for v in value]

    @field_validator("peer_addresses")
    @classmethod
    def _check_addresses(cls, value: list[str]) -> list[str]:
        checked = []
        for text in value:
            try:
                checked.append(str(ipaddress.ip_network(text.strip())))
            except ValueError:
                try:
                    loose = ipaddress.ip_network(text.strip(), strict=False)
                except ValueError:
                    raise ValueError(
                        f"{text!r} is not an IP address or network (CIDR)") from None
                raise ValueError(f"{text!r} has host bits set: did you mean {loose}?") from None
        return checked


class DicomSettings(_Section):
    """The node's DICOM SCP (C-ECHO, C-STORE), its listeners and association policy.

    With ``aes`` empty any peer may associate with any Called AE Title (the
    node logs a warning at start). AE titles compare without their leading and
    trailing spaces (DICOM PS3.5 6.2) and, unless ``ae_title_case_sensitive``,
    without regard to case, as routing rules compare them.
    """

    ae_title: str = "RADNODE"
    host: str = "0.0.0.0"
    #: The plain (unencrypted) listener; null: none (only ``tls``).
    port: int | None = Field(default=11112, ge=1, le=65535)
    #: A TLS listener beside the plain one.
    tls: ScpTlsSettings | None = None
    #: The AE titles the node answers to and who may call each; empty: open.
    aes: list[AePolicy] = Field(default_factory=list)
    ae_title_case_sensitive: bool = False
    max_associations: int = Field(default=16, ge=1)
    #: Associations one peer (IP address) may hold at once; null: no cap
    #: other than ``max_associations``. Connections of that peer that have not
    #: yet sent an association request are capped at the same number.
    max_associations_per_peer: int | None = Field(default=None, ge=1)
    #: Largest PDU the node accepts, bytes; 0 means no limit (DICOM PS3.8 9.3.1).
    max_pdu_size: int = Field(default=262144, ge=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    #: On SIGTERM: stop accepting associations, let those in flight finish for
    #: at most this long, then abort them.
    drain_timeout_s: float = Field(default=30.0, ge=0)
    #: SCP processes that serve associations (:mod:`service.scp.pool`): 1 serves
    #: them in the node's own process; N > 1 starts N child processes behind the
    #: node's listeners, so that several senders at once use several CPU cores;
    #: 0 means one per CPU core.
    processes: int = Field(default=1, ge=0)

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return validate_ae_title(value)

    @model_validator(mode="after")
    def _check_listeners(self) -> DicomSettings:
        if self.port is None and self.tls is None:
            raise ValueError("dicom.port is null and dicom.tls is not set: the node would not "
                             "listen at all")
        if self.tls is not None and self.tls.port == self.port:
            raise ValueError(f"dicom.tls.port and dicom.port are both {self.port}")
        if self.aes:
            titles = [self.ae_key(a.ae_title) for a in self.aes]
            duplicates = sorted({t for t in titles if titles.count(t) > 1})
            if duplicates:
                raise ValueError(f"dicom.aes lists {', '.join(duplicates)} more than once")
            if self.ae_key(self.ae_title) not in titles:
                raise ValueError(f"dicom.ae_title {self.ae_title} is not in dicom.aes: list it "
                                 "(with the peers allowed to call it), or the node would "
                                 "refuse associations to its own AE title")
        return self

    def ae_key(self, ae_title: str) -> str:
        """``ae_title`` as the node compares it: stripped, casefolded unless case-sensitive."""
        stripped = ae_title.strip()
        return stripped if self.ae_title_case_sensitive else stripped.casefold()


class StorageSettings(_Section):
    """The spool's disk."""

    #: Below this much free space (MiB) on the spool's file system new
    #: instances are refused with 0xA700 (Out of Resources).
    min_free_mb: int = Field(default=1024, ge=0)
    #: SQLite: a received instance's file is fsynced with a mark (an extended
    #: attribute) that records it, and a thread inserts and flushes its database
    #: row with those of the next 50 ms, so that each C-STORE waits for one flush
    #: of the disk instead of two and for no database statement; after a crash or a
    #: power cut the node records again, from their marks, the instances whose rows
    #: were lost (:mod:`service.scp.durability`). False: each row is committed and
    #: flushed before Success. Ignored on PostgreSQL.
    batched_row_flush: bool = True
    #: How long a row waits at most for its batch's insert and flush (``batched_row_flush``),
    #: milliseconds. Longer: fewer background flushes, more instances to record
    #: again after a power cut.
    row_flush_interval_ms: int = Field(default=50, ge=1, le=600_000)


class HttpTlsSettings(_Section):
    """HTTPS served by radnode itself (uvicorn); both files or neither.

    Attributes
    ----------
    cert_file : pathlib.Path or None
        PEM certificate chain of the server.
    key_file : pathlib.Path or None
        PEM private key of that certificate.
    """

    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> HttpTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("http.tls needs both cert_file and key_file, or neither")
        for path in (self.cert_file, self.key_file):
            if path is not None and not path.is_file():
                raise ValueError(f"http.tls: {path} is not a file")
        return self

    @property
    def enabled(self) -> bool:
        """Whether HTTPS is configured."""
        return self.cert_file is not None


class HttpSettings(_Section):
    """The HTTP API, dashboard and Prometheus metrics served by ``radnode serve``.

    Every route but ``/healthz`` needs an API token or a dashboard login
    (users and tokens live in the database: ``radnode users``, ``radnode
    tokens``; docs/http-security.md).
    """

    enabled: bool = True
    #: Loopback by default: expose it (``0.0.0.0``) only with ``tls`` set or
    #: behind a TLS reverse proxy.
    host: str = "127.0.0.1"
    port: int = Field(default=8104, ge=0, le=65535)
    #: ``/metrics`` needs a valid API token (any role); false: open to anyone
    #: who reaches the port.
    metrics_auth: bool = True
    #: A dashboard session ends after this long without a request, minutes.
    session_idle_minutes: float = Field(default=30.0, gt=0)
    #: ... and at the latest this long after the login, hours.
    session_max_hours: float = Field(default=12.0, gt=0)
    #: Addresses of reverse proxies whose X-Forwarded-For/-Proto headers are
    #: believed (client address in the audit trail, https for Secure cookies).
    trusted_proxies: list[str] = Field(default_factory=list)
    tls: HttpTlsSettings = Field(default_factory=HttpTlsSettings)

    @model_validator(mode="before")
    @classmethod
    def _no_config_users(cls, data: Any) -> Any:
        if isinstance(data, dict) and "users" in data:
            raise ValueError("http.users is no longer supported: users and their API tokens "
                             "live in the database; create them with `radnode users add NAME "
                             "--role admin` and `radnode tokens create NAME` "
                             "(docs/http-security.md)")
        return data


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


class DatabaseSettings(_Section):
    """Where the node keeps its state."""

    #: SQLAlchemy URL; empty means SQLite at ``<data_dir>/radnode.db``.
    #: ``postgresql://user:password@host:5432/radnode`` runs on psycopg 3.
    url: str = ""
    #: Run Alembic migrations when ``radnode serve`` starts. Production: false,
    #: and ``radnode db upgrade`` as its own step; the node and the workers
    #: then refuse a database that is not at the newest revision.
    auto_upgrade: bool = True
    #: PostgreSQL connections the node keeps open (as many again may open in
    #: a burst); null: one per SCP association thread (``dicom.max_associations``)
    #: plus 4 for the scheduler, delivery, retention and the HTTP API.
    pool_size: int | None = Field(default=None, ge=1)
    #: Longest wait for a free connection of the pool, seconds.
    pool_timeout_s: float = Field(default=30.0, gt=0)


class BrokerSettings(_Section):
    """The Celery broker that carries "run job N" messages."""

    #: Celery broker URL (e.g. ``redis://127.0.0.1:6379/0``); empty means the
    #: embedded file-system broker under ``<data_dir>/broker``.
    url: str = ""
    #: Start a Celery worker process next to the node (``radnode serve``).
    embedded_worker: bool = True
    #: Queues the embedded worker consumes; null: every queue a model or
    #: ``worker.queues`` names. With GPU workers on other machines, ``[cpu]``
    #: keeps light models on the node and leaves ``gpu`` jobs to the GPUs.
    embedded_worker_queues: list[str] | None = None
    #: Prefix of every key radnode's Celery messages use in Redis, so that
    #: several radnode installations (or other programs) can share one Redis.
    key_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9_.:-]*$")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://")):
            raise ValueError("broker.url must be redis://HOST:PORT/DB (rediss:// with TLS); "
                             "empty for the embedded broker")
        return value


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
    #: Jobs per queue handed to the broker ahead of the workers (published
    #: but not started). The rest wait in the database, STAT before routine,
    #: so a STAT job overtakes every routine job except these. Set it to the
    #: number of worker processes that consume the queue.
    queued_ahead: int = Field(default=2, ge=1)
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
    #: Attempts of one instance that the destination refused (a failure
    #: status, no response); then the delivery is ``failed``. A refusal that
    #: cannot change (SOP class not supported, 0xA9xx/0xCxxx) fails at once.
    max_attempts: int = Field(default=5, ge=1)
    #: First retry delay, seconds; doubles after each failure up to ``max_backoff_s``.
    retry_backoff_s: float = Field(default=10.0, gt=0)
    max_backoff_s: float = Field(default=600.0, gt=0)
    #: A destination that cannot be reached (down, refuses associations) is
    #: tried again with the same backoff, without counting attempts, for
    #: this many hours after the result was made; then its deliveries fail.
    give_up_after_h: float = Field(default=72.0, gt=0)
    #: Wait this long for the Storage Commitment report (N-EVENT-REPORT) of a
    #: destination with ``storage_commitment``; then ask again (at most
    #: ``max_attempts`` times).
    commitment_timeout_s: float = Field(default=600.0, gt=0)
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
    destinations: list[AnyDestination] = Field(default_factory=list)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    models: list[ModelSpec] = Field(default_factory=default_models)
    rules: list[Rule] = Field(default_factory=default_rules)
    fallback: Fallback = Field(default_factory=Fallback)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    http: HttpSettings = Field(default_factory=HttpSettings)

    @field_validator("destinations", mode="before")
    @classmethod
    def _destination_strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [Destination.parse(v) if isinstance(v, str)
                    else {"kind": "dicom", **v} if isinstance(v, dict) and "kind" not in v
                    else v for v in value]
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
        destination_names = [d.name for d in self.destinations]
        repeated = sorted({n for n in destination_names if destination_names.count(n) > 1})
        if repeated:
            raise ValueError(f"destinations: each name once; repeated: {', '.join(repeated)}")
        committing = [d.name for d in self.destinations
                      if getattr(d, "storage_commitment", False)]
        if committing and self.dicom.aes:
            titles = {self.dicom.ae_key(a.ae_title) for a in self.dicom.aes}
            if self.dicom.ae_key(self.delivery.ae_title) not in titles:
                raise ValueError(
                    f"delivery.ae_title {self.delivery.ae_title} is not in dicom.aes, but "
                    f"{', '.join(committing)} sends its Storage Commitment reports to that AE "
                    "title: they would be rejected; list it in dicom.aes (with the PACS as an "
                    "allowed caller)")
        problems = validate_rules(self.rules, self.fallback,
                                  models={spec.name for spec in self.models},
                                  destinations=set(destination_names))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def destination(self, name: str) -> Destination | StowDestination | FolderDestination:
        """The destination called ``name``.

        Raises
        ------
        KeyError
            If no destination of that name is configured.
        """
        for destination in self.destinations:
            if destination.name == name:
                return destination
        raise KeyError(f"no destination named {name!r} is configured")

    def routed_models(self) -> list[str]:
        """Names of the models that the rules and the fallback send series to, in order."""
        names = [m for rule in self.rules for m in rule.models] + list(self.fallback.models)
        return list(dict.fromkeys(names))

    @property
    def config_version(self) -> str:
        """A short digest of what routes and delivers.

        Covers rules, fallback, destinations, models and completion; recorded
        with each job, so that an admin can tell which configuration routed it.
        """
        text = self.model_dump_json(include={"rules", "fallback", "destinations", "models",
                                             "completion"})
        return hashlib.sha256(text.encode()).hexdigest()[:12]

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
        """The SQLAlchemy URL in use (SQLite under ``data_dir`` by default).

        ``postgresql://`` is given as ``postgresql+psycopg://`` (psycopg 3).
        """
        if not self.database.url:
            return f"sqlite:///{(self.data_dir / 'radnode.db').resolve()}"
        return normalize_url(self.database.url)

    @property
    def database_pool_size(self) -> int:
        """PostgreSQL pool size: ``database.pool_size``, or one per association plus 4."""
        return self.database.pool_size or self.dicom.max_associations + 4

    @property
    def embedded_worker_queues(self) -> list[str]:
        """Queues the embedded worker consumes (``broker.embedded_worker_queues``)."""
        if self.broker.embedded_worker_queues is not None:
            return list(self.broker.embedded_worker_queues)
        return sorted({*self.worker.queues, *(m.queue for m in self.models)})

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
    except ValidationError as exc:
        text = config_file.read_text(encoding="utf-8") if config_file is not None else ""
        where = f" in {config_file}" if config_file else ""
        raise ConfigError(f"invalid configuration{where}:\n{explain_errors(exc, text)}") from exc
    except ValueError as exc:
        where = f" in {config_file}" if config_file else ""
        raise ConfigError(f"invalid configuration{where}:\n{exc}") from exc
    finally:
        _yaml_file.reset(token)


def _yaml_lines(text: str) -> dict[tuple[str | int, ...], int]:
    """Line (1-based) of every key and list item of a YAML document, by path."""
    lines: dict[tuple[str | int, ...], int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node | None, path: tuple[str | int, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[(*path, index)] = item.start_mark.line + 1
                walk(item, (*path, index))

    walk(root, ())
    return lines


def explain_errors(exc: ValidationError, yaml_text: str = "") -> str:
    """One line per validation error: key, line in the YAML file, reason.

    The key is dotted (``rules.0.when.regex``); the line is given when the
    key (or the item a whole-file check names, ``rules[2]``) is in the file.
    """
    lines = _yaml_lines(yaml_text) if yaml_text else {}
    out = []
    for error in exc.errors():
        path: tuple[str | int, ...] = ()
        for part in error["loc"]:  # union tags (e.g. "dicom") are not in the file: skipped
            if (*path, part) in lines:
                path = (*path, part)
        key = ".".join(str(p) for p in error["loc"]) or "(top level)"
        message = str(error["msg"])
        line = lines.get(path) if path else None
        if line is None:  # a whole-file check that names "rules[2]" or "models.0"
            found = re.search(r"\b(rules|models|destinations)(?:\[|\.)(\d+)", message)
            if found:
                line = lines.get((found[1], int(found[2])))
        out.append(f"  {key}{f' (line {line})' if line else ''}: {message}")
    return "\n".join(out)


def dump_settings(settings: Settings, path: Path) -> None:
    """Write the effective settings as YAML (used to hand them to a worker process).

    No secret of the HTTP API is in the settings (users and tokens live in
    the database, hashed).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = settings.model_dump(mode="json")
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
