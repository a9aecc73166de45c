"""Serve the HTTP application with uvicorn in a thread of the node."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("radnode.api")


class ApiServer:
    """uvicorn serving ``app`` on ``host:port`` in a daemon thread.

    Parameters
    ----------
    app : fastapi.FastAPI
        The application (:func:`service.api.app.create_app`).
    host, port : str, int
        Where to listen (port 0: any free port; see :attr:`port` after start).
    cert_file, key_file : pathlib.Path, optional
        PEM certificate and key: serve HTTPS (TLS 1.2 or later) instead of HTTP.
    trusted_proxies : sequence of str, optional
        Addresses of reverse proxies whose ``X-Forwarded-For`` and
        ``X-Forwarded-Proto`` headers are believed; none: those headers are ignored.
    """

    def __init__(self, app: FastAPI, host: str, port: int, *, cert_file: Path | None = None,
                 key_file: Path | None = None, trusted_proxies: Sequence[str] = ()) -> None:
        tls: dict[str, Any] = {}
        if cert_file is not None:
            tls = {"ssl_certfile": str(cert_file), "ssl_keyfile": str(key_file),
                   "ssl_version": ssl.PROTOCOL_TLS_SERVER}
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5,
                                proxy_headers=bool(trusted_proxies),
                                forwarded_allow_ips=list(trusted_proxies) or None, **tls)
        self.server = uvicorn.Server(config)
        self.host = host
        self.port = port
        self.scheme = "https" if cert_file is not None else "http"
        self._thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start serving; return once listening.

        Raises
        ------
        OSError
            If the server did not start (port in use, no permission).
        """
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"HTTP server could not listen on {self.host}:{self.port}")
            time.sleep(0.02)
        servers = getattr(self.server, "servers", [])
        if servers and servers[0].sockets:
            self.port = int(servers[0].sockets[0].getsockname()[1])
        log.info("HTTP API and dashboard on %s://%s:%d/", self.scheme, self.host, self.port)

    def stop(self) -> None:
        """Stop serving (waits up to 10 s)."""
        self.server.should_exit = True
        self._thread.join(timeout=10)
