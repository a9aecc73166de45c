"""The SCP's direct encodings (C-STORE-RSP Success, File Meta) and its files made ahead.

Each direct encoding is compared byte for byte with what pynetdicom and pydicom
write; the real associations use the node's SCP on 127.0.0.1 with a pynetdicom SCU.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynetdicom.dimse_messages as dimse_messages
import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta, encode
from pynetdicom.pdu_primitives import P_DATA

from service.config import DicomSettings
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.dicom import spool
from service.scp import handlers, receive
from service.scp.handlers import StoreContext, begin_structure_check
from service.scp.responses import answer_successes_directly, encode_store_success
from service.scp.server import start_scp
from tests.unit.dicom_factory import make_ct_dataset

UIDS = [  # odd and even lengths: UI values are padded with NUL to an even length
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"),
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45"),
    ("1.2", "1.23"),
    ("1.2.840.10008.5.1.4.1.1.66.4", "2.25." + "9" * 59),
]


def _pynetdicom_response(message_id: int, sop_class: str, sop_instance: str,
                         status: int = 0x0000, comment: str | None = None) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment
    return rsp


def _pynetdicom_bytes(rsp: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    return bytes(encode(message.command_set, True, True))


# -- C-STORE-RSP ----------------------------------------------------------------------------


@pytest.mark.parametrize("message_id", [0, 1, 258, 65535])
@pytest.mark.parametrize(("sop_class", "sop_instance"), UIDS)
def test_store_success_is_what_pynetdicom_encodes(message_id: int, sop_class: str,
                                                  sop_instance: str) -> None:
    expected = _pynetdicom_bytes(_pynetdicom_response(message_id, sop_class, sop_instance))
    assert encode_store_success(message_id, sop_class, sop_instance) == expected


def test_store_success_refuses_a_message_id_out_of_range() -> None:
    with pytest.raises(Exception, match="format requires"):
        encode_store_success(65536, *UIDS[0])


class _FakeDul:
    def __init__(self) -> None:
        self.sent: list[P_DATA] = []

    def send_pdu(self, primitive: P_DATA) -> None:
        self.sent.append(primitive)


def _fake_association(max_pdu: int = 16384, sent_handlers: list[Any] | None = None
                      ) -> tuple[Any, list[tuple[Any, int]]]:
    """An association whose DIMSE provider records what pynetdicom's send_msg is given."""
    through_pynetdicom: list[tuple[Any, int]] = []
    dimse = SimpleNamespace(dul=_FakeDul(), maximum_pdu_size=max_pdu,
                            send_msg=lambda p, c: through_pynetdicom.append((p, c)))
    assoc = SimpleNamespace(dimse=dimse, get_handlers=lambda event: sent_handlers or [])
    answer_successes_directly(SimpleNamespace(assoc=assoc))  # type: ignore[arg-type]
    return assoc, through_pynetdicom


def test_a_success_goes_to_the_dul_as_one_last_command_fragment() -> None:
    assoc, through_pynetdicom = _fake_association()
    rsp = _pynetdicom_response(7, *UIDS[0])
    assoc.dimse.send_msg(rsp, 3)
    assert through_pynetdicom == []
    (pdata,) = assoc.dimse.dul.sent
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert context_id == 3
    assert pdv == b"\x03" + _pynetdicom_bytes(rsp)


@pytest.mark.parametrize("case", ["failure", "comment", "echo", "request", "small pdu",
                                  "dimse sent handler"])
def test_anything_else_goes_through_pynetdicom(case: str) -> None:
    assoc, through_pynetdicom = _fake_association(
        max_pdu=50 if case == "small pdu" else 16384,
        sent_handlers=[(print, None)] if case == "dimse sent handler" else None)
    primitive: Any = _pynetdicom_response(7, *UIDS[0])
    if case == "failure":
        primitive.Status = 0xA700
    elif case == "comment":
        primitive.ErrorComment = "warning with a comment"
    elif case == "echo":
        primitive = C_ECHO()
        primitive.MessageIDBeingRespondedTo = 7
        primitive.Status = 0x0000
    elif case == "request":
        primitive = C_STORE()
        primitive.MessageID = 7
        primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = UIDS[0]
    assoc.dimse.send_msg(primitive, 1)
    assert through_pynetdicom == [(primitive, 1)]
    assert assoc.dimse.dul.sent == []


