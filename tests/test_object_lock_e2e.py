"""S3 Object Lock end to end against the suite's S3 server: every backup object is written with a retention,
prune keeps what is still locked (counted, never an error) and deletes it, every version, once the lock ended;
a legal hold keeps a backup past its retention until released; a bucket without Object Lock is refused."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from conftest import Cli, PgServer, S3Server
from minio.error import S3Error

PERIOD_S = 30  # long enough for three backups and the checks on a loaded machine


@pytest.fixture
def lock_bucket(s3: S3Server) -> str:
    name = f"bs-lock-{uuid.uuid4().hex[:10]}"
    s3.client.make_bucket(name, object_lock=True)
    return name


@pytest.fixture
def small(pg: PgServer) -> str:
    db = pg.create_db()
    pg.psql(db, "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
    return db


def lock_env(pg: PgServer, s3: S3Server, bucket: str, db: str, **extra: str) -> dict[str, str]:
    return {**pg.env(POSTGRES_DB=db), **s3.env(bucket), "S3_OBJECT_LOCK": "governance",
            "S3_OBJECT_LOCK_PERIOD": f"{PERIOD_S}s", "PRUNE_AFTER_BACKUP": "false", **extra}


KEEP_ONE = {"BACKUP_KEEP_DAILY": "1", "BACKUP_KEEP_WEEKLY": "0", "BACKUP_KEEP_MONTHLY": "0", "BACKUP_KEEP_MIN": "1"}


def versions(s3: S3Server, bucket: str, name_part: str) -> list:
    return [o for o in s3.client.list_objects(bucket, recursive=True, include_version=True)
            if name_part in o.object_name]


def wait_past_locks(s3: S3Server, bucket: str, ids: list[str]) -> None:
    """Sleep until every version of these backups' objects has passed its retain-until date."""
    from datetime import UTC, datetime

    latest = max(datetime.fromisoformat(s3.client.stat_object(bucket, o.object_name, version_id=o.version_id)
                                        .metadata["x-amz-object-lock-retain-until-date"].replace("Z", "+00:00"))
                 for i in ids for o in versions(s3, bucket, i) if not o.is_delete_marker)
    time.sleep(max(0.0, (latest - datetime.now(UTC)).total_seconds()) + 1.5)


def listed(cli: Cli, env: dict[str, str]) -> list[dict]:
    return json.loads(cli.run("list", "--json", env=env, check=True).stdout)["backups"]


def test_a_bucket_without_object_lock_is_refused_with_how_to_enable_it(
        cli: Cli, pg: PgServer, s3: S3Server, bucket: str, small: str) -> None:
    env = lock_env(pg, s3, bucket, small)
    result = cli.run("backup", env=env)
    assert result.returncode == 1
    assert "has no Object Lock" in result.stderr and "--object-lock-enabled-for-bucket" in result.stderr
    assert s3.keys(bucket) == []
    check = cli.run("check", env=env)
    assert check.returncode == 1 and "has no Object Lock" in check.stdout + check.stderr


def test_locked_backups_survive_prune_and_a_direct_delete_and_go_once_the_lock_ended(
        cli: Cli, pg: PgServer, s3: S3Server, lock_bucket: str, small: str) -> None:
    env = lock_env(pg, s3, lock_bucket, small)
    assert "retention for" in cli.run("check", env=env, check=True).stdout
    for _ in range(3):
        cli.run("backup", env=env, check=True)
    ids = sorted(b["id"] for b in listed(cli, env))
    oldest = next(b for b in listed(cli, env) if b["id"] == ids[0])
    head = s3.client.stat_object(lock_bucket, oldest["artifact"]).metadata
    assert head["x-amz-object-lock-mode"] == "GOVERNANCE" and head["x-amz-object-lock-retain-until-date"]

    # a direct delete of the version (a leaked key, an operator's mistake) is refused by the store
    [version] = versions(s3, lock_bucket, oldest["artifact"])
    with pytest.raises(S3Error):
        s3.client.remove_object(lock_bucket, oldest["artifact"], version_id=version.version_id)

    dry = cli.run("prune", "--dry-run", env={**env, **KEEP_ONE}, check=True)
    assert dry.stdout.count("  locked ") == 2, dry.stdout
    early = cli.run("prune", env={**env, **KEEP_ONE})
    assert early.returncode == 0, early.stderr  # locks are not errors
    assert "kept 2 locked object(s) of 2 backup(s)" in early.stdout and "error" not in early.stdout
    assert sorted(b["id"] for b in listed(cli, env)) == ids  # nothing lost, not even hidden

    wait_past_locks(s3, lock_bucket, ids[:2])
    late = cli.run("prune", env={**env, **KEEP_ONE}, check=True)
    assert "deleted 2 backup(s)" in late.stdout and "locked" not in late.stdout.split("\n")[-2]
    assert [b["id"] for b in listed(cli, env)] == [ids[2]]
    for gone in ids[:2]:
        assert versions(s3, lock_bucket, gone) == []  # every version deleted: the storage is really freed


