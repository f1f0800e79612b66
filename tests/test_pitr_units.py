"""Point-in-time recovery pieces without a server: WAL names and continuity, the partial segment's end, the
base backup's manifest check, the recovery target, settings, the /health verdicts, shipping to a real directory."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.basebackup import BaseScan, ManifestMismatch
from app.errors import UsageError
from app.pitr import parse_target
from app.settings import ConfigError, load_settings
from app.targets.nas import NasTarget
from app.wal import (
    WalFile,
    WalListing,
    chain,
    fetch,
    format_lsn,
    list_wal,
    needed_files,
    parse_lsn,
    parse_segment,
    segment_name,
    written_end,
)
from app.walship import WalConflict, ship_to
from app.walstatus import SlotReading, WalStatus, wal_checks

MB = 1024 * 1024
SIZE = 16 * MB


def listing_of(complete: list[int], partial: dict[int, int] | None = None, size: int = SIZE) -> WalListing:
    per = 0x100000000 // size
    listing = WalListing()
    for n in complete:
        name = segment_name(1, n, size)
        listing.segments[name] = WalFile(name, f"k/{name}", f"m/{name}", 1, 1, "segment", (n // per, n % per))
    for n, offset in (partial or {}).items():
        seg = segment_name(1, n, size)
        listing.partials.setdefault(seg, []).append(
            WalFile(f"{seg}.partial.{offset:08X}", "k", "m", 1, 1, "partial", (n // per, n % per), offset))
    return listing


def test_lsn_and_segment_names_round_trip_across_an_xlogid_boundary() -> None:
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    assert segment_name(1, 0x1FF, SIZE) == "0000000100000001000000FF"
    assert parse_segment("000000020000000100000000", SIZE) == (2, 0x100)
    assert segment_name(1, 4096 + 5, MB) == "000000010000000100000005"  # 1 MiB segments: 4096 per xlogid
    with pytest.raises(ValueError, match="0/3027F28"):
        parse_lsn("3027F28")


def test_chain_runs_to_the_partial_tail_and_reports_holes_after_it() -> None:
    whole = chain(listing_of([3, 4, 5], {6: 0x2000}), 1, 3, SIZE)
    assert whole.last_complete == 5 and whole.tail is not None and whole.gaps == ()
    assert format_lsn(whole.end_lsn) == "0/6002000"
    holed = chain(listing_of([3, 4, 6, 7], {8: 0x10}), 1, 3, SIZE)
    assert holed.last_complete == 4 and holed.tail is None and holed.describe_gaps() == ["000000010000000000000005"]
    assert format_lsn(holed.end_lsn) == "0/5000000"
    missing_start = chain(listing_of([5, 6]), 1, 3, SIZE)
    assert missing_start.last_complete is None and missing_start.describe_gaps() == [
        "000000010000000000000003 to 000000010000000000000004"]
    superseded = chain(listing_of([3, 4], {4: 0x100}), 1, 3, SIZE)  # a snapshot of a segment now complete
    assert superseded.gaps == () and superseded.tail is None


def test_needed_files_stop_one_segment_after_the_target_lsn() -> None:
    listing = listing_of([3, 4, 5, 6, 7], {8: 0x40})
    files, _ = needed_files(listing, 1, parse_lsn("0/3000028"), SIZE, upto_lsn=parse_lsn("0/4800000"))
    assert [f.name[-2:] for f in files] == ["03", "04", "05"]
    files, _ = needed_files(listing, 1, parse_lsn("0/3000028"), SIZE)
    assert files[-1].kind == "partial" and len(files) == 6


def test_the_end_of_a_zero_padded_partial_segment_is_its_last_written_record() -> None:
    data = bytearray(MB)
    data[:1000] = b"\x01" * 1000
    data[4093] = 7
    assert written_end(bytes(data)) == 4096
    assert written_end(bytes(MB)) == 0


def test_recovery_target_takes_exactly_one_form_and_a_bare_time_is_in_tz() -> None:
    t = parse_target("2026-11-22 14:03:00", None, False, "Europe/Berlin")
    assert t.time == datetime(2026, 11, 22, 13, 3, tzinfo=UTC)
    assert t.settings_lines() == ["recovery_target_time = '2026-11-22 13:03:00+00:00'"]
    assert parse_target(None, "0/3027F28", False).settings_lines() == ["recovery_target_lsn = '0/3027F28'"]
    assert parse_target(None, None, True).settings_lines() == []
    for args in ((None, None, False), ("2026-01-01", "0/1", False)):
        with pytest.raises(UsageError, match="exactly one"):  # the CLI exits 2 for it
            parse_target(*args)
    with pytest.raises(UsageError, match="not an LSN"):
        parse_target(None, "zz", False)


def _tar(files: dict[str, bytes], manifest: bytes | None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [*files.items(), *([("backup_manifest", manifest)] if manifest is not None else [])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _manifest(files: dict[str, bytes], checksum_ok: bool = True) -> bytes:
    """A backup_manifest the way PostgreSQL 15 writes it (checksum over everything before its own line)."""
    entries = ",\n".join(json.dumps({"Path": n, "Size": len(d), "Checksum-Algorithm": "SHA256",
                                     "Checksum": hashlib.sha256(d).hexdigest()}) for n, d in files.items())
    body = (f'{{ "PostgreSQL-Backup-Manifest-Version": 1,\n"Files": [\n{entries}\n],\n"WAL-Ranges": [\n'
            '{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }\n],\n').encode()
    digest = hashlib.sha256(body).hexdigest() if checksum_ok else "0" * 64
    return body + f'"Manifest-Checksum": "{digest}"}}\n'.encode()


def _scan(data: bytes) -> tuple[BaseScan, bytes]:
    scan = BaseScan()
    out = b"".join(scan.stream(iter([data[i:i + 700] for i in range(0, len(data), 700)])))
    return scan, out


def test_base_scan_passes_the_tar_through_unchanged_and_checks_it_against_backup_manifest() -> None:
    files = {"PG_VERSION": b"15\n", "base/1/1259": b"x" * 20000, "global/pg_control": b"c" * 8192}
    data = _tar(files, _manifest(files))
    scan, out = _scan(data)
    assert out == data
    assert scan.check()["start_lsn"] == "0/2000028" and scan.check()["files"] == 3


@pytest.mark.parametrize(("change", "message"), [
    ("content", "differs from backup_manifest"), ("missing", "not in the tar"), ("extra", "does not list"),
    ("checksum", "own checksum"), ("no-manifest", "has no backup_manifest"),
])
def test_base_scan_refuses_a_tar_that_backup_manifest_does_not_vouch_for(change: str, message: str) -> None:
    files = {"PG_VERSION": b"15\n", "base/1/1259": b"x" * 20000}
    manifest = _manifest(files, checksum_ok=change != "checksum")
    streamed = dict(files)
    if change == "content":
        streamed["base/1/1259"] = b"y" * 20000
    elif change == "missing":
        del streamed["PG_VERSION"]
    elif change == "extra":
        streamed["base/1/9999"] = b"z"
    scan, _ = _scan(_tar(streamed, None if change == "no-manifest" else manifest))
    with pytest.raises(ManifestMismatch, match=message):
        scan.check()


def test_wal_settings_report_every_problem_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"NAS_PATH": str(tmp_path), "WAL_ARCHIVE": "yes please", "WAL_SLOT": "Bad-Name",
                       "WAL_WARN_AGE": "10m", "WAL_CRIT_AGE": "5m", "WAL_SLOT_CRIT_SIZE": "lots",
                       "BASE_BACKUP_SCHEDULE": "whenever"})
    text = "\n".join(err.value.problems)
    for needle in ("WAL_ARCHIVE", "WAL_SLOT='Bad-Name'", "WAL_CRIT_AGE must be longer", "WAL_SLOT_CRIT_SIZE",
                   "BASE_BACKUP_SCHEDULE"):
        assert needle in text
    assert all("hint" in p or ":" in p for p in err.value.problems)


def _status(**slot: object) -> WalStatus:
    now = datetime.now(UTC)
    s = WalStatus("backup_sidecar", started_at=now - timedelta(hours=1), receiver_streaming=True,
                  covered_at=now - timedelta(seconds=30), archived_lsn=parse_lsn("0/3000000"))
    s.slot = SlotReading(now, True, **slot)  # type: ignore[arg-type]
    return s


def _verdicts(s: WalStatus, now: datetime | None = None) -> dict[str, tuple[str, str]]:
    checks = wal_checks(s, None, 300, 900, 1 * MB, 4 * MB, now or datetime.now(UTC))
    return {c.name: (c.status, c.message) for c in checks}


def test_slot_retention_past_the_limit_is_critical_and_names_max_slot_wal_keep_size() -> None:
    assert _verdicts(_status(retained_bytes=100))["wal_slot"][0] == "ok"
    assert _verdicts(_status(retained_bytes=2 * MB))["wal_slot"][0] == "warning"
    status, message = _verdicts(_status(retained_bytes=5 * MB))["wal_slot"]
    assert status == "critical" and "max_slot_wal_keep_size" in message and "pg_drop_replication_slot" in message
    status, message = _verdicts(_status(retained_bytes=0, wal_status="lost"))["wal_slot"]
    assert status == "critical" and "base-backup" in message


def test_archive_age_conflicts_and_a_stopped_receiver_show_on_health() -> None:
    s = _status(retained_bytes=0)
    now = datetime.now(UTC)
    assert _verdicts(s, now)["wal_archive"][0] == "ok"
    assert _verdicts(s, now + timedelta(minutes=5))["wal_archive"][0] == "warning"
    assert _verdicts(s, now + timedelta(minutes=15))["wal_archive"][0] == "critical"
    s.receiver_streaming, s.receiver_error = False, "pg_receivewal failed: FATAL: no pg_hba.conf entry"
    assert "no pg_hba.conf entry" in _verdicts(s, now)["wal_archive"][1]
    s.conflicts.append("000000010000000000000003 on s3")
    assert _verdicts(s, now)["wal_archive"][0] == "critical"
    assert _verdicts(s, now)["base_backup"][0] == "warning"  # none yet


def test_shipping_is_checked_idempotent_and_never_overwrites_other_bytes(tmp_path: Path) -> None:
    settings = load_settings({"NAS_PATH": str(tmp_path)})
    target = NasTarget(tmp_path)
    name = segment_name(1, 3, MB)
    data = bytes(range(256)) * 4096
    physical = {"raw_sha256": hashlib.sha256(data).hexdigest(), "timeline": 1, "wal_segment_size": MB}
    assert ship_to(settings, target, name, lambda: iter([data]), physical)
    [wal] = list_wal(target).segments.values()
    assert fetch(target, wal) == data
    mtime = (tmp_path / wal.key).stat().st_mtime_ns
    assert not ship_to(settings, target, name, lambda: iter([data]), physical)  # already there
    assert (tmp_path / wal.key).stat().st_mtime_ns == mtime
    other = b"\x01" + data[1:]
    with pytest.raises(WalConflict, match="other bytes"):
        ship_to(settings, target, name, lambda: iter([other]),
                {**physical, "raw_sha256": hashlib.sha256(other).hexdigest()})
    assert fetch(target, wal) == data
    # an interrupted upload (file without manifest) is replaced; a damaged copy is refused when read
    (tmp_path / wal.manifest_key).unlink()
    assert list_wal(target).orphans == [wal.key]
    assert ship_to(settings, target, name, lambda: iter([data]), physical)
    stored = tmp_path / wal.key
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
    with pytest.raises(Exception, match="SHA-256|damaged|ends after|mismatch"):
        fetch(target, list_wal(target).segments[name])


def test_base_backups_are_scheduled_on_base_backup_schedule(tmp_path: Path) -> None:
    import schedule

    from app.walstream import WalArchiver

    settings = load_settings({"NAS_PATH": str(tmp_path), "WAL_ARCHIVE": "true", "BASE_BACKUP_SCHEDULE": "04:30"})
    scheduler = schedule.Scheduler()
    WalArchiver(settings, []).install(scheduler)
    [job] = scheduler.jobs
    assert job.next_run is not None and (job.next_run.hour, job.next_run.minute) == (4, 30)
