"""Users, roles, API tokens and dashboard sessions of the HTTP API.

Everything here works on the database inside the caller's session (the
HTTP application and ``radnode users``/``radnode tokens`` share it); changes
are audited in the same transaction.

Secrets at rest:

* passwords: Argon2id (RFC 9106) through argon2-cffi, with its default
  parameters (memory-hard; about 0.1 s per hash);
* API tokens: ``rn_<prefix>_<secret>``, 256 random bits; only the SHA-256
  of the whole token is stored (a slow hash buys nothing for 256-bit secrets
  and would cost every request), with the non-secret prefix for listings;
* dashboard sessions: a 256-bit session id in the cookie, stored as its
  SHA-256; the CSRF token is an HMAC of the session id, so it is bound to the
  session and stored nowhere.

Roles, each including the one before: ``viewer`` (read everything except the
audit trail), ``operator`` (+ actions: retry, cancel, complete, resend,
C-ECHO), ``admin`` (+ audit trail and other privacy-sensitive reads).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from service import audit
from service.db.models import ApiToken, User, WebSession
from service.db.session import as_utc, utcnow

#: Roles from least to most allowed; each includes the ones before it.
ROLES = ("viewer", "operator", "admin")
Role = Literal["viewer", "operator", "admin"]

#: User names: letters, digits and ``. _ @ -`` (they appear in actors, ``api:<name>``).
NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
#: Shortest password accepted (NIST SP 800-63B 5.1.1.2 asks for at least 8).
MIN_PASSWORD_LENGTH = 12
#: Longest password accepted (bounds the work of one login).
MAX_PASSWORD_LENGTH = 1024
#: ``rn_<8 hex>_<43 base64url>``: recognisable by secret scanners.
TOKEN_RE = re.compile(r"^rn_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
#: ``last_used_at`` and ``last_seen_at`` are written at most this often.
TOUCH_INTERVAL = timedelta(seconds=60)

_hasher = PasswordHasher()
#: Verified against when the user is unknown, so that the answer takes as long.
_DUMMY_HASH = _hasher.hash("radnode: no such user")


class AuthError(Exception):
    """A user or token operation that cannot be done (unknown name, bad password...).

    The CLI prints the message; it never contains a password or token.
    """


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` includes ``needed`` (``admin`` includes ``operator``...)."""
    if role not in ROLES or needed not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(needed)


def sha256_hex(value: str) -> str:
    """Hex SHA-256 of ``value`` (UTF-8)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


# -- passwords ------------------------------------------------------------------------------


def check_password_policy(password: str) -> None:
    """Raise :class:`AuthError` unless ``password`` is 12 to 1024 characters long."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AuthError(f"the password must have at most {MAX_PASSWORD_LENGTH} characters")


def hash_password(password: str) -> str:
    """Argon2id hash of ``password`` in PHC string format (RFC 9106, argon2-cffi defaults)."""
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches ``password_hash``; always does the work of one check.

    A None hash (token-only user) is checked against a dummy hash and fails,
    so the time taken does not tell whether the user has a password.
    """
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        ok = _hasher.verify(password_hash or _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return bool(ok) and password_hash is not None


# -- users ----------------------------------------------------------------------------------


def get_user(session: Session, name: str) -> User:
    """The user called ``name``; :class:`AuthError` if there is none."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise AuthError(f"no user named {name!r}")
    return user


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise AuthError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


def add_user(session: Session, name: str, role: str, password: str | None, *,
             actor: str) -> User:
    """Add a user (audited ``user.add``).

    Parameters
    ----------
    session : sqlalchemy.orm.Session
        The caller commits.
    name : str
        1-64 letters, digits or ``. _ @ -``; unique.
    role : str
        ``viewer``, ``operator`` or ``admin``.
    password : str or None
        None: the user can only use API tokens (no dashboard login).
    actor : str
        Who adds the user, for the audit trail.

    Raises
    ------
    AuthError
        Invalid name, role or password, or the name is taken.
    """
    if not NAME_RE.match(name):
        raise AuthError(f"user name {name!r} is invalid: 1-64 letters, digits or . _ @ -")
    _check_role(role)
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise AuthError(f"a user named {name!r} already exists")
    if password is not None:
        check_password_policy(password)
    user = User(name=name, role=role, created_at=utcnow(),
                password_hash=hash_password(password) if password is not None else None)
    session.add(user)
    session.flush()
    audit.record(session, actor=actor, action="user.add", target_type="user", target_id=name,
                 detail={"role": role, "password": password is not None})
    return user


def set_role(session: Session, name: str, role: str, *, actor: str) -> User:
    """Change a user's role (audited ``user.role``); effective on the next request."""
    user = get_user(session, name)
    previous = user.role
    user.role = _check_role(role)
    audit.record(session, actor=actor, action="user.role", target_type="user", target_id=name,
                 detail={"role": role, "previous_role": previous})
    return user


