"""The real CLI against real PostgreSQL (scram auth), a real S3 server and a real directory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from conftest import CANARY, Cli, PgServer, S3Server, all_files_text, free_port
from sample_data import build_sample, schema_dump, table_checksums

from app.targets.nas import MARKER


@pytest.fixture(scope="module")
def sample_db(pg: PgServer) -> str:
    name = pg.create_db("sample_src")
    build_sample(pg, name)
    return name


def manifests(nas: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(nas.rglob("*.manifest.json"))]


def files(nas: Path) -> list[Path]:
    """What the backups left on the NAS: every file but the directory's marker."""
    return sorted(p for p in nas.rglob("*") if p.is_file() and p.name != MARKER)


def artifacts(nas: Path) -> list[Path]:
    return [p for p in files(nas) if not p.name.endswith(".manifest.json")]


def assert_canary_absent(result: subprocess.CompletedProcess[str], *roots: Path) -> None:
    assert CANARY not in result.stdout
    assert CANARY not in result.stderr
    assert CANARY not in all_files_text(*roots)


def restore_with_stock_tools(pg: PgServer, artifact: Path, fmt: str) -> str:
    """Restore with zstd/gunzip + pg_restore/psql only: no code of the project involved."""
    target = pg.create_db()
    env = {**os.environ, "PGPASSWORD": pg.password}
    conn = ["-h", pg.host, "-p", str(pg.port), "-U", pg.user, "-d", target]
    decompress = ["zstd", "-dc", str(artifact)] if artifact.suffix == ".zst" else ["gzip", "-dc", str(artifact)]
    restore = (["pg_restore", "--exit-on-error", "--no-owner", *conn] if fmt == "custom"
               else ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *conn])
    dec = subprocess.Popen(decompress, stdout=subprocess.PIPE)
    out = subprocess.run(restore, stdin=dec.stdout, env=env, capture_output=True, text=True)
    assert dec.wait() == 0
    assert out.returncode == 0, out.stderr
    return target


def test_round_trip_to_s3_and_nas_restores_with_stock_tools(
    cli: Cli, pg: PgServer, s3: S3Server, bucket: str, nas: Path, sample_db: str, tmp_path: Path
) -> None:
    env = {**pg.env(POSTGRES_DB=sample_db), "NAS_PATH": str(nas), **s3.env(bucket, S3_PREFIX="prod/eu")}
    result = cli.run("backup", env=env, check=True)
    assert_canary_absent(result, nas)

    [manifest] = manifests(nas)
    assert manifest["status"] == "ok" and manifest["database"] == sample_db
    assert manifest["format"] == "custom" and manifest["compression"] == "zstd"
    assert manifest["artifact"].endswith(".dump.zst")
    assert manifest["id"] in result.stdout
    [artifact] = artifacts(nas)
    assert artifact.stat().st_size == manifest["size_bytes"]
    # the same bytes went to S3, under the prefix, with the same layout
    manifest_key = f"prod/eu/{manifest['artifact'].removesuffix('.dump.zst')}.manifest.json"
    assert s3.keys(bucket) == [f"prod/eu/{manifest['artifact']}", manifest_key]
    s3_copy = tmp_path / "from-s3.dump.zst"
    s3.client.fget_object(bucket, f"prod/eu/{manifest['artifact']}", str(s3_copy))
    assert s3_copy.read_bytes() == artifact.read_bytes()
    s3_manifest = json.loads(s3.client.get_object(bucket, manifest_key).read())
    own = ("target", "stored_checksum", "finished_at", "duration_s")  # each copy's manifest describes itself
    assert {k: v for k, v in s3_manifest.items() if k not in own} == {k: v for k, v in manifest.items() if k not in own}
    assert manifest["target"] == "nas" and manifest["stored_checksum"] == f"sha256:{manifest['sha256']}"
    assert s3_manifest["target"] == "s3" and s3_manifest["stored_checksum"].startswith("etag:")

    expected = table_checksums(pg, sample_db)
    for source in (artifact, s3_copy):
        restored = restore_with_stock_tools(pg, source, "custom")
        assert table_checksums(pg, restored) == expected
        assert schema_dump(pg, restored) == schema_dump(pg, sample_db)
        pg.drop_db(restored)

    listing = cli.run("list", env=env, check=True)
    assert manifest["id"] in listing.stdout and "nas,s3" in listing.stdout
    as_json = json.loads(cli.run("list", "--json", env=env, check=True).stdout)
    assert [b["id"] for b in as_json["backups"]] == [manifest["id"]]
    assert as_json["backups"][0]["stored_on"] == ["nas", "s3"]


