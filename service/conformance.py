"""The tables of radnode's DICOM Conformance Statement, generated from the code (DICOM PS3.2).

``docs/conformance.md`` follows the template of DICOM PS3.2 Annex A. Its
tables of SOP classes, presentation contexts, transfer syntaxes,
implementation identifiers, association limits and configuration defaults
are not typed by hand: they sit between marker comments ::

    <!-- generated:scp-presentation-contexts -->
    | Abstract Syntax Name | ...
    <!-- end generated -->

and :func:`render_tables` builds them from the objects the node really uses:

* the SCP: the :class:`pynetdicom.AE` that :func:`service.scp.server.build_ae`
  returns for the default :class:`service.config.DicomSettings` (its
  supported presentation contexts, roles, implementation identifiers);
* the SCUs: the presentation contexts that :func:`service.dicom.scu.echo`,
  :func:`service.dicom.scu.store_files` and
  :func:`service.delivery.commitment.request_commitment` propose. Each is
  called with :meth:`pynetdicom.AE.associate` replaced by a function that
  records the AE's requested contexts and stops: nothing is sent;
* the result objects: :data:`RESULT_OBJECTS` (the SOP classes and transfer
  syntax the workers write; ``service`` does not import ``workers``);
* the defaults of :mod:`service.config`.

``python -m service.conformance --check`` exits 1 when the document differs
from the code, ``--write`` rewrites the generated blocks (and nothing else).

Rendering replaces ``AE.associate`` process-wide for a moment (under a lock):
run it from the command line or tests, not inside a running node that sends.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from unittest import mock

from pydantic import BaseModel
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom import AE
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass, VerificationServiceClass
from pynetdicom.sop_class import uid_to_service_class

__all__ = [
    "DEFAULT_DOCUMENT",
    "RESULT_OBJECTS",
    "Proposal",
    "ResultObject",
    "check_document",
    "main",
    "proposed_contexts",
    "render_tables",
    "replace_blocks",
    "update_document",
]

#: ``docs/conformance.md`` of the source tree this module belongs to.
DEFAULT_DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"

_BLOCK = re.compile(
    r"(?P<start><!-- generated:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)"
    r"(?P<end><!-- end generated -->)",
    re.DOTALL,
)

#: Contexts with more transfer syntaxes than this name a set of Table "Transfer
#: Syntax Sets" instead of listing them in the row.
_INLINE_SYNTAXES = 4


@dataclass(frozen=True)
class ResultObject:
    """A kind of object radnode creates and sends.

    Attributes
    ----------
    kind : str
        Short name used in the statement (``SEG``, ``SR``, ``SC``).
    sop_class_uid : str
        Its SOP Class UID.
    transfer_syntax_uid : str
        The transfer syntax it is written in (and proposed first).
    description : str
        What it holds, for the statement.
    """

    kind: str
    sop_class_uid: str
    transfer_syntax_uid: str
    description: str


#: The objects the workers write (``workers/results``: highdicom's
#: ``Segmentation``, ``Comprehensive3DSR`` and ``SCImage``, each with
#: ``transfer_syntax_uid=ExplicitVRLittleEndian``). ``tests/unit/
#: test_conformance.py`` builds each one and checks it against this table.
RESULT_OBJECTS: tuple[ResultObject, ...] = (
    ResultObject("SEG", str(SegmentationStorage), str(ExplicitVRLittleEndian),
                 "Segmentation (BINARY), one segment per label, series 9101"),
    ResultObject("SR", str(Comprehensive3DSRStorage), str(ExplicitVRLittleEndian),
                 "TID 1500 Measurement Report: segment measurements (series 9102) "
                 "or a classification (series 9103)"),
    ResultObject("SC", str(SecondaryCaptureImageStorage), str(ExplicitVRLittleEndian),
                 "contours burned into each source slice, only for destinations with "
                 "`secondary_capture: true` (series 9104)"),
)

#: An example of a file radnode forwards as stored (``radnode send``,
#: ``radnode deid export``): a CT image in JPEG 2000 (lossless).
_FORWARDED_EXAMPLE = (str(CTImageStorage), str(JPEG2000Lossless))


@dataclass(frozen=True)
class Proposal:
    """What an SCU of radnode proposes in its A-ASSOCIATE-RQ.

    Attributes
    ----------
    contexts : tuple of (str, tuple of str)
        (abstract syntax, transfer syntaxes in the order proposed) of each
        presentation context, in the order proposed.
    roles : tuple of (str, bool or None, bool or None)
        (abstract syntax, SCU role, SCP role) for each context with SCP/SCU
        Role Selection; empty when none is proposed.
    implementation_class_uid : str
        Implementation Class UID sent.
    implementation_version_name : str
        Implementation Version Name sent ('' if none).
    maximum_pdu_size : int
        Maximum Length Received, bytes (0: no limit).
    """

    contexts: tuple[tuple[str, tuple[str, ...]], ...]
    roles: tuple[tuple[str, bool | None, bool | None], ...]
    implementation_class_uid: str
    implementation_version_name: str
    maximum_pdu_size: int


class _Captured(Exception):
    """Raised instead of opening an association; carries what would be proposed."""

    def __init__(self, ae: AE) -> None:
        super().__init__("association request captured")
        contexts = tuple(
            (str(cx.abstract_syntax), tuple(str(ts) for ts in cx.transfer_syntax))
            for cx in ae.requested_contexts
        )
        roles = tuple(
            (str(cx.abstract_syntax), cx.scu_role, cx.scp_role)
            for cx in ae.requested_contexts
            if cx.scu_role is not None or cx.scp_role is not None
        )
        self.proposal = Proposal(contexts, roles, str(ae.implementation_class_uid),
                                 str(ae.implementation_version_name or ""),
                                 int(ae.maximum_pdu_size))


_CAPTURE_LOCK = threading.Lock()


@contextmanager
def _associations_captured() -> Iterator[None]:
    """Within: :meth:`pynetdicom.AE.associate` raises :class:`_Captured` and sends nothing."""

    def capture(self: AE, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise _Captured(self)

    with _CAPTURE_LOCK, mock.patch.object(AE, "associate", capture):
        yield


def _capture(call: Callable[[], object]) -> Proposal:
    with _associations_captured():
        try:
            call()
        except _Captured as captured:
            return captured.proposal
    raise RuntimeError("the SCU returned without requesting an association")


def _write_stub(path: Path, sop_class_uid: str, transfer_syntax_uid: str, index: int) -> Path:
    """A DICOM Part 10 file with only its SOP Class and Instance UIDs (for the SCU)."""
    instance_uid = f"2.25.{index + 1}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = sop_class_uid
    dataset.SOPInstanceUID = instance_uid
    target = path / f"{index}.dcm"
    dataset.save_as(target, enforce_file_format=True)
    return target


def proposed_contexts() -> dict[str, Proposal]:
    """What each SCU activity of radnode proposes, captured from the code that sends.

    Returns
    -------
    dict[str, Proposal]
        ``results``: :func:`service.dicom.scu.store_files` with one file of
        each :data:`RESULT_OBJECTS`; ``forwarded``: the same with a CT image
        stored as JPEG 2000 (lossless), as ``radnode send`` forwards it;
        ``commitment``: :func:`service.delivery.commitment.request_commitment`;
        ``verification``: :func:`service.dicom.scu.echo`.
    """
    from service.config import DeliverySettings, Destination
    from service.delivery.commitment import request_commitment
    from service.dicom.scu import echo, store_files

    peer = Destination(ae_title="PACS", host="127.0.0.1", port=104)
    calling_ae = DeliverySettings().ae_title
    proposals: dict[str, Proposal] = {}
    with tempfile.TemporaryDirectory(prefix="radnode-conformance-") as folder:
        results = [_write_stub(Path(folder), r.sop_class_uid, r.transfer_syntax_uid, i)
                   for i, r in enumerate(RESULT_OBJECTS)]
        forwarded = [_write_stub(Path(folder), *_FORWARDED_EXAMPLE, len(results))]
        proposals["results"] = _capture(lambda: store_files(peer, results,
                                                            calling_ae=calling_ae))
        proposals["forwarded"] = _capture(lambda: store_files(peer, forwarded,
                                                              calling_ae=calling_ae))
    proposals["commitment"] = _capture(lambda: request_commitment(
        peer, [(RESULT_OBJECTS[0].sop_class_uid, "2.25.1")], transaction_uid="2.25.2",
        calling_ae=calling_ae, timeout_s=1.0))
    proposals["verification"] = _capture(lambda: echo(peer, calling_ae=calling_ae,
                                                      timeout_s=1.0))
    return proposals


# -- Markdown ------------------------------------------------------------------------------


def _name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else "(private or unknown)"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def _syntax_list(syntaxes: Sequence[str]) -> str:
    return "<br>".join(f"{_name(ts)} `{ts}`" for ts in syntaxes)


def _service(uid: str) -> str:
    """``verification``, ``storage`` or ``other``: the service class of a SOP class."""
    service = uid_to_service_class(uid)
    if service is VerificationServiceClass:
        return "verification"
    return "storage" if service is StorageServiceClass else "other"


def _sort_key(cx: PresentationContext) -> tuple[int, str]:
    """Verification first, then storage SOP classes by name, then the others."""
    uid = str(cx.abstract_syntax)
    rank = {"verification": 0, "storage": 1, "other": 2}[_service(uid)]
    return rank, _name(uid).casefold()


def _acceptor_roles(cx: PresentationContext) -> tuple[bool, bool, str]:
    """(radnode may be SCU, radnode may be SCP, extended negotiation) of a supported context.

    pynetdicom's ``scu_role``/``scp_role`` of a supported context say whether
    the *requestor* may take that role (PS3.7 D.3.3.4); radnode then takes
    the other one. With either left as None only the default roles apply
    (requestor SCU, radnode SCP).
    """
    if cx.scu_role is None or cx.scp_role is None:
        return False, True, "None"
    answer = {True: "accepted", False: "refused"}
    negotiation = (f"SCP/SCU Role Selection: requestor as SCP {answer[bool(cx.scp_role)]}, "
                   f"as SCU {answer[bool(cx.scu_role)]}")
    return bool(cx.scp_role), bool(cx.scu_role), negotiation


def _role_text(scu: bool, scp: bool) -> str:
    return " and ".join(role for role, on in (("SCU", scu), ("SCP", scp)) if on) or "none"


def _scp_tables(ae: AE) -> dict[str, str]:
    contexts = sorted(ae.supported_contexts, key=_sort_key)
    sets: dict[tuple[str, ...], str] = {}
    classes: list[list[str]] = []
    accepted: list[list[str]] = []
    for cx in contexts:
        uid = str(cx.abstract_syntax)
        syntaxes = tuple(str(ts) for ts in cx.transfer_syntax)
        scu, scp, negotiation = _acceptor_roles(cx)
        classes.append([_name(uid), f"`{uid}`", "Yes" if scu else "No", "Yes" if scp else "No"])
        if len(syntaxes) > _INLINE_SYNTAXES:
            label = sets.setdefault(syntaxes, f"S{len(sets) + 1}")
            syntax_cell = f"set {label} ({len(syntaxes)} transfer syntaxes, see below)"
        else:
            syntax_cell = _syntax_list(syntaxes)
        accepted.append([_name(uid), f"`{uid}`", syntax_cell, _role_text(scu, scp), negotiation])
    set_rows = [[label, str(rank), _name(ts), f"`{ts}`"]
                for syntaxes, label in sets.items()
                for rank, ts in enumerate(syntaxes, start=1)]
    return {
        "scp-sop-classes": _table(["SOP Class Name", "SOP Class UID", "SCU", "SCP"], classes),
        "scp-presentation-contexts": _table(
            ["Abstract Syntax Name", "Abstract Syntax UID", "Transfer Syntaxes", "Role",
             "Extended Negotiation"], accepted),
        "scp-transfer-syntax-sets": _table(
            ["Set", "Preference", "Transfer Syntax Name", "Transfer Syntax UID"], set_rows),
    }


_ACTIVITIES = {
    "results": "Send results",
    "forwarded": "Send other files",
    "commitment": "Request Storage Commitment",
    "verification": "Verify (C-ECHO)",
}


def _proposed_rows(proposal: Proposal) -> list[list[str]]:
    """Abstract syntax name, UID, transfer syntaxes, role, extended negotiation per context."""
    roles = {uid: (scu, scp) for uid, scu, scp in proposal.roles}
    rows = []
    for uid, syntaxes in proposal.contexts:
        role = roles.get(uid)
        negotiation = "None" if role is None else (
            f"SCP/SCU Role Selection: SCU {role[0]}, SCP {role[1]}")
        rows.append([_name(uid), f"`{uid}`", _syntax_list(syntaxes), "SCU", negotiation])
    return rows


def _scu_tables(proposals: dict[str, Proposal]) -> dict[str, str]:
    header = ["Abstract Syntax Name", "Abstract Syntax UID",
              "Transfer Syntaxes (in the order proposed)", "Role", "Extended Negotiation"]
    classes: dict[str, None] = {}
    for activity in ("results", "commitment", "verification"):
        classes.update(dict.fromkeys(uid for uid, _ in proposals[activity].contexts))
    example = (f"{_name(_FORWARDED_EXAMPLE[0])} stored as {_name(_FORWARDED_EXAMPLE[1])} "
               "(example)")
    send = [["results (SEG, SR, SC)", *row] for row in _proposed_rows(proposals["results"])]
    send += [[example, *row] for row in _proposed_rows(proposals["forwarded"])]
    return {
        "scu-sop-classes": _table(["SOP Class Name", "SOP Class UID", "SCU", "SCP"],
                                  [[_name(uid), f"`{uid}`", "Yes", "No"] for uid in classes]),
        "scu-presentation-contexts-send": _table(["Files", *header], send),
        "scu-presentation-contexts-commitment": _table(
            header, _proposed_rows(proposals["commitment"])),
        "scu-presentation-contexts-verification": _table(
            header, _proposed_rows(proposals["verification"])),
    }


def _overview_table(ae: AE, proposals: dict[str, Proposal]) -> str:
    """PS3.2 Table "Network Services": SOP classes by group, as SCU and as SCP."""
    scu: set[str] = {uid for activity in ("results", "commitment", "verification")
                     for uid, _ in proposals[activity].contexts}
    scp: set[str] = set()
    for cx in ae.supported_contexts:
        as_scu, as_scp, _ = _acceptor_roles(cx)
        (scu if as_scu else scp).add(str(cx.abstract_syntax))
        if as_scu and as_scp:
            scp.add(str(cx.abstract_syntax))

    def yes(on: bool) -> str:
        return "Yes" if on else "No"

    results = [r.sop_class_uid for r in RESULT_OBJECTS]
    others = sorted(uid for uid in scp if _service(uid) == "storage" and uid not in results)
    rows: list[list[str]] = [["**Transfer**", "", ""]]
    rows += [[_name(uid), yes(uid in scu), yes(uid in scp)] for uid in results]
    if others:
        rows.append([f"The other {len(others)} Storage SOP Classes of Section 4.2.1.1",
                     "Yes (forwarding only: `radnode send`, `radnode deid export`)", "Yes"])
    groups = (("**Workflow Management**", "other"), ("**Verification**", "verification"))
    for title, service in groups:
        uids = sorted((u for u in scu | scp if _service(u) == service), key=_name)
        if uids:
            rows.append([title, "", ""])
            rows += [[_name(uid), yes(uid in scu), yes(uid in scp)] for uid in uids]
    return _table(["SOP Classes", "User of Service (SCU)", "Provider of Service (SCP)"], rows)


def _implementation_table(ae: AE, proposals: dict[str, Proposal]) -> str:
    rows = [["Receiver (SCP)", f"`{ae.implementation_class_uid}`",
             f"`{ae.implementation_version_name or ''}`", str(ae.maximum_pdu_size)]]
    for activity in ("results", "commitment", "verification"):
        proposal = proposals[activity]
        rows.append([f"Delivery: {_ACTIVITIES[activity]}",
                     f"`{proposal.implementation_class_uid}`",
                     f"`{proposal.implementation_version_name}`",
                     str(proposal.maximum_pdu_size)])
    return _table(["Application Entity / Activity", "Implementation Class UID",
                   "Implementation Version Name", "Maximum Length Received (bytes)"], rows)


def _result_table() -> str:
    rows = [[r.kind, _name(r.sop_class_uid), f"`{r.sop_class_uid}`",
             f"{_name(r.transfer_syntax_uid)} `{r.transfer_syntax_uid}`", r.description]
            for r in RESULT_OBJECTS]
    return _table(["Result", "SOP Class Name", "SOP Class UID", "Transfer Syntax", "Content"],
                  rows)


def _default(model: type[BaseModel], field: str) -> Any:
    return model.model_fields[field].get_default(call_default_factory=True)


def _yaml(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def _parameter_table() -> str:
    from service.config import (
        DeliverySettings,
        Destination,
        DicomSettings,
        ScpTlsSettings,
        StorageSettings,
    )

    keys: list[tuple[str, type[BaseModel], str, str]] = [
        ("dicom.ae_title", DicomSettings, "ae_title",
         "The Receiver's AE title; with `dicom.aes` empty any Called AE Title is accepted."),
        ("dicom.host", DicomSettings, "host",
         "Listening address of both listeners; `::` listens on IPv6 and IPv4."),
        ("dicom.port", DicomSettings, "port", "Plain TCP port; `null`: TLS only."),
        ("dicom.tls.port", ScpTlsSettings, "port",
         "DICOM TLS port (only with a `dicom.tls` section)."),
        ("dicom.aes", DicomSettings, "aes",
         "Called AE titles and, per title, the Calling AE titles and addresses allowed."),
        ("dicom.ae_title_case_sensitive", DicomSettings, "ae_title_case_sensitive",
         "Compare AE titles with regard to case."),
        ("dicom.max_associations", DicomSettings, "max_associations",
         "Simultaneous associations accepted (both listeners)."),
        ("dicom.max_associations_per_peer", DicomSettings, "max_associations_per_peer",
         "Simultaneous associations per peer IP address."),
        ("dicom.max_pdu_size", DicomSettings, "max_pdu_size",
         "Maximum Length Received by the Receiver, bytes (0: no limit)."),
        ("dicom.acse_timeout_s", DicomSettings, "acse_timeout_s",
         "ARTIM: seconds to receive the A-ASSOCIATE-RQ (and finish TLS)."),
        ("dicom.dimse_timeout_s", DicomSettings, "dimse_timeout_s",
         "Seconds to wait for a DIMSE message."),
        ("dicom.network_timeout_s", DicomSettings, "network_timeout_s",
         "Seconds of silence on an association before it is aborted."),
        ("storage.min_free_mb", StorageSettings, "min_free_mb",
         "Spool free-space reserve, MiB; below it C-STORE answers `0xA700`."),
        ("storage.batched_row_flush", StorageSettings, "batched_row_flush",
         "SQLite: Success waits for one flush of the disk (the file and its mark); the "
         "rows are inserted and flushed in batches and recorded again from the marks after a "
         "crash or a power cut."),
        ("delivery.ae_title", DeliverySettings, "ae_title",
         "Calling AE Title of every association the Delivery AE opens."),
        ("delivery.connect_timeout_s", DeliverySettings, "connect_timeout_s",
         "Seconds to connect and have the association accepted."),
        ("delivery.response_timeout_s", DeliverySettings, "response_timeout_s",
         "Seconds to wait for a C-STORE or N-ACTION response."),
        ("delivery.max_attempts", DeliverySettings, "max_attempts",
         "Attempts per instance refused by a destination (and commitment requests)."),
        ("delivery.retry_backoff_s", DeliverySettings, "retry_backoff_s",
         "First retry delay, seconds; doubles after each failure."),
        ("delivery.max_backoff_s", DeliverySettings, "max_backoff_s",
         "Longest retry delay, seconds."),
        ("delivery.give_up_after_h", DeliverySettings, "give_up_after_h",
         "Hours an unreachable destination is retried before its deliveries fail."),
        ("delivery.commitment_timeout_s", DeliverySettings, "commitment_timeout_s",
         "Seconds to wait for the N-EVENT-REPORT before asking again."),
        ("destinations[].storage_commitment", Destination, "storage_commitment",
         "Request Storage Commitment from this destination."),
        ("destinations[].tls", Destination, "tls",
         "DICOM TLS towards this destination (`ca_file`, `cert_file`, `key_file`)."),
        ("destinations[].secondary_capture", Destination, "secondary_capture",
         "Also send the Secondary Capture series."),
        ("destinations[].deidentify", Destination, "deidentify",
         "Send de-identified copies (PS3.15 E.1)."),
    ]
    rows = [[f"`{key}`", _yaml(_default(model, field)), meaning]
            for key, model, field, meaning in keys]
    return _table(["Key", "Default", "Meaning"], rows)


def _association_table(ae: AE) -> str:
    from service.delivery.dispatch import Dispatcher

    threads = inspect.signature(Dispatcher.__init__).parameters["max_threads"].default
    rows = [
        ["Receiver", "Acceptor", str(ae.maximum_associations),
         "`dicom.max_associations`; per peer address `dicom.max_associations_per_peer`"],
        ["Delivery", "Initiator", str(threads),
         "fixed: one association at a time per destination, this many destinations at once"],
    ]
    return _table(["Application Entity", "Association Role",
                   "Maximum Simultaneous Associations", "Set by"], rows)


def render_tables(ae: AE | None = None,
                  proposals: dict[str, Proposal] | None = None) -> dict[str, str]:
    """Build every generated table of the Conformance Statement as Markdown.

    Parameters
    ----------
    ae : pynetdicom.AE, optional
        The SCP's Application Entity; default: :func:`service.scp.server.build_ae`
        with the default :class:`service.config.DicomSettings`.
    proposals : dict[str, Proposal], optional
        What the SCUs propose; default: :func:`proposed_contexts`.

    Returns
    -------
    dict[str, str]
        Block name (as in ``<!-- generated:NAME -->``) to its Markdown,
        ending in a newline.
    """
    if ae is None:
        from service.config import DicomSettings
        from service.scp.server import build_ae

        ae = build_ae(DicomSettings())
    if proposals is None:
        proposals = proposed_contexts()
    tables = {
        "overview": _overview_table(ae, proposals),
        "implementation": _implementation_table(ae, proposals),
        "associations": _association_table(ae),
        **_scp_tables(ae),
        **_scu_tables(proposals),
        "result-objects": _result_table(),
        "parameters": _parameter_table(),
    }
    return tables


# -- the document ----------------------------------------------------------------------------


def replace_blocks(text: str, tables: dict[str, str]) -> tuple[str, list[str]]:
    """Put ``tables`` into the generated blocks of ``text``.

    Parameters
    ----------
    text : str
        The document.
    tables : dict[str, str]
        From :func:`render_tables`.

    Returns
    -------
    tuple of (str, list[str])
        The new text and the names of the blocks whose content changed.

    Raises
    ------
    ValueError
        If the document lacks a block for a table, has a block no table
        fills, or has a block twice.
    """
    found = [m["name"] for m in _BLOCK.finditer(text)]
    missing = sorted(set(tables) - set(found))
    unknown = sorted(set(found) - set(tables))
    repeated = sorted({name for name in found if found.count(name) > 1})
    problems = [f"{what}: {', '.join(names)}" for what, names in (
        ("no block for", missing), ("no table for block", unknown), ("repeated block", repeated))
        if names]
    if problems:
        raise ValueError("; ".join(problems))
    changed: list[str] = []

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        body = tables[name]
        if match["body"] != body:
            changed.append(name)
        return match["start"] + body + match["end"]

    return _BLOCK.sub(fill, text), changed


def check_document(path: Path = DEFAULT_DOCUMENT,
                   tables: dict[str, str] | None = None) -> list[str]:
    """The generated blocks of the document that differ from the code.

    Parameters
    ----------
    path : pathlib.Path
        The Conformance Statement.
    tables : dict[str, str], optional
        Default: :func:`render_tables`.

    Returns
    -------
    list[str]
        Names of the stale blocks; empty when the document is up to date.

    Raises
    ------
    ValueError
        If the blocks do not match the tables (see :func:`replace_blocks`).
    OSError
        If the document cannot be read.
    """
    _, changed = replace_blocks(path.read_text(encoding="utf-8"),
                                render_tables() if tables is None else tables)
    return changed


def update_document(path: Path = DEFAULT_DOCUMENT,
                    tables: dict[str, str] | None = None) -> bool:
    """Rewrite the generated blocks of the document from the code.

    Parameters
    ----------
    path : pathlib.Path
        The Conformance Statement.
    tables : dict[str, str], optional
        Default: :func:`render_tables`.

    Returns
    -------
    bool
        True if the file changed (it is written only then).

    Raises
    ------
    ValueError
        If the blocks do not match the tables (see :func:`replace_blocks`).
    OSError
        If the document cannot be read or written.
    """
    text = path.read_text(encoding="utf-8")
    new, changed = replace_blocks(text, render_tables() if tables is None else tables)
    if changed:
        path.write_text(new, encoding="utf-8")
    return bool(changed)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.conformance --check | --write [--path FILE]``.

    Returns
    -------
    int
        0: up to date (or written); 1: stale (``--check``); 2: the document
        cannot be read or its blocks do not match the tables.
    """
    parser = argparse.ArgumentParser(
        prog="python -m service.conformance",
        description="Check or rewrite the generated tables of the DICOM Conformance Statement.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true",
                        help="exit 1 if the document differs from the code")
    action.add_argument("--write", action="store_true", help="rewrite the generated tables")
    parser.add_argument("--path", type=Path, default=DEFAULT_DOCUMENT,
                        help=f"the document (default: {DEFAULT_DOCUMENT})")
    args = parser.parse_args(argv)
    try:
        if args.write:
            changed = update_document(args.path)
            print(f"{args.path}: {'updated' if changed else 'already up to date'}")
            return 0
        stale = check_document(args.path)
    except (OSError, ValueError) as exc:
        print(f"{args.path}: {exc}", file=sys.stderr)
        return 2
    if stale:
        print(f"{args.path} is stale: {', '.join(stale)} differ from the code; run "
              "python -m service.conformance --write", file=sys.stderr)
        return 1
    print(f"{args.path}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
