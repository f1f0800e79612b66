"""Notifications, dead-man pings and the weekly report, behind one facade: ``Notifier``.

No silent failure: every failure path calls one method here, and each configured channel (mail, webhook,
ping) gets its own background lane, so a channel that is down never fails or delays a backup. Every public
method returns at once and never raises; ``close(timeout)`` is the only call that waits, and never longer
than its timeout.

Routing: NOTIFY_ON=failure sends failures, /health CRITICAL and its recovery, and the weekly report;
``always`` adds each successful backup; ``never`` sends no mail or webhook at all. Dead-man pings ignore
NOTIFY_ON: they are the monitor's heartbeat, and a silenced heartbeat would page someone.

Usage (one run)::

    notifier = Notifier.from_settings(settings)
    notifier.run_started(databases)              # PING_URL/start
    for manifest in result.manifests:            # mail/webhook per the routing above
        notifier.backup_finished(manifest)       # (a failed manifest is routed to backup_failed)
    notifier.failure("prune", "app", str(exc))   # lock, upload, prune, verify, restore_test ...
    notifier.run_finished()                      # PING_URL, or PING_URL/fail with the run's log lines
    notifier.close()                             # at exit: drains the queues within a bound
"""

from __future__ import annotations

import functools
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from app.logs import mask
from app.manifest import Manifest
from app.notify import messages
from app.notify.delivery import Job, Lane
from app.notify.email import EmailChannel
from app.notify.events import FAILURE_KINDS, ROUTES, Event, FailureKind
from app.notify.health import HealthTransitions
from app.notify.logtail import LogTail
from app.notify.ping import PingChannel, Signal
from app.notify.report import ReportSchedule, WeeklyReport, build_report, parse_report_schedule
from app.notify.webhook import WebhookChannel

if TYPE_CHECKING:
    from app.catalog import Catalog
    from app.settings import NotifySettings, Settings

