"""A backup job: every configured database once, as the CLI and the scheduler run it.

The job holds LOCK_FILE for its whole length (never twice on one volume) and claims each database's slot
through the database itself (never twice across hosts); a run that finds either taken is skipped, not
failed, and says who holds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from app import pg
from app.backup import BackupFailed, backup_database
from app.cancel import CancelToken
from app.coordination import SlotTaken, claim, slot_of
from app.locks import LockBusy, run_lock
from app.manifest import Manifest
from app.settings import Settings
from app.targets import make_targets


@dataclass
class JobResult:
    manifests: list[Manifest] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why a database was not backed up (lock, slot done)
    #: one per ``skipped`` line: lock (LOCK_FILE held), claim (another host is dumping), slot (already done)
    skip_kinds: list[str] = field(default_factory=list)
    slot: str | None = None
    #: set by the runtime when the job as a whole failed before any database (lock file, listing databases)
    error: str | None = None

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


def backup_once(
    settings: Settings,
    databases: Sequence[str] | None = None,
    force: bool = False,
    cancel: CancelToken | None = None,
    slot: str | None = None,
) -> JobResult:
    """Back up each database; one failing does not stop the others.

    ``slot`` defaults to the current minute (the `backup` command); ``force`` ignores a backup already
    made for the slot, never the locks.
    """
    cancel = cancel or CancelToken()
    result = JobResult(slot=slot or slot_of(datetime.now(UTC)))
    try:
        with run_lock(settings, "backup", cancel):
            targets = make_targets(settings)
            for dbname in _expand(settings, databases or settings.db.databases):
                if cancel.cancelled:
                    break
                try:
                    with claim(settings, targets, dbname, result.slot, force):
                        result.manifests.append(backup_database(settings, targets, dbname, cancel, result.slot))
                except SlotTaken as taken:
                    result.skip(taken.kind, str(taken))
                except BackupFailed as exc:
                    result.manifests.append(exc.manifest)
    except LockBusy as busy:
        result.skip("lock", str(busy))
    return result


def _expand(settings: Settings, databases: Sequence[str]) -> list[str]:
    """POSTGRES_DB=* means every connectable database on the server but POSTGRES_DB_EXCLUDE."""
    if "*" not in databases:
        return list(databases)
    with pg.connect(settings.db, "postgres") as conn:
        found = pg.list_databases(conn)
    named = [d for d in databases if d != "*"]
    return named + [d for d in found if d not in named and d not in settings.db.exclude]
