"""Never twice on one volume: flocks on LOCK_FILE and its sibling ``LOCK_FILE.readers``.

The scheme (``run_lock``): a backup holds LOCK_FILE exclusively (one writer of new backups); a restore or a
drill holds ``.readers`` shared (it only reads backups, so it neither waits for a backup nor blocks one, and
restores do not block each other); prune holds both exclusively, so it waits for backups and restores alike and never
deletes what a restore is reading.

``flock`` belongs to the open file, so the kernel drops it the moment its holder dies, even by ``kill -9``:
a stale lock can never block the next run, and nothing has to guess whether a recorded pid is still alive.
The file's content (host, pid, start time, operation) is only there so that whoever finds the lock taken
can say who holds it. The file is never deleted: unlinking a lock file lets two processes lock two
different inodes under one name.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from app.cancel import Cancelled, CancelToken
from app.durations import format_duration
from app.errors import SidecarError
from app.leases import FileLease
from app.settings import Settings

log = logging.getLogger(__name__)

_POLL_S = 0.2


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, as its holder recorded it."""

    host: str
    pid: int
    since: str  # UTC ISO
    what: str
    #: the held lock as a lease (set for the holder itself, not for a holder read back from the file)
    lease: FileLease | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        return f"{self.host} since {self.since} (pid {self.pid}, {self.what})"


class LockBusy(SidecarError):
    """Another run holds the lock; str() names the holder. Callers skip (exit 0), they do not fail."""

    def __init__(self, what: str, holder: Holder | None, path: Path, message: str | None = None) -> None:
        self.what = what
        self.holder = holder
        self.path = path
        who = holder.describe() if holder else f"another process (lock file {path})"
        super().__init__(message or f"{what}: already running on {who}, skipping")


class LockError(SidecarError):
    """The lock file cannot be used at all (missing volume, permissions)."""


# The lock this process holds, so prune called from inside a backup does not lock itself out.
_held: dict[str, int] = {}  # lock path -> owning thread id
_held_guard = threading.Lock()


def _open(path: Path, create_parent: bool) -> int:
    if create_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        hint = (
            "LOCK_FILE must be on a writable volume shared by every instance; mount it or fix LOCK_FILE"
            if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS)
            else "check the volume behind LOCK_FILE"
        )
        raise LockError(f"cannot open the lock file {path}: {exc.strerror or exc} (hint: {hint})") from exc


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in ``path``; None when it is empty or unreadable (being written, or released)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8") or "null")
        if not isinstance(doc, dict):
            return None
        return Holder(str(doc["host"]), int(doc["pid"]), str(doc["since"]), str(doc.get("what", "?")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _try_lock(fd: int, shared: bool = False) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def _record(fd: int, host: str, what: str) -> None:
    doc = {
        "host": host,
        "pid": os.getpid(),
        "since": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "what": what,
    }
    data = (json.dumps(doc) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _busy_holder(path: Path) -> Holder | None:
    """Read the holder, allowing it a moment to write its record just after taking the lock."""
    for _ in range(10):
        holder = read_holder(path)
        if holder is not None:
            return holder
        time.sleep(0.02)
    return None


@contextmanager
def file_lock(
    path: Path,
    what: str,
    host: str,
    timeout_s: float = 0.0,
    create_parent: bool = False,
    cancel: CancelToken | None = None,
    shared: bool = False,
) -> Iterator[Holder]:
    """Hold an exclusive (or ``shared``) flock on ``path`` for the block; raise LockBusy after ``timeout_s``.

    Re-entrant within one thread, so an operation that holds the lock can call another that takes it. A
    shared holder records nothing in the file (several hold it at once); an exclusive one records itself.
    """
    key = str(path)
    me = threading.get_ident()
    with _held_guard:
        nested = _held.get(key) == me
    if nested:
        yield Holder(host, os.getpid(), "", what)
        return
    fd = _open(path, create_parent)
    try:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        waited = False
        while not _try_lock(fd, shared):
            if time.monotonic() >= deadline:
                raise LockBusy(what, _busy_holder(path), path)
            if cancel is not None and cancel.cancelled:
                raise Cancelled(f"{what}: interrupted while waiting for the lock: {cancel.reason}")
            if not waited:
                holder = _busy_holder(path)
                log.info(
                    "%s: waiting up to %s for the lock held by %s",
                    what,
                    format_duration(timeout_s),
                    holder.describe() if holder else "another process",
                )
                waited = True
            time.sleep(_POLL_S)
        with _held_guard:
            _held[key] = me
        lease = FileLease(path, fd, what)
        try:
            if not shared:
                _record(fd, host, what)
            found = read_holder(path) if not shared else None
            yield Holder(host, os.getpid(), found.since if found else "", what, lease)
        finally:
            lease.release()
            with _held_guard:
                _held.pop(key, None)
            if not shared:
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass  # the record is informative only; the flock goes with the close below
    finally:
        os.close(fd)


def readers_path(path: Path) -> Path:
    """The sibling lock that restores share and prune takes exclusively."""
    return path.with_name(path.name + ".readers")


@contextmanager
def run_lock(settings: Settings, what: str, cancel: CancelToken | None = None) -> Iterator[Holder]:
    """The locks ``what`` needs (module docstring), waiting up to LOCK_TIMEOUT (or until ``cancel``).

    ``backup``: LOCK_FILE. ``restore`` and ``drill``: LOCK_FILE.readers, shared. ``prune``: both, exclusive.
    LockBusy names the holder (for a restore in the way of prune: the lock file, since shared holders record
    nothing).
    """
    path = settings.lock.path
    create_parent = bool(settings.nas and settings.nas.create_missing and path.parent == settings.nas.path)
    timeout, host = settings.lock.timeout_s, settings.hostname
    if what in ("restore", "drill"):
        with file_lock(readers_path(path), what, host, timeout, create_parent, cancel, shared=True) as holder:
            yield holder
        return
    with file_lock(path, what, host, timeout, create_parent, cancel) as holder:
        if what != "prune":
            yield holder
            return
        try:
            with file_lock(readers_path(path), what, host, timeout, create_parent, cancel):
                yield holder
        except LockBusy as busy:
            if busy.path != readers_path(path):
                raise
            raise LockBusy(what, None, busy.path, f"{what}: a restore is reading the backups (lock file "
                           f"{busy.path}), skipping so nothing it reads is deleted") from None
