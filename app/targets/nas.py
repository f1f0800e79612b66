"""A directory target (NAS mount, volume, local disk) kept as a vault, with crash-safe publication.

Data goes to a partial name in the final directory, is fsynced, gets its SHA-256 as an extended attribute,
then is hard-linked to the final name (which refuses to replace an existing backup) and the directory is
fsynced, so a power cut leaves either the complete file or nothing at the final name. Every directory the
target creates is fsynced into its parent too, or a crash could lose a whole day's directory entry.

Files are 0600 and directories 0700 whatever the umask (0640/0750 with NAS_GROUP_READABLE): a dump holds
every row and the globals hold role password hashes. The target refuses a directory that is not on a
mounted volume unless it carries the marker file written at first use (NAS_REQUIRE_MOUNT=false opts out):
an unmounted volume must never silently fill the container's own disk.

The checksum is an extended attribute, not a sidecar file: it is set on the file before it gets its name,
so every published file carries it (a sidecar file could be missing or stale and would be one more object
for list, prune and sync to keep in step), and it stays with the inode through links and renames. A file
whose attribute disagrees with its manifest (another backup's file in its place) is not intact. A missing
attribute means "unknown", never "damaged": file systems without user xattrs (some NFSv3/SMB mounts) and
copies made without them (rsync without -X) are judged by size, as before.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from app import layout
from app.targets.base import ObjectInfo, Target, TargetError, Upload

log = logging.getLogger(__name__)
PARTIAL_MARK = ".partial-"
WRITEBACK_STEP = 16 * 1024 * 1024
MARKER = ".backup-sidecar"
XATTR = "user.backup_sidecar.sha256"


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new file name, a new subdirectory) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _oserror(action: str, path: Path, exc: OSError) -> TargetError:
    hints = {
        errno.ENOSPC: "the volume is full: free space or lower retention (BACKUP_KEEP_*)",
        errno.EDQUOT: "the disk quota is exhausted: free space or raise the quota",
        errno.EACCES: "check the directory's owner and mode for the sidecar's user",
        errno.EPERM: "check the directory's owner and mode for the sidecar's user",
        errno.EROFS: "the volume is mounted read-only: mount it read-write",
        errno.ENOENT: "the directory is missing: mount the volume or create it",
    }
    hint = hints.get(exc.errno or 0, "check the volume behind NAS_PATH")
    return TargetError(f"NAS: cannot {action} {path}: {exc.strerror or exc} (hint: {hint})")


class _Modes:
    """The vault's permissions: owner only, or owner + group with NAS_GROUP_READABLE."""

    def __init__(self, group_readable: bool) -> None:
        self.file = 0o640 if group_readable else 0o600
        self.dir = 0o750 if group_readable else 0o700


def _makedirs(root: Path, directory: Path, modes: _Modes) -> None:
    """Create ``directory`` (under ``root``) with the vault's mode, each new level fsynced into its parent."""
    missing: list[Path] = []
    d = directory
    while d != root and not d.is_dir():
        missing.append(d)
        d = d.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=modes.dir)
        except FileExistsError:
            continue  # a parallel backup of the same day made it
        os.chmod(path, modes.dir)  # mkdir's mode is filtered by the umask; the vault's is exact
        _fsync_dir(path.parent)


def _read_checksum(path: Path) -> str | None:
    """``sha256:<hex>`` from the file's extended attribute; None without one (an older backup, a manifest, a
    file system without user xattrs, or a copy that did not keep them): such copies are judged by size."""
    try:
        return f"sha256:{os.getxattr(path, XATTR).decode()}"
    except OSError:
        return None


