"""Where the rest of the sidecar meets the Notifier: one function per place that has news.

The CLI's one-shot commands and the long-running `run` report a backup job the same way (``report_job``),
so a failure pages the operator whichever path ran it.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from app.notify import Notifier

if TYPE_CHECKING:
    from app.catalog import Catalog
    from app.jobs import JobResult
    from app.settings import Settings

log = logging.getLogger(__name__)


def report_job(notifier: Notifier, result: JobResult, settings: Settings) -> None:
    """Every manifest (routed by NOTIFY_ON), job-level errors, a timed-out lock wait, then the run's ping."""
    for manifest in result.manifests:
        notifier.backup_finished(manifest)
    if result.error:
        notifier.failure("backup", None, result.error)
    for kind, why in zip(result.skip_kinds, result.skipped, strict=True):
        if kind == "lock" and settings.lock.timeout_s > 0:
            notifier.failure("lock", None, why)  # it waited LOCK_TIMEOUT and gave up: nobody backed up
    for error in result.prune_errors:
        notifier.failure("prune", None, error)
    for backup_id, copies in result.verified.items():  # VERIFY_AFTER_BACKUP
        for where, ok, detail in copies:
            if not ok:
                notifier.failure("verify", None, f"{where}: {detail}", backup_id=backup_id)
    notifier.run_finished(result.ok)


def attach_to_runtime(notifier: Notifier, settings: Settings) -> threading.Event:
    """Register the notifier with `run`'s listener lists and start the weekly report; set the event to stop."""
    from app import runtime

    runtime.job_start_listeners.append(lambda _slot: notifier.run_started(settings.db.databases))
    runtime.job_listeners.append(lambda result: report_job(notifier, result, settings))
    runtime.health_listeners.append(notifier.health_changed)
    runtime.base_listeners.append(notifier.backup_finished)
    stop = threading.Event()
    threading.Thread(target=_weekly_reports, args=(notifier, settings, stop), name="weekly-report",
                     daemon=True).start()
    return stop


def _report_inputs(settings: Settings, catalog: Catalog) -> tuple[Catalog, None, list[str] | None]:
    """The catalog without other clusters' backups, and the job's units (None when the server cannot say)."""
    from app.errors import SidecarError
    from app.identity import try_server_identity
    from app.units import expected_units

    cluster = try_server_identity(settings)
    if cluster is not None:
        catalog.entries = [e for e in catalog.entries if cluster.matches(e.manifest)]
    try:
        return catalog, None, [u.name for u in expected_units(settings)]
    except SidecarError as exc:
        log.warning("weekly report: cannot list the databases, so none is shown as retired: %s", exc)
        return catalog, None, None


def _weekly_reports(notifier: Notifier, settings: Settings, stop: threading.Event) -> None:
    """Sleep until REPORT_SCHEDULE's next time, then build the report from the targets' manifests."""
    from app.catalog import load_catalog
    from app.targets import make_targets

    while not stop.is_set():
        due = notifier.next_report_at()
        if due is None:
            return
        if stop.wait(max(0.0, (due - datetime.now(UTC)).total_seconds())):
            return
        try:
            notifier.weekly_report(*_report_inputs(settings, load_catalog(make_targets(settings))))
        except Exception:
            log.exception("the weekly report could not be built")
        stop.wait(61)  # past the minute it was due, so the same slot is not sent twice
