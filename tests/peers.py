"""Real peers for tests: an Orthanc PACS (DIMSE, Storage Commitment SCP, DICOMweb).

Orthanc 1.10 and its DICOMweb plugin come from Debian (``apt-get install orthanc
orthanc-dicomweb``). Each :func:`orthanc` call starts its own ``/usr/sbin/Orthanc``
process with a JSON configuration written into a temporary folder: free TCP
ports, its own storage and index folders, HTTP reachable from loopback only
(``RemoteAccessAllowed: false``), and stops it on exit. The system service is
never used.

Orthanc 1.10 has no option to bind its DICOM port to one address: it listens on
every interface (the port is random and the process lives only for a test).

Usage::

    with orthanc(tmp_path, modalities={"radnode": ("RADNODE", "127.0.0.1", port)},
                 users={"alice": "secret"}) as pacs:
        store_files(pacs.destination, paths)
        assert uid in pacs.instances()
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from service.config import Destination, StowDestination
from tests.integration.conftest import free_port, stop

ORTHANC = Path(os.environ.get("RADNODE_ORTHANC", "/usr/sbin/Orthanc"))
DICOMWEB_PLUGIN = Path(os.environ.get("RADNODE_ORTHANC_DICOMWEB",
                                      "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))


@dataclass
class OrthancPeer:
    """A running Orthanc process.

    Attributes
    ----------
    aet : str
        Its AE title.
    dicom_port, http_port : int
        Its DICOM and HTTP ports on 127.0.0.1.
    folder : pathlib.Path
        Configuration, storage, index and ``orthanc.log``.
    users : dict
        HTTP basic-auth users (empty: authentication off).
    """

    aet: str
    dicom_port: int
    http_port: int
    folder: Path
    process: subprocess.Popen[bytes]
    users: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The REST API root, e.g. ``http://127.0.0.1:8042``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb service root (for :class:`StowDestination.url`)."""
        return f"{self.url}/dicom-web"

    @property
    def log(self) -> Path:
        """Orthanc's log file."""
        return self.folder / "orthanc.log"

    @property
    def destination(self) -> Destination:
        """This Orthanc as a DICOM destination."""
        return Destination(name="orthanc", ae_title=self.aet, host="127.0.0.1",
                           port=self.dicom_port)

    def stow_destination(self, username: str | None = None,
                         password: str | None = None) -> StowDestination:
        """This Orthanc as a STOW-RS destination (by default: the first user's credentials)."""
        if username is None and self.users:
            username, password = next(iter(self.users.items()))
        return StowDestination(kind="stow", name="orthanc-web", url=self.dicomweb_url,
                               username=username, password=password, timeout_s=30)

    @property
    def auth(self) -> tuple[str, str] | None:
        """Basic-auth credentials for REST calls (the first user), None without users."""
        return next(iter(self.users.items())) if self.users else None

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path`` from the REST API and return the decoded JSON."""
        response = requests.get(f"{self.url}{path}", params=params or None, auth=self.auth,
                                timeout=30)
        response.raise_for_status()
        return response.json()

    def instances(self) -> list[str]:
        """SOP Instance UIDs of every instance Orthanc stores."""
        return [item["MainDicomTags"]["SOPInstanceUID"]
                for item in self.get("/instances", expand="")]

    def has_instance(self, sop_instance_uid: str) -> bool:
        """True if Orthanc stores an instance with this SOP Instance UID."""
        response = requests.post(f"{self.url}/tools/lookup", data=sop_instance_uid,
                                 auth=self.auth, timeout=30)
        response.raise_for_status()
        return any(item.get("Type") == "Instance" for item in response.json())

    def clear(self) -> None:
        """Delete every stored instance (to share one Orthanc between tests)."""
        for patient in self.get("/patients"):
            response = requests.delete(f"{self.url}/patients/{patient}", auth=self.auth,
                                       timeout=30)
            response.raise_for_status()

    def log_text(self) -> str:
        """Orthanc's log so far (for assertion messages)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _config(folder: Path, *, aet: str, dicom_port: int, http_port: int,
            modalities: Mapping[str, tuple[str, str, int]], users: Mapping[str, str] | None,
            dicomweb: bool, lua: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "Name": f"radnode-test-{aet}",
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": dict(users or {}),
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "DicomModalities": {name: list(entry) for name, entry in modalities.items()},
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomScuTimeout": 10,
        "DicomScpTimeout": 30,
        "StorageCommitmentReportsSize": 100,
        "SaveJobs": False,
        "HttpDescribeErrors": True,
        "HttpCompressionEnabled": False,
        "UnknownSopClassAccepted": False,
        "ConcurrentJobs": 2,
        "Plugins": [],
    }
    if lua:
        script = folder / "scripts.lua"
        script.write_text(lua)
        config["LuaScripts"] = [str(script)]
    if dicomweb:
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False,
                              "Host": "127.0.0.1", "Ssl": False}
    return config


