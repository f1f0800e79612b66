"""The weekly report: REPORT_SCHEDULE parsing and timing, and the per-database summary read back from the
manifests on a real target, as a freshly started process would see them."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
from conftest import CANARY

from app import layout
from app.catalog import load_catalog
from app.logs import register_secrets
from app.manifest import Manifest
from app.notify import messages
from app.notify.report import ReportSchedule, build_report, parse_report_schedule
from app.targets.nas import NasTarget

UTC = dt.UTC
NOW = dt.datetime(2026, 11, 22, 6, 0, tzinfo=UTC)  # a Sunday


# -- REPORT_SCHEDULE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "weekday", "at"), [
    ("sun 06:00", 6, "06:00"), ("Mon 8:30", 0, "08:30"), ("  friday   23:59 ", 4, "23:59"), ("WED 00:00", 2, "00:00"),
])
def test_report_schedule_accepts_a_weekday_and_a_time(text: str, weekday: int, at: str) -> None:
    schedule = parse_report_schedule(text)
    assert schedule is not None
    assert (schedule.weekday, schedule.at.strftime("%H:%M")) == (weekday, at)


@pytest.mark.parametrize("text", ["off", "OFF", "never", "none", "", None])
def test_report_schedule_off_disables_the_report(text: str | None) -> None:
    assert parse_report_schedule(text) is None


@pytest.mark.parametrize(("text", "problem"), [
    ("sun", "is not a weekly report time"),
    ("06:00", "is not a weekly report time"),
    ("sun 6", "is not a weekly report time"),
    ("sunday 24:00", "is not a time of day"),
    ("sun 06:60", "is not a time of day"),
    ("funday 06:00", "is not a weekday"),
    ("0 6 * * 0", "is not a weekly report time"),
])
def test_report_schedule_rejects_anything_else_with_a_hint(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        parse_report_schedule(text)
    assert 'hint: a weekday and a time in TZ such as "sun 06:00"' in str(info.value)


def test_next_report_is_the_coming_weekday_and_never_now() -> None:
    schedule = ReportSchedule(6, dt.time(6, 0))
    assert schedule.next_after(NOW - dt.timedelta(seconds=1)) == NOW
    assert schedule.next_after(NOW) == NOW + dt.timedelta(days=7)  # just sent: the next one is a week away
    assert schedule.next_after(dt.datetime(2026, 11, 18, 12, 0, tzinfo=UTC)) == NOW


def test_next_report_follows_tz_across_daylight_saving() -> None:
    schedule = parse_report_schedule("sun 06:00")
    assert schedule is not None
    summer = schedule.next_after(dt.datetime(2026, 7, 1, tzinfo=UTC), "Europe/Berlin")
    winter = schedule.next_after(dt.datetime(2026, 12, 1, tzinfo=UTC), "Europe/Berlin")
    assert summer == dt.datetime(2026, 7, 5, 4, 0, tzinfo=UTC)  # 06:00 CEST
    assert winter == dt.datetime(2026, 12, 6, 5, 0, tzinfo=UTC)  # 06:00 CET
    skipped = parse_report_schedule("sun 02:30")  # 02:30 does not exist on 2026-03-29 in Berlin
    assert skipped is not None
    first = skipped.next_after(dt.datetime(2026, 3, 28, 12, 0, tzinfo=UTC), "Europe/Berlin")
    assert first.date() == dt.date(2026, 3, 29)  # still sent that Sunday, once
    assert skipped.next_after(first, "Europe/Berlin").date() == dt.date(2026, 4, 5)


# -- the report from the targets ---------------------------------------------------------------------------


def store(target: NasTarget, db: str, at: dt.datetime, status: str = "ok", size: int = 1000,
          artifact: bool = True, error: str | None = None) -> Manifest:
    m = Manifest(id=layout.backup_id(db, at), status=status, database=db, started_at=at,
                 finished_at=at + dt.timedelta(minutes=2), host="db-host-1", format="custom", compression="zstd",
                 artifact=layout.artifact_key(db, at, "dump.zst"), size_bytes=size if status == "ok" else 0,
                 error=error)
    if status == "ok" and artifact:
        target.put_bytes(m.artifact, b"x" * size)
    target.put_bytes(layout.manifest_key(db, at), m.to_json())
    return m


@pytest.fixture
def target(tmp_path: Path) -> NasTarget:
    """Three databases' history on a NAS directory: a busy week, a stale database and a broken copy."""
    register_secrets([CANARY])
    t = NasTarget(tmp_path / "nas", create=True)
    t.check()
    for day in range(15):  # app: one good backup a day, 2026-11-08 .. 2026-11-22 at 03:00
        store(t, "app", dt.datetime(2026, 11, 8, 3, 0, tzinfo=UTC) + dt.timedelta(days=day), size=1000 + day)
    store(t, "app", dt.datetime(2026, 11, 21, 15, 0, tzinfo=UTC), status="failed",
          error=f"pg_dump: error: connection to server failed: password={CANARY}\nsecond line")
    store(t, "app", dt.datetime(2026, 11, 20, 15, 0, tzinfo=UTC), artifact=False)  # manifest ok, artifact gone
    store(t, "shop", dt.datetime(2026, 11, 1, 3, 0, tzinfo=UTC), size=5000)  # nothing this week
    store(t, "shop", dt.datetime(2026, 11, 10, 3, 0, tzinfo=UTC), size=7000)
    return t


