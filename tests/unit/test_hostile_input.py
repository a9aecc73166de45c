"""Hostile and odd input to the C-STORE SCP, sent as raw bytes over real associations.

Every case starts from a real file of the test data folder and mutates the bytes after its
File Meta in one targeted way. The bytes reach the SCP unchanged: pynetdicom's SCU sends a
file's data set without decoding it when ``_config.STORE_SEND_CHUNKED_DATASET`` is True (see
``Association.send_c_store``), and :func:`store_on_context` builds the C-STORE primitive itself
where the request must disagree with its presentation context.

What every case checks:

* a DIMSE status comes back (or the SCP aborts the association, where said);
* 0x0000 means: a row in ``instances`` and a file in the spool whose data set (the bytes after
  the File Meta, which the SCP writes itself) is byte-identical to what was sent;
* any failure is 0xA7xx, 0xA9xx or 0xCxxx and leaves no row and no file;
* the spool and the table agree (no file without a row, no row without a file), no
  ``.incoming-*`` temporary file is left and nothing is written outside the spool;
* afterwards a valid instance is still accepted, on the same and on a new association.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import itertools
import struct
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from service.config import DicomSettings
from service.db import migrate
from service.db.models import Instance
from service.db.session import make_engine, make_session_factory
from service.dicom import spool
from service.dicom.net import set_tcp_nodelay
from service.scp import handlers
from service.scp.handlers import StoreContext
from service.scp.server import start_scp
from tests.unit.test_scp import Node, free_port

# pydicom warns (from the SCP's threads) about the odd values these cases send on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

CT_SMALL = "transfer_syntaxes/pydicom_small/CT_small.dcm"
MR_SMALL = "transfer_syntaxes/pydicom_small/MR_small.dcm"
MR_IMPLICIT = "transfer_syntaxes/pydicom_small/MR_small_implicit.dcm"
MR_BIG_ENDIAN = "transfer_syntaxes/pydicom_small/MR_small_bigendian.dcm"
MR_RLE = "transfer_syntaxes/pydicom_small/MR_small_RLE.dcm"
MR_J2K = "transfer_syntaxes/pydicom_small/MR_small_jp2klossless.dcm"
MR_JLS = "transfer_syntaxes/pydicom_small/MR_small_jpeg_ls_lossless.dcm"
NM_JPEG_EXTENDED = "transfer_syntaxes/nema_wg04/NM1_JPLY_fixed.dcm"
DEFLATED = "transfer_syntaxes/dclunie/image_dfl.dcm"
ENHANCED_MR = "enhanced_multiframe/pydicom_data/emri_small.dcm"
ODD_FILE_FOLDERS = ("transfer_syntaxes", "seg_sr", "enhanced_multiframe")

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
STUDY_UID = 0x0020000D
SOP_CLASS_UID = 0x00080016
FAILURE_CLASSES = (0xA7, 0xA9)  # plus 0xCxxx


# --------------------------------------------------------------------------- raw Part 10 files


@dataclass(frozen=True)
class Element:
    """Where one top-level element lies in a data set's bytes."""

    tag: int
    vr: str | None  # None in implicit VR
    header: int  # offset of the tag
    length_at: int  # offset of the length field
    length_size: int  # 2 or 4 bytes
    value: int  # offset of the value
    length: int  # as encoded (0xFFFFFFFF: undefined)