def set_password(session: Session, name: str, password: str | None, *, actor: str) -> User:
    """Set (or, with None, remove) a user's password; ends their dashboard sessions.

    Audited ``user.password`` (without the password).
    """
    user = get_user(session, name)
    if password is not None:
        check_password_policy(password)
    user.password_hash = hash_password(password) if password is not None else None
    ended = _end_sessions(session, user)
    audit.record(session, actor=actor, action="user.password", target_type="user",
                 target_id=name, detail={"password": password is not None,
                                         "sessions_ended": ended})
    return user


def _end_sessions(session: Session, user: User) -> int:
    result = session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    return int(getattr(result, "rowcount", 0) or 0)


def disable_user(session: Session, name: str, *, actor: str) -> User:
    """Disable a user: refused from now on, its tokens revoked, its sessions ended.

    Audited ``user.disable``.
    """
    user = get_user(session, name)
    now = utcnow()
    if user.disabled_at is None:
        user.disabled_at = now
    revoked = session.execute(update(ApiToken).where(
        ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None)).values(revoked_at=now))
    ended = _end_sessions(session, user)
    audit.record(session, actor=actor, action="user.disable", target_type="user",
                 target_id=name, detail={"tokens_revoked": int(getattr(revoked, "rowcount", 0)
                                                               or 0),
                                         "sessions_ended": ended})
    return user


def enable_user(session: Session, name: str, *, actor: str) -> User:
    """Enable a disabled user again (its revoked tokens stay revoked); audited ``user.enable``."""
    user = get_user(session, name)
    user.disabled_at = None
    audit.record(session, actor=actor, action="user.enable", target_type="user",
                 target_id=name)
    return user


# -- API tokens -----------------------------------------------------------------------------


def new_token() -> tuple[str, str]:
    """A new token and its prefix: ``("rn_<prefix>_<secret>", "<prefix>")``."""
    prefix = secrets.token_hex(4)
    return f"rn_{prefix}_{secrets.token_urlsafe(32)}", prefix


def create_token(session: Session, name: str, *, actor: str, label: str = "",
                 expires_in: timedelta | None = None) -> tuple[ApiToken, str]:
    """Create a token for user ``name``; return its row and the token (shown once).

    Audited ``token.create`` with the token's id, prefix, label and expiry.

    Raises
    ------
    AuthError
        No such user, or the user is disabled.
    """
    user = get_user(session, name)
    if user.disabled_at is not None:
        raise AuthError(f"user {name!r} is disabled")
    token, prefix = new_token()
    now = utcnow()
    row = ApiToken(user_id=user.id, label=label[:100], prefix=prefix,
                   token_hash=sha256_hex(token), created_at=now,
                   expires_at=now + expires_in if expires_in is not None else None)
    session.add(row)
    session.flush()
    audit.record(session, actor=actor, action="token.create", target_type="token",
                 target_id=row.id, detail={"user": name, "prefix": prefix, "label": row.label,
                                           "expires_at": row.expires_at.isoformat()
                                           if row.expires_at else None})
    return row, token


def revoke_token(session: Session, token_id: int, *, actor: str) -> ApiToken:
    """Revoke token ``token_id`` (audited ``token.revoke``); refused from the next request.

    Raises
    ------
    AuthError
        No such token.
    """
    row = session.get(ApiToken, token_id)
    if row is None:
        raise AuthError(f"no token with id {token_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    audit.record(session, actor=actor, action="token.revoke", target_type="token",
                 target_id=token_id, detail={"user": row.user.name, "prefix": row.prefix})
    return row


def token_state(row: ApiToken, now: datetime | None = None) -> str:
    """``active``, ``revoked`` or ``expired``."""
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and as_utc(row.expires_at) <= (now or utcnow()):
        return "expired"
    return "active"


def authenticate_token(session: Session, token: str) -> tuple[User, ApiToken] | None:
    """The user and token row of a bearer token, or None if it is not valid.

    Not valid: malformed, unknown, revoked, expired, or its user disabled.
    The row is found by the SHA-256 of the token (an index lookup that tells
    nothing about the token) and the hashes are compared in constant time.
    ``last_used_at`` is updated at most once a minute (the caller commits).
    """
    if not TOKEN_RE.match(token):
        return None
    digest = sha256_hex(token)
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    now = utcnow()
    if token_state(row, now) != "active" or row.user.disabled_at is not None:
        return None
    if row.last_used_at is None or now - as_utc(row.last_used_at) >= TOUCH_INTERVAL:
        row.last_used_at = now
    return row.user, row


# -- dashboard sessions ---------------------------------------------------------------------


