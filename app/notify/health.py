"""/health transitions into and out of CRITICAL: one message per transition, however often /health is asked."""

from __future__ import annotations

import threading
from typing import Literal

Transition = Literal["critical", "recovered"]
_KNOWN = ("ok", "warning", "critical")


class HealthTransitions:
    """Remembers whether the last known status was critical.

    The caller's ``old`` only seeds the state on the first call (after a restart); after that this object's
    own memory decides, so a caller that passes the same ``old`` twice, or polls from two threads, still
    produces one message. Statuses other than ok/warning/critical (unknown, None) carry no information and
    change nothing, so critical -> unknown -> critical is not a recovery followed by a new alarm.
    """

    def __init__(self) -> None:
        self._critical: bool | None = None
        self._lock = threading.Lock()

    def observe(self, old: str | None, new: str | None) -> Transition | None:
        new = (new or "").lower()
        if new not in _KNOWN:
            return None
        with self._lock:
            was = self._critical if self._critical is not None else (old or "").lower() == "critical"
            now = new == "critical"
            self._critical = now
        if now and not was:
            return "critical"
        if was and not now:
            return "recovered"
        return None
