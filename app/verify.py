"""verify: prove that every stored copy of a backup can come back, optionally by restoring it for real.

Each copy is streamed from its target once: size and SHA-256 against the manifest, decompression to the end
(zstd/gzip framing catches truncation and trailing garbage), and an archive check that reads everything:
``pg_restore --file=/dev/null`` for custom archives (``pg_restore --list`` stops after the table of contents,
so it passes an archive cut short after it; the full read does not), pg_dump's closing trailer for plain SQL,
every member for tar. ``--restore-test`` then restores into a scratch database that is always dropped.
"""

from __future__ import annotations

import io
import logging
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app import encryption, layout
from app.catalog import Entry, load_catalog
from app.compression import CorruptArchive, decompress
from app.drills import SCRATCH_PREFIX as SCRATCH_PREFIX
from app.drills import Drill, store
from app.durations import format_size
from app.errors import SidecarError, UsageError
from app.logs import mask
from app.manifest import Manifest
from app.proc import Child, scratch_env
from app.readpath import IntegrityError, compression_of, stored_chunks
from app.selection import pick_source
from app.settings import Settings
from app.targets import Target, TargetError, make_targets

if TYPE_CHECKING:
    from app.notify import Notifier

log = logging.getLogger(__name__)

#: pg_dump / pg_dumpall write this close to the end of a complete plain dump (before \unrestrict, if any).
PLAIN_TRAILERS = (b"-- PostgreSQL database dump complete", b"-- PostgreSQL database cluster dump complete")
TAIL = 4096


class ArchiveInvalid(SidecarError):
    """The decompressed bytes are not a complete archive of the manifest's format."""


@dataclass(frozen=True)
class Check:
    """One line of the report: a copy on a target, or a restore test."""

    backup_id: str
    where: str  # target name, or "restore-test"
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAILED':<7} {self.backup_id}  {self.where:<5} {self.detail}"


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    backups: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def summary(self) -> str:
        failed = sum(not c.ok for c in self.checks)
        verdict = "all ok" if self.ok else f"{failed} FAILED"
        return f"verify: {self.backups} backup(s), {len(self.checks)} check(s): {verdict}"


# --- archive checks ---------------------------------------------------------------------------------------


def _tool_env() -> dict[str, str]:
    """pg_restore --file needs no connection, so it gets no credentials at all."""
    return scratch_env()


def check_custom(chunks: Iterable[bytes]) -> str:
    with Child(["pg_restore", "--file=/dev/null"], _tool_env(), feeds=True,
               hint="the custom archive is damaged or incomplete") as feed:
        for chunk in chunks:
            feed.write(chunk)
        feed.finish()
    return "custom archive readable to the end"


def _tail(chunks: Iterable[bytes]) -> tuple[bytes, int]:
    """The last TAIL bytes of a stream read to its end, and its length."""
    tail = b""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        tail = (tail + chunk)[-TAIL:]
    return tail, total


def check_plain(chunks: Iterable[bytes]) -> str:
    tail, total = _tail(chunks)
    if not any(trailer in tail for trailer in PLAIN_TRAILERS):
        raise ArchiveInvalid(
            f"the SQL ({format_size(total)}) does not end with pg_dump's \"dump complete\" trailer, so the dump was "
            "cut short (hint: this backup is incomplete; use another one)"
        )
    return "SQL complete (pg_dump trailer present)"


class ChunkReader(io.RawIOBase):
    """A file object over an iterator of chunks, for tarfile's stream mode."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            nxt = next(self._it, None)
            if nxt is None:
                return 0
            self._buf = nxt
        n = min(len(buffer), len(self._buf))
        buffer[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def check_tar(chunks: Iterable[bytes]) -> str:
    reader = ChunkReader(chunks)
    members = 0
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader), mode="r|") as tar:
            for _ in tar:
                members += 1
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveInvalid(f"the tar archive is damaged or cut short after {members} members: {exc} "
                             "(hint: use another backup)") from exc
    while reader.readinto(memoryview(bytearray(1 << 16))):
        pass  # the zero padding after the end-of-archive blocks: read so decompression is checked to the end
    return f"tar archive complete ({members} members)"


ARCHIVE_CHECKS: dict[str, Callable[[Iterable[bytes]], str]] = {
    "custom": check_custom, "plain": check_plain, "tar": check_tar,
}


def check_mariadb(chunks: Iterable[bytes]) -> str:
    from app.engines.mysql_stream import TRAILER

    tail, total = _tail(chunks)
    if TRAILER not in tail:
        raise ArchiveInvalid(
            f"the SQL ({format_size(total)}) does not end with mariadb-dump's \"Dump completed\" trailer, so the "
            "dump was cut short (hint: this backup is incomplete; use another one)")
    return "SQL complete (mariadb-dump trailer present)"


def archive_check(manifest: Manifest) -> Callable[[Iterable[bytes]], str] | None:
    """How to read this backup's archive to the end: by engine, then format."""
    if manifest.engine_name == "mariadb":
        return check_mariadb if manifest.format == "plain" else None
    if manifest.engine_name == "sqlite":
        from app.engines.sqlite import check_image

        return check_image
    return ARCHIVE_CHECKS.get(manifest.format)


