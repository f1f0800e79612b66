"""One backup of one artifact into every target, each copy published on its own: the place where a dump starts.

Order of events, chosen so that nothing ever looks like a good backup unless it is one, and so that one
target's trouble never costs another target its copy:
check each target (a failing one is left out, the others go on) -> connect and compare versions -> begin
an upload on every target that passed, parts planned from the size estimate -> stream the dump once into all
of them (a target failing mid-stream is dropped, the stream goes on while any target takes it) -> for each
target: commit, check what was stored, write its own ok manifest. A target that failed gets a failed manifest
where it still accepts one. BACKUP_OK_POLICY decides whether the run counts as ok (exit code, /health,
notifications); it never decides whether a good copy stays.

One budget bounds it all: BACKUP_TIMEOUT from the start for the dump, the uploads and the publication, then
CLEANUP_S for the aborts and failed manifests of a run that failed or was stopped, so a stopped or stalled
run ends within the orchestrator's grace and never lingers holding its locks.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from app import encryption, layout
from app.cancel import CancelToken
from app.compression import compressor
from app.deadline import Budget, DeadlineExceeded, remaining
from app.deadline import current as current_budget
from app.errors import SidecarError
from app.leases import Lease, LeaseLost
from app.logs import mask
from app.manifest import Manifest
from app.pipeline import pump
from app.proc import Child
from app.settings import Settings
from app.targets.base import Target, TargetError, Upload

log = logging.getLogger(__name__)


class BackupFailed(SidecarError):
    """A run that failed; carries the failed manifest that was written (or attempted)."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(f"{manifest.id}: {manifest.error}")
        self.manifest = manifest


@dataclass(frozen=True)
class Artifact:
    """What a backup streams: its name in the layout, format, and a producer of raw chunks."""

    name: str  # database name, or _globals / files name
    kind: str  # database | globals | files
    format: str  # custom | plain | tar
    #: Opens the producer: a context manager yielding (chunks, finish) once the connection checks passed.
    open_source: Callable[[], AbstractContextManager[tuple[Iterator[bytes], Callable[[], list[str]]]]]
    #: Runs before any upload starts (connect, version check); returns manifest fields to record.
    preflight: Callable[[], dict[str, str | None]] = lambda: {}
    #: An estimate of the artifact's size in bytes (a database's on-disk size), or None: S3 plans its one
    #: part size from it, and refuses at once an artifact that could not fit under its part limit.
    size_estimate: Callable[[], int | None] = lambda: None
    #: Runs after the producer finished cleanly: manifest fields only known at the end (a base backup's WAL range).
    recorded: Callable[[], dict[str, Any]] = lambda: {}


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _free_stamp(targets: Sequence[Target], name: str, at: datetime) -> datetime:
    """The first start time from ``at`` whose ID no target holds yet: an earlier backup is never overwritten."""
    for _ in range(120):
        key = layout.manifest_key(name, at)
        if all(_stat_quietly(t, key) is None for t in targets):
            return at
        at += timedelta(seconds=1)
    raise SidecarError(f"{name}: no free backup ID near {at:%H:%M:%S} (hint: this is a bug; please report it)")


def _stat_quietly(target: Target, key: str) -> object | None:
    try:
        return target.stat(key)
    except (TargetError, DeadlineExceeded):
        return None  # the target's own check reports the outage


@contextmanager
def child_source(child: Child, warnings: list[str] | None = None
                 ) -> Iterator[tuple[Iterator[bytes], Callable[[], list[str]]]]:
    """An Artifact source over a producer process: its stdout, and a finish() that checks its exit."""
    with child:

        def finish() -> list[str]:
            said = child.finish()
            if said:
                log.warning("%s said: %s", child.name, " | ".join(said))
            return list(warnings or [])

        yield child.chunks(), finish


