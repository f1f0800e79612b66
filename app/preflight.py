"""`backup-sidecar check`: a live preflight of everything a backup will touch, one line per check.

`config` only validates values; this connects. It reaches each database (and compares pg_dump's version
with the server's), writes, reads back, lists and removes a probe object on every target, opens the lock
file's directory, resolves the schedule, and reaches each notification channel without sending anything:

* SMTP: connect, EHLO, STARTTLS or implicit TLS, login, ``MAIL FROM``/``RCPT TO`` for each recipient (so a
  relay that refuses them shows now), then ``RSET`` and ``QUIT``: no ``DATA``, so no message.
* webhook and ping: a TCP connection and the TLS handshake (through HTTPS_PROXY when one applies), and no
  HTTP request at all. Any request to a healthchecks.io-style ping URL (GET, HEAD or POST) counts as a ping,
  so a probe would report a success that never happened; a webhook receiver may act on any request it
  gets. The handshake proves the name resolves, the route and firewall let us through and the certificate
  is trusted, which is what goes wrong in practice.

`run` performs the same checks at start and logs them; it never refuses to start over them, since a
database that is down at start may be up by the first scheduled run, and /health reports what stays wrong.
"""

from __future__ import annotations

import logging
import os
import shutil
import smtplib
import socket
import ssl
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import psycopg

from app import encryption, pg
from app.durations import format_duration, format_size
from app.errors import SidecarError
from app.logs import mask
from app.settings import Settings
from app.targets import make_targets
from app.targets.base import ObjectLocked, Target

log = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "FAIL"
PROBE_DIR = ".backup-sidecar-check"


@dataclass(frozen=True)
class Finding:
    """One line of the preflight: its status, what was checked, and what was found (with a hint when not ok)."""

    status: str  # ok | warn | FAIL
    what: str
    message: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.what}: {self.message}"


def describe_active(settings: Settings) -> list[str]:
    """What a backup run works on, for the start of `run` and `backup`: databases, extras and targets.

    Also says when S3_BUCKET switched the ./backups default off, which otherwise surprises: the default
    directory applies only while no target at all is configured.
    """
    db = settings.db
    names = ", ".join(db.databases) + (f" (excluding {', '.join(db.exclude)})" if db.exclude else "")
    extras = []
    if settings.dump.globals and db.engine != "none":
        extras.append("users and grants (BACKUP_GLOBALS)" if db.engine == "mariadb"
                      else "roles and tablespaces (BACKUP_GLOBALS)")
    if settings.sqlite is not None:
        extras.append("SQLite " + ", ".join(f"{path} as {name!r}" for name, path in settings.sqlite.files))
    if settings.files is not None:
        extras.append(f"files {', '.join(str(p) for p in settings.files.paths)} as {settings.files.name!r}")
    engine = {"mariadb": "MariaDB/MySQL ", "postgresql": ""}.get(db.engine, "")
    if db.engine == "none":
        lines = [f"databases: none on a server (from SQLITE_PATHS); {'; '.join(extras)}"]
    else:
        lines = [f"databases: {names} on {engine}{db.user}@{db.host}:{db.port} (from {db.source})"
                 + (f"; also {'; '.join(extras)}" if extras else "")]
    targets = []
    for target in make_targets(settings):
        where = target.describe()
        if target.name == "nas" and settings.nas is not None and settings.nas.create_missing:
            where += " (the default ./backups: no NAS_PATH or S3_BUCKET is set)"
        if target.name == "s3" and settings.s3 is not None:
            where += f" at {'https' if settings.s3.secure else 'http'}://{settings.s3.endpoint}"
            if settings.s3.access_key:
                where += f" as {settings.s3.access_key}"
        targets.append(where)
    lines.append(f"targets: {', '.join(targets) or 'none'}")
    if settings.s3 is not None and settings.nas is None:
        lines.append("NAS_PATH is not set, so backups go to S3 only: the ./backups default applies only when no "
                     "target is configured (set NAS_PATH to keep a copy on a directory too)")
    return lines


