"""One frozen settings object built from the environment (and an optional .env file).

Every problem is collected and reported at once, each with a hint, so an operator fixes a broken
deployment in one round trip instead of one variable per restart. Secrets may come from NAME_FILE.
"""

from __future__ import annotations

import os
import shlex
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from psycopg.conninfo import conninfo_to_dict

from app.dumpopts import reserved_problems
from app.durations import parse_duration, parse_size
from app.encryption import EncryptionSettings, parse_recipients

T = TypeVar("T")

#: Variables whose values are secrets: never printed, logged or stored; each also accepted as NAME_FILE.
SECRET_VARS = (
    "POSTGRES_PASSWORD",
    "BACKUP_DATABASE_URL",
    "DATABASE_URL",
    "S3_SECRET_ACCESS_KEY",
    "SMTP_PASSWORD",
    "WEBHOOK_URL",
    "PING_URL",
    "DRILL_DATABASE_URL",
    "MYSQL_PASSWORD",
    "MARIADB_PASSWORD",
    "STATUS_TOKEN",
)
#: Settings also accepted as NAME_FILE: the secrets, and the S3 access key ID, which is no secret (it names the
#: account, is shown in logs and server audit trails) but usually lives in the same Secret as its key.
FILE_VARS = (*SECRET_VARS, "S3_ACCESS_KEY_ID", "BACKUP_ENCRYPT_RECIPIENTS")

#: Every setting the sidecar reads (tests keep this, the code, README and .env.example in step).
KNOWN_SETTINGS = frozenset({
    "BACKUP_DATABASE_URL", "DATABASE_URL", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "POSTGRES_DB_EXCLUDE",
    "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_CONNECT_TIMEOUT", "PGDUMP_EXTRA_OPTS",
    "BACKUP_FORMAT", "BACKUP_COMPRESSION", "BACKUP_COMPRESSION_LEVEL", "BACKUP_TIMEOUT", "BACKUP_CONCURRENCY",
    "BACKUP_GLOBALS", "BACKUP_GLOBALS_PASSWORDS", "FILES_PATHS", "FILES_EXCLUDE", "FILES_NAME",
    "BACKUP_SCHEDULE", "TZ", "BACKUP_ON_START",
    "S3_ENDPOINT", "S3_BUCKET", "S3_PREFIX", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "S3_REGION", "S3_SECURE",
    "S3_PART_SIZE", "S3_PART_MEMORY", "S3_OBJECT_LOCK", "S3_OBJECT_LOCK_PERIOD", "NAS_PATH", "NAS_GROUP_READABLE",
    "NAS_REQUIRE_MOUNT", "BACKUP_OK_POLICY",
    "SYNC_SCHEDULE", "LOCK_FILE", "LOCK_TIMEOUT",
    "BACKUP_KEEP_DAILY", "BACKUP_KEEP_WEEKLY", "BACKUP_KEEP_MONTHLY", "BACKUP_KEEP_MIN", "PRUNE_AFTER_BACKUP",
    "HEALTH_PORT", "HEALTH_BIND", "HEALTH_WARN_AGE", "HEALTH_CRIT_AGE", "HEALTH_URL",
    "HEALTH_DETAIL", "VERIFY_AFTER_BACKUP", "BACKUP_SIZE_DROP_WARN", "CLOCK_SKEW_TOLERANCE", "STATUS_TOKEN",
    "NOTIFY_ON", "SMTP_HOST", "SMTP_PORT", "SMTP_USER", "SMTP_PASSWORD", "SMTP_STARTTLS", "SMTP_SSL", "MAIL_FROM",
    "MAIL_TO", "WEBHOOK_URL", "PING_URL", "NOTIFY_TIMEOUT", "NOTIFY_RETRIES", "REPORT_SCHEDULE",
    "LOG_LEVEL", "LOG_FORMAT", "BACKUP_HOSTNAME", "ENV_FILE", "DRILL_SCHEDULE", "DRILL_DATABASE_URL",
    "WAL_ARCHIVE", "BASE_BACKUP_SCHEDULE", "WAL_SPOOL_DIR", "WAL_SLOT", "WAL_PARTIAL_INTERVAL", "WAL_WARN_AGE",
    "WAL_CRIT_AGE", "WAL_SLOT_WARN_SIZE", "WAL_SLOT_CRIT_SIZE",
    "MYSQL_HOST", "MYSQL_PORT", "MYSQL_DATABASE", "MYSQL_USER", "MYSQL_PASSWORD", "MYSQL_CONNECT_TIMEOUT",
    "MARIADB_HOST", "MARIADB_PORT", "MARIADB_DATABASE", "MARIADB_USER", "MARIADB_PASSWORD", "MARIADB_CONNECT_TIMEOUT",
    "MYSQLDUMP_LOCK_ALL_TABLES", "SQLITE_PATHS", "BACKUP_ENCRYPT_RECIPIENTS", "BACKUP_ENCRYPT_TARGETS",
    "AGE_IDENTITY_FILE",
}) | {f"{name}_FILE" for name in FILE_VARS}

