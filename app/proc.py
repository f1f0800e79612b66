"""The one wrapper around the client processes the sidecar runs: pg_dump and friends, which produce a stream
on stdout, and pg_restore/psql, which consume one on stdin.

Both need the same things, so they share this class: a process group of their own (a kill reaches every
descendant), a scratch environment handed in by the caller (the password travels only there), stderr kept
bounded and masked, a watchdog that kills the group at the run's deadline or when the CancelToken fires,
and one exit check that turns the child's most telling stderr line into a one-line error with a hint.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType

from app.cancel import Cancelled, CancelToken
from app.deadline import current as current_budget
from app.deadline import run_in_context
from app.durations import format_duration
from app.errors import SidecarError
from app.logs import mask

CHUNK = 1024 * 1024
log = logging.getLogger(__name__)

#: What any child inherits from the sidecar's own environment: paths and locale, nothing secret. Callers add
#: their engine's connection variables; a bare ``subprocess.run`` would hand a child every password we hold.
INHERIT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "TMPDIR")


def scratch_env(*names: str) -> dict[str, str]:
    """The sidecar's values of INHERIT (and of ``names``): the base of every child's environment."""
    return {k: os.environ[k] for k in (*INHERIT, *names) if k in os.environ}


def run_short(argv: list[str], *, timeout: float, cwd: str | os.PathLike[str] | None = None,
              env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """A short command that streams nothing (``--version``, ``pg_ctl``, ``pg_verifybackup``), run with a scratch
    environment unless the caller hands one in. Raises FileNotFoundError and subprocess errors as they come."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, input=input,
                          env=scratch_env() if env is None else env)


class ChildFailed(SidecarError):
    """The child exited non-zero, was killed, timed out, or stopped reading early.

    ``server`` holds what PostgreSQL added to the error (its HINT, DETAIL and pg_restore's ``Command was:``),
    as data, so a caller can tell a missing role from a lock-table overflow without parsing the message.
    """

    def __init__(self, message: str, hint: str | None = None, server: ServerSaid | None = None) -> None:
        super().__init__(message, hint)
        self.server = server or ServerSaid("")


@dataclass(frozen=True)
class ServerSaid:
    """The error line a child printed and the lines PostgreSQL attached to it (on the stderr lines after it)."""

    error: str
    hint: str | None = None
    detail: str | None = None
    command: str | None = None

    def one_line(self, limit: int = 300) -> str:
        """``error; DETAIL: ...; Command was: ...`` (the HINT goes into the hint, see ``hint_with``)."""
        parts = [self.error]
        if self.detail:
            parts.append(f"DETAIL: {self.detail}")
        if self.command:
            command = self.command if len(self.command) <= limit else self.command[:limit] + "..."
            parts.append(f"Command was: {command}")
        return "; ".join(p for p in parts if p)

    def hint_with(self, ours: str | None) -> str | None:
        """PostgreSQL's own HINT first (it is the most specific), then ours."""
        if self.hint and ours:
            return f"PostgreSQL says: {self.hint} {ours}"
        return f"PostgreSQL says: {self.hint}" if self.hint else ours