def run_checks(settings: Settings, *, notify_optional: bool = False) -> list[Finding]:
    """Every check, in the order a backup meets them; ``notify_optional`` turns channel failures into warnings."""
    findings = [Finding(WARN, "settings", warning) for warning in settings.warnings]
    findings += _databases(settings)
    findings += _files(settings)
    for target in make_targets(settings):
        findings += _target(settings, target)
    findings += _encryption(settings)
    findings.append(_lock(settings))
    findings += _schedules(settings)
    for finding in _channels(settings):
        if notify_optional and finding.status == FAIL:
            finding = Finding(WARN, finding.what, f"{finding.message} (a channel never stops a backup)")
        findings.append(finding)
    return findings


def log_checks(settings: Settings) -> None:
    """`run`'s start: the same checks, logged; a failure is an ERROR line, never a refusal to start."""
    try:
        findings = run_checks(settings)
    except Exception:  # the preflight must never take the sidecar down
        log.exception("preflight: the checks themselves failed")
        return
    for finding in findings:
        if finding.what == "notify":
            continue  # the notifier's own start-up line says it (once per `run`)
        level = {OK: logging.INFO, WARN: logging.WARNING}.get(finding.status, logging.ERROR)
        log.log(level, "preflight: %s: %s", finding.what, finding.message)


# --- database ---------------------------------------------------------------------------------------------


def _databases(settings: Settings) -> list[Finding]:
    from app.databases import resolve_databases

    try:
        names = resolve_databases(settings)
    except SidecarError as exc:
        return [Finding(FAIL, "database", mask(str(exc)))]
    out = []
    for name in names:
        out += _mariadb(settings, name) if settings.db.engine == "mariadb" else _database(settings, name)
    for name, path in settings.sqlite.files if settings.sqlite else ():
        out.append(_sqlite(name, path))
    if settings.dump.globals and settings.db.engine == "postgresql":
        out.append(_client("pg_dumpall", "globals"))
    return out


def _mariadb(settings: Settings, dbname: str) -> list[Finding]:
    """Connect, compare the dump client with the server (family and version), name non-transactional tables."""
    from app.engines import mysql

    what = f"database {dbname}"
    try:
        with mysql.connect(settings.db, dbname) as conn:
            server = mysql.server_version(conn)
            binary = mysql.dump_binary()
            client = mysql.client_version(binary)
            mysql.check_compatible(binary, client, server, mysql.where(settings.db, dbname))
            with conn.cursor() as cur:
                loose = mysql._non_transactional(cur, dbname)
    except SidecarError as exc:
        return [Finding(FAIL, what, mask(str(exc)))]
    found = [Finding(OK, what, f"{server.text} at {settings.db.host}:{settings.db.port} as {settings.db.user}; "
                               f"{binary} {client.short()}")]
    if loose:
        found.append(Finding(WARN, what, f"not in the consistent snapshot (non-transactional): {', '.join(loose[:10])} "
                                         "(hint: convert them to InnoDB, or set MYSQLDUMP_LOCK_ALL_TABLES=true)"))
    return found


def _sqlite(name: str, path: Path) -> Finding:
    from app.engines.sqlite import SqliteError, _check_source, journal_mode

    try:
        _check_source(name, path)
        mode = journal_mode(path)
    except (SidecarError, OSError) as exc:
        return Finding(FAIL, f"sqlite {name}", mask(str(exc)))
    except Exception as exc:  # noqa: BLE001 - sqlite3.DatabaseError and friends
        return Finding(FAIL, f"sqlite {name}", str(SqliteError(f"{path}: {exc}", hint="check SQLITE_PATHS")))
    return Finding(OK, f"sqlite {name}", f"{path} ({mode} mode)")