# -- File Meta Information -------------------------------------------------------------------


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.201"])
@pytest.mark.parametrize(("sop_class", "sop_instance"), UIDS)
def test_file_meta_is_what_pydicom_writes(sop_class: str, sop_instance: str,
                                          syntax: str) -> None:
    expected = io.BytesIO()
    write_file_meta_info(expected, create_file_meta(  # type: ignore[arg-type]
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
        transfer_syntax=UID(syntax)))
    written = io.BytesIO()
    receive.write_file_meta(written, receive.file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
        transfer_syntax=UID(syntax)))
    assert written.getvalue() == expected.getvalue()


@pytest.mark.parametrize("version", ["ABC", "RADNODE_0.9"])  # SH padded with a space
def test_file_meta_pads_an_odd_implementation_version_as_pydicom_does(version: str) -> None:
    sop_class, sop_instance = UIDS[1]
    expected = io.BytesIO()
    write_file_meta_info(expected, create_file_meta(  # type: ignore[arg-type]
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
        transfer_syntax=ExplicitVRLittleEndian, implementation_version=version))
    meta = receive.FileMeta(sop_class, sop_instance, ExplicitVRLittleEndian,
                            implementation_version=version)
    assert meta.encode() == expected.getvalue()


def test_other_file_meta_calls_go_to_pynetdicom_and_pydicom() -> None:
    meta = receive.file_meta(sop_class_uid=UID(UIDS[0][0]), sop_instance_uid=UID(UIDS[0][1]),
                             transfer_syntax=ExplicitVRLittleEndian, implementation_version="X")
    assert not isinstance(meta, receive.FileMeta)
    assert meta.ImplementationVersionName == "X"
    written, expected = io.BytesIO(), io.BytesIO()
    receive.write_file_meta(written, meta)
    write_file_meta_info(expected, meta)  # type: ignore[arg-type]
    assert written.getvalue() == expected.getvalue()


# -- files made ahead ------------------------------------------------------------------------


