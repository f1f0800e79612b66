"""verify against real backups on a NAS directory and an S3 server, and the faults it must catch."""

from __future__ import annotations

import hashlib
import io
import re
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import zstandard
from conftest import CANARY, Cli, PgServer, S3Server

from app.layout import artifact_ext, artifact_key, backup_id, manifest_key_for_id, parse_id
from app.manifest import Manifest
from app.settings import load_settings
from app.targets import make_targets
from app.verify import SCRATCH_PREFIX, verify


def small_db(pg: PgServer) -> str:
    db = pg.create_db()
    pg.psql(db, "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10, 2)); "
                "INSERT INTO items SELECT g, 'item ' || g, g * 1.5 FROM generate_series(1, 2000) g; "
                "CREATE TABLE notes (id serial PRIMARY KEY, body text); INSERT INTO notes (body) VALUES ('a'), ('b');")
    return db


def backup(cli: Cli, env: dict[str, str]) -> str:
    return cli.run("backup", "--force", env=env, check=True).stdout.split()[0]


def manifest_of(nas: Path, backup_id: str) -> Manifest:
    return Manifest.from_json((nas / manifest_key_for_id(backup_id)).read_bytes())


def scratch_databases(pg: PgServer) -> list[str]:
    with pg.connect() as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                           (SCRATCH_PREFIX + "%",)).fetchall()]


@pytest.fixture
def env(pg: PgServer, s3: S3Server, bucket: str, nas: Path) -> dict[str, str]:
    return {**pg.env(POSTGRES_DB=small_db(pg)), "NAS_PATH": str(nas), **s3.env(bucket), "PRUNE_AFTER_BACKUP": "false"}


