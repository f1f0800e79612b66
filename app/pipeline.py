"""The streaming pipeline: producer -> compression -> SHA-256 + byte count -> the plain copies' uploads, and
-> age -> SHA-256 + byte count -> the encrypted copies' uploads (BACKUP_ENCRYPT_TARGETS: both at once).

No temp file and constant memory: bytes flow in 1 MiB chunks from the producer (pg_dump's stdout through
app.proc.Child, or a tar stream) straight into the uploads. This is the one place where stored bytes are
hashed for the manifest.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Protocol

from app.compression import Compressor
from app.encryption import encryptor
from app.proc import ChildFailed, filtered

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where stored bytes go: a target's upload, or a wrapper that isolates one target's failure."""

    def write(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class Streamed:
    raw_bytes: int  # what the producer wrote
    size: int  # what was stored (compressed, and encrypted for an encrypted copy)
    sha256: str  # of the stored bytes


@dataclass(frozen=True)
class Pumped:
    """What each stored stream came to: ``plain`` the compressed bytes the sinks got, ``encrypted`` the
    ciphertext the encrypted sinks got (None for a stream no sink asked for: it is not hashed)."""

    raw_bytes: int
    plain: Streamed | None
    encrypted: Streamed | None


class _Stored:
    """One stored stream: hashed, counted and handed to its sinks."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = sinks
        self.digest = hashlib.sha256()
        self.size = 0

    def emit(self, data: bytes) -> None:
        if data and self.sinks:
            self.digest.update(data)
            self.size += len(data)
            for sink in self.sinks:
                sink.write(data)

    def result(self, raw: int) -> Streamed | None:
        return Streamed(raw, self.size, self.digest.hexdigest()) if self.sinks else None


def pump(chunks: Iterable[bytes], comp: Compressor, sinks: Sequence[Sink],
         check: Callable[[], None] | None = None, recipients: Sequence[str] = (),
         encrypted_sinks: Sequence[Sink] = ()) -> Pumped:
    """Compress, hash and count ``chunks`` and hand every stored byte to each of ``sinks``; given
    ``encrypted_sinks`` (and the age ``recipients``), the compressed stream is also encrypted, hashed and
    counted on its own, once, for all of them.

    ``check`` runs before every chunk (the run's stop flag, deadline and lease): it raises to end the run.
    """
    raw = 0

    def compressed(checked: bool) -> Iterator[bytes]:
        nonlocal raw
        for chunk in chunks:
            if checked and check is not None:
                check()  # with encryption, the thread storing the ciphertext checks before each chunk instead
            raw += len(chunk)
            yield comp.compress(chunk)
        # No check here: a producer stopped by the deadline or a stop ends its stream, and its own finish()
        # says best why (pg_dump's "interrupted" or "timed out after", with the hint that fits).
        yield comp.flush()

    plain = _Stored(sinks)
    if not encrypted_sinks:
        for data in compressed(checked=True):
            plain.emit(data)
        return Pumped(raw, plain.result(raw), None)
    if not recipients:
        raise ValueError("encrypted sinks need recipients")
    sealed = _Stored(encrypted_sinks)

    def stored_and_fed() -> Iterator[bytes]:
        for data in compressed(checked=False):
            plain.emit(data)
            yield data

    # compression and the plain copies run on the thread that feeds age; this thread stores the ciphertext, so
    # pg_dump, zstd, age and both kinds of upload overlap. Closing the stream on a failure here (the lease, the
    # deadline, no target left) stops age at once, and with it the feed.
    age = encryptor(recipients)
    try:
        with closing(filtered(age, stored_and_fed())) as ciphertext:
            for data in ciphertext:
                if check is not None:
                    check()
                sealed.emit(data)
    except ChildFailed:
        if age.killed_for is not None and check is not None:
            check()  # age stopped by the run's deadline or a stop: the run's own error says so, with its hint
        raise
    return Pumped(raw, plain.result(raw), sealed.result(raw))
