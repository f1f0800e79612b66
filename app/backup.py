"""One backup of one database into every target, with its manifest: the place where a dump starts.

Order of events, chosen so that nothing ever looks like a good backup unless it is one:
check targets -> connect and compare versions -> begin an upload on every target -> stream pg_dump ->
commit every upload -> write the ok manifest on every target. Any failure aborts the uploads, removes
whatever was already published for this ID, and writes a failed manifest wherever a target still takes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from app import layout, pg
from app.cancel import CancelToken
from app.compression import compressor
from app.errors import SidecarError
from app.logs import mask
from app.manifest import Manifest
from app.pipeline import Child, Streamed, pump
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
    except TargetError:
        return None  # the target's own check reports the outage


def dump_artifact(settings: Settings, dbname: str, cancel: CancelToken) -> Artifact:
    """The Artifact for ``pg_dump`` of one database (custom format uncompressed inside, or plain SQL)."""
    db = settings.db
    env = pg.child_env(db)
    env["PGDATABASE"] = dbname  # the name goes by environment too: a name with '=' is never parsed as conninfo
    argv = ["pg_dump", "--no-password", f"--format={settings.dump.format}"]
    if settings.dump.format == "custom":
        argv.append("--compress=0")  # compressed once, in the stream, so stock zstd/gunzip can read it
    argv += list(db.extra_dump_opts)

    def preflight() -> dict[str, str | None]:
        with pg.connect(db, dbname) as conn:
            versions = pg.check_versions(db, dbname, conn)
        return {"pg_dump_version": versions.client, "server_version": versions.server}

    def open_source() -> AbstractContextManager[tuple[Iterator[bytes], Callable[[], list[str]]]]:
        return child_source(Child(argv, env, settings.dump.timeout_s, cancel,
                                   explain=lambda line: pg.explain(line, db, dbname)))

    return Artifact(dbname, "database", settings.dump.format, open_source, preflight)


@contextmanager
def child_source(child: Child, warnings: list[str] | None = None
                 ) -> Iterator[tuple[Iterator[bytes], Callable[[], list[str]]]]:
    """An Artifact source over a producer process: its stdout, and a finish() that checks its exit."""
    with child:

        def finish() -> list[str]:
            child.finish()
            return list(warnings or [])

        yield child.chunks(), finish


def run_artifact(settings: Settings, targets: Sequence[Target], artifact: Artifact, cancel: CancelToken,
                 slot: str | None = None) -> Manifest:
    """Stream ``artifact`` into every target and publish it with an ok manifest, or raise BackupFailed."""
    if not targets:
        raise SidecarError("no backup target is configured (hint: set NAS_PATH and/or S3_BUCKET)")
    compression = settings.dump.compression
    started = _free_stamp(targets, artifact.name, now_utc())
    ext = layout.artifact_ext(artifact.format, compression)
    manifest = Manifest(
        id=layout.backup_id(artifact.name, started), status="failed", database=artifact.name, started_at=started,
        finished_at=None, host=settings.hostname, format=artifact.format, compression=compression,
        artifact=layout.artifact_key(artifact.name, started, ext), kind=artifact.kind, slot=slot,
    )
    manifest_key = layout.manifest_key(artifact.name, started)
    uploads: list[Upload] = []
    committed: list[Target] = []
    usable = list(targets)
    t0 = time.monotonic()
    log.info("backup %s started (%s, %s) -> %s", manifest.id, artifact.format, compression,
             ", ".join(t.describe() for t in targets))
    try:
        for target in targets:
            try:
                target.check()
            except TargetError:
                usable.remove(target)
                raise
        for key, value in artifact.preflight().items():
            setattr(manifest, key, value)
        uploads = [t.begin(manifest.artifact) for t in targets]
        with artifact.open_source() as (chunks, finish):
            streamed: Streamed = pump(chunks, compressor(compression, settings.dump.level), uploads, cancel)
            manifest.warnings = finish()
        if streamed.raw_bytes == 0:
            raise SidecarError(
                f"{artifact.name}: the dump produced no data (hint: check the database and PGDUMP_EXTRA_OPTS)"
            )
        for target, upload in zip(targets, uploads, strict=True):
            upload.commit()
            committed.append(target)
        manifest.size_bytes, manifest.sha256 = streamed.size, streamed.sha256
        manifest.status, manifest.finished_at = "ok", now_utc()
        data = manifest.to_json()
        for target in targets:
            target.put_bytes(manifest_key, data)
    except BaseException as exc:
        # Cleanup: say it, unpublish, then target by target (NAS first: local and fast) abort the upload,
        # which frees the space a full disk needs, and record the failure, so a stop with little time left
        # still leaves failed manifests where it can. No step may raise: a cleanup error must not hide the
        # failure or skip the steps after it.
        manifest.status, manifest.finished_at = "failed", now_utc()
        manifest.size_bytes, manifest.sha256 = 0, None
        manifest.error = (mask(str(exc)).strip() or exc.__class__.__name__).splitlines()[0]
        log.error("backup %s FAILED after %.1fs: %s", manifest.id, time.monotonic() - t0, manifest.error)
        _rollback(committed, manifest.artifact, manifest_key)
        data = manifest.to_json()
        for i, target in enumerate(targets):
            if i < len(uploads):
                _quietly(uploads[i].abort, f"abort the upload of {manifest.artifact} on {target.describe()}")
            if target in usable:
                _quietly(lambda t=target: t.put_bytes(manifest_key, data),
                         f"write the failed manifest to {target.describe()}")
        if isinstance(exc, Exception):
            raise BackupFailed(manifest) from exc
        raise
    log.info("backup %s ok: %d bytes stored (%d raw), sha256 %s, %.1fs", manifest.id, streamed.size,
             streamed.raw_bytes, streamed.sha256[:16], time.monotonic() - t0)
    return manifest


def _quietly(action: Callable[[], object], what: str) -> bool:
    """Run one cleanup step; log its failure instead of raising it. True when it worked."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the run has failed already; this must not mask why
        log.error("could not %s: %s", what, mask(str(exc)).splitlines()[0] if str(exc) else exc.__class__.__name__)
        return False
    return True


def _rollback(committed: Sequence[Target], artifact_key: str, manifest_key: str) -> None:
    """Remove what this run already published, so a failed run leaves nothing at the final names."""
    for target in committed:
        for key in (manifest_key, artifact_key):
            _quietly(lambda t=target, k=key: t.delete(k), f"remove {key} from {target.describe()} after a failure")




def backup_database(settings: Settings, targets: Sequence[Target], dbname: str, cancel: CancelToken,
                    slot: str | None = None) -> Manifest:
    """pg_dump of ``dbname`` into every target; returns the ok manifest or raises BackupFailed."""
    return run_artifact(settings, targets, dump_artifact(settings, dbname, cancel), cancel, slot)
