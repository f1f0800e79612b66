"""BACKUP_SCHEDULE: parse the operator's text and drive the ``schedule`` library with it.

Accepted forms, all read as wall-clock time in TZ (an IANA zone name):

* daily times: ``03:00`` or ``03:00,11:00,19:00`` (``HH:MM`` or ``HH:MM:SS``);
* intervals: ``every 6h`` / ``every 15m`` / ``every 30s`` / ``every 1d``. An interval that divides a day
  fires on slots aligned to midnight in TZ (``every 6h`` -> 00:00, 06:00, 12:00, 18:00), so replicas fire in
  the same slot and the lock lets one of them run. Any other interval (``every 7h``) counts from process
  start, is not aligned to the clock and cannot be coordinated across replicas by slot;
* 5-field cron lines with lists, ranges and steps in minute, hour and day-of-week (``0 3 * * 1-5``), and
  ``@hourly``, ``@daily``, ``@midnight``, ``@weekly``.

Anything the library cannot honour exactly (day-of-month, month, @reboot, too many jobs) is refused.

Time zones: ``schedule`` 1.2.2's ``.at(time, tz)`` imports pytz, which is not a dependency. Without ``tz``
the library computes in naive *process-local* wall-clock time (``datetime.now()``), so ``install`` makes the
process's local zone TZ (``os.environ["TZ"]`` + ``time.tzset()``) and the jobs are plain naive ones.
The DST behaviour that follows, which ``Schedule.next_run`` reproduces exactly:

* a time inside the skipped hour (02:30 on a spring-forward night) fires when the clock jumps, at 03:00;
  several slots skipped together run the backup once;
* a time inside the repeated hour (02:30 on a fall-back night) fires once, on its first pass;
* slot intervals keep wall-clock slots, so ``every 6h`` has one 5h and one 7h gap a year;
* a non-aligned ``every 7h`` adds 7 wall-clock hours, so it is 6h or 8h of real time across a change.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import schedule

log = logging.getLogger(__name__)

MAX_JOBS = 1500
"""More jobs than this make every scheduler tick scan a long list for little gain; such lines are refused."""

_DEFAULT_HINT = 'use "03:00", "03:00,15:00", "every 6h" or a cron line such as "0 3 * * *"'
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_SHORT_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_CRON_DAY_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0"}
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_UNIT_NAMES = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_TIME = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")
_EVERY = re.compile(r"^every\s+(\d+)\s*([a-z]*)$", re.IGNORECASE)
_CRON_ITEM = re.compile(r"^(?:(\*)|(\w+)(?:-(\w+))?)(?:/(\d+))?$")
_DAY = 86400


class ScheduleError(ValueError):
    """A BACKUP_SCHEDULE or TZ the sidecar cannot honour exactly; str() is one line with a hint."""


@dataclass(frozen=True)
class _Slot:
    """One library job. ``unit`` is minute/hour/day/week (fixed wall-clock slots) or interval."""

    unit: str
    hour: int = 0
    minute: int = 0
    second: int = 0
    weekday: int = 0
    seconds: int = 0

    def target_after(self, wall: datetime) -> datetime:
        """The naive wall time the library sets as next_run when (re)scheduling at naive ``wall``."""
        if self.unit == "interval":
            return wall + timedelta(seconds=self.seconds)
        if self.unit == "minute":
            target, step = wall.replace(second=self.second, microsecond=0), timedelta(minutes=1)
        elif self.unit == "hour":
            target = wall.replace(minute=self.minute, second=self.second, microsecond=0)
            step = timedelta(hours=1)
        else:
            start = wall
            step = timedelta(days=1)
            if self.unit == "week":
                start = wall + timedelta(days=(self.weekday - wall.weekday()) % 7)
                step = timedelta(weeks=1)
            target = start.replace(hour=self.hour, minute=self.minute, second=self.second, microsecond=0)
        while target <= wall:
            target += step
        return target

    def register(self, scheduler: schedule.Scheduler) -> schedule.Job:
        """An unfinished library job (no ``do`` yet) for this slot."""
        if self.unit == "interval":
            for unit, size in (("days", _DAY), ("hours", 3600), ("minutes", 60)):
                if self.seconds % size == 0:
                    return getattr(scheduler.every(self.seconds // size), unit)
            return scheduler.every(self.seconds).seconds
        if self.unit == "minute":
            return scheduler.every().minute.at(f":{self.second:02d}")
        if self.unit == "hour":
            return scheduler.every().hour.at(f"{self.minute:02d}:{self.second:02d}")
        job = scheduler.every()
        builder = job.day if self.unit == "day" else getattr(job, _WEEKDAYS[self.weekday])
        return builder.at(f"{self.hour:02d}:{self.minute:02d}:{self.second:02d}")


@dataclass(frozen=True)
class Schedule:
    """A validated BACKUP_SCHEDULE in zone ``tz``; constructing one raises ScheduleError if it is invalid."""

    text: str
    tz: str = "UTC"
    _slots: tuple[_Slot, ...] = field(init=False, repr=False, compare=False)
    _summary: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _zone(self.tz)
        slots, summary = _parse(self.text)
        object.__setattr__(self, "_slots", slots)
        object.__setattr__(self, "_summary", summary)

    @property
    def aligned(self) -> bool:
        """False for intervals counted from process start: their next run depends on when ``install`` ran."""
        return not any(slot.unit == "interval" for slot in self._slots)

    def install(self, scheduler: schedule.Scheduler, job: Callable[[], object]) -> list[schedule.Job]:
        """Register the jobs on ``scheduler`` so that ``job`` runs once per slot.

        The process's local time zone becomes TZ, because the library computes in naive local time. Slots
        that fall due together, or while a backup for an earlier slot is still running, are skipped
        instead of queueing backups back to back (as cron with flock would).
        """
        _use_as_local_time(self.tz)
        guard = _OncePerSlot(job)
        for slot in self._slots:
            guard.jobs.append(slot.register(scheduler).do(guard, len(guard.jobs)))
        return list(guard.jobs)

    def next_run(self, after: datetime) -> datetime:
        """First fire time strictly after ``after`` (aware), in UTC; exact for what ``install`` registers.

        For a non-aligned interval it is the first run of jobs installed at ``after``; the running sidecar
        should read that from its scheduler instead.
        """
        if after.tzinfo is None or after.utcoffset() is None:
            raise ValueError("next_run needs an aware datetime")
        zone = _zone(self.tz)
        start = after.astimezone(UTC)
        wall = start.astimezone(zone).replace(tzinfo=None)
        return min(_fire_instant(slot.target_after(wall), zone, start) for slot in self._slots)

    def describe(self) -> str:
        """One line for logs, `config` and /health."""
        return f"{self._summary} {self.tz}"


def parse_schedule(text: str, tz: str = "UTC") -> Schedule:
    """Validate BACKUP_SCHEDULE and TZ as the environment gives them (blank TZ means UTC, like libc)."""
    zone_name = (tz or "").strip().removeprefix(":") or "UTC"
    return Schedule((text or "").strip(), zone_name)


class _OncePerSlot:
    """Calls the backup for the library jobs of one Schedule, skipping slots that an earlier call covered.

    A DST jump makes 02:00, 02:15, ... due at 03:00 in one tick, and a long backup makes the next slots due
    before it returns. The library's own clock (``last_run`` / ``next_run`` of the jobs) decides, so there is
    no second clock to disagree with it.
    """

    def __init__(self, job: Callable[[], object]) -> None:
        self.job = job
        self.jobs: list[schedule.Job] = []

    def __call__(self, index: int) -> object:
        due = self.jobs[index].next_run
        last = max((j.last_run for j in self.jobs if j.last_run is not None), default=None)
        if due is not None and last is not None and due <= last:
            log.info("skipping the slot due at %s: the backup that ended at %s covered it", due, last)
            return None
        return self.job()


def _fail(text: str, problem: str, hint: str = _DEFAULT_HINT) -> ScheduleError:
    return ScheduleError(f'BACKUP_SCHEDULE "{text}": {problem} (hint: {hint})')


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ScheduleError(
            f'TZ "{name}": unknown time zone (hint: use an IANA name such as "Europe/Berlin" or "UTC"; '
            "the image needs the tzdata package)"
        ) from exc


def _use_as_local_time(name: str) -> None:
    """Make libc's local time TZ, since the library reads naive ``datetime.now()``."""
    zone = _zone(name)
    if _local_time_matches(zone):
        return
    os.environ["TZ"] = name
    if hasattr(time, "tzset"):
        time.tzset()
    if not _local_time_matches(zone):
        raise ScheduleError(
            f'TZ "{name}": the C library does not know this zone, so the scheduler clock would be wrong '
            "(hint: install the tzdata package in the image)"
        )
    log.info("process local time zone set to %s for the scheduler", name)