def test_plain_gzip_backup_restores_with_psql(cli: Cli, pg: PgServer, nas: Path, sample_db: str) -> None:
    env = {**pg.env(POSTGRES_DB=sample_db), "NAS_PATH": str(nas), "BACKUP_FORMAT": "plain",
           "BACKUP_COMPRESSION": "gzip", "BACKUP_COMPRESSION_LEVEL": "1"}
    cli.run("backup", env=env, check=True)
    [artifact] = artifacts(nas)
    assert artifact.name.endswith(".sql.gz")
    restored = restore_with_stock_tools(pg, artifact, "plain")
    assert table_checksums(pg, restored) == table_checksums(pg, sample_db)
    pg.drop_db(restored)


def test_second_backup_keeps_the_first_and_both_are_listed(cli: Cli, pg: PgServer, nas: Path) -> None:
    db = pg.create_db()
    pg.psql(db, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "BACKUP_COMPRESSION": "none"}
    cli.run("backup", env=env, check=True)
    first = {p: p.read_bytes() for p in files(nas)}
    cli.run("backup", "--force", env=env, check=True)  # same second is fine: IDs never collide
    assert all(p.read_bytes() == data for p, data in first.items())
    ids = [m["id"] for m in manifests(nas)]
    assert len(set(ids)) == 2
    assert all(a.name.endswith(".dump") for a in artifacts(nas))


# ---- faults: each one exit 1, one clear line, failed manifest where possible, nothing at the final name ----

def _previous_backup(cli: Cli, env: dict[str, str], nas: Path) -> dict[Path, bytes]:
    cli.run("backup", env=env, check=True)
    return {p: p.read_bytes() for p in files(nas)}


def _assert_failed_cleanly(result: subprocess.CompletedProcess[str], nas: Path, before: dict[Path, bytes],
                           expect: str) -> dict:
    assert result.returncode == 1, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("backup-sidecar: error:")]
    assert len(error_lines) == 1, result.stderr
    assert expect in error_lines[0] and "hint:" in error_lines[0], error_lines[0]
    assert all(p.read_bytes() == data for p, data in before.items()), "an earlier backup was touched"
    new = [p for p in files(nas) if p not in before]
    assert not [p for p in new if not p.name.endswith(".manifest.json")], f"artifact or partial left: {new}"
    failed = [json.loads(p.read_text()) for p in new]
    assert len(failed) == 1 and failed[0]["status"] == "failed" and failed[0]["error"]
    assert failed[0]["sha256"] is None and failed[0]["size_bytes"] == 0
    assert_canary_absent(result, nas)
    return failed[0]


@pytest.fixture
def small_db(pg: PgServer) -> str:
    db = pg.create_db()
    pg.psql(db, "CREATE TABLE items AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g")
    return db


def test_wrong_password_fails_with_hint(cli: Cli, pg: PgServer, nas: Path, small_db: str) -> None:
    env = {**pg.env(POSTGRES_DB=small_db), "NAS_PATH": str(nas)}
    before = _previous_backup(cli, env, nas)
    result = cli.run("backup", "--force", env={**env, "POSTGRES_PASSWORD": "wrong-" + CANARY[::-1]}, timeout=60)
    failed = _assert_failed_cleanly(result, nas, before, "password authentication failed")
    assert "POSTGRES_PASSWORD" in failed["error"]


def test_unreachable_host_fails_within_seconds(cli: Cli, pg: PgServer, nas: Path) -> None:
    env = {**pg.env(POSTGRES_DB="app"), "POSTGRES_PORT": str(free_port()), "NAS_PATH": str(nas)}
    t0 = time.monotonic()
    result = cli.run("backup", env=env, timeout=60)
    assert time.monotonic() - t0 < 20
    _assert_failed_cleanly(result, nas, {}, "refused")


def test_missing_database_fails_with_hint(cli: Cli, pg: PgServer, nas: Path) -> None:
    result = cli.run("backup", env={**pg.env(POSTGRES_DB="no_such_db"), "NAS_PATH": str(nas)}, timeout=60)
    failed = _assert_failed_cleanly(result, nas, {}, "does not exist")
    assert "POSTGRES_DB" in failed["error"]


def test_missing_nas_directory_fails_the_run_but_s3_keeps_its_copy(
    cli: Cli, pg: PgServer, s3: S3Server, bucket: str, tmp_path: Path, small_db: str
) -> None:
    env = {**pg.env(POSTGRES_DB=small_db), "NAS_PATH": str(tmp_path / "not-mounted"), **s3.env(bucket)}
    result = cli.run("backup", env=env, timeout=60)
    assert result.returncode == 1
    assert "no copy on nas" in result.stderr and "does not exist" in result.stderr and "hint:" in result.stderr
    assert "the copy on s3 is kept" in result.stderr
    assert not (tmp_path / "not-mounted").exists()  # never created: an unmounted volume must not fill the disk
    manifest_key = next(k for k in s3.keys(bucket) if k.endswith(".manifest.json"))
    doc = json.loads(s3.client.get_object(bucket, manifest_key).read())
    assert doc["status"] == "ok" and doc["target"] == "s3"
    assert sorted(s3.keys(bucket)) == sorted([doc["artifact"], manifest_key])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a read-only tmpfs")
