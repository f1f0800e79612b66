"""The application's files (uploads, configuration) as a streamed tar archive beside the dumps.

It goes through the same compression, hashing, targets and manifests as a dump. Live systems change under a
backup: a file that grows, shrinks or vanishes while it is read is a warning recorded in the manifest (what
GNU tar's exit status 1 means), never a failure; a file or directory the sidecar cannot read fails the run
and is named, because a silently incomplete archive is the failure nobody notices until the restore.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from app.backup import Artifact
from app.cancel import Cancelled, CancelToken
from app.durations import format_duration
from app.errors import SidecarError
from app.proc import ChildFailed
from app.settings import FilesSettings

log = logging.getLogger(__name__)
_CHUNK = 1024 * 1024
_END = object()


class _Aborted(Exception):
    pass


class _QueueWriter:
    """The file object tarfile writes into; hands bounded chunks to the consuming pipeline."""

    def __init__(self, q: queue.Queue[object], stop: threading.Event) -> None:
        self.q = q
        self.stop = stop

    def write(self, data: bytes) -> int:
        while True:
            if self.stop.is_set():
                raise _Aborted()
            try:
                self.q.put(bytes(data), timeout=0.2)
                return len(data)
            except queue.Full:
                continue


class _ExactReader:
    """Reads exactly ``size`` bytes: a file that shrank is padded with zeros so the archive stays valid."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.left = size
        self.short = False

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n) if n else b""
        if len(data) < n:
            self.short = True
            data += b"\0" * (n - len(data))
        self.left -= len(data)
        return data


def _unreadable(path: Path, exc: OSError, what: str = "") -> SidecarError:
    return SidecarError(f"files: cannot read {what}{path}: {exc.strerror} "
                        "(hint: give the sidecar's user read access, or exclude it with FILES_EXCLUDE)")


class _Archiver:
    def __init__(self, cfg: FilesSettings, q: queue.Queue[object], stop: threading.Event,
                 cancel: CancelToken) -> None:
        self.cfg = cfg
        self.q = q
        self.stop = stop
        self.cancel = cancel
        self.warnings: list[str] = []
        self.error: BaseException | None = None

    def _excluded(self, rel: str, name: str) -> bool:
        return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in self.cfg.exclude)

    def _warn(self, message: str) -> None:
        log.warning("files: %s", message)
        self.warnings.append(message)

    def run(self) -> None:
        try:
            with tarfile.open(fileobj=_QueueWriter(self.q, self.stop), mode="w|",  # type: ignore[call-overload]
                              format=tarfile.PAX_FORMAT, bufsize=_CHUNK) as tar:
                for root in self.cfg.paths:
                    self._add_tree(tar, root)
        except _Aborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self.error = exc
        finally:
            self.q.put(_END)

    def _add_tree(self, tar: tarfile.TarFile, root: Path) -> None:
        def fail(exc: OSError) -> None:
            raise _unreadable(Path(exc.filename), exc, "directory ")

        self._add(tar, root, root)
        for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
            here = Path(dirpath)
            keep = []
            for name in sorted(dirnames):
                path = here / name
                if self._excluded(path.relative_to(root).as_posix(), name):
                    continue
                if path.is_symlink():
                    self._add(tar, path, root)  # stored as a link, never followed out of the tree
                else:
                    keep.append(name)
                    self._add(tar, path, root)
            dirnames[:] = keep
            for name in sorted(filenames):
                path = here / name
                if not self._excluded(path.relative_to(root).as_posix(), name):
                    self._add(tar, path, root)

    def _add(self, tar: tarfile.TarFile, path: Path, root: Path) -> None:
        if self.cancel.cancelled:
            raise Cancelled(f"interrupted: {self.cancel.reason}")
        arcname = path.as_posix().lstrip("/")
        try:
            info = tar.gettarinfo(str(path), arcname)
        except FileNotFoundError:
            self._warn(f"{path} vanished before it was read")
            return
        except PermissionError as exc:
            raise _unreadable(path, exc) from exc
        if info is None:
            return  # sockets cannot be archived and need not be
        if not info.isreg():
            tar.addfile(info)
            return
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, after the post-read stat
        except FileNotFoundError:
            self._warn(f"{path} vanished before it was read")
            return
        except PermissionError as exc:
            raise _unreadable(path, exc) from exc
        with f:
            before = os.fstat(f.fileno())
            reader = _ExactReader(f, info.size)
            tar.addfile(info, reader)  # type: ignore[arg-type]
        try:
            after = os.stat(path)
        except FileNotFoundError:
            self._warn(f"{path} vanished while it was read")
            return
        if reader.short:
            self._warn(f"{path} shrank while it was read (padded with zeros to its size at the start)")
        elif (after.st_size, after.st_mtime_ns) != (info.size, before.st_mtime_ns):
            self._warn(f"{path} changed while it was read")


def files_artifact(cfg: FilesSettings, cancel: CancelToken, timeout_s: float) -> Artifact:
    """The Artifact for a tar of FILES_PATHS (minus FILES_EXCLUDE), streamed through a bounded queue."""

    def preflight() -> dict[str, str | None]:
        for root in cfg.paths:
            if not root.is_dir():
                raise SidecarError(f"files: {root} does not exist or is not a directory "
                                   "(hint: mount it into the sidecar or fix FILES_PATHS)")
            if not os.access(root, os.R_OK | os.X_OK):
                raise SidecarError(f"files: cannot read directory {root} (hint: give the sidecar's user read access)")
        return {"pg_dump_version": None, "server_version": None}

    @contextmanager
    def open_source() -> Iterator[tuple[Iterator[bytes], Callable[[], list[str]]]]:
        q: queue.Queue[object] = queue.Queue(maxsize=8)
        stop = threading.Event()
        archiver = _Archiver(cfg, q, stop, cancel)
        thread = threading.Thread(target=archiver.run, name="files-tar", daemon=True)
        thread.start()

        deadline = time.monotonic() + timeout_s

        def chunks() -> Iterator[bytes]:
            while True:
                try:
                    item = q.get(timeout=0.5)
                except queue.Empty:  # a read can hang on a dead mount: the archiver thread is then abandoned
                    if cancel.cancelled:
                        raise Cancelled(f"interrupted: {cancel.reason}") from None
                    if time.monotonic() > deadline:
                        raise ChildFailed(
                            f"files: the archive timed out after {format_duration(timeout_s)} (hint: a file under "
                            "FILES_PATHS may sit on a hung mount; raise BACKUP_TIMEOUT if the tree is just large)"
                        ) from None
                    continue
                if item is _END:
                    return
                yield item  # type: ignore[misc]

        def finish() -> list[str]:
            thread.join(timeout=5)
            if archiver.error is not None:
                raise archiver.error
            return archiver.warnings

        try:
            yield chunks(), finish
        finally:
            stop.set()
            give_up = time.monotonic() + 5
            while thread.is_alive() and time.monotonic() < give_up:  # unblock a writer waiting on a full queue
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
            if thread.is_alive():
                log.error("files: the archiver thread is stuck in a read; it is left behind (a daemon thread)")

    return Artifact(cfg.name, "files", "tar", open_source, preflight)
