"""Logging set-up. Log lines carry UIDs and AE titles, never patient data."""

from __future__ import annotations

import logging
import sys


def configure(level: str = "INFO") -> None:
    """Send radnode's log to stderr with timestamps; quieten chatty libraries."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s [%(process)d] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs whole data sets (patient attributes included) at DEBUG
    # and every association at INFO: keep it at WARNING whatever our level.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.WARNING)
