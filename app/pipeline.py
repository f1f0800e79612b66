"""The streaming pipeline: producer -> compression -> SHA-256 + byte count -> every target's upload.

No temp file and constant memory: bytes flow in 1 MiB chunks from the producer (pg_dump's stdout, or a tar
stream) straight into the uploads. The producer runs in its own process group, watched by a thread that
kills the whole group on timeout or cancellation, so a hung dump can never hold the sidecar.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

from app.cancel import Cancelled, CancelToken
from app.compression import Compressor
from app.durations import format_duration
from app.errors import SidecarError
from app.logs import mask
from app.targets.base import Upload

CHUNK = 1024 * 1024
log = logging.getLogger(__name__)


class ChildFailed(SidecarError):
    """The producer command exited non-zero, was killed, or timed out."""


@dataclass(frozen=True)
class Streamed:
    raw_bytes: int  # what the producer wrote
    size: int  # what was stored (compressed)
    sha256: str  # of the stored bytes


def pump(chunks: Iterable[bytes], comp: Compressor, uploads: Sequence[Upload],
         cancel: CancelToken | None = None) -> Streamed:
    """Compress, hash and count ``chunks`` and hand every stored byte to each upload."""
    digest = hashlib.sha256()
    raw = size = 0

    def emit(data: bytes) -> None:
        nonlocal size
        if data:
            digest.update(data)
            size += len(data)
            for upload in uploads:
                upload.write(data)

    for chunk in chunks:
        if cancel is not None and cancel.cancelled:
            raise Cancelled(f"interrupted: {cancel.reason}")
        raw += len(chunk)
        emit(comp.compress(chunk))
    emit(comp.flush())
    return Streamed(raw, size, digest.hexdigest())


def stop_process_group(proc: subprocess.Popen[bytes], term_grace_s: float) -> None:
    """SIGTERM the child's whole process group, SIGKILL it if it is still there after ``term_grace_s``."""
    for sig, grace in ((signal.SIGTERM, term_grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


class Child:
    """A producer command (pg_dump, pg_dumpall) streamed from stdout, with bounded stderr and a watchdog.

    Use as a context manager: leaving the block always reaps the whole process group.
    """

    def __init__(self, argv: list[str], env: dict[str, str], timeout_s: float, cancel: CancelToken,
                 name: str | None = None, explain: Callable[[str], str] | None = None) -> None:
        self.argv = argv
        self.env = env
        self.timeout_s = timeout_s
        self.cancel = cancel
        self.name = name or os.path.basename(argv[0])
        self.explain = explain  # turns the child's error line into "what (hint: ...)"
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed_for: str | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._threads: list[threading.Thread] = []
        self._done = threading.Event()

    def __enter__(self) -> Child:
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - argv is built by the sidecar, never by a shell
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=self.env, start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise ChildFailed(f"{self.name} is not installed or not on PATH (hint: install postgresql-client)") from exc
        self._threads = [
            threading.Thread(target=self._read_stderr, name=f"{self.name}-stderr", daemon=True),
            threading.Thread(target=self._watch, name=f"{self.name}-watchdog", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def chunks(self) -> Iterator[bytes]:
        assert self.proc is not None and self.proc.stdout is not None
        read = self.proc.stdout.read
        while chunk := read(CHUNK):
            yield chunk

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.decode("utf-8", "replace").rstrip()[:500])

    def _watch(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self._done.wait(0.1):
            if self.proc is None or self.proc.poll() is not None:
                return
            if self.cancel.cancelled:
                self._kill(f"interrupted: {self.cancel.reason}")
                return
            if time.monotonic() > deadline:
                self._kill(f"timed out after {format_duration(self.timeout_s)}")
                return

    def _kill(self, why: str) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.killed_for = self.killed_for or why
        log.warning("stopping %s (pid %s): %s", self.name, self.proc.pid, why)
        stop_process_group(self.proc, term_grace_s=3.0)

    def stderr_text(self) -> str:
        return mask("\n".join(self._stderr))

    def error_line(self) -> str:
        """The most telling stderr line: the last ``error:``/``FATAL`` one, else the last line."""
        lines = [mask(line) for line in self._stderr if line.strip()]
        for line in reversed(lines):
            if "error:" in line or "FATAL" in line or "fatal:" in line:
                return line.strip()
        return lines[-1].strip() if lines else ""

    def finish(self) -> None:
        """Wait for the exit and raise ChildFailed/Cancelled unless the command ended cleanly."""
        assert self.proc is not None
        code = self.proc.wait()
        self._done.set()
        for t in self._threads:
            t.join(timeout=5)
        if self.killed_for:
            if self.cancel.cancelled:
                raise Cancelled(f"{self.name} {self.killed_for}")
            raise ChildFailed(
                f"{self.name} {self.killed_for} (hint: raise BACKUP_TIMEOUT, or look for locks blocking the dump)"
            )
        if code < 0:
            said = f"; it said: {self.error_line()}" if self.error_line() else ""
            raise ChildFailed(f"{self.name} failed: killed by signal {-code}{said} (hint: check for the OOM killer "
                              "(container memory limit) or an operator's kill in the host's logs)")
        if code != 0:
            detail = self.error_line() or f"exit code {code}"
            if self.explain is not None:
                detail = self.explain(detail)
            elif "hint:" not in detail:
                detail += f" (hint: run {self.name} by hand with the same settings to see its full output)"
            raise ChildFailed(f"{self.name} failed: {detail}")
        if self._stderr:
            log.warning("%s said: %s", self.name, self.stderr_text())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._kill("stopped because the backup failed" if exc_type else "stopped")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %s) did not exit after SIGKILL", self.name, self.proc.pid)
        self._done.set()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