class _NasUpload(Upload):
    def __init__(self, root: Path, final: Path, modes: _Modes) -> None:
        self.final = final
        self.modes = modes
        self.partial = final.with_name(f"{final.name}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}")
        self.written = self.flushed = 0
        self.on_publish: Callable[[], None] | None = None
        try:
            _makedirs(root, final.parent, modes)
            fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, modes.file)
            os.fchmod(fd, modes.file)  # whatever the umask
            self.file: BinaryIO | None = os.fdopen(fd, "wb", buffering=0)  # unbuffered: no copy of each chunk
        except OSError as exc:
            raise _oserror("create", self.partial, exc) from exc

    def write(self, data: bytes) -> None:
        assert self.file is not None, "write after commit/abort"
        try:
            view = memoryview(data)
            while view:
                n = self.file.write(view)
                view = view[n or 0 :]
            self.written += len(data)
            if self.written - self.flushed >= WRITEBACK_STEP:
                self._start_writeback()
        except OSError as exc:
            raise _oserror("write", self.partial, exc) from exc

    def _start_writeback(self) -> None:
        """Start writing the last step to disk now and drop it from the page cache.

        Without it the kernel holds gigabytes of dirty backup bytes until the final fsync (a long stall at
        the end) and pushes the application's database pages out of the cache beside it.
        """
        assert self.file is not None
        if hasattr(os, "posix_fadvise"):
            start = max(0, self.flushed - WRITEBACK_STEP)  # the previous step is clean by now: this drops it
            os.posix_fadvise(self.file.fileno(), start, self.written - start, os.POSIX_FADV_DONTNEED)
        self.flushed = self.written

    def _seal(self, sha256: str | None) -> str | None:
        """fsync, then record the checksum (with the final mtime) on the inode; returns the fingerprint."""
        assert self.file is not None
        fd = self.file.fileno()
        os.fsync(fd)
        if sha256 is None:
            return None
        try:
            os.setxattr(fd, XATTR, sha256.encode())
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.E2BIG):
                raise
            log.debug("NAS: %s keeps no extended attributes (%s); copies are judged by size", self.final,
                      exc.strerror)
            return None
        return f"sha256:{sha256}"

    def commit(self, sha256: str | None = None) -> str | None:
        assert self.file is not None, "commit after commit/abort"
        try:
            checksum = self._seal(sha256)
            self.file.close()
            self.file = None
            try:
                os.link(self.partial, self.final)
            except FileExistsError:
                raise
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                if self.final.exists():  # file systems without hard links: check, then rename
                    raise FileExistsError(errno.EEXIST, "exists", str(self.final)) from exc
                os.rename(self.partial, self.final)
            else:
                os.unlink(self.partial)
            _fsync_dir(self.final.parent)
        except FileExistsError as exc:
            self.abort()
            raise TargetError(f"NAS: {self.final} already exists (hint: an earlier backup is never replaced)") from exc
        except OSError as exc:
            self.abort()
            raise _oserror("publish", self.final, exc) from exc
        if self.on_publish is not None:
            self.on_publish()
        return checksum

    def replace(self) -> None:
        """Publish over whatever is at the final name (atomic rename): for a manifest a catch-up rewrites."""
        assert self.file is not None
        try:
            self._seal(None)
            self.file.close()
            self.file = None
            os.replace(self.partial, self.final)
            _fsync_dir(self.final.parent)
        except OSError as exc:
            self.abort()
            raise _oserror("publish", self.final, exc) from exc

    def abort(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass  # disk full on close: the unlink below is what matters
            self.file = None
        try:
            self.partial.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # read-only remount, stale NFS handle: prune removes the partial later
            log.error("NAS: cannot remove the partial file %s: %s", self.partial, exc.strerror or exc)


def _mount_points() -> set[str] | None:
    """Mount points of this process's namespace (/proc/self/mountinfo), or None where it cannot be read."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    points = set()
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:  # the kernel escapes space, tab, newline and backslash in octal (\040)
            points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def on_mounted_volume(path: Path) -> bool:
    """True when ``path`` or a directory above it (below ``/``) is a mount point: a volume, not the root disk."""
    resolved = path.resolve()
    points = _mount_points()
    for candidate in (resolved, *resolved.parents):
        if candidate == Path(candidate.anchor):
            return False
        if (points is not None and str(candidate) in points) or os.path.ismount(candidate):
            return True
    return False


def mark_directory(root: Path, mode: int = 0o600) -> None:
    """Write the marker that says "this directory is a backup store the sidecar has used" (first use)."""
    marker = root / MARKER
    doc = {"written_by": "backup-sidecar", "host": socket.gethostname(),
           "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "note": "keep this file: unmounted and without it, this directory is refused (NAS_REQUIRE_MOUNT)"}
    tmp = marker.with_name(f"{MARKER}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(json.dumps(doc, indent=2).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
        _fsync_dir(root)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _oserror("write the marker", marker, exc) from exc


class NasTarget(Target):
    name = "nas"

    def __init__(self, root: Path, create: bool = False, *, require_mount: bool = False,
                 group_readable: bool = False) -> None:
        """``create``: the built-in ./backups default, made on first use; ``require_mount``: refuse a
        directory that is neither on a mounted volume nor marked by an earlier use (NAS_REQUIRE_MOUNT)."""
        self.root = root
        self.create = create
        self.require_mount = require_mount
        self.modes = _Modes(group_readable)

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise TargetError(f"NAS: key {key!r} escapes {self.root} (hint: this is a bug; please report it)")
        return path

    def _create_root(self) -> None:
        """The built-in ./backups default only: an explicit NAS_PATH is never created."""
        if self.create and not self.root.exists():
            try:
                self.root.mkdir(parents=True, mode=self.modes.dir)
                os.chmod(self.root, self.modes.dir)
                _fsync_dir(self.root.parent)
            except OSError as exc:
                raise _oserror("create", self.root, exc) from exc

    def check(self) -> None:
        self._create_root()
        if not self.root.is_dir():
            raise TargetError(
                f"NAS: {self.root} does not exist or is not a directory "
                "(hint: mount the backup volume there or fix NAS_PATH; the sidecar does not create it, so an "
                "unmounted volume cannot silently fill the container's disk)"
            )
        marker = self.root / MARKER
        if self.require_mount and not marker.exists() and not on_mounted_volume(self.root):
            raise TargetError(
                f"NAS: {self.root} is not on a mounted volume and carries no {MARKER} marker from an earlier "
                "backup (hint: mount the backup volume at NAS_PATH; if this directory on the local disk really "
                "is the backup store, set NAS_REQUIRE_MOUNT=false)"
            )
        probe = self.root / f".backup-sidecar-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # threads check at once
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise _oserror("write to", self.root, exc) from exc

    def begin(self, key: str, size_hint: int | None = None) -> _NasUpload:
        self._create_root()
        upload = _NasUpload(self.root.resolve(), self._path(key), self.modes)
        if layout.is_own_key(key) and not layout.is_manifest_key(key):
            upload.on_publish = self._mark  # first use: the first backup stored here marks the directory
        return upload

    def _mark(self) -> None:
        if not (self.root / MARKER).exists():
            mark_directory(self.root, self.modes.file)

    def replace_bytes(self, key: str, data: bytes) -> None:
        upload = self.begin(key)
        try:
            upload.write(data)
            upload.replace()
        except BaseException:
            upload.abort()
            raise

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError as exc:
            raise TargetError(f"NAS: {path} is missing (hint: see `backup-sidecar list`)") from exc
        except OSError as exc:
            raise _oserror("read", path, exc) from exc

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _oserror("stat", self._path(key), exc) from exc
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC),
                          _read_checksum(self._path(key)))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return
        def unreadable(exc: OSError) -> None:
            raise exc  # an unreadable directory must fail the listing, not hide the backups inside it

        try:
            for dirpath, dirnames, filenames in os.walk(base, onerror=unreadable):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(filenames):
                    if filename.startswith(".") or PARTIAL_MARK in filename:
                        continue
                    path = Path(dirpath) / filename
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue  # deleted while listing
                    key = path.relative_to(self.root).as_posix()
                    checksum = None if layout.is_manifest_key(key) else _read_checksum(path)
                    yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC), checksum)
        except OSError as exc:
            raise _oserror("list", base, exc) from exc

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _oserror("delete", path, exc) from exc
        root = self.root.resolve()
        parent = path.parent
        while parent != root and root in parent.parents:
            try:
                parent.rmdir()  # only empty date directories go
            except OSError:
                break
            parent = parent.parent

    def cleanup_incomplete(self, older_than: timedelta) -> list[str]:
        cutoff = datetime.now(UTC) - older_than
        removed: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for filename in filenames:
                if PARTIAL_MARK not in filename:
                    continue
                path = Path(dirpath) / filename
                if not layout.is_own_key(path.relative_to(self.root).as_posix().split(PARTIAL_MARK)[0]):
                    continue  # not a partial of the sidecar's layout: someone else's file
                try:
                    if datetime.fromtimestamp(path.stat().st_mtime, UTC) < cutoff:
                        path.unlink()
                        removed.append(path.relative_to(self.root).as_posix().split(PARTIAL_MARK)[0])
                except FileNotFoundError:
                    continue
        return removed

    def free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return None
