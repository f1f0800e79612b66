"""Shipping WAL files from the spool to every target: the one seam between the WAL stream and storage.

Each target has its own passes (its own thread in `run`), so one target that refuses connections, or holds
them without answering until the read timeout, never delays the others' copies. A file is compressed and
checksummed by the same pipeline as every backup, and checked after the upload (the object is there with the
stored size) before its manifest is written. The shipper deletes a spooled file only once *every* configured
target holds a checked copy, so files catch up from the spool after an outage. A target that already holds the
file with other bytes is a conflict: nothing is overwritten, the file stays in the spool and /health says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app import layout
from app.compression import compressor
from app.manifest import Manifest, ManifestError
from app.pipeline import pump
from app.settings import Settings
from app.targets.base import ObjectLocked, Target, TargetError
from app.wal import HISTORY, SEGMENT, format_lsn, parse_lsn, parse_segment, written_end
from app.walstatus import WalStatus

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024
MTIME_TICK_NS = 50_000_000


class WalConflict(TargetError):
    """The target holds this WAL file name with different bytes."""


def _now() -> datetime:
    return datetime.now(UTC)


def ship_to(settings: Settings, target: Target, name: str, read: Callable[[], Iterable[bytes]],
            physical: dict[str, Any]) -> bool:
    """Put WAL file ``name`` (its raw bytes from ``read()``, described by ``physical``) on ``target``; returns
    False when a checked copy was already there. Raises TargetError (WalConflict for other bytes) or OSError."""
    if _holds(target, name, physical["raw_sha256"]):
        return False
    _upload(settings, target, name, read(), physical)
    return True


def _holds(target: Target, name: str, raw_sha256: str) -> bool:
    """True when ``target`` has a checked copy of these bytes; clears the remains of an interrupted upload."""
    mkey = layout.wal_manifest_key(name)
    if target.stat(mkey) is None:
        for compression in ("zstd", "gzip", "none"):
            key = layout.wal_key(name, compression)
            if target.stat(key) is not None:
                _drop_quietly(target, key)  # our own file without its manifest: its upload was interrupted
        return False
    try:
        manifest = Manifest.from_json(target.read_bytes(mkey))
    except ManifestError:
        manifest = None
    recorded = (manifest.physical or {}).get("raw_sha256") if manifest else None
    if recorded is not None and recorded != raw_sha256:
        raise WalConflict(f"{target.describe()} already holds {name} with other bytes (sha256 {recorded[:12]}..., "
                          f"the spool has {raw_sha256[:12]}...) (hint: two clusters or sidecars archive into the "
                          "same place? give each its own S3_PREFIX/NAS_PATH; the file stays in the spool)")
    info = target.stat(manifest.artifact) if manifest else None
    if manifest is not None and info is not None and info.size == manifest.size_bytes:
        return True
    for key in (mkey, manifest.artifact if manifest else None):  # damaged: replace the copy
        if key:
            _drop_quietly(target, key)
    return False


def _drop_quietly(target: Target, key: str) -> None:
    """Delete a leftover before it is written again; one that S3 Object Lock retains stays as an older version,
    and the new upload simply becomes the current one."""
    try:
        target.delete(key)
    except ObjectLocked as exc:
        log.info("%s on %s: %s; the new copy becomes its current version", key, target.describe(), exc)


def _upload(settings: Settings, target: Target, name: str, chunks: Iterable[bytes], physical: dict[str, Any]) -> None:
    compression = settings.dump.compression
    key = layout.wal_key(name, compression)
    started = _now().replace(microsecond=0)
    upload = target.begin(key)
    try:
        streamed = pump(chunks, compressor(compression, settings.dump.level), [upload]).plain
        assert streamed is not None
        upload.commit()
    except BaseException:
        upload.abort()
        raise
    info = target.stat(key)
    if info is None or info.size != streamed.size:
        _drop_quietly(target, key)
        raise TargetError(f"{target.describe()}: {key} is not there with its {streamed.size} bytes after the upload "
                          "(hint: check the target; the file stays in the spool and is shipped again)")
    kind = "history" if HISTORY.match(name) else ("partial" if ".partial." in name else "segment")
    manifest = Manifest(
        id=name, status="ok", database="_wal", started_at=started, finished_at=_now().replace(microsecond=0),
        host=settings.hostname, format=kind, compression=compression, artifact=key, kind="wal",
        size_bytes=streamed.size, sha256=streamed.sha256, physical=dict(physical),
        system_identifier=physical.get("system_identifier"),
    )
    target.put_bytes(layout.wal_manifest_key(name), manifest.to_json())


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for chunk in file_chunks(path):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


# --- the spool ------------------------------------------------------------------------------------------


class Shipper:
    """Ships what pg_receivewal left in the spool: completed segments and history files as soon as they appear,
    the partial segment when asked (every WAL_PARTIAL_INTERVAL and at shutdown); one pass per target at a time.

    The recovery point is the oldest of the targets' own: a target's pass that found nothing left to ship
    proves that everything received before it started is on that target, so everything received before the
    earliest such moment is on every target."""

    def __init__(self, settings: Settings, targets: Sequence[Target], status: WalStatus,
                 system_identifier: Callable[[], str | None] = lambda: None) -> None:
        self.settings = settings
        self.targets = list(targets)
        self.spool = settings.wal.spool
        self.status = status
        self.system_identifier = system_identifier
        names = [t.name for t in self.targets]
        #: partial snapshots this process stored, per target: deleted once a longer one or the segment is there
        self._snapshots: dict[str, dict[str, list[str]]] = {n: {} for n in names}
        self._last_partial: dict[str, tuple[str, int] | None] = dict.fromkeys(names)  # (file, mtime) shipped
        self._held: dict[str, set[str]] = {n: set() for n in names}  # spooled files with a checked copy there
        self._errors: dict[str, str] = {}  # the last pass's error, per target
        self._covered: dict[str, datetime | None] = dict.fromkeys(names)
        self._physical: dict[str, dict[str, Any]] = {}  # per spooled file: described once for every target
        self._passes = {n: threading.Lock() for n in names}  # one pass per target at a time (loop and shutdown)
        self._lock = threading.Lock()  # the maps above and deletions from the spool

    def spooled(self) -> tuple[list[Path], Path | None]:
        """Completed files in the order they must ship (history first, then segments), and the partial."""
        try:
            entries = sorted(self.spool.iterdir())
        except FileNotFoundError:
            return [], None
        histories = [p for p in entries if HISTORY.match(p.name)]
        segments = [p for p in entries if SEGMENT.match(p.name)]
        partials = [p for p in entries if p.name.endswith(".partial") and SEGMENT.match(p.name[:-8])]
        return histories + segments, (partials[-1] if partials else None)

    def pass_once(self, partial: bool) -> int:
        """A pass for every target at once (the last one at shutdown); returns how many files some target lacks."""
        threads = [threading.Thread(target=self.target_pass, args=(t, partial), name=f"wal-pass-{t.name}",
                                    daemon=True) for t in self.targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self.status.pending

    def target_pass(self, target: Target, partial: bool) -> None:
        """Ship to ``target`` what it lacks, in order, until its first failure (it is down for this pass)."""
        with self._passes[target.name]:
            started = _now()
            done, part = self.spooled()
            error: str | None = None
            complete = True
            for path in done:
                with self._lock:
                    if path.name in self._held[target.name]:
                        continue
                physical = self._describe(path)
                if physical is None:
                    continue  # pg_receivewal renamed it meanwhile
                try:
                    self._ship_one(target, path.name, lambda p=path: file_chunks(p), physical)
                except (TargetError, OSError) as exc:
                    complete, error = False, str(exc)
                    if not isinstance(exc, WalConflict):
                        break
                    continue
                if SEGMENT.match(path.name):
                    self.status.archived(parse_lsn(physical["stop_lsn"]))
                    self._drop_snapshots(target, path.name, keep=None)
                with self._lock:
                    self._held[target.name].add(path.name)
            if part is not None and complete:
                try:
                    complete = self._partial(target, part, ship=partial)
                except (TargetError, OSError) as exc:
                    complete, error = False, str(exc)
            self._settle(target, started, error, complete)

    def _describe(self, path: Path) -> dict[str, Any] | None:
        """The physical facts of a completed file, read once (its hash, LSN range, when it was first seen)."""
        with self._lock:
            known = self._physical.get(path.name)
        if known is not None:
            return known
        seen_at = _now()  # the file was complete before this: every write in it happened earlier
        try:
            raw_sha, raw_bytes = _sha256_file(path)
        except FileNotFoundError:
            return None
        name = path.name
        physical: dict[str, Any] = {"raw_sha256": raw_sha, "raw_bytes": raw_bytes, "received_by": seen_at.isoformat(),
                                    "system_identifier": self.system_identifier()}
        if SEGMENT.match(name):
            tli, segno = parse_segment(name, raw_bytes)
            physical.update(timeline=tli, wal_segment_size=raw_bytes, start_lsn=format_lsn(segno * raw_bytes),
                            stop_lsn=format_lsn((segno + 1) * raw_bytes))
        else:
            physical.update(timeline=int(name[:8], 16))
        with self._lock:
            return self._physical.setdefault(name, physical)

    def _ship_one(self, target: Target, name: str, read: Callable[[], Iterable[bytes]],
                  physical: dict[str, Any]) -> None:
        try:
            uploaded = ship_to(self.settings, target, name, read, physical)
        except (TargetError, OSError) as exc:
            conflict = isinstance(exc, WalConflict)
            log.log(logging.ERROR if conflict else logging.WARNING, "WAL %s not shipped to %s: %s", name,
                    target.name, exc)
            if conflict:
                self.status.conflict(f"{name} on {target.name}")
            raise
        if uploaded:
            self.status.shipped_file()
            log.debug("WAL %s on %s", name, target.name)

    def _partial(self, target: Target, path: Path, ship: bool) -> bool:
        """Whether the partial segment's content is on ``target``: shipped now when ``ship``, else whether it is
        unchanged since it was last shipped there."""
        try:
            read_at = time.time_ns()
            mtime = path.stat().st_mtime_ns  # before the read: a write after it shows as a change next pass
            if not ship or self._last_partial[target.name] == (path.name, mtime):
                return self._last_partial[target.name] == (path.name, mtime)
            data = path.read_bytes()  # one read: the name, the hash and the upload describe the same bytes
        except FileNotFoundError:
            return False  # completed meanwhile: the next pass ships the segment
        end = written_end(data)
        if end == 0:
            return True
        segment = path.name[:-8]
        name = f"{segment}.partial.{end:08X}"
        tli, segno = parse_segment(segment, len(data))
        physical = {"raw_sha256": hashlib.sha256(data).hexdigest(), "raw_bytes": len(data), "timeline": tli,
                    "received_by": datetime.fromtimestamp(read_at / 1e9, UTC).isoformat(),
                    "wal_segment_size": len(data), "start_lsn": format_lsn(segno * len(data)),
                    "stop_lsn": format_lsn(segno * len(data) + end), "system_identifier": self.system_identifier()}
        self._ship_one(target, name, lambda: iter([data]), physical)
        self._drop_snapshots(target, segment, keep=name)
        self._snapshots[target.name].setdefault(segment, []).append(name)
        self.status.archived(segno * len(data) + end)
        # File times are coarse (a few ms): a write in the same tick as the read would not change the mtime,
        # so only an mtime clearly older than the read marks the content as shipped.
        settled = read_at - mtime > MTIME_TICK_NS
        self._last_partial[target.name] = (path.name, mtime) if settled else None
        return True

    def _settle(self, target: Target, started: datetime, error: str | None, complete: bool) -> None:
        """After a pass: record its outcome, delete the files every target holds, report to the status."""
        with self._lock:
            if error is None:
                self._errors.pop(target.name, None)
            else:
                self._errors[target.name] = error
            if complete and self.status.receiver_streaming:
                self._covered[target.name] = started
            done, _ = self.spooled()
            names = {p.name for p in done}
            for held in self._held.values():
                held &= names
            lacking: set[str] = set()
            pending = 0
            for path in done:
                missing = {t.name for t in self.targets if path.name not in self._held[t.name]}
                if missing:
                    lacking |= missing
                    pending += 1
                    continue
                path.unlink(missing_ok=True)
                for held in self._held.values():
                    held.discard(path.name)
                self._physical.pop(path.name, None)
            waiting = {n: self._errors.get(n, "still uploading") for n in lacking}
            covered = list(self._covered.values())
            oldest = None if None in covered or not covered else min(c for c in covered if c is not None)
            self.status.shipped_pass(pending, waiting, oldest)

    def _drop_snapshots(self, target: Target, segment: str, keep: str | None) -> None:
        """Delete the older partial snapshots of ``segment`` this process stored on ``target``."""
        names = self._snapshots[target.name].get(segment, [])
        for old in [n for n in names if n != keep]:
            try:
                target.delete(layout.wal_manifest_key(old))  # manifest first: never a manifest without its file
                target.delete(layout.wal_key(old, self.settings.dump.compression))
                names.remove(old)
            except TargetError as exc:
                log.warning("could not delete the superseded %s from %s: %s", old, target.describe(), exc)
        if keep is None:
            self._snapshots[target.name].pop(segment, None)


def spool_ready(spool: Path) -> None:
    """Create the spool directory (owner-only: WAL holds every row the server wrote)."""
    spool.mkdir(parents=True, exist_ok=True)
    os.chmod(spool, 0o700)
