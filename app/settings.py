"""One frozen settings object built from the environment (and an optional .env file).

Every problem is collected and reported at once, each with a hint, so an operator fixes a broken
deployment in one round trip instead of one variable per restart. Secrets may come from NAME_FILE.
"""

from __future__ import annotations

import os
import shlex
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from psycopg.conninfo import conninfo_to_dict

from app.durations import parse_duration, parse_size

T = TypeVar("T")

#: Variables whose values are secrets: never printed, logged or stored; each also accepted as NAME_FILE.
SECRET_VARS = (
    "POSTGRES_PASSWORD",
    "BACKUP_DATABASE_URL",
    "DATABASE_URL",
    "S3_ACCESS_KEY_ID",
    "S3_SECRET_ACCESS_KEY",
    "SMTP_PASSWORD",
    "WEBHOOK_URL",
    "PING_URL",
)

#: Every setting the sidecar reads (tests keep this, the code, README and .env.example in step).
KNOWN_SETTINGS = frozenset({
    "BACKUP_DATABASE_URL", "DATABASE_URL", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "POSTGRES_DB_EXCLUDE",
    "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_CONNECT_TIMEOUT", "PGDUMP_EXTRA_OPTS",
    "BACKUP_FORMAT", "BACKUP_COMPRESSION", "BACKUP_COMPRESSION_LEVEL", "BACKUP_TIMEOUT", "BACKUP_CONCURRENCY",
    "BACKUP_GLOBALS", "BACKUP_GLOBALS_PASSWORDS", "FILES_PATHS", "FILES_EXCLUDE", "FILES_NAME",
    "BACKUP_SCHEDULE", "TZ", "BACKUP_ON_START",
    "S3_ENDPOINT", "S3_BUCKET", "S3_PREFIX", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "S3_REGION", "S3_SECURE",
    "S3_PART_SIZE", "NAS_PATH", "LOCK_FILE", "LOCK_TIMEOUT",
    "BACKUP_KEEP_DAILY", "BACKUP_KEEP_WEEKLY", "BACKUP_KEEP_MONTHLY", "BACKUP_KEEP_MIN", "PRUNE_AFTER_BACKUP",
    "HEALTH_PORT", "HEALTH_BIND", "HEALTH_WARN_AGE", "HEALTH_CRIT_AGE", "HEALTH_URL",
    "NOTIFY_ON", "SMTP_HOST", "SMTP_PORT", "SMTP_USER", "SMTP_PASSWORD", "SMTP_STARTTLS", "SMTP_SSL", "MAIL_FROM",
    "MAIL_TO", "WEBHOOK_URL", "PING_URL", "NOTIFY_TIMEOUT", "NOTIFY_RETRIES", "REPORT_SCHEDULE",
    "LOG_LEVEL", "LOG_FORMAT", "BACKUP_HOSTNAME", "ENV_FILE",
}) | {f"{name}_FILE" for name in SECRET_VARS}

#: Prefixes of the sidecar's own settings: an unknown name with one of them is most likely a typo.
_OWN_PREFIXES = ("BACKUP_", "PGDUMP_", "S3_", "NAS_", "LOCK_", "HEALTH_", "NOTIFY_", "SMTP_", "MAIL_", "WEBHOOK_",
                 "PING_", "FILES_", "REPORT_", "LOG_", "POSTGRES_")
#: Variables of the official postgres image, often in the same .env: not typos.
_POSTGRES_IMAGE_VARS = frozenset({"POSTGRES_INITDB_ARGS", "POSTGRES_INITDB_WALDIR", "POSTGRES_HOST_AUTH_METHOD"})

#: Connection keywords of a database URL and the libpq variables that carry them to pg_dump.
_CONNINFO_ENV = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "user": "PGUSER",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
}

#: pg_dump options the sidecar sets itself; allowing them in PGDUMP_EXTRA_OPTS would break the stream or leak.
_RESERVED_DUMP_OPTS = (
    "-f", "--file", "-F", "--format", "-Z", "--compress", "-d", "--dbname", "-h", "--host", "-p", "--port",
    "-U", "--username", "-W", "--password", "-j", "--jobs",
)


