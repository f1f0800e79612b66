"""Notifications from the real CLI and the real `run` process to real SMTP and HTTP receivers."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

from conftest import CANARY, Cli, PgServer, free_port
from test_notify import Receiver, Smtp, hook, http_factory, smtp, smtp_factory  # noqa: F401 - pytest fixtures

HOST = "db-host-7"


def notify_env(pg: PgServer, nas: Path, db: str, server: Smtp, receiver: Receiver, **extra: str) -> dict[str, str]:
    return {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "BACKUP_HOSTNAME": HOST,
            "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(server.port), "SMTP_STARTTLS": "false",
            "MAIL_TO": "ops@example.com,oncall@example.com", "MAIL_FROM": "backups@example.com",
            "WEBHOOK_URL": f"{receiver.url}/hooks/T0KEN", "PING_URL": f"{receiver.url}/ping/abc-123",
            "NOTIFY_TIMEOUT": "3s", "NOTIFY_RETRIES": "1", **extra}


def paths(receiver: Receiver) -> list[str]:
    return [h.path for h in receiver.hits]


def test_failed_backup_mails_posts_and_pings_fail_without_the_password(
    cli: Cli, pg: PgServer, nas: Path, smtp: Smtp, hook: Receiver  # noqa: F811
) -> None:
    db = pg.create_db()
    env = notify_env(pg, nas, db, smtp, hook, POSTGRES_PASSWORD="wrong-" + CANARY[::-1])
    result = cli.run("backup", env=env, timeout=120)
    assert result.returncode == 1
    # the CLI drained its queue before exiting: everything has arrived already
    [mail] = smtp.recorder.mails
    assert mail.message['Subject'].startswith(f"[backup-sidecar] FAILED {db} on {HOST}: ")
    assert "password authentication failed" in mail.message['Subject']
    assert sorted(mail.rcpt_tos) == ["oncall@example.com", "ops@example.com"]
    webhook = [h for h in hook.hits if h.path == "/hooks/T0KEN"]
    assert len(webhook) == 1
    doc = webhook[0].json()
    assert (doc["status"], doc["database"], doc["host"]) == ("failed", db, HOST)
    assert doc["backup_id"].startswith(f"{db}-") and "password authentication failed" in doc["error"]
    assert doc["text"]
    assert [p for p in paths(hook) if p.startswith("/ping/")] == ["/ping/abc-123/start", "/ping/abc-123/fail"]
    fail_body = next(h.body.decode() for h in hook.hits if h.path == "/ping/abc-123/fail")
    assert "password authentication failed" in fail_body
    everything = mail.raw + b"".join(h.body for h in hook.hits)
    assert CANARY.encode() not in everything and CANARY[::-1].encode() not in everything


def test_success_pings_and_mails_only_with_notify_on_always(
    cli: Cli, pg: PgServer, nas: Path, smtp: Smtp, hook: Receiver  # noqa: F811
) -> None:
    db = pg.create_db()
    env = notify_env(pg, nas, db, smtp, hook)
    cli.run("backup", env=env, check=True)
    assert smtp.recorder.mails == []
    assert paths(hook) == ["/ping/abc-123/start", "/ping/abc-123"]
    cli.run("backup", "--force", env={**env, "NOTIFY_ON": "always"}, check=True)
    [mail] = smtp.recorder.mails
    assert mail.message['Subject'].startswith(f"[backup-sidecar] OK {db} on {HOST}")
    assert [h.json()["status"] for h in hook.hits if h.path == "/hooks/T0KEN"] == ["ok"]


def test_mail_server_down_and_hanging_webhook_do_not_fail_or_stall_the_backup(
    cli: Cli, pg: PgServer, nas: Path, smtp: Smtp, http_factory: Callable[..., Receiver]  # noqa: F811
) -> None:
    hanging = http_factory(hang=True)
    db = pg.create_db()
    env = {**notify_env(pg, nas, db, smtp, hanging, NOTIFY_ON="always", NOTIFY_TIMEOUT="1s"),
           "SMTP_PORT": str(free_port())}
    t0 = time.monotonic()
    result = cli.run("backup", env=env, timeout=120)
    elapsed = time.monotonic() - t0
    assert result.returncode == 0, result.stderr
    assert elapsed < 15, f"notifications held the backup for {elapsed:.1f}s"
    assert [json.loads(p.read_text())["status"] for p in nas.rglob("*.manifest.json")] == ["ok"]


def test_verify_failure_is_notified(
    cli: Cli, pg: PgServer, nas: Path, smtp: Smtp, hook: Receiver  # noqa: F811
) -> None:
    db = pg.create_db()
    pg.psql(db, "CREATE TABLE t AS SELECT generate_series(1, 1000) AS x")
    env = notify_env(pg, nas, db, smtp, hook, BACKUP_COMPRESSION="none")
    cli.run("backup", env=env, check=True)
    [artifact] = nas.rglob("*.dump")
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    result = cli.run("verify", "latest", "--db", db, env=env)
    assert result.returncode == 1
    subjects = [m.message['Subject'] for m in smtp.recorder.mails]
    assert any(s.startswith("[backup-sidecar] FAILED verify") and db in s for s in subjects), subjects


def test_run_notifies_the_failed_backup_and_the_critical_health_once(
    cli: Cli, pg: PgServer, nas: Path, smtp: Smtp, hook: Receiver  # noqa: F811
) -> None:
    env = {**notify_env(pg, nas, "no_such_database", smtp, hook), "BACKUP_ON_START": "true",
           "HEALTH_PORT": str(free_port()), "HEALTH_BIND": "127.0.0.1", "BACKUP_SCHEDULE": "03:00"}
    proc = cli.popen("run", env=env)
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not any("CRITICAL" in m.message['Subject'] for m in smtp.recorder.mails):
            time.sleep(0.2)
        time.sleep(3)  # several more health evaluations: still one CRITICAL mail
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    subjects = [m.message['Subject'] for m in smtp.recorder.mails]
    assert len([s for s in subjects if "CRITICAL" in s]) == 1, subjects
    assert any(s.startswith("[backup-sidecar] FAILED no_such_database") for s in subjects), subjects
    assert "/ping/abc-123/start" in paths(hook) and "/ping/abc-123/fail" in paths(hook)
