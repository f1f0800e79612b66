"""A backup job: every configured database and the extras (globals, files) once, as the CLI and scheduler run it.

The job holds LOCK_FILE for its whole length (never twice on one volume) and claims each artifact through
the database itself (never twice across hosts); both are leases the pipeline checks while it streams and
before it publishes, so a claim lost mid-run fails the run instead of letting a second host publish the same
slot. A run that finds either taken is skipped, not failed, and says who holds it. Only scheduled runs skip
a slot already backed up; a manual `backup` always backs up. Up to BACKUP_CONCURRENCY artifacts stream side
by side; one failing does not stop the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from app.backup import Artifact, BackupFailed, run_artifact
from app.cancel import CancelToken
from app.catalog import load_catalog
from app.coordination import SlotTaken, claim
from app.engines import database_artifact, globals_artifact
from app.errors import SidecarError
from app.files_archive import files_artifact
from app.identity import ClusterId, of_manifest
from app.leases import Lease, Leases
from app.locks import LockBusy, run_lock
from app.logs import mask
from app.manifest import Manifest
from app.sanity import check_output, previous_of
from app.settings import Settings
from app.targets import make_targets
from app.targets.base import Target, TargetError
from app.units import Unit, expected_units

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    manifests: list[Manifest] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why a database was not backed up (lock, slot done)
    #: one per ``skipped`` line: lock (LOCK_FILE held), claim (another host is dumping), slot (already done)
    skip_kinds: list[str] = field(default_factory=list)
    #: the scheduled slot this job ran for; None for a manual run (which always backs up)
    slot: str | None = None
    #: set by the runtime when the job as a whole failed before any database (lock file, listing databases)
    error: str | None = None
    #: what went wrong in PRUNE_AFTER_BACKUP (the backups themselves still count as good)
    prune_errors: list[str] = field(default_factory=list)
    #: VERIFY_AFTER_BACKUP: backup ID -> (target, ok, detail) per copy read back
    verified: dict[str, list[tuple[str, bool, str]]] = field(default_factory=dict)

    @property
    def failures(self) -> list[Manifest]:
        return [m for m in self.manifests if not m.ok]

    @property
    def verify_failures(self) -> list[str]:
        return [f"{ident} on {where}: {detail}" for ident, copies in self.verified.items()
                for where, ok, detail in copies if not ok]

    @property
    def ok(self) -> bool:
        return not self.failures and self.error is None and not self.verify_failures

    def skip(self, kind: str, why: str) -> None:
        """Record a skip; the caller says it once (the CLI prints it, the runtime logs it)."""
        self.skipped.append(why)
        self.skip_kinds.append(kind)


@dataclass(frozen=True)
class _Unit:
    """One artifact of the job (app.units) and how to build it."""

    unit: Unit
    make: Callable[[], Artifact]

    @property
    def name(self) -> str:
        return self.unit.name


def backup_once(
    settings: Settings,
    databases: Sequence[str] | None = None,
    force: bool = False,
    cancel: CancelToken | None = None,
    slot: str | None = None,
) -> JobResult:
    """Back up each unit (``databases``, else every unit of app.units) once.

    ``slot`` is given for scheduled runs (the `run` loop, `backup --scheduled`): an artifact whose slot already
    has an ok backup of this cluster is skipped. Without it (a manual `backup`) every artifact is backed up.
    ``force`` backs up even a slot already made, and such a backup carries no slot, so duplicate-slot pruning
    never removes it nor the backup made before it. No mode ever ignores the locks.
    """
    cancel = cancel or CancelToken()
    result = JobResult(slot=slot)
    try:
        with run_lock(settings, "backup", cancel) as held:
            targets = make_targets(settings)
            units = _units(settings, databases, cancel)
            outcomes: list[tuple[str, str | Manifest] | None] = [None] * len(units)

            def one(index: int) -> None:
                if not cancel.cancelled:
                    outcomes[index] = _back_up(settings, targets, units[index], slot, force, cancel, held.lease)

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
            made = [m for m in result.manifests if m.ok]
            if settings.retention.after_backup and made and not cancel.cancelled:
                result.prune_errors = _prune_after_backup(settings, targets, made)
            if settings.health.verify_after_backup and not cancel.cancelled:
                result.verified = _verify_after_backup(targets, [u.name for u in units], _cluster_of(made))
    except LockBusy as busy:
        result.skip("lock", str(busy))
    return result


def _cluster_of(made: Sequence[Manifest]) -> ClusterId | None:
    """This cluster, as the run's own manifests recorded it (None when none recorded an identity)."""
    found = next((m for m in made if m.system_identifier or m.source), None)
    return of_manifest(found) if found else None


def _prune_after_backup(settings: Settings, targets: Sequence[Target], made: Sequence[Manifest]) -> list[str]:
    """PRUNE_AFTER_BACKUP: retention under the same lock (waiting for no restore), never touching what this
    run made; its trouble is logged and returned for notification, the backup stays a success."""
    from app.retention import prune

    try:
        with run_lock(settings, "prune"):
            plan = prune(settings, targets, protect={m.id for m in made}, cluster=_cluster_of(made))
    except LockBusy as busy:
        log.info("prune after backup skipped: %s", busy)
        return []
    except SidecarError as exc:
        log.error("prune after backup failed: %s", exc)
        return [str(exc)]
    for error in plan.errors:
        log.warning("prune after backup: %s", error)
    return list(plan.errors)


