"""A minimal receiving AE that writes every instance to a folder.

Used by ``radnode demo`` as the stand-in PACS. It is not the node's SCP: it
keeps no database and runs no pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

from service.config import DicomSettings
from service.dicom.net import set_tcp_nodelay
from service.dicom.spool import adopt, move_into_place
from service.dicom.uids import is_valid_uid
from service.scp.server import build_ae


def start_folder_scp(
    ae_title: str, host: str, port: int, folder: Path
) -> ThreadedAssociationServer:
    """Start a C-STORE SCP on ``host:port`` that writes ``<folder>/<SOP Instance UID>.dcm``.

    Raises
    ------
    OSError
        If the port cannot be bound.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def handle_store(event: evt.Event) -> int:
        request: Any = event.request  # a C_STORE primitive
        uid = str(request.AffectedSOPInstanceUID)
        if not is_valid_uid(uid):
            return 0xC000
        target = folder / f"{uid}.dcm"
        move_into_place(adopt(Path(event.dataset_path), target), target)
        return 0x0000

    ae = build_ae(DicomSettings(ae_title=ae_title, host=host, port=port))
    server = ae.start_server((host, port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store),
                                           (evt.EVT_CONN_OPEN, set_tcp_nodelay)])
    assert server is not None
    return server
