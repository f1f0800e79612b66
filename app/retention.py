"""Retention: which backups to keep (a pure function over manifests) and prune, which applies it to the targets.

Grandfather-father-son by count, per database: the newest backup of each of the last N days, ISO weeks and
months *that have one*, so a week of failed dumps never ages the last good ones out. Three guards sit above
every rule: the newest ok backup stays, at least BACKUP_KEEP_MIN ok backups stay, and nothing that does not
carry the sidecar's own naming is touched. Only a manifest whose status is ok and whose artifact is intact
counts as a backup (as everywhere else); failed manifests and artifacts without a manifest are swept once
they are a day old, which leaves a running backup on another host alone.

Deletion order: manifest first, then artifact. A failure between the two leaves an artifact without a
manifest (swept a day later), never an ok manifest that points at nothing.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from app import layout
from app.catalog import Entry, load_catalog
from app.identity import ClusterId, of_manifest, try_server_identity
from app.logs import mask
from app.settings import Settings
from app.targets import ObjectLocked, Target, TargetError, make_targets

if TYPE_CHECKING:
    from app.notify import Notifier

log = logging.getLogger(__name__)

#: How old a failed manifest, an artifact without a manifest, or an incomplete upload must be before it goes.
GRACE = timedelta(days=1)


@dataclass(frozen=True)
class Policy:
    daily: int = 14
    weekly: int = 4
    monthly: int = 3
    minimum: int = 3
    tz: tzinfo = UTC  # days, weeks and months are the operator's (TZ), not UTC's

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        r = settings.retention
        return cls(r.daily, r.weekly, r.monthly, r.minimum, ZoneInfo(settings.schedule.tz))

    def describe(self) -> str:
        return f"{self.daily} daily, {self.weekly} weekly, {self.monthly} monthly, minimum {self.minimum}"


@dataclass(frozen=True)
class Backup:
    """What selection needs to know of one backup ID."""

    id: str
    database: str
    started_at: datetime
    status: str = "ok"  # ok | failed | broken (ok manifest, no intact artifact anywhere)
    slot: str | None = None
    #: the source cluster (system identifier, or host:port); retention never weighs two clusters together
    cluster: str | None = None


@dataclass(frozen=True)
class Decision:
    backup: Backup
    keep: bool
    rules: tuple[str, ...]

    @property
    def reason(self) -> str:
        return ", ".join(self.rules)


def select(backups: Iterable[Backup], policy: Policy, now: datetime,
           protect: Iterable[str] = ()) -> list[Decision]:
    """Keep or delete, with the rules that decided, for every backup; per cluster and database, newest first.

    ``protect`` holds the IDs the calling run made: they stay whatever their timestamps say (a host whose clock
    is far behind must not have its fresh backup classified "outside retention" by its own prune).
    """
    groups: dict[tuple[str, str], list[Backup]] = {}
    for b in backups:
        groups.setdefault((b.database, b.cluster or ""), []).append(b)
    out: list[Decision] = []
    keep = set(protect)
    for key in sorted(groups):
        out += _select_database(groups[key], policy, now, keep)
    return out


def _buckets(policy: Policy) -> list[tuple[str, int, Callable[[datetime], str]]]:
    def day(at: datetime) -> str:
        return at.astimezone(policy.tz).date().isoformat()

    def week(at: datetime) -> str:
        iso = at.astimezone(policy.tz).isocalendar()
        return f"{iso.year}-W{iso.week:02d}"

    def month(at: datetime) -> str:
        return at.astimezone(policy.tz).strftime("%Y-%m")

    return [("daily", policy.daily, day), ("weekly", policy.weekly, week), ("monthly", policy.monthly, month)]


def _select_database(backups: list[Backup], policy: Policy, now: datetime, protect: set[str]) -> list[Decision]:
    items = sorted(backups, key=lambda b: (b.started_at, b.id), reverse=True)
    ok = [b for b in items if b.status == "ok"]
    rules: dict[str, list[str]] = {b.id: [] for b in items}
    for b in ok:
        if b.id in protect:
            rules[b.id].append("made by this run")

    # Duplicates of one slot (replicas that both ran it): the newest stands for the slot, the others only
    # count where the minimum needs them.
    representatives: list[Backup] = []
    duplicate_of: dict[str, tuple[str, str]] = {}
    slot_owner: dict[str, str] = {}
    for b in ok:
        if b.slot and b.slot in slot_owner and b.id not in protect:
            duplicate_of[b.id] = (slot_owner[b.slot], b.slot)
            continue
        if b.slot:
            slot_owner[b.slot] = b.id
        representatives.append(b)

    if ok:
        rules[ok[0].id].append("newest")
    for rule, count, bucket in _buckets(policy):
        seen: list[str] = []
        for b in representatives:
            key = bucket(b.started_at)
            if key in seen:
                continue
            if len(seen) >= count:
                break
            seen.append(key)
            rules[b.id].append(f"{rule} {key}")
    kept = sum(1 for b in ok if rules[b.id])
    for b in representatives + [b for b in ok if b.id in duplicate_of]:
        if kept >= policy.minimum:
            break
        if not rules[b.id]:
            rules[b.id].append(f"minimum {policy.minimum}")
            kept += 1

    oldest_kept = min((b.started_at for b in ok if rules[b.id]), default=None)
    decisions: list[Decision] = []
    for b in items:
        if b.status == "ok":
            if rules[b.id]:
                decisions.append(Decision(b, True, tuple(rules[b.id])))
            elif b.id in duplicate_of:
                owner, slot = duplicate_of[b.id]
                decisions.append(Decision(b, False, (f"duplicate of {owner} (slot {slot})",)))
            else:
                decisions.append(Decision(b, False, (f"outside retention ({policy.describe()})",)))
        elif b.status == "failed":
            old = now - b.started_at > GRACE
            why = "failed, older than a day" if old else "failed, younger than a day"
            decisions.append(Decision(b, not old, (why,)))
        else:
            # An ok manifest whose artifact is gone is not a backup, but it is evidence: it goes only once
            # retention has moved past it, so an operator sees it in `list` and `verify` until then.
            expired = oldest_kept is not None and b.started_at < oldest_kept and now - b.started_at > GRACE
            decisions.append(Decision(b, not expired, (
                "broken (no intact artifact), older than every kept backup" if expired
                else "broken: ok manifest without an intact artifact (hint: `verify` it, then investigate)",
            )))
    return decisions


# --- prune over the targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stray:
    """An object of our naming that no manifest on any target refers to (the artifact of an interrupted run)."""

    target: str
    key: str
    modified: datetime
    delete: bool
    reason: str


@dataclass
class Plan:
    dry_run: bool
    policy: Policy
    decisions: list[Decision] = field(default_factory=list)
    strays: list[Stray] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)  # incomplete uploads, as target:key
    deleted: dict[str, list[str]] = field(default_factory=dict)  # backup ID or stray -> targets it went from
    errors: list[str] = field(default_factory=list)
    #: the WAL archive's part (app/walretention.py), printed before the summary
    wal_lines: list[str] = field(default_factory=list)
    #: objects S3 Object Lock kept (target:key -> why): not errors; a later prune deletes them
    locked: dict[str, ObjectLocked] = field(default_factory=dict)
    locked_backups: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        """The plan (dry run) or what happened, one readable line per backup and stray."""
        out = [f"prune{' (dry run: nothing is deleted)' if self.dry_run else ''}: {self.policy.describe()}"]
        verb = "delete" if self.dry_run else "deleted"
        for d in self.decisions:
            if d.keep:
                action = "keep"
            elif d.backup.id in self.locked_backups:
                action = "locked"
            elif self.dry_run or d.backup.id in self.deleted:
                action = verb
            else:
                action = "FAILED"
            out.append(f"  {action:<7} {d.backup.id:<40} {d.reason}")
        for s in self.strays:
            name = f"{s.target}:{s.key}"
            action = "keep" if not s.delete else "locked" if name in self.locked else (
                verb if self.dry_run or name in self.deleted else "FAILED")
            out.append(f"  {action:<7} {name}  {s.reason}")
        for key in self.aborted:
            out.append(f"  aborted {key}  incomplete upload older than a day")
        out += self.wal_lines
        kept = sum(d.keep for d in self.decisions)
        gone = sum(not d.keep for d in self.decisions)
        strays = sum(s.delete for s in self.strays)
        out.append(f"prune: keep {kept} backup(s), {verb} {gone} backup(s) and {strays} stray artifact(s)"
                   + ("" if self.dry_run else f", aborted {len(self.aborted)} incomplete upload(s)")
                   + (f"; {len(self.errors)} error(s)" if self.errors else "")
                   + self._locked_summary())
        return out

    def _locked_summary(self) -> str:
        if not self.locked:
            return ""
        held = sum(lock.held for lock in self.locked.values())
        dates = [lock.until for lock in self.locked.values() if lock.until is not None and not lock.held]
        until = f" until {max(dates):%Y-%m-%d %H:%M} UTC at the latest" if dates else ""
        return (f"; kept {len(self.locked)} locked object(s) of {len(self.locked_backups)} backup(s)"
                + (f" ({held} under a legal hold)" if held else "") + f"{until}: S3 Object Lock refuses their "
                "deletion until then, and a later prune deletes them")


def _safe_artifact_key(entry: Entry, target: str, manifest_key: str) -> str | None:
    """The artifact key of ``entry`` if it has our naming beside its manifest; a manifest that points anywhere
    else (hand-edited, foreign) never makes prune delete that object."""
    key = entry.manifest_on(target).artifact
    directory = manifest_key.rsplit("/", 1)[0]
    for ext in layout.ARTIFACT_EXTS:
        if key == f"{directory}/{entry.id}.{ext}":
            return key
    return None


def prune(settings: Settings, targets: Sequence[Target], dry_run: bool = False,
          now: datetime | None = None, protect: Iterable[str] = (), cluster: ClusterId | None = None) -> Plan:
    """Apply retention to every database on every target; with ``dry_run`` only plan. Never raises for a
    target fault: it lands in ``Plan.errors`` (and the CLI exits 1).

    ``protect``: IDs the calling run made (always kept). ``cluster``: this sidecar's cluster; backups of
    another cluster sharing the targets are left to that cluster's own sidecar. Without it each cluster's
    backups are weighed separately, so one cluster's backups never push another's out."""
    now = now or datetime.now(UTC)
    plan = Plan(dry_run=dry_run, policy=Policy.from_settings(settings))
    catalog = load_catalog(targets)
    if catalog.errors:
        for name, error in catalog.errors.items():
            plan.errors.append(f"{name}: {mask(error)}; prune skipped, so retention never decides on a partial view")
        return plan
    entries = {e.id: e for e in catalog.entries}
    plan.decisions = decide(entries.values(), plan.policy, now, cluster, protect)
    plan.decisions, wal_plan = _plan_wal(targets, entries, plan.decisions, plan)
    referenced = {m.artifact for e in entries.values() for m in [e.manifest, *e.manifests.values()]}
    for target in targets:
        for obj in catalog.orphans.get(target.name, []):
            if obj.key not in referenced and _artifact_name(obj.key):
                plan.strays.append(_judge_stray(target, obj.key, obj.modified, targets, now))
    if dry_run:
        if wal_plan is not None:
            plan.wal_lines = wal_plan.lines(dry_run=True)
        _plan_locks(plan, entries, targets, now)
        return plan

    failing: set[str] = set()  # targets that failed a delete: no further deletes there in this run
    for decision in plan.decisions:
        if not decision.keep:
            _delete_backup(entries[decision.backup.id], targets, plan, failing)
    for stray in plan.strays:
        if stray.delete:
            _delete_key(next(t for t in targets if t.name == stray.target), stray.key, f"{stray.target}:{stray.key}",
                        plan, failing)
    if wal_plan is not None:
        from app.walretention import apply_wal

        plan.errors += apply_wal(wal_plan, targets)
        plan.wal_lines = wal_plan.lines(dry_run=False)
    for target in targets:
        try:
            # ``now`` may be shifted by a caller (tests, a catch-up run): the age is measured against it
            older_than = GRACE + (datetime.now(UTC) - now)
            plan.aborted += [f"{target.name}:{key}" for key in target.cleanup_incomplete(older_than)]
        except TargetError as exc:
            plan.errors.append(mask(str(exc)))
    for line in plan.lines()[1:-1]:
        log.debug("prune:%s", line)
    log.info("%s", plan.lines()[-1])
    return plan


def decide(entries: Iterable[Entry], policy: Policy, now: datetime, cluster: ClusterId | None = None,
           protect: Iterable[str] = ()) -> list[Decision]:
    """``select`` over catalog entries as prune sees them (pure: the status page shows the plan from its cache).

    With ``cluster`` another cluster's backups are kept and left to its own sidecar; without it each cluster's
    backups are weighed separately."""
    entries = list(entries)
    foreign = [e for e in entries if cluster is not None and not cluster.matches(e.manifest)]
    others = {e.id for e in foreign}
    return select(
        (Backup(e.id, e.manifest.database, e.manifest.started_at, e.status, e.manifest.slot,
                "this cluster" if cluster is not None else _cluster_key(e))
         for e in entries if e.id not in others),
        policy, now, protect,
    ) + [Decision(_as_backup(e), True, (f"another cluster's backup ({of_manifest(e.manifest).describe()}), left to "
                                        "its own sidecar",)) for e in foreign]


def _cluster_key(e: Entry) -> str | None:
    m = e.manifest
    return m.system_identifier or (f"server {m.source}" if m.source else None)


def _as_backup(e: Entry) -> Backup:
    m = e.manifest
    return Backup(e.id, m.database, m.started_at, e.status, m.slot, _cluster_key(e))


def _plan_wal(targets: Sequence[Target], entries: dict[str, Entry], decisions: list[Decision],
              plan: Plan) -> tuple[list[Decision], Any]:
    """Point-in-time recovery: WAL kept from the oldest kept base backup on; a gap vetoes base deletions."""
    if not any(e.manifest.kind == "base" for e in entries.values()):
        return decisions, None
    from app.walretention import plan_wal

    decisions, wal_plan = plan_wal(targets, entries, decisions)
    plan.errors += wal_plan.errors
    return decisions, wal_plan


def _artifact_name(key: str) -> str | None:
    """The backup ID of ``key`` if its file name is exactly ``<ID>.<one of our extensions>``."""
    return layout.artifact_stem(key.rsplit("/", 1)[-1])


def _judge_stray(target: Target, key: str, modified: datetime, targets: Sequence[Target], now: datetime) -> Stray:
    """An artifact is only a stray when no target has a manifest file for its ID, readable or not: a manifest
    that failed to parse or to download this time must never get its backup's artifact deleted."""
    manifest_key = key.rsplit("/", 1)[0] + "/" + f"{_artifact_name(key)}{layout.MANIFEST_SUFFIX}"
    for t in targets:
        try:
            present = t.stat(manifest_key) is not None
        except TargetError:
            present = True
        if present:
            return Stray(target.name, key, modified, False,
                         f"its manifest on {t.name} cannot be read; left in place (hint: check {manifest_key})")
    if now - modified > GRACE:
        return Stray(target.name, key, modified, True, "artifact without a manifest, older than a day")
    return Stray(target.name, key, modified, False,
                 "artifact without a manifest, younger than a day (a backup may be writing it)")


