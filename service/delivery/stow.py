"""Result delivery with STOW-RS (DICOM PS3.18 10.5) through dicomweb-client.

Files are POSTed to ``<url>/studies`` as ``multipart/related;
type="application/dicom"``, several per request (at most
:data:`MAX_BATCH_FILES` files and about :data:`MAX_BATCH_BYTES`). The server's
Store Instances Response (PS3.18 10.5.3, Table 10.5.3-1) names each instance in
the Referenced SOP Sequence (stored, perhaps with a Warning Reason) or in the
Failed SOP Sequence (with a Failure Reason, a DICOM status). HTTP 200 means
every instance was stored, 202 that some failed or were coerced, 409 that none
was stored.

Each file gets a :class:`service.dicom.scu.StoreOutcome`, so that the delivery
code treats DIMSE and DICOMweb destinations alike:

* stored: status 0x0000 (or the Warning Reason, 0xBxxx);
* failed: status = Failure Reason; ``permanent`` for reasons that sending again
  cannot change (0x0122 SOP class not supported, 0xA9xx, 0xCxxx);
* HTTP 401/403: error ``authentication failed (HTTP 401)``, not ok;
* HTTP 5xx, connection refused, TLS failure, timeout: ``unreachable`` (the
  remaining files are not tried: the server is down);
* a file that is not DICOM: an error, never sent.

dicomweb-client's own retries are off: the delivery scheduler retries with its
backoff. Logs name the destination, HTTP codes, statuses and SOP Instance UIDs,
never patient data nor credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from service.config import StowDestination
from service.dicom.scu import StoreOutcome

log = logging.getLogger("radnode.stow")

#: At most this many files per STOW-RS request.
MAX_BATCH_FILES = 64
#: About this many bytes of files per request (a larger single file goes alone).
MAX_BATCH_BYTES = 32 * 1024 * 1024
#: DICOM status when the server gives no Failure Reason: processing failure.
PROCESSING_FAILURE = 0x0110


def is_permanent(reason: int) -> bool:
    """True for a Failure Reason that sending the instance again cannot change.

    0x0122 (SOP class not supported), 0xA9xx (data set does not match the SOP
    class) and 0xCxxx (cannot understand, transfer syntax not supported), per
    DICOM PS3.4 B.2.3 and PS3.18 Table I.2-1; 0xA7xx (out of resources) and
    0x0110 (processing failure) may pass later.
    """
    return reason == 0x0122 or (reason & 0xFF00) == 0xA900 or (reason & 0xF000) == 0xC000


@dataclass
class _Item:
    position: int
    path: Path
    sop_instance_uid: str
    dataset: Dataset
    size: int


def _session(destination: StowDestination) -> requests.Session:
    session = requests.Session()
    if destination.token:
        session.headers["Authorization"] = f"Bearer {destination.token}"
    elif destination.username is not None:
        session.auth = (destination.username, destination.password or "")
    if destination.ca_file is not None:
        session.verify = str(destination.ca_file)
    return session


def _read(position: int, path: Path) -> _Item | StoreOutcome:
    try:
        dataset = dcmread(path)
        uid = str(dataset.SOPInstanceUID)
        size = path.stat().st_size
    except (InvalidDicomError, AttributeError, KeyError, ValueError, TypeError) as exc:
        return StoreOutcome(path, "", None, f"not a DICOM Part 10 file ({type(exc).__name__})",
                            permanent=True)
    except OSError as exc:
        return StoreOutcome(path, "", None, f"cannot read file: {exc.strerror or exc}")
    if not getattr(dataset, "file_meta", None) or "TransferSyntaxUID" not in dataset.file_meta:
        return StoreOutcome(path, uid, None, "not a DICOM Part 10 file (no File Meta "
                            "Information)", permanent=True)
    return _Item(position, path, uid, dataset, size)


def _batches(items: list[_Item]) -> list[list[_Item]]:
    batches: list[list[_Item]] = []
    batch: list[_Item] = []
    size = 0
    for item in items:
        if batch and (len(batch) >= MAX_BATCH_FILES or size + item.size > MAX_BATCH_BYTES):
            batches.append(batch)
            batch, size = [], 0
        batch.append(item)
        size += item.size
    if batch:
        batches.append(batch)
    return batches


def _response_dataset(response: Any) -> Dataset:
    """The Store Instances Response of an HTTP response, empty if there is none."""
    if response is None or not response.content:
        return Dataset()
    media = str(response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    # Orthanc 1.10's DICOMweb plugin sends its 409 and 400 bodies (JSON) without
    # a Content-Type: try JSON unless the server names another media type.
    if media not in ("", "application/dicom+json", "application/json"):
        return Dataset()
    try:
        return Dataset.from_json(response.json())
    except Exception:  # a malformed body: the HTTP status still tells the outcome
        return Dataset()


def _outcomes(batch: list[_Item], response_dataset: Dataset,
              http_status: int) -> list[StoreOutcome]:
    """Map the Store Instances Response to one outcome per file (PS3.18 10.5.3)."""
    stored: dict[str, int] = {}
    for item in response_dataset.get("ReferencedSOPSequence") or []:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        warning = item.get("WarningReason")
        stored[uid] = int(warning) if warning is not None else 0x0000
    failed: dict[str, int] = {}
    for item in response_dataset.get("FailedSOPSequence") or []:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        reason = item.get("FailureReason")
        failed[uid] = int(reason) if reason is not None else PROCESSING_FAILURE
    outcomes = []
    for entry in batch:
        uid = entry.sop_instance_uid
        if uid in failed:
            reason = failed[uid]
            outcomes.append(StoreOutcome(
                entry.path, uid, reason,
                f"refused by the server: failure reason 0x{reason:04X} (HTTP {http_status})",
                permanent=is_permanent(reason)))
        elif uid in stored:
            outcomes.append(StoreOutcome(entry.path, uid, stored[uid]))
        elif http_status == 200:
            # 200: "the origin server stored all instances" (PS3.18 10.5.3.1).
            outcomes.append(StoreOutcome(entry.path, uid, 0x0000))
        elif http_status == 409:
            # 409: none was stored; the body did not say why for this one.
            outcomes.append(StoreOutcome(entry.path, uid, PROCESSING_FAILURE,
                                         "refused by the server (HTTP 409 Conflict)"))
        else:
            outcomes.append(StoreOutcome(
                entry.path, uid, None,
                f"the server's response does not name this instance (HTTP {http_status})"))
    return outcomes


def _failed_batch(batch: list[_Item], error: str, *, unreachable: bool = False,
                  permanent: bool = False) -> list[StoreOutcome]:
    return [StoreOutcome(item.path, item.sop_instance_uid, None, error,
                         unreachable=unreachable, permanent=permanent) for item in batch]


def _http_error(batch: list[_Item], response: Any) -> list[StoreOutcome]:
    code = int(response.status_code)
    if code in (401, 403):
        return _failed_batch(batch, f"authentication failed (HTTP {code})")
    if code >= 500:
        return _failed_batch(batch, f"server error (HTTP {code} {response.reason})",
                             unreachable=True)
    if code == 409 or (code == 400 and _response_dataset(response)):
        return _outcomes(batch, _response_dataset(response), code)
    hint = " (is the DICOMweb service root right?)" if code in (404, 405) else ""
    return _failed_batch(batch, f"HTTP {code} {response.reason}{hint}")


def _post(client: DICOMwebClient, batch: list[_Item], responses: list[Any],
          study_instance_uid: str | None) -> list[StoreOutcome]:
    responses.clear()
    try:
        client.store_instances([item.dataset for item in batch],
                               study_instance_uid=study_instance_uid)
    except requests.HTTPError as exc:
        return _http_error(batch, exc.response)
    except (requests.ConnectionError, requests.Timeout) as exc:
        kind = "timeout" if isinstance(exc, requests.Timeout) else "connection failed"
        return _failed_batch(batch, f"cannot reach the server: {kind} ({type(exc).__name__})",
                             unreachable=True)
    except requests.RequestException as exc:
        return _failed_batch(batch, f"request failed: {type(exc).__name__}")
    except (ValueError, KeyError) as exc:
        # dicomweb-client cannot decode the body (no or another Content-Type):
        # the response itself is decoded below.
        if not responses:
            return _failed_batch(batch, f"unexpected response from the server "
                                 f"({type(exc).__name__})")
    if not responses:  # the hook always sees the response; be safe anyway
        return _failed_batch(batch, "no response from the server")
    response = responses[-1]
    return _outcomes(batch, _response_dataset(response), int(response.status_code))


def stow_files(destination: StowDestination, paths: Sequence[Path], *,
               study_instance_uid: str | None = None) -> list[StoreOutcome]:
    """Send DICOM files to a DICOMweb server with STOW-RS (DICOM PS3.18 10.5).

    Parameters
    ----------
    destination : StowDestination
        Service root URL, credentials (basic or bearer), CA file and
        timeout (seconds, per HTTP request).
    paths : sequence of pathlib.Path
        DICOM Part 10 files.
    study_instance_uid : str, optional
        POST to ``<url>/studies/<uid>`` instead of ``<url>/studies``: the
        server refuses instances of other studies (PS3.18 10.5.1).

    Returns
    -------
    list[StoreOutcome]
        One per path, in order: status 0x0000 (or a 0xBxxx Warning Reason)
        when stored; the Failure Reason as status when refused, ``permanent``
        when sending again cannot help; ``unreachable`` for HTTP 5xx,
        connection errors and timeouts; status None and an error for HTTP
        401/403 (``authentication failed (HTTP 401)``), other HTTP errors and
        files that are not DICOM.

    Raises
    ------
    ValueError
        If ``destination.url`` is not an http(s) URL dicomweb-client accepts.
    """
    by_position: dict[int, StoreOutcome] = {}
    items: list[_Item] = []
    for position, path in enumerate(paths):
        read = _read(position, path)
        if isinstance(read, StoreOutcome):
            log.warning("STOW-RS to %s: %s not sent: %s", destination.name, path.name,
                        read.error)
            by_position[position] = read
        else:
            items.append(read)

    if items:
        responses: list[Any] = []

        def keep(response: Any, *args: Any, **kwargs: Any) -> None:
            responses.append(response)

        client = DICOMwebClient(url=destination.url.rstrip("/"), session=_session(destination),
                                callback=keep, timeout=destination.timeout_s,
                                chunk_size=2 * MAX_BATCH_BYTES)
        client.set_http_retry_params(retry=False)
        down: StoreOutcome | None = None
        for batch in _batches(items):
            if down is not None:  # the server is down: do not try the other batches
                outcomes = _failed_batch(batch, down.error or "unreachable", unreachable=True)
            else:
                outcomes = _post(client, batch, responses, study_instance_uid)
                down = next((o for o in outcomes if o.unreachable), None)
                _log_batch(destination, outcomes)
            for item, outcome in zip(batch, outcomes, strict=True):
                by_position[item.position] = outcome
            # Release the parsed data sets as soon as their batch is done.
            for item in batch:
                item.dataset = Dataset()
    return [by_position[position] for position in range(len(paths))]


def _log_batch(destination: StowDestination, outcomes: list[StoreOutcome]) -> None:
    stored = sum(1 for o in outcomes if o.ok)
    if stored == len(outcomes):
        log.info("STOW-RS to %s: %d instance(s) stored", destination.name, stored)
        return
    first = next(o for o in outcomes if not o.ok)
    log.warning("STOW-RS to %s: %d of %d instance(s) stored; %s", destination.name, stored,
                len(outcomes), first.error)
    for outcome in outcomes:
        if not outcome.ok and outcome.status is not None:
            log.warning("STOW-RS to %s: %s refused with failure reason 0x%04X%s",
                        destination.name, outcome.sop_instance_uid, outcome.status,
                        " (permanent)" if outcome.permanent else "")
