"""What the WAL archiver knows about itself, and the /health checks and /metrics values made from it.

The recovery point's age is measured, not guessed: the shipper records the moment of the last pass at which
everything pg_receivewal had written was on every target (for a partial segment: the moment it was read, as
what it held then is what was shipped) while the receiver was streaming. Idle or busy, ``now`` minus that
moment bounds the writes a disaster would lose. The slot's retained bytes are read from the server, because an
abandoned slot fills the *server's* disk, which no target can show.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.durations import format_duration, format_size
from app.manifest import Manifest, utc_iso

OK, WARNING, CRITICAL = "ok", "warning", "critical"


@dataclass
class SlotReading:
    """One look at the replication slot on the server."""

    at: datetime
    exists: bool
    retained_bytes: int | None = None  # pg_current_wal_lsn() - restart_lsn
    wal_status: str | None = None  # reserved | extended | unreserved | lost
    active: bool = False
    error: str | None = None


@dataclass
class WalStatus:
    """Shared by the receiver, the shipper and /health; plain fields under one lock."""

    slot_name: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    receiver_streaming: bool = False
    receiver_error: str | None = None
    receiver_restarts: int = 0
    archived_lsn: int | None = None
    archived_at: datetime | None = None  # the newest file stored on some target
    covered_at: datetime | None = None  # everything received was on every target at this moment
    pending: int = 0
    target_errors: dict[str, str] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    files_shipped: int = 0
    slot: SlotReading | None = None
    base_running_since: datetime | None = None
    base_error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def shipped_pass(self, pending: int, waiting: dict[str, str], covered_at: datetime | None) -> None:
        """After a target's pass: files some target lacks, why each lagging target lacks them, and the moment
        before which everything received is on every target (never moves back)."""
        with self._lock:
            self.pending = pending
            self.target_errors = dict(waiting)
            if covered_at is not None and (self.covered_at is None or covered_at > self.covered_at):
                self.covered_at = covered_at

    def archived(self, lsn: int) -> None:
        with self._lock:
            self.archived_lsn = max(self.archived_lsn or 0, lsn)
            self.archived_at = datetime.now(UTC)

    def shipped_file(self) -> None:
        with self._lock:
            self.files_shipped += 1

    def conflict(self, what: str) -> None:
        with self._lock:
            if what not in self.conflicts:
                self.conflicts.append(what)

    def receiver(self, streaming: bool, error: str | None = None, restarted: bool = False) -> None:
        with self._lock:
            self.receiver_streaming = streaming
            if error is not None or streaming:
                self.receiver_error = error
            if restarted:
                self.receiver_restarts += 1

    def copy(self) -> WalStatus:
        with self._lock:
            return WalStatus(
                self.slot_name, self.started_at, self.receiver_streaming, self.receiver_error, self.receiver_restarts,
                self.archived_lsn, self.archived_at, self.covered_at, self.pending, dict(self.target_errors),
                list(self.conflicts), self.files_shipped, self.slot, self.base_running_since, self.base_error,
            )

    def age_s(self, now: datetime) -> float:
        """Seconds of writes not yet known to be archived everywhere (since start when never covered)."""
        since = self.covered_at or self.started_at
        return max(0.0, (now - since).total_seconds())


@dataclass(frozen=True)
class WalCheck:
    name: str
    status: str
    message: str


def wal_checks(status: WalStatus, newest_base: Manifest | None, warn_age_s: float, crit_age_s: float,
               slot_warn: int, slot_crit: int, now: datetime) -> list[WalCheck]:
    """The /health checks of point-in-time recovery: archive age, the slot's retained WAL, base backups."""
    return [_age_check(status, warn_age_s, crit_age_s, now), _slot_check(status, slot_warn, slot_crit),
            _base_check(status, newest_base, now)]