def test_read_only_nas_fails_with_hint(cli: Cli, pg: PgServer, tmp_path: Path, small_db: str) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        result = cli.run("backup", env={**pg.env(POSTGRES_DB=small_db), "NAS_PATH": str(ro)}, timeout=60)
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert result.returncode == 1
    assert "read-only" in result.stderr and "hint:" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_disk_full_mid_stream_leaves_no_partial_and_keeps_earlier_backups(
    cli: Cli, pg: PgServer, tmp_path: Path, small_db: str
) -> None:
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(full)], check=True)
    try:
        env = {**pg.env(POSTGRES_DB=small_db), "NAS_PATH": str(full), "BACKUP_COMPRESSION": "none"}
        first_db = pg.create_db()
        before = _previous_backup(cli, {**env, "POSTGRES_DB": first_db}, full)
        result = cli.run("backup", "--force", env=env, timeout=60)
        _assert_failed_cleanly(result, full, before, "full")
    finally:
        subprocess.run(["umount", str(full)], check=True)


def _assert_nas_copy_kept(result: subprocess.CompletedProcess[str], nas: Path, expect: str) -> dict:
    """Exit 1 naming the missing S3 copy, while the NAS holds a complete, restorable copy with its ok manifest."""
    assert result.returncode == 1, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("backup-sidecar: error:")]
    assert len(error_lines) == 1, result.stderr
    assert "no copy on s3" in error_lines[0] and expect in error_lines[0] and "hint:" in error_lines[0]
    assert "the copy on nas is kept" in error_lines[0]
    [manifest] = manifests(nas)
    [artifact] = artifacts(nas)
    assert manifest["status"] == "ok" and manifest["target"] == "nas"
    assert artifact.stat().st_size == manifest["size_bytes"]
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() == manifest["sha256"]
    assert_canary_absent(result, nas)
    return manifest


