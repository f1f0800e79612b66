"""WAL retention: the archive is kept from the oldest retained base backup's start on, never with a gap.

Base backups are retained by the same GFS rules as dumps (they are ``_base`` backups in the catalog). Before
anything is deleted, the WAL chain from the oldest kept base backup is checked on every target: where it has a
gap, no base backup and no WAL is deleted at all (an older base backup may be the only one still recoverable),
and the gap is reported. Otherwise WAL older than that start goes, together with partial snapshots that a
completed segment or a longer snapshot superseded. Manifest first, then the file, as for backups.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from app.catalog import Entry
from app.logs import mask
from app.manifest import Manifest
from app.targets.base import ObjectLocked, Target, TargetError
from app.wal import WalFile, WalListing, chain, list_wal, parse_lsn, segment_name, segments_per_xlogid

log = logging.getLogger(__name__)


@dataclass
class WalPlan:
    base: Manifest | None = None  # the oldest kept base backup: WAL from its start stays
    doomed: dict[str, list[WalFile]] = field(default_factory=dict)  # per target name
    errors: list[str] = field(default_factory=list)
    deleted: int = 0

    def lines(self, dry_run: bool) -> list[str]:
        if self.base is None:
            return ["  wal     kept whole: no base backup is retained, so there is no start to keep WAL from"]
        p = self.base.physical or {}
        verb = "delete" if dry_run else "deleted"
        count = sum(len(v) for v in self.doomed.values()) if dry_run else self.deleted
        return [f"  wal     keep from {p.get('start_lsn')} (start of {self.base.id}, the oldest kept base backup); "
                f"{verb} {count} older or superseded WAL file(s)"]


def _size(base: Manifest) -> int:
    return int((base.physical or {}).get("wal_segment_size") or 16 * 1024 * 1024)


def plan_wal(targets: Sequence[Target], entries: dict[str, Entry], decisions: list) -> tuple[list, WalPlan]:
    """Check continuity, then choose what WAL goes; returns the decisions (base deletions vetoed on a gap)."""
    plan = WalPlan()
    kept = [entries[d.backup.id].manifest for d in decisions
            if d.keep and entries[d.backup.id].manifest.kind == "base" and entries[d.backup.id].good]
    kept = [m for m in kept if (m.physical or {}).get("start_lsn")]
    if not kept:
        return decisions, plan
    base = min(kept, key=lambda m: (int(m.physical["timeline"]), parse_lsn(m.physical["start_lsn"])))  # type: ignore
    plan.base = base
    tli, size = int(base.physical["timeline"]), _size(base)  # type: ignore[index]
    first = parse_lsn(base.physical["start_lsn"]) // size  # type: ignore[index]
    for target in targets:
        try:
            listing = list_wal(target)
        except TargetError as exc:
            plan.errors.append(f"{mask(str(exc))}; no WAL or base backup is deleted")
            continue
        run = chain(listing, tli, first, size)
        stop_seg = parse_lsn(base.physical["stop_lsn"]) // size  # type: ignore[index]
        reach = run.end_lsn
        if run.gaps or reach < parse_lsn(base.physical["stop_lsn"]):  # type: ignore[index]
            missing = ", ".join(run.describe_gaps()[:3]) or segment_name(tli, max(first, stop_seg), size)
            plan.errors.append(f"{target.name}: the WAL from {base.id} on has a gap (missing {missing}); prune "
                               "deleted no base backup and no WAL (hint: `backup-sidecar verify` lists the gaps; "
                               "take a base backup now so recovery has an unbroken chain again)")
            continue
        plan.doomed[target.name] = _older(listing, tli, first, size)
    if plan.errors:
        decisions = [d if d.keep or entries[d.backup.id].manifest.kind != "base"
                     else replace(d, keep=True, rules=("kept: the WAL chain has a gap (see the errors)",))
                     for d in decisions]
        plan.doomed.clear()
    return decisions, plan


def _older(listing: WalListing, tli: int, first: int, size: int) -> list[WalFile]:
    per = segments_per_xlogid(size)

    def number(f: WalFile) -> int:
        return f.log_seg[0] * per + f.log_seg[1]

    doomed = [f for f in listing.segments.values() if f.tli < tli or (f.tli == tli and number(f) < first)]
    for segment, snaps in listing.partials.items():
        for snap in snaps:
            older = snap.tli < tli or (snap.tli == tli and number(snap) < first)
            superseded = segment in listing.segments or snap is not snaps[-1]
            if older or superseded:
                doomed.append(snap)
    return doomed


def apply_wal(plan: WalPlan, targets: Sequence[Target]) -> list[str]:
    """Delete what ``plan`` chose; a target that fails a delete keeps the rest of its WAL."""
    errors: list[str] = []
    for target in targets:
        for wal in plan.doomed.get(target.name, []):
            try:
                target.delete(wal.manifest_key)
                target.delete(wal.key)
                plan.deleted += 1
            except ObjectLocked as exc:  # the rest is newer, so locked too: kept, and deleted by a later prune
                log.info("prune: WAL on %s from %s on is kept: %s", target.name, wal.key, exc)
                break
            except TargetError as exc:
                errors.append(f"{mask(str(exc))} (prune stopped deleting WAL on {target.name})")
                break
    if plan.deleted:
        log.info("prune: deleted %d WAL file(s) older than %s", plan.deleted,
                 (plan.base.physical or {}).get("start_lsn") if plan.base else "-")
    return errors

