"""The webhook channel: one JSON POST per event.

The document carries the machine-readable fields (event, database, backup_id, status, error, size_bytes,
duration_s, host, time) and a ``text`` field, which is what Slack- and Mattermost-style incoming webhooks
display as is; both ignore the other fields, and a generic receiver can route on ``event``.
"""

from __future__ import annotations

import json
import ssl

from app.notify.events import Event
from app.notify.http import describe, post


class WebhookChannel:
    name = "webhook"

    def __init__(self, url: str, context: ssl.SSLContext | None = None) -> None:
        self._url = url
        self._context = context

    def describe(self) -> str:
        return f"webhook to {describe(self._url)}"

    def send(self, event: Event, timeout: float) -> None:
        body = json.dumps(event.payload(), ensure_ascii=False).encode()
        post(self._url, body, "application/json", timeout, self._context)