def test_a_held_backup_outlives_its_retention_until_released(
        cli: Cli, pg: PgServer, s3: S3Server, lock_bucket: str, small: str) -> None:
    env = lock_env(pg, s3, lock_bucket, small)
    for _ in range(3):
        cli.run("backup", env=env, check=True)
    ids = sorted(b["id"] for b in listed(cli, env))
    held = cli.run("hold", ids[0], env=env, check=True)
    assert held.stdout.startswith(f"held {ids[0]}: 2 object(s)")
    table = cli.run("list", env=env, check=True).stdout
    assert "held" in next(line for line in table.splitlines() if line.startswith(ids[0]))
    assert next(b for b in listed(cli, env) if b["id"] == ids[0])["s3_lock"]["held"] is True

    wait_past_locks(s3, lock_bucket, ids[:2])
    pruned = cli.run("prune", env={**env, **KEEP_ONE}, check=True)
    assert "(1 under a legal hold)" in pruned.stdout
    assert sorted(b["id"] for b in listed(cli, env)) == [ids[0], ids[2]]

    cli.run("release", ids[0], env=env, check=True)
    cli.run("prune", env={**env, **KEEP_ONE}, check=True)
    assert [b["id"] for b in listed(cli, env)] == [ids[2]]


def test_check_reads_a_bucket_default_retention(cli: Cli, pg: PgServer, s3: S3Server, lock_bucket: str,
                                                small: str) -> None:
    from minio.commonconfig import GOVERNANCE
    from minio.objectlockconfig import DAYS, ObjectLockConfig

    s3.client.set_object_lock_config(lock_bucket, ObjectLockConfig(GOVERNANCE, 1, DAYS))
    result = cli.run("check", env=lock_env(pg, s3, lock_bucket, small))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bucket default GOVERNANCE 1 Days" in result.stdout, result.stdout
    assert "listed a probe, which the bucket's default retention keeps" in result.stdout, result.stdout


def test_hold_without_object_lock_is_refused(cli: Cli, pg: PgServer, s3: S3Server, bucket: str, small: str) -> None:
    result = cli.run("hold", "latest", "--db", small, env={**pg.env(POSTGRES_DB=small), **s3.env(bucket)})
    assert result.returncode == 1 and "legal holds need S3 with Object Lock" in result.stderr


def test_the_default_period_covers_the_longest_retention_rule() -> None:
    from app.settings import load_settings

    base = {"S3_BUCKET": "b", "S3_ENDPOINT": "http://127.0.0.1:9", "S3_OBJECT_LOCK": "compliance"}
    day = 86400
    assert load_settings(base).s3.object_lock_s == 125 * day  # 3 months + the month it started in + a day
    assert load_settings({**base, "BACKUP_KEEP_MONTHLY": "0"}).s3.object_lock_s == 36 * day  # 4 weeks + 1 + a day
    assert load_settings({**base, "S3_OBJECT_LOCK_PERIOD": "30d"}).s3.object_lock_s == 30 * day
    assert load_settings({**base, "S3_OBJECT_LOCK": "off"}).s3.object_lock is None
