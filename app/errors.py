"""The one exception family the CLI turns into exit code 1 with a single masked line."""

from __future__ import annotations


class SidecarError(Exception):
    """An operation failed. ``message`` says what failed; ``hint`` says what to do, as data, so that a
    notification, /health or a table can show it apart; str() is the one line the CLI prints."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class UsageError(SidecarError):
    """The command line itself is wrong (a malformed backup ID, options that exclude each other): the CLI exits 2,
    like a configuration error, not 1 like an operation that failed."""
