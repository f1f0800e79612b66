"""Coordination as leases: whatever says "this run may write this slot" (the LOCK_FILE flock, the advisory
lock on the database) is a Lease that can be asked, cheaply and at any time, whether it is still held.

The backup pipeline calls ``check()`` while it streams and once more right before it publishes a copy, so a
lease lost mid-run (an idle-session timeout, pg_terminate_backend, a failover) fails the run instead of
letting two hosts publish the same slot.

* ``FileLease``: the flock itself cannot be taken away, but the name can: a LOCK_FILE deleted or replaced
  while held lets the next instance lock a different inode under the same name. ``check()`` compares inodes.
* ``AdvisoryLease``: a session-level ``pg_try_advisory_lock`` on a connection of its own. That session is
  made hard to lose (TCP keepalives both ways, ``idle_session_timeout``, ``statement_timeout`` and
  ``idle_in_transaction_session_timeout`` off for it) and is probed by a monitor thread every ``PROBE_S``;
  ``check()`` reads the monitor's verdict and probes once more itself when the last probe is older than
  ``FRESH_S``, so the check right before publishing is at most that old.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import psycopg

from app.errors import SidecarError

log = logging.getLogger(__name__)


class LeaseLost(SidecarError):
    """A lease this run relied on is gone; the message says which and why."""


class Lease(Protocol):
    def check(self) -> None:
        """Raise LeaseLost when the lease is no longer held. Cheap: callers may call it for every chunk."""
        ...

    def release(self) -> None:
        """Give the lease up (idempotent)."""
        ...


class FileLease:
    """The flock on LOCK_FILE held through ``fd`` (opened and closed by app.locks)."""

    def __init__(self, path: Path, fd: int, what: str) -> None:
        self.path, self.what = path, what
        st = os.fstat(fd)
        self._inode = (st.st_dev, st.st_ino)
        self._released = False

    def check(self) -> None:
        if self._released:
            raise LeaseLost(f"{self.what}: the lock on {self.path} was already released")
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._inode
        except OSError:
            same = False
        if not same:
            raise LeaseLost(f"{self.what}: the lock file {self.path} was removed or replaced while held, so another "
                            "instance can lock it too (hint: never delete LOCK_FILE; it is safe to leave in place)")

    def release(self) -> None:
        self._released = True


_HELD_SQL = """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
  AND objsubid = 1 AND classid = %s::bigint::oid AND objid = %s::bigint::oid"""

#: The claim session's own settings: nothing on the server may end it for being idle or slow.
_SESSION_SETTINGS = ("idle_session_timeout", "statement_timeout", "idle_in_transaction_session_timeout")
_KEEPALIVE_IDLE_S, _KEEPALIVE_INTERVAL_S, _KEEPALIVE_COUNT = 10, 5, 3


class MonitoredLease:
    """A lease held by a database session of its own, probed by a monitor thread every ``PROBE_S``;
    ``check()`` reads the monitor's verdict and probes once more itself when the last probe is older than
    ``FRESH_S``. Subclasses say how to ask the server (``held``) and how to end the session (``close``)."""

    PROBE_S = 1.0
    FRESH_S = 0.5

    def __init__(self, what: str, lock_words: str) -> None:
        self.what, self.lock_words = what, lock_words
        self._io = threading.Lock()  # one query at a time on the connection
        self._lost: str | None = None
        self._last_ok = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def held(self) -> str | None:
        """None while the server still holds the lock for this session, else why not."""
        raise NotImplementedError

    def close(self) -> None:
        """End the session (the server then frees the lock)."""
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._monitor, name=f"lease-{self.what}", daemon=True)
        self._thread.start()

    def _monitor(self) -> None:
        while not self._stop.wait(self.PROBE_S) and self._lost is None:
            self._probe()

    def _probe(self) -> None:
        with self._io:
            if self._lost is not None or self._stop.is_set():
                return
            reason = self.held()
            if reason is None:
                self._last_ok = time.monotonic()
                return
            self._lost = reason
        log.error("%s: %s was lost: %s", self.what, self.lock_words, reason)

    def check(self) -> None:
        if self._lost is None and time.monotonic() - self._last_ok > self.FRESH_S:
            self._probe()
        if self._lost is not None:
            raise LeaseLost(f"{self.what}: {self.lock_words} was lost ({self._lost}), so "
                            "another host may be backing it up; nothing of this run is published (hint: the "
                            "claim session was ended by the server, an operator, a failover or the network; "
                            "the next run backs up as usual)")

    def release(self) -> None:
        self._stop.set()
        with self._io:
            self.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)


class AdvisoryLease(MonitoredLease):
    """A session-level PostgreSQL advisory lock on its own connection, watched by a monitor thread."""

    def __init__(self, conn: psycopg.Connection, key: int, what: str) -> None:
        super().__init__(what, "the database lock claiming this slot")
        self.conn, self.key = conn, key
        unsigned = key & 0xFFFFFFFFFFFFFFFF
        self._parts = (unsigned >> 32, unsigned & 0xFFFFFFFF)

    @classmethod
    def acquire(cls, conn: psycopg.Connection, key: int, what: str) -> AdvisoryLease | None:
        """Harden the session, try the lock; None when another session holds it. Starts the monitor."""
        _harden(conn)
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if not (row and row[0]):
            return None
        lease = cls(conn, key, what)
        lease.start()
        return lease

    def held(self) -> str | None:
        try:
            row = self.conn.execute(_HELD_SQL, self._parts).fetchone()
        except psycopg.Error as exc:
            return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        return None if row and row[0] else "the server no longer lists the lock for this session"

    def close(self) -> None:
        try:
            self.conn.close()  # ends the session, which releases the advisory lock
        except psycopg.Error:
            pass


class Leases:
    """Several leases checked and released as one."""

    def __init__(self, leases: Sequence[Lease | None]) -> None:
        self.leases = [lease for lease in leases if lease is not None]

    def check(self) -> None:
        for lease in self.leases:
            lease.check()

    def release(self) -> None:
        for lease in reversed(self.leases):
            lease.release()


def _harden(conn: psycopg.Connection) -> None:
    """Keepalives on both ends and no server timeouts for this one session (all are user-settable)."""
    for name in _SESSION_SETTINGS:
        conn.execute(f"SET {name} = 0")
    for name, value in (("tcp_keepalives_idle", _KEEPALIVE_IDLE_S), ("tcp_keepalives_interval", _KEEPALIVE_INTERVAL_S),
                        ("tcp_keepalives_count", _KEEPALIVE_COUNT)):
        conn.execute(f"SET {name} = {int(value)}")
    try:
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except OSError as exc:  # a Unix socket has no keepalives; nothing to set
        log.debug("no client keepalives on the claim session: %s", exc)
        return
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPALIVE_IDLE_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPALIVE_INTERVAL_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPALIVE_COUNT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            1000 * (_KEEPALIVE_IDLE_S + _KEEPALIVE_INTERVAL_S * _KEEPALIVE_COUNT))
    finally:
        sock.close()  # closes the duplicate only; the options stay on the shared socket
