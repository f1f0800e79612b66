"""The streaming pipeline: producer -> compression [-> age] -> SHA-256 + byte count -> every target's upload.

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
from app.encryption import encrypted

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where stored bytes go: a target's upload, or a wrapper that isolates one target's failure."""

    def write(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class Streamed:
    raw_bytes: int  # what the producer wrote
    size: int  # what was stored (compressed)
    sha256: str  # of the stored bytes


def pump(chunks: Iterable[bytes], comp: Compressor, sinks: Sequence[Sink],
         check: Callable[[], None] | None = None, recipients: Sequence[str] = ()) -> Streamed:
    """Compress (and, given age ``recipients``, encrypt), hash and count ``chunks`` and hand every stored byte
    to each sink.

    ``check`` runs before every chunk (the run's stop flag, deadline and lease): it raises to end the run.
    """
    digest = hashlib.sha256()
    raw = size = 0

    def emit(data: bytes) -> None:
        nonlocal size
        if data:
            digest.update(data)
            size += len(data)
            for sink in sinks:
                sink.write(data)

    def compressed() -> Iterator[bytes]:
        nonlocal raw
        for chunk in chunks:
            if check is not None and not recipients:
                check()  # with encryption, the reading thread checks before each encrypted chunk instead
            raw += len(chunk)
            yield comp.compress(chunk)
        # No check here: a producer stopped by the deadline or a stop ends its stream, and its own finish()
        # says best why (pg_dump's "interrupted" or "timed out after", with the hint that fits).
        yield comp.flush()

    if not recipients:
        for data in compressed():
            emit(data)
        return Streamed(raw, size, digest.hexdigest())
    # compression feeds age on a thread of its own; this thread stores. Closing the stream on a failure here
    # (the lease, the deadline, no target left) stops age at once.
    with closing(encrypted(compressed(), recipients)) as ciphertext:
        for data in ciphertext:
            if check is not None:
                check()
            emit(data)
    return Streamed(raw, size, digest.hexdigest())
