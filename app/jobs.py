"""A backup job: every configured database (and the extras) once, as the CLI and the scheduler run it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.backup import BackupFailed, backup_database
from app.cancel import CancelToken
from app.manifest import Manifest
from app.settings import Settings
from app.targets import make_targets

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    manifests: list[Manifest] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why a database was not backed up (lock, slot done)

    @property
    def failures(self) -> list[Manifest]:
        return [m for m in self.manifests if not m.ok]

    @property
    def ok(self) -> bool:
        return not self.failures


def backup_once(settings: Settings, databases: Sequence[str] | None = None, force: bool = False,
                cancel: CancelToken | None = None, slot: str | None = None) -> JobResult:
    """Back up each database; one failing does not stop the others."""
    cancel = cancel or CancelToken()
    targets = make_targets(settings)
    result = JobResult()
    for dbname in databases or settings.db.databases:
        try:
            result.manifests.append(backup_database(settings, targets, dbname, cancel, slot))
        except BackupFailed as exc:
            result.manifests.append(exc.manifest)
    return result
