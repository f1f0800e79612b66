"""The WAL archive on the targets: file names, LSN arithmetic, what a target holds, continuity, verified reads.

WAL files live under ``_wal/<timeline>/`` (app/layout.py), each with a manifest of kind ``wal`` beside it that
records the stored bytes' SHA-256 (as every manifest does) and, in ``physical``, the raw file's SHA-256, its
timeline, segment size and the LSN range it covers. Three kinds of file:

* a completed segment, ``000000010000000A000000FF``: exactly the bytes the server wrote;
* a partial snapshot, ``<segment>.partial.<offset>``: the segment pg_receivewal is still filling, shipped every
  WAL_PARTIAL_INTERVAL and at shutdown so the recovery point stays within that bound; ``offset`` (8 hex
  digits) is how far it holds WAL. It is superseded by a longer snapshot and by the completed segment;
* a timeline history file, ``00000002.history``, which the server writes at a promotion.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from app import layout
from app.compression import CorruptArchive, decompress
from app.errors import SidecarError
from app.manifest import Manifest, ManifestError
from app.readpath import IntegrityError, compression_of, stored_chunks
from app.targets.base import Target, TargetError

log = logging.getLogger(__name__)

SEGMENT = re.compile(r"^(?P<tli>[0-9A-F]{8})(?P<log>[0-9A-F]{8})(?P<seg>[0-9A-F]{8})$")
PARTIAL = re.compile(r"^(?P<segment>[0-9A-F]{24})\.partial\.(?P<offset>[0-9A-F]{8})$")
HISTORY = re.compile(r"^(?P<tli>[0-9A-F]{8})\.history$")
_LSN = re.compile(r"^\s*([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\s*$")


class WalError(SidecarError):
    """The archive cannot give what was asked: a gap, a missing or damaged file."""


def parse_lsn(text: str) -> int:
    """``0/3027F28`` -> 50495272; ValueError with the accepted form otherwise."""
    m = _LSN.match(text)
    if not m:
        raise ValueError(f"{text!r} is not an LSN (hint: LSNs look like 0/3027F28, as pg_current_wal_lsn() prints)")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segments_per_xlogid(segment_size: int) -> int:
    return 0x100000000 // segment_size


def segment_name(tli: int, segno: int, segment_size: int) -> str:
    per = segments_per_xlogid(segment_size)
    return f"{tli:08X}{segno // per:08X}{segno % per:08X}"


def parse_segment(name: str, segment_size: int) -> tuple[int, int]:
    """(timeline, segment number) of a segment file name."""
    m = SEGMENT.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a WAL segment name")
    return int(m["tli"], 16), int(m["log"], 16) * segments_per_xlogid(segment_size) + int(m["seg"], 16)


def segment_of(lsn: int, segment_size: int) -> int:
    return lsn // segment_size


def written_end(data: bytes) -> int:
    """How many bytes of a pg_receivewal .partial file hold WAL: it pads the file with zeros, so the WAL ends
    at the last non-zero byte (rounded up to the 8-byte alignment records have)."""
    end = len(data.rstrip(b"\0"))
    return min(len(data), (end + 7) // 8 * 8)


# --- what a target holds ---------------------------------------------------------------------------------


@dataclass
class WalFile:
    """One WAL file as listed on a target (name only; the manifest is read when the file is used)."""

    name: str
    key: str
    manifest_key: str
    size: int
    tli: int
    kind: str  # segment | partial | history
    log_seg: tuple[int, int] = (0, 0)  # (xlogid, segment within it) from the name
    offset: int = 0  # partial snapshots: bytes of WAL they hold


@dataclass
class WalListing:
    """The WAL files one target holds, by kind; ``orphans`` have no manifest (an interrupted upload)."""

    segments: dict[str, WalFile] = field(default_factory=dict)
    partials: dict[str, list[WalFile]] = field(default_factory=dict)  # segment name -> snapshots, longest last
    histories: dict[str, WalFile] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)

    def newest_partial(self, segment: str) -> WalFile | None:
        found = self.partials.get(segment)
        return found[-1] if found else None

    def all_files(self) -> Iterator[WalFile]:
        yield from self.segments.values()
        for snaps in self.partials.values():
            yield from snaps
        yield from self.histories.values()


def _strip_ext(filename: str) -> str:
    for ext in (".zst", ".gz"):
        if filename.endswith(ext):
            return filename[: -len(ext)]
    return filename


def list_wal(target: Target) -> WalListing:
    """Every WAL file on ``target`` that has its manifest; raises TargetError when the target cannot be listed."""
    objects = {o.key: o for o in target.list(layout.WAL_PREFIX)}
    listing = WalListing()
    manifests = {k for k in objects if k.endswith(layout.MANIFEST_SUFFIX)}
    for key, obj in sorted(objects.items()):
        if key in manifests:
            continue
        name = _strip_ext(key.rsplit("/", 1)[-1])
        mkey = layout.wal_manifest_key(name)
        if mkey not in manifests:
            listing.orphans.append(key)
            continue
        if m := SEGMENT.match(name):
            listing.segments[name] = WalFile(name, key, mkey, obj.size, int(m["tli"], 16), "segment",
                                             (int(m["log"], 16), int(m["seg"], 16)))
        elif m := PARTIAL.match(name):
            seg = SEGMENT.match(m["segment"])
            assert seg is not None
            listing.partials.setdefault(m["segment"], []).append(WalFile(
                name, key, mkey, obj.size, int(seg["tli"], 16), "partial", (int(seg["log"], 16), int(seg["seg"], 16)),
                int(m["offset"], 16)))
        elif m := HISTORY.match(name):
            listing.histories[name] = WalFile(name, key, mkey, obj.size, int(m["tli"], 16), "history")
    for snaps in listing.partials.values():
        snaps.sort(key=lambda f: f.offset)
    return listing


def read_manifest(target: Target, wal: WalFile) -> Manifest:
    try:
        manifest = Manifest.from_json(target.read_bytes(wal.manifest_key))
    except ManifestError as exc:
        raise WalError(f"{wal.name} on {target.name}: its manifest is damaged: {exc} "
                       "(hint: use another target with --from)") from exc
    if manifest.kind != "wal" or manifest.artifact != wal.key:
        raise WalError(f"{wal.name} on {target.name}: its manifest describes {manifest.artifact!r} "
                       "(hint: the archive was changed by hand; use another target)")
    return manifest


def fetch(target: Target, wal: WalFile) -> bytes:
    """The raw WAL file, checked three ways: stored size and SHA-256 against its manifest, the compression
    frame's own checksum, and the raw SHA-256 recorded when it was shipped."""
    manifest = read_manifest(target, wal)
    try:
        data = b"".join(decompress(stored_chunks(target, manifest), compression_of(manifest)))
    except CorruptArchive as exc:
        raise IntegrityError(f"{wal.name} on {target.name}: {exc} (hint: use another target with --from)") from exc
    raw = (manifest.physical or {}).get("raw_sha256")
    if raw != hashlib.sha256(data).hexdigest():
        raise IntegrityError(f"{wal.name} on {target.name}: the WAL bytes do not hash to what was shipped "
                             "(hint: the copy is damaged; use another target with --from)")
    return data


