"""Logging set-up and secret masking.

Masking sits in one place, the root handler's filter, so a secret that slips into any message (an
exception text, pg_dump's stderr, a URL) is replaced before it reaches a terminal or a log shipper.
The same ``mask`` is used for manifests, /health and notifications.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from datetime import UTC, datetime

_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I)
_KEYWORD_PW = re.compile(r"(?P<key>(?<![A-Za-z_])(?:password|passwd|pwd|pgpassword)\s*=\s*)(?P<val>[^\s'\"]+)", re.I)

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()


def register_secrets(values: list[str]) -> None:
    """Add secret values that ``mask`` must hide from now on (process-wide)."""
    global _secrets
    with _lock:
        merged = set(_secrets) | {v for v in values if v and len(v) >= 3}
        _secrets = tuple(sorted(merged, key=len, reverse=True))


def mask(text: str) -> str:
    """Replace registered secrets, URL passwords and ``password=...`` values with ****."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "****")
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:****@", text)
    return _KEYWORD_PW.sub(lambda m: f"{m['key']}****", text)


class _MaskingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{logging.Formatter().formatException(record.exc_info)}"
            record.exc_info = None
            record.exc_text = None
        record.msg = mask(message)
        record.args = None
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("database", "backup_id", "event"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        return json.dumps(doc, ensure_ascii=False)


class _RetrySummary(logging.Filter):
    """urllib3 logs a WARNING per retry, so one unreachable S3 endpoint printed six lines before the error.

    The first retry to a host says what failed and that the request is being retried; further retries to
    that host within ``window_s`` only reach a DEBUG log. The final error (the target's own message, which
    says "Max retries exceeded") follows as usual.
    """

    window_s = 60.0
    _CONNECTION_OBJECT = re.compile(r"<[^>]*>:\s*")

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Retrying (") or not isinstance(record.args, tuple) or len(record.args) < 3:
            return True
        _retries, error, url = record.args[:3]
        host = getattr(record, "__urllib3-retry-warning", {}).get("host") or str(url)
        now = time.monotonic()
        if now - self._last.get(host, -self.window_s) < self.window_s:
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        self._last[host] = now
        reason = self._CONNECTION_OBJECT.sub("", str(error)) or error.__class__.__name__
        record.msg = "request to %s failed (%s); retrying (retries to it in the next %.0fs are logged at DEBUG)"
        record.args = (host, reason, self.window_s)
        return True


_retry_summary = _RetrySummary()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr (12-factor: the container runtime collects it), masked, text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_MaskingFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("urllib3", "waitress", "werkzeug", "schedule"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    pool_log = logging.getLogger("urllib3.connectionpool")
    if _retry_summary not in pool_log.filters:
        pool_log.addFilter(_retry_summary)
