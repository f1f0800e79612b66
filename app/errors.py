"""The one exception family the CLI turns into exit code 1 with a single masked line."""

from __future__ import annotations


class SidecarError(Exception):
    """An operation failed; str() is one line that says what failed and carries a hint."""
