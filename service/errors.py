"""Errors, grouped by what happens next.

* :class:`ConfigError`: the operator must fix the configuration; nothing starts.
* :class:`InvalidInstanceError`: a received object is refused with a DIMSE failure
  status; the node keeps running.
* :class:`TransientError`: try again later (a destination is down, the disk is
  busy); jobs and deliveries are retried with backoff.
* :class:`PermanentError`: retrying cannot help; the job or delivery fails and
  the stored reason is shown to the operator. The data is kept.
"""

from __future__ import annotations


class RadnodeError(Exception):
    """Base class of radnode's own errors."""


class ConfigError(RadnodeError):
    """The configuration is invalid; the message names the key and the problem."""


class InvalidInstanceError(RadnodeError):
    """A received instance cannot be stored.

    Parameters
    ----------
    message : str
        Reason, sent to the peer as Error Comment (no patient data).
    status : int
        The DIMSE status to answer, e.g. 0xC000 (cannot understand) or 0xA900
        (data set does not match SOP class), DICOM PS3.4 Annex B.2.3.
    """

    def __init__(self, message: str, status: int = 0xC000) -> None:
        super().__init__(message)
        self.status = status


class TransientError(RadnodeError):
    """A failure that may succeed when tried again later."""


class PermanentError(RadnodeError):
    """A failure that retrying cannot fix."""
