"""Notifications against real receivers: aiosmtpd SMTP servers (plain, STARTTLS+AUTH, implicit TLS) and a local
HTTP server standing in for webhooks and a healthchecks.io-style ping endpoint.

What must hold: every event arrives with the right subject, recipients, JSON fields and ping paths; a mail
server that is down or a webhook that hangs never stalls the caller beyond the bound; retries happen and
stop; the canary secret appears in no message and no log line.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from conftest import CANARY, free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app import layout
from app.catalog import load_catalog
from app.logs import register_secrets
from app.manifest import Manifest
from app.notify import Notifier
from app.notify.health import HealthTransitions
from app.notify.logtail import LogTail
from app.notify.ping import MAX_BODY, PingChannel, bounded_body
from app.settings import load_settings
from app.targets.nas import NasTarget

HOST = "db-host-1"
AT = dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC)
LEAKY_ERROR = (f"pg_dump: connection refused\nDETAIL: tried postgresql://app:{CANARY}@db:5432/app "
               f"with PGPASSWORD={CANARY} and the password {CANARY}")


# -- receivers ---------------------------------------------------------------------------------------------


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes
    tls: bool
    login: str | None


class SmtpRecorder:
    """aiosmtpd handler that keeps every message with how it arrived (TLS? which login?)."""

    def __init__(self) -> None:
        self.mails: list[Mail] = []
        self.cond = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        with self.cond:
            self.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), msg, raw,  # type: ignore[arg-type]
                                   session.ssl is not None, login))
            self.cond.notify_all()
        return "250 OK"

    def wait(self, count: int, timeout: float = 10) -> list[Mail]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.mails) >= count, timeout)
            return list(self.mails)


@dataclass
class Tls:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed certificate for 127.0.0.1, made here so no test depends on files outside the repo."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "backup-sidecar test SMTP")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    root = tmp_path_factory.mktemp("tls")
    tls = Tls(root / "cert.pem", root / "key.pem")
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return tls


@dataclass
class Smtp:
    port: int
    recorder: SmtpRecorder
    logins: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
def smtp_factory() -> Iterator[Callable[..., Smtp]]:
    controllers: list[Controller] = []

    def start(**kwargs: Any) -> Smtp:
        recorder = SmtpRecorder()
        server = Smtp(free_port(), recorder)

        def authenticate(_server: Any, _session: Any, _envelope: Any, mechanism: str, data: Any) -> AuthResult:
            if isinstance(data, LoginPassword):
                server.logins.append((data.login.decode(), data.password.decode()))
                ok = data.login == b"backup" and data.password == CANARY.encode()
                return AuthResult(success=ok, auth_data=data)
            return AuthResult(success=False, handled=False)

        if kwargs.pop("auth", False):
            kwargs.update(authenticator=authenticate, auth_required=True)
        controller = Controller(recorder, hostname="127.0.0.1", port=server.port, **kwargs)
        controller.start()
        controllers.append(controller)
        return server

    yield start
    for controller in controllers:
        controller.stop()


@pytest.fixture
def smtp(smtp_factory: Callable[..., Smtp]) -> Smtp:
    """A plain SMTP relay (port 25 style, no TLS): the common in-cluster setup."""
    return smtp_factory()


@dataclass
class Hit:
    method: str
    path: str
    body: bytes
    content_type: str
    at: float

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """A local HTTP server recording every request; ``statuses`` scripts the answers (the last one repeats),
    ``hang`` makes it read the request and then never answer."""

    def __init__(self, statuses: tuple[int, ...] = (200,), hang: bool = False) -> None:
        self.statuses, self.hang = statuses, hang
        self.hits: list[Hit] = []
        self.cond = threading.Condition()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.cond:
                    receiver.hits.append(Hit(self.command, self.path, body, self.headers.get("Content-Type", ""),
                                             time.monotonic()))
                    index = len(receiver.hits) - 1
                    receiver.cond.notify_all()
                if receiver.hang:
                    receiver.release.wait(30)
                    return
                status = receiver.statuses[min(index, len(receiver.statuses) - 1)]
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            do_GET = do_POST  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait(self, count: int, timeout: float = 10) -> list[Hit]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.hits) >= count, timeout)
            return list(self.hits)

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_factory() -> Iterator[Callable[..., Receiver]]:
    receivers: list[Receiver] = []

    def start(**kwargs: Any) -> Receiver:
        receivers.append(Receiver(**kwargs))
        return receivers[-1]

    yield start
    for r in receivers:
        r.stop()


@pytest.fixture
def hook(http_factory: Callable[..., Receiver]) -> Receiver:
    return http_factory()


@pytest.fixture
def make_notifier(tmp_path: Path) -> Iterator[Callable[..., Notifier]]:
    """Notifiers built from real settings (load_settings over an environment), closed after the test."""
    made: list[Notifier] = []

    def make(backoff_s: float = 0.05, ssl_context: ssl.SSLContext | None = None, **env: str) -> Notifier:
        base = {"BACKUP_HOSTNAME": HOST, "POSTGRES_DB": "app,shop", "POSTGRES_PASSWORD": CANARY,
                "NAS_PATH": str(tmp_path), "NOTIFY_TIMEOUT": "2s", "NOTIFY_RETRIES": "1"}
        settings = load_settings({**base, **env})
        register_secrets(settings.secrets())
        made.append(Notifier.from_settings(settings, backoff_s=backoff_s, ssl_context=ssl_context))
        return made[-1]

    yield make
    for notifier in made:
        notifier.close(0)


def smtp_env(server: Smtp, **extra: str) -> dict[str, str]:
    return {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(server.port), "SMTP_STARTTLS": "false",
            "MAIL_TO": "ops@example.com, oncall@example.com", "MAIL_FROM": "backups@example.com", **extra}


def manifest(db: str = "app", status: str = "failed", error: str | None = LEAKY_ERROR, at: dt.datetime = AT,
             size: int = 0) -> Manifest:
    return Manifest(id=layout.backup_id(db, at), status=status, database=db, started_at=at,
                    finished_at=at + dt.timedelta(seconds=4), host=HOST, format="custom", compression="zstd",
                    artifact=layout.artifact_key(db, at, "dump.zst"), size_bytes=size,
                    sha256="ab" * 32 if status == "ok" else None, error=error if status == "failed" else None)


def notify_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the notifier itself logged (the test's own lines carry the canary on purpose)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("app.notify"))


def assert_no_canary(*texts: str | bytes) -> None:
    for text in texts:
        value = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        assert CANARY not in value


# -- e-mail ------------------------------------------------------------------------------------------------


def test_backup_failure_mail_names_what_which_where_to_every_recipient(
        make_notifier: Callable[..., Notifier], smtp: Smtp, caplog: pytest.LogCaptureFixture) -> None:
    notifier = make_notifier(**smtp_env(smtp))
    notifier.backup_failed(manifest())
    assert notifier.close(10)

    [mail] = smtp.recorder.wait(1)
    assert mail.message["Subject"] == "[backup-sidecar] FAILED app on db-host-1: pg_dump: connection refused"
    assert mail.mail_from == "backups@example.com"
    assert mail.rcpt_tos == ["ops@example.com", "oncall@example.com"]
    assert mail.message["To"] == "ops@example.com, oncall@example.com"
    assert mail.message["Auto-Submitted"] == "auto-generated"
    assert mail.message.get_content_type() == "text/plain"
    body = mail.message.get_content()
    assert "app-20261122T030000Z" in body and "Host:      db-host-1" in body
    assert "postgresql://app:****@db:5432/app" in body and "PGPASSWORD=****" in body
    assert_no_canary(mail.raw, caplog.text)


def test_starttls_with_login_delivers_over_tls_with_the_configured_user(
        make_notifier: Callable[..., Notifier], smtp_factory: Callable[..., Smtp], tls: Tls) -> None:
    server = smtp_factory(tls_context=tls.server_context(), require_starttls=True, auth=True)
    notifier = make_notifier(ssl_context=tls.client_context(), **smtp_env(
        server, SMTP_STARTTLS="true", SMTP_USER="backup", SMTP_PASSWORD=CANARY))
    notifier.failure("prune", "app", "S3: access denied deleting app/2026/11/01/app-20261101T030000Z.dump.zst")
    assert notifier.close(10)

    [mail] = server.recorder.wait(1)
    assert mail.tls and mail.login == "backup"
    assert server.logins == [("backup", CANARY)]
    assert mail.message["Subject"] == "[backup-sidecar] FAILED prune app on db-host-1: S3: access denied deleting " \
                                      "app/2026/11/01/app-20261101T030000Z.dump.zst"
    assert_no_canary(mail.raw)


def test_implicit_tls_smtp_ssl_delivers(make_notifier: Callable[..., Notifier],
                                        smtp_factory: Callable[..., Smtp], tls: Tls) -> None:
    server = smtp_factory(ssl_context=tls.server_context())
    notifier = make_notifier(ssl_context=tls.client_context(), **smtp_env(
        server, SMTP_STARTTLS="false", SMTP_SSL="true"))
    notifier.failure("verify", "app", "sha256 mismatch", backup_id="app-20261122T030000Z")
    assert notifier.close(10)

    [mail] = server.recorder.wait(1)
    assert mail.message["Subject"] == "[backup-sidecar] FAILED verify app-20261122T030000Z on db-host-1: " \
                                      "sha256 mismatch"
    assert mail.message["X-Backup-Sidecar-Event"] == "verify_failed"


def test_untrusted_smtp_certificate_is_refused_once_and_not_retried(
        make_notifier: Callable[..., Notifier], smtp_factory: Callable[..., Smtp], tls: Tls,
        caplog: pytest.LogCaptureFixture) -> None:
    server = smtp_factory(tls_context=tls.server_context(), require_starttls=True)
    notifier = make_notifier(NOTIFY_RETRIES="3", **smtp_env(server, SMTP_STARTTLS="true"))  # system CAs only
    notifier.backup_failed(manifest())
    assert notifier.close(10)

    assert server.recorder.mails == []
    refusals = [r for r in caplog.records if "certificate" in r.getMessage()]
    assert len(refusals) == 1 and "not retried" in refusals[0].getMessage()


# -- webhook -----------------------------------------------------------------------------------------------


def test_webhook_posts_event_fields_and_a_chat_text(make_notifier: Callable[..., Notifier], hook: Receiver,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app")
    notifier = make_notifier(WEBHOOK_URL=f"{hook.url}/hooks/T000/B000/{CANARY}", NOTIFY_ON="always")
    notifier.backup_finished(manifest(status="ok", size=5 * 1024 * 1024))
    notifier.backup_finished(manifest(db="shop"))  # a failed manifest is routed to the failure message
    assert notifier.close(10)

    ok, failed = hook.wait(2)
    assert ok.path == f"/hooks/T000/B000/{CANARY}" and ok.content_type == "application/json"
    doc = ok.json()
    assert {k: doc[k] for k in ("event", "status", "database", "backup_id", "size_bytes", "duration_s", "host",
                                "error")} == {
        "event": "backup_ok", "status": "ok", "database": "app", "backup_id": "app-20261122T030000Z",
        "size_bytes": 5 * 1024 * 1024, "duration_s": 4.0, "host": HOST, "error": None}
    assert doc["text"] == "[backup-sidecar] OK app on db-host-1: app-20261122T030000Z, 5.0 MiB in 4s"
    doc = failed.json()
    assert (doc["event"], doc["status"], doc["database"]) == ("backup_failed", "failed", "shop")
    assert doc["text"].startswith("[backup-sidecar] FAILED shop on db-host-1: pg_dump: connection refused\n```\n")
    assert "PGPASSWORD=****" in doc["error"]
    assert "sent by webhook" in notify_log(caplog)  # logged by host, never by its secret URL
    assert_no_canary(failed.body, ok.body, notify_log(caplog))


def test_success_is_not_sent_unless_notify_on_always(make_notifier: Callable[..., Notifier], hook: Receiver) -> None:
    notifier = make_notifier(WEBHOOK_URL=hook.url)  # NOTIFY_ON defaults to failure
    notifier.backup_finished(manifest(status="ok", size=10))
    notifier.failure("lock", None, "lock held by db-host-2 for 30m")  # one lane, in order: arrives after any ok
    assert notifier.close(10)

    [only] = hook.wait(1)
    assert only.json()["event"] == "lock_timeout"
    assert only.json()["text"] == "[backup-sidecar] FAILED lock wait on db-host-1: lock held by db-host-2 for 30m"


@pytest.mark.parametrize(("kind", "event", "subject"), [
    ("backup", "backup_failed", "FAILED app on db-host-1"),
    ("upload", "upload_failed", "FAILED upload app on db-host-1"),
    ("lock", "lock_timeout", "FAILED lock wait app on db-host-1"),
    ("prune", "prune_failed", "FAILED prune app on db-host-1"),
    ("verify", "verify_failed", "FAILED verify app-20261122T030000Z on db-host-1"),
    ("restore_test", "restore_test_failed", "FAILED restore test app-20261122T030000Z on db-host-1"),
])
def test_every_failure_path_reaches_mail_and_webhook(make_notifier: Callable[..., Notifier], smtp: Smtp,
                                                     hook: Receiver, kind: str, event: str, subject: str) -> None:
    notifier = make_notifier(WEBHOOK_URL=hook.url, **smtp_env(smtp))
    backup_id = "app-20261122T030000Z" if kind in ("verify", "restore_test") else None
    notifier.failure(kind, "app", LEAKY_ERROR, backup_id=backup_id)  # type: ignore[arg-type]
    assert notifier.close(10)

    [mail], [post] = smtp.recorder.wait(1), hook.wait(1)
    expected = f"[backup-sidecar] {subject}: pg_dump: connection refused"
    assert mail.message["Subject"] == expected
    assert post.json()["event"] == event and post.json()["text"].startswith(expected)
    assert_no_canary(mail.raw, post.body)


def test_client_error_from_webhook_is_not_retried(make_notifier: Callable[..., Notifier],
                                                  http_factory: Callable[..., Receiver],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    hook = http_factory(statuses=(404,))
    notifier = make_notifier(WEBHOOK_URL=hook.url, NOTIFY_RETRIES="3")
    notifier.failure("prune", "app", "boom")
    assert notifier.close(10)
    assert len(hook.hits) == 1
    assert "HTTP 404" in caplog.text and "not retried" in caplog.text


# -- retries and bounds ------------------------------------------------------------------------------------


def test_webhook_failing_twice_is_retried_with_backoff_until_delivered(
        make_notifier: Callable[..., Notifier], http_factory: Callable[..., Receiver],
        caplog: pytest.LogCaptureFixture) -> None:
    hook = http_factory(statuses=(500, 503, 200))
    notifier = make_notifier(backoff_s=0.2, WEBHOOK_URL=hook.url, NOTIFY_RETRIES="3")
    caplog.set_level(logging.INFO, logger="app")
    notifier.failure("prune", "app", "boom")
    assert notifier.close(10)

    hits = hook.wait(3)
    assert len(hits) == 3 and len({h.body for h in hits}) == 1
    assert hits[1].at - hits[0].at >= 0.2 and hits[2].at - hits[1].at >= 0.4  # doubling backoff
    assert "failed (attempt 1 of 4), retrying in 0.2s: HTTP 500" in caplog.text
    assert "sent by webhook" in caplog.text


def test_retries_stop_after_notify_retries(make_notifier: Callable[..., Notifier],
                                           http_factory: Callable[..., Receiver],
                                           caplog: pytest.LogCaptureFixture) -> None:
    hook = http_factory(statuses=(500,))
    notifier = make_notifier(WEBHOOK_URL=hook.url, NOTIFY_RETRIES="2")
    notifier.failure("prune", "app", "boom")
    assert notifier.close(10)  # gave up in time: nothing was cut short by the deadline

    time.sleep(0.3)  # a fourth attempt would come after a 0.2 s backoff
    assert len(hook.hits) == 3
    assert "not delivered after 3 attempt(s): HTTP 500" in caplog.text


def test_smtp_down_and_webhook_hanging_never_stall_the_caller(
        make_notifier: Callable[..., Notifier], http_factory: Callable[..., Receiver],
        caplog: pytest.LogCaptureFixture) -> None:
    hanging = http_factory(hang=True)
    blackhole = socket.socket()  # accepts connections, never says hello: an SMTP server that hangs
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)
    try:
        notifier = make_notifier(WEBHOOK_URL=hanging.url, PING_URL=f"{hanging.url}/ping", NOTIFY_TIMEOUT="0.5s",
                                 NOTIFY_RETRIES="3", SMTP_HOST="127.0.0.1",
                                 SMTP_PORT=str(blackhole.getsockname()[1]), SMTP_STARTTLS="false",
                                 MAIL_TO="ops@example.com")
        started = time.monotonic()
        notifier.run_started(["app"])
        for _ in range(20):
            notifier.backup_failed(manifest())
        notifier.run_finished()
        caller_s = time.monotonic() - started
        assert caller_s < 0.25, f"the backup path waited {caller_s:.3f}s"

        hanging.wait(1)  # the webhook really was reached and is hanging now
        started = time.monotonic()
        assert notifier.close(1.5) is False  # could not deliver: says so ...
        close_s = time.monotonic() - started
        assert close_s < 1.5 + 0.5, f"close(1.5) took {close_s:.3f}s"  # ... within its bound
    finally:
        blackhole.close()
    assert "not delivered" in caplog.text
    assert_no_canary(caplog.text)


def test_refused_smtp_connection_is_retried_and_then_logged(make_notifier: Callable[..., Notifier],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there: the mail server is down
    notifier = make_notifier(SMTP_HOST="127.0.0.1", SMTP_PORT=str(port), SMTP_STARTTLS="false",
                             MAIL_TO="ops@example.com", NOTIFY_RETRIES="2")
    started = time.monotonic()
    notifier.backup_failed(manifest())
    assert time.monotonic() - started < 0.05
    assert notifier.close(10)
    attempts = [r for r in caplog.records if r.name == "app.notify.delivery" and "by email" in r.getMessage()]
    assert [r.levelno for r in attempts] == [logging.WARNING, logging.WARNING, logging.ERROR]
    assert "refused" in attempts[-1].getMessage().lower()


def test_hanging_webhook_does_not_hold_up_the_mail(make_notifier: Callable[..., Notifier], smtp: Smtp,
                                                   http_factory: Callable[..., Receiver]) -> None:
    hanging = http_factory(hang=True)
    notifier = make_notifier(WEBHOOK_URL=hanging.url, NOTIFY_TIMEOUT="5s", **smtp_env(smtp))
    started = time.monotonic()
    notifier.backup_failed(manifest())
    assert smtp.recorder.wait(1, timeout=4)
    assert time.monotonic() - started < 4  # well before the webhook's first attempt times out
    hanging.wait(1)


def test_full_queue_drops_and_logs_instead_of_blocking(make_notifier: Callable[..., Notifier],
                                                       http_factory: Callable[..., Receiver],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    hanging = http_factory(hang=True)
    notifier = make_notifier(WEBHOOK_URL=hanging.url, NOTIFY_TIMEOUT="5s")
    notifier._lanes["webhook"].maxsize = 3
    started = time.monotonic()
    for _ in range(10):
        notifier.failure("prune", "app", "boom")
    assert time.monotonic() - started < 0.25
    assert notifier._lanes["webhook"].dropped >= 6
    assert "dropped" in caplog.text


def test_close_delivers_the_queued_failure_mail_before_returning(make_notifier: Callable[..., Notifier],
                                                                 smtp: Smtp) -> None:
    """The one-shot `backup` command: queue the failure, close, exit; the mail must already be there."""
    notifier = make_notifier(**smtp_env(smtp))
    notifier.backup_failed(manifest())
    assert notifier.close()  # default bound: one message through every retry
    assert len(smtp.recorder.mails) == 1


# -- dead-man pings ----------------------------------------------------------------------------------------


def test_pings_start_success_and_fail_with_the_runs_masked_log_tail(
        make_notifier: Callable[..., Notifier], hook: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app")
    notifier = make_notifier(PING_URL=f"{hook.url}/ping/5a1d")
    notifier.run_started(["app"])
    notifier.backup_finished(manifest(status="ok", size=1))
    notifier.run_finished()
    hook.wait(2)

    worker = logging.getLogger("app.backup")
    worker.info("line from the previous run")
    notifier.run_started(["app"])
    for i in range(120):
        worker.info("pg_dump progress line %03d %s", i, "x" * 60)
    worker.error("pg_dump: FATAL: password authentication failed PGPASSWORD=%s", CANARY)
    notifier.backup_failed(manifest())
    notifier.run_finished()
    assert notifier.close(10)

    hits = hook.wait(4)
    assert [h.path for h in hits] == ["/ping/5a1d/start", "/ping/5a1d", "/ping/5a1d/start", "/ping/5a1d/fail"]
    assert "OK: app-20261122T030000Z" in hits[1].body.decode()
    body = hits[3].body.decode()
    assert body.startswith("backup-sidecar on db-host-1: FAILED: [backup-sidecar] FAILED app on db-host-1")
    assert len(hits[3].body) <= MAX_BODY
    assert "pg_dump: FATAL: password authentication failed PGPASSWORD=****" in body
    assert "progress line 119" in body and "progress line 000" not in body  # the newest lines, bounded
    assert "previous run" not in body
    assert_no_canary(*(h.body for h in hits), notify_log(caplog))


def test_log_tail_holds_only_masked_lines_of_the_current_run() -> None:
    register_secrets([CANARY])
    tail = LogTail(max_lines=5)
    logger = logging.getLogger("app.test_tail")
    logger.setLevel(logging.INFO)
    tail.attach("app.test_tail")
    try:
        logger.info("before the run")
        tail.mark()
        for i in range(8):
            logger.info("line %d with postgresql://u:%s@h/db", i, CANARY)
        try:
            raise RuntimeError(f"password={CANARY}")
        except RuntimeError:
            logger.exception("dump failed")
    finally:
        tail.detach("app.test_tail")
        logger.setLevel(logging.NOTSET)
    lines = tail.lines()
    assert len(lines) == 5 and lines[-1] == "RuntimeError: password=****"
    assert "before the run" not in "\n".join(lines)
    assert_no_canary(*lines)


def test_failure_outside_a_run_pings_fail_at_once(make_notifier: Callable[..., Notifier], hook: Receiver) -> None:
    notifier = make_notifier(PING_URL=f"{hook.url}/ping/5a1d")
    notifier.failure("restore_test", "app", "pg_restore: error: could not execute query",
                     backup_id="app-20261122T030000Z")
    assert notifier.close(10)
    [hit] = hook.wait(1)
    assert hit.path == "/ping/5a1d/fail" and "FAILED restore test" in hit.body.decode()


def test_notify_on_never_sends_only_the_dead_man_pings(make_notifier: Callable[..., Notifier], smtp: Smtp,
                                                       http_factory: Callable[..., Receiver],
                                                       tmp_path: Path) -> None:
    hook, pings = http_factory(), http_factory()
    notifier = make_notifier(NOTIFY_ON="never", WEBHOOK_URL=hook.url, PING_URL=f"{pings.url}/p", **smtp_env(smtp))
    notifier.run_started(["app"])
    notifier.backup_failed(manifest())
    notifier.failure("prune", "app", "boom")
    notifier.run_finished()
    notifier.health_changed("ok", "critical", {"status": "critical", "checks": []})
    notifier.weekly_report(load_catalog([NasTarget(tmp_path / "empty", create=True)]))
    assert notifier.close(10)

    assert [h.path for h in pings.wait(2)] == ["/p/start", "/p/fail"]
    assert hook.hits == [] and smtp.recorder.mails == []


def test_ping_path_is_appended_before_a_query_string() -> None:
    channel = PingChannel("https://hc-ping.com/ping-key/app-backups?create=1")
    assert channel.url_for("start") == "https://hc-ping.com/ping-key/app-backups/start?create=1"
    assert channel.url_for("fail") == "https://hc-ping.com/ping-key/app-backups/fail?create=1"
    assert channel.url_for("success") == "https://hc-ping.com/ping-key/app-backups?create=1"


def test_ping_body_keeps_summary_and_newest_lines_within_the_limit() -> None:
    text = "summary line\n" + "\n".join(f"line {i:04d} {'y' * 100}" for i in range(500))
    body = bounded_body(text, 2000).decode()
    assert len(body.encode()) <= 2000
    assert body.startswith("summary line\n[... older lines cut ...]\n")
    assert body.endswith(f"line 0499 {'y' * 100}") and "line 0000" not in body


# -- /health transitions -----------------------------------------------------------------------------------

CRITICAL_HEALTH = {
    "status": "critical", "code": 2,
    "last_success": {"id": "app-20261120T030000Z", "finished_at": "2026-11-20T03:00:04Z", "age_seconds": 180000,
                     "size_bytes": 123},
    "last_run": {"status": "failed", "finished_at": "2026-11-22T03:00:04Z", "error": LEAKY_ERROR},
    "checks": [{"name": "backup_age", "status": "critical", "message": "newest good backup is 50h old (limit 48h)"},
               {"name": "scheduler", "status": "ok", "message": "ticked 3s ago"}],
}


def test_health_critical_is_sent_once_per_transition_and_recovery_once(make_notifier: Callable[..., Notifier],
                                                                        smtp: Smtp, hook: Receiver) -> None:
    notifier = make_notifier(WEBHOOK_URL=hook.url, **smtp_env(smtp))
    warning = {"status": "warning", "checks": [{"name": "backup_age", "status": "warning", "message": "27h old"}]}
    calls = [(None, "ok"), ("ok", "ok"), ("ok", "ok"), ("ok", "critical")] + [("critical", "critical")] * 10 + [
        ("ok", "critical"),  # a caller that lost track of ``old`` must not cause a second alarm
        ("critical", "unknown"), ("unknown", "critical"),  # no information is no recovery
        ("critical", "warning"), ("warning", "warning"), ("warning", "ok")]
    for old, new in calls:
        notifier.health_changed(old, new, warning if new == "warning" else CRITICAL_HEALTH)
    assert notifier.close(10)

    posts = hook.wait(2)
    assert [p.json()["event"] for p in posts] == ["health_critical", "health_recovered"]
    assert posts[0].json()["text"] == ("[backup-sidecar] CRITICAL on db-host-1: backup_age: newest good backup is "
                                       "50h old (limit 48h)")
    assert posts[1].json()["text"] == "[backup-sidecar] RECOVERED on db-host-1: now warning (backup_age: 27h old)"
    mails = smtp.recorder.wait(2)
    assert [m.message["Subject"] for m in mails] == [posts[0].json()["text"], posts[1].json()["text"]]
    body = mails[0].message.get_content()
    assert "Last good backup: app-20261120T030000Z" in body and "Last run: failed" in body
    assert_no_canary(*(m.raw for m in mails), *(p.body for p in posts))


def test_health_state_seeds_from_old_after_a_restart() -> None:
    fresh = HealthTransitions()
    assert fresh.observe(None, "critical") == "critical"  # critical at start-up: tell someone
    assert fresh.observe("critical", "critical") is None
    restarted = HealthTransitions()
    assert restarted.observe("critical", "critical") is None  # the caller remembers it was already critical
    assert restarted.observe("critical", "ok") == "recovered"
    assert restarted.observe("ok", "ok") is None


def test_notifier_calls_never_raise_into_the_backup_path(make_notifier: Callable[..., Notifier], hook: Receiver,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    notifier = make_notifier(WEBHOOK_URL=hook.url)
    notifier.health_changed("ok", "critical", None)  # type: ignore[arg-type]  # a malformed payload
    assert "health_changed failed" in caplog.text
    notifier.failure("prune", "app", "still delivered after the bad call")
    assert notifier.close(10)
    assert hook.wait(1)[0].json()["event"] == "prune_failed"


# -- weekly report delivery --------------------------------------------------------------------------------


def test_weekly_report_is_mailed_and_posted_from_the_targets(make_notifier: Callable[..., Notifier], smtp: Smtp,
                                                             hook: Receiver, tmp_path: Path) -> None:
    target = NasTarget(tmp_path / "nas", create=True)
    target.check()
    for day in range(3):
        m = manifest(status="ok", size=1000, at=AT - dt.timedelta(days=day))
        target.put_bytes(m.artifact, b"x" * 1000)
        target.put_bytes(layout.manifest_key(m.database, m.started_at), m.to_json())
    notifier = make_notifier(WEBHOOK_URL=hook.url, **smtp_env(smtp))
    assert notifier.next_report_at(AT) == dt.datetime(2026, 11, 22, 6, 0, tzinfo=dt.UTC)  # sun 06:00 UTC

    report = notifier.weekly_report(load_catalog([target]), now=AT + dt.timedelta(hours=3))
    assert notifier.close(10)
    assert report is not None and [s.database for s in report.databases] == ["app", "shop"]

    [mail], [post] = smtp.recorder.wait(1), hook.wait(1)
    assert mail.message["Subject"] == ("[backup-sidecar] weekly report on db-host-1: ATTENTION shop: no good backup "
                                       "this week")
    body = mail.message.get_content()
    assert "app: OK" in body and "shop: ATTENTION: no good backup this week" in body
    doc = post.json()
    assert doc["event"] == "weekly_report" and doc["status"] == "attention"
    assert [(d["database"], d["backups_this_week"], d["kept_bytes"]) for d in doc["databases"]] == [
        ("app", 3, 3000), ("shop", 0, 0)]