def _plan_locks(plan: Plan, entries: dict[str, Entry], targets: Sequence[Target], now: datetime) -> None:
    """A dry run under S3 Object Lock says which of the deletions it plans the store would refuse today."""
    from app.targets.s3 import S3Target

    for target in targets:
        if not isinstance(target, S3Target) or not target.settings.object_lock:
            continue
        for d in plan.decisions:
            key = entries[d.backup.id].manifest_keys.get(target.name)
            if d.keep or key is None:
                continue
            try:
                until, held = target.lock_state(key)
            except TargetError as exc:
                plan.errors.append(mask(str(exc)))
                return
            if held or (until is not None and until > now):
                plan.locked[f"{target.name}:{key}"] = ObjectLocked(key, until, held)
                plan.locked_backups.add(d.backup.id)


def _delete_backup(entry: Entry, targets: Sequence[Target], plan: Plan, failing: set[str]) -> None:
    """Manifest first, then artifact, on every target; a target that fails keeps whatever it still has."""
    done = True
    for target in targets:
        manifest_key = entry.manifest_keys.get(target.name) or next(iter(entry.manifest_keys.values()))
        if not _delete_key(target, manifest_key, None, plan, failing):
            done = False
            if f"{target.name}:{manifest_key}" in plan.locked:
                plan.locked_backups.add(entry.id)
            continue  # the manifest stays, so its artifact must stay too
        artifact_key = _safe_artifact_key(entry, target.name, manifest_key)
        if artifact_key is None:
            plan.errors.append(f"{entry.id}: manifest names {entry.manifest_on(target.name).artifact!r}, which is "
                               "not beside it; "
                               "left in place (hint: remove it by hand if it is really this backup's)")
            continue
        if not _delete_key(target, artifact_key, None, plan, failing):
            done = False
            if f"{target.name}:{artifact_key}" in plan.locked:
                plan.locked_backups.add(entry.id)
        for drill_key in entry.drill_keys.get(target.name, []):  # the backup's drill records go with it
            _delete_key(target, drill_key, None, plan, failing)
    if done:
        plan.deleted[entry.id] = [t.name for t in targets]


