"""A directory target (NAS mount, volume, local disk) with crash-safe publication.

Data goes to a partial name in the final directory, is fsynced, then hard-linked to the final name (which
refuses to replace an existing backup) and the directory is fsynced, so a power cut leaves either the
complete file or nothing at the final name.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from app.targets.base import ObjectInfo, Target, TargetError, Upload

log = logging.getLogger(__name__)
PARTIAL_MARK = ".partial-"
WRITEBACK_STEP = 16 * 1024 * 1024


def _fsync_dir(path: Path) -> None:
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


class _NasUpload(Upload):
    def __init__(self, final: Path) -> None:
        self.final = final
        self.partial = final.with_name(f"{final.name}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}")
        self.written = self.flushed = 0
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.file: BinaryIO | None = open(self.partial, "xb")  # noqa: SIM115 - closed in commit/abort
        except OSError as exc:
            raise _oserror("create", self.partial, exc) from exc

    def write(self, data: bytes) -> None:
        assert self.file is not None, "write after commit/abort"
        try:
            self.file.write(data)
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
        self.file.flush()
        if hasattr(os, "posix_fadvise"):
            start = max(0, self.flushed - WRITEBACK_STEP)  # the previous step is clean by now: this drops it
            os.posix_fadvise(self.file.fileno(), start, self.written - start, os.POSIX_FADV_DONTNEED)
        self.flushed = self.written

    def commit(self) -> None:
        assert self.file is not None, "commit after commit/abort"
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
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


class NasTarget(Target):
    name = "nas"

    def __init__(self, root: Path, create: bool = False) -> None:
        self.root = root
        self.create = create

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise TargetError(f"NAS: key {key!r} escapes {self.root} (hint: this is a bug; please report it)")
        return path

    def check(self) -> None:
        if self.create and not self.root.exists():
            try:
                self.root.mkdir(parents=True)
            except OSError as exc:
                raise _oserror("create", self.root, exc) from exc
        if not self.root.is_dir():
            raise TargetError(
                f"NAS: {self.root} does not exist or is not a directory "
                "(hint: mount the backup volume there or fix NAS_PATH; the sidecar does not create it, so an "
                "unmounted volume cannot silently fill the container's disk)"
            )
        probe = self.root / f".backup-sidecar-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # threads check at once
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise _oserror("write to", self.root, exc) from exc

    def begin(self, key: str) -> Upload:
        return _NasUpload(self._path(key))

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
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

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
                    yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))
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