def test_s3_endpoint_down_fails_the_run_but_nas_keeps_its_copy(cli: Cli, pg: PgServer, s3: S3Server, nas: Path,
                                                               small_db: str) -> None:
    env = {**pg.env(POSTGRES_DB=small_db), "NAS_PATH": str(nas), **s3.env("backups"),
           "S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    t0 = time.monotonic()
    result = cli.run("backup", env=env, timeout=120)
    assert time.monotonic() - t0 < 60
    _assert_nas_copy_kept(result, nas, "S3_ENDPOINT")
    restored = restore_with_stock_tools(pg, artifacts(nas)[0], "custom")
    assert table_checksums(pg, restored) == table_checksums(pg, small_db)
    pg.drop_db(restored)


def test_missing_bucket_fails_the_run_but_nas_keeps_its_copy(cli: Cli, pg: PgServer, s3: S3Server, nas: Path,
                                                             small_db: str) -> None:
    env = {**pg.env(POSTGRES_DB=small_db), "NAS_PATH": str(nas), **s3.env("no-such-bucket-anywhere")}
    result = cli.run("backup", env=env, timeout=60)
    _assert_nas_copy_kept(result, nas, "never creates buckets")


def _find_pg_dump(dbname: str, timeout: float = 20) -> int:
    """PID of the pg_dump dumping ``dbname`` (found by its environment, since argv carries no names)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if b"pg_dump" not in (proc / "cmdline").read_bytes():
                    continue
                if f"PGDATABASE={dbname}".encode() in (proc / "environ").read_bytes():
                    return int(proc.name)
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError("pg_dump did not start")


def _blocked_dump(pg: PgServer, db: str) -> psycopg.Connection:
    """A session holding an ACCESS EXCLUSIVE lock, so pg_dump hangs waiting for it."""
    conn = pg.connect(db)
    conn.autocommit = False
    conn.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
    return conn


def test_password_only_in_pg_dump_environment_never_in_any_cmdline(
    cli: Cli, pg: PgServer, s3: S3Server, bucket: str, nas: Path, small_db: str
) -> None:
    env = {**pg.env(POSTGRES_DB=small_db), "NAS_PATH": str(nas), **s3.env(bucket), "BACKUP_TIMEOUT": "60s"}
    blocker = _blocked_dump(pg, small_db)
    proc = cli.popen("backup", env=env)
    try:
        pid = _find_pg_dump(small_db)
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"PGPASSWORD={CANARY}".encode() in environ
        assert [e for e in environ if CANARY.encode() in e] == [f"PGPASSWORD={CANARY}".encode()]
        assert not any(k.startswith((b"POSTGRES_PASSWORD", b"S3_SECRET", b"DATABASE_URL")) for k in environ)
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                assert CANARY.encode() not in cmdline.read_bytes(), cmdline
            except OSError:
                continue
    finally:
        blocker.rollback()
        blocker.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert CANARY not in out + err


def test_pg_dump_killed_mid_stream_fails_cleanly(cli: Cli, pg: PgServer, s3: S3Server, bucket: str, nas: Path,
                                                 small_db: str) -> None:
    env = {**pg.env(POSTGRES_DB=small_db), "NAS_PATH": str(nas), **s3.env(bucket)}
    before = _previous_backup(cli, env, nas)
    s3_before = s3.keys(bucket)
    blocker = _blocked_dump(pg, small_db)
    try:
        proc = cli.popen("backup", "--force", env=env)
        os.kill(_find_pg_dump(small_db), 9)
        out, err = proc.communicate(timeout=60)
    finally:
        blocker.rollback()
        blocker.close()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    failed = _assert_failed_cleanly(result, nas, before, "killed by signal 9")
    new_s3 = sorted(set(s3.keys(bucket)) - set(s3_before))
    assert len(new_s3) == 1 and new_s3[0].endswith(f"{failed['id']}.manifest.json")  # no artifact on S3 either
    assert not list(s3.client.list_objects(bucket, recursive=True, include_version=False, prefix="zzz"))


def backup_while_blocked(cli: Cli, pg: PgServer, db: str, env: dict[str, str]
                         ) -> tuple[subprocess.CompletedProcess[str], float]:
    """`backup` while another session holds the lock pg_dump waits for: its result and how long it took."""
    blocker = _blocked_dump(pg, db)
    try:
        t0 = time.monotonic()
        result = cli.run("backup", env=env, timeout=60)
        return result, time.monotonic() - t0
    finally:
        blocker.rollback()
        blocker.close()


def test_hung_dump_is_killed_after_backup_timeout(cli: Cli, pg: PgServer, nas: Path, small_db: str) -> None:
    env = {**pg.env(POSTGRES_DB=small_db), "NAS_PATH": str(nas), "BACKUP_TIMEOUT": "2s"}
    result, elapsed = backup_while_blocked(cli, pg, small_db, env)
    assert elapsed < 15
    failed = _assert_failed_cleanly(result, nas, {}, "timed out after 2s")
    assert "BACKUP_TIMEOUT" in failed["error"]
    time.sleep(0.5)
    with pg.connect(small_db) as conn:  # the server-side session of the killed dump is gone too
        rows = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_dump' "
                            "OR application_name = 'backup-sidecar' AND datname = %s AND pid <> pg_backend_pid()",
                            (small_db,)).fetchone()
    assert rows == (0,)


def test_bad_settings_are_all_listed_at_once_with_exit_2(cli: Cli, nas: Path) -> None:
    result = cli.run("backup", env={"NAS_PATH": str(nas), "BACKUP_FORMAT": "tar", "BACKUP_COMPRESSION": "lz4",
                                    "HEALTH_PORT": "99999", "BACKUP_SCHEDULE": "every blue moon",
                                    "S3_BUCKET": "b", "S3_ACCESS_KEY_ID": "only-half",
                                    "POSTGRES_PASSWORD_FILE": "/nonexistent/secret"})
    assert result.returncode == 2
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 6, result.stderr
    assert all("hint" in p for p in problems), problems
    assert "cannot read it" in result.stderr
    for name in ("BACKUP_FORMAT", "BACKUP_COMPRESSION", "HEALTH_PORT", "BACKUP_SCHEDULE", "S3_ACCESS_KEY_ID",
                 "POSTGRES_PASSWORD_FILE"):
        assert name in result.stderr


def test_password_file_and_database_url_are_honoured(cli: Cli, pg: PgServer, nas: Path, small_db: str,
                                                     tmp_path: Path) -> None:
    secret = tmp_path / "pg_password"
    secret.write_text(CANARY + "\n")
    env = {**pg.env(POSTGRES_DB=small_db), "NAS_PATH": str(nas)}
    del env["POSTGRES_PASSWORD"]
    result = cli.run("backup", env={**env, "POSTGRES_PASSWORD_FILE": str(secret)}, check=True)
    assert_canary_absent(result, nas)
    url = f"postgresql://{pg.user}:{CANARY}@{pg.host}:{pg.port}/{small_db}?sslmode=disable"
    result = cli.run("backup", "--force", env={"DATABASE_URL": url, "NAS_PATH": str(nas)}, check=True)
    assert_canary_absent(result, nas)
    assert len([m for m in manifests(nas) if m["status"] == "ok"]) == 2
    config = cli.run("config", env={"DATABASE_URL": url, "NAS_PATH": str(nas)}, check=True)
    assert CANARY not in config.stdout and "****" in config.stdout and small_db in config.stdout