def _delete_key(target: Target, key: str, record: str | None, plan: Plan, failing: set[str]) -> bool:
    if target.name in failing:
        return False
    try:
        target.delete(key)
    except ObjectLocked as locked:  # retained or held: kept on purpose, never an error
        plan.locked[f"{target.name}:{key}"] = locked
        return False
    except TargetError as exc:
        failing.add(target.name)
        plan.errors.append(f"{mask(str(exc))} (prune stopped deleting on {target.name})")
        return False
    if record is not None:
        plan.deleted[record] = [target.name]
    return True


def prune_command(settings: Settings, dry_run: bool, notifier: Notifier | None = None) -> bool:
    """`backup-sidecar prune [--dry-run]`: print the plan or the outcome; True unless something failed.

    A real prune holds the run lock (a backup or restore in progress is never pruned under it); a dry run
    only reads, so it does not wait for one.
    """
    from app.locks import LockBusy, run_lock

    targets = make_targets(settings)
    cluster = try_server_identity(settings)
    if dry_run:
        plan = prune(settings, targets, dry_run=True, cluster=cluster)
    else:
        try:
            with run_lock(settings, "prune"):
                plan = prune(settings, targets, cluster=cluster)
        except LockBusy as exc:
            print(f"backup-sidecar: skipped: {exc}", file=sys.stderr)
            return True
    for line in plan.lines():
        print(line)
    for error in plan.errors:
        print(f"backup-sidecar: error: {error}", file=sys.stderr)
        if notifier is not None:
            notifier.failure("prune", None, error)
    return plan.ok
