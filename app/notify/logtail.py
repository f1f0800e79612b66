"""The last log lines of a run, masked and bounded, for the body of a PING_URL/fail.

A handler on the ``app`` logger rather than the root: ``setup_logging`` replaces the root's handlers, and
everything the sidecar logs comes from ``app.*``. Lines are masked when recorded, so the buffer never holds
a secret even for a moment.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from app.logs import mask

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogTail(logging.Handler):
    """Keeps the newest ``max_lines`` lines; ``mark`` starts a run so ``lines`` returns only that run's lines."""

    def __init__(self, max_lines: int = 50, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter(_FORMAT))
        self._lines: deque[tuple[int, str]] = deque(maxlen=max_lines)
        self._seq = 0
        self._mark = 0
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = mask(self.format(record))
        except Exception:  # logging must never raise into the caller
            return
        with self._guard:
            self._seq += 1
            for line in text.splitlines() or [""]:
                self._lines.append((self._seq, line))

    def mark(self) -> None:
        with self._guard:
            self._mark = self._seq

    def lines(self) -> list[str]:
        with self._guard:
            return [line for seq, line in self._lines if seq > self._mark]

    def attach(self, logger_name: str = "app") -> None:
        logging.getLogger(logger_name).addHandler(self)

    def detach(self, logger_name: str = "app") -> None:
        logging.getLogger(logger_name).removeHandler(self)
