"""SQLite files (SQLITE_PATHS): a consistent snapshot while the application keeps writing, and the way back.

The snapshot is SQLite's online backup API in one step (``backup(pages=-1)``): one read transaction copies
every page. In WAL mode a reader never blocks writers, so the application is not blocked at all; in
rollback-journal mode the read lock makes writers wait for the copy, which runs at local disk speed (see
scripts/bench_engines.py for the measured bound). A stepwise backup would release the lock between steps,
but restarts from the first page whenever another connection writes, so under a steady writer it never
ends. ``VACUUM INTO`` gives the same guarantees but rebuilds every b-tree, several times slower, holding the
lock longer. Reading the file raw is no snapshot in WAL mode (committed pages may still be in the -wal), and
the page-reading virtual table (sqlite_dbpage) is not compiled into Debian's SQLite.

So one temporary copy is made: in TMPDIR, as large as the database (no more: one file at a time per
stream), unlinked as soon as it is complete and streamed from its open descriptor, so no copy outlives the
backup, whatever ends it. Rows are counted in that copy: the manifest's counts are what the artifact holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.backup import Artifact
from app.cancel import Cancelled, CancelToken
from app.errors import SidecarError

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
MAGIC = b"SQLite format 3\x00"
#: How long a backup waits for a writer's lock before the copy starts (a writer mid-commit in rollback mode).
BUSY_TIMEOUT_MS = 30_000


class SqliteError(SidecarError):
    """A SQLite file that cannot be backed up or restored, as one line with a hint."""


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def contents_of(conn: sqlite3.Connection) -> dict[str, Any]:
    """``contents`` of a SQLite database: exact rows per table and object counts from sqlite_schema."""
    objects: dict[str, int] = {"tables": 0, "indexes": 0, "views": 0, "triggers": 0}
    names = []
    for kind, name in conn.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_%' "
                                   "ESCAPE '\\' ORDER BY name"):
        key = {"table": "tables", "index": "indexes", "view": "views", "trigger": "triggers"}.get(kind)
        if key:
            objects[key] += 1
        if kind == "table":
            names.append(name)
    rows = {}
    for name in names:
        try:
            rows[name] = int(conn.execute(f"SELECT count(*) FROM {_quote(name)}").fetchone()[0])  # noqa: S608
        except sqlite3.OperationalError:  # a virtual table whose module is not loaded here
            rows[name] = None
    return {"rows": rows, "rows_exact": True, "objects": objects}


def journal_mode(path: Path) -> str:
    with contextlib.closing(_connect(path, readonly=True)) as conn:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])


def _check_source(name: str, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except FileNotFoundError as exc:
        raise SqliteError(f"{name}: {path} does not exist",
                          hint="check SQLITE_PATHS and that the application's volume is mounted here") from exc
    except OSError as exc:
        raise SqliteError(f"{name}: cannot read {path}: {exc.strerror or exc}",
                          hint="the sidecar needs read and write access to the file and its directory "
                               "(SQLite readers write the -shm file in WAL mode)") from exc
    if head and head != MAGIC:
        raise SqliteError(f"{name}: {path} is not a SQLite database", hint="check SQLITE_PATHS")


def sqlite_artifact(name: str, path: Path, cancel: CancelToken, tmpdir: str | None = None) -> Artifact:
    """The Artifact of one SQLite file: a snapshot copy, streamed and removed."""
    contents: dict[str, Any] = {"rows": {}, "rows_exact": True, "objects": {}}
    facts: dict[str, Any] = {}

    def preflight() -> dict[str, Any]:
        _check_source(name, path)
        facts["journal_mode"] = journal_mode(path)
        return {"engine": "sqlite", "client_version": f"SQLite {sqlite3.sqlite_version}", "server_version": None,
                "contents": contents, "source": None, "position": facts,
                "database_properties": {"path": str(path)}}

    @contextmanager
    def open_source() -> Iterator[tuple[Iterator[bytes], Callable[[], list[str]]]]:
        copy = _snapshot(name, path, cancel, tmpdir, contents, facts)
        try:
            def chunks() -> Iterator[bytes]:
                while chunk := copy.read(CHUNK):
                    if cancel.cancelled:
                        raise Cancelled(f"interrupted: {cancel.reason}")
                    yield chunk

            yield chunks(), list
        finally:
            copy.close()

    return Artifact(name, "database", "sqlite", open_source, preflight)


def _snapshot(name: str, path: Path, cancel: CancelToken, tmpdir: str | None, contents: dict[str, Any],
              facts: dict[str, Any]) -> Any:
    """The consistent copy, counted, unlinked and open for reading."""
    fd, tmp = tempfile.mkstemp(prefix=f".bs-sqlite-{name}-", suffix=".tmp", dir=tmpdir)
    os.close(fd)
    try:
        src = _connect(path)
        dst = sqlite3.connect(tmp, isolation_level=None)
        try:
            t0 = time.monotonic()
            src.backup(dst, pages=-1)  # one read transaction: the whole snapshot at once
            facts["snapshot_s"] = round(time.monotonic() - t0, 3)
            contents.update(contents_of(dst))
        finally:
            dst.close()
            src.close()
        if cancel.cancelled:
            raise Cancelled(f"interrupted: {cancel.reason}")
        copy = open(tmp, "rb")  # noqa: SIM115 - handed to the caller, who closes it
    except sqlite3.Error as exc:
        text = str(exc)
        hint = ("TMPDIR needs free space for one copy of the database "
                f"({_size(path)}); point TMPDIR at a volume with room") if "full" in text else \
            "check that the file is a healthy SQLite database the sidecar may read and write"
        raise SqliteError(f"{name}: the snapshot of {path} failed: {text}", hint=hint) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # the open descriptor keeps the data until the stream is done
    log.info("%s: snapshot of %s (%s mode) in %.2fs", name, path, facts.get("journal_mode"), facts["snapshot_s"])
    return copy


def _size(path: Path) -> str:
    from app.durations import format_size

    try:
        return format_size(path.stat().st_size)
    except OSError:
        return "its size"


# --- checking an image ---------------------------------------------------------------------------------------


def header_facts(head: bytes) -> tuple[int, int] | None:
    """(page size, page count) from a database header, None when the in-header count is not valid."""
    if len(head) < 100 or not head.startswith(MAGIC):
        return None
    page_size = struct.unpack(">H", head[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    change, count, valid_for = struct.unpack(">I", head[24:28])[0], struct.unpack(">I", head[28:32])[0], \
        struct.unpack(">I", head[92:96])[0]
    return (page_size, count) if change == valid_for and count else None


def check_image(chunks: Iterable[bytes]) -> str:
    """A stored SQLite image read to the end: the header, and a size that is whole pages of it."""
    head = b""
    total = 0
    for chunk in chunks:
        if len(head) < 100:
            head += chunk[: 100 - len(head)]
        total += len(chunk)
    if not head.startswith(MAGIC):
        raise SqliteError("the artifact is not a SQLite database image", hint="use another backup")
    facts = header_facts(head)
    if facts and facts[0] * facts[1] != total:
        raise SqliteError(f"the SQLite image has {total} bytes, its header says {facts[1]} pages of {facts[0]} "
                          "(cut short or padded)", hint="use another backup")
    return f"SQLite image complete ({total // (facts[0] if facts else 1)} pages)"


def write_image(chunks: Iterable[bytes], dest: Path) -> None:
    """The image into ``dest`` (a new file), flushed to disk."""
    with open(dest, "xb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def integrity(path: Path) -> list[str]:
    """PRAGMA integrity_check of ``path``: the problems, empty when it is sound."""
    with contextlib.closing(_connect(path)) as conn:
        found = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
    return [] if found == ["ok"] else found


def open_contents(path: Path) -> dict[str, Any]:
    with contextlib.closing(_connect(path)) as conn:
        return contents_of(conn)


# --- who holds a database open ----------------------------------------------------------------------------------

#: SQLite's lock bytes in the database file (PENDING, RESERVED, the SHARED range) and the -shm file's locks
#: (write, checkpoint, recover, 5 read marks, and the DMS byte every open WAL connection holds shared).
_DB_LOCKS = (0x40000000, 512)
_SHM_LOCKS = (120, 9)


def _conflicting_lock(path: Path, start: int, length: int) -> int | None:
    """The pid holding a POSIX lock that conflicts with a write lock on the range (None: none, or no file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
        kind, _, _, _, pid = struct.unpack("hhqqi", answer)
        return pid if kind != fcntl.F_UNLCK else None
    finally:
        os.close(fd)


def _open_by(path: Path) -> list[int]:
    """Processes this one can see (same PID namespace, enough rights) with ``path`` open, from /proc/*/fd."""
    me, found = os.getpid(), []
    try:
        target = os.stat(path)
    except OSError:
        return []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            for fd in (proc / "fd").iterdir():
                try:
                    st = os.stat(fd)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                    found.append(int(proc.name))
                    break
        except OSError:
            continue
    return found


def holders(path: Path) -> list[str]:
    """Who has the database open, as far as Linux tells: processes with it open (/proc/*/fd, which sees this
    container's processes), and POSIX locks on its lock bytes or its -shm (which every open WAL connection
    holds, and which the kernel shows across containers sharing the volume). Empty: nobody that we can see."""
    out = [f"pid {pid} has it open" for pid in _open_by(path)]
    for file, (start, length) in ((path, _DB_LOCKS), (Path(f"{path}-shm"), _SHM_LOCKS)):
        pid = _conflicting_lock(file, start, length)
        if pid is not None:
            who = f"pid {pid}" if pid > 0 else "a process"
            out.append(f"{who} holds a lock on {file.name}")
    return out


def replace_file(image: Path, dest: Path) -> None:
    """Put ``image`` at ``dest`` in one rename, with the old file's journal and WAL files out of the way
    (a stale -wal beside a new file would be replayed into it), and the directory flushed."""
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{dest}{suffix}")
    os.replace(image, dest)
    dirfd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
