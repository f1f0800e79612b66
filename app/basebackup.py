"""A physical base backup as an Artifact: ``pg_basebackup`` streamed as one tar through the backup pipeline.

``pg_basebackup -D - -Ft -X none`` writes the whole data directory as a single tar on stdout, with its
``backup_manifest`` as the last member. The tar is read as it streams (no temp file): every member's SHA-256
is computed on the way and compared with the backup_manifest at the end, whose own checksum is checked too, so
a base backup is only published when the server's manifest vouches for every byte. Its WAL range (start and
stop LSN, timeline) goes into the sidecar's manifest; the WAL itself comes from the WAL archive (-X none),
which is why a base backup needs the archiver streaming.

Limits, refused with the reason before anything is stored: extra tablespaces (pg_basebackup writes one tar per
tablespace and cannot put them on one stdout), wal_level minimal (no WAL for recovery), a role without
REPLICATION, and a pg_basebackup older than the server.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import psycopg

from app import layout, pg
from app.backup import Artifact, run_artifact
from app.cancel import CancelToken
from app.errors import SidecarError
from app.manifest import Manifest
from app.proc import Child
from app.settings import Settings
from app.targets.base import Target
from app.verify import ChunkReader

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024


class BaseBackupRefused(SidecarError):
    """The server or the sidecar's role cannot give a usable base backup; the message says why."""


class ManifestMismatch(SidecarError):
    """The tar pg_basebackup streamed does not match its own backup_manifest."""


def pg_binary(name: str, major: int | None = None) -> str:
    """A PostgreSQL program: from the server's major version directory when given and present, else PATH."""
    if major is not None:
        candidate = Path(f"/usr/lib/postgresql/{major}/bin/{name}")
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return name  # Child reports "not installed" with the install hint


def maintenance_db(settings: Settings) -> str:
    """The database the sidecar's SQL about the cluster (slots, LSNs) connects to."""
    return next((d for d in settings.db.databases if d != "*"), "postgres")


def cluster_facts(conn: psycopg.Connection) -> dict[str, Any]:
    """What every physical artifact records about its source cluster."""
    row = conn.execute("SELECT (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), "
                       "(SELECT system_identifier::text FROM pg_control_system())").fetchone()
    assert row is not None
    return {"wal_segment_size": int(row[0]), "system_identifier": str(row[1])}


def check_source(settings: Settings, conn: psycopg.Connection) -> dict[str, Any]:
    """Refuse what a streamed base backup cannot cover; return the cluster's facts."""
    db = settings.db
    where = f"{db.user}@{db.host}:{db.port}"
    row = conn.execute("SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user").fetchone()
    if not row or not row[0]:
        raise BaseBackupRefused(f"{where}: the role {db.user} lacks REPLICATION", hint=(
            f"ALTER ROLE {db.user} REPLICATION; and allow it in pg_hba.conf: host replication {db.user} <sidecar "
            "address> scram-sha-256"))
    level = conn.execute("SHOW wal_level").fetchone()
    if level and level[0] == "minimal":
        raise BaseBackupRefused(f"{where}: wal_level is minimal, so the server writes no WAL to recover with",
                                hint="set wal_level = replica on the server and restart it")
    spaces = conn.execute("SELECT spcname FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global') "
                          "ORDER BY 1").fetchall()
    if spaces:
        names = ", ".join(r[0] for r in spaces)
        raise BaseBackupRefused(
            f"{where}: the cluster has tablespaces besides pg_default ({names}); pg_basebackup writes one tar per "
            "tablespace and cannot stream them as one", hint="base backups here cover single-tablespace clusters; "
            "move the tables to pg_default, or back this cluster up with a tool that writes several files")
    return cluster_facts(conn)


