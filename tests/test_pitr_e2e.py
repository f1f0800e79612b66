"""Point-in-time recovery end to end: `run` streams WAL and takes a base backup, rows keep coming, and
restore-pitr brings back exactly the rows up to a chosen time, on a server started the way it says."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import S3Server, all_files_text
from pitr_support import RecoveredServer, Sidecar, WalCluster, Writer, rows, scratch_dir, wal_cluster

wal_pg = pytest.fixture(scope="module", name="wal_pg")(wal_cluster)
scratch = pytest.fixture(name="scratch")(scratch_dir)


def sidecar_env(wal_pg: WalCluster, nas: Path, s3: S3Server, bucket: str, tmp_path: Path, **extra: str) -> dict:
    return wal_pg.sidecar_env(NAS_PATH=str(nas), WAL_ARCHIVE="true", WAL_SPOOL_DIR=str(tmp_path / "spool"),
                              WAL_PARTIAL_INTERVAL="1s", BACKUP_SCHEDULE="03:00", **s3.env(bucket), **extra)


def test_recovers_exactly_the_rows_up_to_a_time_between_two_writes(wal_pg: WalCluster, cli, nas: Path, s3: S3Server,
                                                                     bucket: str, tmp_path: Path,
                                                                     scratch: Path) -> None:
    env = sidecar_env(wal_pg, nas, s3, bucket, tmp_path)
    sidecar = Sidecar(cli, env).start()
    try:
        base = sidecar.wait_check("base_backup", "ok", timeout=60)  # `run` takes one at start when none exists
        assert "_base-" in base["message"]
        with Writer(wal_pg):
            time.sleep(4)
            wal_pg.switch()  # some completed segments besides the partial one
            time.sleep(2)
        with wal_pg.connect("app") as conn:
            written = rows(conn)
        assert len(written) > 50
        middle = len(written) * 2 // 3
        (_, before), (_, after) = written[middle], written[middle + 1]
        target = before + (after - before) / 2
        expected = [r for r in written if r[1] <= target]
        assert 0 < len(expected) < len(written)
        # the archive covers the last write within WAL_PARTIAL_INTERVAL: wait for the shipper to say so
        sidecar.wait_for(lambda h: h["wal"]["age_seconds"] <= 2 and h["wal"]["pending_files"] == 0, 30,
                         "the archive to cover the writes")
        metrics = __import__("urllib.request").request.urlopen(f"http://127.0.0.1:{sidecar.port}/metrics").read()
        assert b"backup_sidecar_wal_slot_retained_bytes" in metrics and b"backup_sidecar_wal_receiver_up 1.0" in metrics
    finally:
        err = sidecar.stop()
    assert "WAL archive stopped" in err, err[-3000:]

    data_dir = scratch / "data"
    out = cli.run("restore-pitr", "--to-dir", str(data_dir), "--time", target.isoformat(), env=env)
    assert out.returncode == 0, out.stderr
    assert "Next: start PostgreSQL 15" in out.stdout and f"-D {data_dir} -l" in out.stdout
    assert (data_dir / "recovery.signal").exists()
    server = RecoveredServer(data_dir)
    try:
        conn = server.start()
        assert rows(conn) == expected
        assert "recovery stopping before commit" in server.log() or "recovery stopping after" in server.log()
        conn.close()
    finally:
        server.stop()

    # both targets hold the same WAL, each file with its manifest; none of it is a stray to list or prune
    nas_wal = sorted(p.name for p in (nas / "_wal").rglob("*") if p.is_file())
    s3_wal = sorted(k.rsplit("/", 1)[-1] for k in s3.keys(bucket) if k.startswith("_wal/"))
    assert nas_wal == s3_wal and any(".partial." in n for n in nas_wal)
    assert all(name.endswith(".manifest.json") or name.replace(".zst", ".manifest.json") in nas_wal
               for name in nas_wal)
    dry = cli.run("prune", "--dry-run", env=env)
    assert dry.returncode == 0 and "_wal/" not in dry.stdout and "0 stray artifact(s)" in dry.stdout
    listed = json.loads(cli.run("list", "--json", env=env).stdout)
    assert [b["kind"] for b in listed["backups"]] == ["base"]
    assert env["POSTGRES_PASSWORD"] not in all_files_text(nas) + err


def test_drill_recovers_latest_into_a_scratch_server_and_records_rto(wal_pg: WalCluster, cli, nas: Path,
                                                                      s3: S3Server, bucket: str,
                                                                      tmp_path: Path) -> None:
    env = sidecar_env(wal_pg, nas, s3, bucket, tmp_path)
    sidecar = Sidecar(cli, env).start()
    try:
        sidecar.wait_check("base_backup", "ok", timeout=60)
        with Writer(wal_pg):
            time.sleep(2)
    finally:
        sidecar.stop()
    with wal_pg.connect("app") as conn:
        last_at = conn.execute("SELECT max(at) FROM events").fetchone()[0]
    out = cli.run("restore-pitr", "--drill", "--latest", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pitr drill ok" in out.stdout and "RTO" in out.stdout
    [record_file] = list(nas.rglob("_base-*.drill-*.json"))
    record = json.loads(record_file.read_text())
    assert record["status"] == "ok" and record["rto_s"] > 0
    # the recovery point is the last write: the sidecar shipped the partial segment at its stop
    recovered = record["recovery_point"]["time"]
    assert recovered is not None
    from datetime import datetime

    assert abs(datetime.fromisoformat(recovered) - last_at) < timedelta(seconds=1)


def test_restore_pitr_refuses_bad_targets_and_damaged_copies_leaving_the_directory_as_it_was(
        wal_pg: WalCluster, cli, nas: Path, s3: S3Server, bucket: str, tmp_path: Path, scratch: Path) -> None:
    env = sidecar_env(wal_pg, nas, s3, bucket, tmp_path)
    sidecar = Sidecar(cli, env).start()
    try:
        base = sidecar.wait_check("base_backup", "ok", timeout=60)
        with Writer(wal_pg):
            time.sleep(1)
    finally:
        sidecar.stop()
    base_id = base["message"].split()[3]

    busy = scratch / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    out = cli.run("restore-pitr", "--to-dir", str(busy), "--latest", env=env)
    assert out.returncode == 1 and "is not empty" in out.stderr and "hint:" in out.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    out = cli.run("restore-pitr", "--to-dir", str(scratch / "a"), "--time", "2001-01-01 00:00:00+00", env=env)
    assert out.returncode == 1 and "no base backup ends before time 2001-01-01" in out.stderr, out.stderr
    out = cli.run("restore-pitr", "--to-dir", str(scratch / "a"), "--time", "2999-01-01T00:00:00Z", env=env)
    assert out.returncode == 1 and "holds writes up to about" in out.stderr and "--latest" in out.stderr, out.stderr
    out = cli.run("restore-pitr", "--to-dir", str(scratch / "a"), "--lsn", "FFFF/0", env=env)
    assert out.returncode == 1 and "reaches only LSN" in out.stderr, out.stderr
    out = cli.run("restore-pitr", "--to-dir", str(scratch / "a"), "--time", "yesterday", env=env)
    assert out.returncode == 2 and "is not a time" in out.stderr and "hint:" in out.stderr
    out = cli.run("restore-pitr", "--latest", env=env)
    assert out.returncode == 2 and "--to-dir" in out.stderr
    assert not (scratch / "a").exists()

    # a damaged copy on the NAS: refused mid-stream, the directory removed; the S3 copy still recovers
    [artifact] = list(nas.glob(f"_base/*/*/*/{base_id}.tar.zst"))
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    out = cli.run("restore-pitr", "--to-dir", str(scratch / "b"), "--latest", "--from", "nas", env=env)
    assert out.returncode == 1 and "damaged" in out.stderr and "was removed" in out.stderr, out.stderr
    assert not (scratch / "b").exists()
    out = cli.run("restore-pitr", "--to-dir", str(scratch / "b"), "--latest", "--from", "s3", env=env)
    assert out.returncode == 0, out.stderr
    with wal_pg.connect("app") as conn:
        written = rows(conn)
    server = RecoveredServer(scratch / "b")
    try:
        conn = server.start()
        assert rows(conn) == written
        conn.close()
    finally:
        server.stop()
