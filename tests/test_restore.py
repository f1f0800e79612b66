"""restore end to end: real backups on a NAS directory and an S3 server, streamed into real databases."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest
from conftest import CANARY, Cli, PgServer, S3Server
from sample_data import build_sample, schema_dump, table_checksums

from app.layout import manifest_key_for_id
from app.locks import file_lock, readers_path
from app.manifest import Manifest
from app.restore import RestoreFailed, restore
from app.settings import load_settings
from app.targets.nas import NasTarget

SMALL_SQL = """
CREATE SCHEMA shop;
CREATE SEQUENCE shop.order_no START 500;
CREATE TABLE shop.items (id int PRIMARY KEY, name text NOT NULL, price numeric(10, 2), tags text[]);
CREATE TABLE shop.orders (no int PRIMARY KEY DEFAULT nextval('shop.order_no'), item int REFERENCES shop.items(id),
                          note text);
INSERT INTO shop.items SELECT g, 'item ' || g || ' ✓', g * 1.5, ARRAY['a''b', 'c,d'] FROM generate_series(1, 3000) g;
INSERT INTO shop.orders (item, note) SELECT 1 + g % 3000, E'line\\n' || g FROM generate_series(1, 1000) g;
CREATE FUNCTION shop.total() RETURNS numeric LANGUAGE sql AS $$ SELECT sum(price) FROM shop.items $$;
"""


def small_db(pg: PgServer) -> str:
    db = pg.create_db()
    pg.psql(db, SMALL_SQL)
    return db


def backup(cli: Cli, env: dict[str, str]) -> str:
    return cli.run("backup", "--force", env=env, check=True).stdout.split()[0]


def exists(pg: PgServer, db: str) -> bool:
    with pg.connect() as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone() is not None


def new_name() -> str:
    return f"restored_{os.urandom(4).hex()}"


@dataclass
class Sample:
    db: str
    backup_id: str
    env: dict[str, str]
    checksums: dict[str, str]
    schema: str


@pytest.fixture(scope="module")
def sample(pg: PgServer, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Sample:
    """The rich sample database (unicode, bytea, arrays, sequences, 300k rows), backed up once to both targets."""
    db = pg.create_db()
    build_sample(pg, db)
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(tmp_path_factory.mktemp("nas")), **s3.env(s3.make_bucket()),
           "PRUNE_AFTER_BACKUP": "false", "NAS_REQUIRE_MOUNT": "false"}  # a tmp dir, not a mounted volume
    ident = backup(Cli(tmp_path_factory.mktemp("cli")), env)
    return Sample(db, ident, env, table_checksums(pg, db), schema_dump(pg, db))


@pytest.fixture
def env(pg: PgServer, s3: S3Server, bucket: str, nas: Path) -> dict[str, str]:
    return {**pg.env(POSTGRES_DB=small_db(pg)), "NAS_PATH": str(nas), **s3.env(bucket), "PRUNE_AFTER_BACKUP": "false"}


@pytest.mark.parametrize("source", ["nas", "s3"])
def test_round_trip_from_each_target_gives_identical_content(pg: PgServer, cli: Cli, sample: Sample,
                                                             source: str) -> None:
    target = new_name()
    result = cli.run("restore", sample.backup_id, "--to-db", target, "--create", "--yes", "--from", source,
                     env=sample.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"restored {sample.backup_id} from {source} into {target} (created): 4 tables")
    assert f"restore {sample.backup_id}: " in result.stderr and "(100%)" in result.stderr  # progress on stderr
    assert CANARY not in result.stdout + result.stderr
    assert table_checksums(pg, target) == sample.checksums
    assert schema_dump(pg, target) == sample.schema
    pg.drop_db(target)


def test_plain_backup_round_trip_through_psql(pg: PgServer, cli: Cli, env: dict[str, str]) -> None:
    ident = backup(cli, {**env, "BACKUP_FORMAT": "plain", "BACKUP_COMPRESSION": "gzip"})
    target = new_name()
    result = cli.run("restore", "latest", "--to-db", target, "--create", "--yes", "--from", "s3", env=env)
    assert result.returncode == 0, result.stderr
    assert f"restored {ident} from s3" in result.stdout
    assert table_checksums(pg, target) == table_checksums(pg, env["POSTGRES_DB"])


def test_a_database_with_tables_is_refused_without_clean(pg: PgServer, cli: Cli, env: dict[str, str]) -> None:
    backup(cli, env)
    target = pg.create_db()
    pg.psql(target, "CREATE TABLE precious (id int); INSERT INTO precious VALUES (42);")
    result = cli.run("restore", "latest", "--to-db", target, "--yes", env=env)
    assert result.returncode == 1
    assert f"{target} is not empty (1 tables)" in result.stderr and "--clean" in result.stderr
    assert pg.psql(target, "SELECT id FROM precious") == "42"


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_clean_replaces_existing_objects(pg: PgServer, cli: Cli, env: dict[str, str], fmt: str) -> None:
    backup(cli, {**env, "BACKUP_FORMAT": fmt})
    target = pg.create_db()
    pg.psql(target, "CREATE SCHEMA shop; CREATE TABLE shop.items (id int, junk text); "
                    "INSERT INTO shop.items VALUES (1, 'stale'); CREATE SEQUENCE shop.order_no;")
    result = cli.run("restore", "latest", "--to-db", target, "--clean", "--yes", env=env)
    assert result.returncode == 0, result.stderr
    assert table_checksums(pg, target) == table_checksums(pg, env["POSTGRES_DB"])


def test_a_missing_database_needs_create(pg: PgServer, cli: Cli, env: dict[str, str]) -> None:
    backup(cli, env)
    target = new_name()
    result = cli.run("restore", "latest", "--to-db", target, "--yes", env=env)
    assert result.returncode == 1
    assert f"database {target} does not exist" in result.stderr and "--create" in result.stderr
    assert not exists(pg, target)


def test_without_yes_and_without_a_terminal_it_refuses(pg: PgServer, cli: Cli, env: dict[str, str]) -> None:
    backup(cli, env)
    target = new_name()
    result = subprocess.run([sys.executable, "-m", "app", "restore", "latest", "--to-db", target, "--create"],
                            env={**cli.base_env(), **env}, cwd=cli.cwd, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "stdin is not a terminal (hint: add --yes)" in result.stderr
    assert not exists(pg, target)


@pytest.mark.parametrize(("answer", "restored"), [("no", False), ("yes", True)])
def test_on_a_terminal_it_asks_and_goes_ahead_only_on_yes(pg: PgServer, cli: Cli, env: dict[str, str],
                                                          answer: str, restored: bool) -> None:
    ident = backup(cli, env)
    target = new_name()
    leader, follower = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "app", "restore", "latest", "--to-db", target, "--create"],
                                env={**cli.base_env(), **env}, cwd=cli.cwd, stdin=follower,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(leader, f"{answer}\n".encode())
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(leader)
        os.close(follower)
    assert f"Restore {ident} (" in err and "Type yes to go ahead" in err
    assert (proc.returncode == 0) is restored, err
    assert exists(pg, target) is restored
    if not restored:
        assert "not confirmed" in err


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_artifact_leaves_the_database_as_it_was(pg: PgServer, cli: Cli, env: dict[str, str],
                                                          nas: Path) -> None:
    ident = backup(cli, env)
    _flip_middle_byte(nas / Manifest.from_json((nas / manifest_key_for_id(ident)).read_bytes()).artifact)
    target = pg.create_db()
    pg.psql(target, "CREATE SCHEMA shop; CREATE TABLE shop.items (id int); INSERT INTO shop.items VALUES (7);")
    result = cli.run("restore", ident, "--to-db", target, "--clean", "--yes", "--from", "nas", env=env)
    assert result.returncode == 1
    assert "rolled back and the database is as it was" in result.stderr
    assert pg.psql(target, "SELECT id FROM shop.items") == "7"  # --clean's DROP was rolled back too


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_a_checksum_mismatch_seen_only_at_the_end_never_commits(pg: PgServer, cli: Cli, env: dict[str, str],
                                                                nas: Path, fmt: str) -> None:
    """The artifact decompresses and restores fine; only the SHA-256 differs: the CLI fails loudly, an existing
    database keeps its content (--clean's drops included), a database created for the restore is dropped."""
    ident = backup(cli, {**env, "BACKUP_FORMAT": fmt})
    path = nas / manifest_key_for_id(ident)
    m = Manifest.from_json(path.read_bytes())
    m.sha256 = "0" * 64
    path.write_bytes(m.to_json())
    os.removexattr(nas / m.artifact, "user.backup_sidecar.sha256")  # as without xattrs: seen only when read
    target = pg.create_db()
    pg.psql(target, "CREATE SCHEMA shop; CREATE TABLE shop.items (id int); INSERT INTO shop.items VALUES (7);")
    result = cli.run("restore", ident, "--to-db", target, "--clean", "--yes", "--from", "nas", env=env)
    assert result.returncode == 1
    state = "is as it was" if fmt == "custom" else f"{target} was not touched; the staging database"
    assert "SHA-256 mismatch" in result.stderr and state in result.stderr
    assert pg.psql(target, "SELECT string_agg(tablename, ',') FROM pg_tables WHERE schemaname = 'shop'") == "items"
    assert pg.psql(target, "SELECT id FROM shop.items") == "7"

    created = new_name()
    result = cli.run("restore", ident, "--to-db", created, "--create", "--yes", "--from", "nas", env=env)
    assert result.returncode == 1
    state = "the database created for it was dropped" if fmt == "custom" else f"{created} was not created"
    assert state in result.stderr
    assert not exists(pg, created)


class SlowEndNas(NasTarget):
    """A NAS whose reads pause before reporting the end of a file: time enough for a consumer that already
    had every byte to commit, as a slow network would give it."""

    def open(self, key: str) -> BinaryIO:
        inner = super().open(key)

        class Reader(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
                data = inner.read(len(buffer))
                if not data:
                    time.sleep(1.5)
                buffer[: len(data)] = data
                return len(data)

            def close(self) -> None:
                inner.close()
                super().close()

        return io.BufferedReader(Reader())  # type: ignore[return-value]


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_the_archive_tail_is_held_back_until_the_checksum_matched(pg: PgServer, cli: Cli, env: dict[str, str],
                                                                  nas: Path, fmt: str) -> None:
    ident = backup(cli, {**env, "BACKUP_FORMAT": fmt})
    path = nas / manifest_key_for_id(ident)
    m = Manifest.from_json(path.read_bytes())
    m.sha256 = "f" * 64
    path.write_bytes(m.to_json())
    os.removexattr(nas / m.artifact, "user.backup_sidecar.sha256")  # as without xattrs: seen only when read
    target = pg.create_db()
    settings = load_settings({**env, "LOCK_FILE": str(cli.cwd / "lock")})
    with pytest.raises(RestoreFailed, match="SHA-256 mismatch"):
        restore(settings, [SlowEndNas(nas)], ident, target, yes=True, progress=False)
    assert pg.psql(target, "SELECT count(*) FROM pg_tables WHERE schemaname = 'shop'") == "0"


def test_a_truncated_copy_on_one_target_is_restored_from_the_other(pg: PgServer, cli: Cli, env: dict[str, str],
                                                                   nas: Path) -> None:
    ident = backup(cli, env)
    artifact = nas / Manifest.from_json((nas / manifest_key_for_id(ident)).read_bytes()).artifact
    artifact.write_bytes(artifact.read_bytes()[:-100])
    refused = cli.run("restore", ident, "--to-db", new_name(), "--create", "--yes", "--from", "nas", env=env)
    assert refused.returncode == 1
    assert f"backup {ident} has no intact copy on nas, only on s3 (hint: drop --from" in refused.stderr
    target = new_name()
    result = cli.run("restore", ident, "--to-db", target, "--create", "--yes", env=env)
    assert result.returncode == 0, result.stderr
    assert f"from s3 into {target}" in result.stdout
    assert table_checksums(pg, target) == table_checksums(pg, env["POSTGRES_DB"])


def test_restore_fails_while_a_prune_holds_the_lock(pg: PgServer, cli: Cli, env: dict[str, str]) -> None:
    backup(cli, env)
    lock = cli.cwd / "held.lock"
    target = new_name()
    with file_lock(lock, "prune", "other-host"), file_lock(readers_path(lock), "prune", "other-host"):
        result = cli.run("restore", "latest", "--to-db", target, "--create", "--yes",
                         env={**env, "LOCK_FILE": str(lock)})
    assert result.returncode == 1
    assert "cannot restore now: other-host" in result.stderr
    assert not exists(pg, target)


def test_unknown_or_failed_backups_are_refused_with_a_hint(cli: Cli, env: dict[str, str]) -> None:
    backup(cli, env)
    db = env["POSTGRES_DB"]
    unknown = cli.run("restore", f"{db}-20200101T000000Z", "--to-db", "x", "--yes", env=env)
    assert unknown.returncode == 1 and "no backup" in unknown.stderr and "hint:" in unknown.stderr
    failed_env = {**env, "POSTGRES_DB": "no_such_database"}
    assert cli.run("backup", env=failed_env).returncode == 1
    failed = cli.run("restore", "latest", "--db", "no_such_database", "--to-db", "x", "--yes", env=failed_env)
    assert failed.returncode == 1 and "no ok backup of no_such_database" in failed.stderr
    # a malformed ID is a usage error (exit 2, as SPEC says), in restore, fetch and verify alike
    for args in (("restore", "not-an-id", "--to-db", "x", "--yes"), ("fetch", "not-an-id"),
                 ("verify", "not-an-id"), ("verify", f"{db}-20200101T000000Z", "--all")):
        wrong = cli.run(*args, env=env)
        assert wrong.returncode == 2 and "hint:" in wrong.stderr, (args, wrong.stderr)


LOBS_SQL = """
CREATE TABLE docs (id int PRIMARY KEY, title text, body oid);
INSERT INTO docs SELECT g, 'doc ' || g, lo_from_bytea(0, convert_to(repeat('page ' || g, 200), 'UTF8'))
FROM generate_series(1, 40) g;
CREATE TABLE big AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, {rows}) g;
CREATE INDEX big_v ON big (v);
"""


def live_state(pg: PgServer, db: str) -> tuple[dict[str, str], list[tuple]]:
    with pg.connect(db) as conn:
        lobs = conn.execute("SELECT oid, md5(lo_get(oid)) FROM pg_largeobject_metadata ORDER BY 1").fetchall()
    return table_checksums(pg, db), lobs


def staging_databases(pg: PgServer, db: str) -> list[str]:
    """Staging databases of restores into ``db`` (other tests on the shared server may leave their own)."""
    with pg.connect() as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, 'bs_staging_') "
                                           "AND right(datname, %s) = %s", (len(db) + 1, f"_{db}"))]


