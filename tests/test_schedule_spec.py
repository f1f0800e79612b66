"""BACKUP_SCHEDULE parsing, next-run times across DST, and agreement with the real ``schedule`` library."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import schedule

from app.schedule_spec import MAX_JOBS, Schedule, ScheduleError, parse_schedule

BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"


def at(text: str) -> datetime:
    """An aware instant from ISO text with its offset, so the tables read as local wall-clock times."""
    return datetime.fromisoformat(text)


def successive_runs(sched: Schedule, start: datetime, count: int) -> list[datetime]:
    runs, moment = [], start
    for _ in range(count):
        moment = sched.next_run(moment)
        runs.append(moment)
    return runs


# (BACKUP_SCHEDULE, TZ, after, the next runs in order). Local offsets in the expectations make DST visible:
# Berlin springs forward 2026-03-29 02:00->03:00 and falls back 2026-10-25 03:00->02:00; New York springs
# forward 2026-03-08 02:00->03:00 and falls back 2026-11-01 02:00->01:00.
NEXT_RUNS = [
    # --- UTC -------------------------------------------------------------------------------------------
    ("03:00", "UTC", "2026-11-22T00:00+00:00", ["2026-11-22T03:00+00:00", "2026-11-23T03:00+00:00"]),
    (
        "03:00,11:00,19:00",
        "UTC",
        "2026-11-22T03:00+00:00",
        ["2026-11-22T11:00+00:00", "2026-11-22T19:00+00:00", "2026-11-23T03:00+00:00"],
    ),
    (
        "19:00, 3:00:30",
        "UTC",
        "2026-11-22T12:00+00:00",
        ["2026-11-22T19:00+00:00", "2026-11-23T03:00:30+00:00"],
    ),
    (
        "every 6h",
        "UTC",
        "2026-11-22T05:00+00:00",
        [
            "2026-11-22T06:00+00:00",
            "2026-11-22T12:00+00:00",
            "2026-11-22T18:00+00:00",
            "2026-11-23T00:00+00:00",
        ],
    ),
    (
        "every 15m",
        "UTC",
        "2026-11-22T10:07+00:00",
        [
            "2026-11-22T10:15+00:00",
            "2026-11-22T10:30+00:00",
            "2026-11-22T10:45+00:00",
            "2026-11-22T11:00+00:00",
        ],
    ),
    (
        "every 30s",
        "UTC",
        "2026-11-22T10:00:10+00:00",
        ["2026-11-22T10:00:30+00:00", "2026-11-22T10:01:00+00:00", "2026-11-22T10:01:30+00:00"],
    ),
    ("every 1d", "UTC", "2026-11-22T10:00+00:00", ["2026-11-23T00:00+00:00", "2026-11-24T00:00+00:00"]),
    ("every 24h", "UTC", "2026-11-22T10:00+00:00", ["2026-11-23T00:00+00:00"]),
    (
        "every 90m",
        "UTC",
        "2026-11-22T00:10+00:00",
        ["2026-11-22T01:30+00:00", "2026-11-22T03:00+00:00", "2026-11-22T04:30+00:00"],
    ),
    (
        "every 7h",
        "UTC",
        "2026-11-22T10:07+00:00",
        ["2026-11-22T17:07+00:00", "2026-11-23T00:07+00:00", "2026-11-23T07:07+00:00"],
    ),
    (
        "0 3,11,19 * * *",
        "UTC",
        "2026-11-22T12:00+00:00",
        ["2026-11-22T19:00+00:00", "2026-11-23T03:00+00:00", "2026-11-23T11:00+00:00"],
    ),
    (
        "30 2 * * 0",
        "UTC",
        "2026-11-20T00:00+00:00",
        ["2026-11-22T02:30+00:00", "2026-11-29T02:30+00:00", "2026-12-06T02:30+00:00"],
    ),
    (
        "*/15 * * * *",
        "UTC",
        "2026-11-22T10:59+00:00",
        ["2026-11-22T11:00+00:00", "2026-11-22T11:15+00:00", "2026-11-22T11:30+00:00"],
    ),
    (
        "0 */6 * * 1-5",  # Friday evening: the weekend is skipped
        "UTC",
        "2026-11-20T13:00+00:00",
        ["2026-11-20T18:00+00:00", "2026-11-23T00:00+00:00", "2026-11-23T06:00+00:00"],
    ),
    (
        "15 1 * * mon,WED-fri",
        "UTC",
        "2026-11-22T00:00+00:00",
        [
            "2026-11-23T01:15+00:00",
            "2026-11-25T01:15+00:00",
            "2026-11-26T01:15+00:00",
            "2026-11-27T01:15+00:00",
        ],
    ),
    ("0 4 * * 7", "UTC", "2026-11-22T05:00+00:00", ["2026-11-29T04:00+00:00"]),
    (
        "5-10/5 9-10 * * *",
        "UTC",
        "2026-11-22T00:00+00:00",
        [
            "2026-11-22T09:05+00:00",
            "2026-11-22T09:10+00:00",
            "2026-11-22T10:05+00:00",
            "2026-11-22T10:10+00:00",
        ],
    ),
    (
        "50/5 * * * *",
        "UTC",
        "2026-11-22T00:00+00:00",
        ["2026-11-22T00:50+00:00", "2026-11-22T00:55+00:00", "2026-11-22T01:50+00:00"],
    ),
    ("* * * * *", "UTC", "2026-11-22T10:00:30+00:00", ["2026-11-22T10:01+00:00", "2026-11-22T10:02+00:00"]),
    ("@hourly", "UTC", "2026-11-22T10:00+00:00", ["2026-11-22T11:00+00:00", "2026-11-22T12:00+00:00"]),
    ("@daily", "UTC", "2026-11-22T10:00+00:00", ["2026-11-23T00:00+00:00"]),
    ("@weekly", "UTC", "2026-11-22T10:00+00:00", ["2026-11-29T00:00+00:00"]),
    # --- Europe/Berlin: spring forward -----------------------------------------------------------------
    (
        "02:30",  # the skipped 02:30 runs when the clock jumps to 03:00
        BERLIN,
        "2026-03-28T00:00+01:00",
        ["2026-03-28T02:30+01:00", "2026-03-29T03:00+02:00", "2026-03-30T02:30+02:00"],
    ),
    (
        "03:00,11:00",
        BERLIN,
        "2026-03-28T12:00+01:00",
        ["2026-03-29T03:00+02:00", "2026-03-29T11:00+02:00", "2026-03-30T03:00+02:00"],
    ),
    (
        "every 6h",
        BERLIN,
        "2026-03-28T21:00+01:00",
        ["2026-03-29T00:00+01:00", "2026-03-29T06:00+02:00", "2026-03-29T12:00+02:00"],
    ),
    (
        "*/15 * * * *",  # 02:00-02:45 do not exist: one run at 03:00, not four
        BERLIN,
        "2026-03-29T01:40+01:00",
        ["2026-03-29T01:45+01:00", "2026-03-29T03:00+02:00", "2026-03-29T03:15+02:00"],
    ),
    (
        "30 2 * * 0",
        BERLIN,
        "2026-03-21T00:00+01:00",
        ["2026-03-22T02:30+01:00", "2026-03-29T03:00+02:00", "2026-04-05T02:30+02:00"],
    ),
    (
        "every 7h",  # 7 wall-clock hours: 6 real hours across the jump
        BERLIN,
        "2026-03-28T23:00+01:00",
        ["2026-03-29T06:00+02:00", "2026-03-29T13:00+02:00"],
    ),
    (
        "every 7h",  # lands on the skipped 02:30, so it runs at the jump
        BERLIN,
        "2026-03-28T19:30+01:00",
        ["2026-03-29T03:00+02:00", "2026-03-29T10:00+02:00"],
    ),
    # --- Europe/Berlin: fall back ----------------------------------------------------------------------
    (
        "02:30",  # the repeated 02:30 runs once, on its first pass
        BERLIN,
        "2026-10-24T00:00+02:00",
        ["2026-10-24T02:30+02:00", "2026-10-25T02:30+02:00", "2026-10-26T02:30+01:00"],
    ),
    (
        "every 1h",  # wall-clock slots: the repeated 02:00 hour gets no second run
        BERLIN,
        "2026-10-25T01:30+02:00",
        ["2026-10-25T02:00+02:00", "2026-10-25T03:00+01:00", "2026-10-25T04:00+01:00"],
    ),
    (
        "every 6h",
        BERLIN,
        "2026-10-24T21:00+02:00",
        ["2026-10-25T00:00+02:00", "2026-10-25T06:00+01:00", "2026-10-25T12:00+01:00"],
    ),
    (
        "every 7h",  # after the fall-back hour, a second pass over 02:xx: 02:10 + 7 wall hours
        BERLIN,
        "2026-10-25T02:10+01:00",
        ["2026-10-25T09:10+01:00"],
    ),
    # --- America/New_York ------------------------------------------------------------------------------
    (
        "02:30",
        NEW_YORK,
        "2026-03-07T00:00-05:00",
        ["2026-03-07T02:30-05:00", "2026-03-08T03:00-04:00", "2026-03-09T02:30-04:00"],
    ),
    (
        "every 15m",
        NEW_YORK,
        "2026-03-08T01:40-05:00",
        ["2026-03-08T01:45-05:00", "2026-03-08T03:00-04:00", "2026-03-08T03:15-04:00"],
    ),
    (
        "01:30",
        NEW_YORK,
        "2026-10-31T00:00-04:00",
        ["2026-10-31T01:30-04:00", "2026-11-01T01:30-04:00", "2026-11-02T01:30-05:00"],
    ),
    (
        "0 */6 * * *",
        NEW_YORK,
        "2026-10-31T20:00-04:00",
        ["2026-11-01T00:00-04:00", "2026-11-01T06:00-05:00", "2026-11-01T12:00-05:00"],
    ),
    (
        "every 15m",  # 01:45 EDT, then the clock repeats 01:00-01:59 as EST: next wall slot is 02:00 EST
        NEW_YORK,
        "2026-11-01T01:40-04:00",
        ["2026-11-01T01:45-04:00", "2026-11-01T02:00-05:00", "2026-11-01T02:15-05:00"],
    ),
    (
        "30 1 * * 0",  # Sunday 01:30 on the fall-back day: first pass only
        NEW_YORK,
        "2026-10-31T12:00-04:00",
        ["2026-11-01T01:30-04:00", "2026-11-08T01:30-05:00"],
    ),
]


@pytest.mark.parametrize(("text", "tz", "after", "expected"), NEXT_RUNS)
def test_next_runs_follow_wall_clock_in_tz(text: str, tz: str, after: str, expected: list[str]) -> None:
    runs = successive_runs(parse_schedule(text, tz), at(after), len(expected))
    assert runs == [at(e) for e in expected]
    assert all(r.tzinfo is UTC for r in runs)


def test_next_run_is_strictly_after_a_slot_instant() -> None:
    sched = parse_schedule("03:00")
    assert sched.next_run(at("2026-11-22T03:00+00:00")) == at("2026-11-23T03:00+00:00")
    assert sched.next_run(at("2026-11-22T02:59:59.999+00:00")) == at("2026-11-22T03:00+00:00")


def test_next_run_accepts_any_aware_datetime() -> None:
    sched = parse_schedule("03:00", BERLIN)
    assert sched.next_run(at("2026-11-22T12:00-05:00")) == at("2026-11-23T03:00+01:00")


def test_next_run_refuses_naive_datetime() -> None:
    with pytest.raises(ValueError, match="aware"):
        parse_schedule("03:00").next_run(datetime(2026, 11, 22, 3, 0))


REFUSALS = [
    (
        "0 3 1 * *",
        'BACKUP_SCHEDULE "0 3 1 * *": day-of-month is not supported '
        '(hint: use a daily time such as "03:00" and rely on retention\'s monthly rule)',
    ),
    (
        "0 3 */2 * *",
        'BACKUP_SCHEDULE "0 3 */2 * *": day-of-month is not supported '
        '(hint: use a daily time such as "03:00" and rely on retention\'s monthly rule)',
    ),
    (
        "0 3 * 1 *",
        'BACKUP_SCHEDULE "0 3 * 1 *": month is not supported '
        '(hint: use "*" for the month and rely on retention\'s monthly rule)',
    ),
    (
        "@monthly",
        'BACKUP_SCHEDULE "@monthly": day-of-month is not supported '
        '(hint: use a daily time such as "03:00" and rely on retention\'s monthly rule)',
    ),
    (
        "@reboot",
        'BACKUP_SCHEDULE "@reboot": @reboot is not a schedule '
        "(hint: set BACKUP_ON_START=true and a regular BACKUP_SCHEDULE)",
    ),
    (
        "@often",
        'BACKUP_SCHEDULE "@often": unknown macro @often (hint: use @hourly, @daily, @midnight or @weekly)',
    ),
    (
        "* * * * 1-5",
        'BACKUP_SCHEDULE "* * * * 1-5": needs 7200 scheduler jobs, more than 1500 '
        '(hint: restrict the minute field (e.g. "*/5") or use "every 15m")',
    ),
    (
        "every 27s",
        'BACKUP_SCHEDULE "every 27s": needs 3200 scheduler jobs, more than 1500 '
        "(hint: use an interval that divides a minute or an hour, e.g. every 30s or every 5m)",
    ),
    (
        "0 3 * * * /usr/bin/backup",
        'BACKUP_SCHEDULE "0 3 * * * /usr/bin/backup": a cron line has 5 fields '
        "(minute hour day-of-month month day-of-week), this has 6 "
        '(hint: write only the time fields, e.g. "0 3 * * *", or a daily time such as "03:00")',
    ),
    (
        "3am",
        'BACKUP_SCHEDULE "3am": a cron line has 5 fields (minute hour day-of-month month day-of-week), '
        'this has 1 (hint: write only the time fields, e.g. "0 3 * * *", or a daily time such as "03:00")',
    ),
    (
        "0 24 * * *",
        'BACKUP_SCHEDULE "0 24 * * *": hour field "24": 24 is out of range (hint: use 0-23)',
    ),
    (
        "60 3 * * *",
        'BACKUP_SCHEDULE "60 3 * * *": minute field "60": 60 is out of range (hint: use 0-59)',
    ),
    (
        "0 3 * * 8",
        'BACKUP_SCHEDULE "0 3 * * 8": day-of-week field "8": 8 is out of range (hint: use 0-7)',
    ),
    (
        "0 3 * * funday",
        'BACKUP_SCHEDULE "0 3 * * funday": day-of-week field "funday": "funday" is not a value'
        " (hint: use 0-7)",
    ),
    (
        "0 5-3 * * *",
        'BACKUP_SCHEDULE "0 5-3 * * *": hour field "5-3": range 5-3 runs backwards'
        " (hint: write the range low-high)",
    ),
    (
        "*/0 3 * * *",
        'BACKUP_SCHEDULE "*/0 3 * * *": minute field "*/0": step 0 (hint: use a step of 1 or more)',
    ),
    (
        "0 3,,4 * * *",
        'BACKUP_SCHEDULE "0 3,,4 * * *": hour field "3,,4": "" is not understood'
        " (hint: use N, N-M, */S or N-M/S)",
    ),
    (
        "25:00",
        'BACKUP_SCHEDULE "25:00": "25:00" is not a time of day'
        " (hint: hours are 00-23, minutes and seconds 00-59)",
    ),
    (
        "03:00 15:00",
        'BACKUP_SCHEDULE "03:00 15:00": "03:00 15:00" is not a time of day '
        '(hint: write HH:MM or HH:MM:SS, e.g. "03:00,15:30")',
    ),
    (
        "every 6 hours",
        'BACKUP_SCHEDULE "every 6 hours": is not an interval '
        '(hint: write "every N" and a unit s, m, h or d, e.g. "every 6h")',
    ),
    (
        "every 0h",
        'BACKUP_SCHEDULE "every 0h": the interval is zero (hint: use a positive interval such as "every 6h")',
    ),
    (
        "",
        'BACKUP_SCHEDULE "": is empty (hint: leave it unset for the default "03:00", or use "03:00", '
        '"03:00,15:00", "every 6h" or a cron line such as "0 3 * * *")',
    ),
]


@pytest.mark.parametrize(("text", "message"), REFUSALS)
def test_unsupported_schedule_is_refused_with_one_line_hint(text: str, message: str) -> None:
    with pytest.raises(ScheduleError) as info:
        parse_schedule(text)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("tz", ["Mars/Olympus_Mons", "../etc/passwd", "CET-1CEST,M3.5.0,M10.5.0/3"])
def test_unknown_tz_is_refused_with_hint(tz: str) -> None:
    with pytest.raises(ScheduleError) as info:
        parse_schedule("03:00", tz)
    assert str(info.value) == (
        f'TZ "{tz}": unknown time zone (hint: use an IANA name such as "Europe/Berlin" or "UTC"; '
        "the image needs the tzdata package)"
    )


def test_schedule_error_is_a_value_error() -> None:
    assert issubclass(ScheduleError, ValueError)


def test_blank_or_colon_prefixed_tz_reads_like_libc() -> None:
    assert parse_schedule("03:00", "").tz == "UTC"
    assert parse_schedule("03:00", ":Europe/Berlin").tz == BERLIN


def test_largest_accepted_cron_line_fits_the_job_limit() -> None:
    sched = parse_schedule("*/5 * * * 1-5")
    assert len(sched.install(schedule.Scheduler(), lambda: None)) == 5 * 24 * 12 <= MAX_JOBS


DESCRIPTIONS = [
    ("03:00,11:00", BERLIN, "daily at 03:00, 11:00 Europe/Berlin"),
    ("11:00,03:00:30,11:00", "UTC", "daily at 03:00:30, 11:00 UTC"),
    ("every 6h", "UTC", "every 6h aligned to midnight, at 00:00, 06:00, 12:00, 18:00 UTC"),
    (
        "every 15m",
        NEW_YORK,
        "every 15m aligned to midnight, past each hour at :00, :15, :30, :45 America/New_York",
    ),
    ("every 30s", "UTC", "every 30s aligned to midnight, past each minute at :00, :30 UTC"),
    ("every 2h", "UTC", "every 2h aligned to midnight, at 00:00, 02:00, 04:00, 06:00, ... (12 slots) UTC"),
    (
        "every 7h",
        "UTC",
        "every 7h from process start (not aligned to the clock, so replicas cannot share slots) UTC",
    ),
    ("30 2 * * 0", BERLIN, 'cron "30 2 * * 0": on Sun at 02:30 Europe/Berlin'),
    ("0 3 * * mon-fri", "UTC", 'cron "0 3 * * mon-fri": on Mon, Tue, Wed, Thu, Fri at 03:00 UTC'),
    ("*/15 * * * *", "UTC", 'cron "*/15 * * * *": every hour at :00, :15, :30, :45 UTC'),
    ("*/10 8-18 * * *", "UTC", 'cron "*/10 8-18 * * *": daily at 66 times a day UTC'),
    ("@daily", "UTC", 'cron "@daily": daily at 00:00 UTC'),
]


@pytest.mark.parametrize(("text", "tz", "expected"), DESCRIPTIONS)
def test_describe_names_times_and_zone(text: str, tz: str, expected: str) -> None:
    assert parse_schedule(text, tz).describe() == expected


def test_only_intervals_counted_from_start_are_unaligned() -> None:
    assert not parse_schedule("every 7h").aligned
    assert all(parse_schedule(t).aligned for t in ("03:00", "every 6h", "every 15m", "0 3 * * 1"))


def test_schedule_compares_by_text_and_zone() -> None:
    assert parse_schedule(" 03:00 ", "UTC") == Schedule("03:00", "UTC")
    assert parse_schedule("03:00", BERLIN) != parse_schedule("03:00", "UTC")


# --- agreement with the schedule library --------------------------------------------------------------


@pytest.fixture(autouse=True)
def process_tz() -> Iterator[None]:
    """Restore the process's local time zone, which ``install`` changes on purpose."""
    saved = {name: os.environ.get(name) for name in ("TZ", "TZDIR")}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    time.tzset()


