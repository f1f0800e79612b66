"""A backup job: every configured database and the extras (globals, files) once, as the CLI and scheduler run it.

The job holds LOCK_FILE for its whole length (never twice on one volume) and claims each artifact's slot
through the database itself (never twice across hosts); a run that finds either taken is skipped, not
failed, and says who holds it. Up to BACKUP_CONCURRENCY artifacts stream side by side; one failing does
not stop the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from app.backup import Artifact, BackupFailed, dump_artifact, run_artifact
from app.cancel import CancelToken
from app.coordination import SlotTaken, claim, slot_of
from app.databases import resolve_databases
from app.errors import SidecarError
from app.files_archive import files_artifact
from app.globals_dump import globals_artifact
from app.locks import LockBusy, run_lock
from app.logs import mask
from app.manifest import Manifest
from app.settings import Settings
from app.targets import make_targets
from app.targets.base import Target

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    manifests: list[Manifest] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why a database was not backed up (lock, slot done)
    #: one per ``skipped`` line: lock (LOCK_FILE held), claim (another host is dumping), slot (already done)
    skip_kinds: list[str] = field(default_factory=list)
    slot: str | None = None
    #: set by the runtime when the job as a whole failed before any database (lock file, listing databases)
    error: str | None = None
    #: what went wrong in PRUNE_AFTER_BACKUP (the backups themselves still count as good)
    prune_errors: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Manifest]:
        return [m for m in self.manifests if not m.ok]

    @property
    def ok(self) -> bool:
        return not self.failures and self.error is None

    def skip(self, kind: str, why: str) -> None:
        """Record a skip; the caller says it once (the CLI prints it, the runtime logs it)."""
        self.skipped.append(why)
        self.skip_kinds.append(kind)


@dataclass(frozen=True)
class _Unit:
    """One artifact of the job: its name, the database whose advisory lock claims it, how to build it."""

    name: str
    lock_db: str
    make: Callable[[], Artifact]


def backup_once(
    settings: Settings,
    databases: Sequence[str] | None = None,
    force: bool = False,
    cancel: CancelToken | None = None,
    slot: str | None = None,
) -> JobResult:
    """Back up each database (``databases``, else POSTGRES_DB) and, without ``databases``, the extras.

    ``slot`` defaults to the current minute (the `backup` command); ``force`` ignores a backup already
    made for the slot, never the locks.
    """
    cancel = cancel or CancelToken()
    result = JobResult(slot=slot or slot_of(datetime.now(UTC)))
    try:
        with run_lock(settings, "backup", cancel):
            targets = make_targets(settings)
            units = _units(settings, databases, cancel)
            outcomes: list[tuple[str, str | Manifest] | None] = [None] * len(units)

            def one(index: int) -> None:
                if not cancel.cancelled:
                    outcomes[index] = _back_up(settings, targets, units[index], result.slot, force, cancel)

            workers = min(settings.dump.concurrency, len(units))
            if workers <= 1:
                for i in range(len(units)):
                    one(i)
            else:
                with ThreadPoolExecutor(workers, thread_name_prefix="backup") as pool:
                    list(pool.map(one, range(len(units))))
            never = [u.name for u, o in zip(units, outcomes, strict=True) if o is None]
            if never:  # stopped (SIGTERM) before their turn: a job that did not do its work is not ok
                result.error = f"interrupted before {', '.join(never)} could be backed up: {cancel.reason}"
            for outcome in outcomes:  # in configuration order, whatever order they finished in
                if outcome is None:
                    continue
                kind, value = outcome
                if isinstance(value, Manifest):
                    result.manifests.append(value)
                else:
                    result.skip(kind, value)
            if settings.retention.after_backup and any(m.ok for m in result.manifests) and not cancel.cancelled:
                result.prune_errors = _prune_after_backup(settings, targets)
    except LockBusy as busy:
        result.skip("lock", str(busy))
    return result


def _prune_after_backup(settings: Settings, targets: Sequence[Target]) -> list[str]:
    """PRUNE_AFTER_BACKUP: retention under the same lock; its trouble is logged and returned for notification,
    the backup stays a success."""
    from app.retention import prune

    try:
        plan = prune(settings, targets)
    except SidecarError as exc:
        log.error("prune after backup failed: %s", exc)
        return [str(exc)]
    for error in plan.errors:
        log.warning("prune after backup: %s", error)
    return list(plan.errors)


def _units(settings: Settings, databases: Sequence[str] | None, cancel: CancelToken) -> list[_Unit]:
    names = resolve_databases(settings, list(databases) if databases else None)
    units = [_Unit(n, n, lambda n=n: dump_artifact(settings, n, cancel)) for n in names]
    if databases:  # `backup --db NAME` is about those databases only
        return units
    home = names[0] if names else "postgres"
    if settings.dump.globals:
        units.append(_Unit("_globals", home, lambda: globals_artifact(settings, cancel)))
    if settings.files is not None:
        files = settings.files
        if files.name in names:  # POSTGRES_DB=* found a database of that name: settings could not know
            raise SidecarError(f"FILES_NAME={files.name!r} is also the name of a database on the server "
                               "(hint: give the files archive a name of its own, e.g. FILES_NAME=app_files)")
        units.append(_Unit(files.name, home, lambda: files_artifact(files, cancel, settings.dump.timeout_s)))
    return units


def _back_up(
    settings: Settings, targets: Sequence[Target], unit: _Unit, slot: str | None, force: bool, cancel: CancelToken
) -> tuple[str, str | Manifest]:
    """("ok"|"failed", manifest) or (skip kind, why) for one artifact."""
    try:
        with claim(settings, targets, unit.name, slot, force, lock_db=unit.lock_db):
            manifest = run_artifact(settings, targets, unit.make(), cancel, slot)
    except SlotTaken as taken:
        return taken.kind, str(taken)
    except BackupFailed as exc:
        manifest = exc.manifest
    except Exception as exc:  # before run_artifact wrote anything (claim, ID choice): still this unit's failure
        log.exception("backup of %s failed before it started", unit.name)
        now = datetime.now(UTC).replace(microsecond=0)
        error = (mask(str(exc)).strip() or exc.__class__.__name__).splitlines()[0]
        manifest = Manifest(id=f"{unit.name}-not-started", status="failed", database=unit.name, started_at=now,
                            finished_at=now, host=settings.hostname, format="", compression="", artifact="",
                            error=error, slot=slot)
    return manifest.status, manifest
