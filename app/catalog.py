"""What the targets hold, read from their manifests: the single source for list, prune, restore and /health.

A backup counts only when its manifest says ok and its artifact is present with the manifest's size, and the
fingerprint a stat shows (NAS: the SHA-256 attribute, S3: the ETag) agrees with that copy's manifest, on at
least one target (the checksum of the bytes themselves is checked whenever they are read: verify, restore).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from app import encryption, layout
from app.identity import ClusterId
from app.manifest import Manifest, ManifestError
from app.targets.base import ObjectInfo, Target, TargetError

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One backup ID as seen across targets.

    Each target's copy has its own manifest: with BACKUP_ENCRYPT_TARGETS the copies differ in artifact key,
    size, SHA-256 and encryption. ``manifest`` stands for the backup (an ok one before a failed one, one with
    its fields in the clear before a sealed one); whatever reads a copy's bytes reads ``manifest_on(target)``.
    """

    manifest: Manifest
    #: targets holding the manifest, and whether each also holds the artifact with the right size
    copies: dict[str, bool] = field(default_factory=dict)
    manifest_keys: dict[str, str] = field(default_factory=dict)
    #: restore drills of this backup (app/drills.py): their keys per target, and the newest record
    drill_keys: dict[str, list[str]] = field(default_factory=dict)
    drill: dict | None = None
    #: each target's own manifest of this backup
    manifests: dict[str, Manifest] = field(default_factory=dict)

    def manifest_on(self, target: str) -> Manifest:
        """The manifest of the copy on ``target``: the one to read that copy's bytes with."""
        return self.manifests.get(target, self.manifest)

    def encrypted_on(self, target: str) -> bool:
        return bool(self.manifest_on(target).encryption)

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def good(self) -> bool:
        return self.manifest.ok and any(self.copies.values())

    @property
    def status(self) -> str:
        if not self.manifest.ok:
            return "failed"
        return "ok" if self.good else "broken"

    def good_targets(self, targets: Sequence[Target]) -> list[Target]:
        return [t for t in targets if self.copies.get(t.name)]


@dataclass
class Catalog:
    entries: list[Entry]  # newest first
    #: objects that look like ours but belong to no manifest, per target name (artifacts of killed runs)
    orphans: dict[str, list[ObjectInfo]]
    #: targets that could not be read, with the error line
    errors: dict[str, str]

    def good(self, database: str | None = None, cluster: ClusterId | None = None) -> list[Entry]:
        """Good backups, newest first (of one database; of one source cluster: app.identity)."""
        return [e for e in self.entries if e.good and (database is None or e.manifest.database == database)
                and (cluster is None or cluster.matches(e.manifest))]

    def find(self, ref: str, database: str | None = None, cluster: ClusterId | None = None) -> Entry | None:
        """``latest`` (newest good backup, optionally of one database and cluster) or an exact ID."""
        if ref == "latest":
            good = self.good(database, cluster)
            return good[0] if good else None
        return next((e for e in self.entries if e.id == ref), None)


