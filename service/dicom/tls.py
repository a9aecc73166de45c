"""TLS client contexts for DICOM associations (DICOM PS3.15 B.1)."""

from __future__ import annotations

import ssl

from service.config import TlsSettings


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