class ConfigError(Exception):
    """Settings that cannot work; ``problems`` holds one line per problem, each with a hint."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class DatabaseSettings:
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    databases: tuple[str, ...]
    exclude: tuple[str, ...]
    #: libpq variables (PGHOST, PGSSLMODE, ...) handed to pg_dump/psql besides PGPASSWORD.
    libpq_env: tuple[tuple[str, str], ...]
    extra_dump_opts: tuple[str, ...]
    connect_timeout: int
    source: str  # which variable described the connection, for `config`


@dataclass(frozen=True)
class DumpSettings:
    format: str  # custom | plain
    compression: str  # zstd | gzip | none
    level: int
    timeout_s: float
    concurrency: int
    globals: bool
    globals_passwords: bool


@dataclass(frozen=True)
class ScheduleSettings:
    spec: str
    tz: str
    on_start: bool


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    bucket: str
    prefix: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str | None
    secure: bool
    part_size: int | None  # None: growing part sizes chosen by the uploader


@dataclass(frozen=True)
class NasSettings:
    path: Path
    create_missing: bool  # only for the built-in ./backups default: an explicit path must be a mounted volume


@dataclass(frozen=True)
class FilesSettings:
    paths: tuple[Path, ...]
    exclude: tuple[str, ...]
    name: str


@dataclass(frozen=True)
class LockSettings:
    path: Path
    timeout_s: float


@dataclass(frozen=True)
class RetentionSettings:
    daily: int
    weekly: int
    monthly: int
    minimum: int
    after_backup: bool


@dataclass(frozen=True)
class HealthSettings:
    port: int
    bind: str
    warn_age_s: float
    crit_age_s: float


@dataclass(frozen=True)
class NotifySettings:
    on: str  # failure | always | never
    smtp_host: str | None
    smtp_port: int
    smtp_user: str | None
    smtp_password: str | None = field(repr=False)
    smtp_starttls: bool
    smtp_ssl: bool
    mail_from: str
    mail_to: tuple[str, ...]
    webhook_url: str | None = field(repr=False)
    ping_url: str | None = field(repr=False)
    timeout_s: float
    retries: int
    report_schedule: str | None


@dataclass(frozen=True)
class Settings:
    db: DatabaseSettings
    dump: DumpSettings
    schedule: ScheduleSettings
    s3: S3Settings | None
    nas: NasSettings | None
    files: FilesSettings | None
    lock: LockSettings
    retention: RetentionSettings
    health: HealthSettings
    notify: NotifySettings
    log_level: str
    log_format: str
    hostname: str
    #: one line per variable that looks like a setting but is not one (typos): logged at start, never fatal
    warnings: tuple[str, ...] = ()

    def secrets(self) -> list[str]:
        """Every secret value in force, for masking; longest first so overlapping values mask fully."""
        values = [
            self.db.password,
            self.s3.secret_key if self.s3 else "",
            self.s3.access_key if self.s3 else "",
            self.notify.smtp_password or "",
            self.notify.webhook_url or "",
            self.notify.ping_url or "",
        ]
        return sorted({v for v in values if v and len(v) >= 3}, key=len, reverse=True)


class _Reader:
    """Reads typed values from the environment and collects problems instead of raising on the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []
        self.used: set[str] = set()

    def raw(self, name: str) -> str | None:
        self.used.add(name)
        value = self.env.get(name)
        if name in SECRET_VARS:
            self.used.add(f"{name}_FILE")
            file_name = self.env.get(f"{name}_FILE")
            if file_name:
                if value:
                    self.problems.append(f"{name} and {name}_FILE are both set (hint: keep only one of them)")
                    return value
                try:
                    return Path(file_name).read_text(encoding="utf-8").rstrip("\r\n")
                except OSError as exc:
                    self.problems.append(
                        f"{name}_FILE={file_name}: cannot read it: {exc.strerror or exc} "
                        "(hint: mount the secret file and check its permissions)"
                    )
                    return None
        if value is None or value.strip() == "":
            return None
        return value.strip() if name not in SECRET_VARS else value

    def str(self, name: str, default: str | None = None) -> str | None:
        value = self.raw(name)
        return default if value is None else value

    def _typed(self, name: str, default: T, conv: Callable[[str], T], expected: str) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return conv(value)
        except ValueError:
            self.problems.append(f"{name}={value!r} is not {expected} (hint: {name} takes {expected})")
            return default

    def int(self, name: str, default: int, low: int = 0, high: int | None = None) -> int:
        value = self._typed(name, default, int, "a whole number")
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            self.problems.append(f"{name}={value} is out of range (hint: use a whole number {bound})")
            return default
        return value

    def bool(self, name: str, default: bool) -> bool:
        def conv(v: str) -> bool:
            low = v.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(v)

        return self._typed(name, default, conv, "true or false")

    def duration(self, name: str, default: str) -> float:
        seconds = self._typed(name, parse_duration(default), parse_duration, "a duration (90, 30s, 15m, 26h, 7d)")
        if seconds <= 0:
            self.problems.append(f"{name} must be longer than zero (hint: for example {default})")
            return parse_duration(default)
        return seconds

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = (self.str(name, default) or default).lower()
        if value not in choices:
            self.problems.append(f"{name}={value!r} is not one of {', '.join(choices)} (hint: default is {default})")
            return default
        return value

    def list(self, name: str, default: str = "") -> tuple[str, ...]:
        value = self.str(name, default) or ""
        return tuple(item.strip() for item in value.split(",") if item.strip())