def _wait_for(condition: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_ready_files_are_handed_out_and_unused_ones_deleted(tmp_path: Path) -> None:
    files = receive.IncomingFiles(tmp_path / "incoming", depth=3).start()
    try:
        _wait_for(lambda: files.ready == 3)
        handle = files(delete=False, mode="wb", suffix=".dcm")  # as pynetdicom calls it
        handle.write(b"data")
        handle.close()
        assert files.handed == 1 and files.made_on_the_spot == 0
        assert Path(handle.name).parent == tmp_path / "incoming"
        other = files(mode="w+b", dir=tmp_path)  # another caller: tempfile's own
        other.close()
        assert files.handed == 1 and Path(other.name).parent == tmp_path
        time.sleep(0.1)
        assert files.ready == 2  # refilled only at 1 (3 // 2) or fewer
        second = files(delete=False, mode="wb", suffix=".dcm")
        second.close()
        _wait_for(lambda: files.ready == 3)  # refilled
    finally:
        files.stop()
    assert sorted((tmp_path / "incoming").iterdir()) == sorted([Path(handle.name),
                                                                Path(second.name)])
    assert Path(handle.name).read_bytes() == b"data"


def test_files_are_made_in_batches_with_one_directory_fsync_each(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = spool.fsync_directory

    def recording(path: Path) -> None:
        real_fsync(path)
        synced.append(len(list(path.iterdir())))

    monkeypatch.setattr(spool, "fsync_directory", recording)
    files = receive.IncomingFiles(tmp_path / "incoming", depth=8).start()
    try:
        _wait_for(lambda: files.ready == 8)
        assert synced == [8]  # all eight made, then one fsync
        handed = [files(delete=False, mode="wb", suffix=".dcm") for _ in range(4)]
        _wait_for(lambda: files.ready == 8)  # at 4 (8 // 2) ready: four more, one fsync
        assert synced == [8, 12]
    finally:
        files.stop()
        for handle in handed:
            handle.close()


def test_with_none_ready_a_file_is_made_on_the_spot(tmp_path: Path) -> None:
    files = receive.IncomingFiles(tmp_path, depth=1)  # not started: nothing is made ahead
    handle = files(delete=False, mode="wb", suffix=".dcm")
    handle.close()
    assert files.made_on_the_spot == 1 and Path(handle.name).parent == tmp_path
    assert not files.named_durably(Path(handle.name))  # its name may not be on disk yet


def test_a_ready_file_is_named_durably_once_its_directory_is_fsynced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[Path, set[str]]] = []
    real_fsync = spool.fsync_directory

    def recording(path: Path) -> None:
        real_fsync(path)
        synced.append((path, {p.name for p in path.iterdir()}))

    monkeypatch.setattr(spool, "fsync_directory", recording)
    files = receive.IncomingFiles(tmp_path / "incoming", depth=2).start()
    try:
        _wait_for(lambda: files.ready == 2)
        handle = files(delete=False, mode="wb", suffix=".dcm")
        handle.close()
        name = Path(handle.name)
        # The directory was fsynced with the file's entry in it before it was handed out.
        assert any(path == tmp_path / "incoming" and name.name in names
                   for path, names in synced)
        assert files.named_durably(name)
        assert not files.named_durably(name)  # asked once: the name is forgotten
    finally:
        files.stop()


def test_install_replaces_and_uninstall_restores_pynetdicom(tmp_path: Path) -> None:
    originals = (dimse_messages.NamedTemporaryFile, dimse_messages.create_file_meta,
                 dimse_messages.write_file_meta_info)
    first = receive.install(tmp_path / "a", depth=2)
    try:
        assert dimse_messages.NamedTemporaryFile is first
        assert dimse_messages.create_file_meta is receive.file_meta
        assert dimse_messages.write_file_meta_info is receive.write_file_meta
        _wait_for(lambda: first.ready == 2)
        second = receive.install(tmp_path / "b", depth=2)  # replaces: the first one stops
        assert dimse_messages.NamedTemporaryFile is second
        assert list((tmp_path / "a").iterdir()) == []
        receive.uninstall(first)  # not the active one: nothing changes
        assert dimse_messages.NamedTemporaryFile is second
    finally:
        receive.uninstall(second)
    assert (dimse_messages.NamedTemporaryFile, dimse_messages.create_file_meta,
            dimse_messages.write_file_meta_info) == originals
    assert list((tmp_path / "b").iterdir()) == []


# -- real associations -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def scp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> Iterator[tuple[int, Path, receive.IncomingFiles]]:
    yield from _serve(tmp_path, monkeypatch, begin=None)


@pytest.fixture
def scp_begun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[tuple[int, Path, receive.IncomingFiles]]:
    """As the node runs it: each data set's structure check begins on its first fragment."""
    yield from _serve(tmp_path, monkeypatch, begin=begin_structure_check)


def _serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, begin: Any
           ) -> Iterator[tuple[int, Path, receive.IncomingFiles]]:
    # As service.logging.configure sets it before the SCP starts: pynetdicom binds no
    # logging handler to EVT_DIMSE_SENT (one bound would take pynetdicom's path).
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")
    url = f"sqlite:///{tmp_path / 'radnode.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    spool = tmp_path / "spool"
    port = _free_port()
    server = start_scp(DicomSettings(ae_title="RADNODE", host="127.0.0.1", port=port,
                                     acse_timeout_s=10, dimse_timeout_s=10,
                                     network_timeout_s=10),
                       StoreContext(spool, make_session_factory(engine)))
    files = receive.install(spool / ".incoming", begin=begin)
    try:
        yield port, spool, files
    finally:
        server.shutdown()
        receive.uninstall(files)
        engine.dispose()


