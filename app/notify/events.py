"""What a notification says, independent of how it travels (mail, webhook): one Event per thing that happened.

Events are built already masked (see ``messages``); every channel masks again before anything leaves the
process, so a secret that slipped into a field on the way still never reaches a mailbox or a chat.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from app.logs import mask

#: Why someone is told: decides, with NOTIFY_ON, whether mail and webhook carry the event at all.
Category = Literal["failure", "success", "critical", "recovery", "report"]

#: Failure paths that are not a backup's own manifest; ``backup`` is a failed dump or backup run.
FailureKind = Literal["backup", "upload", "lock", "prune", "verify", "restore_test"]
FAILURE_KINDS: tuple[str, ...] = ("backup", "upload", "lock", "prune", "verify", "restore_test")

#: Categories sent per NOTIFY_ON value. Recoveries and reports go wherever failures go: whoever was woken by
#: a CRITICAL must hear it cleared, and the weekly report is the proof that the notification path still works.
ROUTES: dict[str, frozenset[str]] = {
    "never": frozenset(),
    "failure": frozenset({"failure", "critical", "recovery", "report"}),
    "always": frozenset({"failure", "success", "critical", "recovery", "report"}),
}


@dataclass(frozen=True)
class Event:
    """One notification: a mail subject and body, a short chat text, and the machine-readable fields."""

    name: str  # backup_ok, backup_failed, prune_failed, lock_timeout, health_critical, weekly_report, ...
    category: Category
    status: str  # ok | failed | critical | recovered | attention
    subject: str
    text: str  # plain-text mail body
    chat: str  # what a Slack/Mattermost incoming webhook shows (its `text` field)
    host: str
    database: str | None = None
    backup_id: str | None = None
    error: str | None = None
    size_bytes: int | None = None
    duration_s: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def is_failure(self) -> bool:
        return self.category in ("failure", "critical")

    def payload(self) -> dict[str, Any]:
        """The webhook's JSON document; every string masked once more right before it leaves."""
        doc: dict[str, Any] = {
            "event": self.name,
            "status": self.status,
            "database": self.database,
            "backup_id": self.backup_id,
            "error": self.error,
            "size_bytes": self.size_bytes,
            "duration_s": self.duration_s,
            "host": self.host,
            "time": self.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "subject": self.subject,
            "text": self.chat,
        }
        doc.update(self.extra)
        return _masked(doc)


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, Mapping):
        return {str(k): _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value
