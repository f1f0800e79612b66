"""`backup-sidecar run`: the scheduler loop and the /health + /metrics server in one process.

Threads and who owns what:

* main thread: the loop. It ticks the ``schedule`` library, beats the heartbeat /health watches and
  notices the stop flag. It never runs a backup, so /health and the heartbeat live through a long dump.
* one worker thread at a time runs a backup job; a slot that falls due while it runs is skipped (logged,
  counted), so an overrunning backup never piles up runs behind it.
* waitress threads serve /health and /metrics from the health monitor's cache.
* an event thread calls the listeners (``job_start_listeners``, ``job_listeners``, ``health_listeners``,
  copied into each Runtime as ``on_job_start``, ``on_job``, ``on_health``) in order, so a slow notifier
  never stalls the loop or the next backup.

SIGTERM/SIGINT handlers only write flags (the stop flag and the shared CancelToken). Idle, the loop sees
the flag within one tick and exits 0. During a backup the token makes the pipeline kill pg_dump, and
run_artifact removes the partial upload and writes the failed manifest ("interrupted"); the loop waits for
that, at most STOP_GRACE_S seconds in all, then exits.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import schedule

from app import drills
from app.cancel import CancelToken
from app.coordination import slot_of
from app.errors import SidecarError
from app.health import HealthMonitor
from app.jobs import JobResult, backup_once
from app.logs import mask
from app.manifest import utc_iso
from app.metrics import Metrics
from app.preflight import describe_active, log_checks
from app.schedule_spec import parse_schedule
from app.settings import Settings
from app.targets import make_targets
from app.web import WebServer, make_app

log = logging.getLogger(__name__)

JobStartListener = Callable[[str], object]
JobListener = Callable[[JobResult], object]
#: (old status or None for the first verdict after start, new status, the /health payload)
HealthListener = Callable[[str | None, str, dict[str, Any]], object]

#: Called when `run` starts a backup job, with its slot (e.g. for a dead-man's switch's /start ping).
job_start_listeners: list[JobStartListener] = []
#: Called after every finished backup job of `run`, with its JobResult (also for skipped and failed jobs).
job_listeners: list[JobListener] = []
#: Called when the /health status changes (ok / warning / critical).
health_listeners: list[HealthListener] = []
#: Called with the manifest of every base backup `run` takes (WAL_ARCHIVE=true), ok or failed.
base_listeners: list[Callable[[Any], object]] = []

STOP_GRACE_S = 9.0  # SIGTERM to exit, within the 10 s that orchestrators give by default
TICK_S = 0.2
BACKUP_NICE = 10  # the backup yields the CPU to /health and to the node's other work
_STOP = object()


class Runtime:
    """One sidecar process; ``run`` returns the exit code."""

    def __init__(
        self,
        settings: Settings,
        *,
        tick_s: float = TICK_S,
        refresh_s: float = 60.0,
        stall_s: float = 5.0,
        tick_limit_s: float = 60.0,
    ) -> None:
        self.settings = settings
        self.schedule = parse_schedule(settings.schedule.spec, settings.schedule.tz)
        self.tick_s = tick_s
        self.monitor = HealthMonitor(
            settings, make_targets(settings), refresh_s=refresh_s, stall_s=stall_s, tick_limit_s=tick_limit_s,
            schedule=self.schedule,
        )
        self.metrics = Metrics(self.monitor)
        drills.after_drill.append(self.monitor.refresh_soon)  # DRILL_SCHEDULE's records show at once
        self.cancel = CancelToken()
        self.stop_signal: str | None = None
        self.scheduler = schedule.Scheduler()
        self.sync_scheduler = schedule.Scheduler()  # SYNC_SCHEDULE: catch-up of a target that missed copies
        self.on_job_start: list[JobStartListener] = list(job_start_listeners)
        self.on_job: list[JobListener] = list(job_listeners)
        self.on_health: list[HealthListener] = list(health_listeners)
        self._worker: threading.Thread | None = None
        self._sync_worker: threading.Thread | None = None
        self._worker_started: datetime | None = None
        self._expected: datetime | None = None  # the scheduled fire time the loop waits for
        self._events: queue.Queue[Any] = queue.Queue()
        self.wal = self._wal_archiver()

    def _wal_archiver(self) -> Any:
        """WAL_ARCHIVE=true: the WAL stream and base backups (app/walstream.py), reported through /health."""
        if not self.settings.wal.enabled:
            return None
        from app.walstream import WalArchiver

        archiver = WalArchiver(self.settings, make_targets(self.settings),
                               on_base=lambda manifest: self._events.put(("base", manifest)))
        self.monitor.wal_status = archiver.status.copy
        self.metrics.watch_wal(archiver.status)
        return archiver

    # --- signals ------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.stop_signal = name
        self.cancel.cancel(f"{name} received, the sidecar is stopping")

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    # --- scheduling ---------------------------------------------------------------------------------
    def next_run(self, now: datetime) -> datetime | None:
        """The next fire time: exact from the schedule when it is clock-aligned, else the library's."""
        if self.schedule.aligned:
            return self.schedule.next_run(now)
        nxt = self.scheduler.next_run
        return nxt.astimezone(UTC) if nxt is not None else None

    def slot_due(self, now: datetime) -> str:
        """The slot of the run falling due at ``now``: the latest fire time not after it.

        Every replica derives the same slot from the same schedule, however late its loop noticed.
        """
        fire = self._expected
        if not self.schedule.aligned or fire is None or fire > now:
            return slot_of(now)
        while (later := self.schedule.next_run(fire)) <= now:
            fire = later
        return slot_of(fire)

    def _due(self) -> None:
        """The library's job: start a backup for the slot that fell due (called on the loop's thread)."""
        now = datetime.now(UTC)
        slot = self.slot_due(now)
        self._expected = self.monitor.next_run_at = self.next_run(now)
        self.launch(slot, "scheduled")

    def launch(self, slot: str, why: str) -> bool:
        """Start a backup job on the worker thread unless one is running; False when skipped."""
        if self._worker is not None and self._worker.is_alive():
            why = f"slot {slot} skipped: the backup started at {utc_iso(self._worker_started)} is still running"
            log.warning("%s", why)
            self.metrics.skip("overrun")
            self.monitor.record_skip("overrun", why, slot)
            return False
        self._worker_started = datetime.now(UTC)
        self.monitor.job_started()
        self._events.put(("start", slot))
        self._worker = threading.Thread(target=self._job, args=(slot, why), name="backup", daemon=True)
        self._worker.start()
        return True

    def _job(self, slot: str, why: str) -> None:
        _lower_priority()
        log.info("%s backup for slot %s starting", why, slot)
        error: str | None = None
        try:
            result = backup_once(self.settings, cancel=self.cancel, slot=slot)
        except SidecarError as exc:
            result, error = JobResult(slot=slot), mask(str(exc)).splitlines()[0]
        except Exception as exc:  # a bug must not kill the worker silently: report it as a failed job
            log.exception("backup job crashed")
            result, error = (
                JobResult(slot=slot),
                f"{exc.__class__.__name__}: {mask(str(exc))}".splitlines()[0],
            )
        for kind, why in zip(result.skip_kinds, result.skipped, strict=True):
            # another host dumping or done is the normal way replicas share a slot; anything else is news
            log.log(logging.INFO if kind in ("claim", "slot") else logging.WARNING, "skipped (%s): %s", kind, why)
        for failure in result.verify_failures:
            log.error("verify after backup failed: %s", failure)
        if error:
            result.error = error
            log.error("backup job for slot %s failed: %s", slot, error)
        self.monitor.job_finished(result.manifests, error, result.verified,
                                  list(zip(result.skip_kinds, result.skipped, strict=True)), slot)
        self.metrics.record(result)
        self._events.put(("job", result))
        if self.stop_signal is None:
            self._sync_due()
            self._log_next()

    def _sync_due(self) -> None:
        """Catch-up after every job and on SYNC_SCHEDULE, on a thread of its own: a long catch-up after an
        outage never makes a scheduled backup skip its slot."""
        if len(self.monitor.views) < 2 or self.stop_signal is not None:
            return
        if self._sync_worker is not None and self._sync_worker.is_alive():
            return
        self._sync_worker = threading.Thread(target=self._sync, name="sync", daemon=True)
        self._sync_worker.start()

    def _sync(self) -> None:
        from app.sync import sync_command

        _lower_priority()
        try:
            report = sync_command(self.settings, None, self.cancel)
        except Exception:  # the catch-up must never take the loop down
            log.exception("sync failed")
            return
        if report.copied:
            self.monitor.refresh_soon()

    def _log_next(self) -> None:
        nxt = self.next_run(datetime.now(UTC))
        self.monitor.next_run_at = nxt
        log.info("next backup at %s (%s)", utc_iso(nxt) or "unknown", self.schedule.describe())

    # --- events -------------------------------------------------------------------------------------
    def _dispatch_events(self) -> None:
        while (item := self._events.get()) is not _STOP:
            kind, payload = item
            listeners: list[Callable[..., object]] = list(
                {"start": self.on_job_start, "job": self.on_job, "health": self.on_health,
                 "base": base_listeners}[kind]
            )
            if kind == "base":
                self.monitor.refresh_soon()
            for listener in listeners:
                try:
                    listener(*payload) if kind == "health" else listener(payload)
                except Exception:
                    log.exception("a %s listener failed", kind)

    def _watch_health(self) -> None:
        """Queue a health event when the status changes; only once every target was read (or is overdue)."""
        settled = all(v.read_at is not None for v in self.monitor.views) or (
            time.monotonic() - self.monitor.started > self.monitor.stall_s
        )
        if settled and (change := self.monitor.transition()) is not None:
            old, new, doc = change
            if old is not None:
                log.log(logging.WARNING if new != "ok" else logging.INFO, "health changed from %s to %s", old, new)
            self._events.put(("health", change))

    # --- the process --------------------------------------------------------------------------------
    def run(self) -> int:
        web = WebServer(make_app(self.monitor, self.metrics), self.settings.health.bind, self.settings.health.port)
        events = threading.Thread(target=self._dispatch_events, name="events", daemon=True)
        self.schedule.install(self.scheduler, self._due)
        if self.settings.schedule.sync_spec and len(self.monitor.views) > 1:
            parse_schedule(self.settings.schedule.sync_spec, self.settings.schedule.tz).install(
                self.sync_scheduler, self._sync_due)
        now = datetime.now(UTC)
        self._expected = self.next_run(now)
        self.monitor.next_run_at = self._expected
        self.monitor.beat()
        self.monitor.start()
        web.start()
        events.start()
        if self.wal is not None:
            self.wal.install(self.scheduler)
            self.wal.start()
        targets = ", ".join(v.target.describe() for v in self.monitor.views) or "none"
        log.info(
            "backup-sidecar running on %s: %s; targets %s; lock %s",
            self.settings.hostname,
            self.schedule.describe(),
            targets,
            self.settings.lock.path,
        )
        log.info("next backup at %s (%s)", utc_iso(self._expected) or "unknown", self.schedule.describe())
        for line in describe_active(self.settings):
            log.info("%s", line)
        threading.Thread(target=log_checks, args=(self.settings,), name="preflight", daemon=True).start()
        if self.settings.schedule.on_start:
            self.launch(slot_of(now), "BACKUP_ON_START")
        last_health = 0.0
        while self.stop_signal is None:
            self.monitor.beat()
            try:
                self.scheduler.run_pending()
                self.sync_scheduler.run_pending()
            except Exception:
                log.exception("the scheduler failed to start a job")
            if time.monotonic() - last_health >= 1.0:
                last_health = time.monotonic()
                self._watch_health()
            time.sleep(self.tick_s)
        return self._shutdown(web, events)

    def _shutdown(self, web: WebServer, events: threading.Thread) -> int:
        deadline = time.monotonic() + STOP_GRACE_S
        wal_stop = None
        if self.wal is not None:  # beside the backup's own stop: the last partial segment ships meanwhile
            wal_stop = threading.Thread(target=self.wal.stop, args=(STOP_GRACE_S - 2.0,), name="wal-stop")
            wal_stop.start()
        worker = self._worker
        if worker is not None and worker.is_alive():
            log.warning("%s received during a backup: waiting for it to stop", self.stop_signal)
            worker.join(max(0.0, deadline - time.monotonic() - 1.0))
            if worker.is_alive():
                log.error("the backup did not stop within %.0fs; exiting anyway", STOP_GRACE_S)
                logging.shutdown()
                os._exit(1)
        else:
            log.info("%s received: stopping", self.stop_signal)
        if wal_stop is not None:
            wal_stop.join(max(0.0, deadline - time.monotonic() - 1.0))
        if self._sync_worker is not None and self._sync_worker.is_alive():  # its partial copy goes too
            self._sync_worker.join(max(0.0, deadline - time.monotonic() - 1.0))
        self._events.put(_STOP)
        events.join(max(0.0, deadline - time.monotonic() - 0.5))
        self.monitor.stop()
        web.stop()
        log.info("stopped")
        return 0


def _lower_priority() -> None:
    """Run this thread, and the pg_dump it starts (children inherit it), BACKUP_NICE steps nicer.

    Compression keeps a core busy for the whole dump; at a lower priority it takes only idle CPU from
    /health, /metrics and whatever else runs on the node, and loses nothing when the CPU is free.
    """
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKUP_NICE))
    except (OSError, AttributeError) as exc:  # not Linux, or not allowed: run at normal priority
        log.debug("cannot lower the backup thread's priority: %s", exc)


def run(settings: Settings) -> int:
    """The `run` command: serve until SIGTERM/SIGINT; 0 after a clean stop."""
    runtime = Runtime(settings)
    runtime.install_signal_handlers()
    return runtime.run()