@dataclass(frozen=True)
class Part10:
    """A DICOM file split into its File Meta (with preamble) and its encoded data set."""

    meta: bytes
    body: bytes
    sop_class: str
    sop_instance: str
    syntax: UID
    name: str

    @classmethod
    def read(cls, path: Path) -> Part10:
        file_meta, offset = split_dataset(path)
        data = path.read_bytes()
        return cls(data[:offset], data[offset:], str(file_meta.MediaStorageSOPClassUID),
                   str(file_meta.MediaStorageSOPInstanceUID).rstrip("\0 "),
                   UID(file_meta.TransferSyntaxUID), path.name)

    @property
    def implicit(self) -> bool:
        return bool(self.syntax.is_implicit_VR)

    @property
    def little(self) -> bool:
        return bool(self.syntax.is_little_endian)

    @property
    def endian(self) -> str:
        return "<" if self.little else ">"

    @property
    def dataset_bytes(self) -> bytes:
        """The data set as encoded, inflated for the deflated transfer syntax."""
        return zlib.decompress(self.body, -zlib.MAX_WBITS) if self.syntax.is_deflated \
            else self.body

    def with_dataset(self, data: bytes) -> Part10:
        """A copy carrying ``data`` as its data set (deflated again where the syntax says so)."""
        if self.syntax.is_deflated:
            packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            data = packer.compress(data) + packer.flush()
        return dataclasses.replace(self, body=data)

    def with_body(self, body: bytes) -> Part10:
        """A copy carrying ``body`` as sent on the wire (no re-deflating)."""
        return dataclasses.replace(self, body=body)

    def renamed(self, uid: str, *, meta_only: bool = False) -> Part10:
        """A copy whose SOP Instance UID (same length) is ``uid`` in the meta and data set."""
        old, new = self.sop_instance.encode(), uid.encode()
        assert len(old) == len(new), (old, new)
        copy = dataclasses.replace(self, meta=self.meta.replace(old, new), sop_instance=uid)
        if meta_only:
            return copy
        return copy.with_dataset(self.dataset_bytes.replace(old, new))

    def elements(self) -> dict[int, Element]:
        """The top-level elements of the (inflated) data set, by tag."""
        data = self.dataset_bytes
        stream = io.BytesIO(data)
        generator = data_element_generator(stream, self.implicit, self.little)
        found: dict[int, Element] = {}
        while True:
            header = stream.tell()
            try:
                elem = next(generator)
            except StopIteration:
                break
            vr = None if self.implicit else data[header + 4:header + 6].decode("latin-1")
            if vr is None or vr in LONG_VRS:
                length_at, size = header + (4 if vr is None else 8), 4
            else:
                length_at, size = header + 6, 2
            (length,) = struct.unpack(self.endian + ("L" if size == 4 else "H"),
                                      data[length_at:length_at + size])
            found[int(elem.tag)] = Element(int(elem.tag), vr, header, length_at, size,
                                           length_at + size, length)
        return found

    def element_end(self, tag: int) -> int:
        """Offset just after element ``tag`` (the next element's header)."""
        elements = sorted(self.elements().values(), key=lambda e: e.header)
        for current, following in itertools.pairwise([*elements, None]):
            if current.tag == tag:
                return following.header if following else len(self.dataset_bytes)
        raise KeyError(hex(tag))


def encode_element(tag: int, vr: str, value: bytes, *, implicit: bool, little: bool = True,
                   undefined: bool = False) -> bytes:
    """Encode one element (``undefined``: length 0xFFFFFFFF, the caller adds the delimiter)."""
    endian = "<" if little else ">"
    head = struct.pack(endian + "HH", tag >> 16, tag & 0xFFFF)
    length = UNDEFINED if undefined else len(value)
    if implicit:
        return head + struct.pack(endian + "L", length) + value
    if vr in LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack(endian + "L", length) + value
    return head + vr.encode() + struct.pack(endian + "H", length) + value


def encode_item(content: bytes, *, little: bool = True, undefined: bool = False) -> bytes:
    endian = "<" if little else ">"
    start = struct.pack(endian + "HHL", 0xFFFE, 0xE000, UNDEFINED if undefined else len(content))
    end = struct.pack(endian + "HHL", 0xFFFE, 0xE00D, 0) if undefined else b""
    return start + content + end


def sequence_delimiter(little: bool = True) -> bytes:
    return struct.pack(("<" if little else ">") + "HHL", 0xFFFE, 0xE0DD, 0)


def insert_in_order(part: Part10, tag: int, encoded: bytes) -> Part10:
    """Insert an encoded top-level element before the first element with a larger tag."""
    data = part.dataset_bytes
    later = [e.header for e in part.elements().values() if e.tag > tag]
    at = min(later) if later else len(data)
    assert tag not in part.elements(), hex(tag)
    return part.with_dataset(data[:at] + encoded + data[at:])


_serial = itertools.count(1)


def fresh_uid(length: int) -> str:
    """A new valid UID of exactly ``length`` characters (2.25 + digits, no leading zero)."""
    digits = "9" + f"{next(_serial):06d}" + "".join(str(uuid.uuid4().int) for _ in range(3))
    return ("2.25." + digits)[:length]


# --------------------------------------------------------------------------- the node and SCU


