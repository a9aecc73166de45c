"""A real SCP on loopback with one association to it, for the unit tests of the SCP's fast paths."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from service.config import DicomSettings
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.scp.handlers import StoreContext
from service.scp.server import start_scp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def associated(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """An SCP (SQLite in ``tmp_path``, spool ``tmp_path / "spool"``) and an SCU's association.

    Yields ``(assoc, served)``: the SCU's established association (CT Image
    Storage, explicit VR little endian) and the SCP's side of it. The
    association is released and the SCP shut down afterwards.
    """
    url = f"sqlite:///{tmp_path / 'radnode.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    port = free_port()
    server = start_scp(DicomSettings(ae_title="RADNODE", host="127.0.0.1", port=port),
                       StoreContext(tmp_path / "spool", make_session_factory(engine)))
    try:
        scu = AE(ae_title="SENDER")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", port, ae_title="RADNODE")
        assert assoc.is_established
        try:
            # The SCP marks its side established just after its A-ASSOCIATE-AC has gone out.
            deadline = time.monotonic() + 5
            while not (served := [a for a in server.active_associations if a.is_established]):
                assert time.monotonic() < deadline, "the SCP's side never became established"
                time.sleep(0.005)
            assert len(served) == 1
            yield assoc, served[0]
        finally:
            assoc.release()
    finally:
        server.shutdown()
        engine.dispose()
