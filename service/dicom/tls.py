"""TLS contexts for DICOM associations (DICOM PS3.15 B.1, B.9).

* :func:`client_context`: outbound associations to destinations;
* :func:`server_context`: the SCP's TLS listener (``dicom.tls``).

Both accept TLS 1.2 and newer only (BCP 195, as the Non-downgrading BCP 195
TLS Secure Transport Connection Profile of DICOM PS3.15 B.9 asks).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from service.config import ScpTlsSettings, TlsSettings
from service.errors import ConfigError


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """An SSL context that verifies the peer's certificate (TLS 1.2 or newer).

    Parameters
    ----------
    tls : TlsSettings
        CA file (None: the system's trust store), radnode's own certificate
        and key for client authentication, and whether to check the host name.

    Raises
    ------
    OSError
        If a certificate or key file cannot be read.
    ssl.SSLError
        If a file is not a valid PEM certificate or key.
    """
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.check_hostname
    if tls.cert_file is not None:
        context.load_cert_chain(str(tls.cert_file),
                                str(tls.key_file) if tls.key_file else None)
    return context


def tls_args(tls: TlsSettings | None, host: str) -> tuple[ssl.SSLContext, str] | None:
    """The ``tls_args`` for :meth:`pynetdicom.AE.associate`, or None without TLS.

    Raises
    ------
    OSError, ssl.SSLError
        As :func:`client_context`.
    """
    if tls is None:
        return None
    return client_context(tls), host


def _readable(path: Path, key: str) -> str:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key} {path}: {exc.strerror or exc}") from exc
    return str(path)


def server_context(tls: ScpTlsSettings) -> ssl.SSLContext:
    """The SCP's TLS context: its certificate, TLS 1.2 or newer, client certificates.

    Parameters
    ----------
    tls : ScpTlsSettings
        Certificate and key of the node; ``ca_file`` and
        ``require_client_cert`` for client certificates: with no ``ca_file``
        none is asked for; with one, a certificate the peer presents must be
        signed by those CAs; with ``require_client_cert`` a peer without one
        is refused during the handshake.

    Returns
    -------
    ssl.SSLContext
        For :meth:`pynetdicom.AE.start_server` (``ssl_context``).

    Raises
    ------
    ConfigError
        If a file cannot be read, is not PEM, or the key does not belong to
        the certificate; the message names the key (``dicom.tls.cert_file``).

    Notes
    -----
    DICOM PS3.15 B.9 (Non-downgrading BCP 195 TLS Secure Transport Connection
    Profile): TLS 1.2 or newer; the cipher suites are OpenSSL's defaults for
    that version, which exclude those BCP 195 forbids (NULL, export, RC4).
    """
    cert = _readable(tls.cert_file, "dicom.tls.cert_file")
    key = _readable(tls.key_file, "dicom.tls.key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"dicom.tls.cert_file {cert} and dicom.tls.key_file {key}: not a PEM "
                          f"certificate and its unencrypted private key ({exc.reason})") from exc
    if tls.ca_file is not None:
        ca = _readable(tls.ca_file, "dicom.tls.ca_file")
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(f"dicom.tls.ca_file {ca}: not a PEM bundle of CA certificates "
                              f"({exc.reason})") from exc
        context.verify_mode = (ssl.CERT_REQUIRED if tls.require_client_cert
                               else ssl.CERT_OPTIONAL)
    return context