def build_node(root: Path) -> tuple[Node, object]:
    """Start the SCP on a migrated SQLite DB; return the node and the server to shut down."""
    db_dir = root / "db"
    url = f"sqlite:///{db_dir / 'radnode.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    spool = root / "node" / "spool"
    spool.mkdir(parents=True)  # the node creates it at start-up (service/node.py)
    port = free_port()
    server = start_scp(
        DicomSettings(ae_title="RADNODE", host="127.0.0.1", port=port,
                      acse_timeout_s=10, dimse_timeout_s=10, network_timeout_s=10),
        StoreContext(spool, factory),
    )
    return Node(port, root, spool, db_dir, engine, factory), server


@contextmanager
def chunked_send() -> Iterator[None]:
    """Make ``send_c_store(path)`` send the file's data set bytes without decoding them."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


@contextmanager
def running_node(root: Path) -> Iterator[Node]:
    node, server = build_node(root)
    try:
        yield node
    finally:
        server.shutdown()  # type: ignore[attr-defined]
        node.engine.dispose()


@pytest.fixture(scope="module")
def raw_send() -> Iterator[None]:
    with chunked_send():
        yield


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory, raw_send: None) -> Iterator[Node]:
    """One node for the cases that cannot break the spool/table agreement."""
    with running_node(tmp_path_factory.mktemp("hostile") / "root") as node:
        yield node


@pytest.fixture
def own_node(tmp_path: Path, raw_send: None) -> Iterator[Node]:
    """A node of its own, for a case that leaves the spool and the table disagreeing."""
    with running_node(tmp_path / "root") as node:
        yield node


class Sender:
    """An SCU that sends Part10 objects as raw bytes; re-associates when the peer aborted."""

    def __init__(self, port: int, contexts: Sequence[tuple[str, str]], workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ae = AE(ae_title="HOSTILE")
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 10
        for sop_class, syntax in dict.fromkeys(contexts):
            self.ae.add_requested_context(sop_class, syntax)
        self.ae.add_requested_context(Verification)
        self.assoc: Association | None = None
        self.associations = 0
        self.last_comment = ""  # Error Comment of the last response

    def associate(self) -> Association:
        if self.assoc is None or not self.assoc.is_established:
            assoc = self.ae.associate("127.0.0.1", self.port, ae_title="RADNODE",
                                      evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)])
            assert assoc.is_established, "the SCP no longer accepts associations"
            self.assoc = assoc
            self.associations += 1
        return self.assoc

    def store(self, part: Part10) -> int | None:
        """Send ``part``; its status, or None if the association was aborted / timed out."""
        assoc = self.associate()
        path = self.workdir / f"{part.sop_instance}.dcm"
        path.write_bytes(part.meta + part.body)
        try:
            rsp = assoc.send_c_store(path)
        finally:
            path.unlink()
        self.last_comment = str(rsp.get("ErrorComment", ""))
        return int(rsp.Status) if "Status" in rsp else None

    def echo(self) -> int | None:
        rsp = self.associate().send_c_echo()
        return int(rsp.Status) if "Status" in rsp else None

    def release(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None


def store_on_context(assoc: Association, context_id: int, sop_class: str, part: Part10) -> (
        int | None):
    """Send a C-STORE whose Affected SOP Class UID is ``sop_class`` on ``context_id``.

    The same steps as ``Association.send_c_store`` without its check that the SOP Class
    matches the context's abstract syntax.
    """
    req = C_STORE()
    req.MessageID = 1
    req.Priority = 2
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = part.sop_instance
    req.DataSet = io.BytesIO(part.body)
    assoc._reactor_checkpoint.clear()
    try:
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(req, context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        return None
    status: Dataset = assoc._check_received_status(rsp)
    return int(status.Status) if "Status" in status else None


# --------------------------------------------------------------------------- invariants


def is_failure(status: int) -> bool:
    return (status >> 8) in FAILURE_CLASSES or (status >> 12) == 0xC


def temp_files(node: Node) -> list[Path]:
    return sorted(node.root.rglob(".incoming-*"))


def rows_by_uid(node: Node) -> dict[str, Instance]:
    with node.session_factory() as session:
        return {i.sop_instance_uid: i for i in session.scalars(select(Instance))}


def assert_consistent(node: Node) -> None:
    """Spool and table agree; no temporary file; nothing outside the spool."""
    files = {p for p in node.spool_files() if not p.name.startswith(".incoming-")}
    rows = {node.spool / i.path for i in node.instances()}
    assert files - rows == set(), "files in the spool without a row"
    assert rows - files == set(), "rows without a file in the spool"
    assert temp_files(node) == []
    assert node.stray_files() == []
    assert all(p.resolve().is_relative_to(node.spool.resolve()) for p in files)


def stored_dataset(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def assert_stored(node: Node, part: Part10, *, consistent: bool = True) -> None:
    """Answered 0x0000: a row, and a file carrying exactly the data set bytes sent."""
    row = rows_by_uid(node).get(part.sop_instance)
    assert row is not None, "answered Success without a row"
    path = node.spool / row.path
    assert path.is_file(), "answered Success without a file"
    assert stored_dataset(path) == part.body, "the stored data set differs from what was sent"
    file_meta, _ = split_dataset(path)
    assert file_meta.MediaStorageSOPInstanceUID == part.sop_instance
    assert file_meta.TransferSyntaxUID == part.syntax
    assert row.size_bytes == path.stat().st_size
    if consistent:
        assert_consistent(node)


def assert_left_nothing(node: Node, part: Part10) -> None:
    assert part.sop_instance not in rows_by_uid(node)
    assert not any(p.name.startswith(part.sop_instance) for p in node.spool.rglob("*"))
    assert_consistent(node)


def assert_refused(node: Node, status: int | None, part: Part10, expected: int) -> None:
    assert status is not None, "no C-STORE response"
    assert is_failure(status), f"0x{status:04X} is not a failure status"
    assert status >> 8 == expected >> 8, f"0x{status:04X}, expected 0x{expected:04X}"
    assert_left_nothing(node, part)


class Lab:
    """The data folder, the node and an SCU, for one test."""

    def __init__(self, data: Path, node: Node, workdir: Path) -> None:
        self.data = data
        self.node = node
        self.workdir = workdir
        self.healthy = Part10.read(data / CT_SMALL)
        self.sender = self.new_sender()

    def part(self, relative: str) -> Part10:
        """A real file under a fresh SOP Instance UID (so that no case is a duplicate)."""
        base = Part10.read(self.data / relative)
        return base.renamed(fresh_uid(len(base.sop_instance)))

    def new_sender(self, extra: Sequence[Part10] = ()) -> Sender:
        contexts = [(CTImageStorage, ExplicitVRLittleEndian)] + [
            (p.sop_class, p.syntax) for p in extra]
        return Sender(self.node.port, contexts, self.workdir / "scu")

    def send(self, part: Part10) -> int | None:
        if (part.sop_class, part.syntax) not in {
                (c.abstract_syntax, c.transfer_syntax[0])
                for c in self.sender.ae.requested_contexts}:
            self.sender.release()
            self.sender = self.new_sender([part])
        return self.sender.store(part)

    def assert_alive(self) -> None:
        """A valid instance is accepted on the same association and on a new one."""
        for sender in (self.sender, self.new_sender()):
            part = self.healthy.renamed(fresh_uid(len(self.healthy.sop_instance)))
            assert sender.store(part) == 0x0000
            assert_stored(self.node, part, consistent=False)  # the case itself checked that
            assert sender.echo() == 0x0000
            if sender is not self.sender:
                sender.release()

    def close(self) -> None:
        self.sender.release()


@contextmanager
def open_lab(data: Path, node: Node, workdir: Path) -> Iterator[Lab]:
    lab = Lab(data, node, workdir)
    try:
        yield lab
        lab.assert_alive()  # after every case, the node still accepts a valid instance
    finally:
        lab.close()


@pytest.fixture
def lab(test_data_dir: Path, shared_node: Node, tmp_path: Path) -> Iterator[Lab]:
    with open_lab(test_data_dir, shared_node, tmp_path) as opened:
        yield opened


@pytest.fixture
def own_lab(test_data_dir: Path, own_node: Node, tmp_path: Path) -> Iterator[Lab]:
    with open_lab(test_data_dir, own_node, tmp_path) as opened:
        yield opened


def expect_success_identical(lab: Lab, part: Part10) -> None:
    assert lab.send(part) == 0x0000
    assert_stored(lab.node, part)


# --------------------------------------------------------------------------- truncated


def _truncated(part: Part10, where: str) -> Part10:
    data = part.dataset_bytes
    elements = part.elements()
    if where == "inside Pixel Data":
        pixels = elements[PIXEL_DATA]
        return part.with_dataset(data[:pixels.value + pixels.length // 2 + 1])
    if where == "inside an element header":
        rows = elements[0x00280010]
        return part.with_dataset(data[:rows.header + 3])
    if where == "inside a short value":
        rows = elements[0x00280010]
        return part.with_dataset(data[:rows.value + 1])
    if where == "before the Study Instance UID":
        return part.with_dataset(data[:elements[STUDY_UID].header + 5])
    if where == "encapsulated Pixel Data without its delimiter":
        end = part.element_end(PIXEL_DATA)
        assert data[end - 8:end] == sequence_delimiter(part.little)
        return part.with_dataset(data[:end - 8])
    raise AssertionError(where)


@pytest.mark.parametrize(("source", "where"), [
    (CT_SMALL, "before the Study Instance UID"),
    # pydicom raises EOFError looking for the delimiter and returns an empty data set, so
    # the refusal says "Study Instance UID is missing": the right status, an odd comment.
    (MR_RLE, "encapsulated Pixel Data without its delimiter"),
])
def test_truncated_data_set_is_refused(lab: Lab, source: str, where: str) -> None:
    part = _truncated(lab.part(source), where)
    assert_refused(lab.node, lab.send(part), part, 0xC000)


@pytest.mark.parametrize(("source", "where"), [
    (CT_SMALL, "inside Pixel Data"),
    (CT_SMALL, "inside an element header"),
    (CT_SMALL, "inside a short value"),
])
def test_truncated_inside_an_element_is_refused(lab: Lab, source: str, where: str) -> None:
    part = _truncated(lab.part(source), where)
    status = lab.send(part)
    if status == 0x0000:  # what happens today: at least the invariants of a Success hold
        assert_stored(lab.node, part)
    assert_refused(lab.node, status, part, 0xC000)


# --------------------------------------------------------------------------- wrong VRs


def _with_vr(part: Part10, tag: int, vr: bytes) -> Part10:
    element = part.elements()[tag]
    assert element.vr is not None and len(vr) == 2
    data = bytearray(part.dataset_bytes)
    data[element.header + 4:element.header + 6] = vr
    return part.with_dataset(bytes(data))


@pytest.mark.parametrize("vr", [b"US", b"AT", b"SQ", b"FD", b"ZZ", b"\0\0"])
def test_wrong_vr_on_the_study_uid_is_refused(lab: Lab, vr: bytes) -> None:
    part = _with_vr(lab.part(CT_SMALL), STUDY_UID, vr)
    assert_refused(lab.node, lab.send(part), part, 0xC000)


def test_text_vr_on_the_study_uid_is_refused(lab: Lab) -> None:
    part = _with_vr(lab.part(CT_SMALL), STUDY_UID, b"DS")
    status = lab.send(part)
    if status == 0x0000:
        assert_stored(lab.node, part)
    assert_refused(lab.node, status, part, 0xC000)


def assert_stored_or_refused(lab: Lab, status: int | None, part: Part10) -> None:
    """A case a storage SCP may accept (stored byte for byte) or refuse with 0xC000."""
    assert status is not None
    if status == 0x0000:
        assert_stored(lab.node, part)
    else:
        assert_refused(lab.node, status, part, 0xC000)


@pytest.mark.parametrize(("tag", "vr"), [
    (0x00280010, b"UI"),  # Rows
    (0x00100010, b"UN"),  # Patient's Name, VR that changes the header layout
    (0x00180050, b"US"),  # Slice Thickness, DS read as US
], ids=["Rows-UI", "PatientName-UN", "SliceThickness-US"])
def test_wrong_vr_elsewhere_is_stored_as_sent_or_refused(lab: Lab, tag: int, vr: bytes) -> None:
    """Elements the SCP does not read need not be checked: stored as sent, or refused."""
    part = _with_vr(lab.part(CT_SMALL), tag, vr)
    status = lab.send(part)
    assert_stored_or_refused(lab, status, part)


def test_wrong_vr_on_modality_is_refused(lab: Lab) -> None:
    """The SCP reads Modality: 2 bytes of "CT" as FD cannot be decoded -> 0xC000."""
    part = _with_vr(lab.part(CT_SMALL), 0x00080060, b"FD")
    assert_refused(lab.node, lab.send(part), part, 0xC000)


# --------------------------------------------------------------------------- SOP Class mismatch


def test_data_set_sop_class_differs_from_the_context(lab: Lab) -> None:
    """File meta, request and context say CT Image Storage; the data set says MR."""
    part = lab.part(CT_SMALL)
    element = part.elements()[SOP_CLASS_UID]
    data = part.dataset_bytes
    value = data[element.value:element.value + element.length]
    assert value.rstrip(b"\0") == CTImageStorage.encode()
    mr = MRImageStorage.encode().ljust(element.length, b"\0")
    assert len(mr) == element.length
    part = part.with_dataset(data[:element.value] + mr + data[element.value + element.length:])
    assert_refused(lab.node, lab.send(part), part, 0xA900)


def test_data_set_sop_instance_differs_from_the_request(lab: Lab) -> None:
    part = lab.part(CT_SMALL)
    part = part.renamed(fresh_uid(len(part.sop_instance)), meta_only=True)
    assert_refused(lab.node, lab.send(part), part, 0xA900)


def test_request_sop_class_differs_from_the_context(lab: Lab) -> None:
    part = lab.part(MR_SMALL)
    assert part.syntax == ExplicitVRLittleEndian
    assoc = lab.sender.associate()
    (ct_context,) = [c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage]
    assert MRImageStorage not in {c.abstract_syntax for c in assoc.accepted_contexts}
    status = store_on_context(assoc, int(ct_context.context_id or 0), MRImageStorage, part)
    if status == 0x0000:
        assert_stored(lab.node, part)
    assert_refused(lab.node, status, part, 0xA900)


def test_unknown_sop_class_on_a_storage_context_is_not_stored(lab: Lab) -> None:
    """pynetdicom has no service for "1.2.3.4" and aborts the association; nothing is stored."""
    part = lab.part(CT_SMALL)
    assoc = lab.sender.associate()
    (ct_context,) = [c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage]
    status = store_on_context(assoc, int(ct_context.context_id or 0), "1.2.3.4", part)
    if status is None:  # aborted by the SCP
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.01)
        assert assoc.is_aborted
        assert_left_nothing(lab.node, part)
    else:
        assert_refused(lab.node, status, part, 0xA900)


# --------------------------------------------------------------------------- pixel data


def test_missing_pixel_data_is_stored_as_sent(lab: Lab) -> None:
    part = lab.part(CT_SMALL)
    pixels = part.elements()[PIXEL_DATA]
    data = part.dataset_bytes
    part = part.with_dataset(data[:pixels.header] + data[part.element_end(PIXEL_DATA):])
    assert PIXEL_DATA not in part.elements()
    expect_success_identical(lab, part)


@pytest.mark.parametrize("source", [CT_SMALL, ENHANCED_MR, MR_IMPLICIT, MR_BIG_ENDIAN])
def test_short_pixel_data_is_stored_as_sent(lab: Lab, source: str) -> None:
    """Pixel Data shorter than Rows x Columns x frames, with a consistent length field."""
    part = lab.part(source)
    pixels = part.elements()[PIXEL_DATA]
    data = part.dataset_bytes
    keep = (pixels.length * 3 // 10) & ~1  # 30 % (3 of the 10 frames of the enhanced MR)
    length = struct.pack(part.endian + ("L" if pixels.length_size == 4 else "H"), keep)
    part = part.with_dataset(data[:pixels.length_at] + length
                             + data[pixels.value:pixels.value + keep]
                             + data[pixels.value + pixels.length:])
    assert part.elements()[PIXEL_DATA].length == keep
    expect_success_identical(lab, part)


def _fragments(part: Part10) -> list[tuple[int, int]]:
    """(offset, length) of each fragment of encapsulated Pixel Data (after the offset table)."""
    data = part.dataset_bytes
    pixels = part.elements()[PIXEL_DATA]
    assert pixels.length == UNDEFINED
    at, found = pixels.value, []
    while True:
        group, element, length = struct.unpack(part.endian + "HHL", data[at:at + 8])
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        assert (group, element) == (0xFFFE, 0xE000)
        found.append((at + 8, length))
        at += 8 + length
    return found[1:]


@pytest.mark.parametrize("source", [MR_RLE, MR_J2K, MR_JLS, NM_JPEG_EXTENDED])
@pytest.mark.parametrize("damage", ["scrambled", "second half zeroed"])
def test_broken_compressed_stream_is_stored_as_sent(lab: Lab, source: str, damage: str) -> None:
    """The SCP never decodes pixels: a broken codestream is stored byte for byte."""
    part = lab.part(source)
    data = bytearray(part.dataset_bytes)
    fragments = _fragments(part)
    assert fragments
    for offset, length in fragments:
        if damage == "scrambled":
            for i in range(offset + 2, offset + length):
                data[i] ^= 0x5A
        else:
            half = offset + length // 2
            data[half:offset + length] = bytes(offset + length - half)
    part = part.with_dataset(bytes(data))
    expect_success_identical(lab, part)


@pytest.mark.parametrize("damage", ["reserved block type", "truncated", "garbage"])
def test_broken_deflate_stream_is_refused(lab: Lab, damage: str) -> None:
    """Deflated Explicit VR LE must be inflated to read the UIDs: broken -> 0xC000."""
    part = lab.part(DEFLATED)
    body = bytearray(part.body)
    if damage == "reserved block type":
        body[0] |= 0b110  # BTYPE = 11 (RFC 1951 3.2.3: reserved, an error)
    elif damage == "truncated":
        body = body[:len(body) // 2]
    else:
        body = bytearray(uuid.UUID(int=7).bytes * 16)
    part = part.with_body(bytes(body))
    assert_refused(lab.node, lab.send(part), part, 0xC000)


# --------------------------------------------------------------------------- private tags


def _private_block(implicit: bool, little: bool) -> tuple[int, bytes]:
    """Unknown private elements: a creator, OB/UN/SQ data, no-creator and reserved elements."""
    def el(tag: int, vr: str, value: bytes, undefined: bool = False) -> bytes:
        return encode_element(tag, vr, value, implicit=implicit, little=little,
                              undefined=undefined)

    nested = el(0x43210010, "LO", b"HOSTILE NESTED") + el(0x43211001, "UN", b"\x01\x02\x03\x04")
    block = b"".join([
        el(0x43210010, "LO", b"HOSTILE PRIVATE "),
        el(0x43211001, "OB", bytes(range(256)) * 4),
        el(0x43211002, "UN", b"\xff\xfe\xfd\xfc" * 9),
        el(0x43211003, "SQ", encode_item(nested, little=little, undefined=True), undefined=True)
        + sequence_delimiter(little),
        el(0x43211004, "LT", b"text in an unknown private element".ljust(34)),
        el(0x43230005, "LO", b"RESERVED"),  # (gggg,0001-000F) may not be used
        el(0x43251010, "LO", b"NO CREATOR"),  # a private element without its creator
    ])
    return 0x43210010, block


@pytest.mark.parametrize("source", [CT_SMALL, MR_IMPLICIT, MR_BIG_ENDIAN])
def test_unknown_private_tags_are_stored_as_sent(lab: Lab, source: str) -> None:
    part = lab.part(source)
    tag, block = _private_block(part.implicit, part.little)
    part = insert_in_order(part, tag, block)
    assert {0x43210010, 0x43211003, 0x43251010} <= set(part.elements())
    expect_success_identical(lab, part)


# --------------------------------------------------------------------------- huge sequences


def _referenced_images(count: int, undefined: bool) -> bytes:
    item = (encode_element(0x00081150, "UI", CTImageStorage.encode() + b"\0", implicit=False)
            + encode_element(0x00081155, "UI", b"1.2.826.0.1.3680043.8.498.1234567890123456",
                             implicit=False))
    items = encode_item(item, undefined=undefined) * count
    if undefined:
        return (encode_element(0x00081140, "SQ", items, implicit=False, undefined=True)
                + sequence_delimiter())
    return encode_element(0x00081140, "SQ", items, implicit=False)


@pytest.mark.parametrize(("count", "undefined"), [(100_000, False), (50_000, True)])
def test_sequence_with_many_items_is_stored_as_sent(lab: Lab, count: int,
                                                    undefined: bool) -> None:
    part = lab.part(CT_SMALL)
    part = insert_in_order(part, 0x00081140, _referenced_images(count, undefined))
    assert len(part.body) > 4_000_000
    expect_success_identical(lab, part)


def _nested(depth: int) -> bytes:
    inner = encode_element(0x0040A160, "UT", b"the innermost text", implicit=False)
    for _ in range(depth):
        inner = (encode_element(0x0040A730, "SQ", encode_item(inner, undefined=True),
                                implicit=False, undefined=True) + sequence_delimiter())
    return inner


def test_deeply_nested_sequence_of_sane_depth_is_stored_as_sent(lab: Lab) -> None:
    part = insert_in_order(lab.part(CT_SMALL), 0x0040A730, _nested(64))
    expect_success_identical(lab, part)


def test_absurdly_nested_sequence_is_refused_or_stored(lab: Lab) -> None:
    """1000 levels: pydicom's recursive reader gives up (RecursionError) -> 0xC000 today."""
    part = insert_in_order(lab.part(CT_SMALL), 0x0040A730, _nested(1000))
    status = lab.send(part)
    assert_stored_or_refused(lab, status, part)


