"""The verified read path: a backup's bytes out of a target, checked against its manifest as they pass.

Restore, verify, drills and restore-files all read through here, so there is one place that decides when a
stream may end: the last chunk is held back until size and SHA-256 matched (and, decompressed, until the
compressed stream ended cleanly), so no consumer ever reaches its end -- or its COMMIT -- on bad bytes.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from app import encryption, layout
from app.compression import CorruptArchive, decompress
from app.durations import format_duration, format_size
from app.errors import SidecarError
from app.manifest import Manifest
from app.targets import Target

CHUNK = 1024 * 1024


class IntegrityError(SidecarError):
    """The stored bytes are not the ones the manifest describes (size or SHA-256)."""


class Progress:
    """Bytes, rate and ETA on stderr: rewritten in place on a terminal, a line every 10 s in a log."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total or None
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = 0
        self.started = time.monotonic()
        self._last = self.started
        self._interval = 0.5 if self.tty else 10.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._emit(final=False)

    def finish(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        text = f"{self.label}: {format_size(self.done)}"
        if self.total:
            text += f" of {format_size(self.total)} ({100 * self.done / self.total:.0f}%)"
        text += f", {format_size(rate)}/s"
        if final:
            text += f", {elapsed:.1f}s"
        elif self.total and rate > 0:
            text += f", ETA {format_duration((self.total - self.done) / rate)}"
        if self.tty:
            print(f"\r{text}\x1b[K", end="\n" if final else "", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)


def stored_chunks(target: Target, manifest: Manifest, progress: Progress | None = None) -> Iterator[bytes]:
    """The artifact's stored bytes as they stream from ``target``, checked against the manifest.

    The last chunk is yielded only after the size and SHA-256 matched, so nothing downstream ever sees the
    end of a stream whose bytes are not the ones that were backed up.
    """
    where = f"{manifest.id} on {target.name}"
    digest = hashlib.sha256()
    size = 0
    held: bytes | None = None
    with target.open(manifest.artifact) as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            if size > manifest.size_bytes:
                raise IntegrityError(
                    f"{where}: the artifact is larger than the {manifest.size_bytes} bytes its manifest records "
                    f"(hint: the copy on {target.name} was changed after the backup; use another copy or backup)"
                )
            digest.update(chunk)
            if progress is not None:
                progress.advance(len(chunk))
            if held is not None:
                yield held
            held = chunk
    if size != manifest.size_bytes:
        raise IntegrityError(
            f"{where}: the artifact ends after {size} of {manifest.size_bytes} bytes (truncated) "
            f"(hint: the copy on {target.name} is incomplete; use another copy or backup)"
        )
    if digest.hexdigest() != manifest.sha256:
        raise IntegrityError(
            f"{where}: SHA-256 mismatch: the stored bytes hash to {digest.hexdigest()[:16]}..., the manifest says "
            f"{(manifest.sha256 or '-')[:16]}... (hint: the copy on {target.name} is damaged; use another copy "
            "with --from, or another backup)"
        )
    if held is not None:
        yield held


def hold_last(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Yield every chunk but keep the latest back until the source ended without an error."""
    held: bytes | None = None
    for chunk in chunks:
        if held is not None:
            yield held
        held = chunk
    if held is not None:
        yield held


def compression_of(manifest: Manifest) -> str:
    """The manifest's compression, falling back on the key's extension for manifests that lack it."""
    if manifest.compression in ("zstd", "gzip", "none"):
        return manifest.compression
    return layout.compression_of(manifest.artifact)


def archive_chunks(target: Target, manifest: Manifest, progress: Progress | None = None) -> Iterator[bytes]:
    """The decompressed (and, for an encrypted backup, decrypted with AGE_IDENTITY_FILE) archive, whose final
    bytes come only once the stored bytes and the stream are whole."""
    stored = stored_chunks(target, manifest, progress)
    if manifest.encryption:
        key = encryption.check_identity(encryption.identity(), manifest.id)
        stored = encryption.decrypted(stored, key, manifest.id)
    try:
        yield from hold_last(decompress(stored, compression_of(manifest)))
    except CorruptArchive as exc:
        raise IntegrityError(
            f"{manifest.id} on {target.name}: {exc} (hint: the copy is damaged; use another copy with --from, "
            "or another backup)"
        ) from exc
