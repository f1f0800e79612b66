"""The weekly report: per database, what the targets hold, read from their manifests (the Catalog).

Built from the Catalog rather than from memory so it is right after a restart and on a replica that did not
run the backups itself. REPORT_SCHEDULE says when: ``sun 06:00`` (a weekday and a wall-clock time in TZ) or
``off``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from app.durations import format_duration, format_size
from app.logs import mask
from app.manifest import Manifest

if TYPE_CHECKING:
    from collections.abc import Iterable

    from app.catalog import Catalog

DEFAULT_REPORT_SCHEDULE = "sun 06:00"
_OFF = ("off", "never", "none", "false", "no", "0")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_SCHEDULE = re.compile(r"^(?P<day>[a-z]+)\s+(?P<h>\d{1,2}):(?P<m>\d{2})$")
_HINT = 'hint: a weekday and a time in TZ such as "sun 06:00" or "mon 08:30", or "off"'


@dataclass(frozen=True)
class ReportSchedule:
    """A weekday (0 = Monday) and a wall-clock time in the sidecar's TZ."""

    weekday: int
    at: time

    def __str__(self) -> str:
        return f"{_DAYS[self.weekday]} {self.at:%H:%M}"

    def next_after(self, now: datetime, tz: str = "UTC") -> datetime:
        """The first report time strictly after ``now`` (aware), as UTC; DST-safe through the zone."""
        zone = ZoneInfo(tz)
        local = now.astimezone(zone)
        day = local.date() + timedelta(days=(self.weekday - local.weekday()) % 7)
        candidate = _at(day, self.at, zone)
        if candidate <= now:
            candidate = _at(day + timedelta(days=7), self.at, zone)
        return candidate.astimezone(UTC)


def _at(day: date, at: time, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, at, tzinfo=zone)


def parse_report_schedule(text: str | None) -> ReportSchedule | None:
    """REPORT_SCHEDULE as a schedule, or None for ``off``; ValueError (with a hint) for anything else."""
    value = (text or "").strip().lower()
    if value in ("", *_OFF):
        return None
    m = _SCHEDULE.match(" ".join(value.split()))
    if not m:
        raise ValueError(f"{text!r} is not a weekly report time ({_HINT})")
    day = m["day"]
    if day in _DAYS:
        weekday = _DAYS.index(day)
    elif day in _FULL_DAYS:
        weekday = _FULL_DAYS.index(day)
    else:
        raise ValueError(f"{m['day']!r} is not a weekday ({_HINT})")
    hour, minute = int(m["h"]), int(m["m"])
    if hour > 23 or minute > 59:
        raise ValueError(f"{m['h']}:{m['m']} is not a time of day ({_HINT})")
    return ReportSchedule(weekday, time(hour, minute))


@dataclass(frozen=True)
class DatabaseSummary:
    """One database's week, as the manifests on the targets tell it."""

    database: str
    last_good: Manifest | None
    good_this_week: int
    failed_this_week: int
    last_failure: Manifest | None  # the newest failure of the week
    kept: int
    kept_bytes: int
    oldest_kept: Manifest | None
    broken: int  # manifest says ok, but no target holds the artifact with that size
    #: no longer a unit of the job (dropped database, name taken out of POSTGRES_DB): information only
    retired: bool = False

    @property
    def problems(self) -> list[str]:
        """What needs a human, worded for a subject line; empty when the week was clean (or it is retired)."""
        if self.retired:
            return []
        out = []
        if self.good_this_week == 0:
            out.append("no good backup this week")
        if self.failed_this_week:
            out.append(f"{self.failed_this_week} failed this week")
        if self.broken:
            out.append(f"{self.broken} broken")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "status": "attention" if self.problems else "ok",
            "last_good_id": self.last_good.id if self.last_good else None,
            "last_good_at": _iso(self.last_good.finished_at) if self.last_good else None,
            "backups_this_week": self.good_this_week,
            "failures_this_week": self.failed_this_week,
            "kept": self.kept,
            "kept_bytes": self.kept_bytes,
            "oldest_kept_id": self.oldest_kept.id if self.oldest_kept else None,
            "broken": self.broken,
            "retired": self.retired,
        }