__all__ = [
    "FAILURE_KINDS", "Event", "FailureKind", "Notifier", "ReportSchedule", "WeeklyReport", "parse_report_schedule",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

MAX_CLOSE_S = 120.0


def _never_raises(default: Any = None) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A notification problem is logged, never raised into the backup path that called us."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except Exception:
                log.exception("notifier: %s failed (the operation itself is not affected)", fn.__name__)
                return default  # type: ignore[no-any-return]

        return inner

    return wrap


class Notifier:
    """The facade the jobs, the runtime and the CLI call; see the module docstring for the routing."""

    def __init__(self, notify: NotifySettings, host: str, *, databases: Sequence[str] = (), tz: str = "UTC",
                 backoff_s: float = 1.0, queue_size: int = 100, ssl_context: ssl.SSLContext | None = None,
                 tail_lines: int = 50) -> None:
        self.on = notify.on
        self.host = host
        self.tz = tz
        self.databases = tuple(databases)
        self.report_schedule: ReportSchedule | None = parse_report_schedule(notify.report_schedule)
        self._email = EmailChannel(
            notify.smtp_host, notify.smtp_port, notify.mail_from, notify.mail_to, user=notify.smtp_user,
            password=notify.smtp_password, starttls=notify.smtp_starttls, implicit_tls=notify.smtp_ssl,
            local_hostname=host, context=ssl_context,
        ) if notify.smtp_host and notify.mail_to else None
        self._webhook = WebhookChannel(notify.webhook_url, ssl_context) if notify.webhook_url else None
        self._ping = PingChannel(notify.ping_url, ssl_context) if notify.ping_url else None

        def lane(name: str) -> Lane:
            return Lane(name, notify.timeout_s, notify.retries, backoff_s, queue_size)

        self._lanes: dict[str, Lane] = {}
        for channel in (self._email, self._webhook, self._ping):
            if channel is not None:
                self._lanes[channel.name] = lane(channel.name)
        self._health = HealthTransitions()
        self._tail: LogTail | None = None
        if self._ping is not None:
            self._tail = LogTail(tail_lines)
            self._tail.attach()
        self._run_active = False
        self._run_failures: list[str] = []
        self._run_ok: list[str] = []
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Notifier:
        """The notifier for these settings; keyword arguments as for the constructor (tests pass backoff_s)."""
        from app.units import static_units

        kwargs.setdefault("databases", tuple(u.name for u in static_units(settings)) or settings.db.databases)
        kwargs.setdefault("tz", settings.schedule.tz)
        return cls(settings.notify, settings.hostname, **kwargs)

    @property
    def channels(self) -> tuple[str, ...]:
        """Configured channels, e.g. ``("email", "webhook", "ping")``."""
        return tuple(self._lanes)

    def describe(self) -> str:
        """One line for the startup log: which channels, which routing, which report schedule."""
        parts = [c.describe() for c in (self._email, self._webhook, self._ping) if c is not None]
        report = str(self.report_schedule) if self.report_schedule else "off"
        return f"notifications: {', '.join(parts) or 'none'}; NOTIFY_ON={self.on}; weekly report {report}"

    def announce(self) -> None:
        """The start-up lines of `run` (once per process; one-shot commands stay quiet): channels, and a
        warning when failures would reach no one."""
        log.info("%s", self.describe())
        if self.on != "never" and self._email is None and self._webhook is None:
            log.warning("no notification channel is configured (SMTP_HOST+MAIL_TO or WEBHOOK_URL): failures "
                        "show only in the log, /health and /metrics")

    def close_bound_s(self) -> float:
        """The default wait of ``close``: one message through every retry on the slowest lane, capped."""
        return min(max((lane.worst_case_s() for lane in self._lanes.values()), default=0.0), MAX_CLOSE_S)

    # -- runs and their pings ------------------------------------------------------------------------------

    @_never_raises()
    def run_started(self, databases: Sequence[str] = ()) -> None:
        """A backup run begins: PING_URL/start, and the log tail starts afresh for this run's /fail body."""
        self._run_active = True
        self._run_failures = []
        self._run_ok = []
        if self._tail is not None:
            self._tail.mark()
        what = ", ".join(databases) if databases else "all configured databases"
        self._send_ping("start", f"backup-sidecar on {self.host}: backup run of {what} started")

    @_never_raises()
    def run_finished(self, ok: bool | None = None) -> None:
        """The run is over: PING_URL when nothing failed (and ``ok`` is not False), else PING_URL/fail."""
        failures = list(self._run_failures)
        self._run_active = False
        if ok is False and not failures:
            failures = ["the run reported a failure"]
        if failures:
            self._send_ping("fail", self._fail_body(failures))
        else:
            done = ", ".join(self._run_ok) if self._run_ok else "nothing to do"
            self._send_ping("success", f"backup-sidecar on {self.host}: OK: {done}")

    # -- events --------------------------------------------------------------------------------------------

    @_never_raises()
    def backup_finished(self, manifest: Manifest) -> None:
        """A backup's final manifest: success (mail/webhook when NOTIFY_ON=always), or routed to a failure."""
        if not manifest.ok:
            self.backup_failed(manifest)
            return
        self._run_ok.append(manifest.id)
        if manifest.sanity:  # a backup that looks wrong reaches NOTIFY_ON=failure too; the ping still says ok
            self._publish(messages.backup_suspicious(manifest, self.host))
            return
        self._publish(messages.backup_ok(manifest, self.host))

    @_never_raises()
    def backup_failed(self, manifest: Manifest) -> None:
        """A failed dump or backup (its failed manifest)."""
        self._failed(messages.backup_failed(manifest, self.host))

    @_never_raises()
    def failure(self, kind: FailureKind, database: str | None, error: str, *, backup_id: str | None = None) -> None:
        """Any other failure path: ``upload``, ``lock`` (wait timed out), ``prune``, ``verify``, ``restore_test``
        (or ``backup`` without a manifest, e.g. a dump that could not start)."""
        if kind not in FAILURE_KINDS:
            log.error("notifier: unknown failure kind %r, sent as a backup failure", kind)
            kind = "backup"
        self._failed(messages.failure(kind, self.host, error, database=database, backup_id=backup_id))

    @_never_raises()
    def health_changed(self, old: str | None, new: str, payload: Mapping[str, Any]) -> None:
        """Called with every /health evaluation; sends only on transitions into and out of critical."""
        transition = self._health.observe(old, new)
        if transition == "critical":
            self._publish(messages.health_critical(payload, self.host))
        elif transition == "recovered":
            self._publish(messages.health_recovered(new, payload, self.host))

    @_never_raises()
    def next_report_at(self, now: datetime | None = None) -> datetime | None:
        """When the weekly report is due next (UTC), or None when REPORT_SCHEDULE is off."""
        if self.report_schedule is None:
            return None
        return self.report_schedule.next_after(now or datetime.now(UTC), self.tz)

    @_never_raises()
    def weekly_report(self, catalog: Catalog, now: datetime | None = None,
                      expected: Sequence[str] | None = None) -> WeeklyReport | None:
        """Build the report from ``catalog`` (``load_catalog(targets)``), send it, and return it; ``expected``
        (the job's units, when known) marks every other name as retired."""
        report = build_report(catalog, self.host, self.databases, now, expected=expected)
        self._publish(messages.weekly_report(report))
        return report

    # -- shutdown ------------------------------------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Wait until every queued message is delivered or given up; True when all lanes are idle in time."""
        deadline = time.monotonic() + timeout
        return all([lane.wait_idle(deadline) for lane in self._lanes.values()])

    def close(self, timeout: float | None = None) -> bool:
        """Deliver what is queued within ``timeout`` seconds (default ``close_bound_s()``), then stop.

        Returns True when nothing was left undelivered for lack of time. Never waits longer than ``timeout``
        (plus a fraction of a second): attempts are shortened to fit and later ones are dropped, with a log line.
        """
        if self._closed:
            return True
        self._closed = True
        limit = self.close_bound_s() if timeout is None else max(0.0, timeout)
        deadline = time.monotonic() + limit
        for lane in self._lanes.values():
            lane.begin_close(deadline)
        done = all([lane.join(deadline) for lane in self._lanes.values()])
        if self._tail is not None:
            self._tail.detach()
        return done

    # -- internals -----------------------------------------------------------------------------------------

    def _failed(self, event: Event) -> None:
        log.debug("notifier: %s", event.subject)
        if self._run_active:
            self._run_failures.append(event.subject)
        else:
            self._send_ping("fail", self._fail_body([event.subject]))
        self._publish(event)

    def _publish(self, event: Event) -> None:
        if event.category not in ROUTES.get(self.on, ROUTES["failure"]):
            log.debug("notifier: %s not sent (NOTIFY_ON=%s)", event.subject, self.on)
            return
        for channel in (self._email, self._webhook):
            if channel is not None:
                self._lanes[channel.name].submit(Job(mask(event.subject), functools.partial(channel.send, event)))

    def _send_ping(self, signal: Signal, body: str) -> None:
        if self._ping is None:
            return
        self._lanes["ping"].submit(Job(f"{signal} ping", functools.partial(self._ping.send, signal, body)))

    def _fail_body(self, failures: list[str]) -> str:
        lines = [f"backup-sidecar on {self.host}: FAILED: {'; '.join(failures)}"]
        if self._tail is not None:
            lines += ["", "Last log lines:", *self._tail.lines()]
        return mask("\n".join(lines))
