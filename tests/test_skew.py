"""Clock skew: hosts whose clocks disagree within CLOCK_SKEW_TOLERANCE name the same slot, a host far behind
never prunes its own fresh backup, and a manifest from a clock ahead never counts as the newest.

The end-to-end cases run the real CLI under libfaketime (Debian package ``faketime``), which shifts the
clock of that one process and nothing else.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import Cli, PgServer, require_tool
from test_runtime import HOUR, manifests, nas_target, plant
from truth_support import sample_db

from app.coordination import scheduled_slot
from app.health import HealthMonitor
from app.retention import Backup, Policy, select
from app.schedule_spec import parse_schedule
from app.settings import load_settings
from app.targets import make_targets


def run_skewed(cli: Cli, offset: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The real CLI with its clock shifted by ``offset`` (e.g. ``-10m``)."""
    faketime = require_tool("faketime", "faketime")
    return subprocess.run([faketime, "-f", offset, sys.executable, "-m", "app", *args],
                          env={**cli.base_env(), **env}, cwd=cli.cwd, capture_output=True, text=True, timeout=120)


def test_clocks_within_the_tolerance_name_the_same_slot() -> None:
    schedule = parse_schedule("03:00")
    fire = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
    for skew in (-4 * 60, -30, 0, 50, 4 * 60 + 59):
        assert scheduled_slot(schedule, fire + timedelta(seconds=skew), 300) == "2026-11-22T03:00Z", skew
    assert scheduled_slot(schedule, fire + timedelta(minutes=7), 300) == "2026-11-22T03:07Z"  # outside: the minute
    every = parse_schedule("every 15m")
    assert scheduled_slot(every, datetime(2026, 11, 22, 3, 14, 10, tzinfo=UTC), 300) == "2026-11-22T03:15Z"
    assert scheduled_slot(every, datetime(2026, 11, 22, 3, 1, 10, tzinfo=UTC), 300) == "2026-11-22T03:00Z"


def test_prune_keeps_what_the_calling_run_made_whatever_its_timestamp() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    recent = [Backup(f"app-{i}", "app", now - timedelta(days=i), slot=f"s{i}") for i in range(3)]
    stale_clock = Backup("app-fresh-from-a-slow-clock", "app", now - timedelta(days=400))
    policy = Policy(daily=1, weekly=0, monthly=0, minimum=1)
    plain = {d.backup.id: d.keep for d in select([*recent, stale_clock], policy, now)}
    assert plain[stale_clock.id] is False
    guarded = {d.backup.id: d for d in select([*recent, stale_clock], policy, now, protect={stale_clock.id})}
    assert guarded[stale_clock.id].keep and guarded[stale_clock.id].rules == ("made by this run",)
    dup = Backup("app-dup", "app", now - timedelta(seconds=5), slot="s0")
    decisions = {d.backup.id: d for d in select([*recent, dup], policy, now, protect={"app-0"})}
    assert decisions["app-0"].keep, "the run's own backup is never a duplicate to remove"


def test_future_manifest_is_not_the_newest_and_a_later_local_failure_is_critical(nas: Path) -> None:
    target = nas_target(nas)
    good = plant(target, "app", age_s=3 * HOUR)
    ahead = plant(target, "app", age_s=-HOUR)
    settings = load_settings({"NAS_PATH": str(nas), "POSTGRES_DB": "app", "CLOCK_SKEW_TOLERANCE": "5m"})
    monitor = HealthMonitor(settings, make_targets(settings), watch_loop=False, read_server=False)
    monitor.refresh_all(wait=10)
    doc = monitor.payload()
    assert doc["last_success"]["id"] == good.id and doc["status"] == "warning"
    assert [c["status"] for c in doc["checks"] if c["name"] == "clock_skew"] == ["warning"]
    failed = plant(target, "app", age_s=60, error="pg_dump: connection refused")
    monitor.job_finished([failed])
    assert monitor.payload()["status"] == "critical"
    later = monitor.payload(now=datetime.now(UTC) + 2 * timedelta(hours=1))  # once the clock caught up
    assert later["last_success"]["id"] == ahead.id


def test_a_replica_whose_clock_lags_recognises_the_slot_already_made(cli: Cli, pg: PgServer, nas: Path) -> None:
    db = sample_db(pg)
    at = (datetime.now(UTC) + timedelta(minutes=2)).replace(second=0, microsecond=0)
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "BACKUP_SCHEDULE": f"{at:%H:%M}", "TZ": "UTC",
           "CLOCK_SKEW_TOLERANCE": "15m"}
    cli.run("backup", "--scheduled", env={**env, "BACKUP_HOSTNAME": "on-time"}, check=True)
    late = run_skewed(cli, "-10m", "backup", "--scheduled", env={**env, "BACKUP_HOSTNAME": "ten-minutes-behind"})
    assert late.returncode == 0, late.stderr
    (made,) = manifests(nas)
    assert made.slot == f"{at:%Y-%m-%dT%H:%M}Z"
    assert f"slot {made.slot} already backed up as {made.id} by on-time, skipping" in late.stderr


def test_a_host_far_behind_never_prunes_its_own_fresh_backup(cli: Cli, pg: PgServer, nas: Path) -> None:
    db = sample_db(pg)
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "BACKUP_KEEP_DAILY": "1", "BACKUP_KEEP_WEEKLY": "0",
           "BACKUP_KEEP_MONTHLY": "0", "BACKUP_KEEP_MIN": "1"}
    cli.run("backup", env=env, check=True)
    behind = run_skewed(cli, "-400d", "backup", env=env)
    assert behind.returncode == 0, behind.stderr
    made = manifests(nas)
    assert len([m for m in made if m.ok]) == 2, "the run deleted the backup it had just made"
    assert min(m.started_at for m in made) < datetime.now(UTC) - timedelta(days=399)


def test_a_backup_from_a_clock_ahead_keeps_no_one_from_seeing_later_failures(
    cli: Cli, pg: PgServer, nas: Path
) -> None:
    db = sample_db(pg)
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas)}
    ahead = run_skewed(cli, "+3h", "backup", env=env)
    assert ahead.returncode == 0, ahead.stderr
    failed = cli.run("backup", env={**env, "POSTGRES_PASSWORD": "wrong"})
    assert failed.returncode == 1
    settings = load_settings(env)
    monitor = HealthMonitor(settings, make_targets(settings), watch_loop=False, read_server=False)
    monitor.refresh_all(wait=10)
    doc = monitor.payload()
    assert doc["status"] == "critical" and doc["last_success"] is None
    assert [c["status"] for c in doc["checks"] if c["name"] == "clock_skew"] == ["warning"]
    assert doc["last_run"]["status"] == "failed"
