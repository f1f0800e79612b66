"""VERIFY_AFTER_BACKUP turns /health red the day a copy is bad; a dump far smaller than the previous one, or
without the tables the database had, is a warning on the manifest, in /health and in the notification;
HEALTH_DETAIL=minimal keeps the SPEC fields and names no host, user, bucket or path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import CANARY, Cli, PgServer, S3Server
from test_notify import Receiver, hook, http_factory  # noqa: F401 - pytest fixtures
from test_runtime import Sidecar, manifests, sidecars
from truth_support import backup_role, check, sample_db


@pytest.fixture
def sidecar(cli: Cli) -> Iterator[Callable[[dict[str, str]], Sidecar]]:
    yield from sidecars(cli)


def test_verify_after_backup_turns_health_critical_for_a_corrupt_copy(
    cli: Cli, pg: PgServer, nas: Path, sidecar
) -> None:
    db = sample_db(pg)
    fire = (datetime.now(UTC) + timedelta(seconds=12)).replace(microsecond=0)
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "BACKUP_SCHEDULE": f"{fire:%H:%M:%S}", "TZ": "UTC",
           "VERIFY_AFTER_BACKUP": "true"}
    cli.run("backup", "--scheduled", env={**env, "BACKUP_HOSTNAME": "other-replica"}, check=True)
    (made,) = manifests(nas)
    artifact = nas / made.artifact
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01  # a same-size bit flip: size checks cannot see it
    artifact.write_bytes(bytes(data))
    s = sidecar(env)
    doc = s.wait_for("the verification", lambda d: any(c["name"] == "verify" for c in d["checks"]), timeout=40)
    assert doc["status"] == "critical" and s.health()[0] == 503
    verify = check(doc, "verify", db)
    assert f"the copy of {made.id} read back after the backup is bad" in verify["message"]
    assert "manifest says" in verify["message"] and "the copy on nas is damaged" in verify["message"]
    assert len(manifests(nas)) == 1, "the slot was already made: the run only verified it"
    again = cli.run("backup", "--scheduled", env=env)
    assert again.returncode == 1 and "verify after backup" in again.stderr


def test_a_dump_without_its_data_warns_in_the_manifest_health_and_notification(
    cli: Cli, pg: PgServer, nas: Path, hook: Receiver, sidecar  # noqa: F811
) -> None:
    db = sample_db(pg, rows=20000)
    env = {**pg.env(POSTGRES_DB=db, POSTGRES_USER=backup_role(pg)), "NAS_PATH": str(nas),
           "WEBHOOK_URL": f"{hook.url}/hooks/x", "NOTIFY_RETRIES": "1"}
    cli.run("backup", env=env, check=True)
    assert not hook.hits, "a clean backup sends nothing with NOTIFY_ON=failure"
    pg.psql(db, "DROP TABLE t")
    second = cli.run("backup", env=env)
    assert second.returncode == 0, second.stderr
    first, latest = sorted(manifests(nas), key=lambda m: m.started_at)
    assert latest.contents is not None and latest.contents["objects"]["tables"] == 0
    assert first.contents is not None and first.contents["rows"] == {"public.t": 20000}
    assert any("less than 50% of the previous backup" in w for w in latest.sanity), latest.sanity
    assert any("the database has no tables, while the previous backup" in w for w in latest.sanity)
    assert all(w.startswith("output sanity: ") for w in latest.warnings) and len(latest.warnings) == 2
    assert first.raw_bytes and latest.raw_bytes and latest.raw_bytes < first.raw_bytes / 10
    assert "warning:" in second.stderr and "less than 50%" in second.stderr
    (posted,) = [h.json() for h in hook.hits if h.path == "/hooks/x"]
    assert (posted["event"], posted["status"], posted["backup_id"]) == ("backup_warning", "warning", latest.id)
    s = sidecar({**env, "BACKUP_SCHEDULE": "03:00"})
    doc = s.wait_for("the verdict", lambda d: any(c["name"] == "sanity" for c in d["checks"]))
    assert doc["status"] == "warning" and "no tables" in check(doc, "sanity", db)["message"]


def test_minimal_health_detail_names_no_host_user_bucket_or_path(
    cli: Cli, pg: PgServer, nas: Path, s3: S3Server, bucket: str, sidecar
) -> None:
    db = sample_db(pg)
    role = backup_role(pg)
    env = {**pg.env(POSTGRES_DB=db, POSTGRES_USER=role, POSTGRES_PASSWORD="wrong-" + CANARY),
           "NAS_PATH": str(nas), **s3.env(bucket), "BACKUP_HOSTNAME": "secret-node-17", "BACKUP_ON_START": "true"}
    full = sidecar(env)
    loud = full.wait_for("the failure", lambda d: d["status"] == "critical")
    full.stop()
    body = str(loud)
    assert role in body and "secret-node-17" in body and str(nas) in body  # the full detail does name them
    quiet = sidecar({**env, "HEALTH_DETAIL": "minimal", "BACKUP_ON_START": "false"})
    doc = quiet.wait_for("the verdict", lambda d: d["status"] == "critical")
    assert set(doc) >= {"status", "code", "last_success", "last_run", "next_run_at", "checks"}
    assert doc["last_run"]["status"] == "failed" and doc["last_run"]["error"]
    text = quiet.get("/health")[1].decode()
    for secret in (role, "secret-node-17", str(nas), bucket, s3.endpoint, pg.host, str(pg.port), CANARY):
        assert secret not in text, secret
    assert check(doc, "last_run", db)["status"] == "critical"