def run_artifact(settings: Settings, targets: Sequence[Target], artifact: Artifact, cancel: CancelToken,
                 slot: str | None = None, *, lease: Lease | None = None) -> Manifest:
    """Stream ``artifact`` into every target, publishing each copy with its own ok manifest as soon as it is
    complete and checked. Returns the run's manifest when BACKUP_OK_POLICY is met, else raises BackupFailed.

    ``lease`` is checked before every chunk and right before each copy is published: a lease lost before a
    copy is published fails the run; a copy already published keeps a warning on its manifest.
    """
    if not targets:
        raise SidecarError("no backup target is configured (hint: set NAS_PATH and/or S3_BUCKET)")
    budget = Budget.after(settings.dump.timeout_s, cancel)
    with budget.scope():
        return _Run(settings, targets, artifact, budget, slot, lease).run()


#: what the cleanup of a failed or stopped run may take in all (aborts, failed manifests): within the 9 s stop
#: budget of `run` after pg_dump was stopped, and past BACKUP_TIMEOUT only by this much
CLEANUP_S = 4.0
#: a target's check, or the look for a free ID, may take this long before the run goes on without it
CHECK_S = 15.0


class _Copy:
    """One target's copy in this run: its upload and what became of it. write() never raises a target's
    failure: it records it and drops the copy, so the stream goes on for the others.

    With encryption the plain copies are written on age's feeder thread, so a failed run may abort a copy
    while a write to it is still in progress: ``lock`` makes the abort wait for that write (within the
    cleanup budget), and a write after the abort finds no upload and is dropped."""

    def __init__(self, target: Target, encrypted: bool) -> None:
        self.target = target
        self.encrypted = encrypted  # BACKUP_ENCRYPT_TARGETS: this copy stores the ciphertext
        self.lock = threading.RLock()
        self.upload: Upload | None = None
        self.error: str | None = None
        self.checked = False  # passed check(): only then may a failed manifest be written there
        self.published = False
        self.stored: str | None = None  # the fingerprint a stat shows (ObjectInfo.checksum)

    @property
    def alive(self) -> bool:
        return self.error is None and not self.published

    def fail(self, exc: BaseException | str) -> None:
        if self.error is None:
            self.error = exc if isinstance(exc, str) else _one_line(exc)
            log.error("no copy on %s (%s): %s", self.target.name, self.target.describe(), self.error)

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.error is not None or self.upload is None:
                return
            try:
                self.upload.write(data)
            except TargetError as exc:
                self.fail(exc)
                _bounded_abort(self)


class _Fanout:
    """A sink of the pipeline: every live copy of one stream (plain or encrypted) gets the bytes; when no copy
    of the run is left, of either stream, the run stops."""

    def __init__(self, copies: Sequence[_Copy], run: Sequence[_Copy]) -> None:
        self.copies = copies
        self.run = run

    def write(self, data: bytes) -> None:
        for copy in self.copies:
            copy.write(data)
        if not any(c.alive for c in self.run):
            raise SidecarError("no target took the backup: " + "; ".join(f"{c.target.name}: {c.error}"
                                                                        for c in self.run))