#: Prefixes of the sidecar's own settings: an unknown name with one of them is most likely a typo.
_OWN_PREFIXES = ("WAL_", "BASE_BACKUP_", "DRILL_", "BACKUP_", "PGDUMP_", "MYSQLDUMP_", "SQLITE_", "S3_", "NAS_",
                 "LOCK_", "HEALTH_", "NOTIFY_", "SMTP_", "MAIL_", "WEBHOOK_", "PING_", "FILES_", "REPORT_", "LOG_",
                 "POSTGRES_", "SYNC_")
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
    #: which server this sidecar backs up: postgresql | mariadb (MySQL too) | none (SQLITE_PATHS only)
    engine: str = "postgresql"
    #: MariaDB: mariadb-dump --lock-all-tables (consistent non-transactional tables; writers wait for the dump)
    lock_all_tables: bool = False


@dataclass(frozen=True)
class DumpSettings:
    format: str  # custom | plain
    compression: str  # zstd | gzip | none
    level: int
    timeout_s: float
    concurrency: int
    globals: bool
    globals_passwords: bool
    #: which targets must hold a copy for a run to count as ok: ("all",), ("any",) or target names
    ok_policy: tuple[str, ...] = ("all",)


@dataclass(frozen=True)
class ScheduleSettings:
    spec: str
    tz: str
    on_start: bool
    sync_spec: str | None = "every 1h"  # SYNC_SCHEDULE; None: catch-up only after each backup job


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    bucket: str
    prefix: str
    access_key: str  # not a secret: shown by `config` and in logs, never together with the secret key
    secret_key: str = field(repr=False)
    region: str | None
    secure: bool
    part_size: int | None  # None: one size per upload, chosen from the size estimate
    part_memory: int = 64 * 1024**2  # S3_PART_MEMORY: the two parts an upload holds at once
    #: S3_OBJECT_LOCK: GOVERNANCE or COMPLIANCE retention on every object written (None: off), for this long
    object_lock: str | None = None
    object_lock_s: float = 0.0


@dataclass(frozen=True)
class NasSettings:
    path: Path
    create_missing: bool  # only for the built-in ./backups default: an explicit path must be a mounted volume
    require_mount: bool = True  # NAS_REQUIRE_MOUNT: refuse a directory on the root disk without the marker
    group_readable: bool = False  # NAS_GROUP_READABLE: 0640/0750 instead of 0600/0700


@dataclass(frozen=True)
class FilesSettings:
    paths: tuple[Path, ...]
    exclude: tuple[str, ...]
    name: str


@dataclass(frozen=True)
class SqliteSettings:
    """SQLITE_PATHS: each database file under its unit name (the file's stem, or NAME=PATH)."""

    files: tuple[tuple[str, Path], ...]

    def path_of(self, name: str) -> Path | None:
        return next((path for n, path in self.files if n == name), None)


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

    @property
    def longest_keep_s(self) -> float:
        """The longest a rule may keep a backup after it was made: its day, ISO week or month bucket must still
        be among the newest kept ones, so up to N whole buckets plus the one it started in (a month counted as
        31 days), and a day of margin. S3 Object Lock retains every object this long by default, so nothing a
        rule may still keep can be deleted early, and nothing stays locked much past its rule."""
        day = 86400.0
        return max(self.daily + 1, 7 * (self.weekly + 1) if self.weekly else 0,
                   31 * (self.monthly + 1) if self.monthly else 0) * day + day


@dataclass(frozen=True)
class DrillSettings:
    """Restore drills: when (None: only `verify --restore-test`) and where (None: the source server)."""

    schedule: str | None
    server: DatabaseSettings | None

    def database(self, source: DatabaseSettings) -> DatabaseSettings:
        return self.server or source


@dataclass(frozen=True)
class HealthSettings:
    port: int
    bind: str
    warn_age_s: float
    crit_age_s: float
    #: full | minimal: minimal drops messages that name hosts, users, buckets and paths (outside monitors)
    detail: str = "full"
    #: after each run, read the newest backup's copies back and check them (a corrupt copy: red the same day)
    verify_after_backup: bool = False
    #: a dump smaller than this fraction of the previous one of the same database is a warning
    size_drop_warn: float = 0.5
    #: clocks of the hosts sharing targets may disagree by this much without a wrong verdict or a second backup
    skew_tolerance_s: float = 300.0
    #: when set, the status page and /api/v1 ask for it (bearer token or basic auth password); /health stays open
    status_token: str | None = field(default=None, repr=False)


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
class WalSettings:
    """Point-in-time recovery (WAL_ARCHIVE): the WAL stream, its spool, base backups and their limits."""

    enabled: bool = False
    base_schedule: str = "0 1 * * 0"
    spool: Path = Path("wal-spool")
    slot: str = "backup_sidecar"
    partial_interval_s: float = 60.0  # the stated recovery-point bound: the partial segment ships this often
    warn_age_s: float = 300.0
    crit_age_s: float = 900.0
    slot_warn_bytes: int = 1024**3
    slot_crit_bytes: int = 4 * 1024**3


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
    drill: DrillSettings = DrillSettings(None, None)
    sqlite: SqliteSettings | None = None
    #: one line per variable that looks like a setting but is not one (typos): logged at start, never fatal
    warnings: tuple[str, ...] = ()
    wal: WalSettings = field(default_factory=WalSettings)
    encryption: EncryptionSettings = field(default_factory=EncryptionSettings)

    @property
    def target_names(self) -> list[str]:
        """The configured targets by name (``nas``, ``s3``), in the order runs write them."""
        return target_names(self.nas, self.s3)

    def secrets(self) -> list[str]:
        """Every secret value in force, for masking; longest first so overlapping values mask fully."""
        values = [
            self.db.password,
            self.drill.server.password if self.drill.server else "",
            self.s3.secret_key if self.s3 else "",
            self.notify.smtp_password or "",
            self.notify.webhook_url or "",
            self.notify.ping_url or "",
            self.health.status_token or "",
        ]
        return sorted({v for v in values if v and len(v) >= 3}, key=len, reverse=True)


