"""restore-pitr: a data directory recovered to a point in time, and the drill that proves one works.

``restore-pitr --to-dir DIR (--time T | --lsn L | --latest)`` picks the newest base backup that ends before
the target, streams it out of a target through the verified read path (size and SHA-256 against the manifest,
the last bytes held back until both match) into DIR, checks it with ``pg_verifybackup`` against the
backup_manifest it carries, fetches every WAL file from the base backup's start on into ``DIR/pg_wal`` (each
checked against its manifest and its raw SHA-256), and writes the recovery settings. Everything is checked
before the operator starts a server: a gap in the WAL, a target past the archive's end or a damaged file fails
here, and DIR is removed again (or emptied, when it existed).

The WAL is prefetched rather than fetched by a ``restore_command`` so DIR recovers on any machine with the
server's binaries, without the sidecar or its credentials; ``restore_command`` is ``false`` (PostgreSQL 15
requires one for archive recovery) and the server reads the files from pg_wal.

Limits: one timeline (the base backup's; after a failover on the source take a new base backup), and the WAL
from the base backup's start is fetched whole (DIR needs room for it).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from app import layout
from app.basebackup import pg_binary
from app.catalog import Entry, load_catalog
from app.durations import format_size
from app.errors import SidecarError, UsageError
from app.logs import mask
from app.manifest import Manifest, utc_iso
from app.proc import run_short
from app.readpath import IntegrityError, archive_chunks
from app.restore import check_source, restore_lock
from app.selection import pick_source
from app.settings import Settings
from app.targets import Target, TargetError, make_targets
from app.tarsafe import extract_all
from app.verify import ChunkReader
from app.wal import (
    WalError,
    WalFile,
    WalListing,
    fetch,
    format_lsn,
    list_wal,
    needed_files,
    parse_lsn,
    read_manifest,
    segment_name,
)

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024
RECOVERY_WAIT_S = 900.0


class PitrError(SidecarError):
    """A point-in-time recovery that cannot be prepared; the message says why and what was cleaned up."""


@dataclass(frozen=True)
class RecoveryTarget:
    kind: str  # time | lsn | latest
    time: datetime | None = None
    lsn: int | None = None

    def describe(self) -> str:
        if self.kind == "time":
            assert self.time is not None
            return f"time {self.time.isoformat(sep=' ')}"
        if self.kind == "lsn":
            assert self.lsn is not None
            return f"LSN {format_lsn(self.lsn)}"
        return "the end of the archive (latest)"

    def settings_lines(self) -> list[str]:
        if self.kind == "time":
            assert self.time is not None
            return [f"recovery_target_time = '{self.time.astimezone(UTC).isoformat(sep=' ')}'"]
        if self.kind == "lsn":
            assert self.lsn is not None
            return [f"recovery_target_lsn = '{format_lsn(self.lsn)}'"]
        return []


def parse_target(time_text: str | None, lsn_text: str | None, latest: bool, tz: str = "UTC") -> RecoveryTarget:
    """The one recovery target the options name; a time without an offset is in TZ."""
    given = [x for x in (time_text, lsn_text, latest or None) if x]
    if len(given) != 1:
        raise UsageError("give exactly one of --time, --lsn or --latest",
                        hint="e.g. --time '2026-11-22 14:03:00+00'")
    if time_text:
        try:
            at = datetime.fromisoformat(time_text.strip().replace("Z", "+00:00"))
        except ValueError as exc:
            raise UsageError(f"--time {time_text!r} is not a time",
                            hint="use ISO 8601, e.g. 2026-11-22T14:03:00+00:00; without an offset it is in TZ") from exc
        if at.tzinfo is None:
            at = at.replace(tzinfo=ZoneInfo(tz))
        return RecoveryTarget("time", time=at.astimezone(UTC))
    if lsn_text:
        try:
            return RecoveryTarget("lsn", lsn=parse_lsn(lsn_text))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    return RecoveryTarget("latest")


@dataclass
class Prepared:
    """A data directory ready to recover, and how to start it."""

    data_dir: Path
    base: Manifest
    source: str
    target: RecoveryTarget
    wal_files: int
    wal_bytes: int
    wal_end_lsn: int
    server_major: int
    next_command: str
    seconds: float


# --- choosing ----------------------------------------------------------------------------------------------


def _physical(m: Manifest, key: str) -> Any:
    value = (m.physical or {}).get(key)
    if value is None:
        raise PitrError(f"{m.id}: its manifest lacks {key} (hint: it was not written by backup-sidecar base-backup)")
    return value


def choose_base(entries: Sequence[Entry], target: RecoveryTarget) -> Entry:
    """The newest good base backup that ends before the target (any, for --latest)."""
    bases = [e for e in entries if e.good and e.manifest.kind == "base"]
    if not bases:
        raise PitrError("no base backup on the targets",
                        hint="`backup-sidecar base-backup` while `run` streams WAL (WAL_ARCHIVE=true)")
    for entry in bases:  # newest first
        m = entry.manifest
        if target.kind == "time" and target.time is not None and (m.finished_at or m.started_at) > target.time:
            continue
        if target.kind == "lsn" and target.lsn is not None and parse_lsn(_physical(m, "stop_lsn")) > target.lsn:
            continue
        return entry
    oldest = bases[-1].manifest
    raise PitrError(f"no base backup ends before {target.describe()}: the oldest, {oldest.id}, ended at "
                    f"{utc_iso(oldest.finished_at)} (LSN {_physical(oldest, 'stop_lsn')})",
                    hint="recovery can only go forward from a base backup; pick a later target")


def _listings(targets: Sequence[Target]) -> dict[str, WalListing]:
    out = {}
    for t in targets:
        try:
            out[t.name] = list_wal(t)
        except TargetError as exc:
            log.warning("cannot list the WAL on %s: %s", t.describe(), exc)
    return out


# --- laying out the directory ---------------------------------------------------------------------------


def _check_dir(path: Path) -> bool:
    """True when ``path`` is created here; refuses a directory that holds anything."""
    if path.exists():
        if not path.is_dir():
            raise PitrError(f"{path} exists and is not a directory (hint: give a new or empty directory)")
        if any(path.iterdir()):
            raise PitrError(f"{path} is not empty (hint: give a new or empty directory; nothing was changed)")
        return False
    path.mkdir(parents=True, mode=0o700)
    return True


def _clear(path: Path, created: bool) -> str:
    if created:
        shutil.rmtree(path, ignore_errors=True)
        return f"{path} was removed"
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    return f"{path} was emptied"


def _extract(target: Target, manifest: Manifest, data_dir: Path) -> int:
    """Unpack the verified base backup; the stream fails before its end if its bytes are not the stored ones."""
    reader = ChunkReader(archive_chunks(target, manifest))
    members = 0

    def seen(_member: tarfile.TarInfo) -> None:
        nonlocal members
        members += 1

    try:
        with tarfile.open(fileobj=io.BufferedReader(reader, CHUNK), mode="r|") as tar:
            extract_all(tar, data_dir, seen)
    except tarfile.TarError as exc:
        raise PitrError(f"{manifest.id}: the base backup's tar is damaged after {members} members: {exc}",
                        hint="use another copy with --from, or another base backup") from exc
    while reader.readinto(memoryview(bytearray(1 << 16))):
        pass  # the padding after the tar's end: read to the end so the checksum is checked
    return members


def _verifybackup(data_dir: Path, major: int) -> None:
    """pg_verifybackup against the backup_manifest inside: every file the server listed, with its checksum."""
    argv = [pg_binary("pg_verifybackup", major), "--no-parse-wal", "--quiet", str(data_dir)]
    try:
        out = run_short(argv, timeout=3600)
    except FileNotFoundError as exc:
        raise PitrError("pg_verifybackup is not installed (hint: install postgresql-client)") from exc
    if out.returncode != 0:
        said = (out.stderr.strip().splitlines() or ["exit code " + str(out.returncode)])[-1]
        raise PitrError(f"pg_verifybackup rejects the restored base backup: {mask(said)}",
                        hint="use another copy with --from, or another base backup")


def _fetch_wal(files: list[WalFile], holders: dict[str, list[tuple[Target, WalFile]]], pg_wal: Path) -> int:
    """Write each WAL file into pg_wal, from the first target whose copy checks out."""
    pg_wal.mkdir(mode=0o700, exist_ok=True)
    total = 0
    for wal in files:
        errors = []
        for target, copy in holders.get(wal.name, []):
            try:
                data = fetch(target, copy)
                break
            except (IntegrityError, WalError, TargetError) as exc:
                errors.append(mask(str(exc)))
        else:
            raise PitrError(f"{wal.name}: no intact copy on any target: {'; '.join(errors) or 'missing'}",
                            hint="the archive is damaged; recover to an earlier point, or use another base backup")
        name = wal.name.split(".partial.", 1)[0]  # a partial snapshot goes in as its segment (zero-padded)
        path = pg_wal / name
        path.write_bytes(data)
        path.chmod(0o600)
        total += len(data)
    return total


def _write_recovery_settings(data_dir: Path, base: Manifest, target: RecoveryTarget) -> None:
    lines = [
        "",
        f"# Added by backup-sidecar restore-pitr at {utc_iso(datetime.now(UTC))}: recover {base.id} to "
        f"{target.describe()}.",
        "# The WAL it needs was fetched and verified into pg_wal, where the server reads it; PostgreSQL requires",
        "# a restore_command for archive recovery, and this one reports every file as absent from an archive.",
        "restore_command = 'false'",
        *target.settings_lines(),
        "recovery_target_timeline = 'current'",
        "recovery_target_action = 'promote'",
        "",
    ]
    with open(data_dir / "postgresql.auto.conf", "a", encoding="utf-8") as f:
        f.write("\n".join(lines))
    (data_dir / "recovery.signal").write_text("")
    if not (data_dir / "postgresql.conf").exists():  # Debian keeps it in /etc: the server needs one here
        (data_dir / "postgresql.conf").write_text("# written by backup-sidecar restore-pitr: the source kept its "
                                                  "configuration outside the data directory\n")


def _owner_of(data_dir: Path) -> tuple[int, int]:
    st = (data_dir / "PG_VERSION").stat()
    return st.st_uid, st.st_gid


def _give_to_owner(data_dir: Path) -> None:
    """As root, tar gave the files to their recorded owner (postgres); the directory and new files follow."""
    if os.geteuid() != 0:
        return
    uid, gid = _owner_of(data_dir)
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)
    os.lchown(data_dir, uid, gid)


def _major(version: str | None) -> int:
    m = re.match(r"(\d+)", version or "")
    return int(m.group(1)) if m else 15


def _runuser() -> str:
    """runuser, which runs the server as the data directory's owner when the sidecar is root; it lives in sbin,
    which a minimal PATH (cron, env -i, some images) leaves out."""
    found = shutil.which("runuser") or next((p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.path.exists(p)),
                                            None)
    if found is None:
        raise PitrError("runuser not found: as root the server must run as the data directory's owner",
                        hint="install util-linux, or run the sidecar as that user")
    return found


def _next_command(data_dir: Path, major: int) -> str:
    pg_ctl = pg_binary("pg_ctl", major)
    cmd = f"{pg_ctl} -D {data_dir} -l {data_dir}/recovery.log start"
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwuid(_owner_of(data_dir)[0]).pw_name
        cmd = f"{_runuser()} -u {user} -- {cmd}"
    return cmd


def restore_pitr(settings: Settings, targets: Sequence[Target], to_dir: Path, target: RecoveryTarget,
                 source: str | None = None) -> Prepared:
    """Lay out ``to_dir`` to recover to ``target``; on any failure ``to_dir`` is left as it was found."""
    t0 = time.monotonic()
    catalog = load_catalog(targets, layout.BASE_NAME)
    for name, error in catalog.errors.items():
        log.warning("cannot read %s: %s", name, error)
    entry = choose_base(catalog.entries, target)
    base = entry.manifest
    tli, size = int(_physical(base, "timeline")), int(_physical(base, "wal_segment_size"))
    start, stop = parse_lsn(_physical(base, "start_lsn")), parse_lsn(_physical(base, "stop_lsn"))
    base_source = pick_source(entry, targets, source)
    listings = _listings([t for t in targets if source is None or t.name == source])
    holders: dict[str, list[tuple[Target, WalFile]]] = {}
    best: tuple[int, list[WalFile], Any] | None = None
    for t in targets:
        listing = listings.get(t.name)
        if listing is None:
            continue
        for wal in listing.all_files():
            holders.setdefault(wal.name, []).append((t, wal))
        files, run = needed_files(listing, tli, start, size, target.lsn if target.kind == "lsn" else None)
        if best is None or run.end_lsn > best[0]:
            best = (run.end_lsn, files, run)
    if best is None:
        raise PitrError("no target's WAL archive could be read (hint: check the targets; see the log lines above)")
    end, files, run = best
    gap = f"; missing {', '.join(run.describe_gaps()[:3])}" if run.gaps else ""
    first = segment_name(tli, start // size, size)
    if end < stop:
        raise PitrError(f"the WAL archive does not reach the end of base backup {base.id} (needs {first} to LSN "
                        f"{format_lsn(stop)}, has up to {format_lsn(end)}{gap})",
                        hint="the base backup cannot become consistent; is `run` streaming (WAL_ARCHIVE)? use an "
                             "older base backup, or wait for the next partial segment")
    if target.kind == "latest" and run.gaps:
        raise PitrError(f"the WAL archive has a gap after LSN {format_lsn(end)}{gap}, so the latest writes cannot be "
                        "reached", hint=f"recover up to the gap with --lsn {format_lsn(end)} (or an earlier --time), "
                        "and take a new base backup so the archive is whole again")
    if target.kind == "lsn" and target.lsn is not None and end < target.lsn:
        raise PitrError(f"the WAL archive reaches only LSN {format_lsn(end)}, before {target.describe()}{gap}",
                        hint="pick an earlier LSN, or --latest")
    if target.kind == "time" and target.time is not None:
        last = read_manifest(*holders[files[-1].name][0])
        # every write the last file holds happened before the sidecar read it ("received_by")
        received = (last.physical or {}).get("received_by")
        reaches = datetime.fromisoformat(received) if received else last.started_at
        if reaches < target.time:
            raise PitrError(f"the WAL archive holds writes up to about {utc_iso(reaches)}, before "
                            f"{target.describe()}{gap}", hint="pick an earlier time, or --latest")
    created = _check_dir(to_dir)
    try:
        log.info("restore-pitr: %s from %s into %s", base.id, base_source.describe(), to_dir)
        _extract(base_source, entry.manifest_on(base_source.name), to_dir)
        _verifybackup(to_dir, _major(base.server_version))
        wal_bytes = _fetch_wal(files, holders, to_dir / "pg_wal")
        _write_recovery_settings(to_dir, base, target)
        _give_to_owner(to_dir)
    except BaseException as exc:
        state = _clear(to_dir, created)
        if isinstance(exc, Exception):
            reason = mask(str(exc)).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise PitrError(f"restore-pitr into {to_dir} failed, {state}: {reason}") from exc
        raise
    major = _major(base.server_version)
    return Prepared(to_dir, base, base_source.name, target, len(files), wal_bytes, end, major,
                    _next_command(to_dir, major), time.monotonic() - t0)


def restore_pitr_command(settings: Settings, to_dir: Path, target: RecoveryTarget, source: str | None) -> None:
    """`restore-pitr`: under the run lock, like `restore`, so prune cannot delete what it is reading."""
    with restore_lock(settings):
        prepared = restore_pitr(settings, _targets(settings, source), to_dir.absolute(), target, source)
    print(f"restore-pitr: {prepared.base.id} from {prepared.source} laid out in {prepared.data_dir} with "
          f"{prepared.wal_files} WAL file(s) ({format_size(prepared.wal_bytes)}, up to LSN "
          f"{format_lsn(prepared.wal_end_lsn)}), recovering to {target.describe()}; {prepared.seconds:.1f}s")
    print("Next: start PostgreSQL", prepared.server_major, "on it; it replays the WAL, stops at the target and "
          "promotes:")
    print(f"  {prepared.next_command}")


def _targets(settings: Settings, source: str | None) -> list[Target]:
    targets = make_targets(settings)
    check_source(targets, source)
    return targets


# --- the drill ------------------------------------------------------------------------------------------------


@dataclass
class PitrDrill:
    """What a drill proved: a server recovered to the target from the archive, and how long it took."""

    backup_id: str | None
    target: str
    started_at: str
    status: str = "failed"
    kind: str = "pitr"
    finished_at: str | None = None
    rto_s: float | None = None
    recovery_point: dict[str, str | None] = field(default_factory=dict)
    wal_files: int = 0
    source: str | None = None
    error: str | None = None

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    def line(self) -> str:
        if self.status == "ok":
            return (f"pitr drill ok: {self.backup_id} from {self.source} recovered to {self.target} in "
                    f"{self.rto_s:.1f}s (RTO); recovery point LSN {self.recovery_point.get('lsn')}, last "
                    f"transaction {self.recovery_point.get('time')}")
        return f"pitr drill FAILED ({self.target}): {self.error}"


class ScratchServer:
    """A throwaway server on the recovered directory: Unix socket only, trust for local connections."""

    def __init__(self, scratch: Path, data_dir: Path, major: int) -> None:
        self.data_dir = data_dir
        self.sock = scratch / "sock"
        self.log = scratch / "server.log"
        self.hba = scratch / "pg_hba.conf"
        self.pg_ctl = pg_binary("pg_ctl", major)
        self.port = _free_port()
        self.runas: list[str] = []
        if os.geteuid() == 0:
            import pwd

            uid, gid = _owner_of(data_dir)
            self.runas = [_runuser(), "-u", pwd.getpwuid(uid).pw_name, "--"]
            scratch.chmod(0o755)
        self.sock.mkdir(exist_ok=True)
        self.hba.write_text("local all all trust\n")
        if os.geteuid() == 0:
            os.chown(self.sock, *_owner_of(data_dir))
            self.log.touch()
            for f in (self.hba, self.log):
                os.chown(f, *_owner_of(data_dir))
        self.started = False
        self.scratch = scratch

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.sock} -c listen_addresses='' -c hba_file={self.hba} -c archive_mode=off "
                "-c hot_standby=on")
        out = run_short([*self.runas, self.pg_ctl, "-D", str(self.data_dir), "-l", str(self.log), "-w", "-t",
                         str(int(RECOVERY_WAIT_S)), "-o", opts, "start"], timeout=RECOVERY_WAIT_S + 60,
                        cwd=self.data_dir)
        self.started = True
        if out.returncode != 0:
            raise PitrError(f"the recovered server did not start: {self.last_log_error() or out.stderr.strip()}",
                            hint="see the server's log lines above; a FATAL 'recovery ended before configured "
                                 "recovery target was reached' means the archive lacks WAL up to the target")

    def last_log_error(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        bad = [line for line in lines if "FATAL" in line or "PANIC" in line]
        return (bad or lines[-1:] or [""])[-1].strip()

    def connect(self, user: str) -> psycopg.Connection:
        last: Exception | None = None
        for dbname in ("postgres", "template1"):
            try:
                return psycopg.connect(host=str(self.sock), port=self.port, user=user, dbname=dbname,
                                       autocommit=True, connect_timeout=10)
            except psycopg.Error as exc:
                last = exc
        raise PitrError(f"cannot connect to the recovered server: {str(last).strip().splitlines()[0]}")

    def stop(self) -> None:
        if self.started:
            run_short([*self.runas, self.pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"],
                      timeout=120, cwd=self.data_dir)


def _free_port() -> int:
    """A port number for the drill server (it listens on a Unix socket only; the number names the socket)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_promoted(conn: psycopg.Connection, server: ScratchServer, deadline: float) -> None:
    while True:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        if row and not row[0]:
            return
        if time.monotonic() > deadline:
            raise PitrError(f"the recovered server was still in recovery after {RECOVERY_WAIT_S:.0f}s "
                            f"({server.last_log_error()})", hint="a large WAL backlog takes longer; run it by hand")
        time.sleep(0.2)