def segment_size_of(target: Target, listing: WalListing) -> int | None:
    """The cluster's WAL segment size, from the manifest of any segment or partial on the target."""
    for wal in list(listing.segments.values())[-1:] + [s[-1] for s in listing.partials.values()][-1:]:
        try:
            size = (read_manifest(target, wal).physical or {}).get("wal_segment_size")
        except (WalError, TargetError) as exc:
            log.warning("cannot read %s: %s", wal.manifest_key, exc)
            continue
        if isinstance(size, int) and size > 0:
            return size
    return None


# --- continuity ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """The run of WAL on one timeline from ``first`` on: the completed segments without a hole, and where it
    ends (a partial snapshot of the next segment, when one is there)."""

    tli: int
    first: int  # segment number the chain must start at
    last_complete: int | None  # the last segment of the gapless run, None when ``first`` itself is missing
    tail: WalFile | None  # the newest partial snapshot of the segment after ``last_complete``
    gaps: tuple[tuple[int, int], ...]  # (first missing, last missing) segment numbers between later segments
    segment_size: int

    @property
    def end_lsn(self) -> int:
        """How far the gapless WAL from ``first`` reaches."""
        base = (self.first if self.last_complete is None else self.last_complete + 1) * self.segment_size
        return base + (self.tail.offset if self.tail is not None else 0)

    def describe_gaps(self) -> list[str]:
        out = []
        for lo, hi in self.gaps:
            a, b = segment_name(self.tli, lo, self.segment_size), segment_name(self.tli, hi, self.segment_size)
            out.append(a if lo == hi else f"{a} to {b}")
        return out


def chain(listing: WalListing, tli: int, first: int, segment_size: int) -> Chain:
    """Follow timeline ``tli`` from segment ``first``. Any segment number between ``first`` and the newest file
    of the timeline that has no completed segment is a gap (the newest may be a partial snapshot only)."""
    per = segments_per_xlogid(segment_size)
    complete = {f.log_seg[0] * per + f.log_seg[1] for f in listing.segments.values() if f.tli == tli}
    partial = {snaps[-1].log_seg[0] * per + snaps[-1].log_seg[1]: snaps[-1]
               for snaps in listing.partials.values() if snaps and snaps[-1].tli == tli}
    last: int | None = None
    n = first
    while n in complete:
        last, n = n, n + 1
    tail = partial.get(n)
    newest = max((x for x in complete | set(partial) if x >= first), default=None)
    gaps: list[tuple[int, int]] = []
    if newest is not None:
        missing = [x for x in range(first, newest + 1)
                   if x not in complete and not (x == newest and x in partial)]
        for x in missing:
            if gaps and gaps[-1][1] == x - 1:
                gaps[-1] = (gaps[-1][0], x)
            else:
                gaps.append((x, x))
    return Chain(tli, first, last, tail, tuple(gaps), segment_size)


def needed_files(listing: WalListing, base_tli: int, start_lsn: int, segment_size: int,
                 upto_lsn: int | None = None) -> tuple[list[WalFile], Chain]:
    """The WAL files a recovery from a base backup needs: the gapless run from its start segment, up to the
    segment holding ``upto_lsn`` (or all of it), ending with the newest partial snapshot when that is where
    the run ends."""
    run = chain(listing, base_tli, segment_of(start_lsn, segment_size), segment_size)
    files: list[WalFile] = []
    if run.last_complete is not None:
        for n in range(run.first, run.last_complete + 1):
            files.append(listing.segments[segment_name(base_tli, n, segment_size)])
            if upto_lsn is not None and n * segment_size > upto_lsn:
                return files, run  # the segment holding the target and the one after (a record may cross)
    if run.tail is not None:
        files.append(run.tail)
    return files, run


def gaps_report(targets: Sequence[Target]) -> dict[str, list[str]]:
    """Per target, the holes in each timeline's WAL between its first and its last file (for `verify`)."""
    out: dict[str, list[str]] = {}
    for target in targets:
        try:
            listing = list_wal(target)
        except TargetError as exc:
            out[target.name] = [f"cannot list the WAL archive: {exc}"]
            continue
        if not listing.segments and not listing.partials:
            continue
        size = segment_size_of(target, listing)
        if size is None:
            out[target.name] = ["cannot read any WAL manifest to learn the segment size"]
            continue
        problems: list[str] = []
        per = segments_per_xlogid(size)
        for tli in sorted({f.tli for f in listing.all_files() if f.kind != "history"}):
            numbers = [f.log_seg[0] * per + f.log_seg[1] for f in listing.all_files()
                       if f.tli == tli and f.kind != "history"]
            run = chain(listing, tli, min(numbers), size)
            problems += [f"timeline {tli}: missing {gap}" for gap in run.describe_gaps()]
        out[target.name] = problems
    return out


