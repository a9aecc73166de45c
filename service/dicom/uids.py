"""Validation of UIDs and other identifiers that arrive from the network."""

from __future__ import annotations

import re

from service.errors import InvalidInstanceError

#: DICOM PS3.5 9.1: components of digits separated by ".", no leading zero in a
#: component of more than one digit, at most 64 characters.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """Return True if ``value`` is a UID as DICOM PS3.5 9.1 defines it."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def require_uid(value: object, what: str) -> str:
    """Return ``value`` if it is a valid UID, else raise.

    Parameters
    ----------
    value : object
        The value received, usually a ``str`` or ``pydicom.uid.UID``.
    what : str
        Its name for the error message, e.g. ``"SOP Instance UID"``.

    Raises
    ------
    InvalidInstanceError
        With DIMSE status 0xC000 (cannot understand) when the value is missing,
        longer than 64 characters or not made of numeric components. The
        message never repeats the value (it may carry anything).
    """
    if value is None or value == "":
        raise InvalidInstanceError(f"{what} is missing", 0xC000)
    text = str(value).rstrip("\x00 ")
    if not is_valid_uid(text):
        raise InvalidInstanceError(f"{what} is not a valid UID (PS3.5 9.1)", 0xC000)
    return text


def printable(value: object, limit: int = 64) -> str:
    """``value`` as printable ASCII for a log line: other characters become ``?``.

    AE titles and other strings from the network may carry control characters
    (a forged line break in a log, say); this keeps log lines single and honest.
    """
    text = str(value)[:limit]
    return "".join(c if " " <= c <= "~" else "?" for c in text).strip()
