"""Routing rules and verified delivery.

series.called_ae_title, series.peer_address: the association that sent the
series' first instance (rule conditions on the association).
series.routed_at: when the series was routed (study-scope rules wait for the
whole study; a late instance clears it).
jobs.priority ("stat" or "routine"), jobs.rule_names, jobs.config_version:
what routed the job, and with which configuration.
deliveries.transaction_uid, commit_requested_at, commit_attempts,
committed_at: Storage Commitment (Push Model) of a sent result.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("called_ae_title", sa.String(16), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("peer_address", sa.String(64), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("routed_at", sa.DateTime(timezone=True), nullable=True))
    # Series completed before this revision were routed when they completed.
    op.execute("UPDATE series SET routed_at = completed_at WHERE state <> 'receiving'")
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.String(8), nullable=False,
                                   server_default="routine"))
        batch.add_column(sa.Column("rule_names", sa.String(400), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("config_version", sa.String(16), nullable=False,
                                   server_default=""))
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("transaction_uid", sa.String(64), nullable=True))
        batch.add_column(sa.Column("commit_requested_at", sa.DateTime(timezone=True),
                                   nullable=True))
        batch.add_column(sa.Column("commit_attempts", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_deliveries_transaction_uid", ["transaction_uid"])


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_transaction_uid")
        batch.drop_column("committed_at")
        batch.drop_column("commit_attempts")
        batch.drop_column("commit_requested_at")
        batch.drop_column("transaction_uid")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("config_version")
        batch.drop_column("rule_names")
        batch.drop_column("priority")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("routed_at")
        batch.drop_column("peer_address")
        batch.drop_column("called_ae_title")