class _Tee(ChunkReader):
    """verify's reader over producer chunks, keeping what was read so the same bytes go on downstream."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.taken: list[bytes] = []
        super().__init__(self._record(chunks))

    def _record(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.taken.append(chunk)
            yield chunk

    def take(self) -> list[bytes]:
        out, self.taken = self.taken, []
        return out

    def rest(self) -> Iterator[bytes]:
        for _ in self._it:
            yield from self.take()


class BaseScan:
    """Passes the tar through unchanged while hashing every member; ``check()`` compares with backup_manifest."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[int, str]] = {}
        self.manifest_bytes: bytes | None = None
        self.label: str | None = None

    def stream(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        tee = _Tee(chunks)
        try:
            with tarfile.open(fileobj=io.BufferedReader(tee, CHUNK), mode="r|") as tar:
                for member in tar:
                    if member.isfile():
                        digest = hashlib.sha256()
                        keep: list[bytes] | None = [] if member.name in ("backup_manifest", "backup_label") else None
                        f = tar.extractfile(member)
                        assert f is not None
                        while data := f.read(CHUNK):
                            digest.update(data)
                            if keep is not None:
                                keep.append(data)
                            yield from tee.take()
                        self.files[member.name] = (member.size, digest.hexdigest())
                        if keep is not None and member.name == "backup_manifest":
                            self.manifest_bytes = b"".join(keep)
                        elif keep is not None:
                            self.label = b"".join(keep).decode("utf-8", "replace")
                    yield from tee.take()
        except tarfile.TarError as exc:
            raise ManifestMismatch(f"pg_basebackup's output is not a readable tar: {exc}",
                                   hint="check the pg_basebackup version and the server's log") from exc
        yield from tee.take()
        yield from tee.rest()  # the end-of-archive padding

    def check(self) -> dict[str, Any]:
        """Verify the stream against backup_manifest; return the WAL range and what it vouched for."""
        hint = "the base backup was not published; run it again, and check the server's log if it repeats"
        if self.manifest_bytes is None:
            raise ManifestMismatch("pg_basebackup's tar has no backup_manifest", hint=hint)
        data = self.manifest_bytes
        try:
            doc = json.loads(data)
            at = data.rindex(b'"Manifest-Checksum"')
        except (ValueError, json.JSONDecodeError) as exc:
            raise ManifestMismatch(f"the backup_manifest cannot be read: {exc}", hint=hint) from exc
        covered = data[: data.rindex(b"\n", 0, at) + 1]
        if hashlib.sha256(covered).hexdigest() != doc.get("Manifest-Checksum"):
            raise ManifestMismatch("the backup_manifest's own checksum does not match it", hint=hint)
        listed = {f["Path"]: f for f in doc.get("Files", [])}
        for path, entry in listed.items():
            got = self.files.get(path)
            if got is None:
                raise ManifestMismatch(f"{path} is in backup_manifest but not in the tar", hint=hint)
            if got[0] != entry.get("Size") or (entry.get("Checksum-Algorithm") == "SHA256"
                                               and got[1] != entry.get("Checksum")):
                raise ManifestMismatch(f"{path} in the tar differs from backup_manifest (size or SHA-256)", hint=hint)
        extra = sorted(set(self.files) - set(listed) - {"backup_manifest"})
        if extra:
            raise ManifestMismatch(f"the tar holds files backup_manifest does not list: {', '.join(extra[:5])}",
                                   hint=hint)
        ranges = doc.get("WAL-Ranges") or []
        if not ranges:
            raise ManifestMismatch("backup_manifest has no WAL range", hint=hint)
        if len({r["Timeline"] for r in ranges}) > 1:
            raise BaseBackupRefused("the backup spans a timeline switch (the standby was promoted during it)",
                                    hint="run the base backup again")
        return {
            "timeline": int(ranges[0]["Timeline"]),
            "start_lsn": ranges[0]["Start-LSN"],
            "stop_lsn": ranges[-1]["End-LSN"],
            "files": len(listed),
            "backup_manifest_sha256": hashlib.sha256(data).hexdigest(),
            "backup_label": (self.label or "").strip().splitlines(),
        }


def base_artifact(settings: Settings, cancel: CancelToken) -> Artifact:
    """The Artifact for ``pg_basebackup`` of the whole cluster (layout name ``_base``, kind ``base``)."""
    db = settings.db
    env = pg.child_env(db)
    argv = ["pg_basebackup", "--no-password", "--pgdata=-", "--format=tar", "--wal-method=none",
            "--checkpoint=fast", "--manifest-checksums=SHA256", "--label=backup-sidecar"]
    scan = BaseScan()
    facts: dict[str, Any] = {}

    def preflight() -> dict[str, str | None]:
        with pg.connect(db, maintenance_db(settings)) as conn:
            versions = pg.check_versions(db, maintenance_db(settings), conn, binary="pg_basebackup")
            facts.update(check_source(settings, conn))
        facts["pg_basebackup_version"] = versions.client
        # the cluster's identity where every manifest keeps it (app/identity.py), so retention and /health
        # tell this cluster's base backups from another's
        return {"server_version": versions.server, "system_identifier": str(facts["system_identifier"]),
                "source": f"{db.host}:{db.port}"}

    @contextmanager
    def source() -> Iterator[tuple[Iterator[bytes], Callable[[], list[str]]]]:
        with Child(argv, env, timeout_s=settings.dump.timeout_s, cancel=cancel,
                   explain=lambda line: pg.explain(line, db, "replication")) as child:

            def finish() -> list[str]:
                said = child.finish()
                facts.update(scan.check())
                return [line for line in said if "WAL archiving is not enabled" not in line
                        and "copied through other means" not in line]

            yield scan.stream(child.chunks()), finish

    def open_source() -> AbstractContextManager[tuple[Iterator[bytes], Callable[[], list[str]]]]:
        return source()

    return Artifact(layout.BASE_NAME, "base", "tar", open_source, preflight, recorded=lambda: {"physical": facts})


def base_backup(settings: Settings, targets: Sequence[Target], cancel: CancelToken) -> Manifest:
    """One base backup into every target; the ok manifest, or BackupFailed."""
    manifest = run_artifact(settings, targets, base_artifact(settings, cancel), cancel)
    p = manifest.physical or {}
    log.info("base backup %s: WAL %s to %s on timeline %s", manifest.id, p.get("start_lsn"), p.get("stop_lsn"),
             p.get("timeline"))
    return manifest


def slot_streaming(settings: Settings) -> bool:
    """Whether a receiver streams on the sidecar's slot now (the base backup's WAL then reaches the archive)."""
    with pg.connect(settings.db, maintenance_db(settings)) as conn:
        row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                           (settings.wal.slot,)).fetchone()
    return bool(row and row[0])


def base_backup_command(settings: Settings, targets: Sequence[Target], cancel: CancelToken) -> Manifest:
    """`backup-sidecar base-backup`: refuses unless the WAL archive is on and streaming, since a base backup
    without its WAL cannot be recovered."""
    if not settings.wal.enabled:
        raise BaseBackupRefused("WAL_ARCHIVE is off: a base backup is useless without the WAL archived beside it",
                                hint="set WAL_ARCHIVE=true and start `backup-sidecar run`, which streams the WAL")
    if not slot_streaming(settings):
        raise BaseBackupRefused(f"no WAL receiver streams on the slot {settings.wal.slot}, so the WAL this base "
                                "backup needs would not be archived",
                                hint="start `backup-sidecar run` with WAL_ARCHIVE=true (it also takes a base backup "
                                     "at start when none exists)")
    return base_backup(settings, targets, cancel)

