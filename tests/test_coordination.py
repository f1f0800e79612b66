"""Replicas with no shared volume: the database's advisory lock and the manifests' slot make one backup."""

from __future__ import annotations

import re
from datetime import UTC
from pathlib import Path

import psycopg
from conftest import CANARY, Cli, PgServer, S3Server, free_port
from test_runtime import manifests, small_db, wait_for_early_minute
from truth_support import fixed_slot_env

from app.coordination import app_name, lock_key
from app.manifest import Manifest


def s3_manifests(s3: S3Server, bucket: str) -> list[Manifest]:
    return [
        Manifest.from_json(s3.client.get_object(bucket, key).read())
        for key in s3.keys(bucket)
        if key.endswith(".manifest.json")
    ]


def test_four_replicas_started_together_make_exactly_one_backup(
    cli: Cli, pg: PgServer, s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    db = small_db(pg)
    wait_for_early_minute()
    procs = [
        cli.popen(
            "backup",
            "--scheduled",
            env=pg.env(
                POSTGRES_DB=db,
                BACKUP_HOSTNAME=f"replica-{i}",
                LOCK_FILE=str(tmp_path / f"lock-{i}"),
                **s3.env(bucket),
            ),
        )
        for i in range(4)
    ]
    outcomes = [(p.wait(120), *p.communicate()) for p in procs]
    assert [code for code, _, _ in outcomes] == [0, 0, 0, 0], outcomes
    artifacts = [k for k in s3.keys(bucket) if not k.endswith(".manifest.json")]
    assert len(artifacts) == 1, s3.keys(bucket)
    (made,) = s3_manifests(s3, bucket)
    assert made.ok and made.host.startswith("replica-")
    skipped = [err for _, _, err in outcomes if "skipped:" in err]
    assert len(skipped) == 3
    for err in skipped:
        (line,) = [line for line in err.splitlines() if "skipping" in line]  # one line says why
        # the holder may be a replica that took the claim after the backup only to find the slot done
        assert (
            re.search(r"already running on replica-\d since", line)
            or f"slot {made.slot} already backed up as {made.id} by {made.host}" in line
        ), line
    assert CANARY not in "".join(out + err for _, out, err in outcomes)


def test_scheduled_runs_skip_a_done_slot_manual_runs_always_back_up_and_force_deletes_nothing(
    cli: Cli, pg: PgServer, nas: Path
) -> None:
    db = small_db(pg)
    env = pg.env(POSTGRES_DB=db, NAS_PATH=str(nas), BACKUP_HOSTNAME="host-a", **fixed_slot_env())
    cli.run("backup", "--scheduled", env=env, check=True)
    (first,) = manifests(nas)
    assert first.slot and first.slot.endswith(env["BACKUP_SCHEDULE"] + "Z"), "the slot is the BACKUP_SCHEDULE time"
    again = cli.run("backup", "--scheduled", env={**env, "BACKUP_HOSTNAME": "host-b"})
    assert again.returncode == 0
    assert f"skipped: {db}: slot {first.slot} already backed up as {first.id} by host-a, skipping" in again.stderr
    assert len(manifests(nas)) == 1
    # a manual run is never hidden behind the slot: its own failure shows at once
    wrong = cli.run("backup", env={**env, "POSTGRES_PASSWORD": "not-the-password"})
    assert wrong.returncode == 1 and "skipped" not in wrong.stderr, wrong.stderr
    assert "password authentication failed" in wrong.stderr
    forced = cli.run("backup", "--scheduled", "--force", env=env)
    manual = cli.run("backup", env=env)
    assert forced.returncode == 0 and manual.returncode == 0, forced.stderr + manual.stderr
    ok = [m for m in manifests(nas) if m.ok]
    assert len(ok) == 3, "PRUNE_AFTER_BACKUP deleted a backup of the same minute"
    assert first.id in {m.id for m in ok}
    assert [m.slot for m in ok if m.id != first.id] == [None, None], "forced and manual backups carry no slot"
    assert "deleted 1" not in forced.stdout + forced.stderr + manual.stdout + manual.stderr


def test_a_failed_run_in_the_slot_does_not_stop_a_retry(cli: Cli, pg: PgServer, nas: Path) -> None:
    db = small_db(pg)
    wait_for_early_minute(40)
    broken = pg.env(POSTGRES_DB=db, NAS_PATH=str(nas), POSTGRES_PORT=str(free_port()))
    failed = cli.run("backup", env=broken)
    assert failed.returncode == 1
    assert [m.status for m in manifests(nas)] == ["failed"]
    retry = cli.run("backup", env=pg.env(POSTGRES_DB=db, NAS_PATH=str(nas)))
    assert retry.returncode == 0, retry.stderr
    assert sorted(m.status for m in manifests(nas)) == ["failed", "ok"]


def test_database_lock_held_by_another_host_skips_and_names_it(cli: Cli, pg: PgServer, nas: Path) -> None:
    db = small_db(pg)
    with psycopg.connect(
        host=pg.host,
        port=pg.port,
        user=pg.user,
        password=pg.password,
        dbname=db,
        application_name=app_name("pod-7f9c"),
        autocommit=True,
    ) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (lock_key(db),))
        since = other.execute("SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()[0]
        result = cli.run("backup", env=pg.env(POSTGRES_DB=db, NAS_PATH=str(nas)))
        forced = cli.run("backup", "--force", env=pg.env(POSTGRES_DB=db, NAS_PATH=str(nas)))
    assert result.returncode == 0
    assert (
        f"skipped: {db}: already running on pod-7f9c since {since.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}" in result.stderr
    )
    assert forced.returncode == 0 and "already running on pod-7f9c" in forced.stderr, "--force never ignores locks"
    assert manifests(nas) == []
    after = cli.run("backup", env=pg.env(POSTGRES_DB=db, NAS_PATH=str(nas)))
    assert after.returncode == 0, after.stderr
    assert [m.status for m in manifests(nas)] == ["ok"]


def test_lock_key_is_stable_and_per_database() -> None:
    assert lock_key("app") == lock_key("app") != lock_key("app2")
    assert -(2**63) <= lock_key("app") < 2**63
    assert app_name("h" * 100).startswith("backup-sidecar@h") and len(app_name("h" * 100)) == 63
