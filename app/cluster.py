"""`restore-cluster`: disaster recovery in one command -- a whole cluster backup (POSTGRES_DB=* and the
``_globals`` artifact) into the server POSTGRES_* points at, usually a new, empty cluster.

Globals first (roles the new cluster already has, such as its bootstrap superuser, are kept and given the
backed-up attributes), so every owner and grantee exists; then the latest backup of every database, each
created with its recorded properties, BACKUP_CONCURRENCY at a time. One line per database; any failure
makes the command exit 1, and the others still run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from app.catalog import Entry, load_catalog
from app.durations import format_size
from app.errors import SidecarError
from app.globals_dump import apply_globals
from app.logs import mask
from app.readpath import archive_chunks
from app.restore import check_source, restore, restore_lock
from app.selection import pick_source
from app.settings import Settings
from app.targets import Target, make_targets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    database: str
    backup_id: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAILED':<7} {self.database:<20} {self.backup_id}  {self.detail}"


def plan(targets: Sequence[Target], source: str | None, only: Sequence[str] | None) -> tuple[Entry | None, list[Entry]]:
    """The latest globals backup and the latest ok backup of every database (or of ``only``)."""
    chosen = [t for t in targets if source is None or t.name == source]
    catalog = load_catalog(chosen)
    if catalog.errors:
        failed = ", ".join(f"{name} ({error})" for name, error in catalog.errors.items())
        readable = [t.name for t in chosen if t.name not in catalog.errors]
        raise SidecarError(f"cannot tell which backups are the latest: {failed} could not be listed",
                           hint=(f"fix the target, or choose one with --from {readable[0]}" if readable
                                 else "fix the targets"))
    globals_entry = next((e for e in catalog.good() if e.manifest.kind == "globals"), None)
    newest: dict[str, Entry] = {}
    for e in catalog.good():
        if e.manifest.kind == "database" and e.manifest.format in ("custom", "plain"):
            newest.setdefault(e.manifest.database, e)
    if only:
        missing = [n for n in only if n not in newest]
        if missing:
            raise SidecarError(f"no ok backup of {', '.join(missing)}", hint="see `backup-sidecar list`")
        newest = {n: newest[n] for n in only}
    if not newest:
        raise SidecarError("no ok database backup to recover from", hint="see `backup-sidecar list`")
    return globals_entry, sorted(newest.values(), key=lambda e: e.manifest.database)


def restore_cluster(settings: Settings, targets: Sequence[Target], *, source: str | None = None,
                    only: Sequence[str] | None = None, clean: bool = False, with_globals: bool = True,
                    jobs: int | None = None, emit: Callable[[str], None] = print) -> list[Outcome]:
    """Globals, then every database; returns one Outcome per database (and the globals, first)."""
    globals_entry, entries = plan(targets, source, only)
    outcomes: list[Outcome] = []
    db = settings.db
    if with_globals:
        if globals_entry is None:
            emit("warning: no globals backup (BACKUP_GLOBALS was off): roles that own objects must exist already")
        else:
            t0 = time.monotonic()
            try:
                reader = pick_source(globals_entry, targets, source)
                said = apply_globals(db, archive_chunks(reader, globals_entry.manifest_on(reader.name)))
            except SidecarError as exc:
                outcome = Outcome("(globals)", globals_entry.id, False, mask(str(exc)))
                emit(outcome.line())
                return [outcome]  # without the roles every owner would be missing: stop here, loudly
            kept = sum("exists already" in line for line in said)
            outcome = Outcome("(globals)", globals_entry.id, True,
                              f"roles and tablespaces applied in {time.monotonic() - t0:.1f}s"
                              + (f" ({kept} existing role(s) kept)" if kept else ""))
            outcomes.append(outcome)
            emit(outcome.line())

    def one(entry: Entry) -> Outcome:
        name = entry.manifest.database
        try:
            result = restore(settings, targets, entry.id, name, create=True, clean=clean, yes=True, source=source,
                             progress=False, entry=entry)
        except SidecarError as exc:
            return Outcome(name, entry.id, False, mask(str(exc)))
        left = f"; left out: {'; '.join(result.dropped)}" if result.dropped else ""
        return Outcome(name, entry.id, True, f"from {result.source}: {result.tables} tables, "
                       f"{format_size(result.size_bytes)} in {result.seconds:.1f}s ({result.how}){left}")

    workers = max(1, min(jobs or settings.dump.concurrency, 8, len(entries)))
    with ThreadPoolExecutor(workers, thread_name_prefix="restore") as pool:
        for outcome in pool.map(one, entries):
            outcomes.append(outcome)
            emit(outcome.line())
    failed = sum(not o.ok for o in outcomes)
    emit(f"restore-cluster: {len(entries)} database(s) into {db.host}:{db.port}: "
         + ("all ok" if not failed else f"{failed} FAILED"))
    return outcomes


def restore_cluster_command(settings: Settings, *, source: str | None, only: Sequence[str] | None, clean: bool,
                            yes: bool, with_globals: bool, jobs: int | None,
                            confirm: Callable[[str], bool] | None = None) -> bool:
    """`backup-sidecar restore-cluster`: True when everything came back (exit 0), else False (exit 1)."""
    import sys

    from app.restore import ask_on_terminal

    if settings.db.engine != "postgresql":
        raise SidecarError("restore-cluster restores PostgreSQL clusters only",
                           hint="for MariaDB apply the users first (`zstd -dc _globals-ID.sql.zst | mariadb`), then "
                                "`restore latest --db NAME --to-db NAME --create` per database; SQLite files are "
                                "restored one by one with restore")
    targets = make_targets(settings)
    check_source(targets, source)
    with restore_lock(settings):
        if not yes:
            if not sys.stdin.isatty() and confirm is None:
                raise SidecarError("restore-cluster needs confirmation but stdin is not a terminal", hint="add --yes")
            _, entries = plan(targets, source, only)
            question = (f"Restore {len(entries)} database(s) ({', '.join(e.manifest.database for e in entries[:8])}"
                        f"{', ...' if len(entries) > 8 else ''}) and the globals into {settings.db.host}:"
                        f"{settings.db.port}? Type yes to go ahead: ")
            if not (confirm or ask_on_terminal)(question):
                raise SidecarError("restore-cluster cancelled: not confirmed", hint="answer yes, or pass --yes")
        outcomes = restore_cluster(settings, targets, source=source, only=only, clean=clean,
                                   with_globals=with_globals, jobs=jobs)
    return all(o.ok for o in outcomes)