def _verify_after_backup(targets: Sequence[Target], names: Sequence[str],
                         cluster: ClusterId | None) -> dict[str, list[tuple[str, bool, str]]]:
    """VERIFY_AFTER_BACKUP: read every copy of each unit's newest backup back (app.verify), whether this run
    made it or found the slot already done, so a copy that is stored wrong is known the same day instead of
    at the next restore."""
    from app.verify import verify_entry

    out: dict[str, list[tuple[str, bool, str]]] = {}
    for name in names:
        catalog = load_catalog(targets, name)
        newest = next(iter(catalog.good(name, cluster)), None)
        if newest is None:
            continue
        out[newest.id] = [(c.where, c.ok, c.detail) for c in verify_entry(newest, targets)]
        for where, ok, detail in out[newest.id]:
            (log.info if ok else log.error)("verify after backup: %s on %s: %s", newest.id, where,
                                            "ok" if ok else f"FAILED: {detail}")
    return out


def _units(settings: Settings, databases: Sequence[str] | None, cancel: CancelToken) -> list[_Unit]:
    makers: dict[str, Callable[[Unit], Artifact]] = {
        "database": lambda u: database_artifact(settings, u, cancel),
        "globals": lambda u: globals_artifact(settings, cancel),
        "files": lambda u: files_artifact(settings.files, cancel, settings.dump.timeout_s),  # type: ignore[arg-type]
    }
    return [_Unit(u, lambda u=u: makers[u.kind](u)) for u in expected_units(settings, databases)]


def _with_source(settings: Settings, targets: Sequence[Target], unit: Unit, artifact: Artifact,
                 identity: dict[str, Any]) -> Artifact:
    """The artifact with the source's identity added to its preflight (its contents come from app/pgdump.py),
    and its output checked (app.sanity) once the dump has ended, before anything is published."""
    if unit.kind == "files":
        return artifact
    inner_preflight, inner_open = artifact.preflight, artifact.open_source
    recorded: dict[str, Any] = {}

    def preflight() -> dict[str, Any]:
        fields: dict[str, Any] = dict(inner_preflight())
        fields.update({k: v for k, v in identity.items() if unit.kind == "database" or k != "database_oid"})
        recorded.update(fields)
        return fields

    @contextmanager
    def open_source() -> Iterator[tuple[Iterator[bytes], Callable[[], list[str]]]]:
        with inner_open() as (chunks, finish):
            raw = 0

            def counted() -> Iterator[bytes]:
                nonlocal raw
                for chunk in chunks:
                    raw += len(chunk)
                    yield chunk

            def finish_and_check() -> list[str]:
                return [*finish(), *_check_output(settings, targets, unit, artifact.format, recorded, raw)]

            yield counted(), finish_and_check

    return replace(artifact, preflight=preflight, open_source=open_source)


def _check_output(settings: Settings, targets: Sequence[Target], unit: Unit, fmt: str, recorded: dict[str, Any],
                  raw_bytes: int) -> list[str]:
    """Output sanity (app.sanity) of the dump that just ended, against the previous backup of this cluster."""
    if unit.kind != "database":
        return []
    now = datetime.now(UTC)
    this = Manifest(id="(this run)", status="ok", database=unit.name, started_at=now, finished_at=None, host="",
                    format=fmt, compression=settings.dump.compression, artifact="", kind=unit.kind,
                    contents=recorded.get("contents"), system_identifier=recorded.get("system_identifier"),
                    source=recorded.get("source"))
    try:
        history = [e.manifest for e in load_catalog(targets, unit.name).good(unit.name)]
    except TargetError as exc:  # the targets' own checks report it; a sanity check must not fail the backup
        log.warning("%s: cannot compare with the previous backup: %s", unit.name, exc)
        return []
    found = check_output(this, raw_bytes, previous_of(this, history), settings.health.size_drop_warn)
    for line in found:
        log.warning("backup of %s looks wrong: %s", unit.name, line)
    return found


def _back_up(
    settings: Settings, targets: Sequence[Target], unit: _Unit, slot: str | None, force: bool, cancel: CancelToken,
    file_lease: Lease | None = None,
) -> tuple[str, str | Manifest]:
    """("ok"|"failed", manifest) or (skip kind, why) for one artifact."""
    try:
        with claim(settings, targets, unit.name, slot, force, lock_db=unit.unit.lock_db,
                   engine=unit.unit.engine) as held:
            artifact = _with_source(settings, targets, unit.unit, unit.make(), held.identity)
            lease = Leases([file_lease, held.lease])
            manifest = run_artifact(settings, targets, artifact, cancel, None if force else slot, lease=lease)
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
                            kind=unit.unit.kind, error=error, slot=slot)
    return manifest.status, manifest
