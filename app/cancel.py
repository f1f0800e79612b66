"""A cancellation flag shared by the signal handler, the scheduler loop and a running backup."""

from __future__ import annotations

from app.errors import SidecarError


class CancelToken:
    """Set from a signal handler (plain attribute writes only: no locks there), polled by workers."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    @property
    def cancelled(self) -> bool:
        return self.reason is not None


class Cancelled(SidecarError):
    """The run was stopped on purpose (SIGTERM, SIGINT); the message says why."""
