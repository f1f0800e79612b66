"""Background delivery: one worker thread and one bounded queue per channel, bounded retries with backoff.

The backup path only appends to a queue, so a mail server that is down or a webhook that hangs never fails
or delays a backup. One lane per channel keeps a hanging webhook from holding up the mail. ``close`` gives
the lane a deadline: attempts shrink to fit it, later ones are dropped and logged, and the caller never
waits past it (the threads are daemons, so a stuck socket cannot keep the process alive either).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from app.logs import mask
from app.notify.http import PermanentDeliveryError

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
Outcome = Literal["sent", "failed", "abandoned"]
_MIN_ATTEMPT_S = 0.05  # below this, an attempt before the deadline cannot succeed: drop instead
_JOIN_GRACE_S = 0.1  # for an attempt whose socket timeout ends exactly at the deadline to return


@dataclass(frozen=True)
class Job:
    """One message for one channel: ``attempt(timeout)`` makes one delivery attempt and raises on failure."""

    label: str  # masked, for the log: the subject or the ping signal
    attempt: Callable[[float], None]


class Lane:
    """A channel's queue and worker; ``submit`` never blocks."""

    def __init__(self, name: str, timeout_s: float, retries: int, backoff_s: float = 1.0,
                 maxsize: int = 100) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.maxsize = maxsize
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.abandoned = 0

    def worst_case_s(self) -> float:
        """How long one job can take with every attempt timing out: the bound of a one-shot drain."""
        backoffs = sum(min(self.backoff_s * 2**i, MAX_BACKOFF_S) for i in range(self.retries))
        return self.timeout_s * (self.retries + 1) + backoffs

    def submit(self, job: Job) -> bool:
        with self._cond:
            if self._closed:
                log.error("notification %s not sent by %s: the notifier is already closed", job.label, self.name)
                return False
            if len(self._jobs) >= self.maxsize:
                self.dropped += 1
                log.error("notification %s dropped: %d messages already wait for %s (is it down?)",
                          job.label, len(self._jobs), self.name)
                return False
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"notify-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return True

    def pending(self) -> int:
        with self._cond:
            return len(self._jobs) + (1 if self._busy else 0)

    def wait_idle(self, deadline: float) -> bool:
        """Wait until every queued job is done (delivered or given up), or until ``deadline`` (monotonic)."""
        with self._cond:
            while self._jobs or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def begin_close(self, deadline: float) -> None:
        """Stop taking jobs; what is queued gets until ``deadline`` (monotonic)."""
        with self._cond:
            self._closed = True
            self._deadline = deadline
            self._cond.notify_all()

    def join(self, deadline: float) -> bool:
        """After ``begin_close``: True when nothing was given up for lack of time before ``deadline``."""
        thread = self._thread
        if thread is not None:
            thread.join(max(0.0, deadline + _JOIN_GRACE_S - time.monotonic()))
        if thread is not None and thread.is_alive():
            log.error("%d notification(s) by %s still in flight at shutdown", max(self.pending(), 1), self.name)
            return False
        return self.abandoned == 0

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._busy = True
            try:
                outcome = self._deliver(job)
            except Exception:  # a bug in a channel must not kill the lane
                outcome = "failed"
                log.exception("notification %s by %s failed unexpectedly", job.label, self.name)
            with self._cond:
                if outcome == "sent":
                    self.delivered += 1
                elif outcome == "failed":
                    self.failed += 1
                else:  # shutting down and out of time: everything still queued goes too, in one log line
                    labels = [job.label, *(j.label for j in self._jobs)]
                    self._jobs.clear()
                    self.abandoned += len(labels)
                    log.error("%d notification(s) by %s not delivered before shutdown: %s", len(labels), self.name,
                              "; ".join(labels[:3]) + (" ..." if len(labels) > 3 else ""))
                self._busy = False
                self._cond.notify_all()

    def _attempt_timeout(self) -> float | None:
        with self._cond:
            if self._deadline is None:
                return self.timeout_s
            left = self._deadline - time.monotonic()
        return min(self.timeout_s, left) if left > _MIN_ATTEMPT_S else None

    def _backoff(self, delay: float) -> bool:
        """Sleep ``delay`` unless the shutdown deadline comes first; False when no retry fits any more."""
        end = time.monotonic() + delay
        with self._cond:
            while True:
                now = time.monotonic()
                if self._deadline is not None and end + _MIN_ATTEMPT_S >= self._deadline:
                    return False
                if now >= end:
                    return True
                self._cond.wait(end - now)

    def _deliver(self, job: Job) -> Outcome:
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            timeout = self._attempt_timeout()
            if timeout is None:
                return "abandoned"
            try:
                job.attempt(timeout)
            except PermanentDeliveryError as exc:
                log.error("notification %s by %s not delivered (not retried): %s", job.label, self.name,
                          mask(str(exc)))
                return "failed"
            except Exception as exc:
                reason = mask(str(exc) or exc.__class__.__name__)
                if attempt == attempts:
                    log.error("notification %s by %s not delivered after %d attempt(s): %s", job.label,
                              self.name, attempts, reason)
                    return "failed"
                delay = min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                log.warning("notification %s by %s failed (attempt %d of %d), retrying in %.1fs: %s", job.label,
                            self.name, attempt, attempts, delay, reason)
                if not self._backoff(delay):
                    return "abandoned"
            else:
                log.info("notification %s sent by %s", job.label, self.name)
                return "sent"
        return "failed"