def _local_time_matches(zone: ZoneInfo) -> bool:
    """Same UTC offset on every day of the next two years, which covers the coming DST changes."""
    now = int(time.time())
    for day in range(0, 2 * 366):
        ts = now + day * _DAY
        expected = datetime.fromtimestamp(ts, zone).utcoffset()
        if expected is None or time.localtime(ts).tm_gmtoff != int(expected.total_seconds()):
            return False
    return True


def _wall(instant: datetime, zone: ZoneInfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def _fire_instant(target: datetime, zone: ZoneInfo, not_before: datetime) -> datetime:
    """First instant at or after ``not_before`` whose wall clock reads ``target`` or later.

    That is when the library, polling ``datetime.now() >= next_run``, fires: the first pass of a repeated
    wall time, or the moment the clock jumps over a skipped one.
    """
    for fold in (0, 1):
        instant = target.replace(tzinfo=zone, fold=fold).astimezone(UTC)
        if instant >= not_before and _wall(instant, zone) == target:
            return instant
    ends = sorted(target.replace(tzinfo=zone, fold=fold).astimezone(UTC) for fold in (0, 1))
    lo, hi = math.ceil(ends[0].timestamp()), math.floor(ends[1].timestamp())
    while lo < hi:
        mid = (lo + hi) // 2
        if _wall(datetime.fromtimestamp(mid, UTC), zone) >= target:
            hi = mid
        else:
            lo = mid + 1
    return max(datetime.fromtimestamp(lo, UTC), not_before)


def _parse(text: str) -> tuple[tuple[_Slot, ...], str]:
    if not text:
        raise _fail(text, "is empty", f'leave it unset for the default "03:00", or {_DEFAULT_HINT}')
    if text.startswith("@"):
        return _parse_macro(text)
    if text.lower().startswith("every"):
        return _parse_every(text)
    if ":" in text:
        return _parse_times(text)
    return _parse_cron(text, text)


def _parse_times(text: str) -> tuple[tuple[_Slot, ...], str]:
    seconds: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        m = _TIME.match(item)
        if not m:
            raise _fail(text, f'"{item}" is not a time of day', 'write HH:MM or HH:MM:SS, e.g. "03:00,15:30"')
        hour, minute, second = int(m[1]), int(m[2]), int(m[3] or 0)
        if hour > 23 or minute > 59 or second > 59:
            raise _fail(text, f'"{item}" is not a time of day', "hours are 00-23, minutes and seconds 00-59")
        seconds.add(hour * 3600 + minute * 60 + second)
    slots = tuple(_Slot("day", s // 3600, s // 60 % 60, s % 60) for s in sorted(seconds))
    return slots, "daily at " + ", ".join(_clock(s) for s in sorted(seconds))


def _parse_every(text: str) -> tuple[tuple[_Slot, ...], str]:
    m = _EVERY.match(text)
    unit = (m[2].lower() if m else "") or "?"
    if not m or unit not in _UNIT_SECONDS:
        raise _fail(text, "is not an interval", 'write "every N" and a unit s, m, h or d, e.g. "every 6h"')
    count = int(m[1])
    if count == 0:
        raise _fail(text, "the interval is zero", 'use a positive interval such as "every 6h"')
    period = count * _UNIT_SECONDS[unit]
    label = f"every {count}{unit}"
    if _DAY % period:
        slot = _Slot("interval", seconds=period)
        return (
            slot,
        ), f"{label} from process start (not aligned to the clock, so replicas cannot share slots)"
    if 60 % period == 0:
        slots = tuple(_Slot("minute", second=s) for s in range(0, 60, period))
        where = "past each minute at " + _short_list([f":{s.second:02d}" for s in slots])
    elif 3600 % period == 0:
        slots = tuple(_Slot("hour", minute=s // 60, second=s % 60) for s in range(0, 3600, period))
        where = "past each hour at " + _short_list([_mmss(s.minute * 60 + s.second) for s in slots])
    else:
        offsets = range(0, _DAY, period)
        slots = tuple(_Slot("day", s // 3600, s // 60 % 60, s % 60) for s in offsets)
        where = "at " + _short_list([_clock(s) for s in offsets])
    if len(slots) > MAX_JOBS:
        raise _fail(
            text,
            f"needs {len(slots)} scheduler jobs, more than {MAX_JOBS}",
            "use an interval that divides a minute or an hour, e.g. every 30s or every 5m",
        )
    return slots, f"{label} aligned to midnight, {where}"


def _parse_macro(text: str) -> tuple[tuple[_Slot, ...], str]:
    name = text.lower()
    if name == "@reboot":
        raise _fail(
            text, "@reboot is not a schedule", "set BACKUP_ON_START=true and a regular BACKUP_SCHEDULE"
        )
    if name in ("@monthly", "@yearly", "@annually"):
        raise _fail(
            text,
            "day-of-month is not supported",
            'use a daily time such as "03:00" and rely on retention\'s monthly rule',
        )
    if name not in _MACROS:
        raise _fail(text, f"unknown macro {text}", "use @hourly, @daily, @midnight or @weekly")
    return _parse_cron(text, _MACROS[name])


def _parse_cron(text: str, line: str) -> tuple[tuple[_Slot, ...], str]:
    fields = line.split()
    if len(fields) != 5:
        raise _fail(
            text,
            f"a cron line has 5 fields (minute hour day-of-month month day-of-week), this has {len(fields)}",
            'write only the time fields, e.g. "0 3 * * *", or a daily time such as "03:00"',
        )
    minute_f, hour_f, dom_f, month_f, dow_f = fields
    if dom_f != "*":
        raise _fail(
            text,
            "day-of-month is not supported",
            'use a daily time such as "03:00" and rely on retention\'s monthly rule',
        )
    if month_f != "*":
        raise _fail(
            text, "month is not supported", 'use "*" for the month and rely on retention\'s monthly rule'
        )
    minutes = _cron_field(text, "minute", minute_f, 0, 59)
    hours = _cron_field(text, "hour", hour_f, 0, 23)
    days = sorted({(d - 1) % 7 for d in _cron_field(text, "day-of-week", dow_f, 0, 7, _CRON_DAY_NAMES)})
    every_day = len(days) == 7
    if every_day and len(hours) == 24 and len(minutes) == 60:
        return (_Slot("minute"),), f'cron "{text}": every minute'
    if every_day and len(hours) == 24:
        slots = tuple(_Slot("hour", minute=m) for m in minutes)
        return slots, f'cron "{text}": every hour at ' + _short_list([f":{m:02d}" for m in minutes])
    times = [h * 3600 + m * 60 for h in hours for m in minutes]
    if every_day:
        slots = tuple(_Slot("day", t // 3600, t // 60 % 60) for t in times)
    else:
        slots = tuple(_Slot("week", t // 3600, t // 60 % 60, weekday=d) for d in days for t in times)
    if len(slots) > MAX_JOBS:
        raise _fail(
            text,
            f"needs {len(slots)} scheduler jobs, more than {MAX_JOBS}",
            'restrict the minute field (e.g. "*/5") or use "every 15m"',
        )
    when = "daily" if every_day else "on " + ", ".join(_SHORT_DAYS[d] for d in days)
    at = _short_list([_clock(t) for t in times]) if len(times) <= 8 else f"{len(times)} times a day"
    return slots, f'cron "{text}": {when} at {at}'


def _cron_field(
    text: str, name: str, spec: str, low: int, high: int, names: dict[str, int] | None = None
) -> list[int]:
    """Values of one cron field (lists, ranges, steps, day names), checked against [low, high]."""

    def value(token: str) -> int:
        if token.isdigit():
            number = int(token)
        elif names and token.lower() in names:
            number = names[token.lower()]
        else:
            raise _fail(text, f'{name} field "{spec}": "{token}" is not a value', f"use {low}-{high}")
        if not low <= number <= high:
            raise _fail(text, f'{name} field "{spec}": {number} is out of range', f"use {low}-{high}")
        return number

    result: set[int] = set()
    for item in spec.split(","):
        m = _CRON_ITEM.match(item)
        if not m:
            raise _fail(
                text, f'{name} field "{spec}": "{item}" is not understood', "use N, N-M, */S or N-M/S"
            )
        step = int(m[4]) if m[4] else 1
        if step == 0:
            raise _fail(text, f'{name} field "{spec}": step 0', "use a step of 1 or more")
        if m[1]:
            first, last = low, high
        else:
            first = value(m[2])
            last = value(m[3]) if m[3] else (high if m[4] else first)
        if first > last:
            raise _fail(
                text, f'{name} field "{spec}": range {item} runs backwards', "write the range low-high"
            )
        result.update(range(first, last + 1, step))
    return sorted(result)


def _clock(seconds: int) -> str:
    hour, minute, second = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{hour:02d}:{minute:02d}" + (f":{second:02d}" if second else "")


def _mmss(seconds: int) -> str:
    return f":{seconds // 60:02d}" + (f":{seconds % 60:02d}" if seconds % 60 else "")


def _short_list(items: list[str]) -> str:
    return ", ".join(items) if len(items) <= 8 else ", ".join(items[:4]) + f", ... ({len(items)} slots)"
