"""Test certificates made with the openssl CLI: two CAs, a server and two clients.

* ``ca``: the CA that radnode and its peers trust;
* ``other_ca``: an unrelated CA (its certificates must be refused);
* ``server``: signed by ``ca`` for IP 127.0.0.1 (serverAuth);
* ``client``: signed by ``ca`` (clientAuth), a peer that may connect;
* ``stranger``: signed by ``other_ca`` (clientAuth), a peer that may not.

Keys are RSA 2048 without a password; certificates are valid for two days.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import missing


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files made by :func:`make_pki`."""

    folder: Path
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def openssl(*args: str, cwd: Path) -> None:
    """Run the openssl CLI (skips the test if it is not installed, fails under CI)."""
    exe = shutil.which("openssl")
    if exe is None:
        missing("openssl is not installed (apt-get install openssl)")
    assert exe is not None
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=radnode test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


def _make_leaf(folder: Path, name: str, ca: str, subject: str, extensions: str) -> None:
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", subject, cwd=folder)
    (folder / f"{name}.cnf").write_text(extensions)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem",
            "-extfile", f"{name}.cnf", cwd=folder)


def make_pki(folder: Path) -> Pki:
    """Create the CAs, server and client certificates in ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    _make_ca(folder, "ca")
    _make_ca(folder, "other_ca")
    leaf = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
    _make_leaf(folder, "server", "ca", "/CN=127.0.0.1",
               f"subjectAltName=IP:127.0.0.1\n{leaf}extendedKeyUsage=serverAuth\n")
    _make_leaf(folder, "client", "ca", "/CN=radnode test client",
               f"{leaf}extendedKeyUsage=clientAuth\n")
    _make_leaf(folder, "stranger", "other_ca", "/CN=radnode test stranger",
               f"{leaf}extendedKeyUsage=clientAuth\n")
    return Pki(folder, folder / "ca.pem", folder / "other_ca.pem",
               folder / "server.pem", folder / "server.key",
               folder / "client.pem", folder / "client.key",
               folder / "stranger.pem", folder / "stranger.key")