class _Reader:
    """Reads typed values from the environment and collects problems instead of raising on the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.used: set[str] = set()

    def raw(self, name: str) -> str | None:
        self.used.add(name)
        value = self.env.get(name)
        if name in FILE_VARS:
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

    def size(self, name: str, default: str) -> int:
        value = self.str(name, default) or default
        try:
            return parse_size(value)
        except ValueError as exc:
            self.problems.append(f"{name}: {exc}")
            return parse_size(default)

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
    file_problems = _read_env_file(env, env_file, default=".env" if environ is None else None)
    r = _Reader(env)
    r.problems.extend(file_problems)
    hostname = r.str("BACKUP_HOSTNAME") or socket.gethostname()

    sqlite = _sqlite(r)
    db = _server(r, sqlite is not None)
    dump = _dump(r)
    sync_spec = r.str("SYNC_SCHEDULE", "every 1h") or "every 1h"
    schedule = ScheduleSettings(
        spec=r.str("BACKUP_SCHEDULE", "03:00") or "03:00",
        tz=r.str("TZ", "UTC") or "UTC",
        on_start=r.bool("BACKUP_ON_START", False),
        sync_spec=None if sync_spec.lower() == "off" else sync_spec,
    )
    _check_schedule(r, schedule)
    s3 = _s3(r)
    nas_path = r.str("NAS_PATH")
    defaulted = nas_path is None and s3 is None
    if defaulted:
        nas_path = "./backups"
    require_mount = r.bool("NAS_REQUIRE_MOUNT", True)
    group_readable = r.bool("NAS_GROUP_READABLE", False)
    nas = None if not nas_path else NasSettings(
        Path(nas_path).absolute(), create_missing=defaulted, require_mount=require_mount and not defaulted,
        group_readable=group_readable)
    dump = _ok_policy(r, dump, nas, s3)
    files = _files(r)
    sqlite_names = [n for n, _ in sqlite.files] if sqlite else []
    if files is not None and (files.name in db.databases or files.name == "_globals" or files.name in sqlite_names
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
    if s3 is not None and s3.object_lock:
        period = r._typed("S3_OBJECT_LOCK_PERIOD", retention.longest_keep_s, parse_duration,
                          "a duration (30d, 125d; default: the longest a retention rule keeps a backup)")
        s3 = replace(s3, object_lock_s=max(period, 1.0))
    health = HealthSettings(
        port=r.int("HEALTH_PORT", 8080, low=0, high=65535),
        bind=r.str("HEALTH_BIND", "0.0.0.0") or "0.0.0.0",
        warn_age_s=r.duration("HEALTH_WARN_AGE", "26h"),
        crit_age_s=r.duration("HEALTH_CRIT_AGE", "48h"),
        detail=r.choice("HEALTH_DETAIL", "full", ("full", "minimal")),
        verify_after_backup=r.bool("VERIFY_AFTER_BACKUP", False),
        size_drop_warn=r._typed("BACKUP_SIZE_DROP_WARN", 0.5, _fraction,
                                "a fraction from 0 to 1 (0.5: half the previous size; 0: off)"),
        skew_tolerance_s=r._typed("CLOCK_SKEW_TOLERANCE", 300.0, parse_duration, "a duration (0, 30s, 5m)"),
        status_token=_status_token(r),
    )
    if health.crit_age_s <= health.warn_age_s:
        r.problems.append(
            "HEALTH_CRIT_AGE must be longer than HEALTH_WARN_AGE (hint: defaults are 26h and 48h)"
        )
    notify = _notify(r, hostname)
    drill = _drill(r, db, schedule.tz)
    log_level = (r.str("LOG_LEVEL", "INFO") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        r.problems.append(f"LOG_LEVEL={log_level!r} is not DEBUG, INFO, WARNING or ERROR (hint: default is INFO)")
        log_level = "INFO"
    log_format = r.choice("LOG_FORMAT", "text", ("text", "json"))
    for name in sqlite_names:
        if name in db.databases:
            r.problems.append(f"SQLITE_PATHS: {name!r} is also the name of a server database to back up "
                              f"(hint: give the file a name of its own: SQLITE_PATHS=NAME=/path/to/{name}.sqlite)")
    wal = _wal(r)
    if wal.enabled and db.engine != "postgresql":
        r.problems.append(f"WAL_ARCHIVE=true needs a PostgreSQL server, and this sidecar's is {db.engine} "
                          "(hint: point-in-time recovery is PostgreSQL only; set WAL_ARCHIVE=false)")
    encryption = _encryption(r, nas, s3)
    if encryption.on and wal.enabled:
        r.problems.append("WAL_ARCHIVE=true with BACKUP_ENCRYPT_RECIPIENTS: the WAL archive and base backups are "
                          "not encrypted yet (hint: encrypt the dumps and leave WAL_ARCHIVE off, or the other way "
                          "round)")
    if files is not None and files.name == "_base":
        r.problems.append("FILES_NAME='_base' is the name of the base backups (hint: e.g. FILES_NAME=files)")
    if r.problems:
        raise ConfigError(r.problems)
    return Settings(
        db=db, dump=dump, schedule=schedule, s3=s3, nas=nas, files=files, lock=lock, retention=retention,
        health=health, notify=notify, log_level=log_level, log_format=log_format, hostname=hostname, drill=drill,
        sqlite=sqlite, warnings=tuple([*r.warnings, *_unknown_settings(env)]),
        wal=wal, encryption=encryption,
    )


def target_names(nas: NasSettings | None, s3: S3Settings | None) -> list[str]:
    """The names of the targets configured (the names settings such as BACKUP_OK_POLICY take)."""
    return [n for n, on in (("nas", nas), ("s3", s3)) if on is not None]


def _encryption(r: _Reader, nas: NasSettings | None, s3: S3Settings | None) -> EncryptionSettings:
    """BACKUP_ENCRYPT_RECIPIENTS (or _FILE, an age recipients file), BACKUP_ENCRYPT_TARGETS and AGE_IDENTITY_FILE."""
    name = "BACKUP_ENCRYPT_RECIPIENTS"
    where = f"{name}_FILE" if r.env.get(f"{name}_FILE") else name
    recipients, problems = parse_recipients(r.raw("BACKUP_ENCRYPT_RECIPIENTS") or "", where)
    r.problems.extend(problems)
    identity = r.str("AGE_IDENTITY_FILE")
    configured = target_names(nas, s3)
    names = [n.lower() for n in r.list("BACKUP_ENCRYPT_TARGETS", "all")] or ["all"]
    targets: tuple[str, ...] | None = None
    if "all" in names and len(names) > 1:
        r.problems.append(f"BACKUP_ENCRYPT_TARGETS={','.join(names)}: `all` stands alone (hint: all, or a comma "
                          f"list of {', '.join(configured) or 'configured targets'})")
    elif names != ["all"]:
        wrong = [n for n in names if n not in configured]
        if wrong:
            r.problems.append(
                f"BACKUP_ENCRYPT_TARGETS={','.join(names)}: {', '.join(wrong)} is not a configured target "
                f"(hint: all, or a comma list of {', '.join(configured) or 'configured targets'}, e.g. s3 to "
                "encrypt the off-site copy only)")
        elif not recipients and not problems:
            r.problems.append(f"BACKUP_ENCRYPT_TARGETS={','.join(names)} without BACKUP_ENCRYPT_RECIPIENTS: "
                              "nothing would be encrypted (hint: set the recipients' age public keys too)")
        targets = tuple(dict.fromkeys(names))
    return EncryptionSettings(tuple(dict.fromkeys(recipients)), Path(identity).absolute() if identity else None,
                              targets)


#: A token that guards the status page over the network must not be guessable by trying.
MIN_TOKEN_LEN = 16


def _status_token(r: _Reader) -> str | None:
    token = r.raw("STATUS_TOKEN")
    if token is None:
        return None
    if any(not 33 <= ord(c) < 127 for c in token):  # what an Authorization header carries unchanged
        r.problems.append("STATUS_TOKEN may hold only printable ASCII without spaces (hint: e.g. the output of "
                          "`openssl rand -hex 32`; a STATUS_TOKEN_FILE may end with one newline)")
        return None
    if len(token) < MIN_TOKEN_LEN:
        r.problems.append(f"STATUS_TOKEN is {len(token)} characters long, shorter than {MIN_TOKEN_LEN} (hint: use a "
                          "random one, e.g. `openssl rand -hex 32`)")
        return None
    return token


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(text)
    return value


def environment(env_file: str | None = None) -> tuple[dict[str, str], list[str]]:
    """The process environment filled from the env file exactly as load_settings reads it, and the problems
    reading that file (for `health`, which needs HEALTH_URL/HEALTH_PORT but not the rest of the settings)."""
    env = dict(os.environ)
    return env, _read_env_file(env, env_file, default=".env")


def _read_env_file(env: dict[str, str], named: str | None, default: str | None) -> list[str]:
    """Fill unset variables of ``env`` from the env file; problems when a file that was asked for cannot be read.

    A file named by --env-file or ENV_FILE must exist: silently running on defaults instead would back up
    whatever answers on localhost into ./backups. The default ./.env may be absent, but not unreadable.
    """
    path = named or env.get("ENV_FILE") or default
    if not path:
        return []
    source = "--env-file" if named else ("ENV_FILE" if env.get("ENV_FILE") else "./.env")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if source == "./.env":
            return []
        return [f"{source}={path}: no such file (hint: check the path; it is read from "
                f"{Path.cwd()} when relative)"]
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return [f"{source}={path}: cannot read it: {reason} (hint: check the file's permissions; it holds "
                "the settings and must be readable by the sidecar's user)"]
    import io

    from dotenv import dotenv_values

    for key, value in dotenv_values(stream=io.StringIO(text)).items():
        if value is not None:
            env.setdefault(key, value)
    return []


#: Names other tools use for a setting of ours: set one of them, and it is ignored, so say which name we read.
_FAMILIAR_NAMES = {
    "PGHOST": "POSTGRES_HOST", "PGPORT": "POSTGRES_PORT", "PGUSER": "POSTGRES_USER", "PGPASSWORD": "POSTGRES_PASSWORD",
    "PGDATABASE": "POSTGRES_DB", "PGCONNECT_TIMEOUT": "POSTGRES_CONNECT_TIMEOUT",
    "AWS_ACCESS_KEY_ID": "S3_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "S3_SECRET_ACCESS_KEY",
    "AWS_REGION": "S3_REGION", "AWS_DEFAULT_REGION": "S3_REGION", "AWS_ENDPOINT_URL": "S3_ENDPOINT",
    "AWS_ENDPOINT_URL_S3": "S3_ENDPOINT", "MINIO_ENDPOINT": "S3_ENDPOINT", "MINIO_BUCKET": "S3_BUCKET",
    "SCHEDULE": "BACKUP_SCHEDULE", "CRON_SCHEDULE": "BACKUP_SCHEDULE", "BACKUP_CRON": "BACKUP_SCHEDULE",
    "HEALTHCHECK_PORT": "HEALTH_PORT", "HEALTHCHECK_URL": "PING_URL", "SLACK_WEBHOOK_URL": "WEBHOOK_URL",
}
#: Prefixes other tools use for settings we also have (PG_PASSWORD for POSTGRES_PASSWORD, MYSQL_PASS for ...).
_FAMILIAR_PREFIXES = {"PG_": "POSTGRES_", "PGSQL_": "POSTGRES_", "POSTGRESQL_": "POSTGRES_", "MYSQL_": "MYSQL_",
                      "MARIADB_": "MARIADB_", "MINIO_": "S3_", "AWS_": "S3_"}
#: Variables of the images that usually share the sidecar's .env (database, MinIO, the image build): not typos.
_NEIGHBOUR_VARS = frozenset({
    "POSTGRES_INITDB_ARGS", "POSTGRES_INITDB_WALDIR", "POSTGRES_HOST_AUTH_METHOD", "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD", "MYSQL_ROOT_PASSWORD", "MYSQL_ALLOW_EMPTY_PASSWORD", "MYSQL_RANDOM_ROOT_PASSWORD",
    "MARIADB_ROOT_PASSWORD", "MARIADB_ALLOW_EMPTY_ROOT_PASSWORD", "MARIADB_RANDOM_ROOT_PASSWORD",
    "PG_CLIENT_SOURCE", "PG_MAJOR", "BASE_IMAGE",
})


def _squash(name: str) -> str:
    return name.replace("_", "")


def _likely(name: str) -> str | None:
    """The setting ``name`` most likely means: the only one it begins (SMTP_PASS), else the closest spelling."""
    import difflib

    starts = [known for known in KNOWN_SETTINGS if known.startswith(name) and not known.endswith("_FILE")]
    if len(starts) == 1:
        return starts[0]
    close = difflib.get_close_matches(name, KNOWN_SETTINGS, n=1, cutoff=0.75)
    return close[0] if close else None


def _unknown_settings(env: Mapping[str, str]) -> list[str]:
    """Names that look like ours but are not settings, with the likely one: a typo is ignored loudly.

    Three kinds: a name with one of our prefixes that is not a setting (POSTGRES_HOSTT); a setting spelt
    without its underscores (HEALTHPORT); and the names other tools use for our settings (PGPASSWORD,
    PG_PASSWORD, AWS_ACCESS_KEY_ID, MYSQL_PASS), reported only when our own name is unset, since a shell
    may carry PGPASSWORD for psql beside a sidecar configured the sidecar's way.
    """
    squashed = {_squash(known): known for known in KNOWN_SETTINGS}
    out = []
    for name in sorted(env):
        if name in KNOWN_SETTINGS or name in _NEIGHBOUR_VARS or not env[name]:
            continue
        meant = _FAMILIAR_NAMES.get(name) or squashed.get(_squash(name))
        if meant is None:
            for theirs, ours in _FAMILIAR_PREFIXES.items():
                if name.startswith(theirs):
                    meant = _likely(ours + name[len(theirs):])
                    break
        if meant is not None:
            if not env.get(meant) and not env.get(f"{meant}_FILE"):
                out.append(f"{name} is not read by backup-sidecar and is ignored (hint: did you mean {meant}?)")
        elif name.startswith(_OWN_PREFIXES):
            close = _likely(name)
            hint = f"did you mean {close}?" if close else "see .env.example for every setting"
            out.append(f"{name} is not a setting backup-sidecar knows and is ignored (hint: {hint})")
    return out


def _from_url(r: _Reader, url_var: str, host: str, port: int,
              user: str) -> tuple[str, int, str, str, str, dict[str, str]]:
    """host, port, user, password, dbname and the other libpq variables of a postgresql:// URL."""
    libpq: dict[str, str] = {}
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
    return host, port, user, password, dbname, libpq


