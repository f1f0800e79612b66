"""Which backup a command means: ``latest`` of a database or an exact ID, and which target to read it from.

One answer for restore, restore-cluster, restore-files and drills. ``latest`` never silently settles for an
older backup because a target could not be listed: it refuses unless ``--from`` names a target that could.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from app import encryption, layout
from app.catalog import Catalog, Entry, load_catalog
from app.errors import SidecarError, UsageError
from app.identity import of_manifest
from app.targets import Target

log = logging.getLogger(__name__)


def resolve_entry(targets: Sequence[Target], ref: str, database: str | None, source: str | None = None,
                  catalog: Catalog | None = None, kind: str = "database") -> Entry:
    """The backup ``ref`` names (an ID, or ``latest`` of one database), or SidecarError saying why there is none.

    With ``source`` (``--from``), ``latest`` is judged on that target alone; without it, every target must
    have been listed, or a newer backup on the unreadable one could be passed over."""
    if ref != "latest":
        try:
            name, _ = layout.parse_id(ref)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        database = name  # an ID names its database; --db only narrows `latest`
    if ref == "latest" and source is not None:
        targets = [t for t in targets if t.name == source]
        catalog = None
    if catalog is None:
        catalog = load_catalog(targets, database)
    for name, error in catalog.errors.items():
        log.warning("cannot read %s: %s", name, error)
    if ref == "latest" and catalog.errors:
        failed = ", ".join(f"{name} ({error})" for name, error in catalog.errors.items())
        readable = [t.name for t in targets if t.name not in catalog.errors]
        raise SidecarError(
            f"cannot tell which backup is the latest: {failed} could not be listed, and it may hold a newer one",
            hint=(f"fix the target, give a backup ID, or choose the target with --from {readable[0]}" if readable
                  else "fix the targets, or give a backup ID"))
    if ref == "latest":
        good = [e for e in catalog.good(database) if e.manifest.kind == kind]
        names = sorted({e.manifest.database for e in good})
        if len(names) > 1:
            raise SidecarError(f"`latest` is ambiguous: there are backups of {', '.join(names)} "
                               "(hint: name the database with --db NAME, or give a backup ID)")
        if not good:
            which = f" of {database}" if database else ""
            raise SidecarError(f"no ok backup{which} found on {_names(targets)} "
                               "(hint: see `backup-sidecar list`; run `backup-sidecar backup` first)")
        clusters = {of_manifest(e.manifest) for e in good}
        if len(clusters) > 1:  # two clusters share these targets: the newest of either is not "the latest"
            raise SidecarError(
                f"`latest` is ambiguous: the targets hold backups of {names[0]} from {len(clusters)} clusters "
                f"({', '.join(sorted(c.describe() for c in clusters))})",
                hint="give the backup ID (see `backup-sidecar list`), and give each cluster its own S3_PREFIX or "
                     "NAS_PATH")
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
    """The target to read from: ``source`` when given, else the first (NAS before S3) holding a whole copy,
    one this process can decrypt before one it cannot (BACKUP_ENCRYPT_TARGETS: a plain NAS copy needs no key)."""
    holding = entry.good_targets(targets)
    if source is None:
        no_key = encryption.identity() is None
        return sorted(holding, key=lambda t: no_key and entry.encrypted_on(t.name))[0]
    chosen = [t for t in holding if t.name == source]
    if not chosen:
        where = ", ".join(t.name for t in holding)
        raise SidecarError(f"backup {entry.id} has no intact copy on {source}, only on {where} "
                           f"(hint: drop --from, or use --from {holding[0].name})")
    return chosen[0]