# --------------------------------------------------------------------------- the odd real files


def _dicom_files(root: Path) -> list[Path]:
    found = []
    for folder in ODD_FILE_FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                with path.open("rb") as handle:
                    handle.seek(128)
                    if handle.read(4) == b"DICM":
                        found.append(path)
    return found


def test_every_odd_real_file_is_stored(lab: Lab) -> None:
    parts = [Part10.read(p) for p in _dicom_files(lab.data)]
    assert len(parts) >= 70
    sender = lab.new_sender(parts)
    statuses = {}
    try:
        for part in parts:
            statuses[part.name] = sender.store(part)
    finally:
        sender.release()
    assert {n: s for n, s in statuses.items() if s != 0x0000} == {}

    arrivals = Counter(p.sop_instance for p in parts)
    first = {}
    for part in parts:
        first.setdefault(part.sop_instance, part)
    rows = rows_by_uid(lab.node)
    assert set(arrivals) <= set(rows)
    for uid, part in first.items():
        assert rows[uid].duplicates == arrivals[uid] - 1, part.name
        assert rows[uid].sop_class_uid == part.sop_class, part.name
        assert rows[uid].transfer_syntax_uid == part.syntax, part.name
        assert stored_dataset(lab.node.spool / rows[uid].path) == part.body, part.name
    assert_consistent(lab.node)


