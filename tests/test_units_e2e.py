"""Every artifact the job should produce is judged by /health and has its /metrics series: databases, globals
and the files archive; retired databases are information; a target without the newest copy is CRITICAL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import Cli, PgServer, S3Server
from test_metrics import scrape
from test_runtime import HOUR, Sidecar, manifests, nas_target, plant, sidecars
from truth_support import backup_role, check, sample_db

from app import layout


@pytest.fixture
def sidecar(cli: Cli) -> Iterator[Callable[[dict[str, str]], Sidecar]]:
    yield from sidecars(cli)


def test_failing_globals_and_files_archive_turn_health_critical_and_have_their_series(
    cli: Cli, pg2: PgServer, nas: Path, tmp_path: Path, sidecar
) -> None:
    db = sample_db(pg2)
    role = backup_role(pg2)
    pg2.psql("postgres", "REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")  # pg_dumpall cannot get in
    try:
        env = {**pg2.env(POSTGRES_DB=db, POSTGRES_USER=role), "NAS_PATH": str(nas), "BACKUP_GLOBALS": "true",
               "FILES_PATHS": str(tmp_path / "not-mounted")}
        result = cli.run("backup", env=env)
        assert result.returncode == 1
        by_name = {m.database: m for m in manifests(nas)}
        assert (by_name[db].status, by_name["_globals"].status, by_name["files"].status) == ("ok", "failed", "failed")
        s = sidecar({**env, "BACKUP_SCHEDULE": "03:00"})
        doc = s.wait_for("the verdict", lambda d: {"_globals", "files"} <= set(d.get("databases", {}))
                         and d["status"] == "critical")
        assert s.health()[0] == 503
        assert "permission denied for database" in check(doc, "last_run", "_globals")["message"]
        assert "not-mounted does not exist" in check(doc, "last_run", "files")["message"]
        assert check(doc, "last_run", db)["status"] == "ok"
        assert (doc["databases"]["files"]["kind"], doc["databases"]["_globals"]["kind"]) == ("files", "globals")
        _, samples = scrape(s)
        for name, kind, ok in ((db, "database", 1), ("_globals", "globals", 0), ("files", "files", 0)):
            assert samples[("backup_sidecar_last_run_success", (("database", name),))] == ok
            assert samples[("backup_sidecar_expected", (("database", name), ("kind", kind)))] == 1
            assert ("backup_sidecar_runs_total", (("database", name),)) in samples
    finally:
        pg2.psql("postgres", "GRANT CONNECT ON DATABASE postgres TO PUBLIC")


def test_a_dropped_database_is_retired_information_not_critical(
    cli: Cli, pg2: PgServer, nas: Path, sidecar
) -> None:
    keep, gone = sample_db(pg2, "keep_e2e_retired"), sample_db(pg2, "gone_e2e_retired")
    env = {**pg2.env(POSTGRES_DB="*", POSTGRES_DB_EXCLUDE="postgres,db_*,bs_*,app*,drill*", NAS_PATH=str(nas)),
           "HEALTH_WARN_AGE": "1h", "HEALTH_CRIT_AGE": "2h"}
    try:
        cli.run("backup", env=env, check=True)
        assert {m.database for m in manifests(nas)} == {keep, gone}
        plant(nas_target(nas), gone, age_s=3 * HOUR)  # and an old one: retention keeps the last backups
        pg2.drop_db(gone)
        s = sidecar({**env, "BACKUP_SCHEDULE": "03:00"})
        # until the server's databases are read, /health expects whatever the targets hold
        doc = s.wait_for("the dropped database retired", lambda d: bool(d["retired"]))
        assert (doc["status"], s.health()[0]) == ("ok", 200), doc
        assert set(doc["databases"]) == {keep} and set(doc["retired"]) == {gone}
        retired = check(doc, "retired", gone)
        assert retired["status"] == "ok" and "retired (not on the server any more, or excluded)" in retired["message"]
        _, samples = scrape(s)
        assert samples[("backup_sidecar_expected", (("database", gone), ("kind", "database")))] == 0
        assert samples[("backup_sidecar_expected", (("database", keep), ("kind", "database")))] == 1
    finally:
        pg2.drop_db(keep)


def test_a_target_without_the_newest_copy_is_critical(
    cli: Cli, pg2: PgServer, nas: Path, s3: S3Server, bucket: str, sidecar
) -> None:
    db = sample_db(pg2)
    env = {**pg2.env(POSTGRES_DB=db), "NAS_PATH": str(nas), **s3.env(bucket)}
    cli.run("backup", env=env, check=True)
    (made,) = manifests(nas)
    s3.client.remove_object(bucket, made.artifact)  # the S3 copy is gone; the NAS copy is fine
    s = sidecar({**env, "BACKUP_SCHEDULE": "03:00"})
    doc = s.wait_for("the verdict", lambda d: d["status"] == "critical")
    copies = check(doc, "copies", db)
    assert copies["status"] == "critical"
    assert f"the newest backup {made.id} has no intact copy on s3" in copies["message"]
    assert doc["last_success"]["id"] == made.id  # the NAS copy still counts as the backup
    _, samples = scrape(s)
    assert samples[("backup_sidecar_last_success_copies_missing", (("database", db),))] == 1
    assert layout.is_manifest_key(layout.manifest_key(db, made.started_at))
    (nas / made.artifact).unlink()  # now no copy is left anywhere: the last run's backup is lost
    lost = sidecar({**env, "BACKUP_SCHEDULE": "03:00"})
    doc = lost.wait_for("the lost backup", lambda d: any(c["name"] == "last_run" for c in d["checks"]))
    assert f"{made.id} says ok but its artifact is missing or has the wrong size on every target" in \
        check(doc, "last_run", db)["message"]
    assert (check(doc, "last_run", db)["status"], doc["status"], lost.health()[0]) == ("critical", "critical", 503)


def test_future_dated_backup_is_a_warning_and_a_newer_local_failure_wins(
    pg2: PgServer, nas: Path, sidecar
) -> None:
    db = sample_db(pg2)
    ahead = plant(nas_target(nas), db, age_s=-2 * HOUR)  # a replica whose clock is 2h ahead wrote this
    assert ahead.finished_at > datetime.now(UTC) + timedelta(hours=1)
    broken = {**pg2.env(POSTGRES_DB=db, POSTGRES_PASSWORD="wrong-password"), "NAS_PATH": str(nas),
              "BACKUP_ON_START": "true", "BACKUP_SCHEDULE": "03:00"}
    s = sidecar(broken)
    doc = s.wait_for("the failed run", lambda d: any(c["name"] == "last_run" for c in d["checks"]))
    assert doc["status"] == "critical", doc
    skew = check(doc, "clock_skew", db)
    assert skew["status"] == "warning" and f"the latest {ahead.id} by" in skew["message"]
    assert doc["last_success"] is None, "a backup dated in the future never counts as the newest"
    assert "password authentication failed" in check(doc, "last_run", db)["message"]
