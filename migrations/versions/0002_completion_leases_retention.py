"""Completion evidence, job leases and retention.

series.expected_count: Images in Acquisition when the data carries it.
series.released_at: when an association that delivered to the series was released.
series.purged_at: when retention removed the series' instances from the spool.
jobs.heartbeat_at: the worker's lease on a running job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("expected_count", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("heartbeat_at")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("purged_at")
        batch.drop_column("released_at")
        batch.drop_column("expected_count")