class ReadCache:
    """The bytes of manifests and drill records already fetched from one target, each kept with what the
    listing showed of it (size, time, checksum). The health thread reads its targets every minute; with a year
    of history that is thousands of GETs a minute on S3, when only the objects new since the last read (or
    replaced: their listing changes) need fetching. Bytes, not parsed manifests, so no reader shares state."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[tuple[int, object, str | None], bytes]] = {}
        self.fetched = 0  # GETs made through this cache, for the tests and for debugging

    def read(self, target: Target, info: ObjectInfo) -> bytes:
        seen = (info.size, info.modified, info.checksum)
        held = self._held.get(info.key)
        if held is not None and held[0] == seen:
            return held[1]
        data = target.read_bytes(info.key)
        self.fetched += 1
        self._held[info.key] = (seen, data)
        return data

    def keep(self, keys: set[str]) -> None:
        """Forget what the last listing no longer shows (pruned objects), so the cache tracks the target."""
        for key in [k for k in self._held if k not in keys]:
            del self._held[key]


def load_catalog(targets: Sequence[Target], database: str | None = None,
                 cache: ReadCache | None = None) -> Catalog:
    """Read every manifest under the layout on every target (per database when given). ``cache`` (one
    target only) spares the GETs of objects whose listing has not changed since the last call."""
    if cache is not None and len(targets) != 1:
        raise ValueError("a ReadCache belongs to one target")
    merged: dict[str, Entry] = {}
    orphans: dict[str, list[ObjectInfo]] = {}
    errors: dict[str, str] = {}
    for target in targets:
        try:
            objects = {o.key: o for o in target.list(f"{database}/" if database else "")
                       if not layout.is_wal_key(o.key)}  # the WAL archive has its own reader (app/wal.py)
        except TargetError as exc:
            errors[target.name] = str(exc)
            log.warning("cannot list %s: %s", target.describe(), exc)
            continue
        referenced: set[str] = set()
        for key in sorted(k for k in objects if layout.is_manifest_key(k)):
            try:
                manifest = encryption.opened(Manifest.from_json(
                    cache.read(target, objects[key]) if cache else target.read_bytes(key)))
            except ManifestError as exc:  # not ours or damaged for good: skipping it must not block prune forever
                log.warning("skipping unparsable manifest %s on %s: %s", key, target.describe(), exc)
                continue
            except TargetError as exc:  # could not read it now: the view is partial, so nothing may be deleted
                errors.setdefault(target.name, f"cannot read {key}: {exc}")
                log.warning("cannot read manifest %s on %s: %s", key, target.describe(), exc)
                continue
            referenced.update((key, manifest.artifact))
            artifact = objects.get(manifest.artifact)
            entry = merged.setdefault(manifest.id, Entry(manifest))
            if _stands_better(manifest, entry.manifest):
                entry.manifest = manifest
            entry.copies[target.name] = _intact(artifact, manifest)
            entry.manifest_keys[target.name] = key
            entry.manifests[target.name] = manifest
        for key in sorted(k for k in objects if layout.drill_backup_id(k)):
            referenced.add(key)
            owner = merged.get(layout.drill_backup_id(key) or "")
            if owner is None:
                continue
            owner.drill_keys.setdefault(target.name, []).append(key)
            if owner.drill is None or key.rsplit("/", 1)[-1] > owner.drill.get("_key", ""):
                owner.drill = _read_drill(target, objects[key], cache) or owner.drill
        if cache is not None:
            cache.keep(referenced)
        orphans[target.name] = [
            o for k, o in objects.items() if k not in referenced and _looks_like_artifact(k)
        ]
    entries = sorted(merged.values(), key=lambda e: (e.manifest.started_at, e.id), reverse=True)
    return Catalog(entries, orphans, errors)


def _stands_better(m: Manifest, than: Manifest) -> bool:
    """Whether ``m`` should stand for its backup instead of ``than``: an ok copy's manifest before a failed
    one's, and one whose fields are in the clear (a plain copy's) before a sealed one this reader cannot open."""
    if m.ok != than.ok:
        return m.ok
    return bool(than.sealed) and not m.sealed


def _intact(artifact: ObjectInfo | None, manifest: Manifest) -> bool:
    """A copy is intact when its artifact has the manifest's size and the fingerprint a stat shows agrees with
    the copy's manifest: the SHA-256 itself on the NAS, the ETag recorded at publication on S3. A copy written
    to or replaced since is not intact; a target or a backup without fingerprints is judged by size."""
    if artifact is None or artifact.size != manifest.size_bytes:
        return False
    seen = artifact.checksum
    if seen is None:
        return True
    if seen.startswith("etag:"):
        recorded = manifest.stored_checksum
        return recorded is None or not recorded.startswith("etag:") or seen == recorded
    return seen == f"sha256:{manifest.sha256}"


def merge_entries(per_target: Sequence[Sequence[Entry]]) -> list[Entry]:
    """One entry per backup ID from catalogs of single targets (the health cache's), newest first, merged as
    ``load_catalog`` merges targets: an ok manifest wins over a failed one, copies and drill keys add up, and the
    newest drill record stands."""
    merged: dict[str, Entry] = {}
    for entries in per_target:
        for e in entries:
            have = merged.get(e.id)
            if have is None:
                merged[e.id] = Entry(e.manifest, dict(e.copies), dict(e.manifest_keys),
                                     {k: list(v) for k, v in e.drill_keys.items()}, e.drill, dict(e.manifests))
                continue
            if _stands_better(e.manifest, have.manifest):
                have.manifest = e.manifest
            have.copies.update(e.copies)
            have.manifest_keys.update(e.manifest_keys)
            have.manifests.update(e.manifests)
            for name, keys in e.drill_keys.items():
                have.drill_keys.setdefault(name, []).extend(keys)
            if e.drill is not None and (have.drill is None or e.drill.get("_key", "") > have.drill.get("_key", "")):
                have.drill = e.drill
    return sorted(merged.values(), key=lambda e: (e.manifest.started_at, e.id), reverse=True)


def _read_drill(target: Target, info: ObjectInfo, cache: ReadCache | None) -> dict | None:
    import json

    key = info.key
    try:
        doc = json.loads(cache.read(target, info) if cache else target.read_bytes(key))
    except (TargetError, ValueError) as exc:
        log.warning("skipping drill record %s on %s: %s", key, target.describe(), exc)
        return None
    if not isinstance(doc, dict):
        return None
    doc["_key"] = key.rsplit("/", 1)[-1]
    return doc


def _looks_like_artifact(key: str) -> bool:
    """Our naming: ``<name>/YYYY/MM/DD/<name>-<stamp>.<ext>``; anything else under the prefix is foreign."""
    parts = key.split("/")
    stem = layout.artifact_stem(parts[-1])
    return len(parts) == 5 and stem is not None and layout.parse_id(stem)[0] == parts[0]
