"""Restore: stream a backup out of a target, through decompression, into pg_restore or psql.

Integrity is checked in the same single pass that restores, inside one transaction:
the SHA-256 and size of the stored bytes are compared with the manifest as they stream, and the *last* bytes
of the decompressed archive are held back until both match and the compressed stream has ended cleanly.
pg_restore (custom format) and psql (plain) therefore cannot reach their COMMIT before the whole artifact
is proven intact: a damaged or truncated artifact makes us kill the child, the server rolls the transaction
back, and the target database is exactly as it was. One pass instead of verify-then-restore keeps a restore
as fast as ``zstd -dc FILE | pg_restore`` (the benchmark in scripts/bench_restore.py).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import TextIO

import psycopg
from psycopg import sql

from app import layout, pg
from app.catalog import Entry, load_catalog
from app.compression import CorruptArchive, decompress
from app.durations import format_duration, format_size
from app.errors import SidecarError
from app.locks import LockBusy, run_lock
from app.logs import mask
from app.manifest import Manifest, utc_iso
from app.pipeline import stop_process_group
from app.settings import Settings
from app.targets import Target, make_targets

CHUNK = 1024 * 1024
log = logging.getLogger(__name__)

#: User tables that make a database "not empty" (extension-owned tables such as PostGIS's do not count).
_USER_TABLES_SQL = """
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
"""

#: What ``--clean`` runs before a plain-format dump, in the dump's own transaction: psql cannot drop the
#: objects a dump is about to create (pg_restore --clean does that for custom archives), so the database's
#: own schemas, the objects in public and large objects go first. Anything else that collides makes the
#: restore fail and roll back, leaving the database as it was.
PLAIN_CLEAN_SQL = r"""
DO $backup_sidecar_clean$
DECLARE r record;
BEGIN
  FOR r IN SELECT n.nspname FROM pg_namespace n
           WHERE n.nspname NOT IN ('public', 'information_schema') AND n.nspname NOT LIKE 'pg\_%'
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_namespace'::regclass
                             AND d.objid = n.oid AND d.deptype = 'e')
  LOOP
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', r.nspname);
  END LOOP;
  FOR r IN SELECT c.relname, CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                    WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END AS kind
           FROM pg_class c
           WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                             AND d.objid = c.oid AND d.deptype = 'e')
  LOOP
    EXECUTE format('DROP %s IF EXISTS public.%I CASCADE', r.kind, r.relname);
  END LOOP;
  FOR r IN SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args,
                  CASE p.prokind WHEN 'a' THEN 'AGGREGATE' ELSE 'ROUTINE' END AS kind
           FROM pg_proc p
           WHERE p.pronamespace = 'public'::regnamespace
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                             AND d.objid = p.oid AND d.deptype = 'e')
  LOOP
    EXECUTE format('DROP %s IF EXISTS public.%I(%s) CASCADE', r.kind, r.proname, r.args);
  END LOOP;
  FOR r IN SELECT t.typname, CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END AS kind
           FROM pg_type t
           WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('c', 'd', 'e', 'r')
             AND (t.typtype <> 'c' OR (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c')
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass
                             AND d.objid = t.oid AND d.deptype = 'e')
  LOOP
    EXECUTE format('DROP %s IF EXISTS public.%I CASCADE', r.kind, r.typname);
  END LOOP;
  PERFORM pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata;
END
$backup_sidecar_clean$;
"""


class IntegrityError(SidecarError):
    """The stored bytes are not the ones the manifest describes (size or SHA-256)."""


class ConsumerFailed(SidecarError):
    """pg_restore or psql failed; the message carries its most telling stderr line."""


class RestoreFailed(SidecarError):
    """A restore that did not complete; the message says what state the database was left in."""


# --- reading a backup ----------------------------------------------------------------------------------


class Progress:
    """Bytes, rate and ETA on stderr: rewritten in place on a terminal, a line every 10 s in a log."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total or None
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = 0
        self.started = time.monotonic()
        self._last = self.started
        self._interval = 0.5 if self.tty else 10.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._emit(final=False)

    def finish(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        text = f"{self.label}: {format_size(self.done)}"
        if self.total:
            text += f" of {format_size(self.total)} ({100 * self.done / self.total:.0f}%)"
        text += f", {format_size(rate)}/s"
        if final:
            text += f", {elapsed:.1f}s"
        elif self.total and rate > 0:
            text += f", ETA {format_duration((self.total - self.done) / rate)}"
        if self.tty:
            print(f"\r{text}\x1b[K", end="\n" if final else "", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)


def stored_chunks(target: Target, manifest: Manifest, progress: Progress | None = None) -> Iterator[bytes]:
    """The artifact's stored bytes as they stream from ``target``, checked against the manifest.

    The last chunk is yielded only after the size and SHA-256 matched, so nothing downstream ever sees the
    end of a stream whose bytes are not the ones that were backed up.
    """
    where = f"{manifest.id} on {target.name}"
    digest = hashlib.sha256()
    size = 0
    held: bytes | None = None
    with target.open(manifest.artifact) as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            if size > manifest.size_bytes:
                raise IntegrityError(
                    f"{where}: the artifact is larger than the {manifest.size_bytes} bytes its manifest records "
                    f"(hint: the copy on {target.name} was changed after the backup; use another copy or backup)"
                )
            digest.update(chunk)
            if progress is not None:
                progress.advance(len(chunk))
            if held is not None:
                yield held
            held = chunk
    if size != manifest.size_bytes:
        raise IntegrityError(
            f"{where}: the artifact ends after {size} of {manifest.size_bytes} bytes (truncated) "
            f"(hint: the copy on {target.name} is incomplete; use another copy or backup)"
        )
    if digest.hexdigest() != manifest.sha256:
        raise IntegrityError(
            f"{where}: SHA-256 mismatch: the stored bytes hash to {digest.hexdigest()[:16]}..., the manifest says "
            f"{(manifest.sha256 or '-')[:16]}... (hint: the copy on {target.name} is damaged; use another copy "
            "with --from, or another backup)"
        )
    if held is not None:
        yield held


def hold_last(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Yield every chunk but keep the latest back until the source ended without an error."""
    held: bytes | None = None
    for chunk in chunks:
        if held is not None:
            yield held
        held = chunk
    if held is not None:
        yield held


def compression_of(manifest: Manifest) -> str:
    """The manifest's compression, falling back on the key's extension for manifests that lack it."""
    if manifest.compression in ("zstd", "gzip", "none"):
        return manifest.compression
    return layout.compression_of(manifest.artifact)


def archive_chunks(target: Target, manifest: Manifest, progress: Progress | None = None) -> Iterator[bytes]:
    """The decompressed archive, whose final bytes come only once the stored bytes and the stream are whole."""
    try:
        yield from hold_last(decompress(stored_chunks(target, manifest, progress), compression_of(manifest)))
    except CorruptArchive as exc:
        raise IntegrityError(
            f"{manifest.id} on {target.name}: {exc} (hint: the copy is damaged; use another copy with --from, "
            "or another backup)"
        ) from exc


# --- feeding a consumer process -------------------------------------------------------------------------


class Feed(AbstractContextManager["Feed"]):
    """pg_restore / psql reading our stream on stdin, stderr kept (bounded, masked), killed on any failure."""

    def __init__(self, argv: list[str], env: dict[str, str], hint: str) -> None:
        self.argv = argv
        self.env = env
        self.name = os.path.basename(argv[0])
        self.hint = hint
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Feed:
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - argv built here, no shell
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env=self.env, start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise ConsumerFailed(f"{self.name} is not installed or not on PATH (hint: install postgresql-client)") \
                from exc
        self._reader = threading.Thread(target=self._read_stderr, name=f"{self.name}-stderr", daemon=True)
        self._reader.start()
        return self

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.decode("utf-8", "replace").rstrip()[:500])

    def error_line(self) -> str:
        lines = [mask(line).strip() for line in self._stderr if line.strip()]
        for line in reversed(lines):
            if "error:" in line or "ERROR:" in line or "FATAL" in line:
                return line
        return lines[-1] if lines else ""

    def _failed(self, code: int | None) -> ConsumerFailed:
        if self._reader is not None:
            self._reader.join(timeout=5)
        said = self.error_line()
        if code is not None and code < 0:
            detail = f"killed by signal {-code}" + (f"; it said: {said}" if said else "")
        elif code == 0:
            detail = "it stopped reading before the end of the archive"
        else:
            detail = said or f"exit code {code}"
        return ConsumerFailed(f"{self.name} failed: {detail} (hint: {self.hint})")

    def write(self, data: bytes) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except BrokenPipeError as exc:
            raise self._failed(self.proc.wait()) from exc

    def finish(self) -> list[str]:
        """Close stdin (the child's EOF: only now can it commit), wait, and raise unless it ended cleanly."""
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        code = self.proc.wait()
        if code != 0:
            raise self._failed(code)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return [mask(line) for line in self._stderr if line.strip()]

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_process_group(self.proc, term_grace_s=5.0)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is None:
            return
        if exc_type is not None:
            self.kill()  # before EOF: the child never commits, the server rolls its transaction back
        for stream in (self.proc.stdin, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass
        if self.proc.poll() is None:
            self.proc.wait()


def conninfo_dbname(dbname: str) -> str:
    """``dbname='...'`` for --dbname: a name with '=' or a URL prefix is then never read as a connection string."""
    escaped = dbname.replace("\\", "\\\\").replace("'", "\\'")
    return f"dbname='{escaped}'"


def consumer_argv(fmt: str, dbname: str, clean: bool) -> list[str]:
    """The command that applies an archive of ``fmt`` to ``dbname`` in one transaction, stopping at the first error."""
    target = f"--dbname={conninfo_dbname(dbname)}"
    if fmt == "custom":
        argv = ["pg_restore", "--no-password", "--single-transaction", "--exit-on-error", target]
        return argv + (["--clean", "--if-exists"] if clean else [])
    if fmt == "plain":
        # No --single-transaction: psql would COMMIT at end of input, even an input cut short because the
        # sidecar was killed. stream_into_database sends BEGIN first and COMMIT only after the checksum matched,
        # so EOF without COMMIT always rolls back.
        return ["psql", "--no-psqlrc", "--quiet", "--no-password", "--set=ON_ERROR_STOP=1", "--file=-", target]
    raise RestoreFailed(f"cannot restore a {fmt!r} archive into a database (hint: it is not a pg_dump backup)")


def stream_into_database(settings: Settings, target: Target, manifest: Manifest, dbname: str, *, clean: bool,
                         progress: Progress | None = None) -> list[str]:
    """Apply the backup to ``dbname`` in one transaction; raise (and leave the database untouched) on any fault.

    Returns the consumer's warnings (stderr lines of a successful run).
    """
    argv = consumer_argv(manifest.format, dbname, clean)
    hint = ("the restore was rolled back; the line above is PostgreSQL's reason (missing roles or extensions on "
            "this server, or max_locks_per_transaction too low for one transaction, are the usual ones)")
    plain = manifest.format == "plain"
    with Feed(argv, pg.child_env(settings.db), hint) as feed:
        if plain:
            feed.write(b"BEGIN;\n")
        if clean and plain:
            feed.write(PLAIN_CLEAN_SQL.encode())
        for chunk in archive_chunks(target, manifest, progress):
            feed.write(chunk)
        if plain:
            feed.write(b"\nCOMMIT;\n")
        return feed.finish()


# --- choosing a backup and a database -------------------------------------------------------------------


def resolve_entry(targets: Sequence[Target], ref: str, database: str | None) -> Entry:
    """The backup ``ref`` names (an ID, or ``latest`` of one database), or SidecarError saying why there is none."""
    if ref != "latest":
        try:
            name, _ = layout.parse_id(ref)
        except ValueError as exc:
            raise SidecarError(str(exc)) from exc
        database = name  # an ID names its database; --db only narrows `latest`
    catalog = load_catalog(targets, database)
    for name, error in catalog.errors.items():
        log.warning("cannot read %s: %s", name, error)
    if ref == "latest":
        good = [e for e in catalog.good(database) if e.manifest.kind == "database"]
        names = sorted({e.manifest.database for e in good})
        if len(names) > 1:
            raise SidecarError(f"`latest` is ambiguous: there are backups of {', '.join(names)} "
                               "(hint: name the database with --db NAME, or give a backup ID)")
        if not good:
            which = f" of {database}" if database else ""
            raise SidecarError(f"no ok backup{which} found on {_names(targets)} "
                               "(hint: see `backup-sidecar list`; run `backup-sidecar backup` first)")
        return good[0]
    entry = catalog.find(ref)
    if entry is None:
        stray = [f"{t}:{o.key}" for t, objs in catalog.orphans.items() for o in objs
                 if o.key.rsplit("/", 1)[-1].split(".", 1)[0] == ref]
        if stray:
            raise SidecarError(f"{ref} has no manifest, only an artifact ({', '.join(stray)}): it is not a "
                               "complete backup (hint: its run was interrupted; pick another with `list`)")
        raise SidecarError(f"no backup {ref} on {_names(targets)} (hint: see `backup-sidecar list`)")
    if not entry.manifest.ok:
        raise SidecarError(f"backup {ref} failed and cannot be used: {entry.manifest.error or 'no reason recorded'} "
                           "(hint: pick an ok backup from `backup-sidecar list`)")
    if not entry.good:
        raise SidecarError(f"backup {ref}: its artifact is missing or has the wrong size on every target "
                           "(hint: the backup is lost; pick another from `backup-sidecar list`)")
    return entry


def _names(targets: Sequence[Target]) -> str:
    return ", ".join(t.describe() for t in targets) or "no target"


def pick_source(entry: Entry, targets: Sequence[Target], source: str | None) -> Target:
    """The target to read from: ``source`` when given, else the first (NAS before S3) holding a whole copy."""
    holding = entry.good_targets(targets)
    if source is None:
        return holding[0]
    chosen = [t for t in holding if t.name == source]
    if not chosen:
        where = ", ".join(t.name for t in holding)
        raise SidecarError(f"backup {entry.id} has no intact copy on {source}, only on {where} "
                           f"(hint: drop --from, or use --from {holding[0].name})")
    return chosen[0]


def maintenance_connection(settings: Settings) -> psycopg.Connection:
    """A connection for CREATE/DROP DATABASE: to ``postgres``, or ``template1`` where that was dropped."""
    try:
        return pg.connect(settings.db, "postgres")
    except pg.PgError as exc:
        if "does not exist" not in str(exc):
            raise
        return pg.connect(settings.db, "template1")


def database_exists(settings: Settings, dbname: str) -> bool:
    with maintenance_connection(settings) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone() is not None


def user_table_count(settings: Settings, dbname: str) -> int:
    with pg.connect(settings.db, dbname) as conn:
        row = conn.execute(_USER_TABLES_SQL).fetchone()
        return int(row[0]) if row else 0


def create_database(settings: Settings, dbname: str) -> None:
    """CREATE DATABASE from template0, as pg_restore's documentation asks, so template1 additions cannot collide."""
    try:
        with maintenance_connection(settings) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname)))
    except psycopg.Error as exc:
        raise SidecarError(f"cannot create database {dbname}: {str(exc).strip().splitlines()[0]} "
                           "(hint: the POSTGRES_USER role needs CREATEDB)") from exc


def drop_database(settings: Settings, dbname: str) -> None:
    try:
        with maintenance_connection(settings) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
    except psycopg.Error as exc:
        raise SidecarError(f"cannot drop database {dbname}: {str(exc).strip().splitlines()[0]} "
                           "(hint: drop it by hand)") from exc


# --- the command -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    source: str
    database: str
    size_bytes: int
    seconds: float
    created: bool
    tables: int


def ask_on_terminal(question: str) -> bool:
    """Ask on the terminal; only an explicit ``yes`` goes ahead."""
    print(question, end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except (OSError, KeyboardInterrupt):
        return False
    return answer.strip().lower() == "yes"


def restore(settings: Settings, targets: Sequence[Target], ref: str, to_db: str, *, database: str | None = None,
            create: bool = False, clean: bool = False, yes: bool = False, source: str | None = None,
            confirm: Callable[[str], bool] | None = None, progress: bool = True) -> RestoreResult:
    """Restore ``ref`` into ``to_db``; the database is either fully restored or left as it was (or dropped, if
    this call created it), and every other outcome raises with what happened."""
    entry = resolve_entry(targets, ref, database)
    manifest = entry.manifest
    if manifest.kind != "database" or manifest.format not in ("custom", "plain"):
        raise SidecarError(f"{entry.id} is a {manifest.kind} archive, not a database dump (hint: unpack it by hand, "
                           f"e.g. `zstd -dc FILE | tar -x` or `zstd -dc FILE | psql -d postgres`)")
    target = pick_source(entry, targets, source)
    exists = database_exists(settings, to_db)
    where = f"{settings.db.host}:{settings.db.port}/{to_db}"
    tables = 0
    if not exists and not create:
        raise SidecarError(f"database {to_db} does not exist on {settings.db.host}:{settings.db.port} "
                           "(hint: add --create to create it)")
    if exists:
        tables = user_table_count(settings, to_db)
        if tables and not clean:
            raise SidecarError(f"database {where} is not empty ({tables} tables) (hint: restore into a new database "
                               "with --create, or add --clean to drop and replace the backup's objects)")
    if not yes:
        if not sys.stdin.isatty() and confirm is None:
            raise SidecarError("restore needs confirmation but stdin is not a terminal (hint: add --yes)")
        what = f"replacing objects among its {tables} tables" if tables else ("creating it" if not exists else "")
        question = (f"Restore {entry.id} ({format_size(manifest.size_bytes)}, finished "
                    f"{utc_iso(manifest.finished_at) or '?'}) from {target.name} into {where}"
                    f"{', ' + what if what else ''}? Type yes to go ahead: ")
        if not (confirm or ask_on_terminal)(question):
            raise SidecarError("restore cancelled: not confirmed (hint: answer yes, or pass --yes)")
    created = False
    if not exists:
        create_database(settings, to_db)
        created = True
    log.info("restore %s from %s into %s started", entry.id, target.describe(), where)
    meter = Progress(f"restore {entry.id}", manifest.size_bytes) if progress else None
    t0 = time.monotonic()
    try:
        warnings = stream_into_database(settings, target, manifest, to_db, clean=clean, progress=meter)
    except BaseException as exc:
        state = _cleanup_after_failure(settings, to_db, created)
        reason = mask(str(exc)).splitlines()[0] if str(exc) else exc.__class__.__name__
        if isinstance(exc, Exception):
            raise RestoreFailed(f"restore of {entry.id} into {to_db} failed, {state}: {reason}") from exc
        log.error("restore of %s into %s interrupted, %s", entry.id, to_db, state)
        raise
    seconds = time.monotonic() - t0
    if meter is not None:
        meter.finish()
    for line in warnings:
        log.warning("%s", line)
    return RestoreResult(entry.id, target.name, to_db, manifest.size_bytes, seconds, created,
                         user_table_count(settings, to_db))


def _cleanup_after_failure(settings: Settings, dbname: str, created: bool) -> str:
    """Undo what the restore itself did; return the state the database is in, for the error line."""
    if not created:
        return "the transaction was rolled back and the database is as it was"
    try:
        drop_database(settings, dbname)
    except SidecarError as exc:
        log.error("%s", exc)
        return f"and the database created for it could NOT be dropped ({exc})"
    return "the database created for it was dropped"


def restore_command(settings: Settings, ref: str, to_db: str, *, database: str | None, create: bool, clean: bool,
                    yes: bool, source: str | None) -> None:
    """`backup-sidecar restore`: under the run lock, so prune cannot delete the backup while it streams."""
    all_targets = make_targets(settings)
    if source is not None and source not in {t.name for t in all_targets}:
        var = "S3_BUCKET" if source == "s3" else "NAS_PATH"
        raise SidecarError(f"--from {source}: that target is not configured (hint: set {var})")
    configured = [d for d in settings.db.databases if d != "*"]
    if database is None and ref == "latest" and len(configured) == 1:
        database = configured[0]  # `latest` of the one database this sidecar backs up
    with _restore_lock(settings):
        result = restore(settings, all_targets, ref, to_db, database=database, create=create, clean=clean,
                         yes=yes, source=source)
    print(f"restored {result.backup_id} from {result.source} into {result.database}"
          f"{' (created)' if result.created else ''}: {result.tables} tables, {format_size(result.size_bytes)} "
          f"in {result.seconds:.1f}s")


@contextmanager
def _restore_lock(settings: Settings) -> Iterator[None]:
    """The run lock; a restore that finds it taken fails (exit 1) instead of skipping like a scheduled run."""
    try:
        with run_lock(settings, "restore"):
            yield
    except LockBusy as exc:
        who = exc.holder.describe() if exc.holder else "another process"
        raise SidecarError(f"cannot restore now: {who} holds the lock "
                           "(hint: wait until it finishes, or set LOCK_TIMEOUT to wait for it)") from exc