def test_plain_restore_with_large_objects_failing_midway_leaves_the_live_database_untouched(
        pg: PgServer, cli: Cli, env: dict[str, str]) -> None:
    """Issue 10 #3: pg_dump's own BEGIN/COMMIT around large-object data would commit an outer transaction; a
    grant to a role that is gone fails after that point. The live database keeps every row and object."""
    db = env["POSTGRES_DB"]
    grantee = f"gone_{db}"
    pg.psql(db, LOBS_SQL.format(rows=1000) + f"CREATE ROLE {grantee}; GRANT SELECT ON big TO {grantee};")
    backup(cli, {**env, "BACKUP_FORMAT": "plain"})
    pg.psql(db, f"REVOKE ALL ON big FROM {grantee}; DROP ROLE {grantee}; INSERT INTO docs VALUES (999, 'live', NULL)")
    before = live_state(pg, db)
    result = cli.run("restore", "latest", "--to-db", db, "--clean", "--yes", "--from", "nas", env=env)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert f'role "{grantee}" does not exist' in line and f"{db} was not touched" in line, line
    assert re.search(r"the staging database bs_staging_\w+ was dropped", line), line
    assert live_state(pg, db) == before
    assert staging_databases(pg, db) == []


def test_plain_restore_killed_with_sigkill_midway_leaves_the_live_database_untouched(
        pg: PgServer, cli: Cli, env: dict[str, str]) -> None:
    db = env["POSTGRES_DB"]
    pg.psql(db, LOBS_SQL.format(rows=400000))
    backup(cli, {**env, "BACKUP_FORMAT": "plain"})
    pg.psql(db, "INSERT INTO docs VALUES (999, 'live', NULL)")
    before = live_state(pg, db)
    proc = cli.popen("restore", "latest", "--to-db", db, "--clean", "--yes", "--from", "nas", env=env)
    deadline = time.monotonic() + 60
    busy = "0"
    while time.monotonic() < deadline and busy == "0":
        busy = pg.psql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname LIKE 'bs\\_staging\\_%' "
                                   f"AND datname LIKE '%{db}' AND state = 'active'")
        time.sleep(0.05)
    assert busy != "0", "the staged restore never started"
    time.sleep(0.3)
    proc.kill()  # SIGKILL: no cleanup of any kind runs in the sidecar
    proc.wait(30)
    while time.monotonic() < deadline and pg.psql(
            "postgres", f"SELECT count(*) FROM pg_stat_activity WHERE datname LIKE 'bs\\_staging\\_%{db}'") != "0":
        time.sleep(0.1)  # psql, orphaned, reads to the end of what it was given and exits
    assert live_state(pg, db) == before
    [left] = staging_databases(pg, db)
    again = cli.run("restore", "latest", "--to-db", db, "--yes", env=env)  # refused: not empty, no --clean
    assert again.returncode == 1 and f"{left} is left over from an interrupted restore" in again.stderr
    pg.drop_db(left)


def test_restore_latest_refuses_when_a_target_cannot_be_listed(pg: PgServer, cli: Cli, env: dict[str, str],
                                                               s3: S3Server) -> None:
    """Issue 10 #7: an unreadable target may hold a newer backup; only --from may settle for the other one."""
    ident = backup(cli, env)
    broken = {**env, "S3_BUCKET": "no-such-bucket-" + os.urandom(3).hex()}
    target = new_name()
    refused = cli.run("restore", "latest", "--to-db", target, "--create", "--yes", env=broken)
    assert refused.returncode == 1
    assert "cannot tell which backup is the latest: s3" in refused.stderr and "--from nas" in refused.stderr
    assert not exists(pg, target)
    result = cli.run("restore", "latest", "--to-db", target, "--create", "--yes", "--from", "nas", env=broken)
    assert result.returncode == 0, result.stderr
    assert f"restored {ident} from nas" in result.stdout
