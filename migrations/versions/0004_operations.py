"""Operations: associations, the append-only audit trail, worker status.

associations: one row per DICOM association to the SCP (calling/called AE
title, peer address, outcome, counts, C-STORE statuses).
audit_events: who did what; UPDATE and DELETE are refused by triggers on
both SQLite and PostgreSQL, so the trail is append-only for every client.
workers: what each worker process last reported (models, device, GPU memory).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_associations"),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        sa.Column("called_ae_title", sa.String(16), nullable=False),
        sa.Column("peer_address", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("started_at", _TIME, nullable=False),
        sa.Column("ended_at", _TIME, nullable=True),
        sa.Column("instances", sa.Integer, nullable=False),
        sa.Column("bytes_received", sa.BigInteger, nullable=False),
        sa.Column("statuses", sa.JSON, nullable=False),
        sa.Column("series_uids", sa.JSON, nullable=False),
    )
    op.create_index("ix_associations_calling_ae_title", "associations", ["calling_ae_title"])
    op.create_index("ix_associations_outcome", "associations", ["outcome"])
    op.create_index("ix_associations_started_at", "associations", ["started_at"])

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("actor", sa.String(120), nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("target_type", sa.String(20), nullable=False),
        sa.Column("target_id", sa.String(80), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_action", "audit_events", ["action"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("""
            CREATE FUNCTION radnode_audit_append_only() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'audit_events is append-only';
            END;
            $$ LANGUAGE plpgsql""")
        op.execute("""
            CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
            FOR EACH ROW EXECUTE FUNCTION radnode_audit_append_only()""")
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"""
                CREATE TRIGGER audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events
                BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END""")

    op.create_table(
        "workers",
        sa.Column("id", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_workers"),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("queues", sa.JSON, nullable=False),
        sa.Column("device", sa.String(40), nullable=False),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("gpu_memory_allocated_mb", sa.Float, nullable=True),
        sa.Column("gpu_memory_total_mb", sa.Float, nullable=True),
        sa.Column("started_at", _TIME, nullable=False),
        sa.Column("heartbeat_at", _TIME, nullable=False),
        sa.UniqueConstraint("name", name="uq_workers_name"),
    )
    op.create_index("ix_workers_heartbeat_at", "workers", ["heartbeat_at"])


def downgrade() -> None:
    op.drop_table("workers")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS radnode_audit_append_only()")
    op.drop_table("audit_events")
    op.drop_table("associations")