# --------------------------------------------------------------------------- found on the way


@pytest.mark.parametrize("same_series", [False, True], ids=["other series", "same series"])
def test_concurrent_duplicate_leaves_no_orphan_file(
    own_lab: Lab, monkeypatch: pytest.MonkeyPatch, same_series: bool
) -> None:
    lab = own_lab

    # The window between the existence check and the insert, made deterministic.
    monkeypatch.setattr(handlers.repository, "instance_exists", lambda *a, **k: False)
    first = lab.part(CT_SMALL)
    second = first
    if not same_series:
        series = first.elements()[0x0020000E]
        data = first.dataset_bytes
        old = data[series.value:series.value + series.length].rstrip(b"\0").decode()
        second = first.with_dataset(data.replace(old.encode(), fresh_uid(len(old)).encode()))
    pixels = second.elements()[PIXEL_DATA]
    data = bytearray(second.dataset_bytes)
    data[pixels.value] ^= 0xFF  # the second copy differs from the first
    second = second.with_dataset(bytes(data))
    assert lab.send(first) == 0x0000
    assert lab.send(second) == 0x0000
    monkeypatch.undo()
    (row,) = [r for r in lab.node.instances() if r.sop_instance_uid == first.sop_instance]
    assert row.duplicates == 1
    assert stored_dataset(lab.node.spool / row.path) == first.body, "first copy not kept"
    assert_consistent(lab.node)


def test_failed_directory_fsync_leaves_no_unrecorded_file(
    own_lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection, not hostile bytes: the disk fails to sync the new directory entry."""
    def failing_fsync(path: Path) -> None:
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(spool, "fsync_directory", failing_fsync)
    part = own_lab.part(CT_SMALL)
    status = own_lab.send(part)
    monkeypatch.undo()
    assert_refused(own_lab.node, status, part, 0xA700)