def pitr_drill(settings: Settings, targets: Sequence[Target], target: RecoveryTarget, source: str | None = None,
               store: bool = True) -> PitrDrill:
    """Recover into a scratch directory, start a server on it, check it reached the target, record it."""
    now = datetime.now(UTC).replace(microsecond=0)
    record = PitrDrill(None, target.describe(), utc_iso(now) or "")
    t0 = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="backup-sidecar-pitr-drill-"))
    server: ScratchServer | None = None
    try:
        prepared = restore_pitr(settings, targets, scratch / "data", target, source)
        record.backup_id, record.source, record.wal_files = prepared.base.id, prepared.source, prepared.wal_files
        server = ScratchServer(scratch, prepared.data_dir, prepared.server_major)
        server.start()
        with server.connect(settings.db.user) as conn:
            _wait_promoted(conn, server, time.monotonic() + RECOVERY_WAIT_S)
            record.rto_s = round(time.monotonic() - t0, 2)
            row = conn.execute("SELECT pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()").fetchone()
        assert row is not None
        lsn, last_xact = row[0], row[1]
        record.recovery_point = {"lsn": lsn, "time": last_xact.astimezone(UTC).isoformat() if last_xact else None}
        stop_lsn = parse_lsn(_physical(prepared.base, "stop_lsn"))
        if lsn is None or parse_lsn(lsn) < stop_lsn:
            raise PitrError(f"recovery stopped at {lsn}, before the base backup's end {format_lsn(stop_lsn)}")
        if target.kind == "lsn" and target.lsn is not None and parse_lsn(lsn) < target.lsn:
            raise PitrError(f"recovery stopped at {lsn}, before {target.describe()}")
        if target.kind == "time" and target.time is not None and last_xact is not None and last_xact > target.time:
            raise PitrError(f"recovery replayed a transaction of {last_xact}, after {target.describe()}")
        record.status = "ok"
    except (SidecarError, psycopg.Error, OSError) as exc:
        record.error = mask(str(exc)).splitlines()[0] if str(exc) else exc.__class__.__name__
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        record.finished_at = utc_iso(datetime.now(UTC))
    if store and record.backup_id:
        key = layout.drill_key(record.backup_id, now)  # beside the base backup, like the dump drills' records
        for t in targets:
            try:
                t.put_bytes(key, record.to_json())
            except TargetError as exc:
                log.error("could not store the drill record on %s: %s", t.describe(), exc)
    return record


def pitr_drill_command(settings: Settings, target: RecoveryTarget, source: str | None) -> bool:
    with restore_lock(settings):
        record = pitr_drill(settings, _targets(settings, source), target, source)
    print(record.line())
    return record.status == "ok"
