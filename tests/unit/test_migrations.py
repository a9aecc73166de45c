from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

import migrations
from service.db import migrate
from service.db.models import Base

MIGRATIONS_DIR = Path(migrations.__file__).parent
RADNODE_TABLES = {"series", "instances", "jobs", "results", "deliveries", "associations",
                  "audit_events", "workers", "users", "api_tokens", "web_sessions",
                  "deid_mappings"}


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'radnode.db'}"


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _diff(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


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


def test_downgrade_to_base_and_upgrade_again(url: str) -> None:
    migrate.upgrade(url)
    migrate.downgrade(url, "base")
    assert _tables(url) & RADNODE_TABLES == set()
    assert _tables(url) <= {"alembic_version"}
    migrate.upgrade(url)
    assert RADNODE_TABLES <= _tables(url)
    assert _diff(url) == []
    engine = create_engine(url)
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
