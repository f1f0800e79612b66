"""Stream compressors and decompressors (zstd, gzip, none) behind one tiny interface.

zstd and gzip frames are standard, so ``zstd -dc`` / ``gunzip`` read every artifact with stock tools.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator
from typing import Protocol

import zstandard


class Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


ZSTD_JOB_SIZE = 1024 * 1024
OVERLAP_LOG = 6


class CorruptArchive(ValueError):
    """The compressed stream is damaged or ends early."""


def compressor(kind: str, level: int) -> Compressor:
    if kind == "zstd":
        # Two worker threads: compression overlaps with reading pg_dump and hashing (about 2x on random-ish
        # data) without taking every core of a host the application shares. 1 MiB jobs keep what the workers
        # buffer small and constant (measured: 65 MB RSS for 0.6 and 1.2 GB dumps; 4 MiB jobs grew 92->115 MB,
        # zstd's default job size costs ~100 MB more).
        # overlap_log=6 (the default of levels 1-12) keeps every level's jobs at 1 MiB: from level 13 on zstd
        # would otherwise raise the job size to the whole window (8 MiB at 19), so one compress() call or
        # freeing the compressor waits several seconds for its workers (measured: 4.7 s at level 19) and a
        # stop overruns its budget. With it, no call or free takes more than ~0.3 s at any level.
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=min(2, os.cpu_count() or 1), job_size=ZSTD_JOB_SIZE, overlap_log=OVERLAP_LOG,
            write_checksum=True,
        )
        return zstandard.ZstdCompressor(compression_params=params).compressobj()
    if kind == "gzip":
        return zlib.compressobj(level, zlib.DEFLATED, 31)
    if kind == "none":
        return _Identity()
    raise ValueError(f"unknown compression {kind!r}")


def decompress(chunks: Iterable[bytes], kind: str) -> Iterator[bytes]:
    """Decompress a stream; raise CorruptArchive if it is damaged, truncated or followed by garbage."""
    if kind == "none":
        yield from chunks
        return
    if kind == "zstd":
        dobj = zstandard.ZstdDecompressor().decompressobj()
        errors: tuple[type[Exception], ...] = (zstandard.ZstdError,)
    elif kind == "gzip":
        dobj = zlib.decompressobj(31)
        errors = (zlib.error,)
    else:
        raise ValueError(f"unknown compression {kind!r}")
    try:
        for chunk in chunks:
            if dobj.eof:
                if chunk:
                    raise CorruptArchive("data after the end of the compressed stream")
                continue
            out = dobj.decompress(chunk)
            if out:
                yield out
            if dobj.eof and dobj.unused_data:
                raise CorruptArchive("data after the end of the compressed stream")
    except errors as exc:
        raise CorruptArchive(f"the {kind} stream is damaged: {exc}") from exc
    if not dobj.eof:
        raise CorruptArchive(f"the {kind} stream ends early (truncated artifact)")
