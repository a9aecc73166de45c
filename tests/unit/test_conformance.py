"""The DICOM Conformance Statement (docs/conformance.md) against the code that it describes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.config import DicomSettings
from service.conformance import (
    DEFAULT_DOCUMENT,
    RESULT_OBJECTS,
    Proposal,
    check_document,
    main,
    proposed_contexts,
    render_tables,
    update_document,
)
from service.dicom.net import IMPLEMENTATION_CLASS_UID
from service.scp import server as scp_server
from service.scp.server import build_ae

#: The section headings of the DICOM PS3.2 Annex A template (numbering stripped).
PS32_HEADINGS = [
    "Overview",
    "Table of Contents",
    "Introduction",
    "Revision History",
    "Audience",
    "Remarks",
    "Terms and Definitions",
    "Basics of DICOM Communication",
    "Abbreviations",
    "References",
    "Networking",
    "Implementation Model",
    "Application Data Flow",
    "Functional Definition of AEs",
    "Sequencing of Real-World Activities",
    "AE Specifications",
    "SOP Classes",
    "Association Policies",
    "General",
    "Number of Associations",
    "Asynchronous Nature",
    "Implementation Identifying Information",
    "Association Initiation Policy",
    "Association Acceptance Policy",
    "Description and Sequencing of Activities",
    "Accepted Presentation Contexts",
    "Proposed Presentation Contexts",
    "SOP Specific Conformance for the Storage SOP Classes",
    "SOP Specific Conformance for the Verification SOP Class",
    "SOP Specific Conformance for the Storage Commitment Push Model SOP Class",
    "Network Interfaces",
    "Physical Network Interface",
    "Additional Protocols",
    "IPv4 and IPv6 Support",
    "Configuration",
    "AE Title/Presentation Address Mapping",
    "Local AE Titles",
    "Remote AE Title/Presentation Address Mapping",
    "Parameters",
    "Media Interchange",
    "Support of Character Sets",
    "Security",
    "Security Profiles",
    "Association Level Security",
    "Application Level Security",
    "Annexes",
    "IOD Contents",
    "Created SOP Instances",
    "Usage of Attributes from Received IODs",
    "Attribute Mapping",
    "Coerced/Modified Fields",
    "Data Dictionary of Private Attributes",
    "Coded Terminology and Templates",
    "Grayscale Image Consistency",
    "Standard Extended / Specialized / Private SOP Classes",
    "Private Transfer Syntaxes",
]


@pytest.fixture(scope="module")
def proposals() -> dict[str, Proposal]:
    return proposed_contexts()


@pytest.fixture
def document(tmp_path: Path) -> Path:
    copy = tmp_path / "conformance.md"
    shutil.copyfile(DEFAULT_DOCUMENT, copy)
    return copy


def _block(text: str, name: str) -> str:
    match = re.search(rf"<!-- generated:{name} -->\n(.*?)<!-- end generated -->", text, re.S)
    assert match is not None, f"no generated block {name}"
    return match.group(1)


def _rows(table: str) -> list[list[str]]:
    """The body rows of a Markdown table, cells stripped."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[2:]]


def _uids(cell: str) -> list[str]:
    return re.findall(r"`([0-9.]+)`", cell)


def _documented_syntaxes(text: str) -> dict[str, list[str]]:
    """Abstract syntax UID -> transfer syntax UIDs, as the Receiver's tables state them."""
    sets: dict[str, list[str]] = {}
    for label, rank, _name, uid in _rows(_block(text, "scp-transfer-syntax-sets")):
        sets.setdefault(label, []).append(_uids(uid)[0])
        assert len(sets[label]) == int(rank)
    documented = {}
    for _name, uid, syntaxes, _role, _negotiation in _rows(
            _block(text, "scp-presentation-contexts")):
        named = re.match(r"set (S\d+) ", syntaxes)
        documented[_uids(uid)[0]] = sets[named.group(1)] if named else _uids(syntaxes)
    return documented


def test_document_is_up_to_date() -> None:
    assert check_document(DEFAULT_DOCUMENT) == [], (
        "docs/conformance.md is stale: run python -m service.conformance --write")
    assert main(["--check"]) == 0