def verify_copy(target: Target, manifest: Manifest) -> Check:
    """Stream one copy and check bytes, compression and archive; never raises for a bad copy."""
    t0 = time.monotonic()
    check_archive = archive_check(manifest)
    if check_archive is None:
        return Check(manifest.id, target.name, False, f"unknown format {manifest.format!r} in the manifest "
                     "(hint: written by a newer version? upgrade the sidecar)")
    stored: Iterator[bytes] | None = None
    try:
        stored = stored_chunks(target, manifest)
        archive: Iterator[bytes] = stored
        if manifest.encryption:
            opened = _decryptable(target, manifest, stored)
            if isinstance(opened, Check):
                return opened
            archive, stored = opened, None  # through age, age's own error tells damage from a bad backup
        detail = check_archive(decompress(archive, compression_of(manifest)))
    except (IntegrityError, TargetError) as exc:
        return Check(manifest.id, target.name, False, mask(str(exc)))
    except (CorruptArchive, SidecarError) as exc:
        return Check(manifest.id, target.name, False, _blame(exc, stored, manifest))
    seconds = time.monotonic() - t0
    return Check(manifest.id, target.name, True,
                 f"{format_size(manifest.size_bytes)}, size and sha256 ok, {detail} ({seconds:.1f}s)")


def _decryptable(target: Target, manifest: Manifest, stored: Iterator[bytes]) -> Iterator[bytes] | Check:
    """The decrypted stream of an encrypted backup, or the verdict when it cannot be decrypted here: without
    AGE_IDENTITY_FILE the size and SHA-256 are still checked (the archive check is skipped, and said so); an
    identity that is none of the backup's recipients (a key rotated out too early) fails the copy."""
    size = format_size(manifest.size_bytes)
    key = encryption.identity()
    recipients = set((manifest.encryption or {}).get("recipients") or [])
    if key is not None:
        opens = encryption.identity_fingerprints(key)
        if not opens or opens & recipients:
            return encryption.decrypted(stored, key, manifest.id)
    for _ in stored:  # size and SHA-256 of the ciphertext: raises IntegrityError on a damaged copy
        pass
    if key is None:
        return Check(manifest.id, target.name, True, f"{size}, size and sha256 ok; archive check skipped: the "
                     "backup is encrypted and AGE_IDENTITY_FILE is not set")
    return Check(manifest.id, target.name, False, f"{size}, size and sha256 ok, but no configured identity opens "
                 f"it: it is encrypted to {', '.join(sorted(recipients))} and AGE_IDENTITY_FILE opens "
                 f"{', '.join(sorted(opens))} (hint: keep a retired key's identity in AGE_IDENTITY_FILE, which may "
                 "hold several, until the last backup encrypted to it has expired)")


def _blame(exc: Exception, stored: Iterator[bytes] | None, manifest: Manifest) -> str:
    """Tell a copy damaged on the target (bytes differ from the manifest) from a backup bad since it was made."""
    try:
        for _ in stored or ():
            pass
    except (IntegrityError, TargetError) as integrity:
        return f"{mask(str(integrity))} [{manifest.format}: {mask(str(exc))}]"
    text = mask(str(exc))
    if "unsupported version" in text and "file header" in text:
        return (f"{mask(getattr(exc, 'message', text))}; the stored bytes match the manifest: this is version skew, "
                f"not damage: the archive was written by pg_dump {manifest.pg_dump_version or '?'}, newer than "
                "this pg_restore can read (hint: verify or restore with an image whose postgresql-client is at "
                "least that version)")
    if "hint:" not in text:
        text += " (hint: use another backup)"
    return f"{text}; the stored bytes match the manifest, so the backup was bad when it was made"


def verify_entry(entry: Entry, targets: Sequence[Target]) -> list[Check]:
    """Every target that holds this backup's manifest must hold a whole, intact copy."""
    checks: list[Check] = []
    for target in targets:
        if target.name not in entry.manifest_keys:
            continue
        m = entry.manifest_on(target.name)  # each copy is checked against its own manifest
        if not entry.copies.get(target.name):
            checks.append(Check(entry.id, target.name, False, _missing(target, m)))
            continue
        checks.append(verify_copy(target, m))
    return checks


def _missing(target: Target, m: Manifest) -> str:
    try:
        info = target.stat(m.artifact)
    except TargetError as exc:
        return mask(str(exc))
    if info is None:
        return (f"the ok manifest points at {m.artifact}, which is missing (hint: the artifact was deleted; restore "
                "from another target or backup)")
    return (f"{m.artifact} has {info.size} bytes, the manifest records {m.size_bytes} (hint: the copy is truncated "
            "or was changed; restore from another target or backup)")


# --- restore test: a drill (app/drills.py) -------------------------------------------------------------------


def restore_test(drill: Drill, entry: Entry, source: Target) -> Check:
    """Restore into a scratch database on the drill server, compare with the manifest, record the drill."""
    record = drill.run(entry, source)
    errors = store(drill.targets, entry, record)
    detail = record.detail() + "; scratch database dropped" if "could NOT be dropped" not in record.detail() \
        else record.detail()
    if errors:
        detail += "; " + "; ".join(errors)
    return Check(entry.id, "restore-test", record.ok, detail)


