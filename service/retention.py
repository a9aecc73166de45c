"""Retention: remove received instances from the spool once they are no longer needed.

Policy (``retention`` settings):

* a series whose every job succeeded and every result was delivered (sent;
  committed, for destinations with Storage Commitment) is purged
  ``after_delivery_h`` hours after its last delivery;
* any other complete series (not analysed, a job or delivery that failed) is
  purged ``max_age_days`` days after its last instance, so an operator has
  that long to retry;
* never a series still receiving, or with a job pending, queued or running.

Only the spool files go; database rows stay (``series.state`` becomes
``purged``) and results (SEG, SR) are kept.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.config import Destination, Settings
from service.db.models import Series
from service.db.session import as_utc, utcnow
from service.dicom.spool import forget_directory

log = logging.getLogger("radnode.retention")

_ACTIVE_JOB_STATES = {"pending", "queued", "running"}


def purge_time(series: Series, settings: Settings) -> datetime | None:
    """When the series' instances may leave the spool, or None (not by the policy)."""
    cfg = settings.retention
    jobs = series.jobs
    if any(job.state in _ACTIVE_JOB_STATES for job in jobs):
        return None
    deliveries = [d for job in jobs for result in job.results for d in result.deliveries]
    committing = {d.name for d in settings.destinations
                  if isinstance(d, Destination) and d.storage_commitment}
    delivered = (
        bool(jobs) and all(job.state in ("succeeded", "superseded") for job in jobs)
        and any(job.state == "succeeded" for job in jobs)
        and bool(deliveries) and all(
            d.state == "committed" or (d.state == "sent" and d.destination not in committing)
            for d in deliveries)
    )
    if delivered and cfg.after_delivery_h > 0:
        last = max(as_utc(d.sent_at) for d in deliveries if d.sent_at is not None)
        return last + timedelta(hours=cfg.after_delivery_h)
    if cfg.max_age_days > 0:
        return as_utc(series.last_received_at) + timedelta(days=cfg.max_age_days)
    return None


def _remove_empty_parents(path: Path, stop: Path) -> None:
    for parent in path.parents:
        if parent == stop or not parent.is_relative_to(stop):
            return
        try:
            parent.rmdir()
        except OSError:
            return
        forget_directory(parent)


def purge_due(settings: Settings, session_factory: sessionmaker[Session]) -> int:
    """Purge every complete series whose :func:`purge_time` has passed; return how many."""
    now = utcnow()
    spool = settings.spool_dir.resolve()
    purged = 0
    with session_factory() as session:
        for series in session.scalars(select(Series).where(Series.state == "complete")):
            due = purge_time(series, settings)
            if due is None or due > now:
                continue
            for instance in series.instances:
                path = (spool / instance.path).resolve()
                if path.is_relative_to(spool):
                    path.unlink(missing_ok=True)
                    _remove_empty_parents(path, spool)
            series.state = "purged"
            series.purged_at = now
            session.commit()
            purged += 1
            log.info("retention: removed %d instances of series %s from the spool",
                     len(series.instances), series.series_instance_uid)
    return purged
