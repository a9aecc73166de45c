"""``radnode users`` and ``radnode tokens``: who may use the HTTP API and the dashboard.

Users have a role (``viewer``, ``operator``, ``admin``) and, to log in to
the dashboard, a password (Argon2id hash); scripts and Prometheus use API
tokens, shown once when created and stored as their SHA-256 only. The
commands work on the database (the node need not run; a running node sees
a change on the next request). Each change is audited as
``cli:<operating-system user>``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

import click
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.cli_deliveries import config_option, data_dir_option, open_database


def _factory(config_file: Path | None, data_dir: Path | None) -> sessionmaker[Session]:
    """A session factory on the node's database, migrated first if allowed by config."""
    # `users add` may come before the first `serve`.
    return open_database(config_file, data_dir, upgrade=True)[1]


T = TypeVar("T")


def _change(config_file: Path | None, data_dir: Path | None,
            change: Callable[[Session, str], T]) -> T:
    """Run one audited change of :mod:`service.auth` as the CLI's actor, and commit it.

    Raises
    ------
    click.ClickException
        With the message of :class:`service.auth.AuthError` (unknown user,
        name taken, ...); nothing is committed then.
    """
    from service import audit, auth

    with _factory(config_file, data_dir)() as session:
        try:
            outcome = change(session, audit.cli_actor())
        except auth.AuthError as exc:
            raise click.ClickException(str(exc)) from exc
        session.commit()
        return outcome


def _read_password(password_stdin: bool, prompt: str) -> str:
    if password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
        if not password:
            raise click.ClickException("no password on standard input")
        return password
    value: str = click.prompt(prompt, hide_input=True, confirmation_prompt=True)
    return value


def _when(value: datetime | None) -> str:
    from service.db.session import as_utc

    return as_utc(value).strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else ""


ROLE_CHOICE = click.Choice(["viewer", "operator", "admin"])


@click.group()
def users() -> None:
    """HTTP users: add, list, change role or password, disable."""


@users.command("add")
@config_option
@data_dir_option
@click.argument("name")
@click.option("--role", type=ROLE_CHOICE, required=True,
              help="viewer: read; operator: + actions; admin: + audit trail.")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from the first line of standard input.")
@click.option("--no-password", is_flag=True,
              help="No password: the user can only use API tokens (no dashboard login).")
def users_add(config_file: Path | None, data_dir: Path | None, name: str, role: str,
              password_stdin: bool, no_password: bool) -> None:
    """Add user NAME with a role and (unless --no-password) a password, asked for twice."""
    from service import auth

    if password_stdin and no_password:
        raise click.UsageError("--password-stdin and --no-password exclude each other")
    password = None if no_password else _read_password(password_stdin, "Password")
    _change(config_file, data_dir,
            lambda session, actor: auth.add_user(session, name, role, password, actor=actor))
    click.echo(f"user {name} added ({role}{', token only' if no_password else ''})")


@users.command("list")
@config_option
@data_dir_option
def users_list(config_file: Path | None, data_dir: Path | None) -> None:
    """Show users: role, password set, active tokens, created, disabled."""
    from rich.console import Console
    from rich.table import Table

    from service import auth
    from service.db.models import ApiToken, User

    factory = _factory(config_file, data_dir)
    table = Table(title="radnode users")
    for column in ("name", "role", "password", "active tokens", "created", "disabled"):
        table.add_column(column)
    with factory() as session:
        for user in session.scalars(select(User).order_by(User.name)):
            tokens = session.scalars(select(ApiToken).where(ApiToken.user_id == user.id))
            active = sum(1 for t in tokens if auth.token_state(t) == "active")
            table.add_row(user.name, user.role, "yes" if user.password_hash else "no",
                          str(active), _when(user.created_at), _when(user.disabled_at))
    Console().print(table)


@users.command("set-role")
@config_option
@data_dir_option
@click.argument("name")
@click.argument("role", type=ROLE_CHOICE)
def users_set_role(config_file: Path | None, data_dir: Path | None, name: str,
                   role: str) -> None:
    """Give user NAME the role ROLE (effective on their next request)."""
    from service import auth

    _change(config_file, data_dir,
            lambda session, actor: auth.set_role(session, name, role, actor=actor))
    click.echo(f"user {name} is now {role}")