_ATTACHED = re.compile(r"^(?:\S+: )?(?:psql:\S+ )?(HINT|DETAIL|Command was):\s*(.*)$")


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
    """A client process streamed through stdout (``reads=True``) or fed through stdin (``reads=False``).

    Use as a context manager: leaving the block always reaps the whole process group; leaving it with an
    exception kills the child *before* its input ends, so a consumer never sees EOF (and never commits) for
    a stream that failed upstream.
    """

    def __init__(self, argv: list[str], env: dict[str, str], *, cancel: CancelToken | None = None,
                 deadline: float | None = None, timeout_s: float | None = None, feeds: bool = False,
                 passes: bool = False,
                 name: str | None = None, explain: Callable[[str], str] | None = None, hint: str | None = None,
                 term_grace_s: float = 3.0, die_with_parent: bool = False, pass_fds: tuple[int, ...] = ()) -> None:
        """``deadline`` is a time.monotonic() value (or ``timeout_s`` from now); ``feeds`` makes the child
        read stdin instead of writing stdout (``passes`` with ``feeds``: both, a filter such as
        ``pg_restore --file=-``); ``explain`` turns its error line into "what (hint: ...)", else
        ``hint`` is appended; ``die_with_parent`` has the kernel stop a long-running child (pg_receivewal) when
        the thread that started it dies, so a SIGKILLed sidecar never leaves it streaming on its slot.
        ``pass_fds`` are inherited by the child under the same numbers (an option file on a pipe,
        ``/dev/fd/N``) and owned by this object: closed here once the child started or failed to."""
        self.argv = argv
        self.env = env
        self.cancel = cancel or CancelToken()
        if deadline is None and timeout_s is not None:
            deadline = time.monotonic() + timeout_s
        run = current_budget()  # a backup's one deadline (BACKUP_TIMEOUT for dump + uploads) caps the child's
        if run is not None and run.deadline is not None:
            deadline = run.deadline if deadline is None else min(deadline, run.deadline)
        self.deadline = deadline
        #: what the deadline allowed, for "timed out after ..." (the setting itself, where one was given)
        self.budget_s = timeout_s if timeout_s is not None else (
            None if deadline is None else round(max(0.0, deadline - time.monotonic())))
        self.feeds = feeds
        self.passes = passes
        self.name = name or os.path.basename(argv[0])
        self.explain = explain
        self.hint = hint
        self.term_grace_s = term_grace_s
        self.pass_fds = pass_fds
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed_for: str | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._threads: list[threading.Thread] = []
        self._done = threading.Event()

    # --- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> Child:
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - argv is built by the sidecar, never by a shell
                self.argv,
                stdin=subprocess.PIPE if self.feeds else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if self.feeds and not self.passes else subprocess.PIPE,
                stderr=subprocess.PIPE, env=self.env, start_new_session=True, pass_fds=self.pass_fds,
                preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
            )
        except FileNotFoundError as exc:
            raise ChildFailed(f"{self.name} is not installed or not on PATH",
                              hint=_install_hint(self.name)) from exc
        finally:
            self._close_passed()
        self._threads = [
            threading.Thread(target=self._read_stderr, name=f"{self.name}-stderr", daemon=True),
            threading.Thread(target=self._watch, name=f"{self.name}-watchdog", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def _close_passed(self) -> None:
        for fd in self.pass_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.pass_fds = ()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._close_passed()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._kill("stopped because the operation failed" if exc_type else "stopped")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %s) did not exit after SIGKILL", self.name, self.proc.pid)
        self._done.set()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass

    # --- data -------------------------------------------------------------------------------------------
    def chunks(self) -> Iterator[bytes]:
        """The child's stdout in chunks of up to 1 MiB."""
        assert self.proc is not None and self.proc.stdout is not None
        read = self.proc.stdout.read
        while chunk := read(CHUNK):
            yield chunk

    def end_input(self) -> None:
        """EOF on the child's stdin (a filter then finishes its output)."""
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass

    def write(self, data: bytes) -> None:
        """Hand ``data`` to the child's stdin; a child that quit early raises its own error, not EPIPE."""
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except BrokenPipeError as exc:
            raise self._failure(self.proc.wait(), stopped_reading=True) from exc

    # --- watchdog ---------------------------------------------------------------------------------------
    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.decode("utf-8", "replace").rstrip()[:500])

    def _watch(self) -> None:
        while not self._done.wait(0.1):
            if self.proc is None or self.proc.poll() is not None:
                return
            if self.cancel.cancelled:
                self._kill(f"interrupted: {self.cancel.reason}")
                return
            if self.deadline is not None and time.monotonic() > self.deadline:
                self._kill(f"timed out after {format_duration(self.budget_s or 0)}")
                return

    def _kill(self, why: str) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.killed_for = self.killed_for or why
        log.warning("stopping %s (pid %s): %s", self.name, self.proc.pid, why)
        stop_process_group(self.proc, term_grace_s=self.term_grace_s)

    def kill(self, why: str = "stopped") -> None:
        self._kill(why)

    # --- outcome ----------------------------------------------------------------------------------------
    def stderr_lines(self) -> list[str]:
        """Everything the child said (the last 40 lines), masked."""
        return [mask(line) for line in self._stderr if line.strip()]

    def error_line(self) -> str:
        """The most telling stderr line: the last ``error:``/``ERROR:``/``FATAL`` one, else the last line."""
        return self.server_said().error

    def server_said(self) -> ServerSaid:
        """The most telling error line and the HINT/DETAIL/``Command was:`` lines PostgreSQL put after it."""
        lines = [line.strip() for line in self.stderr_lines()]
        at = next((i for i in range(len(lines) - 1, -1, -1) if _is_error(lines[i])), len(lines) - 1)
        if at < 0:
            return ServerSaid("")
        found: dict[str, str] = {}
        for line in lines[at + 1:]:
            m = _ATTACHED.match(line)
            if m:
                found.setdefault(m.group(1), m.group(2).strip())
            elif _is_error(line):
                break
        return ServerSaid(lines[at], found.get("HINT"), found.get("DETAIL"), found.get("Command was"))

    def finish(self) -> list[str]:
        """End the child's input (if it reads), wait, and raise unless it ended cleanly.

        Returns its stderr lines of a successful run (warnings worth logging).
        """
        assert self.proc is not None
        if self.feeds and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()  # the consumer's EOF: only now can it commit
            except BrokenPipeError:
                pass
        code = self.proc.wait()
        self._done.set()
        for t in self._threads:
            t.join(timeout=5)
        if self.killed_for or code != 0:
            raise self._failure(code)
        return self.stderr_lines()

    def _failure(self, code: int | None, stopped_reading: bool = False) -> SidecarError:
        for t in self._threads[:1]:
            t.join(timeout=5)  # the stderr reader: the reason is usually its last line
        server = self.server_said()
        said = server.one_line()
        if self.killed_for:
            if self.cancel.cancelled:
                return Cancelled(f"{self.name} {self.killed_for}")
            return ChildFailed(f"{self.name} {self.killed_for}",
                               hint="raise BACKUP_TIMEOUT, or look for locks blocking the client")
        if code is not None and code < 0:
            return ChildFailed(f"{self.name} failed: killed by signal {-code}" + (f"; it said: {said}" if said else ""),
                               hint="check for the OOM killer (container memory limit) or an operator's kill "
                                    "in the host's logs")
        if code == 0 and stopped_reading:
            return ChildFailed(f"{self.name} failed: it stopped reading before the end of the stream",
                               hint=self.hint or "the archive does not look like one it can read")
        detail = said or f"exit code {code}"
        if self.explain is not None:
            explained = self.explain(detail)
            if server.hint and "(hint: " in explained:
                what, _, ours = explained.partition(" (hint: ")
                return ChildFailed(f"{self.name} failed: {what}", hint=server.hint_with(ours.removesuffix(")")),
                                   server=server)
            return ChildFailed(f"{self.name} failed: {explained}", hint=server.hint_with(None), server=server)
        return ChildFailed(f"{self.name} failed: {detail}",
                           hint=server.hint_with(self.hint or f"run {self.name} by hand with the same settings to "
                                                 "see its full output"), server=server)


