"""Real processes for the integration suite: radnode serve, dcmtk storescp/storescu.

Nothing here is faked: the node runs as its own OS process with its embedded
Celery worker process, and the peers are dcmtk's programs from Debian.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import dcmtk_tool, missing

DCMTK_TOOLS = {"storescp", "storescu", "echoscu"}


def require_tool(name: str) -> str:
    """A program of a Debian package (dcmtk's, not pynetdicom's apps of the same name)."""
    path = dcmtk_tool(name) if name in DCMTK_TOOLS else shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (apt-get install dcmtk dicom3tools)")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


def received_files(folder: Path, settle_s: float = 1.0) -> list[Path]:
    """Every file a receiving peer (storescp, Orthanc's export) has finished writing in *folder*.

    storescp writes each object straight under its final name, so a poll can meet a file
    still being written (CI once read half a SEG). This waits until no file in *folder* has
    changed for *settle_s* seconds, then lists them all: it delays, it never leaves one out.
    Names starting with "." are skipped.
    """
    while True:
        paths = sorted(path for path in folder.iterdir()
                       if path.is_file() and not path.name.startswith("."))
        newest = max((path.stat().st_mtime for path in paths), default=0.0)
        wait_s = newest + settle_s - time.time()
        if wait_s <= 0:
            return paths
        time.sleep(min(wait_s, settle_s))


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class Peer:
    ae_title: str
    port: int
    folder: Path
    process: subprocess.Popen[bytes]
    log: Path
    http_port: int | None = None
    #: For a radnode node: the environment and ``--config`` it was started with, so that
    #: ``radnode`` commands reach the same database.
    env: dict[str, str] = field(default_factory=dict)
    config_args: tuple[str, ...] = ()
    #: API tokens made by :meth:`token`, by role.
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        """Base URL of the node's HTTP API and dashboard."""
        assert self.http_port is not None, "not a radnode node"
        return f"http://127.0.0.1:{self.http_port}"

    def radnode(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``radnode ARGS --data-dir <the node's>`` (with its config) and return the run."""
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args, "--data-dir", str(self.folder),
             *self.config_args], input=stdin, capture_output=True, text=True, timeout=120,
            check=False, env={**os.environ, **self.env, "COLUMNS": "300"})

    def add_user(self, name: str, role: str, password: str | None = None) -> None:
        """Add an HTTP user with ``radnode users add`` (token-only without a password)."""
        args = ["users", "add", name, "--role", role]
        args += ["--password-stdin"] if password is not None else ["--no-password"]
        run = self.radnode(*args, stdin=f"{password}\n" if password is not None else None)
        assert run.returncode == 0, run.stdout + run.stderr

    @property
    def token(self) -> str:
        """An API token of an admin (user ``test-admin``), made on first use."""
        return self.token_for("admin")

    def token_for(self, role: str) -> str:
        """An API token of user ``test-<role>`` (made with the real CLI on first use)."""
        assert self.http_port is not None, "not a radnode node"
        if role not in self.tokens:
            name = f"test-{role}"
            self.add_user(name, role)
            run = self.radnode("tokens", "create", name, "--label", "tests")
            assert run.returncode == 0, run.stdout + run.stderr
            self.tokens[role] = run.stdout.strip()
        return self.tokens[role]

    def auth(self, role: str = "admin") -> dict[str, str]:
        """``Authorization`` header with :meth:`token_for` ``role``."""
        return {"Authorization": f"Bearer {self.token_for(role)}"}


@contextmanager
def running_storescp(tmp_path: Path, *options: str) -> Iterator[Peer]:
    """dcmtk storescp as AE ``PACS``, writing what it receives to ``tmp_path/pacs``.

    ``options`` are more storescp flags (e.g. ``+uf``: unique file names, so
    that an instance received twice is two files).
    """
    exe = require_tool("storescp")
    folder = tmp_path / "pacs"
    folder.mkdir()
    port = free_port()
    log = tmp_path / "storescp.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [exe, "-aet", "PACS", "-od", str(folder), "+xa", *options, str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for_port(port, process)
        yield Peer("PACS", port, folder, process, log)
    finally:
        stop(process)


@pytest.fixture
def storescp_pacs(tmp_path: Path) -> Iterator[Peer]:
    """dcmtk storescp playing the PACS, writing what it receives to a folder."""
    with running_storescp(tmp_path) as peer:
        yield peer


def start_node(tmp_path: Path, *extra: str, quiet_period: float = 2.0,
               destinations: tuple[str, ...] = (), env: dict[str, str] | None = None,
               port: int | None = None) -> Peer:
    port = port or free_port()
    http_port = free_port()
    data = tmp_path / "node"
    log = tmp_path / "node.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--ae-title", "RADNODE",
           "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data),
           "--quiet-period", str(quiet_period), "--http-port", str(http_port), *extra]
    for destination in destinations:
        cmd += ["--destination", destination]
    with log.open("ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, **(env or {})})
    try:
        wait_for_port(port, process)
    except Exception:
        stop(process)
        raise RuntimeError(f"radnode serve did not start:\n{log.read_text()}") from None
    config = extra[extra.index("--config"):extra.index("--config") + 2] \
        if "--config" in extra else ()
    return Peer("RADNODE", port, data, process, log, http_port, env=dict(env or {}),
                config_args=tuple(config))
