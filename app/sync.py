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

from app import encryption
from app.backup import CLEANUP_S
from app.cancel import Cancelled, CancelToken
from app.catalog import Entry, load_catalog
from app.compression import compressor
from app.deadline import Budget, DeadlineExceeded
from app.errors import SidecarError
from app.layout import manifest_key_for_id
from app.logs import mask
from app.manifest import Manifest, ManifestError
from app.pipeline import pump
from app.readpath import stored_chunks
from app.settings import Settings
from app.targets.base import ObjectLocked, Target, TargetError, Upload

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
        holding = [t for t in ready if entry.copies.get(t.name)]
        for dest in ready:
            if cancel.cancelled or entry.copies.get(dest.name) or not holding:
                continue
            # a copy stored the way dest keeps its copies first (its bytes go as they are), then a plain one
            wants = settings.encryption.applies_to(dest.name)
            source = sorted(holding, key=lambda t: (entry.encrypted_on(t.name) != wants,
                                                    entry.encrypted_on(t.name)))[0]
            try:
                how = copy_backup(settings, entry, source, dest, cancel)
            except Cancelled:
                return report
            except (SidecarError, OSError) as exc:
                line = f"{entry.id}: {source.name} -> {dest.name}: {mask(str(exc)).splitlines()[0]}"
                log.error("sync: %s", line)
                report.errors.append(line)
                continue
            report.copied.append(f"{entry.id}: {source.name} -> {dest.name}" + (f" ({how})" if how else ""))
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


def copy_backup(settings: Settings, entry: Entry, source: Target, dest: Target, cancel: CancelToken) -> str | None:
    """Stream one backup from ``source`` to ``dest``, re-hashed; publish it there only if it matches. A plain
    copy bound for a target whose copies are encrypted (BACKUP_ENCRYPT_TARGETS) is encrypted on the way, to
    today's recipients; an encrypted one is never decrypted (the sidecar holds no identity to back up).
    Returns how the copy differs from its source ("encrypted", "kept encrypted"), or None."""
    key = entry.manifest_keys.get(source.name) or manifest_key_for_id(entry.id)
    try:
        manifest = Manifest.from_json(source.read_bytes(key))
    except ManifestError as exc:
        raise SidecarError(f"the manifest on {source.name} cannot be read: {exc}") from exc
    encrypt = settings.encryption.applies_to(dest.name) and not manifest.encryption
    how = "encrypted" if encrypt else None
    if manifest.encryption and settings.encryption.on and not settings.encryption.applies_to(dest.name):
        how = "kept encrypted"
        log.info("sync: %s: the copy for %s stays encrypted, as on %s: sync never decrypts", entry.id, dest.name,
                 source.name)
    artifact = manifest.artifact + encryption.SUFFIX if encrypt else manifest.artifact
    budget = Budget.after(settings.dump.timeout_s, cancel)
    with budget.scope():
        _clear_leftover(dest, artifact)
        upload = dest.begin(artifact, size_hint=manifest.size_bytes)
        try:
            if encrypt:
                # stored_chunks holds the last chunk back until the source's size and SHA-256 matched
                pumped = pump(stored_chunks(source, manifest), compressor("none", 0), [],
                              lambda: budget.check(f"the copy of {entry.id} to {dest.name}"),
                              settings.encryption.recipients, [upload])
                assert pumped.encrypted is not None
                size, sha256 = pumped.encrypted.size, pumped.encrypted.sha256
            else:
                size, sha256 = _copy_bytes(source, dest, manifest, upload, budget, entry.id)
            stored = upload.commit(sha256)
        except BaseException:
            with Budget.after(CLEANUP_S, CancelToken(), "the cleanup budget").scope():  # also after a stop
                upload.abort()
            raise
        doc = replace(manifest, target=dest.name, stored_checksum=stored, synced_from=source.name,
                      warnings=list(manifest.warnings))
        if encrypt:
            recipients = settings.encryption.recipients
            doc = encryption.seal(replace(doc, artifact=artifact, size_bytes=size, sha256=sha256,
                                          encryption=encryption.described(recipients)), recipients)
        try:
            info = dest.stat(artifact)
            if info is None or info.size != size:
                raise TargetError(f"{dest.name}: the copied object is missing or has the wrong size "
                                  "(hint: check the target)")
            if dest.stat(key) is None:
                dest.put_bytes(key, doc.to_json())
            else:
                dest.replace_bytes(key, doc.to_json())  # the failed manifest of the run that missed this target
        except BaseException:
            try:
                dest.delete(artifact)
            except TargetError as exc:
                log.error("sync: cannot remove %s from %s after a failure: %s", artifact, dest.name, exc)
            raise
    log.info("sync: %s copied from %s to %s (%d bytes, sha256 checked%s)", entry.id, source.name, dest.name, size,
             f", {how}" if how else "")
    return how


def _copy_bytes(source: Target, dest: Target, manifest: Manifest, upload: Upload, budget: Budget,
                backup_id: str) -> tuple[int, str]:
    """The stored bytes as they are, re-hashed: refused unless they match the source's manifest."""
    digest, size = hashlib.sha256(), 0
    with source.open(manifest.artifact) as f:
        while chunk := f.read(CHUNK):
            budget.check(f"the copy of {backup_id} to {dest.name}")
            digest.update(chunk)
            size += len(chunk)
            upload.write(chunk)
    if size != manifest.size_bytes or digest.hexdigest() != manifest.sha256:
        raise SidecarError(
            f"the copy on {source.name} does not match its manifest ({size} bytes, sha256 "
            f"{digest.hexdigest()[:16]}; the manifest says {manifest.size_bytes} bytes, "
            f"{(manifest.sha256 or '')[:16]}): nothing was copied",
            hint=f"run `backup-sidecar verify {backup_id}`; the copy on {source.name} is damaged")
    return size, digest.hexdigest()


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