def _age_check(s: WalStatus, warn_s: float, crit_s: float, now: datetime) -> WalCheck:
    age = s.age_s(now)
    where = f" up to {_lsn(s.archived_lsn)}" if s.archived_lsn else ""
    text = (f"WAL archived{where}; everything received was on every target {format_duration(age)} ago"
            if s.covered_at else f"no WAL archived to every target yet ({format_duration(age)} since start)")
    problems = []
    if not s.receiver_streaming:
        problems.append(f"pg_receivewal is not streaming: {s.receiver_error or 'starting'}")
    if s.pending:
        problems.append(f"{s.pending} file(s) wait in the spool for " + ", ".join(
            f"{name} ({err.splitlines()[0][:160]})" for name, err in sorted(s.target_errors.items())))
    if s.conflicts:
        problems.append(f"CONFLICT: {', '.join(s.conflicts[:3])} already stored with other bytes")
    text = "; ".join([text, *problems])
    if s.conflicts or age > crit_s:
        return WalCheck("wal_archive", CRITICAL, f"{text} (older than WAL_CRIT_AGE {format_duration(crit_s)})"
                        if age > crit_s else text)
    if age > warn_s:
        return WalCheck("wal_archive", WARNING, f"{text} (older than WAL_WARN_AGE {format_duration(warn_s)})")
    return WalCheck("wal_archive", OK, text)


def _slot_check(s: WalStatus, warn: int, crit: int) -> WalCheck:
    r = s.slot
    hint = ("(hint: the server keeps every WAL file the slot has not confirmed; cap it with max_slot_wal_keep_size "
            "on the server, or drop an abandoned slot with SELECT pg_drop_replication_slot('" + s.slot_name + "'))")
    if r is None:
        return WalCheck("wal_slot", OK, f"slot {s.slot_name}: not read yet")
    if r.error:
        return WalCheck("wal_slot", WARNING, f"slot {s.slot_name}: cannot read it: {r.error}")
    if not r.exists:
        return WalCheck("wal_slot", WARNING, f"slot {s.slot_name} does not exist on the server yet")
    if r.wal_status == "lost":
        return WalCheck("wal_slot", CRITICAL, f"slot {s.slot_name} lost WAL the archive needed (max_slot_wal_keep_size "
                        "was reached): the archive has a gap (hint: take a base backup now: `backup-sidecar "
                        "base-backup`)")
    size = r.retained_bytes or 0
    text = f"slot {s.slot_name} retains {format_size(size)} of WAL on the server (read {utc_iso(r.at)})"
    if size > crit:
        return WalCheck("wal_slot", CRITICAL, f"{text}, over WAL_SLOT_CRIT_SIZE {format_size(crit)} {hint}")
    if size > warn:
        return WalCheck("wal_slot", WARNING, f"{text}, over WAL_SLOT_WARN_SIZE {format_size(warn)} {hint}")
    return WalCheck("wal_slot", OK, text)


def _base_check(s: WalStatus, newest: Manifest | None, now: datetime) -> WalCheck:
    if s.base_error:
        return WalCheck("base_backup", CRITICAL, f"the last base backup failed: {s.base_error}")
    if newest is None:
        running = f" (one is running since {utc_iso(s.base_running_since)})" if s.base_running_since else ""
        return WalCheck("base_backup", WARNING, f"no base backup yet: point-in-time recovery needs one{running}")
    age = (now - (newest.finished_at or newest.started_at)).total_seconds()
    return WalCheck("base_backup", OK, f"newest base backup {newest.id} is {format_duration(age)} old, "
                    f"{format_size(newest.size_bytes)}")


def _lsn(lsn: int | None) -> str:
    return "-" if lsn is None else f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def wal_doc(s: WalStatus, now: datetime) -> dict[str, Any]:
    """The ``wal`` block of /health: the numbers behind the checks."""
    return {
        "age_seconds": int(s.age_s(now)),
        "archived_lsn": _lsn(s.archived_lsn) if s.archived_lsn else None,
        "archived_at": utc_iso(s.archived_at),
        "receiver_streaming": s.receiver_streaming,
        "pending_files": s.pending,
        "slot": s.slot_name,
        "slot_retained_bytes": s.slot.retained_bytes if s.slot else None,
    }