class _Run:
    def __init__(self, settings: Settings, targets: Sequence[Target], artifact: Artifact, budget: Budget,
                 slot: str | None, lease: Lease | None) -> None:
        self.settings = settings
        self.artifact = artifact
        self.budget = budget
        self.lease = lease
        self.copies = [_Copy(t, settings.encryption.applies_to(t.name)) for t in targets]
        with Budget(min(budget.deadline or math.inf, time.monotonic() + CHECK_S), budget.cancel).scope():
            started = _free_stamp(targets, artifact.name, now_utc())
        compression = settings.dump.compression
        self.recipients = settings.encryption.recipients
        #: each stream's artifact key: the plain copies' and the encrypted copies' (``.age``)
        self.keys = {enc: layout.artifact_key(artifact.name, started, layout.artifact_ext(
            artifact.format, compression, encrypted=enc)) for enc in (False, True)}
        #: the backup as the plain copies record it; the encrypted copies' manifest is ``self.sealed``
        self.manifest = Manifest(
            id=layout.backup_id(artifact.name, started), status="failed", database=artifact.name,
            started_at=started, finished_at=None, host=settings.hostname, format=artifact.format,
            compression=compression, artifact=self.keys[False], kind=artifact.kind, slot=slot,
        )
        self.sealed: Manifest | None = None
        self.manifest_key = layout.manifest_key(artifact.name, started)
        self.t0 = time.monotonic()
        self.run_error: str | None = None  # what ended the run as a whole (not one target's trouble)

    def check(self) -> None:
        """Before every chunk: stopped, out of time, or the lease gone ends the run."""
        self.budget.check(f"backup {self.manifest.id}")
        if self.lease is not None:
            self.lease.check()

    def run(self) -> Manifest:
        m = self.manifest
        log.info("backup %s started (%s, %s) -> %s", m.id, m.format, m.compression,
                 ", ".join(c.target.describe() for c in self.copies))
        try:
            self._check_targets()
            for key, value in self.artifact.preflight().items():
                setattr(m, key, value)
            estimate = _estimate(self.artifact)
            for copy in self._alive():
                try:
                    copy.upload = copy.target.begin(self.keys[copy.encrypted], size_hint=estimate)
                except TargetError as exc:
                    copy.fail(exc)
            if not self._alive():
                raise SidecarError("no target took the backup: " + "; ".join(
                    f"{c.target.name}: {c.error}" for c in self.copies))
            with self.artifact.open_source() as (chunks, finish):
                comp = compressor(m.compression, self.settings.dump.level)
                plain = [c for c in self._alive() if not c.encrypted]
                sealed = [c for c in self._alive() if c.encrypted]
                pumped = pump(chunks, comp, [_Fanout(plain, self.copies)] if plain else [], self.check,
                              self.recipients, [_Fanout(sealed, self.copies)] if sealed else [])
                m.warnings = finish()
            for key, value in self.artifact.recorded().items():
                setattr(m, key, value)
            if pumped.raw_bytes == 0:
                raise SidecarError(
                    f"{self.artifact.name}: the dump produced no data (hint: check the database and PGDUMP_EXTRA_OPTS)"
                )
            m.raw_bytes = pumped.raw_bytes
            if pumped.plain is not None:
                m.size_bytes, m.sha256 = pumped.plain.size, pumped.plain.sha256
            if pumped.encrypted is not None:  # table names and the database's properties are not for its readers
                try:
                    self.sealed = encryption.seal(replace(
                        m, artifact=self.keys[True], encryption=encryption.described(self.recipients),
                        size_bytes=pumped.encrypted.size, sha256=pumped.encrypted.sha256), self.recipients)
                except encryption.EncryptionError as exc:  # costs the encrypted copies only, never a plain one
                    for copy in self._alive():
                        if copy.encrypted:
                            copy.fail(exc)
                            _bounded_abort(copy)
            for copy in self._alive():
                self._publish(copy)
        except BaseException as exc:
            self._cleanup(exc)
            if isinstance(exc, Exception):
                raise BackupFailed(self._outcome()) from exc
            raise
        self._cleanup(None)
        outcome = self._outcome()
        if not outcome.ok:
            raise BackupFailed(outcome)
        log.info("backup %s ok: %s (%d raw), %.1fs", m.id, "; ".join(
            f"{c.target.name}: {self._stream(c).size_bytes} bytes{' encrypted' if c.encrypted else ''}, sha256 "
            f"{(self._stream(c).sha256 or '')[:16]}" for c in self.copies if c.published), m.raw_bytes,
            time.monotonic() - self.t0)
        return outcome

    def _alive(self) -> list[_Copy]:
        return [c for c in self.copies if c.alive]

    def _check_targets(self) -> None:
        """Each target's check, on its own short budget: a failing or hanging one is left out of this run."""
        for copy in self.copies:
            limit = min(self.budget.deadline or math.inf, time.monotonic() + CHECK_S)
            try:
                with Budget(limit, self.budget.cancel, f"the {CHECK_S:.0f}s target check").scope():
                    copy.target.check()
                copy.checked = True
            except (TargetError, DeadlineExceeded) as exc:
                copy.fail(exc)
        if not self._alive():
            raise SidecarError("; ".join(c.error or "" for c in self.copies))

    def _publish(self, copy: _Copy) -> None:
        """Commit one copy, check what was stored, write its own ok manifest; a failure here is this copy's."""
        m = self._stream(copy)
        assert copy.upload is not None and m.sha256 is not None
        self.check()  # the lease, once more, right before this copy becomes visible
        try:
            copy.stored = copy.upload.commit(m.sha256)
        except TargetError as exc:
            copy.fail(exc)
            return
        problem = _stored_problem(copy.target, m.artifact, m.size_bytes)
        if problem is None:
            doc = self._manifest_for(copy, "ok")
            try:
                copy.target.put_bytes(self.manifest_key, doc.to_json())
            except TargetError as exc:
                problem = f"cannot write the manifest: {_one_line(exc)}"
        if problem is not None:
            copy.fail(problem)
            _quietly(lambda: copy.target.delete(m.artifact), f"remove {m.artifact} from {copy.target.describe()}")
            return
        copy.published = True
        log.info("backup %s: copy on %s published", m.id, copy.target.describe())

    def _stream(self, copy: _Copy) -> Manifest:
        """The backup as ``copy`` stores it: the plain stream, or the encrypted one with its sealed fields."""
        if not copy.encrypted:
            return self.manifest
        if self.sealed is not None:
            return self.sealed
        # a run that failed before its stream ended (its failed manifests are stripped by _manifest_for)
        return replace(self.manifest, artifact=self.keys[True], encryption=encryption.described(self.recipients))

    def _manifest_for(self, copy: _Copy, status: str) -> Manifest:
        m = self._stream(copy)
        warnings = list(self.manifest.warnings)
        if status == "ok":
            return replace(m, status="ok", finished_at=now_utc(), error=None, target=copy.target.name,
                           stored_checksum=copy.stored, warnings=warnings)
        return replace(encryption.stripped(m) if copy.encrypted else m, status="failed", finished_at=now_utc(),
                       error=copy.error, size_bytes=0, sha256=None, target=copy.target.name, stored_checksum=None,
                       warnings=warnings)

    def _cleanup(self, exc: BaseException | None) -> None:
        """Fail every copy that is not published, abort its upload and write its failed manifest, NAS first
        (local and fast: it frees the space a full disk needs), all within CLEANUP_S. No step may raise."""
        if exc is not None:
            error = self.run_error = _one_line(exc)
            for copy in self.copies:
                if not copy.published:
                    copy.fail(error)
            if isinstance(exc, LeaseLost):
                for copy in self.copies:
                    if copy.published:
                        self._warn_published(copy, f"the lease was lost after this copy was published: {error}")
        failed = [c for c in self.copies if not c.published]
        if not failed:
            return
        if exc is not None:
            log.error("backup %s FAILED after %.1fs: %s", self.manifest.id, time.monotonic() - self.t0, error)
        with Budget.after(CLEANUP_S, CancelToken(), "the cleanup budget").scope():
            for copy in failed:
                _bounded_abort(copy)
                if copy.checked and not _out_of_time():
                    doc = self._manifest_for(copy, "failed").to_json()
                    _quietly(lambda c=copy, d=doc: c.target.put_bytes(self.manifest_key, d),
                             f"write the failed manifest to {copy.target.describe()}")
                elif copy.checked:
                    log.error("no time left to write the failed manifest to %s", copy.target.describe())

    def _warn_published(self, copy: _Copy, warning: str) -> None:
        doc = self._manifest_for(copy, "ok")
        doc.warnings.append(warning)
        with Budget.after(CLEANUP_S, CancelToken(), "the cleanup budget").scope():
            _quietly(lambda: copy.target.replace_bytes(self.manifest_key, doc.to_json()),
                     f"add a warning to the manifest on {copy.target.describe()}")

    def _outcome(self) -> Manifest:
        """The run's own manifest (for the CLI, /health, notifications): ok when the policy's copies exist."""
        first = next((c for c in self.copies if c.published), self.copies[0])
        m = replace(self._stream(first), finished_at=now_utc(), warnings=list(self.manifest.warnings))
        held = [c.target.name for c in self.copies if c.published]
        missing = [c for c in self.copies if not c.published]
        policy = self.settings.dump.ok_policy
        if policy == ("all",):
            ok = not missing
        elif policy == ("any",):
            ok = bool(held)
        else:
            ok = all(name in held for name in policy)
        notes = [f"no copy on {c.target.name}: {c.error}" for c in missing]
        if ok:
            m.status, m.error = "ok", None
            m.warnings += notes
            return m
        m.status = "failed"
        kept = f" (the copy on {', '.join(held)} is kept)" if held else ""
        if self.run_error is not None and all(c.error == self.run_error for c in missing):
            m.error = self.run_error + kept  # the run itself failed: one reason, not one per target
        else:
            m.error = "; ".join(notes) + kept if notes else "no copy was published"
        if not held:
            m.size_bytes, m.sha256 = 0, None
        return m