def _is_error(line: str) -> bool:
    return "error:" in line or "ERROR:" in line or "FATAL" in line or "fatal:" in line


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent thread exits (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's own stop is all there is
        pass


def _install_hint(binary: str) -> str:
    if binary.startswith(("pg_", "psql")):
        return "install postgresql-client"
    if binary.startswith(("mariadb", "mysql")):
        return "install mariadb-client (mysql-client for a MySQL server)"
    return f"install the package that provides {binary}"


class _Feeder:
    """Writes ``chunks`` into a filter's stdin on a thread of its own while the caller reads its stdout (one
    thread doing both would deadlock once both pipes are full). ``join`` re-raises what the feed raised. The
    thread sees the caller's budget: what produces ``chunks`` may store bytes too (a backup's plain copies)."""

    def __init__(self, chunks: Iterable[bytes], child: Child) -> None:
        self.failure: BaseException | None = None
        self._child = child
        self._thread = run_in_context(lambda: self._run(chunks), f"{child.name}-feed")

    def _run(self, chunks: Iterable[bytes]) -> None:
        try:
            for chunk in chunks:
                if chunk:
                    self._child.write(chunk)
            self._child.end_input()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the reading thread by join()
            self.failure = exc
            self._child.kill("stopped because its input failed")

    def join(self, reraise: bool, timeout: float) -> None:
        self._thread.join(timeout)
        if reraise and self.failure is not None:
            raise self.failure


def filtered(child: Child, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Run ``child`` (``feeds=True, passes=True``) as a filter over ``chunks`` and yield its output. Closing
    the generator early (the reader failed or gave up) kills the child first, so the feed cannot block; a
    failure of the feed is raised in place of the child's consequent error, then the child's own exit check."""
    with child:
        feeder = _Feeder(chunks, child)
        done = False
        try:
            yield from child.chunks()
            done = True
        finally:
            if not done:
                child.kill("stopped because the reader failed")
            feeder.join(reraise=done, timeout=30.0 if done else 2.0)
        child.finish()