def verify_archive(targets: Sequence[Target], bases: Sequence[Manifest]) -> list[tuple[str, str, bool, str]]:
    """`verify`'s WAL lines as (subject, target, ok, detail): each timeline without holes on each target, and
    each base backup's own WAL range present (without it the base backup never becomes consistent)."""
    out: list[tuple[str, str, bool, str]] = []
    for name, problems in gaps_report(targets).items():
        out.append(("wal", name, not problems, "; ".join(problems) or "WAL archive continuous on every timeline"))
    for target in targets:
        try:
            listing = list_wal(target)
        except TargetError:
            continue  # reported above
        for base in bases:
            p = base.physical or {}
            if not p.get("start_lsn"):
                continue
            size = int(p.get("wal_segment_size") or 16 * 1024 * 1024)
            run = chain(listing, int(p["timeline"]), parse_lsn(p["start_lsn"]) // size, size)
            ok = run.end_lsn >= parse_lsn(p["stop_lsn"])
            out.append((base.id, f"{target.name}-wal", ok, f"WAL {p['start_lsn']} to {p['stop_lsn']} present" if ok
                        else f"the WAL from {p['start_lsn']} to {p['stop_lsn']} is not all there (archive reaches "
                             f"{format_lsn(run.end_lsn)}): this base backup cannot be recovered (hint: take a new "
                             "base backup)"))
    return out
