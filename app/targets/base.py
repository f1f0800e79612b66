"""The storage interface every target implements: begin/commit uploads, open, stat, list, delete.

Small on purpose (restic's backends, offen's ``Backend``): one contract test runs against every target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import BinaryIO

from app.errors import SidecarError


class TargetError(SidecarError):
    """A storage failure, with a one-line message that already carries a hint."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime


class Upload(ABC):
    """An object being written. Nothing is visible at its key until ``commit``; ``abort`` leaves no trace.

    The split lets one dump feed several targets and publish on all of them only once every copy is
    complete, so a failure on one target never leaves a lone "good-looking" artifact on another.
    """

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...


class Target(ABC):
    name: str  # "nas" | "s3"

    @abstractmethod
    def describe(self) -> str:
        """Where it stores, for logs and tables: ``/backups`` or ``s3://bucket/prefix``."""

    @abstractmethod
    def check(self) -> None:
        """Raise TargetError (with a hint) when the target cannot take a backup right now."""

    @abstractmethod
    def begin(self, key: str) -> Upload: ...

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A streaming reader; the caller closes it. Raises TargetError when the key is missing."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Finished objects under ``prefix`` (partial uploads are never listed)."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def cleanup_incomplete(self, older_than: timedelta) -> list[str]:
        """Remove partial uploads older than ``older_than`` (left by killed runs); return what went."""

    def free_bytes(self) -> int | None:
        """Free space, where the target can know it (a directory); None for object stores."""
        return None

    def put_bytes(self, key: str, data: bytes) -> None:
        upload = self.begin(key)
        try:
            upload.write(data)
            upload.commit()
        except BaseException:
            upload.abort()
            raise

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()