@users.command("password")
@config_option
@data_dir_option
@click.argument("name")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from the first line of standard input.")
@click.option("--remove", is_flag=True, help="Remove the password (token-only user).")
def users_password(config_file: Path | None, data_dir: Path | None, name: str,
                   password_stdin: bool, remove: bool) -> None:
    """Set user NAME's password (asked for twice); ends their dashboard sessions."""
    from service import auth

    if password_stdin and remove:
        raise click.UsageError("--password-stdin and --remove exclude each other")
    password = None if remove else _read_password(password_stdin, "New password")
    _change(config_file, data_dir,
            lambda session, actor: auth.set_password(session, name, password, actor=actor))
    click.echo(f"password of {name} {'removed' if remove else 'changed'}; "
               "their dashboard sessions ended")


@users.command("disable")
@config_option
@data_dir_option
@click.argument("name")
def users_disable(config_file: Path | None, data_dir: Path | None, name: str) -> None:
    """Disable user NAME: refused from now on, tokens revoked, sessions ended."""
    from service import auth

    _change(config_file, data_dir,
            lambda session, actor: auth.disable_user(session, name, actor=actor))
    click.echo(f"user {name} disabled; their tokens are revoked and sessions ended")


@users.command("enable")
@config_option
@data_dir_option
@click.argument("name")
def users_enable(config_file: Path | None, data_dir: Path | None, name: str) -> None:
    """Enable disabled user NAME again (revoked tokens stay revoked)."""
    from service import auth

    _change(config_file, data_dir,
            lambda session, actor: auth.enable_user(session, name, actor=actor))
    click.echo(f"user {name} enabled")


@click.group()
def tokens() -> None:
    """API tokens: create (shown once), list, revoke."""


@tokens.command("create")
@config_option
@data_dir_option
@click.argument("user")
@click.option("--label", default="", help="What the token is for (e.g. prometheus).")
@click.option("--expires-days", type=click.FloatRange(min=0, min_open=True),
              help="Expire after this many days [never].")
def tokens_create(config_file: Path | None, data_dir: Path | None, user: str, label: str,
                  expires_days: float | None) -> None:
    """Create an API token for USER and print it once on standard output.

    Only its SHA-256 is kept: copy it now. Use it as
    ``Authorization: Bearer <token>``.
    """
    from service import auth

    def create(session: Session, actor: str) -> tuple[int, datetime | None, str]:
        row, token = auth.create_token(
            session, user, actor=actor, label=label,
            expires_in=timedelta(days=expires_days) if expires_days else None)
        session.flush()
        return row.id, row.expires_at, token

    token_id, expires, token = _change(config_file, data_dir, create)
    click.echo(token)
    click.echo(f"token {token_id} for {user} created"
               f"{f', expires {_when(expires)}' if expires else ''}; it is shown only now",
               err=True)


@tokens.command("list")
@config_option
@data_dir_option
@click.option("--user", "user_name", help="Only this user's tokens.")
def tokens_list(config_file: Path | None, data_dir: Path | None,
                user_name: str | None) -> None:
    """Show tokens: id, user, label, prefix, state, created, last used, expires."""
    from rich.console import Console
    from rich.table import Table

    from service import auth
    from service.db.models import ApiToken, User

    factory = _factory(config_file, data_dir)
    table = Table(title="radnode API tokens")
    for column in ("id", "user", "label", "token", "state", "created", "last used",
                   "expires"):
        table.add_column(column)
    with factory() as session:
        query = select(ApiToken).join(User).order_by(ApiToken.id)
        if user_name is not None:
            if session.scalar(select(func.count()).select_from(User)
                              .where(User.name == user_name)) == 0:
                raise click.ClickException(f"no user named {user_name!r}")
            query = query.where(User.name == user_name)
        for row in session.scalars(query):
            table.add_row(str(row.id), row.user.name, row.label, f"rn_{row.prefix}_…",
                          auth.token_state(row), _when(row.created_at),
                          _when(row.last_used_at), _when(row.expires_at))
    Console().print(table)


@tokens.command("revoke")
@config_option
@data_dir_option
@click.argument("token_ids", nargs=-1, type=int, required=True)
def tokens_revoke(config_file: Path | None, data_dir: Path | None,
                  token_ids: tuple[int, ...]) -> None:
    """Revoke tokens TOKEN_IDS (the ids of ``radnode tokens list``), from the next request."""
    from service import auth

    def revoke(session: Session, actor: str) -> list[str]:  # all or none
        rows = [auth.revoke_token(session, token_id, actor=actor) for token_id in token_ids]
        return [f"token {row.id} (rn_{row.prefix}_…) of {row.user.name} revoked"
                for row in rows]

    for line in _change(config_file, data_dir, revoke):
        click.echo(line)
