from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, DefaultClause, MetaData, inspect

import migrations
from service.db import migrate
from service.db.models import Base
from service.db.session import make_engine

MIGRATIONS_DIR = Path(migrations.__file__).parent
RADNODE_TABLES = {"series", "instances", "jobs", "results", "deliveries", "associations",
                  "audit_events", "workers", "users", "api_tokens", "web_sessions",
                  "deid_mappings"}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a new database on the machine's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'radnode.db'}"
    return str(request.getfixturevalue("postgres_url"))  # radnode maps it to psycopg 3


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _compare_server_default(context: MigrationContext, inspected_column: Column[Any],
                            metadata_column: Column[Any], inspected_default: str | None,
                            metadata_default: Any, rendered_metadata_default: str | None,
                            ) -> bool | None:
    # Alembic's SQLite comparison strips the quotes of '...' only around at least one
    # character, so DEFAULT '' (reflected as "('')") never equals the model's
    # server_default="" and every such column is reported as changed. It is the same
    # default; anything else is left to Alembic (None).
    if context.dialect.name == "sqlite" and rendered_metadata_default == "":
        reflected = inspected_default or ""
        if reflected.startswith("(") and reflected.endswith(")"):
            reflected = reflected[1:-1]
        if reflected == "''":
            return False
    return None


def _diff(url: str, metadata: MetaData = Base.metadata) -> list[Any]:
    """What autogenerate would change in the database at ``url`` to match ``metadata``."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={
                "compare_type": True, "compare_server_default": _compare_server_default})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def _changes(diff: list[Any]) -> set[tuple[str, ...]]:
    """``(operation, table, column)`` of each column change, ``(operation, table)`` else."""
    flat = [c for d in diff for c in (d if isinstance(d, list) else [d])]
    out: set[tuple[str, ...]] = set()
    for change in flat:
        if change[0].startswith("modify_"):
            out.add((change[0], change[2], change[3]))
        elif change[0] in {"add_table", "remove_table"}:
            out.add((change[0], change[1].name))
        else:
            out.add((change[0],))
    return out


def test_models_and_migrations_agree(url: str) -> None:
    migrate.upgrade(url)
    assert RADNODE_TABLES <= _tables(url)
    assert _diff(url) == []


def test_compare_detects_a_difference(url: str) -> None:
    # The comparison above must be able to fail: an empty database differs from the models.
    migrate.upgrade(url)
    migrate.downgrade(url, "base")
    diff = _diff(url)
    added = {d[1].name for d in diff if isinstance(d, tuple) and d[0] == "add_table"}
    assert added == RADNODE_TABLES


def test_compare_detects_a_changed_type_nullable_and_server_default(url: str) -> None:
    # Types, nullability and server defaults are compared, not only tables and columns.
    migrate.upgrade(url)
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(changed)
    jobs = changed.tables["jobs"]
    jobs.c.priority.type = jobs.c.rule_names.type        # String(8) -> String(400)
    jobs.c.config_version.server_default = None          # DEFAULT '' -> none
    jobs.c.rule_names.server_default = DefaultClause("x")  # DEFAULT '' -> 'x'
    changed.tables["series"].c.completed_at.nullable = False
    assert _changes(_diff(url, changed)) == {
        ("modify_type", "jobs", "priority"),
        ("modify_default", "jobs", "config_version"),
        ("modify_default", "jobs", "rule_names"),
        ("modify_nullable", "series", "completed_at"),
    }


def test_downgrade_to_base_and_upgrade_again(url: str) -> None:
    migrate.upgrade(url)
    migrate.downgrade(url, "base")
    assert _tables(url) & RADNODE_TABLES == set()
    assert _tables(url) <= {"alembic_version"}
    migrate.upgrade(url)
    assert RADNODE_TABLES <= _tables(url)
    assert _diff(url) == []
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == _single_head()
    finally:
        engine.dispose()


def test_upgrade_twice_is_a_no_op(url: str) -> None:
    migrate.upgrade(url)
    migrate.upgrade(url)
    assert _diff(url) == []


def _single_head() -> str:
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    heads = script.get_heads()
    assert len(heads) == 1, heads
    return heads[0]


def test_exactly_one_head() -> None:
    head = _single_head()
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    revisions = list(script.walk_revisions())
    assert revisions, "no migration found"
    assert revisions[0].revision == head
    # One linear history: every revision but the first has exactly one parent.
    bases = [r for r in revisions if r.down_revision is None]
    assert len(bases) == 1
    assert all(isinstance(r.down_revision, str | None) for r in revisions)


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add("." * node.level + (node.module or ""))
    return modules


def _migration_files() -> list[Path]:
    files = sorted((MIGRATIONS_DIR / "versions").glob("*.py"))
    return [p for p in files if p.name != "__init__.py"]


def test_migration_files_import_nothing_from_the_project() -> None:
    files = _migration_files()
    assert files
    for path in [*files, MIGRATIONS_DIR / "env.py"]:
        for module in _imported_modules(path):
            root = module.split(".")[0]
            assert root not in {"service", "workers", "migrations"}, f"{path.name}: {module}"
            assert not module.startswith("."), f"{path.name}: relative import {module}"
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from|import)\s+(service|workers)\b", text, re.M), path.name
        assert "__import__(" not in text and "import_module(" not in text, path.name


def test_migration_file_names_and_ids() -> None:
    for path in _migration_files():
        number = path.name.split("_", 1)[0]
        assert len(number) == 4 and number.isdigit(), path.name
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assigned = {
            target.id: node.value
            for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)
        }
        revision = assigned["revision"]
        assert isinstance(revision, ast.Constant) and revision.value == number, path.name
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"upgrade", "downgrade"} <= functions, path.name