def _database(settings: Settings, dbname: str) -> list[Finding]:
    what = f"database {dbname}"
    try:
        with pg.connect(settings.db, dbname) as conn:
            versions = pg.check_versions(settings.db, dbname, conn)
            role = conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
            findings = [Finding(OK, what, (
                f"PostgreSQL {versions.server} at {settings.db.host}:{settings.db.port} as {role[0] if role else '?'}"
                f"{' (superuser)' if role and role[1] else ''}; pg_dump {versions.client}"))]
            findings += privilege_findings(settings, conn, dbname)
            return findings
    except SidecarError as exc:
        return [Finding(FAIL, what, mask(str(exc)))]


def privilege_findings(settings: Settings, conn: psycopg.Connection, dbname: str) -> list[Finding]:
    """What the backup role cannot read in ``dbname``, from the detection every backup runs (app/privileges.py):
    FAIL where data would be missing (the backup will refuse), warn where only metadata is lost."""
    from app import privileges

    try:
        found = privileges.inspect(conn)
    except psycopg.Error as exc:
        return [Finding(WARN, f"privileges {dbname}", f"could not be inspected: {mask(str(exc)).splitlines()[0]}")]
    if not found:
        return [Finding(OK, f"privileges {dbname}", "the role can read everything pg_dump dumps")]
    return [Finding(FAIL if f.blocking else WARN, f"privileges {dbname}", mask(f.line())) for f in found]


def _client(binary: str, what: str) -> Finding:
    try:
        version, _ = pg.client_version(binary)
    except SidecarError as exc:
        return Finding(FAIL, what, str(exc))
    return Finding(OK, what, f"{binary} {version}")


def _files(settings: Settings) -> list[Finding]:
    if settings.files is None:
        return []
    out = []
    for path in settings.files.paths:
        if not path.is_dir():
            out.append(Finding(FAIL, f"files {path}", "does not exist or is not a directory (hint: mount it or "
                                                       "fix FILES_PATHS)"))
        elif not os.access(path, os.R_OK | os.X_OK):
            out.append(Finding(FAIL, f"files {path}", "not readable by this user (hint: the image runs as uid "
                                                       "10001; grant it read access)"))
        else:
            out.append(Finding(OK, f"files {path}", "readable"))
    return out


# --- targets ----------------------------------------------------------------------------------------------


def _target(settings: Settings, target: Target) -> list[Finding]:
    what = f"target {target.describe()}"
    if target.name == "nas" and settings.nas is not None and settings.nas.create_missing:
        root = settings.nas.path
        if not root.exists():
            parent = next((p for p in root.parents if p.exists()), Path("/"))
            if os.access(parent, os.W_OK | os.X_OK):
                return [Finding(OK, what, "does not exist yet; the first backup creates it (the ./backups default)")]
            return [Finding(FAIL, what, f"does not exist and {parent} is not writable (hint: set NAS_PATH)")]
    try:
        target.check()
    except SidecarError as exc:
        return [Finding(FAIL, what, mask(str(exc)))]
    key = f"{PROBE_DIR}/{settings.hostname}-{uuid.uuid4().hex[:12]}.probe"
    data = f"backup-sidecar check {datetime.now(UTC).isoformat()}\n".encode()
    step = "write"
    try:
        target.put_bytes(key, data)
        step = "read back"
        if target.read_bytes(key) != data:
            return [Finding(FAIL, what, f"the probe {key} read back different bytes (hint: check the storage)")]
        step = "list"
        if key not in {o.key for o in target.list(f"{PROBE_DIR}/")}:
            return [Finding(FAIL, what, f"the probe {key} was written but is not listed (hint: list permission)")]
        step = "delete"
        kept: ObjectLocked | None = None
        try:
            target.delete(key)
        except ObjectLocked as locked:  # a bucket default retention locks every object, the probe too
            kept = locked
    except SidecarError as exc:
        need = {"write": "backups", "read back": "verify and restore", "list": "list, prune and /health",
                "delete": "prune and the clean-up after a failed run"}[step]
        return [Finding(FAIL, what, f"cannot {step} a probe object, which {need} need: {mask(str(exc))}")]
    found = [_space(target, what, kept)]
    from app.targets.s3 import S3Target

    if isinstance(target, S3Target) and target.settings.object_lock:
        found.append(Finding(OK, what, f"{target.lock_config()}; each backup object is written with "
                             f"{target.settings.object_lock} retention for "
                             f"{format_duration(target.settings.object_lock_s)}"))
    if target.name == "s3":
        found.append(_s3_protection(target))
    return found


