"""Dead-man's-switch pings in the healthchecks.io style: PING_URL/start, PING_URL, PING_URL/fail.

Pings are a monitoring signal, not a notification: they follow every run whatever NOTIFY_ON says, because
the monitor raises its alarm exactly when the success pings stop, including when this process is dead.
"""

from __future__ import annotations

import ssl
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from app.logs import mask
from app.notify.http import describe, post

Signal = Literal["start", "success", "fail"]
MAX_BODY = 10 * 1024  # healthchecks.io keeps the first 10 KB of a ping body (its default)


class PingChannel:
    name = "ping"

    def __init__(self, url: str, context: ssl.SSLContext | None = None) -> None:
        self._url = url
        self._context = context

    def describe(self) -> str:
        return f"ping to {describe(self._url)}"

    def url_for(self, signal: Signal) -> str:
        """PING_URL with ``/start`` or ``/fail`` appended to its path (a query string stays a query string)."""
        if signal == "success":
            return self._url
        parts = urlsplit(self._url)
        return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{signal}"))

    def send(self, signal: Signal, body: str, timeout: float) -> None:
        post(self.url_for(signal), bounded_body(body), "text/plain; charset=utf-8", timeout, self._context)


def bounded_body(text: str, limit: int = MAX_BODY) -> bytes:
    """Masked UTF-8 text of at most ``limit`` bytes, keeping the first line (the summary) and the newest lines."""
    data = mask(text).encode()
    if len(data) <= limit:
        return data
    head, _, rest = data.partition(b"\n")
    marker = b"\n[... older lines cut ...]\n"
    room = limit - len(head) - len(marker)
    if room <= 0:
        return data[:limit].decode(errors="ignore").encode()
    tail = rest[-room:]
    tail = tail[tail.find(b"\n") + 1:] if b"\n" in tail else tail
    return head + marker + tail.decode(errors="ignore").encode()
