"""Logging set-up. Log lines carry UIDs and AE titles, never patient data."""

from __future__ import annotations

import logging
import sys


class WithholdWarningText(logging.Filter):
    """Keep where a library warning came from and its category, drop its text.

    Library warnings quote the values they complain about (highdicom and
    pydicom warn about a Patient's Name, for example), so their text may carry
    patient data. The record keeps ``file:line: Category`` only.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a ``py.warnings`` record in place; never drops it."""
        parts = record.getMessage().split(": ", 2)
        where = parts[0].strip()
        category = parts[1].strip() if len(parts) > 1 else "Warning"
        record.msg = "%s: %s (text withheld: library warnings may quote patient data)"
        record.args = (where, category)
        return True


def configure(level: str = "INFO") -> None:
    """Send radnode's log to stderr with timestamps; route warnings through it safely."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s [%(process)d] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, WithholdWarningText) for f in warnings_logger.filters):
        warnings_logger.addFilter(WithholdWarningText())
    # pynetdicom logs whole data sets (patient attributes included) at DEBUG
    # and every association at INFO: keep it at WARNING whatever our level.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Its standard notification handlers format every PDU and DIMSE message for
    # those DEBUG and INFO lines (~0.2 ms per C-STORE, on the path to the
    # response), and log nothing at WARNING: do not bind them.
    from pynetdicom import _config

    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pydicom").setLevel(logging.WARNING)
    # SQLAlchemy logs statements with their parameters (INFO) and rows
    # (DEBUG); the de-identification mapping holds patient IDs and names.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