def _space(target: Target, what: str, kept: ObjectLocked | None = None) -> Finding:
    """The probe went through; on a directory, also whether the next backup fits (the newest one's size)."""
    done = "wrote, read back, listed and removed a probe" if kept is None else (
        f"wrote, read back and listed a probe, which the bucket's default retention keeps: {kept}")
    free = target.free_bytes()
    if free is None:
        return Finding(OK, what, done)
    from app.catalog import load_catalog

    newest: dict[str, int] = {}
    for entry in load_catalog([target]).good():
        newest.setdefault(entry.manifest.database, entry.manifest.size_bytes)
    needed = sum(newest.values())
    if needed and free < needed:
        return Finding(WARN, what, f"{done}; only {format_size(free)} free, the newest backups took "
                                   f"{format_size(needed)} (hint: free space or lower retention)")
    return Finding(OK, what, f"{done}; {format_size(free)} free")


def _s3_protection(target: Target) -> Finding:
    """Versioning and object lock of the bucket, where the credentials may read them (informational)."""
    from minio.error import S3Error

    client, bucket = target.client, target.settings.bucket  # type: ignore[attr-defined]
    what = f"bucket {bucket}"
    parts = []
    try:
        parts.append(f"versioning {(client.get_bucket_versioning(bucket).status or 'off').lower()}")
    except Exception as exc:  # noqa: BLE001 - informational: say it could not be read
        parts.append(f"versioning not readable ({_s3_code(exc)})")
    try:
        config = client.get_object_lock_config(bucket)
        if config.mode:
            parts.append(f"object lock {config.mode.lower()} {config.duration} {(config.duration_unit or '').lower()}"
                         if config.duration else f"object lock {config.mode.lower()}")
        else:
            parts.append("object lock on, no default retention")
    except S3Error as exc:
        parts.append("object lock off" if "ObjectLockConfiguration" in exc.code else
                     f"object lock not readable ({exc.code})")
    except Exception as exc:  # noqa: BLE001
        parts.append(f"object lock not readable ({_s3_code(exc)})")
    return Finding(OK, what, "; ".join(parts))


def _s3_code(exc: Exception) -> str:
    return getattr(exc, "code", None) or exc.__class__.__name__


# --- lock and schedule ------------------------------------------------------------------------------------


def _encryption(settings: Settings) -> list[Finding]:
    """age on PATH when backups are encrypted; the identity readable, and which recipients it opens."""
    enc = settings.encryption
    found: list[Finding] = []
    if enc.on:
        prints = ", ".join(encryption.fingerprint(r) for r in enc.recipients)
        if shutil.which("age") is None:
            found.append(Finding(FAIL, "encryption", "BACKUP_ENCRYPT_RECIPIENTS is set but age is not installed "
                                 "(hint: apt-get install age; the image has it)"))
        else:
            which = ""
            if enc.targets is not None:
                plain = [n for n in settings.target_names if n not in enc.targets]
                which = f"; copies on {', '.join(enc.targets)} only" + (
                    f", the copies on {', '.join(plain)} are not encrypted" if plain else "")
            found.append(Finding(OK, "encryption", f"age to {len(enc.recipients)} recipient(s): {prints}{which}"))
    if enc.identity_file is not None:
        try:
            opens = encryption.identity_fingerprints(encryption.check_identity(enc.identity_file, "restore"))
        except SidecarError as exc:
            return [*found, Finding(FAIL, "identity", str(exc))]
        configured = {encryption.fingerprint(r) for r in enc.recipients}
        if configured and opens and not opens & configured:
            found.append(Finding(WARN, "identity", f"AGE_IDENTITY_FILE opens {', '.join(sorted(opens))}, none of "
                                 "BACKUP_ENCRYPT_RECIPIENTS: new backups cannot be restored with it (hint: keep the "
                                 "identity of a current recipient in the file too)"))
        else:
            found.append(Finding(OK, "identity", f"AGE_IDENTITY_FILE opens {', '.join(sorted(opens)) or 'ssh keys'}"))
    return found


