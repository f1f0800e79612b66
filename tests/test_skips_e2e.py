"""Skips are first-class: counted, logged with their reason, and a slot skipped again and again turns /health
WARNING, then CRITICAL, like a missed backup. A restore blocks prune, never a backup."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Cli, PgServer
from test_metrics import scrape
from test_runtime import Sidecar, manifests, sidecars
from truth_support import check, sample_db

from app.locks import file_lock, run_lock
from app.settings import load_settings


@pytest.fixture
def sidecar(cli: Cli) -> Iterator[Callable[[dict[str, str]], Sidecar]]:
    yield from sidecars(cli)


def test_slots_skipped_again_and_again_turn_health_warning_then_critical(
    pg: PgServer, nas: Path, tmp_path: Path, sidecar
) -> None:
    db = sample_db(pg)
    lock = tmp_path / "shared.lock"
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "LOCK_FILE": str(lock), "BACKUP_SCHEDULE": "every 5s",
           "BACKUP_TIMEOUT": "2s", "CLOCK_SKEW_TOLERANCE": "0"}
    with file_lock(lock, "backup", "stuck-host"):  # another instance holds LOCK_FILE and never lets go
        s = sidecar(env)
        warned = s.wait_for("a warning", lambda d: any(c["name"] == "slots" and c["status"] == "warning"
                                                          for c in d["checks"]), timeout=40)
        assert warned["status"] == "warning" and warned["code"] == 1
        critical = s.wait_for("critical", lambda d: d["status"] == "critical", timeout=30)
        slots = check(critical, "slots", db)
        assert slots["status"] == "critical" and slots["missed_slots"] >= 3
        assert "scheduled slots in a row passed without a backup" in slots["message"]
        _, samples = scrape(s)
    assert samples[("backup_sidecar_skips_total", (("reason", "lock"),))] >= 3
    assert samples[("backup_sidecar_missed_slots", (("database", db),))] >= 3
    assert "skipped (lock): backup: already running on stuck-host since" in s.log()
    assert manifests(nas) == []
    recovered = s.wait_for("recovery", lambda d: d["status"] == "ok", timeout=30)  # the lock is free again
    assert check(recovered, "slots", db)["status"] == "ok"


def test_a_restore_never_blocks_a_backup_but_keeps_prune_away(
    cli: Cli, pg: PgServer, nas: Path, tmp_path: Path
) -> None:
    db = sample_db(pg)
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "LOCK_FILE": str(tmp_path / "lock"),
           "BACKUP_KEEP_DAILY": "0", "BACKUP_KEEP_WEEKLY": "0", "BACKUP_KEEP_MONTHLY": "0", "BACKUP_KEEP_MIN": "1"}
    cli.run("backup", env=env, check=True)
    with run_lock(load_settings(env), "restore"):  # exactly what `restore` holds while it streams
        during = cli.run("backup", env={**env, "PRUNE_AFTER_BACKUP": "true"})
        assert during.returncode == 0, during.stderr
        assert "backup-sidecar: skipped" not in during.stderr and f"{db}-" in during.stdout
        assert "prune after backup skipped: prune: a restore is reading the backups" in during.stderr
        pruned = cli.run("prune", env=env)
        assert pruned.returncode == 0
        assert "skipped: prune: a restore is reading the backups" in pruned.stderr
        assert len([m for m in manifests(nas) if m.ok]) == 2, "prune after backup deleted under a restore"
    after = cli.run("prune", env=env)
    assert after.returncode == 0, after.stderr
    assert len([m for m in manifests(nas) if m.ok]) == 1