class FakeClock:
    """Stands in for ``datetime.now`` inside the schedule module only, keeping libc's local-time conversion.

    The library reads naive local time; ``fromtimestamp`` makes exactly that from the simulated instant, so
    the DST behaviour under test is the C library's, not a re-implementation of it.
    """

    def __init__(self, instant: datetime) -> None:
        self.instant = instant
        clock = self

        class FrozenDatetime(datetime):
            @classmethod
            def now(cls, tz: dt.tzinfo | None = None) -> datetime:  # type: ignore[override]
                return datetime.fromtimestamp(clock.instant.timestamp(), tz)

        self.module = SimpleNamespace(
            datetime=FrozenDatetime, timedelta=timedelta, time=dt.time, date=dt.date
        )

    def wall(self) -> datetime:
        return datetime.fromtimestamp(self.instant.timestamp())


def run_library(
    sched: Schedule,
    start: datetime,
    fires: int,
    monkeypatch: pytest.MonkeyPatch,
    step: timedelta = timedelta(minutes=1),
    job_takes: timedelta = timedelta(0),
) -> tuple[list[datetime], list[schedule.Job]]:
    """Poll a fresh Scheduler with a simulated clock; return the instants at which the backup was called.

    The clock moves in ``step`` ticks (and jumps over long idle stretches, never nearer than 2 h to the
    library's own next_run, more than any DST jump), as the sidecar's loop calls run_pending.
    """
    clock = FakeClock(start)
    monkeypatch.setattr(schedule, "datetime", clock.module)
    scheduler = schedule.Scheduler()
    calls: list[datetime] = []

    def backup() -> None:
        calls.append(clock.instant)
        clock.instant += job_takes

    jobs = sched.install(scheduler, backup)
    for _ in range(200_000):
        if len(calls) >= fires:
            break
        idle = scheduler.next_run - clock.wall()
        if idle > timedelta(hours=2):
            clock.instant += (idle - timedelta(hours=2)) // step * step
        clock.instant = next_tick(clock.instant, step)
        scheduler.run_pending()
    return calls, jobs