def _lock(settings: Settings) -> Finding:
    path = settings.lock.path
    what = f"lock {path}"
    directory = path.parent
    if not directory.is_dir():
        return Finding(FAIL, what, f"the directory {directory} does not exist (hint: mount the volume every "
                                   "instance shares there, or fix LOCK_FILE)")
    if path.exists():
        ok = os.access(path, os.R_OK | os.W_OK)
        return (Finding(OK, what, "exists and is writable") if ok else
                Finding(FAIL, what, "exists but this user cannot open it read-write (hint: check its owner; the "
                                    "image runs as uid 10001)"))
    probe = directory / f".backup-sidecar-check-{uuid.uuid4().hex[:12]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return Finding(FAIL, what, f"cannot create files in {directory}: {exc.strerror or exc} (hint: LOCK_FILE "
                                   "must be on a writable volume shared by every instance)")
    return Finding(OK, what, f"{directory} is writable (the first run creates the file)")


def _schedules(settings: Settings) -> list[Finding]:
    from app.notify.report import parse_report_schedule
    from app.schedule_spec import parse_schedule

    schedule = parse_schedule(settings.schedule.spec, settings.schedule.tz)
    runs, at = [], datetime.now(UTC)
    for _ in range(3):
        at = schedule.next_run(at)
        runs.append(at)
    when = ", ".join(r.strftime("%Y-%m-%d %H:%M UTC") for r in runs)
    note = "" if schedule.aligned else " (an interval that does not divide a day counts from process start)"
    out = [Finding(OK, "schedule", f"{schedule.describe()}: next runs {when}{note}")]
    report = parse_report_schedule(settings.notify.report_schedule)
    if report is not None:
        nxt = report.next_after(datetime.now(UTC), settings.schedule.tz)
        out.append(Finding(OK, "report", f"weekly report {report}: next {nxt:%Y-%m-%d %H:%M UTC}"))
    return out


# --- notification channels --------------------------------------------------------------------------------


def _channels(settings: Settings) -> Iterator[Finding]:
    n = settings.notify
    if n.smtp_host and n.mail_to:
        yield _smtp(settings)
    for name, url in (("webhook", n.webhook_url), ("ping", n.ping_url)):
        if url:
            yield _reach_url(name, url, n.timeout_s)
    if n.on != "never" and not (n.smtp_host and n.mail_to) and not n.webhook_url:
        yield Finding(WARN, "notify", "no channel is configured (SMTP_HOST+MAIL_TO or WEBHOOK_URL): failures show "
                                      "only in the log, /health and /metrics")


