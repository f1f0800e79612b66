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
    notifier.run_finished(result.ok)


def attach_to_runtime(notifier: Notifier, settings: Settings) -> threading.Event:
    """Register the notifier with `run`'s listener lists and start the weekly report; set the event to stop."""
    from app import runtime

    runtime.job_start_listeners.append(lambda _slot: notifier.run_started(settings.db.databases))
    runtime.job_listeners.append(lambda result: report_job(notifier, result, settings))
    runtime.health_listeners.append(notifier.health_changed)
    stop = threading.Event()
    threading.Thread(target=_weekly_reports, args=(notifier, settings, stop), name="weekly-report",
                     daemon=True).start()
    return stop


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
            notifier.weekly_report(load_catalog(make_targets(settings)))
        except Exception:
            log.exception("the weekly report could not be built")
        stop.wait(61)  # past the minute it was due, so the same slot is not sent twice