def _ct_scu() -> AE:
    """An SCU proposing CT Image Storage in explicit and in implicit VR little endian."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian])
    return ae


def test_a_real_association_uses_both_and_stores_what_pydicom_reads(
        scp: tuple[int, Path, receive.IncomingFiles], monkeypatch: pytest.MonkeyPatch) -> None:
    port, spool, files = scp
    through_pynetdicom: list[int] = []
    pynetdicom_send = DIMSEServiceProvider.send_msg

    def counting(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
        if primitive.MessageIDBeingRespondedTo is not None:  # the SCP's responses
            through_pynetdicom.append(int(primitive.Status))
        pynetdicom_send(self, primitive, context_id)

    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", counting)
    ae = _ct_scu()
    sent = [make_ct_dataset(rows=16, columns=16) for _ in range(3)]
    sent[1].file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    bad = make_ct_dataset(rows=16, columns=16)
    del bad.SeriesInstanceUID  # refused: 0xC000 with an Error Comment
    assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(ds) for ds in [*sent, bad]]
    finally:
        assoc.release()
    assert [int(s.Status) for s in statuses] == [0x0000, 0x0000, 0x0000, 0xC000]
    assert "Series Instance UID" in str(statuses[3].ErrorComment)
    assert through_pynetdicom == [0xC000]  # the three Successes went directly
    assert files.handed >= 1
    for ds in sent:
        (path,) = spool.rglob(f"{ds.SOPInstanceUID}.dcm")
        stored = dcmread(path)
        assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert stored.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert stored.SeriesInstanceUID == ds.SeriesInstanceUID
        assert stored.PixelData == ds.PixelData



def test_a_file_made_ahead_is_renamed_into_the_spool_without_directory_fsyncs(
        scp: tuple[int, Path, receive.IncomingFiles], monkeypatch: pytest.MonkeyPatch) -> None:
    port, spool_dir, files = scp
    _wait_for(lambda: files.ready >= 2)
    synced: list[Path] = []
    real_fsync = spool.fsync_directory

    def recording(path: Path) -> None:
        synced.append(path)
        real_fsync(path)

    monkeypatch.setattr(spool, "fsync_directory", recording)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    sent = [make_ct_dataset(rows=16, columns=16) for _ in range(2)]
    assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
    assert assoc.is_established
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in sent] == [0, 0]
    finally:
        assoc.release()
    assert files.handed >= 2
    # Only the ready files' own folder was fsynced (refilled); the spool's folders were
    # left to the journal, since a crash that undoes a rename is undone by recovery.
    assert {path.name for path in synced} <= {".incoming"}
    for ds in sent:
        (path,) = spool_dir.rglob(f"{ds.SOPInstanceUID}.dcm")
        assert dcmread(path).SOPInstanceUID == ds.SOPInstanceUID


def test_the_check_begun_on_the_first_fragment_reads_no_file_and_refuses_alike(
        scp_begun: tuple[int, Path, receive.IncomingFiles],
        monkeypatch: pytest.MonkeyPatch) -> None:
    port, spool_dir, files = scp_begun
    whole_checks: list[Path] = []
    check_file = handlers._check_file

    def counting(received: Path, transfer_syntax: Any) -> Any:
        whole_checks.append(received)
        return check_file(received, transfer_syntax)

    monkeypatch.setattr(handlers, "_check_file", counting)
    ae = _ct_scu()
    # 256×256 16-bit pixels: the data set arrives in several fragments (16 KiB PDUs).
    sent = [make_ct_dataset(rows=256, columns=256) for _ in range(2)]
    sent[1].file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    small = make_ct_dataset(rows=8, columns=8)  # one fragment
    bad = make_ct_dataset(rows=256, columns=256)
    del bad.StudyInstanceUID  # refused: 0xC000, as by the check of the whole file
    assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE", max_pdu=16384)
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in [*sent, small, bad]]
    finally:
        assoc.release()
    assert statuses == [0x0000, 0x0000, 0x0000, 0xC000]
    assert whole_checks == []  # every check ended from its first fragment
    for ds in [*sent, small]:
        (path,) = spool_dir.rglob(f"{ds.SOPInstanceUID}.dcm")
        stored = dcmread(path)
        assert stored.SeriesInstanceUID == ds.SeriesInstanceUID
        assert stored.PixelData == ds.PixelData
    assert not list(spool_dir.rglob(f"{bad.SOPInstanceUID}.dcm"))
    assert files.handed >= 4
