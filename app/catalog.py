"""What the targets hold, read from their manifests: the single source for list, prune, restore and /health.

A backup counts only when its manifest says ok and its artifact is present with the manifest's size on at
least one target (the checksum is checked whenever the bytes are read: verify and restore).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from app import layout
from app.manifest import Manifest, ManifestError
from app.targets.base import ObjectInfo, Target, TargetError

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One backup ID as seen across targets."""

    manifest: Manifest
    #: targets holding the manifest, and whether each also holds the artifact with the right size
    copies: dict[str, bool] = field(default_factory=dict)
    manifest_keys: dict[str, str] = field(default_factory=dict)

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

    def good(self, database: str | None = None) -> list[Entry]:
        return [e for e in self.entries if e.good and (database is None or e.manifest.database == database)]

    def find(self, ref: str, database: str | None = None) -> Entry | None:
        """``latest`` (newest good backup, optionally of one database) or an exact ID."""
        if ref == "latest":
            good = self.good(database)
            return good[0] if good else None
        return next((e for e in self.entries if e.id == ref), None)


def load_catalog(targets: Sequence[Target], database: str | None = None) -> Catalog:
    """Read every manifest under the layout on every target (per database when given)."""
    merged: dict[str, Entry] = {}
    orphans: dict[str, list[ObjectInfo]] = {}
    errors: dict[str, str] = {}
    for target in targets:
        try:
            objects = {o.key: o for o in target.list(f"{database}/" if database else "")}
        except TargetError as exc:
            errors[target.name] = str(exc)
            log.warning("cannot list %s: %s", target.describe(), exc)
            continue
        referenced: set[str] = set()
        for key in sorted(k for k in objects if layout.is_manifest_key(k)):
            try:
                manifest = Manifest.from_json(target.read_bytes(key))
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
            if manifest.ok and not entry.manifest.ok:
                entry.manifest = manifest  # an ok copy wins over a failed one of the same ID
            entry.copies[target.name] = artifact is not None and artifact.size == manifest.size_bytes
            entry.manifest_keys[target.name] = key
        orphans[target.name] = [
            o for k, o in objects.items() if k not in referenced and _looks_like_artifact(k)
        ]
    entries = sorted(merged.values(), key=lambda e: (e.manifest.started_at, e.id), reverse=True)
    return Catalog(entries, orphans, errors)


def _looks_like_artifact(key: str) -> bool:
    """Our naming: ``<name>/YYYY/MM/DD/<name>-<stamp>.<ext>``; anything else under the prefix is foreign."""
    parts = key.split("/")
    stem = layout.artifact_stem(parts[-1])
    return len(parts) == 5 and stem is not None and layout.parse_id(stem)[0] == parts[0]
