"""The pseudonym table of de-identification (``deid_mappings``), insert-or-select.

A pseudonym is made once per (scope, kind, original value) and kept: every
later de-identification in the same scope, in any process, gets the same
one, so a retry sends the identical object and a SEG sent today references
the pseudonym UIDs of source images sent yesterday. Pseudonyms are random
(``2.25.<UUID>`` UIDs, ``<prefix><10 hex digits>`` patient IDs), not derived
from the original, so they reveal nothing without this table.

Two delivery threads may de-identify the same study at once: a new row is
written with ``INSERT ... ON CONFLICT DO NOTHING`` against the unique
constraints (SQLite and PostgreSQL), then read back, so both get the row
that won.

The table holds patient data (``attributes``): only the service user (the
database) and admins (API, :func:`lookup`) may read it.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.db.models import DeidMapping
from service.db.session import utcnow

UID_KIND = "uid"
PATIENT_KIND = "patient"

#: Range of the per-patient shift of the Modified Dates option, days (1 to 10 years back).
DATE_SHIFT_DAYS = (-3650, -365)


@dataclass(frozen=True)
class Pseudonym:
    """One row of the mapping, detached from the session.

    Attributes
    ----------
    scope, kind, original, pseudonym : str
        As in the table.
    attributes : dict or None
        What re-identification restores.
    date_shift_days : int or None
        The patient's date shift (``patient`` rows).
    """

    scope: str
    kind: str
    original: str
    pseudonym: str
    attributes: dict[str, Any] | None = None
    date_shift_days: int | None = None


def _detached(row: DeidMapping) -> Pseudonym:
    return Pseudonym(row.scope, row.kind, row.original, row.pseudonym,
                     dict(row.attributes) if row.attributes is not None else None,
                     row.date_shift_days)


def new_uid() -> str:
    """A new random UID, ``2.25.<UUID as an integer>`` (DICOM PS3.5 B.2)."""
    return f"2.25.{uuid.uuid4().int}"


def new_patient_id(prefix: str) -> str:
    """A new random patient pseudonym: ``prefix`` and 10 upper-case hex digits."""
    return f"{prefix}{secrets.token_hex(5).upper()}"


def new_date_shift() -> int:
    """A random date shift in :data:`DATE_SHIFT_DAYS`, days."""
    low, high = DATE_SHIFT_DAYS
    return low + secrets.randbelow(high - low + 1)


def _insert(session: Session) -> Callable[..., Any]:
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise NotImplementedError(f"de-identification needs SQLite or PostgreSQL, not {name}")


def find(session: Session, scope: str, kind: str, original: str) -> Pseudonym | None:
    """The pseudonym row of ``original`` in ``scope``, or None."""
    row = session.scalar(select(DeidMapping).where(
        DeidMapping.scope == scope, DeidMapping.kind == kind, DeidMapping.original == original))
    return _detached(row) if row is not None else None


def get_or_create(session: Session, scope: str, kind: str, original: str,
                  make: Callable[[], str], *, attributes: dict[str, Any] | None = None,
                  date_shift_days: int | None = None) -> Pseudonym:
    """The pseudonym of ``original``; made with ``make()`` and stored if there is none.

    Safe against concurrent callers (another thread or process adding the
    same original at the same time): the row that reached the table first is
    returned to both. The caller commits the session; commit before sending
    anything de-identified, so that a retry after a crash finds the same
    pseudonyms.

    Parameters
    ----------
    session : sqlalchemy.orm.Session
        An open session on the node's database.
    scope : str
        The mapping (usually the destination's name).
    kind : str
        ``uid`` or ``patient``.
    original : str
        The original value (a UID, a Patient ID).
    make : callable
        Makes a new random pseudonym.
    attributes : dict, optional
        Stored with a new row only (what re-identification restores).
    date_shift_days : int, optional
        Stored with a new row only.

    Returns
    -------
    Pseudonym

    Raises
    ------
    RuntimeError
        If ``make`` keeps producing pseudonyms that are taken (it should not).
    """
    found = find(session, scope, kind, original)
    if found is not None:
        return found
    insert = _insert(session)
    for _ in range(5):
        statement = insert(DeidMapping).values(
            scope=scope, kind=kind, original=original, pseudonym=make(),
            attributes=attributes, date_shift_days=date_shift_days, created_at=utcnow(),
        ).on_conflict_do_nothing()
        session.execute(statement)
        found = find(session, scope, kind, original)
        if found is not None:
            return found
        # the new pseudonym collided with another original's: try another one
    raise RuntimeError(f"cannot make a unique {kind} pseudonym in scope {scope!r}")


def lookup(session: Session, scope: str | None, pseudonym: str) -> Pseudonym | None:
    """The mapping row whose pseudonym is ``pseudonym`` (for re-identification).

    For the admin-only API endpoint and ``radnode deid lookup``: it returns
    patient data, so callers must check that the user may see it and audit
    the look-up.

    Parameters
    ----------
    session : sqlalchemy.orm.Session
        An open session.
    scope : str or None
        The mapping to search; None searches every scope (pseudonym UIDs are
        random, so a UID is found in one scope at most).
    pseudonym : str
        A pseudonym UID or patient pseudonym.

    Returns
    -------
    Pseudonym or None
        ``original`` is the original value; ``attributes`` what was replaced.
    """
    query = select(DeidMapping).where(DeidMapping.pseudonym == pseudonym)
    if scope is not None:
        query = query.where(DeidMapping.scope == scope)
    row = session.scalars(query.order_by(DeidMapping.id).limit(1)).first()
    return _detached(row) if row is not None else None


def original_uids(session: Session, pseudonyms: Iterable[str],
                  scope: str | None = None) -> dict[str, str]:
    """Original UID of each pseudonym UID that the table knows (others are left out)."""
    wanted = list(dict.fromkeys(pseudonyms))
    found: dict[str, str] = {}
    for start in range(0, len(wanted), 500):
        query = select(DeidMapping.pseudonym, DeidMapping.original).where(
            DeidMapping.kind == UID_KIND, DeidMapping.pseudonym.in_(wanted[start:start + 500]))
        if scope is not None:
            query = query.where(DeidMapping.scope == scope)
        for pseudonym, original in session.execute(query):
            found.setdefault(pseudonym, original)
    return found
