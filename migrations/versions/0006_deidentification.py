"""De-identification: the pseudonym mapping of each de-identification scope.

deid_mappings: one row per (scope, kind, original value) and its pseudonym;
kind ``uid`` (original UID -> replacement UID) or ``patient`` (original
Patient ID -> pseudonym). Unique on (scope, kind, original) and on (scope,
kind, pseudonym): concurrent senders insert-or-select against them.
``attributes`` keeps what re-identification restores; ``date_shift_days``
the patient's shift for the Modified Dates option.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deid_mappings",
        sa.Column("id", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_deid_mappings"),
        sa.Column("scope", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("original", sa.String(128), nullable=False),
        sa.Column("pseudonym", sa.String(128), nullable=False),
        sa.Column("attributes", sa.JSON, nullable=True),
        sa.Column("date_shift_days", sa.Integer, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("scope", "kind", "original", name="uq_deid_mappings_original"),
        sa.UniqueConstraint("scope", "kind", "pseudonym", name="uq_deid_mappings_pseudonym"),
    )
    op.create_index("ix_deid_mappings_pseudonym", "deid_mappings", ["pseudonym"])


def downgrade() -> None:
    op.drop_table("deid_mappings")