def _estimate(artifact: Artifact) -> int | None:
    try:
        return artifact.size_estimate()
    except Exception as exc:  # noqa: BLE001 - an estimate is a hint: parts fall back to the memory budget
        log.debug("no size estimate for %s: %s", artifact.name, exc)
        return None


def _stored_problem(target: Target, key: str, size: int) -> str | None:
    """What is wrong with the object just committed, or None: it must be there with every byte."""
    try:
        info = target.stat(key)
    except TargetError as exc:
        return f"cannot check the stored copy: {_one_line(exc)}"
    if info is None:
        return f"the committed object {key} is not there (hint: check the target's consistency)"
    if info.size != size:
        return f"the stored object has {info.size} bytes, the stream had {size} (hint: check the target)"
    return None


def _bounded_abort(copy: _Copy) -> None:
    """Abort the copy's upload within the current budget (or a cleanup budget of its own), once no write to
    it is in progress; a write stuck for longer leaves the upload to prune's cleanup of incomplete uploads."""
    if not copy.lock.acquire(timeout=max(0.1, remaining(CLEANUP_S))):
        log.error("a write to %s is still stuck: its upload is left for prune to clean up", copy.target.describe())
        return
    try:
        upload, copy.upload = copy.upload, None
    finally:
        copy.lock.release()
    if upload is None:
        return
    if current_budget() is None or _out_of_time():
        with Budget.after(CLEANUP_S, CancelToken(), "the cleanup budget").scope():
            _quietly(upload.abort, f"abort the upload on {copy.target.describe()}")
    else:
        _quietly(upload.abort, f"abort the upload on {copy.target.describe()}")


def _out_of_time() -> bool:
    budget = current_budget()
    return budget is not None and (budget.expired or budget.cancel.cancelled)


def _one_line(exc: BaseException | str) -> str:
    text = exc if isinstance(exc, str) else (str(exc) or exc.__class__.__name__)
    return (mask(text).strip() or "failed").splitlines()[0]


def _quietly(action: Callable[[], object], what: str) -> bool:
    """Run one cleanup step; log its failure instead of raising it. True when it worked."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the run has failed already; this must not mask why
        log.error("could not %s: %s", what, mask(str(exc)).splitlines()[0] if str(exc) else exc.__class__.__name__)
        return False
    return True
