"""`restore` and drills of a SQLite backup: the image is written beside the live file, checked, and renamed
over it in one step, so the file is either the old one or the whole restored one, never a mixture.

A file an application holds open is refused unless ``--force``: a process keeps the inode it opened (its
writes after the rename go to the replaced file, which is lost) and, in WAL mode, keeps writing the -wal by
name, which would then be replayed into the restored file. Who holds it is found two ways
(app/engines/sqlite.py ``holders``): /proc/*/fd for processes of this container, and the POSIX locks SQLite
takes (every WAL connection holds one on the -shm; a rollback-mode writer on the database's lock bytes),
which the kernel reports across containers sharing the volume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app import contents
from app.catalog import Entry
from app.engines.sqlite import SqliteError, holders, integrity, open_contents, replace_file, write_image
from app.errors import SidecarError
from app.logs import mask
from app.manifest import Manifest
from app.readpath import Progress, archive_chunks
from app.selection import pick_source
from app.settings import Settings
from app.targets import Target

log = logging.getLogger(__name__)


def destination(settings: Settings, to: str) -> Path:
    """``--to-db``: a SQLITE_PATHS name (its file), or an absolute path."""
    path = settings.sqlite.path_of(to) if settings.sqlite else None
    if path is not None:
        return path
    if not os.path.isabs(to):
        names = ", ".join(n for n, _ in settings.sqlite.files) if settings.sqlite else "none configured"
        raise SidecarError(f"--to-db {to}: a SQLite backup is restored to a file",
                           hint=f"give the file's absolute path, or a name of SQLITE_PATHS ({names})")
    return Path(to)


def _tables(path: Path) -> int:
    try:
        return len(open_contents(path)["rows"])
    except Exception as exc:  # noqa: BLE001 - sqlite3.DatabaseError: not a database
        raise SidecarError(f"{path} is not a SQLite database ({exc})",
                           hint="restore to another path, or move the file away first") from exc


def _check_image(path: Path, manifest: Manifest) -> None:
    problems = integrity(path)
    if problems:
        raise SqliteError(f"the restored image fails PRAGMA integrity_check: {'; '.join(problems[:3])}",
                          hint="use another backup")
    if manifest.contents:
        differ, _ = contents.compare(manifest.contents, open_contents(path))
        if differ:
            raise SqliteError(f"the restored image differs from what was backed up: {'; '.join(differ[:3])}",
                              hint="use another backup")


def restore_sqlite(settings: Settings, targets: Sequence[Target], entry: Entry, to: str, *, create: bool,
                   clean: bool, yes: bool, force: bool, source: str | None,
                   confirm: Callable[[str], bool] | None, progress: bool) -> Any:
    from app.restore import RestoreResult, confirm_restore, fail_restore

    dest = destination(settings, to)
    target = pick_source(entry, targets, source)
    manifest = entry.manifest_on(target.name)
    exists = dest.exists()
    if not exists and not create:
        raise SidecarError(f"{dest} does not exist", hint="add --create to create it")
    if not dest.parent.is_dir():
        raise SidecarError(f"{dest.parent} is not a directory", hint="create it, or mount the volume there")
    tables = _tables(dest) if exists and dest.stat().st_size else 0
    if tables and not clean:
        raise SidecarError(f"{dest} is not empty ({tables} tables)",
                           hint="restore to a new file with --create, or add --clean to replace it")
    busy = holders(dest) if exists else []
    if busy and not force:
        raise SidecarError(f"{dest} is open: {'; '.join(busy)}",
                           hint="stop the application first; --force replaces it anyway, and the application "
                                "must then be restarted before it writes again")
    if not yes:
        confirm_restore(entry, target, str(dest), tables, exists, confirm)
    image = dest.parent / f".{dest.name}.bs-restore-{secrets.token_hex(4)}"
    meter = Progress(f"restore {entry.id}", manifest.size_bytes) if progress else None
    t0 = time.monotonic()
    untouched = f"{dest} was not touched" if exists else f"{dest} was not created"
    try:
        write_image(archive_chunks(target, manifest, meter), image)
        _check_image(image, manifest)
        if exists:
            st = dest.stat()
            with contextlib.suppress(PermissionError):
                os.chown(image, st.st_uid, st.st_gid)
            os.chmod(image, st.st_mode & 0o7777)
            busy = holders(dest)
            if busy and not force:
                raise SidecarError(f"{dest} was opened during the restore: {'; '.join(busy)}",
                                   hint="stop the application first")
        replace_file(image, dest)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
        fail_restore(exc, manifest, str(dest), untouched)
    if meter is not None:
        meter.finish()
    notes = [f"it was open ({'; '.join(busy)}): restart that application now"] if busy else []
    return RestoreResult(entry.id, target.name, str(dest), manifest.size_bytes, time.monotonic() - t0,
                         not exists, len(open_contents(dest)["rows"]),
                         "written beside it, integrity_check passed, renamed over it", notes=notes)


def drill(entry: Entry, target: Target, record: Any) -> None:
    """Restore into a scratch file, PRAGMA integrity_check, compare row counts; the file is always removed."""
    m = entry.manifest_on(target.name)
    fd, name = tempfile.mkstemp(prefix="backup_sidecar_restore_test_", suffix=".sqlite")
    os.close(fd)
    os.unlink(name)
    path = Path(name)
    t0 = time.monotonic()
    try:
        write_image(archive_chunks(target, m), path)
        problems = integrity(path)
        if problems:
            record.error = f"from {target.name}: PRAGMA integrity_check: {'; '.join(problems[:3])}"
            return
        actual = open_contents(path)
        record.rto_s = round(time.monotonic() - t0, 2)
        if m.contents:
            record.problems, record.compared = contents.compare(m.contents, actual)
        else:
            record.compared = f"{len(actual['rows'])} tables restored (no recorded contents to compare with)"
        record.compared = "integrity_check ok; " + record.compared
        record.status = "failed" if record.problems else "ok"
        if record.problems:
            record.error = (f"from {target.name}: what came back differs from what was dumped: "
                            + "; ".join(record.problems[:5]))
    except (SidecarError, OSError, sqlite3.Error) as exc:
        record.error = f"restore from {target.name} into a scratch file failed: {mask(str(exc))}"
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")