# --- choosing what to verify ------------------------------------------------------------------------------


def select_entries(targets: Sequence[Target], ref: str, all_: bool, database: str | None,
                   report: Report) -> list[Entry]:
    """The backups to verify; problems that leave nothing to check become failed checks in ``report``."""
    if all_ and ref != "latest":
        raise UsageError("give a backup ID or --all, not both (hint: `verify --all` or `verify ID`)")
    if not all_ and ref != "latest":
        try:
            name, _ = layout.parse_id(ref)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        database = name  # an ID names its database
    catalog = load_catalog(targets, database)
    for name, error in catalog.errors.items():
        report.checks.append(Check("-", name, False, f"cannot read the target: {mask(error)}"))
    ok = [e for e in catalog.entries if e.manifest.ok]
    if all_:
        chosen = ok
    elif ref == "latest":
        newest: dict[str, Entry] = {}
        for e in ok:  # newest first: the first of each name is its latest
            newest.setdefault(e.manifest.database, e)
        chosen = list(newest.values())
    else:
        entry = catalog.find(ref)
        if entry is None:
            stray = [f"{t}:{o.key}" for t, objs in catalog.orphans.items() for o in objs
                     if o.key.rsplit("/", 1)[-1].split(".", 1)[0] == ref]
            why = (f"no manifest, only an artifact ({', '.join(stray)}): not a complete backup (hint: its run was "
                   "interrupted; prune removes it after a day)" if stray
                   else "no such backup (hint: see `backup-sidecar list`)")
            report.checks.append(Check(ref, "-", False, why))
            return []
        if not entry.manifest.ok:
            report.checks.append(Check(ref, "-", False, f"the backup failed: {entry.manifest.error or '?'} "
                                       "(hint: failed backups cannot be verified; pick an ok one)"))
            return []
        chosen = [entry]
    if not chosen and not report.checks:
        which = f" of {database}" if database else ""
        report.checks.append(Check("-", "-", False, f"no ok backup{which} to verify (hint: run a backup first)"))
    return chosen


def verify(settings: Settings, targets: Sequence[Target], ref: str = "latest", *, all_: bool = False,
           database: str | None = None, restore_tests: bool = False,
           emit: Callable[[str], None] = print) -> Report:
    """Verify the chosen backups on every target holding them, printing one line per check as it completes."""
    report = Report()
    drill = Drill(settings, targets)
    entries = select_entries(targets, ref, all_, database, report)
    for check in report.checks:
        emit(check.line())
    for entry in entries:
        report.backups += 1
        checks = verify_entry(entry, targets)
        for check in checks:
            report.checks.append(check)
            emit(check.line())
        if restore_tests:
            check = _restore_test_for(drill, entry, targets, checks)
            report.checks.append(check)
            emit(check.line())
    if ref == "latest" or all_:
        for check in _wal_checks(targets, entries):
            report.checks.append(check)
            emit(check.line())
    emit(report.summary())
    return report


def _wal_checks(targets: Sequence[Target], entries: list[Entry]) -> list[Check]:
    """Point-in-time recovery: WAL gaps, and each verified base backup's own WAL range (app/wal.py)."""
    from app.wal import verify_archive

    bases = [e.manifest for e in entries if e.manifest.kind == "base"]
    return [Check(subject, where, ok, detail) for subject, where, ok, detail in verify_archive(targets, bases)]


def _restore_test_for(drill: Drill, entry: Entry, targets: Sequence[Target], checks: list[Check]) -> Check:
    m = entry.manifest
    if m.kind != "database" or m.format not in ("custom", "plain", "sqlite"):
        return Check(entry.id, "restore-test", True, f"skipped: a {m.kind} archive is not restored into a database")
    intact = [t for t in targets if t.name in {c.where for c in checks if c.ok} and entry.copies.get(t.name)]
    if not intact:
        return Check(entry.id, "restore-test", False, "not run: no intact copy to restore from")
    return restore_test(drill, entry, pick_source(entry, intact, None))  # a copy this process can decrypt first


def verify_command(settings: Settings, ref: str, all_: bool, database: str | None, restore_test: bool,
                   notifier: Notifier | None = None) -> bool:
    """`backup-sidecar verify`: True when every check passed (exit 0), else False (exit 1); failures notified."""
    report = verify(settings, make_targets(settings), ref, all_=all_, database=database, restore_tests=restore_test)
    if notifier is not None:
        for check in report.checks:
            if not check.ok:
                kind = "restore_test" if check.where == "restore-test" else "verify"
                try:
                    name, backup_id = layout.parse_id(check.backup_id)[0], check.backup_id
                except ValueError:  # a selection problem ("no backup found"), not a backup of its own
                    name, backup_id = database, None
                notifier.failure(kind, name, f"{check.where}: {check.detail}", backup_id=backup_id)
        if not report.checks:
            notifier.failure("verify", database, report.summary())
    return report.ok