def csrf_token(session_id: str) -> str:
    """The CSRF token of a session: HMAC-SHA-256 of its id (bound to it, stored nowhere)."""
    return hmac.new(session_id.encode("utf-8"), b"radnode csrf", hashlib.sha256).hexdigest()


def check_csrf(session_id: str, candidate: str) -> bool:
    """Whether ``candidate`` is the CSRF token of ``session_id`` (constant time)."""
    return hmac.compare_digest(csrf_token(session_id).encode(), candidate.encode("utf-8",
                                                                                   "replace"))


def login(session: Session, name: str, password: str, *, max_age: timedelta,
          client: str) -> tuple[User, str] | None:
    """Check a dashboard login; on success open a session and return (user, session id).

    Audited ``auth.login`` (actor ``web:<name>``) or ``auth.login_failed``
    (actor ``anonymous@<client>``; the name is recorded only when such a
    user exists, as a mistyped password in the name field must not be kept).
    Expired sessions of every user are deleted on the way.
    """
    user = session.scalar(select(User).where(User.name == name))
    ok = verify_password(user.password_hash if user is not None else None, password)
    if user is None or not ok or user.disabled_at is not None:
        reason = ("unknown user" if user is None else "disabled" if ok else "wrong password")
        audit.record(session, actor=f"anonymous@{client}", action="auth.login_failed",
                     target_type="user", target_id=user.name if user is not None else "",
                     detail={"reason": reason})
        return None
    now = utcnow()
    session.execute(delete(WebSession).where(WebSession.expires_at <= now))
    session_id = secrets.token_urlsafe(32)
    session.add(WebSession(user_id=user.id, session_hash=sha256_hex(session_id),
                           created_at=now, last_seen_at=now, expires_at=now + max_age))
    audit.record(session, actor=f"web:{user.name}", action="auth.login", target_type="user",
                 target_id=user.name, detail={"client": client})
    return user, session_id


def session_user(session: Session, session_id: str, *,
                 idle: timedelta) -> tuple[User, WebSession] | None:
    """The user of a dashboard session id, or None (unknown, expired, idle or disabled).

    An expired or idle session is deleted; ``last_seen_at`` is updated at
    most once a minute (the caller commits).
    """
    if not session_id or len(session_id) > 100:
        return None
    digest = sha256_hex(session_id)
    row = session.scalar(select(WebSession).where(WebSession.session_hash == digest))
    if row is None or not hmac.compare_digest(row.session_hash, digest):
        return None
    now = utcnow()
    if as_utc(row.expires_at) <= now or now - as_utc(row.last_seen_at) >= idle:
        session.delete(row)
        return None
    if row.user.disabled_at is not None:
        return None
    if now - as_utc(row.last_seen_at) >= TOUCH_INTERVAL:
        row.last_seen_at = now
    return row.user, row


def logout(session: Session, session_id: str) -> str | None:
    """End a dashboard session; return its user's name (None if there was none).

    Audited ``auth.logout`` (actor ``web:<name>``).
    """
    row = session.scalar(select(WebSession).where(
        WebSession.session_hash == sha256_hex(session_id)))
    if row is None:
        return None
    name = row.user.name
    session.delete(row)
    audit.record(session, actor=f"web:{name}", action="auth.logout", target_type="user",
                 target_id=name)
    return name


# -- failed-login throttle ------------------------------------------------------------------


@dataclass
class LoginThrottle:
    """Refuse logins after too many failures, per (name, client) and per client.

    Kept in memory by the HTTP application (a restart forgets it). A refused
    attempt is not checked at all, so it costs no password hash.

    Parameters
    ----------
    per_name : int
        Failures of one name from one client address within ``window_s``.
    per_client : int
        Failures from one client address (any names) within ``window_s``.
    window_s : float
        Sliding window, seconds.
    clock : callable
        Monotonic time in seconds (tests pass a fake).
    """

    per_name: int = 5
    per_client: int = 20
    window_s: float = 900.0
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def retry_after(self, name: str, client: str) -> float:
        """Seconds until ``name`` may try again from ``client``; 0 when allowed now."""
        now = self.clock()
        with self._lock:
            waits = []
            for key, limit in (((name, client), self.per_name), (("", client), self.per_client)):
                times = self._recent(key, now)
                if len(times) >= limit:
                    waits.append(times[len(times) - limit] + self.window_s - now)
            return max(waits, default=0.0)

    def failed(self, name: str, client: str) -> None:
        """Count one failed login of ``name`` from ``client``."""
        now = self.clock()
        with self._lock:
            for key in ((name, client), ("", client)):
                self._failures.setdefault(key, deque()).append(now)
                if len(self._failures) > 10_000:  # bound the memory an attacker can take
                    self._failures.pop(next(iter(self._failures)))

    def succeeded(self, name: str, client: str) -> None:
        """Forget the failures of ``name`` from ``client`` after a good login."""
        with self._lock:
            self._failures.pop((name, client), None)
