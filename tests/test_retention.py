"""Retention selection as a pure function: tables of synthetic histories, expected keeps written out by hand."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from app.layout import backup_id
from app.retention import Backup, Policy, select

NOW = datetime(2026, 11, 22, 16, 0, tzinfo=UTC)


def at(text: str) -> datetime:
    fmt = "%Y-%m-%d %H:%M:%S" if text.count(":") == 2 else "%Y-%m-%d %H:%M"
    return datetime.strptime(text, fmt).replace(tzinfo=UTC)


def ok(when: str, db: str = "app", slot: str | None = None) -> Backup:
    return Backup(backup_id(db, at(when)), db, at(when), "ok", slot)


def failed(when: str, db: str = "app") -> Backup:
    return Backup(backup_id(db, at(when)), db, at(when), "failed")


def broken(when: str, db: str = "app") -> Backup:
    return Backup(backup_id(db, at(when)), db, at(when), "broken")


def daily(first: str, last: str, skip: set[str] = frozenset(), time: str = "03:00") -> list[Backup]:  # type: ignore[assignment]
    day, end = date.fromisoformat(first), date.fromisoformat(last)
    out = []
    while day <= end:
        if day.isoformat() not in skip:
            out.append(ok(f"{day.isoformat()} {time}"))
        day += timedelta(days=1)
    return out


def days(first: str, last: str) -> set[str]:
    start, end = date.fromisoformat(first), date.fromisoformat(last)
    return {(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)}


def kept(backups: list[Backup], policy: Policy, now: datetime = NOW) -> set[str]:
    """Kept backups as "YYYY-MM-DD HH:MM[:SS]" (seconds only when not zero), database-prefixed when not app."""
    out = set()
    for d in select(backups, policy, now):
        if d.keep:
            t = d.backup.started_at
            text = t.strftime("%Y-%m-%d %H:%M:%S" if t.second else "%Y-%m-%d %H:%M")
            out.add(text if d.backup.database == "app" else f"{d.backup.database} {text}")
    return out


def two_hundred_days_plain() -> list[Backup]:
    return daily("2026-05-07", "2026-11-22")


def two_hundred_days_messy() -> list[Backup]:
    """200 days with a 4-day outage, a lost ISO week, a half-empty October, failures, a second backup on one
    day and one slot backed up twice by two replicas."""
    gaps = days("2026-11-18", "2026-11-21") | days("2026-11-02", "2026-11-08") | days("2026-10-21", "2026-10-31")
    history = daily("2026-05-07", "2026-11-22", skip=gaps | {"2026-11-17"})
    history += [
        ok("2026-11-17 03:00:00", slot="2026-11-17T03:00Z"),
        ok("2026-11-17 03:00:40", slot="2026-11-17T03:00Z"),  # a replica ran the same slot 40 s later
        ok("2026-11-16 15:00"),
        failed("2026-11-21 03:00"),  # 37 hours old at NOW
        failed("2026-11-22 15:00"),  # one hour old at NOW
        failed("2026-06-01 04:00"),
    ]
    return history


DEFAULTS = Policy(daily=14, weekly=4, monthly=3, minimum=3)

CASES = [
    pytest.param(
        two_hundred_days_plain(), DEFAULTS,
        # 14 days, then ISO weeks 45 and 44 (their Sundays), then September and October (their last days)
        {f"2026-11-{d:02d} 03:00" for d in range(9, 23)}
        | {"2026-11-08 03:00", "2026-11-01 03:00", "2026-10-31 03:00", "2026-09-30 03:00"},
        id="200-days-every-day",
    ),
    pytest.param(
        two_hundred_days_messy(), DEFAULTS,
        {
            # the last 14 days that have an ok backup reach back over the outage and the lost week
            "2026-11-22 03:00", "2026-11-17 03:00:40", "2026-11-16 15:00", "2026-11-15 03:00", "2026-11-14 03:00",
            "2026-11-13 03:00", "2026-11-12 03:00", "2026-11-11 03:00", "2026-11-10 03:00", "2026-11-09 03:00",
            "2026-11-01 03:00", "2026-10-20 03:00", "2026-10-19 03:00", "2026-10-18 03:00",
            # weeks 47, 46, 44, 43 are covered by those days; the third month is September
            "2026-09-30 03:00",
            # a failed run younger than a day stays, so its error can still be read
            "2026-11-22 15:00",
        },
        id="200-days-gaps-failures-duplicates",
    ),
    pytest.param(
        [ok("2026-01-15 03:00"), ok("2026-01-31 03:00"), ok("2026-03-02 03:00"), ok("2026-04-10 03:00"),
         ok("2026-04-11 03:00")],
        Policy(daily=0, weekly=0, monthly=3, minimum=1),
        {"2026-04-11 03:00", "2026-03-02 03:00", "2026-01-31 03:00"},  # February has none: January counts
        id="months-that-have-one",
    ),
    pytest.param(
        [ok("2026-12-24 03:00"), ok("2026-12-31 03:00"), ok("2027-01-02 03:00"), ok("2027-01-05 03:00")],
        Policy(daily=0, weekly=2, monthly=0, minimum=1),
        {"2027-01-05 03:00", "2027-01-02 03:00"},  # 2026-12-31 and 2027-01-02 are both ISO week 2026-W53
        id="iso-week-across-new-year",
    ),
    pytest.param(
        daily("2026-11-01", "2026-11-22"), Policy(daily=0, weekly=0, monthly=0, minimum=1),
        {"2026-11-22 03:00"},
        id="newest-survives-zero-rules",
    ),
    pytest.param(
        daily("2026-11-01", "2026-11-22"), Policy(daily=2, weekly=0, monthly=0, minimum=5),
        {"2026-11-22 03:00", "2026-11-21 03:00", "2026-11-20 03:00", "2026-11-19 03:00", "2026-11-18 03:00"},
        id="minimum-tops-up-with-the-newest",
    ),
    pytest.param(
        [ok("2026-11-20 03:00"), ok("2026-11-21 03:00", slot="s21"), ok("2026-11-21 03:00:30", slot="s21")],
        Policy(daily=0, weekly=0, monthly=0, minimum=3),
        {"2026-11-20 03:00", "2026-11-21 03:00", "2026-11-21 03:00:30"},  # duplicates count before going below 3
        id="minimum-beats-duplicate-reduction",
    ),
    pytest.param(
        [ok("2026-11-20 03:00"), ok("2026-11-21 03:00", slot="s21"), ok("2026-11-21 03:00:30", slot="s21"),
         ok("2026-11-19 03:00")],
        Policy(daily=0, weekly=0, monthly=0, minimum=3),
        {"2026-11-21 03:00:30", "2026-11-20 03:00", "2026-11-19 03:00"},  # a distinct older backup is preferred
        id="minimum-prefers-distinct-slots",
    ),
    pytest.param(
        [failed("2026-11-20 03:00"), failed("2026-11-22 03:00"), ok("2026-11-01 03:00")],
        Policy(daily=0, weekly=0, monthly=0, minimum=1),
        {"2026-11-01 03:00", "2026-11-22 03:00"},  # failures never displace the last good backup
        id="failures-do-not-count",
    ),
    pytest.param(
        [broken("2026-11-22 03:00"), ok("2026-11-21 03:00"), ok("2026-11-20 03:00"), broken("2026-11-19 03:00"),
         ok("2026-11-18 03:00"), broken("2026-11-01 03:00"), ok("2026-10-01 03:00")],
        Policy(daily=0, weekly=0, monthly=0, minimum=3),
        # broken ones stay while retention still covers their time; the one older than every kept backup goes
        {"2026-11-22 03:00", "2026-11-21 03:00", "2026-11-20 03:00", "2026-11-19 03:00", "2026-11-18 03:00"},
        id="broken-kept-until-retention-passes-them",
    ),
    pytest.param(
        daily("2026-11-01", "2026-11-22") + [ok("2025-01-01 03:00", db="old"), ok("2025-01-02 03:00", db="old")],
        Policy(daily=1, weekly=0, monthly=0, minimum=1),
        {"2026-11-22 03:00", "old 2025-01-02 03:00"},  # each database is judged on its own
        id="per-database",
    ),
]


@pytest.mark.parametrize(("backups", "policy", "expected"), CASES)
def test_selection_keeps_exactly_the_expected_backups(backups: list[Backup], policy: Policy,
                                                      expected: set[str]) -> None:
    assert kept(backups, policy) == expected


def test_calendar_days_are_the_operators_time_zone() -> None:
    backups = [ok("2026-11-20 22:30"), ok("2026-11-20 23:30"), ok("2026-11-21 22:30")]
    utc = Policy(daily=2, weekly=0, monthly=0, minimum=1)
    berlin = Policy(daily=2, weekly=0, monthly=0, minimum=1, tz=ZoneInfo("Europe/Berlin"))
    assert kept(backups, utc) == {"2026-11-21 22:30", "2026-11-20 23:30"}
    assert kept(backups, berlin) == {"2026-11-21 22:30", "2026-11-20 22:30"}  # 23:30 UTC is already the 21st there


def test_every_decision_names_the_rule_that_made_it() -> None:
    by_time = {d.backup.started_at: d for d in select(two_hundred_days_messy(), DEFAULTS, NOW)}
    assert by_time[at("2026-11-22 03:00")].rules == ("newest", "daily 2026-11-22", "weekly 2026-W47", "monthly 2026-11")
    assert by_time[at("2026-09-30 03:00")].rules == ("monthly 2026-09",)
    assert by_time[at("2026-11-17 03:00:00")].reason == "duplicate of app-20261117T030040Z (slot 2026-11-17T03:00Z)"
    assert by_time[at("2026-11-16 03:00")].reason.startswith("outside retention (14 daily, 4 weekly, 3 monthly")
    assert by_time[at("2026-11-21 03:00")].reason == "failed, older than a day"
    assert by_time[at("2026-11-22 15:00")].reason == "failed, younger than a day"
    assert by_time[at("2026-06-01 04:00")].keep is False


def test_every_backup_gets_exactly_one_decision() -> None:
    history = two_hundred_days_messy()
    decisions = select(history, DEFAULTS, NOW)
    assert sorted(d.backup.id for d in decisions) == sorted(b.id for b in history)


@pytest.mark.parametrize("seed", range(40))
def test_guards_hold_on_random_histories(seed: int) -> None:
    """Whatever the history and policy: the newest ok backup stays, and never fewer than the minimum."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    history: list[Backup] = []
    for i in range(rng.randint(1, 120)):
        t = start + timedelta(hours=rng.randint(0, 24 * 300), seconds=i)
        status = rng.choice(["ok", "ok", "ok", "failed", "broken"])
        slot = f"slot{rng.randint(0, 30)}" if rng.random() < 0.3 else None
        history.append(Backup(backup_id(rng.choice(["a", "b"]), t), "", t, status, slot))
    history = [Backup(b.id, b.id.split("-")[0], b.started_at, b.status, b.slot) for b in history]
    policy = Policy(rng.randint(0, 5), rng.randint(0, 3), rng.randint(0, 3), rng.randint(1, 6))
    decisions = select(history, policy, start + timedelta(days=400))
    for db in ("a", "b"):
        oks = sorted((d for d in decisions if d.backup.database == db and d.backup.status == "ok"),
                     key=lambda d: d.backup.started_at, reverse=True)
        if not oks:
            continue
        assert oks[0].keep and "newest" in oks[0].rules
        assert sum(d.keep for d in oks) >= min(policy.minimum, len(oks))


def test_each_cluster_is_weighed_on_its_own() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    mine = [Backup(f"app-a{i}", "app", now - timedelta(hours=i), cluster="111") for i in range(3)]
    theirs = [Backup(f"app-b{i}", "app", now - timedelta(hours=i, minutes=30), cluster="222") for i in range(2)]
    decisions = {d.backup.id: d.keep for d in select([*mine, *theirs], Policy(1, 0, 0, 1), now)}
    assert decisions == {"app-a0": True, "app-a1": False, "app-a2": False, "app-b0": True, "app-b1": False}