def test_an_extra_scp_context_makes_the_document_stale(
        document: Path, proposals: dict[str, Proposal]) -> None:
    ae = build_ae(DicomSettings())
    private_class = "1.2.826.0.1.3680043.8.498.4242"
    ae.add_supported_context(private_class, [str(ExplicitVRLittleEndian)])
    tables = render_tables(ae, proposals)

    stale = check_document(document, tables)
    assert {"scp-sop-classes", "scp-presentation-contexts"} <= set(stale)
    assert update_document(document, tables) is True
    assert private_class in _documented_syntaxes(document.read_text(encoding="utf-8"))
    assert check_document(document, tables) == []
    assert update_document(document, tables) is False


def test_check_command_reports_a_changed_scp_transfer_syntax(
        document: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The node stops accepting JPEG 2000 lossless: the statement must follow.
    syntaxes = [ts for ts in scp_server.STORAGE_TRANSFER_SYNTAXES if ts != JPEG2000Lossless]
    monkeypatch.setattr(scp_server, "STORAGE_TRANSFER_SYNTAXES", syntaxes)
    assert main(["--check", "--path", str(document)]) == 1
    assert main(["--write", "--path", str(document)]) == 0
    assert main(["--check", "--path", str(document)]) == 0
    documented = _documented_syntaxes(document.read_text(encoding="utf-8"))
    assert JPEG2000Lossless not in documented[CTImageStorage]
    assert documented[CTImageStorage] == syntaxes


def test_a_document_without_a_block_is_refused(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    block = "<!-- generated:implementation -->\n" + _block(text, "implementation")
    document.write_text(text.replace(block + "<!-- end generated -->\n", ""), encoding="utf-8")
    with pytest.raises(ValueError, match="no block for: implementation"):
        update_document(document)
    assert main(["--check", "--path", str(document)]) == 2


def test_every_ps32_section_is_present() -> None:
    text = DEFAULT_DOCUMENT.read_text(encoding="utf-8")
    headings = {re.sub(r"^[\d.]+\s+", "", line.lstrip("#").strip())
                for line in text.splitlines() if re.match(r"#{1,6} ", line)}
    missing = [h for h in PS32_HEADINGS if h not in headings]
    assert not missing, f"PS3.2 sections missing: {missing}"


def test_the_scp_tables_state_what_the_node_ae_supports() -> None:
    text = DEFAULT_DOCUMENT.read_text(encoding="utf-8")
    documented = _documented_syntaxes(text)
    ae = build_ae(DicomSettings())
    live = {str(cx.abstract_syntax): [str(ts) for ts in cx.transfer_syntax]
            for cx in ae.supported_contexts}
    assert documented == live
    for sop_class in (CTImageStorage, MRImageStorage):
        assert documented[sop_class][0] == ExplicitVRLittleEndian
        assert JPEG2000Lossless in documented[sop_class]
    rows = {_uids(row[1])[0]: row for row in _rows(_block(text, "scp-sop-classes"))}
    assert rows[CTImageStorage][0] == "CT Image Storage"
    assert rows[MRImageStorage][2:] == ["No", "Yes"]
    assert rows["1.2.840.10008.1.20.1"][2:] == ["Yes", "No"]  # Storage Commitment: SCU only


def test_the_scp_accepts_exactly_the_documented_ct_and_mr_syntaxes() -> None:
    """A real association: each documented syntax alone is accepted, an undocumented one not."""
    documented = _documented_syntaxes(DEFAULT_DOCUMENT.read_text(encoding="utf-8"))
    foreign = "1.2.826.0.1.3680043.8.498.777"  # a transfer syntax nobody supports
    server = build_ae(DicomSettings()).start_server(("127.0.0.1", 0), block=False)
    try:
        port = server.server_address[1]
        for sop_class in (CTImageStorage, MRImageStorage):
            requestor = AE(ae_title="TESTSCU")
            for syntax in [*documented[sop_class], foreign]:
                requestor.add_requested_context(sop_class, [syntax])
            # All syntaxes in one context, least preferred first: the first documented wins.
            requestor.add_requested_context(sop_class, list(reversed(documented[sop_class])))
            assoc = requestor.associate("127.0.0.1", port, ae_title="RADNODE")
            assert assoc.is_established
            try:
                accepted = [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts]
                rejected = [str(cx.transfer_syntax[0]) for cx in assoc.rejected_contexts]
            finally:
                assoc.release()
            assert accepted[:-1] == documented[sop_class]
            assert accepted[-1] == documented[sop_class][0] == ExplicitVRLittleEndian
            assert rejected == [foreign]
    finally:
        server.shutdown()


def test_the_scu_tables_state_what_the_scus_propose(proposals: dict[str, Proposal]) -> None:
    text = DEFAULT_DOCUMENT.read_text(encoding="utf-8")
    send = _rows(_block(text, "scu-presentation-contexts-send"))
    results = [(_uids(row[2])[0], _uids(row[3])) for row in send if row[0].startswith("results")]
    assert results == [(uid, list(syntaxes)) for uid, syntaxes in proposals["results"].contexts]
    for result in RESULT_OBJECTS:
        # Each result goes in the syntax it is written in, with a little endian fallback.
        assert (result.sop_class_uid, [result.transfer_syntax_uid, "1.2.840.10008.1.2"]) \
            in results
    forwarded = [_uids(row[3]) for row in send if not row[0].startswith("results")]
    assert forwarded == [[JPEG2000Lossless], [ExplicitVRLittleEndian, "1.2.840.10008.1.2"]]
    verification = _rows(_block(text, "scu-presentation-contexts-verification"))
    assert [_uids(row[1])[0] for row in verification] == [Verification]
    commitment = _rows(_block(text, "scu-presentation-contexts-commitment"))
    assert [_uids(row[1])[0] for row in commitment] == ["1.2.840.10008.1.20.1"]


def test_capturing_the_scu_proposals_restores_associate(
        proposals: dict[str, Proposal]) -> None:
    assert AE.associate.__qualname__ == "ApplicationEntity.associate"
    for proposal in proposals.values():
        assert proposal.contexts
        assert proposal.implementation_class_uid == IMPLEMENTATION_CLASS_UID


def test_implementation_identifiers_are_pynetdicoms() -> None:
    text = DEFAULT_DOCUMENT.read_text(encoding="utf-8")
    ae = build_ae(DicomSettings())
    for row in _rows(_block(text, "implementation")):
        assert row[1] == f"`{ae.implementation_class_uid}`"
        assert row[2] == f"`{ae.implementation_version_name}`"


def test_result_objects_are_what_the_workers_write(tmp_path: Path) -> None:
    """Build SEG, SR, SC and a classification SR from the phantom; compare with the table."""
    from service.dicom.phantom import write_ct_phantom
    from workers.inference.base import ClassSpec, Code, SegmentSpec
    from workers.inference.volume import load_series
    from workers.results.classification_sr import build_classification_sr
    from workers.results.measure import measure_segments
    from workers.results.overlay_sc import build_overlay_sc
    from workers.results.seg import build_seg
    from workers.results.sr import build_sr

    volume = load_series(write_ct_phantom(tmp_path, slices=20, rows=64, columns=64))
    segments = (SegmentSpec("body", Code("91723000", "SCT", "Anatomical Structure"),
                            Code("123037004", "SCT", "Body structure")),)
    masks = (volume.array > -500)[None]
    names = {"algorithm_name": "test-model", "algorithm_version": "1"}
    seg = build_seg(volume, masks, segments, series_instance_uid="2.25.1",
                    sop_instance_uid="2.25.2", **names)
    sr = build_sr(seg, volume, measure_segments(volume, masks, segments), segments,
                  series_instance_uid="2.25.3", sop_instance_uid="2.25.4", **names)
    sc = build_overlay_sc(volume, masks, segments, series_instance_uid="2.25.5",
                          sop_instance_uids=lambda i: f"2.25.6{i}", **names)[0]
    classes = [ClassSpec("no", Code("1", "99TEST", "no")),
               ClassSpec("yes", Code("2", "99TEST", "yes"))]
    classification = build_classification_sr(
        volume, [0.3, 0.7], classes, concept=Code("3", "99TEST", "finding"),
        series_instance_uid="2.25.7", sop_instance_uid="2.25.8", **names)

    documented = {r.kind: (r.sop_class_uid, r.transfer_syntax_uid) for r in RESULT_OBJECTS}
    for kind, dataset in (("SEG", seg), ("SR", sr), ("SC", sc), ("SR", classification)):
        written = (str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID))
        assert written == documented[kind], f"{kind}: {UID(written[0]).name}"


def test_generated_tables_name_sop_classes_by_their_dicom_names() -> None:
    tables = render_tables()
    assert "| CT Image Storage | `1.2.840.10008.5.1.4.1.1.2` |" in tables["scp-sop-classes"]
    assert "| MR Image Storage | `1.2.840.10008.5.1.4.1.1.4` |" in tables["scp-sop-classes"]
    assert "Storage Commitment Push Model SOP Class" in tables["scp-sop-classes"]