def test_report_summarises_each_database_from_the_manifests(target: NasTarget) -> None:
    catalog = load_catalog([NasTarget(target.root)])  # a new process: only what the target holds
    report = build_report(catalog, "db-host-1", databases=("app", "shop", "empty", "*"), now=NOW)

    app, empty, shop = report.databases
    assert (app.database, empty.database, shop.database) == ("app", "empty", "shop")
    assert app.last_good is not None and app.last_good.id == "app-20261122T030000Z"
    assert (app.good_this_week, app.failed_this_week, app.broken) == (7, 1, 1)  # 11-16 .. 11-22
    assert (app.kept, app.kept_bytes) == (15, sum(1000 + d for d in range(15)))
    assert app.oldest_kept is not None and app.oldest_kept.id == "app-20261108T030000Z"
    assert app.last_failure is not None and app.last_failure.id == "app-20261121T150000Z"
    assert app.problems == ["1 failed this week", "1 broken"]
    assert (shop.good_this_week, shop.kept, shop.kept_bytes) == (0, 2, 12000)
    assert shop.problems == ["no good backup this week"]
    assert empty.last_good is None and empty.kept == 0 and empty.problems == ["no good backup this week"]
    assert report.attention


def test_report_text_is_readable_and_masked(target: NasTarget) -> None:
    report = build_report(load_catalog([target]), "db-host-1", databases=("app", "shop"), now=NOW)
    text = report.render()
    assert text.startswith("backup-sidecar weekly report for db-host-1\n"
                           "Week: 2026-11-15 06:00 UTC to 2026-11-22 06:00 UTC\n")
    assert "app: ATTENTION: 1 failed this week, 1 broken\n" in text
    assert "  last good backup:   app-20261122T030000Z, 2026-11-22 03:02 UTC (2h58m ago), 1014 B\n" in text
    assert "  backups this week:  7 good, 1 failed\n" in text
    assert "  last failure:       app-20261121T150000Z: pg_dump: error: connection to server failed: " \
           "password=****\n" in text
    assert "  oldest kept:        app-20261108T030000Z, 2026-11-08 03:02 UTC (14d2h ago), 1000 B\n" in text
    assert "shop: ATTENTION: no good backup this week\n" in text and "  kept:               2 backup(s), 11.7 KiB" \
        in text
    assert CANARY not in text and "second line" not in text


def test_report_event_subject_names_the_problems(target: NasTarget) -> None:
    catalog = load_catalog([target])
    catalog = dataclasses.replace(catalog, errors={"s3": "S3: cannot reach minio:9000 (hint: check S3_ENDPOINT)"})
    event = messages.weekly_report(build_report(catalog, "db-host-1", now=NOW))
    assert event.subject == ("[backup-sidecar] weekly report on db-host-1: ATTENTION app: 1 failed this week, "
                             "1 broken; shop: no good backup this week; target s3 unreadable")
    assert "Targets that could not be read (this report may be incomplete):\n  s3: S3: cannot reach" in event.text
    assert event.payload()["target_errors"] == {"s3": "S3: cannot reach minio:9000 (hint: check S3_ENDPOINT)"}


def test_clean_week_reports_ok(tmp_path: Path) -> None:
    t = NasTarget(tmp_path / "nas", create=True)
    t.check()
    for day in range(7):
        store(t, "app", dt.datetime(2026, 11, 16, 3, 0, tzinfo=UTC) + dt.timedelta(days=day))
    report = build_report(load_catalog([t]), "db-host-1", databases=("app",), now=NOW)
    assert not report.attention
    event = messages.weekly_report(report)
    assert event.subject == "[backup-sidecar] weekly report on db-host-1: all 1 database(s) OK"
    assert event.status == "ok" and "app: OK\n" in event.text


def test_a_database_that_is_no_longer_a_unit_is_retired_not_attention(target: NasTarget) -> None:
    report = build_report(load_catalog([target]), "db-host-1", databases=("*",), now=NOW, expected=["app"])
    by_name = {s.database: s for s in report.databases}
    assert by_name["shop"].retired and by_name["shop"].problems == []
    assert "shop: RETIRED: no longer backed up" in report.render()
    assert by_name["app"].problems == ["1 failed this week", "1 broken"]