def _drill(r: _Reader, db: DatabaseSettings, tz: str) -> DrillSettings:
    """DRILL_SCHEDULE (off when unset) and the drill server, DRILL_DATABASE_URL (default: the source server),
    which must be a server of the source's engine."""
    spec = r.str("DRILL_SCHEDULE")
    if spec:
        from app.schedule_spec import parse_schedule

        try:
            parse_schedule(spec, tz)
        except ValueError as exc:
            r.problems.append(str(exc).replace("BACKUP_SCHEDULE", "DRILL_SCHEDULE", 1))
    server = None
    url = r.raw("DRILL_DATABASE_URL")
    if url:
        engine = _url_engine(url)
        if engine not in ("postgresql", "mariadb") or (db.engine != "none" and engine != db.engine):
            r.problems.append(f"DRILL_DATABASE_URL is not a {db.engine} URL like the source's "
                              "(hint: the drill server must run the engine the backups come from)")
        elif engine == "mariadb":
            host, port, user, password, _ = _from_mysql_url(r, "DRILL_DATABASE_URL", db.host, db.port, db.user)
            server = DatabaseSettings(host=host, port=port, user=user, password=password, databases=(), exclude=(),
                                      libpq_env=(), extra_dump_opts=(), connect_timeout=db.connect_timeout,
                                      source="DRILL_DATABASE_URL", engine="mariadb")
        else:
            host, port, user, password, _, libpq = _from_url(r, "DRILL_DATABASE_URL", db.host, db.port, db.user)
            server = DatabaseSettings(host=host, port=port, user=user, password=password, databases=(), exclude=(),
                                      libpq_env=tuple(sorted(libpq.items())), extra_dump_opts=(),
                                      connect_timeout=db.connect_timeout, source="DRILL_DATABASE_URL")
    return DrillSettings(schedule=spec or None, server=server)