@pytest.mark.parametrize(("fmt", "compression"), [("custom", "zstd"), ("plain", "gzip"), ("custom", "none")])
def test_verify_passes_every_copy_of_a_good_backup(cli: Cli, env: dict[str, str], fmt: str, compression: str) -> None:
    ident = backup(cli, {**env, "BACKUP_FORMAT": fmt, "BACKUP_COMPRESSION": compression})
    result = cli.run("verify", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    archive = "custom archive readable to the end" if fmt == "custom" else "pg_dump trailer present"
    for target in ("nas", "s3"):
        assert re.search(rf"^ok +{ident} +{target} .*size and sha256 ok, .*{archive}", result.stdout, re.M)
    assert result.stdout.strip().endswith("verify: 1 backup(s), 2 check(s): all ok")
    assert CANARY not in result.stdout + result.stderr


def test_one_flipped_byte_fails_that_copy_and_only_that_one(cli: Cli, env: dict[str, str], nas: Path) -> None:
    ident = backup(cli, env)
    path = nas / manifest_of(nas, ident).artifact
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = cli.run("verify", ident, env=env)
    assert result.returncode == 1
    assert re.search(rf"^FAILED +{ident} +nas +{ident} on nas: SHA-256 mismatch", result.stdout, re.M)
    assert re.search(rf"^ok +{ident} +s3 ", result.stdout, re.M)
    assert "1 FAILED" in result.stdout


def test_truncated_copy_is_reported_with_both_sizes(cli: Cli, env: dict[str, str], nas: Path) -> None:
    ident = backup(cli, env)
    m = manifest_of(nas, ident)
    (nas / m.artifact).write_bytes((nas / m.artifact).read_bytes()[: m.size_bytes // 2])
    result = cli.run("verify", ident, env=env)
    assert result.returncode == 1
    assert f"has {m.size_bytes // 2} bytes, the manifest records {m.size_bytes}" in result.stdout


def test_ok_manifest_whose_artifact_is_gone_fails(cli: Cli, env: dict[str, str], nas: Path, s3: S3Server,
                                                   bucket: str) -> None:
    ident = backup(cli, env)
    s3.client.remove_object(bucket, manifest_of(nas, ident).artifact)
    result = cli.run("verify", "latest", env=env)
    assert result.returncode == 1
    assert re.search(rf"^FAILED +{ident} +s3 +the ok manifest points at .*, which is missing", result.stdout, re.M)
    assert re.search(rf"^ok +{ident} +nas ", result.stdout, re.M)


def test_artifact_without_a_manifest_is_not_a_backup(cli: Cli, env: dict[str, str], nas: Path, s3: S3Server,
                                                     bucket: str) -> None:
    ident = backup(cli, env)
    (nas / manifest_key_for_id(ident)).unlink()
    s3.client.remove_object(bucket, manifest_key_for_id(ident))
    result = cli.run("verify", ident, env=env)
    assert result.returncode == 1
    assert "no manifest, only an artifact" in result.stdout


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_a_dump_cut_short_before_it_was_stored_is_caught_although_its_checksum_matches(
        cli: Cli, env: dict[str, str], nas: Path, fmt: str) -> None:
    """The bytes match the manifest, so only the archive check can see that pg_dump's output is incomplete."""
    good = manifest_of(nas, backup(cli, {**env, "BACKUP_FORMAT": fmt}))
    raw = zstandard.ZstdDecompressor().decompressobj().decompress((nas / good.artifact).read_bytes())
    stored = zstandard.ZstdCompressor().compress(raw[: int(len(raw) * 0.9)])
    name, at = parse_id(good.id)
    earlier = at - timedelta(hours=1)
    bad = replace(good, id=backup_id(name, earlier), started_at=earlier, size_bytes=len(stored),
                  artifact=artifact_key(name, earlier, artifact_ext(fmt, "zstd")),
                  sha256=hashlib.sha256(stored).hexdigest())
    targets = make_targets(load_settings(env))
    for t in targets:
        t.put_bytes(bad.artifact, stored)
        t.put_bytes(manifest_key_for_id(bad.id), bad.to_json())
    lines: list[str] = []
    report = verify(load_settings(env), targets, bad.id, emit=lines.append)
    assert not report.ok
    why = "pg_restore failed: .*end of file" if fmt == "custom" else "does not end with pg_dump's \"dump complete\""
    for target in ("nas", "s3"):
        line = next(x for x in lines if x.split()[:3] == ["FAILED", bad.id, target])
        assert re.search(why, line) and "the stored bytes match the manifest" in line, line


def test_restore_test_counts_tables_and_rows_and_drops_the_scratch_database(
        cli: Cli, env: dict[str, str], pg: PgServer) -> None:
    ident = backup(cli, env)
    result = cli.run("verify", "--restore-test", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"^ok +{ident} +restore-test from nas: 2 tables, 2002 rows \(exact\), \d+ objects compared, "
                     rf"RTO [\d.]+s on 127.0.0.1:{pg.port}; scratch database dropped", result.stdout, re.M)
    assert scratch_databases(pg) == []


def test_a_failed_restore_test_still_drops_the_scratch_database(cli: Cli, env: dict[str, str], pg: PgServer) -> None:
    """A table owned by a role that no longer exists: the archive is intact, but it cannot be restored here."""
    db = env["POSTGRES_DB"]
    role = f"gone_{db}"
    pg.psql(db, f"CREATE ROLE {role}; ALTER TABLE notes OWNER TO {role};")
    ident = backup(cli, env)
    pg.psql(db, f"DROP OWNED BY {role}; DROP ROLE {role};")
    result = cli.run("verify", "--restore-test", env=env)
    assert result.returncode == 1
    assert re.search(rf"^ok +{ident} +nas ", result.stdout, re.M)
    line = next(x for x in result.stdout.splitlines() if "restore-test" in x)
    assert line.startswith("FAILED") and f'role "{role}" does not exist' in line and "scratch database dropped" in line
    assert scratch_databases(pg) == []


def test_verify_all_checks_every_ok_backup(cli: Cli, env: dict[str, str], nas: Path, s3: S3Server,
                                          bucket: str) -> None:
    older, newer = backup(cli, env), backup(cli, env)
    artifact = manifest_of(nas, older).artifact
    s3.client.put_object(bucket, artifact, io.BytesIO(b"x" * manifest_of(nas, older).size_bytes),
                         manifest_of(nas, older).size_bytes)
    assert cli.run("verify", env=env).returncode == 0  # latest is intact
    result = cli.run("verify", "--all", env=env)
    assert result.returncode == 1
    assert [line.split()[:3] for line in result.stdout.splitlines()[:-1]] == [
        ["ok", newer, "nas"], ["ok", newer, "s3"], ["ok", older, "nas"], ["FAILED", older, "s3"]]


def test_verify_with_no_backup_fails_and_says_so(cli: Cli, env: dict[str, str]) -> None:
    result = cli.run("verify", env=env)
    assert result.returncode == 1
    assert "no ok backup" in result.stdout and "hint:" in result.stdout


def test_a_drill_as_a_role_that_is_no_superuser_says_it_left_owners_and_grants_out(
        cli: Cli, env: dict[str, str], pg: PgServer) -> None:
    db = env["POSTGRES_DB"]
    role = f"plain_{db}"
    pg.psql("postgres", f"CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{CANARY}' IN ROLE pg_read_all_data")
    pg.psql(db, f"CREATE ROLE owner_{db}; ALTER TABLE notes OWNER TO owner_{db}; GRANT SELECT ON items TO {role}")
    as_role = {**env, "POSTGRES_USER": role}
    ident = backup(cli, as_role)
    result = cli.run("verify", "--restore-test", env=as_role)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(x for x in result.stdout.splitlines() if "restore-test" in x)
    assert line.startswith(f"ok      {ident}") and "2 tables, 2002 rows (exact)" in line, line
    assert f"owners and grants left out ({role} is not a superuser on the drill server" in line
    assert scratch_databases(pg) == []


def test_a_scratch_database_with_a_session_the_role_cannot_end_is_still_dropped(
        env: dict[str, str], pg: PgServer) -> None:
    """DROP ... WITH (FORCE) refuses to end another role's session (on PostgreSQL 15 also an autovacuum worker
    on a freshly restored scratch database, which failed a drill in CI); the plain DROP that follows waits for it."""
    import threading
    import time

    import psycopg

    from app.dbadmin import drop_database
    from app.errors import SidecarError

    role = f"plain_{uuid.uuid4().hex[:8]}"
    pg.psql("postgres", f"CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{CANARY}'")
    db = load_settings({**env, "POSTGRES_USER": role}).db
    scratch = f"{SCRATCH_PREFIX}{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host=pg.host, port=pg.port, user=role, password=CANARY, dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{scratch}"')
    other = pg.connect(scratch)  # a superuser's session: WITH (FORCE) as the role cannot end it
    threading.Thread(target=lambda: (time.sleep(1.5), other.close()), daemon=True).start()
    drop_database(db, scratch)  # the plain DROP waits the second and a half
    assert scratch not in scratch_databases(pg)
    staying = f"{SCRATCH_PREFIX}{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host=pg.host, port=pg.port, user=role, password=CANARY, dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{staying}"')
    with pg.connect(staying), pytest.raises(SidecarError, match="is being accessed by other users") as failed:
        drop_database(db, staying)
    assert "drop it by hand" in str(failed.value)
    pg.drop_db(staying)