def _wait_ready(peer: OrthancPeer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if peer.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {peer.process.returncode} while "
                               f"starting:\n{peer.log_text()[-4000:]}")
        try:
            response = requests.get(f"{peer.url}/system", auth=peer.auth, timeout=2)
            if response.status_code == 200:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", peer.dicom_port)) == 0:
                        return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"Orthanc did not answer /system within {timeout_s} s:\n"
                       f"{peer.log_text()[-4000:]}")


@contextmanager
def orthanc(
    tmp_path: Path,
    *,
    aet: str = "ORTHANC",
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    users: Mapping[str, str] | None = None,
    dicomweb: bool = True,
    lua: str | None = None,
    startup_timeout_s: float = 60.0,
) -> Iterator[OrthancPeer]:
    """Start an Orthanc process for one test and stop it afterwards.

    Parameters
    ----------
    tmp_path : pathlib.Path
        A temporary folder; Orthanc's files go to ``tmp_path / "orthanc-<aet>"``.
    aet : str
        Orthanc's AE title.
    modalities : mapping, optional
        ``{name: (AE title, host, port)}``: peers Orthanc knows (C-MOVE targets,
        and where it sends Storage Commitment reports: to the modality whose
        AE title is the calling AE title of the N-ACTION).
    users : mapping, optional
        HTTP basic-auth users ``{name: password}``; None or empty: no authentication.
    dicomweb : bool
        Load the DICOMweb plugin (service root ``<url>/dicom-web``).
    lua : str, optional
        A Lua script for ``LuaScripts``, e.g. a ``ReceivedInstanceFilter``
        that makes Orthanc refuse some instances.
    startup_timeout_s : float
        Longest wait for the REST API and the DICOM port, seconds.

    Yields
    ------
    OrthancPeer
        The running peer.

    Raises
    ------
    pytest.fail.Exception
        If Orthanc (or its DICOMweb plugin) is not installed: a failure, never a skip.
    """
    if not ORTHANC.is_file():
        pytest.fail(f"Orthanc is not installed at {ORTHANC} "
                    "(apt-get install orthanc orthanc-dicomweb)")
    if dicomweb and not DICOMWEB_PLUGIN.is_file():
        pytest.fail(f"the Orthanc DICOMweb plugin is not installed at {DICOMWEB_PLUGIN} "
                    "(apt-get install orthanc-dicomweb)")
    folder = tmp_path / f"orthanc-{aet.lower()}"
    (folder / "storage").mkdir(parents=True, exist_ok=True)
    (folder / "index").mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    while http_port == dicom_port:
        http_port = free_port()
    config = _config(folder, aet=aet, dicom_port=dicom_port, http_port=http_port,
                     modalities=modalities or {}, users=users, dicomweb=dicomweb,
                     lua=lua)
    config_file = folder / "orthanc.json"
    config_file.write_text(json.dumps(config, indent=2))
    with (folder / "orthanc.log").open("ab") as out:
        process = subprocess.Popen(
            [str(ORTHANC), "--verbose", str(config_file)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
        )
    peer = OrthancPeer(aet, dicom_port, http_port, folder, process, dict(users or {}))
    try:
        _wait_ready(peer, startup_timeout_s)
        yield peer
    finally:
        stop(process)