def next_tick(instant: datetime, step: timedelta) -> datetime:
    """The next multiple of ``step`` since the epoch, so polls land exactly on slot instants."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((instant - epoch) // step + 1) * step


@pytest.mark.parametrize(("text", "tz", "after", "expected"), NEXT_RUNS)
def test_installed_jobs_fire_exactly_at_next_run(
    text: str, tz: str, after: str, expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sched = parse_schedule(text, tz)
    start = at(after).astimezone(UTC)
    fires = len(expected) + 2
    step = timedelta(seconds=30 if any(at(e).second for e in expected) else 60)
    calls, _ = run_library(sched, start, fires, monkeypatch, step=step)
    assert calls == successive_runs(sched, start, fires)


def test_installed_second_slots_fire_exactly_at_next_run(monkeypatch: pytest.MonkeyPatch) -> None:
    sched = parse_schedule("every 30s", BERLIN)
    start = at("2026-03-29T01:58:50+01:00")
    calls, _ = run_library(sched, start, 6, monkeypatch, step=timedelta(seconds=1))
    assert calls == successive_runs(sched, start, 6)
    assert calls[2] == at("2026-03-29T03:00+02:00")


def test_slots_skipped_by_dst_jump_run_the_backup_once(monkeypatch: pytest.MonkeyPatch) -> None:
    sched = parse_schedule("every 15m", BERLIN)
    calls, jobs = run_library(sched, at("2026-03-29T01:50+01:00"), 3, monkeypatch)
    assert calls == [at("2026-03-29T03:00+02:00"), at("2026-03-29T03:15+02:00"), at("2026-03-29T03:30+02:00")]
    assert all(job.last_run is not None for job in jobs)


def test_slot_due_while_a_backup_runs_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    sched = parse_schedule("every 15m")
    calls, _ = run_library(
        sched, at("2026-11-22T09:59+00:00"), 3, monkeypatch, job_takes=timedelta(minutes=20)
    )
    assert calls == [at("2026-11-22T10:00+00:00"), at("2026-11-22T10:30+00:00"), at("2026-11-22T11:00+00:00")]


def test_backup_return_value_reaches_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(at("2026-11-22T02:59+00:00"))
    monkeypatch.setattr(schedule, "datetime", clock.module)
    scheduler = schedule.Scheduler()
    parse_schedule("03:00").install(scheduler, lambda: schedule.CancelJob)
    clock.instant += timedelta(minutes=1)
    scheduler.run_pending()
    assert scheduler.jobs == []


def test_install_uses_the_given_scheduler_only() -> None:
    before = list(schedule.default_scheduler.jobs)
    scheduler = schedule.Scheduler()
    jobs = parse_schedule("0 */6 * * 1-5").install(scheduler, lambda: None)
    assert len(jobs) == 20
    assert scheduler.jobs == jobs
    assert schedule.default_scheduler.jobs == before


def test_install_makes_process_local_time_follow_tz() -> None:
    os.environ["TZ"] = "UTC"
    time.tzset()
    parse_schedule("03:00", NEW_YORK).install(schedule.Scheduler(), lambda: None)
    assert os.environ["TZ"] == NEW_YORK
    assert time.localtime(at("2026-07-01T12:00+00:00").timestamp()).tm_gmtoff == -4 * 3600
    assert time.localtime(at("2026-12-01T12:00+00:00").timestamp()).tm_gmtoff == -5 * 3600


def test_install_refuses_zone_the_c_library_cannot_load(tmp_path: Path) -> None:
    os.environ["TZ"] = "UTC"
    time.tzset()
    os.environ["TZDIR"] = str(tmp_path)
    with pytest.raises(ScheduleError) as info:
        parse_schedule("03:00", BERLIN).install(schedule.Scheduler(), lambda: None)
    assert str(info.value) == (
        'TZ "Europe/Berlin": the C library does not know this zone, so the scheduler clock would be wrong '
        "(hint: install the tzdata package in the image)"
    )
