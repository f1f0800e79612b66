"""Version skew on the way back (issue 10 #9), and errors that keep what PostgreSQL said.

This machine has only PostgreSQL 15, so a shim stands in for the image's newer client: it reports version
17.6 and, like pg_restore 17 connected to a 15 server, fails on ``SET transaction_timeout = 0`` (with the
``Command was:`` line pg_restore prints); writing SQL (``--file=-``) it puts that SET first, as 17 does.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
import zstandard
from conftest import Cli, PgServer
from sample_data import table_checksums

from app.layout import manifest_key_for_id
from app.manifest import Manifest
from app.proc import Child, ChildFailed
from app.restore import leave_out_unknown_settings

SHIM = """#!/bin/sh
case "$*" in *--version*) echo "pg_restore (PostgreSQL) 17.6"; exit 0;; esac
for a in "$@"; do case "$a" in --dbname=*)
  cat >/dev/null
  printf '%s%s\n' 'pg_restore: error: could not execute query: ' \
    'ERROR:  unrecognized configuration parameter "transaction_timeout"' >&2
  echo 'Command was: SET transaction_timeout = 0;' >&2
  exit 1;; esac; done
case "$*" in *--file=-*) printf 'SET transaction_timeout = 0;\\n';; esac
exec /usr/lib/postgresql/15/bin/pg_restore "$@"
"""


@pytest.fixture
def shim(tmp_path: Path) -> str:
    bindir = tmp_path / "pg17"
    bindir.mkdir()
    (bindir / "pg_restore").write_text(SHIM)
    (bindir / "pg_restore").chmod(0o755)
    return str(bindir)


@pytest.fixture
def env(pg: PgServer, nas: Path) -> dict[str, str]:
    db = pg.create_db()
    pg.psql(db, "CREATE TABLE items (id int PRIMARY KEY, name text); "
                "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 500) g;")
    return {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "PRUNE_AFTER_BACKUP": "false"}


def backup(cli: Cli, env: dict[str, str]) -> str:
    return cli.run("backup", "--force", env=env, check=True).stdout.split()[0]


def test_the_shim_fails_like_pg_restore_17_against_postgresql_15(pg: PgServer, env: dict[str, str], cli: Cli,
                                                                 shim: str, nas: Path) -> None:
    """What the sidecar must avoid: the newer client, used as is, fails on the first SET."""
    ident = backup(cli, env)
    artifact = nas / Manifest.from_json((nas / manifest_key_for_id(ident)).read_bytes()).artifact
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(artifact.read_bytes())
    target = pg.create_db()
    run = subprocess.run([f"{shim}/pg_restore", f"--dbname={target}"], input=raw, capture_output=True)
    assert run.returncode == 1 and b'unrecognized configuration parameter "transaction_timeout"' in run.stderr


def test_a_newer_client_on_path_gives_way_to_the_installed_client_of_the_servers_major(
        pg: PgServer, env: dict[str, str], cli: Cli, shim: str) -> None:
    ident = backup(cli, env)
    target = f"skew_{ident[-8:].lower()}"
    result = cli.run("restore", ident, "--to-db", target, "--create", "--yes",
                     env={**env, "PATH": f"{shim}:{cli.base_env()['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert "pg_restore on PATH is newer than the server (PostgreSQL 15): using /usr/lib/postgresql/15/bin" \
        in result.stderr
    assert table_checksums(pg, target) == table_checksums(pg, env["POSTGRES_DB"])


def test_without_a_matching_client_unknown_settings_are_left_out(pg: PgServer, env: dict[str, str], cli: Cli,
                                                                 shim: str, nas: Path) -> None:
    """The archive says pg_dump 16 made it, so the installed 15 client is not a candidate: the restore goes
    through SQL, `SET transaction_timeout` is dropped, and it still lands in one transaction."""
    ident = backup(cli, env)
    path = nas / manifest_key_for_id(ident)
    m = Manifest.from_json(path.read_bytes())
    m.pg_dump_version = "16.4"
    path.write_bytes(m.to_json())
    target = f"skew_sql_{ident[-8:].lower()}"
    result = cli.run("restore", ident, "--to-db", target, "--create", "--yes",
                     env={**env, "PATH": f"{shim}:{cli.base_env()['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert "left out for this server: SET transaction_timeout = 0;" in result.stderr
    assert table_checksums(pg, target) == table_checksums(pg, env["POSTGRES_DB"])


def test_an_archive_newer_than_pg_restore_is_version_skew_not_damage(env: dict[str, str], cli: Cli,
                                                                     nas: Path) -> None:
    """`unsupported version (1.16) in file header`: a good backup that this client cannot read."""
    ident = backup(cli, env)
    path = nas / manifest_key_for_id(ident)
    m = Manifest.from_json(path.read_bytes())
    artifact = nas / m.artifact
    raw = bytearray(zstandard.ZstdDecompressor().decompressobj().decompress(artifact.read_bytes()))
    assert raw[:5] == b"PGDMP"
    raw[6] = 16  # the archive format's minor version, as pg_dump 18 writes it
    stored = zstandard.ZstdCompressor().compress(bytes(raw))
    artifact.write_bytes(stored)
    m.size_bytes, m.sha256, m.pg_dump_version = len(stored), hashlib.sha256(stored).hexdigest(), "18.1"
    path.write_bytes(m.to_json())
    os.setxattr(artifact, "user.backup_sidecar.sha256", m.sha256.encode())  # as the sidecar records it
    result = cli.run("verify", ident, env=env)
    assert result.returncode == 1
    line = next(x for x in result.stdout.splitlines() if x.startswith("FAILED"))
    assert "unsupported version (1.16) in file header" in line and "version skew, not damage" in line, line
    assert "pg_dump 18.1" in line and "bad when it was made" not in line


def test_verify_restore_test_on_a_sql_ascii_database(pg: PgServer, cli: Cli, nas: Path) -> None:
    """psycopg hands out bytes on SQL_ASCII: counting and comparing happen server-side."""
    db = f"ascii_{nas.parent.name[-6:].lower()}"
    pg.psql("postgres", f"CREATE DATABASE \"{db}\" ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    pg.psql(db, 'CREATE TABLE "größe" (id int, v text); '
                'INSERT INTO "größe" SELECT g, \'ü\' FROM generate_series(1, 7) g;'
                "CREATE TABLE orders (id int); INSERT INTO orders SELECT generate_series(1, 3);")
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas)}
    ident = backup(cli, env)
    result = cli.run("verify", "--restore-test", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"^ok +{ident} +restore-test from nas: 2 tables, 10 rows \(exact\)", result.stdout, re.M)
    copy = f"{db}_copy"
    cli.run("restore", ident, "--to-db", copy, "--create", "--yes", env=env, check=True)
    assert pg.psql("postgres", f"SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = '{copy}'") \
        == "SQL_ASCII"


def test_child_errors_keep_the_servers_hint_detail_and_command() -> None:
    script = ("echo 'pg_restore: error: could not execute query: ERROR:  out of shared memory' >&2; "
              "echo 'HINT:  You might need to increase max_locks_per_transaction.' >&2; "
              "echo 'Command was: CREATE TABLE public.t2000 (id integer);' >&2; exit 1")
    with pytest.raises(ChildFailed) as caught, Child(["sh", "-c", script], {"PATH": "/usr/bin:/bin"},
                                                     name="pg_restore", hint="ours") as child:
        child.finish()
    exc = caught.value
    assert exc.server.hint == "You might need to increase max_locks_per_transaction."
    assert exc.server.command == "CREATE TABLE public.t2000 (id integer);"
    assert str(exc) == ("pg_restore failed: pg_restore: error: could not execute query: ERROR:  out of shared memory; "
                        "Command was: CREATE TABLE public.t2000 (id integer); (hint: PostgreSQL says: You might need "
                        "to increase max_locks_per_transaction. ours)")


def test_only_session_settings_outside_copy_data_are_left_out() -> None:
    sql = (b"SET statement_timeout = 0;\nSET transaction_timeout = 0;\nCOPY public.t (v) FROM stdin;\n"
           b"SET transaction_timeout = 0;\n\\.\nSET transaction_timeout = 0;\nSELECT 1;\n")
    chunks = [sql[i:i + 7] for i in range(0, len(sql), 7)]  # lines split across chunks
    out = b"".join(leave_out_unknown_settings(iter(chunks), frozenset({"statement_timeout"})))
    assert out == (b"SET statement_timeout = 0;\nCOPY public.t (v) FROM stdin;\nSET transaction_timeout = 0;\n"
                   b"\\.\nSELECT 1;\n")


def test_a_plain_dump_by_pg_dump_17_restores_into_postgresql_15(pg: PgServer, env: dict[str, str], cli: Cli,
                                                                nas: Path) -> None:
    """pg_dump 17 writes `SET transaction_timeout = 0;` into plain SQL whatever the server's version (seen with
    the trixie image against PostgreSQL 15): psql would stop there; the sidecar leaves it out."""
    ident = backup(cli, {**env, "BACKUP_FORMAT": "plain"})
    path = nas / manifest_key_for_id(ident)
    m = Manifest.from_json(path.read_bytes())
    artifact = nas / m.artifact
    sql = zstandard.ZstdDecompressor().decompressobj().decompress(artifact.read_bytes())
    sql = sql.replace(b"SET statement_timeout = 0;\n", b"SET statement_timeout = 0;\nSET transaction_timeout = 0;\n", 1)
    stored = zstandard.ZstdCompressor().compress(sql)
    artifact.write_bytes(stored)
    m.size_bytes, m.sha256, m.pg_dump_version = len(stored), hashlib.sha256(stored).hexdigest(), "17.12"
    path.write_bytes(m.to_json())
    os.setxattr(artifact, "user.backup_sidecar.sha256", m.sha256.encode())  # as the sidecar records it
    target = f"plain17_{ident[-8:].lower()}"
    result = cli.run("restore", ident, "--to-db", target, "--create", "--yes", env=env)
    assert result.returncode == 0, result.stderr
    assert "left out for this server: SET transaction_timeout = 0;" in result.stderr
    assert table_checksums(pg, target) == table_checksums(pg, env["POSTGRES_DB"])