#: The connection settings that select each server engine when no database URL is set.
_PG_VARS = ("POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD")
_MYSQL_FIELDS = ("HOST", "PORT", "DATABASE", "USER", "PASSWORD")
_URL_SCHEMES = {"postgresql": "postgresql", "postgres": "postgresql", "mysql": "mariadb", "mariadb": "mariadb"}


def _url_engine(url: str) -> str | None:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return _URL_SCHEMES.get(scheme.split("+", 1)[0])


def _is_set(r: _Reader, name: str) -> bool:
    return bool(r.env.get(name, "").strip()) or bool(name in FILE_VARS and r.env.get(f"{name}_FILE", "").strip())


def _server(r: _Reader, has_sqlite: bool) -> DatabaseSettings:
    """The one server this sidecar backs up, and its engine.

    A database URL decides by its scheme (BACKUP_DATABASE_URL > DATABASE_URL); without one the variables
    do: MYSQL_*/MARIADB_* (the official images' names) select MariaDB, POSTGRES_* PostgreSQL, and both at
    once are refused, since a sidecar backs up one server. With none of them, PostgreSQL on localhost, unless
    SQLITE_PATHS is set: then there is no server at all (SQLite files are files, not a server, so they may sit
    beside either engine)."""
    url_var = next((v for v in ("BACKUP_DATABASE_URL", "DATABASE_URL") if r.raw(v)), None)
    mysql_set = [f"{p}{f}" for f in _MYSQL_FIELDS for p in ("MYSQL_", "MARIADB_") if _is_set(r, f"{p}{f}")]
    pg_set = [v for v in _PG_VARS if _is_set(r, v)]
    if url_var:
        engine = _url_engine(r.raw(url_var) or "")
        if engine is None:
            r.problems.append(f"{url_var} has a scheme the sidecar does not back up (hint: postgresql://, "
                              "mysql:// or mariadb://USER:PASSWORD@HOST:PORT/DBNAME)")
            engine = "postgresql"
        ignored = pg_set if engine == "mariadb" else mysql_set
        if ignored:
            r.warnings.append(f"{', '.join(ignored)} ignored: {url_var} names a {engine} server and a sidecar "
                              f"backs up one server (hint: unset them, or run a second sidecar for the other one)")
    elif mysql_set and pg_set:
        r.problems.append(f"both MySQL/MariaDB ({', '.join(mysql_set)}) and PostgreSQL ({', '.join(pg_set)}) "
                          "connection settings are set, and a sidecar backs up one server (hint: keep one set, and "
                          "run a second sidecar for the other server)")
        engine = "postgresql"
    elif mysql_set:
        engine = "mariadb"
    elif not pg_set and has_sqlite:
        engine = "none"
    else:
        engine = "postgresql"
    if engine == "mariadb":
        return _mysql(r, url_var)
    if engine == "none":
        return DatabaseSettings(host="", port=0, user="", password="", databases=(), exclude=(), libpq_env=(),
                                extra_dump_opts=(), connect_timeout=10, source="SQLITE_PATHS", engine="none")
    return _database(r)