def load_settings(environ: Mapping[str, str] | None = None, env_file: str | None = None) -> Settings:
    """Build Settings from ``environ`` (default: os.environ plus .env); raise ConfigError listing all problems.

    The process environment wins over the .env file, which only fills variables that are unset.
    """
    env = dict(os.environ if environ is None else environ)
    dotenv_path = env_file or env.get("ENV_FILE") or (".env" if environ is None else None)
    if dotenv_path and Path(dotenv_path).is_file():
        from dotenv import dotenv_values

        for key, value in dotenv_values(dotenv_path).items():
            if value is not None:
                env.setdefault(key, value)
    r = _Reader(env)
    hostname = r.str("BACKUP_HOSTNAME") or socket.gethostname()

    db = _database(r)
    dump = _dump(r)
    schedule = ScheduleSettings(
        spec=r.str("BACKUP_SCHEDULE", "03:00") or "03:00",
        tz=r.str("TZ", "UTC") or "UTC",
        on_start=r.bool("BACKUP_ON_START", False),
    )
    _check_schedule(r, schedule)
    s3 = _s3(r)
    nas_path = r.str("NAS_PATH")
    defaulted = nas_path is None and s3 is None
    if defaulted:
        nas_path = "./backups"
    nas = NasSettings(Path(nas_path).absolute(), create_missing=defaulted) if nas_path else None
    files = _files(r)
    if files is not None and (files.name in db.databases or files.name == "_globals"
                              or "/" in files.name or files.name.startswith(".")):
        r.problems.append(
            f"FILES_NAME={files.name!r} clashes with a database name, _globals, or the layout "
            "(hint: the files archive needs a name of its own, e.g. FILES_NAME=files)"
        )
    default_lock = Path(env.get("TMPDIR") or "/tmp") / "backup-sidecar.lock"
    lock = LockSettings(
        path=Path(r.str("LOCK_FILE") or str(default_lock)).absolute(),
        timeout_s=r._typed("LOCK_TIMEOUT", 0.0, parse_duration, "a duration (0, 30s, 15m)"),
    )
    retention = RetentionSettings(
        daily=r.int("BACKUP_KEEP_DAILY", 14),
        weekly=r.int("BACKUP_KEEP_WEEKLY", 4),
        monthly=r.int("BACKUP_KEEP_MONTHLY", 3),
        minimum=r.int("BACKUP_KEEP_MIN", 3, low=1),
        after_backup=r.bool("PRUNE_AFTER_BACKUP", True),
    )
    health = HealthSettings(
        port=r.int("HEALTH_PORT", 8080, low=0, high=65535),
        bind=r.str("HEALTH_BIND", "0.0.0.0") or "0.0.0.0",
        warn_age_s=r.duration("HEALTH_WARN_AGE", "26h"),
        crit_age_s=r.duration("HEALTH_CRIT_AGE", "48h"),
    )
    if health.crit_age_s <= health.warn_age_s:
        r.problems.append(
            "HEALTH_CRIT_AGE must be longer than HEALTH_WARN_AGE (hint: defaults are 26h and 48h)"
        )
    notify = _notify(r, hostname)
    log_level = (r.str("LOG_LEVEL", "INFO") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        r.problems.append(f"LOG_LEVEL={log_level!r} is not DEBUG, INFO, WARNING or ERROR (hint: default is INFO)")
        log_level = "INFO"
    log_format = r.choice("LOG_FORMAT", "text", ("text", "json"))
    if r.problems:
        raise ConfigError(r.problems)
    return Settings(
        db=db, dump=dump, schedule=schedule, s3=s3, nas=nas, files=files, lock=lock, retention=retention,
        health=health, notify=notify, log_level=log_level, log_format=log_format, hostname=hostname,
        warnings=tuple(_unknown_settings(env)),
    )


def _unknown_settings(env: Mapping[str, str]) -> list[str]:
    """Names that look like ours but are not settings, with the closest real one: a typo is ignored loudly."""
    import difflib

    out = []
    for name in sorted(env):
        if name.startswith(_OWN_PREFIXES) and name not in KNOWN_SETTINGS and name not in _POSTGRES_IMAGE_VARS:
            close = difflib.get_close_matches(name, KNOWN_SETTINGS, n=1)
            hint = f"did you mean {close[0]}?" if close else "see .env.example for every setting"
            out.append(f"{name} is not a setting backup-sidecar knows and is ignored (hint: {hint})")
    return out


def _database(r: _Reader) -> DatabaseSettings:
    url_var = next((v for v in ("BACKUP_DATABASE_URL", "DATABASE_URL") if r.raw(v)), None)
    libpq: dict[str, str] = {}
    host, port, user, password, dbs = "localhost", 5432, "postgres", "", ()
    source = "POSTGRES_*"
    if url_var:
        source = url_var
        url = r.raw(url_var) or ""
        try:
            params = conninfo_to_dict(url)
        except Exception:  # psycopg raises ProgrammingError with the URL inside: keep it out of the message
            r.problems.append(
                f"{url_var} is not a valid PostgreSQL URL "
                "(hint: postgresql://USER:PASSWORD@HOST:5432/DBNAME, percent-encode special characters)"
            )
            params = {}
        password = str(params.pop("password", "") or "")
        dbname = str(params.pop("dbname", "") or "")
        for key, value in params.items():
            var = _CONNINFO_ENV.get(key)
            if var is None:
                r.problems.append(
                    f"{url_var}: connection parameter {key!r} is not supported "
                    f"(hint: supported are {', '.join(sorted(_CONNINFO_ENV))})"
                )
            else:
                libpq[var] = str(value)
        host = libpq.pop("PGHOST", host)
        user = libpq.pop("PGUSER", user)
        try:
            port = int(libpq.pop("PGPORT", str(port)))
        except ValueError:
            r.problems.append(f"{url_var}: the port is not a number (hint: postgresql://HOST:5432/DB)")
        dbs = (dbname,) if dbname else ()
        if r.raw("POSTGRES_DB"):
            dbs = r.list("POSTGRES_DB")
        if not password:
            password = r.raw("POSTGRES_PASSWORD") or ""
    else:
        host = r.str("POSTGRES_HOST", host) or host
        port = r.int("POSTGRES_PORT", port, low=1, high=65535)
        user = r.str("POSTGRES_USER", user) or user
        password = r.raw("POSTGRES_PASSWORD") or ""
        dbs = r.list("POSTGRES_DB")
    if not dbs:
        dbs = (user,)
    for name in dbs:
        if name != "*" and ("/" in name or name.startswith(".") or "\x00" in name):
            r.problems.append(
                f"POSTGRES_DB: database name {name!r} cannot be used in a backup path "
                "(hint: names with '/' or a leading '.' are not supported)"
            )
    extra = r.str("PGDUMP_EXTRA_OPTS", "") or ""
    try:
        extra_opts = tuple(shlex.split(extra))
    except ValueError as exc:
        r.problems.append(f"PGDUMP_EXTRA_OPTS cannot be parsed: {exc} (hint: quote values like a shell would)")
        extra_opts = ()
    for opt in extra_opts:
        name = opt.split("=", 1)[0]
        if name in _RESERVED_DUMP_OPTS or any(
            name.startswith(short) and len(name) > 2 and not name.startswith("--")
            for short in _RESERVED_DUMP_OPTS
            if len(short) == 2
        ):
            r.problems.append(
                f"PGDUMP_EXTRA_OPTS: {name} is set by the sidecar itself "
                "(hint: use BACKUP_FORMAT, BACKUP_COMPRESSION and the POSTGRES_* settings instead)"
            )
    return DatabaseSettings(
        host=host,
        port=port,
        user=user,
        password=password,
        databases=dbs,
        exclude=r.list("POSTGRES_DB_EXCLUDE"),
        libpq_env=tuple(sorted(libpq.items())),
        extra_dump_opts=extra_opts,
        connect_timeout=r.int("POSTGRES_CONNECT_TIMEOUT", 10, low=1, high=600),
        source=source,
    )


def _dump(r: _Reader) -> DumpSettings:
    compression = r.choice("BACKUP_COMPRESSION", "zstd", ("zstd", "gzip", "none"))
    limits = {"zstd": (1, 19, 3), "gzip": (1, 9, 6), "none": (0, 0, 0)}[compression]
    level = r.int("BACKUP_COMPRESSION_LEVEL", limits[2])
    if compression != "none" and not limits[0] <= level <= limits[1]:
        r.problems.append(
            f"BACKUP_COMPRESSION_LEVEL={level} is out of range for {compression} "
            f"(hint: use {limits[0]} to {limits[1]}, default {limits[2]})"
        )
        level = limits[2]
    concurrency = r.int("BACKUP_CONCURRENCY", 1, low=1)
    if concurrency > 4:
        r.problems.append(
            f"BACKUP_CONCURRENCY={concurrency} is too high: more than 4 parallel dumps would overload the "
            "server beside the application (hint: use 1 to 4)"
        )
        concurrency = 1
    return DumpSettings(
        format=r.choice("BACKUP_FORMAT", "custom", ("custom", "plain")),
        compression=compression,
        level=level,
        timeout_s=r.duration("BACKUP_TIMEOUT", "1h"),
        concurrency=concurrency,
        globals=r.bool("BACKUP_GLOBALS", False),
        globals_passwords=r.bool("BACKUP_GLOBALS_PASSWORDS", False),
    )


def _check_schedule(r: _Reader, schedule: ScheduleSettings) -> None:
    try:
        from app.schedule_spec import parse_schedule
    except ImportError:  # pragma: no cover - the module ships with the package
        return
    try:
        parse_schedule(schedule.spec, schedule.tz)
    except ValueError as exc:
        r.problems.append(str(exc))


def _s3(r: _Reader) -> S3Settings | None:
    bucket = r.str("S3_BUCKET")
    if not bucket:
        for name in ("S3_ENDPOINT", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"):
            r.raw(name)
        return None
    raw_endpoint = r.str("S3_ENDPOINT", "s3.amazonaws.com") or "s3.amazonaws.com"
    secure_default = True
    endpoint = raw_endpoint
    if "://" in raw_endpoint:
        parts = urlsplit(raw_endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            r.problems.append(
                f"S3_ENDPOINT={raw_endpoint!r} is not HOST[:PORT] or http(s)://HOST[:PORT] "
                "(hint: no path or bucket in the endpoint; put the bucket in S3_BUCKET)"
            )
        secure_default = parts.scheme == "https"
        endpoint = parts.netloc
    secure = r.bool("S3_SECURE", secure_default)
    if "://" in raw_endpoint and secure != secure_default:
        r.problems.append(
            f"S3_SECURE={str(secure).lower()} contradicts the scheme of S3_ENDPOINT={raw_endpoint!r} "
            "(hint: drop S3_SECURE or the scheme)"
        )
    access = r.raw("S3_ACCESS_KEY_ID") or ""
    secret = r.raw("S3_SECRET_ACCESS_KEY") or ""
    if bool(access) != bool(secret):
        r.problems.append(
            "S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY must be set together "
            "(hint: set both, or neither for anonymous access)"
        )
    part_size = None
    raw_part = r.str("S3_PART_SIZE")
    if raw_part:
        try:
            part_size = parse_size(raw_part)
        except ValueError as exc:
            r.problems.append(f"S3_PART_SIZE: {exc}")
        else:
            if not 5 * 1024**2 <= part_size <= 5 * 1024**3:
                r.problems.append(
                    f"S3_PART_SIZE={raw_part} is outside what S3 accepts (hint: 5MiB to 5GiB; leave it unset "
                    "to let part sizes grow with the backup)"
                )
                part_size = None
    prefix = (r.str("S3_PREFIX", "") or "").strip("/")
    return S3Settings(
        endpoint=endpoint,
        bucket=bucket,
        prefix=prefix,
        access_key=access,
        secret_key=secret,
        region=r.str("S3_REGION"),
        secure=secure,
        part_size=part_size,
    )


def _files(r: _Reader) -> FilesSettings | None:
    paths = r.list("FILES_PATHS")
    exclude = r.list("FILES_EXCLUDE")
    name = r.str("FILES_NAME", "files") or "files"
    if not paths:
        return None
    for p in paths:
        if not Path(p).is_absolute():
            r.problems.append(f"FILES_PATHS: {p!r} is not an absolute path (hint: use the mount point, e.g. /data)")
    return FilesSettings(paths=tuple(Path(p) for p in paths), exclude=exclude, name=name)


def _notify(r: _Reader, hostname: str) -> NotifySettings:
    on = r.choice("NOTIFY_ON", "failure", ("failure", "always", "never"))
    smtp_ssl = r.bool("SMTP_SSL", False)
    starttls = r.bool("SMTP_STARTTLS", not smtp_ssl)
    if smtp_ssl and starttls:
        r.problems.append("SMTP_SSL and SMTP_STARTTLS are both true (hint: SMTP_SSL for port 465, else STARTTLS)")
    smtp_host = r.str("SMTP_HOST")
    mail_to = r.list("MAIL_TO")
    if smtp_host and not mail_to:
        r.problems.append("SMTP_HOST is set but MAIL_TO is empty (hint: MAIL_TO=ops@example.com,oncall@example.com)")
    webhook = r.raw("WEBHOOK_URL")
    ping = r.raw("PING_URL")
    for name, url in (("WEBHOOK_URL", webhook), ("PING_URL", ping)):
        if url and urlsplit(url).scheme not in ("http", "https"):
            r.problems.append(f"{name} is not an http(s) URL (hint: https://hooks.example.com/...)")
    report_schedule = r.str("REPORT_SCHEDULE", "sun 06:00")
    try:
        from app.notify.report import parse_report_schedule

        parse_report_schedule(report_schedule)
    except ValueError as exc:
        r.problems.append(f"REPORT_SCHEDULE: {exc}")
    return NotifySettings(
        on=on,
        smtp_host=smtp_host,
        smtp_port=r.int("SMTP_PORT", 465 if smtp_ssl else (587 if starttls else 25), low=1, high=65535),
        smtp_user=r.str("SMTP_USER"),
        smtp_password=r.raw("SMTP_PASSWORD"),
        smtp_starttls=starttls,
        smtp_ssl=smtp_ssl,
        mail_from=r.str("MAIL_FROM", f"backup-sidecar@{hostname}") or f"backup-sidecar@{hostname}",
        mail_to=mail_to,
        webhook_url=webhook,
        ping_url=ping.rstrip("/") if ping else None,
        timeout_s=r.duration("NOTIFY_TIMEOUT", "10s"),
        retries=r.int("NOTIFY_RETRIES", 3, low=0, high=10),
        report_schedule=report_schedule,
    )


def describe(settings: Settings) -> list[tuple[str, str]]:
    """Flattened (name, value) pairs with secrets masked, for `backup-sidecar config`."""
    out: list[tuple[str, str]] = []

    def walk(prefix: str, obj: Any) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            name = f"{prefix}{f.name}"
            if is_dataclass(value):
                walk(f"{name}.", value)
            elif value is None:
                out.append((name, "-"))
            elif not f.repr:
                out.append((name, "****" if value else ""))
            elif isinstance(value, tuple):
                out.append((name, ", ".join("=".join(v) if isinstance(v, tuple) else str(v) for v in value)))
            else:
                out.append((name, str(value)))

    walk("", settings)
    return out
