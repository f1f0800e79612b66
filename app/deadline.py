"""One deadline for a whole run: the dump, every upload and the publication share BACKUP_TIMEOUT.

A run opens a ``Budget`` (its monotonic deadline and its CancelToken) and makes it current with ``scope()``;
whatever blocks on the run's behalf asks it how long it may still wait: the client process's watchdog
(app.proc), the S3 client's timeouts and retries, and the wait for a part in flight. The budget travels as a
context variable, so a helper thread started with ``run_in_context`` sees it too, and a health check or a
`list` that runs outside any backup keeps its own defaults.
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from app.cancel import Cancelled, CancelToken
from app.durations import format_duration
from app.errors import SidecarError

_current: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("backup_sidecar_budget", default=None)
POLL_S = 0.1


class DeadlineExceeded(SidecarError):
    """The run's time is up; the message says what was still waiting."""


@dataclass
class Budget:
    """How long a run (or its cleanup) may still take, and whether it was stopped."""

    deadline: float | None  # time.monotonic() value; None: unbounded
    cancel: CancelToken = field(default_factory=CancelToken)
    #: what set the limit, for messages: "BACKUP_TIMEOUT 1h", "the cleanup budget 4s"
    label: str = "BACKUP_TIMEOUT"
    seconds: float | None = None  # the whole budget, for "timed out after ..."

    @classmethod
    def after(cls, seconds: float, cancel: CancelToken | None = None, label: str = "BACKUP_TIMEOUT") -> Budget:
        return cls(time.monotonic() + seconds, cancel or CancelToken(), f"{label} {format_duration(seconds)}",
                   seconds)

    def remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0

    def check(self, what: str = "the run") -> None:
        """Raise Cancelled when stopped, DeadlineExceeded when the time is up."""
        if self.cancel.cancelled:
            raise Cancelled(f"interrupted: {self.cancel.reason}")
        if self.expired:
            after = f" after {format_duration(self.seconds)}" if self.seconds is not None else ""
            raise DeadlineExceeded(f"{what} timed out{after} ({self.label})",
                                   hint="raise BACKUP_TIMEOUT, or find what is slow: the dump, or a target")

    def wait(self, event: threading.Event, what: str) -> None:
        """Block until ``event`` is set, polling the stop flag; raise as ``check`` does when the budget ends."""
        while not event.wait(min(POLL_S, max(0.0, self.remaining()))):
            self.check(what)

    def sleep(self, seconds: float) -> None:
        """A pause (a retry's backoff) that never outlasts the budget and ends early on a stop."""
        end = time.monotonic() + min(seconds, max(0.0, self.remaining()))
        while (left := end - time.monotonic()) > 0 and not self.cancel.cancelled:
            time.sleep(min(POLL_S, left))

    @contextmanager
    def scope(self) -> Iterator[Budget]:
        """Make this the current budget for the block (and for threads started with ``run_in_context``)."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)


def current() -> Budget | None:
    return _current.get()


def remaining(default: float) -> float:
    """``default`` seconds, or less when the current budget ends sooner (never below zero)."""
    budget = _current.get()
    return default if budget is None else max(0.0, min(default, budget.remaining()))


def run_in_context(fn: Callable[[], object], name: str) -> threading.Thread:
    """Start ``fn`` on a daemon thread that sees the caller's budget. Daemon: a thread stuck on a stalled
    socket must never keep the process alive past its stop budget."""
    ctx = contextvars.copy_context()
    thread = threading.Thread(target=ctx.run, args=(fn,), name=name, daemon=True)
    thread.start()
    return thread