def _twin(r: _Reader, field_: str, mariadb: str | None, mysql: str | None) -> tuple[str, str | None]:
    """MARIADB_X or MYSQL_X (the mariadb image reads MARIADB_X first, falling back on MYSQL_X: so do we); the
    name that was read and its value. Both set to different values is logged, never silently merged."""
    if mariadb is not None and mysql is not None and mariadb != mysql:
        r.warnings.append(f"MARIADB_{field_} and MYSQL_{field_} differ: MARIADB_{field_} is used, like the "
                          "mariadb image does (hint: keep only one of them)")
    if mariadb is not None:
        return f"MARIADB_{field_}", mariadb
    return f"MYSQL_{field_}", mysql


def _from_mysql_url(r: _Reader, url_var: str, host: str, port: int, user: str) -> tuple[str, int, str, str, str]:
    """host, port, user, password and database of a mysql:// or mariadb:// URL (percent-encoded parts)."""
    from urllib.parse import parse_qsl, unquote

    parts = urlsplit(r.raw(url_var) or "")
    try:
        port = parts.port or 3306
    except ValueError:
        r.problems.append(f"{url_var}: the port is not a number (hint: mysql://USER:PASSWORD@HOST:3306/DB)")
    for key, _ in parse_qsl(parts.query):
        if key != "charset":  # Laravel's ?charset=utf8mb4: the dump is utf8mb4 (binary-safe) anyway
            r.problems.append(f"{url_var}: connection parameter {key!r} is not supported (hint: only charset is "
                              "accepted, and ignored: dumps are always utf8mb4)")
    return (parts.hostname or host, port, unquote(parts.username or "") or user, unquote(parts.password or ""),
            unquote(parts.path.lstrip("/")))