def _smtp(settings: Settings) -> Finding:
    n = settings.notify
    what = f"mail via {n.smtp_host}:{n.smtp_port}"
    context = ssl.create_default_context()
    steps: list[str] = []
    try:
        if n.smtp_ssl:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(n.smtp_host or "", n.smtp_port, local_hostname=settings.hostname,
                                                  timeout=n.timeout_s, context=context)
            steps.append("TLS")
        else:
            smtp = smtplib.SMTP(n.smtp_host or "", n.smtp_port, local_hostname=settings.hostname,
                                timeout=n.timeout_s)
        with smtp:
            smtp.ehlo()
            if n.smtp_starttls:
                smtp.starttls(context=context)
                smtp.ehlo()
                steps.append("STARTTLS")
            if n.smtp_user:
                smtp.login(n.smtp_user, n.smtp_password or "")
                steps.append(f"login as {n.smtp_user}")
            code, text = smtp.mail(n.mail_from)
            if code >= 400:
                raise smtplib.SMTPSenderRefused(code, text, n.mail_from)
            refused = {}
            for rcpt in n.mail_to:
                code, text = smtp.rcpt(rcpt)
                if code >= 400:
                    refused[rcpt] = f"{code} {text.decode(errors='replace')}"
            smtp.rset()
    except ssl.SSLCertVerificationError as exc:
        return Finding(FAIL, what, f"TLS certificate refused: {exc.verify_message} (hint: SSL_CERT_FILE for a "
                                   "private CA)")
    except smtplib.SMTPAuthenticationError as exc:
        return Finding(FAIL, what, f"login as {n.smtp_user} refused: {exc.smtp_code} (hint: check SMTP_USER and "
                                   "SMTP_PASSWORD)")
    except smtplib.SMTPNotSupportedError as exc:
        return Finding(FAIL, what, f"{exc} (hint: SMTP_STARTTLS=false, or SMTP_SSL=true for port 465)")
    except smtplib.SMTPSenderRefused as exc:
        return Finding(FAIL, what, f"sender {n.mail_from} refused: {exc.smtp_code} "
                                   f"{exc.smtp_error.decode(errors='replace')} (hint: check MAIL_FROM)")
    except (OSError, smtplib.SMTPException) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or exc.__class__.__name__)
        return Finding(FAIL, what, mask(f"cannot reach it: {reason} (hint: check SMTP_HOST, SMTP_PORT and "
                                        "SMTP_SSL/SMTP_STARTTLS, and that the network lets the sidecar out)"))
    if refused:
        return Finding(FAIL, what, "recipients refused: " + "; ".join(f"{k} ({v})" for k, v in refused.items())
                       + " (hint: check MAIL_TO, and that the server relays for the sidecar)")
    done = ", ".join(["connected", *steps, f"{len(n.mail_to)} recipient(s) accepted"])
    return Finding(OK, what, f"{done}; no message sent")


def _reach_url(name: str, url: str, timeout: float) -> Finding:
    """TCP and (for https) the TLS handshake to the URL's host, via a proxy where one applies: no request."""
    from app.notify.http import describe

    parts = urlsplit(url)
    host, secure = parts.hostname or "", parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    what = f"{name} to {describe(url)}"
    proxy = None if proxy_bypass(host) else getproxies().get(parts.scheme)
    try:
        if proxy:
            import http.client

            p = urlsplit(proxy)
            conn_cls: Callable[..., http.client.HTTPConnection] = (
                http.client.HTTPSConnection if secure else http.client.HTTPConnection)
            conn = conn_cls(p.hostname or "", p.port or 8080, timeout=timeout)
            if secure:
                conn.set_tunnel(host, port)  # CONNECT, then the TLS handshake with the receiver: no request
            conn.connect()
            conn.close()
            how = f"via proxy {p.hostname}:{p.port or 8080}"
        else:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                if secure:
                    with ssl.create_default_context().wrap_socket(sock, server_hostname=host):
                        pass
            how = "directly"
    except ssl.SSLCertVerificationError as exc:
        return Finding(FAIL, what, f"TLS certificate refused: {exc.verify_message} (hint: SSL_CERT_FILE for a "
                                   "private CA)")
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or exc.__class__.__name__)
        return Finding(FAIL, what, f"cannot reach {host}:{port}: {reason} (hint: check the URL, DNS and the "
                                   "network path; HTTPS_PROXY if the sidecar must use a proxy)")
    tls = "TLS handshake ok" if secure else "TCP connection ok (plain HTTP)"
    return Finding(OK, what, f"{tls} {how}; no request sent (any request to it would count as an event)")


def exit_status(findings: list[Finding]) -> bool:
    """True when nothing failed (warnings are fine)."""
    return all(f.status != FAIL for f in findings)


