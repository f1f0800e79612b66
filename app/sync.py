"""Catch-up: copy every backup a target lacks from a target that holds a good copy of it.

After an outage of one target (S3 down for days, the NAS unmounted), the backups made meanwhile exist on the
other target only. ``sync`` streams each missing copy from a target that holds it intact (NAS first: the
cheapest to read) into the target that lacks it, re-hashing every byte on the way, and publishes it with its
own manifest only when size and SHA-256 match the source's manifest. A copy that does not match is
refused, so a damaged source never spreads. Only backups retention keeps are copied: one that the next prune
removes anyway is not worth the transfer.

`backup-sidecar sync` runs it once; `run` runs it after every backup job and on SYNC_SCHEDULE, so a target
catches up by itself once it is back and /health clears.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from app.backup import CLEANUP_S
from app.cancel import Cancelled, CancelToken
from app.catalog import Entry, load_catalog
from app.deadline import Budget, DeadlineExceeded
from app.errors import SidecarError
from app.layout import manifest_key_for_id
from app.logs import mask
from app.manifest import Manifest, ManifestError
from app.settings import Settings
from app.targets.base import ObjectLocked, Target, TargetError

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024


@dataclass
class SyncReport:
    copied: list[str] = field(default_factory=list)  # "ID: nas -> s3"
    errors: list[str] = field(default_factory=list)
    #: targets that could not take copies this time (unreachable, failed check)
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.unavailable


def sync(settings: Settings, targets: Sequence[Target], cancel: CancelToken | None = None,
         database: str | None = None) -> SyncReport:
    """Copy every kept backup a target lacks from a target that holds it intact; never raises for a target."""
    cancel = cancel or CancelToken()
    report = SyncReport()
    if len(targets) < 2:
        return report
    catalog = load_catalog(targets, database)
    report.unavailable.update(catalog.errors)
    ready: list[Target] = []
    for target in targets:
        if target.name in report.unavailable:
            continue
        try:
            with Budget.after(30, cancel, "the target check").scope():
                target.check()
            ready.append(target)
        except (TargetError, DeadlineExceeded) as exc:
            report.unavailable[target.name] = mask(str(exc))
    for entry in _kept(settings, catalog.entries):
        sources = [t for t in ready if entry.copies.get(t.name)]
        for dest in ready:
            if cancel.cancelled or entry.copies.get(dest.name) or not sources:
                continue
            try:
                copy_backup(settings, entry, sources[0], dest, cancel)
            except Cancelled:
                return report
            except (SidecarError, OSError) as exc:
                line = f"{entry.id}: {sources[0].name} -> {dest.name}: {mask(str(exc)).splitlines()[0]}"
                log.error("sync: %s", line)
                report.errors.append(line)
                continue
            report.copied.append(f"{entry.id}: {sources[0].name} -> {dest.name}")
    for name, error in report.unavailable.items():
        log.warning("sync: %s cannot take copies now: %s", name, error)
    if report.copied:
        log.info("sync: copied %d backup(s): %s", len(report.copied), "; ".join(report.copied))
    return report


def _kept(settings: Settings, entries: Sequence[Entry]) -> list[Entry]:
    """Good backups that retention keeps, newest first (the newest matters most after an outage)."""
    from app.retention import Backup, Policy, select

    good = [e for e in entries if e.good]
    decisions = select((Backup(e.id, e.manifest.database, e.manifest.started_at, "ok", e.manifest.slot)
                        for e in good), Policy.from_settings(settings), datetime.now(UTC))
    keep = {d.backup.id for d in decisions if d.keep}
    return [e for e in good if e.id in keep]


def copy_backup(settings: Settings, entry: Entry, source: Target, dest: Target, cancel: CancelToken) -> None:
    """Stream one backup from ``source`` to ``dest``, re-hashed; publish it there only if it matches."""
    key = entry.manifest_keys.get(source.name) or manifest_key_for_id(entry.id)
    try:
        manifest = Manifest.from_json(source.read_bytes(key))
    except ManifestError as exc:
        raise SidecarError(f"the manifest on {source.name} cannot be read: {exc}") from exc
    budget = Budget.after(settings.dump.timeout_s, cancel)
    with budget.scope():
        _clear_leftover(dest, manifest.artifact)
        upload = dest.begin(manifest.artifact, size_hint=manifest.size_bytes)
        digest, size = hashlib.sha256(), 0
        try:
            with source.open(manifest.artifact) as f:
                while chunk := f.read(CHUNK):
                    budget.check(f"the copy of {entry.id} to {dest.name}")
                    digest.update(chunk)
                    size += len(chunk)
                    upload.write(chunk)
            if size != manifest.size_bytes or digest.hexdigest() != manifest.sha256:
                raise SidecarError(
                    f"the copy on {source.name} does not match its manifest ({size} bytes, sha256 "
                    f"{digest.hexdigest()[:16]}; the manifest says {manifest.size_bytes} bytes, "
                    f"{(manifest.sha256 or '')[:16]}): nothing was copied",
                    hint=f"run `backup-sidecar verify {entry.id}`; the copy on {source.name} is damaged")
            stored = upload.commit(manifest.sha256)
        except BaseException:
            with Budget.after(CLEANUP_S, CancelToken(), "the cleanup budget").scope():  # also after a stop
                upload.abort()
            raise
        doc = replace(manifest, target=dest.name, stored_checksum=stored, synced_from=source.name,
                      warnings=list(manifest.warnings))
        try:
            info = dest.stat(manifest.artifact)
            if info is None or info.size != size:
                raise TargetError(f"{dest.name}: the copied object is missing or has the wrong size "
                                  "(hint: check the target)")
            if dest.stat(key) is None:
                dest.put_bytes(key, doc.to_json())
            else:
                dest.replace_bytes(key, doc.to_json())  # the failed manifest of the run that missed this target
        except BaseException:
            try:
                dest.delete(manifest.artifact)
            except TargetError as exc:
                log.error("sync: cannot remove %s from %s after a failure: %s", manifest.artifact, dest.name, exc)
            raise
    log.info("sync: %s copied from %s to %s (%d bytes, sha256 checked)", entry.id, source.name, dest.name, size)


def _clear_leftover(dest: Target, artifact: str) -> None:
    """An object at the artifact's key with no intact copy behind it (a run that failed after committing)
    is not a backup: it goes, so the real copy can take its name."""
    if dest.stat(artifact) is not None:
        log.warning("sync: replacing %s on %s, which no ok manifest vouches for", artifact, dest.name)
        try:
            dest.delete(artifact)
        except ObjectLocked as exc:  # retained: it stays as an older version, the copy becomes the current one
            log.info("sync: %s on %s: %s", artifact, dest.name, exc)


def sync_command(settings: Settings, database: str | None, cancel: CancelToken) -> SyncReport:
    """`backup-sidecar sync`, and `run`'s catch-up. It takes no lock: it only adds copies of published
    backups under their own names, so it never gets in the way of a backup (a scheduled slot is never skipped
    for a catch-up); a backup that a concurrent prune removes mid-copy fails that one copy, nothing else."""
    from app.targets import make_targets

    return sync(settings, make_targets(settings), cancel, database)