def _mysql(r: _Reader, url_var: str | None) -> DatabaseSettings:
    """MariaDB/MySQL from a mysql:// URL or the MYSQL_*/MARIADB_* variables; MYSQL_DATABASE (a list, or *)
    overrides the URL's database and MYSQL_PASSWORD fills a URL without one, as POSTGRES_* do for PostgreSQL."""
    host, port, user, password, dbs = "localhost", 3306, "root", "", ()
    source = "MYSQL_*"
    db_var, db_value = _twin(r, "DATABASE", r.raw("MARIADB_DATABASE"), r.raw("MYSQL_DATABASE"))
    _, pw_value = _twin(r, "PASSWORD", r.raw("MARIADB_PASSWORD"), r.raw("MYSQL_PASSWORD"))
    if url_var:
        source = url_var
        host, port, user, password, dbname = _from_mysql_url(r, url_var, host, port, user)
        dbs = (dbname,) if dbname else ()
        password = password or pw_value or ""
    else:
        host = _twin(r, "HOST", r.raw("MARIADB_HOST"), r.raw("MYSQL_HOST"))[1] or host
        port_var, port_text = _twin(r, "PORT", r.raw("MARIADB_PORT"), r.raw("MYSQL_PORT"))
        if port_text is not None:
            try:
                port = int(port_text)
                if not 1 <= port <= 65535:
                    raise ValueError(port_text)
            except ValueError:
                r.problems.append(f"{port_var}={port_text!r} is not a port (hint: a whole number, default 3306)")
                port = 3306
        user = _twin(r, "USER", r.raw("MARIADB_USER"), r.raw("MYSQL_USER"))[1] or user
        password = pw_value or ""
    if db_value:
        dbs = tuple(item.strip() for item in db_value.split(",") if item.strip())
    if not dbs:
        r.problems.append("no MySQL/MariaDB database to back up (hint: set MYSQL_DATABASE to a name, a comma list, "
                          "or * for every database, or put the database in the URL: mysql://USER@HOST/DB)")
    from app.databases import name_problem

    for name in dbs:
        problem = None if name == "*" else name_problem(name)
        if problem:
            r.problems.append(f"{db_var}: {problem}")
    timeout_var, timeout_text = _twin(r, "CONNECT_TIMEOUT", r.raw("MARIADB_CONNECT_TIMEOUT"),
                                      r.raw("MYSQL_CONNECT_TIMEOUT"))
    timeout = 10
    if timeout_text is not None:
        try:
            timeout = int(timeout_text)
            if not 1 <= timeout <= 600:
                raise ValueError(timeout_text)
        except ValueError:
            r.problems.append(f"{timeout_var}={timeout_text!r} is not a number of seconds (hint: 1 to 600, default 10)")
            timeout = 10
    return DatabaseSettings(host=host, port=port, user=user, password=password, databases=dbs, exclude=(),
                            libpq_env=(), extra_dump_opts=(), connect_timeout=timeout, source=source,
                            engine="mariadb", lock_all_tables=r.bool("MYSQLDUMP_LOCK_ALL_TABLES", False))


def _sqlite(r: _Reader) -> SqliteSettings | None:
    """SQLITE_PATHS: absolute paths of SQLite files, each ``PATH`` (named after the file's stem) or ``NAME=PATH``."""
    from app.databases import name_problem

    files: list[tuple[str, Path]] = []
    for item in r.list("SQLITE_PATHS"):
        name, sep, path_text = item.partition("=")
        if not sep:
            name, path_text = "", item
        path = Path(path_text.strip())
        name = name.strip() or path.stem
        if not path.is_absolute():
            r.problems.append(f"SQLITE_PATHS: {path_text!r} is not an absolute path (hint: the file's path inside "
                              "the container, e.g. /var/www/database/database.sqlite)")
            continue
        problem = name_problem(name)
        if problem:
            r.problems.append(f"SQLITE_PATHS: {problem.replace('POSTGRES_DB_EXCLUDE', 'NAME=PATH')}")
        elif name in [n for n, _ in files]:
            r.problems.append(f"SQLITE_PATHS: two files are named {name!r} (hint: name them apart: "
                              f"SQLITE_PATHS=app={path},other=/other/{path.name})")
        else:
            files.append((name, path))
    return SqliteSettings(tuple(files)) if files else None


def _database(r: _Reader) -> DatabaseSettings:
    """PostgreSQL from a postgresql:// URL or the POSTGRES_* variables."""
    url_var = next((v for v in ("BACKUP_DATABASE_URL", "DATABASE_URL") if r.raw(v)), None)
    libpq: dict[str, str] = {}
    host, port, user, password, dbs = "localhost", 5432, "postgres", "", ()
    source = "POSTGRES_*"
    if url_var:
        source = url_var
        host, port, user, password, dbname, libpq = _from_url(r, url_var, host, port, user)
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
    from app.databases import name_problem

    for name in dbs:
        problem = None if name == "*" else name_problem(name)
        if problem:
            r.problems.append(f"POSTGRES_DB: {problem}")
    extra = r.str("PGDUMP_EXTRA_OPTS", "") or ""
    try:
        extra_opts = tuple(shlex.split(extra))
    except ValueError as exc:
        r.problems.append(f"PGDUMP_EXTRA_OPTS cannot be parsed: {exc} (hint: quote values like a shell would)")
        extra_opts = ()
    r.problems.extend(f"PGDUMP_EXTRA_OPTS: {problem}" for problem in reserved_problems(extra_opts))
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
    if schedule.sync_spec is not None:
        try:
            parse_schedule(schedule.sync_spec, schedule.tz)
        except ValueError as exc:
            r.problems.append(f"SYNC_SCHEDULE: {exc} (hint: e.g. every 1h, or off)")