@dataclass(frozen=True)
class WeeklyReport:
    host: str
    start: datetime
    end: datetime
    databases: list[DatabaseSummary]
    target_errors: dict[str, str] = field(default_factory=dict)

    @property
    def attention(self) -> bool:
        return bool(self.target_errors) or any(s.problems for s in self.databases) or not self.databases

    def render(self) -> str:
        """The plain-text body: one block per database, problems first in each block's heading."""
        lines = [
            f"backup-sidecar weekly report for {self.host}",
            f"Week: {_when(self.start)} to {_when(self.end)}",
            "",
        ]
        if self.target_errors:
            lines.append("Targets that could not be read (this report may be incomplete):")
            lines += [f"  {name}: {error}" for name, error in sorted(self.target_errors.items())]
            lines.append("")
        if not self.databases:
            lines += ["No database is configured and the targets hold no backups.", ""]
        for s in self.databases:
            heading = "ATTENTION: " + ", ".join(s.problems) if s.problems else ("RETIRED: no longer backed up, "
                                                                                "its backups stay under retention"
                                                                                if s.retired else "OK")
            lines.append(f"{s.database}: {heading}")
            lines.append(f"  last good backup:   {_describe(s.last_good, self.end)}")
            lines.append(f"  backups this week:  {s.good_this_week} good, {s.failed_this_week} failed")
            if s.last_failure is not None:
                error = (s.last_failure.error or "no error recorded").strip().splitlines()
                lines.append(f"  last failure:       {s.last_failure.id}: {error[0] if error else ''}")
            lines.append(f"  kept:               {s.kept} backup(s), {format_size(s.kept_bytes)} in total")
            lines.append(f"  oldest kept:        {_describe(s.oldest_kept, self.end)}")
            if s.broken:
                lines.append(f"  broken:             {s.broken} (manifest ok, artifact missing or of the wrong size)")
            lines.append("")
        lines.append("Sizes count each backup once, whatever the number of targets holding a copy.")
        return mask("\n".join(lines) + "\n")


def build_report(catalog: Catalog, host: str, databases: Iterable[str] = (), now: datetime | None = None,
                 days: int = 7, expected: Iterable[str] | None = None) -> WeeklyReport:
    """Summarise ``catalog`` for the ``days`` up to ``now``; configured databases with no backup are listed too.

    ``expected``: the job's units (app.units) when known; any other name the targets hold is retired.
    """
    end = (now or datetime.now(UTC)).astimezone(UTC)
    start = end - timedelta(days=days)
    units = None if expected is None else set(expected)
    names = {d for d in databases if d and d != "*"} | {e.manifest.database for e in catalog.entries} | (units or set())
    summaries = []
    for name in sorted(names):
        entries = [e for e in catalog.entries if e.manifest.database == name]  # newest first
        good = [e.manifest for e in entries if e.good]
        week = [e for e in entries if start < e.manifest.started_at <= end]
        failed = [e.manifest for e in week if not e.manifest.ok]
        summaries.append(DatabaseSummary(
            database=name,
            last_good=good[0] if good else None,
            good_this_week=sum(1 for e in week if e.good),
            failed_this_week=len(failed),
            last_failure=failed[0] if failed else None,
            kept=len(good),
            kept_bytes=sum(m.size_bytes for m in good),
            oldest_kept=good[-1] if good else None,
            broken=sum(1 for e in entries if e.status == "broken"),
            retired=units is not None and name not in units,
        ))
    return WeeklyReport(host, start, end, summaries, dict(catalog.errors))


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _describe(m: Manifest | None, now: datetime) -> str:
    if m is None:
        return "none"
    at = m.finished_at or m.started_at
    return f"{m.id}, {_when(at)} ({format_duration((now - at).total_seconds())} ago), {format_size(m.size_bytes)}"