def _ok_policy(r: _Reader, dump: DumpSettings, nas: NasSettings | None, s3: S3Settings | None) -> DumpSettings:
    """BACKUP_OK_POLICY: all (default) | any | a comma list of targets that must hold a copy (nas, s3)."""
    from dataclasses import replace

    names = [n.lower() for n in r.list("BACKUP_OK_POLICY", "all")] or ["all"]
    configured = target_names(nas, s3)
    if names in (["all"], ["any"]):
        return replace(dump, ok_policy=tuple(names))
    wrong = [n for n in names if n not in configured]
    if wrong:
        r.problems.append(
            f"BACKUP_OK_POLICY={','.join(names)}: {', '.join(wrong)} is not a configured target "
            f"(hint: all, any, or a comma list of {', '.join(configured) or 'configured targets'})")
        return dump
    return replace(dump, ok_policy=tuple(names))


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
    part_memory = r.size("S3_PART_MEMORY", "64MiB")
    if part_memory < 10 * 1024**2:
        r.problems.append(f"S3_PART_MEMORY={r.str('S3_PART_MEMORY')} is too small: an upload holds two parts of "
                          "at least 5 MiB (hint: 10MiB or more; default 64MiB)")
        part_memory = 64 * 1024**2
    raw_part = r.str("S3_PART_SIZE")
    part_size = None
    if raw_part:
        reported = len(r.problems)
        part_size = r.size("S3_PART_SIZE", "16MiB")
        if len(r.problems) > reported:  # unreadable: reported, and no fixed size is used
            part_size = None
    if part_size is not None and not 5 * 1024**2 <= part_size <= 5 * 1024**3:
        r.problems.append(f"S3_PART_SIZE={raw_part} is outside what S3 accepts (hint: 5MiB to 5GiB; leave it unset "
                          "to size parts from each database's size)")
        part_size = None
    elif part_size is not None and 2 * part_size > part_memory:
        r.problems.append(f"S3_PART_SIZE={raw_part} does not fit S3_PART_MEMORY (an upload holds two parts) "
                          f"(hint: set S3_PART_MEMORY={2 * part_size // 1024**2}MiB or more)")
    prefix = (r.str("S3_PREFIX", "") or "").strip("/")
    lock = r.choice("S3_OBJECT_LOCK", "off", ("off", "governance", "compliance"))
    return S3Settings(
        endpoint=endpoint,
        bucket=bucket,
        prefix=prefix,
        access_key=access,
        secret_key=secret,
        region=r.str("S3_REGION"),
        secure=secure,
        part_size=part_size,
        part_memory=part_memory,
        object_lock=None if lock == "off" else lock.upper(),
    )


def _wal(r: _Reader) -> WalSettings:
    """WAL_ARCHIVE and its companions; read (and checked) whether or not archiving is on."""
    import re

    default = WalSettings()
    base_schedule = r.str("BASE_BACKUP_SCHEDULE", default.base_schedule) or default.base_schedule
    tz = r.env.get("TZ") or "UTC"
    try:
        from app.schedule_spec import parse_schedule

        parse_schedule(base_schedule, tz)
    except ValueError as exc:
        r.problems.append(f"BASE_BACKUP_SCHEDULE: {exc}")
    slot = r.str("WAL_SLOT", default.slot) or default.slot
    if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
        r.problems.append(f"WAL_SLOT={slot!r} is not a replication slot name "
                          "(hint: lower-case letters, digits and _, at most 63 characters)")
        slot = default.slot
    wal = WalSettings(
        enabled=r.bool("WAL_ARCHIVE", False),
        base_schedule=base_schedule,
        spool=Path(r.str("WAL_SPOOL_DIR", "./wal-spool") or "./wal-spool").absolute(),
        slot=slot,
        partial_interval_s=r.duration("WAL_PARTIAL_INTERVAL", "60s"),
        warn_age_s=r.duration("WAL_WARN_AGE", "5m"),
        crit_age_s=r.duration("WAL_CRIT_AGE", "15m"),
        slot_warn_bytes=r.size("WAL_SLOT_WARN_SIZE", "1GiB"),
        slot_crit_bytes=r.size("WAL_SLOT_CRIT_SIZE", "4GiB"),
    )
    if wal.crit_age_s <= wal.warn_age_s:
        r.problems.append("WAL_CRIT_AGE must be longer than WAL_WARN_AGE (hint: defaults are 5m and 15m)")
    if wal.slot_crit_bytes <= wal.slot_warn_bytes:
        r.problems.append("WAL_SLOT_CRIT_SIZE must be larger than WAL_SLOT_WARN_SIZE (hint: defaults 1GiB, 4GiB)")
    if wal.enabled and wal.partial_interval_s >= wal.warn_age_s:
        r.problems.append("WAL_PARTIAL_INTERVAL must be shorter than WAL_WARN_AGE: the archive would always look "
                          "stale (hint: e.g. WAL_PARTIAL_INTERVAL=60s, WAL_WARN_AGE=5m)")
    return wal


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
