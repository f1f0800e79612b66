"""Beyond one database: several databases, POSTGRES_DB=*, bounded parallelism, and the cluster's globals."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CANARY, Cli, PgServer, start_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgServer]:
    """A cluster of this module's own, so `*` sees only the databases these tests create."""
    c = start_cluster(CANARY)
    yield PgServer(c.host, c.port, c.user, CANARY)
    c.stop()


def ok_manifests(nas: Path) -> dict[str, dict]:
    return {m["database"]: m for m in (json.loads(p.read_text()) for p in nas.rglob("*.manifest.json"))}


def make_db(pg: PgServer, name: str, rows: int = 1000) -> str:
    pg.drop_db(name)
    pg.create_db(name)
    pg.psql(name, f"CREATE TABLE items AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, {rows}) g")
    return name


def test_one_missing_database_does_not_stop_the_others(cli: Cli, cluster: PgServer, nas: Path) -> None:
    make_db(cluster, "shop")
    make_db(cluster, "blog")
    env = {**cluster.env(POSTGRES_DB="shop,gone_db,blog"), "NAS_PATH": str(nas)}
    result = cli.run("backup", env=env)
    assert result.returncode == 1
    manifests = ok_manifests(nas)
    assert manifests["shop"]["status"] == "ok" and manifests["blog"]["status"] == "ok"
    assert manifests["gone_db"]["status"] == "failed" and "does not exist" in manifests["gone_db"]["error"]
    assert "1 of 3 backup(s) failed" in result.stderr and "gone_db" in result.stderr


def test_star_backs_up_every_database_but_the_excluded(cli: Cli, cluster: PgServer, nas: Path) -> None:
    for name in ("shop", "blog", "scratch_1", "scratch_2"):
        make_db(cluster, name, rows=10)
    env = {**cluster.env(POSTGRES_DB="*", POSTGRES_DB_EXCLUDE="postgres,scratch_*,gone_db"), "NAS_PATH": str(nas)}
    cli.run("backup", env=env, check=True)
    assert sorted(ok_manifests(nas)) == ["blog", "shop"]


def test_concurrency_above_four_is_refused(cli: Cli, cluster: PgServer, nas: Path) -> None:
    result = cli.run("backup", env={**cluster.env(), "NAS_PATH": str(nas), "BACKUP_CONCURRENCY": "5"})
    assert result.returncode == 2 and "BACKUP_CONCURRENCY=5" in result.stderr and "overload" in result.stderr


def test_databases_are_dumped_in_parallel_with_backup_concurrency(cli: Cli, cluster: PgServer, nas: Path) -> None:
    make_db(cluster, "slow_one")
    make_db(cluster, "quick_one")
    blocker = cluster.connect("slow_one")
    blocker.autocommit = False
    blocker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")  # slow_one's dump waits for this lock
    env = {**cluster.env(POSTGRES_DB="slow_one,quick_one"), "NAS_PATH": str(nas), "BACKUP_CONCURRENCY": "2"}
    proc = cli.popen("backup", env=env)
    try:
        deadline = time.monotonic() + 60
        while "quick_one" not in ok_manifests(nas) and time.monotonic() < deadline:
            time.sleep(0.1)
        # quick_one finished while slow_one is still blocked: the two ran side by side
        assert ok_manifests(nas).get("quick_one", {}).get("status") == "ok"
        assert "slow_one" not in ok_manifests(nas)
    finally:
        blocker.rollback()
        blocker.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert ok_manifests(nas)["slow_one"]["status"] == "ok"


def _globals_sql(nas: Path) -> str:
    [artifact] = [p for p in nas.rglob("_globals-*.sql.zst")]
    return subprocess.run(["zstd", "-dc", str(artifact)], capture_output=True, text=True, check=True).stdout


def test_globals_round_trip_into_a_fresh_cluster(cli: Cli, cluster: PgServer, nas: Path) -> None:
    cluster.psql("postgres", """
        DROP ROLE IF EXISTS app_owner; DROP ROLE IF EXISTS readers;
        CREATE ROLE readers NOLOGIN;
        CREATE ROLE app_owner LOGIN PASSWORD 'role-secret-pw' CONNECTION LIMIT 7 IN ROLE readers;
        ALTER ROLE app_owner SET statement_timeout = '42s';""")
    make_db(cluster, "shop", rows=10)
    env = {**cluster.env(POSTGRES_DB="shop"), "NAS_PATH": str(nas), "BACKUP_GLOBALS": "true"}
    cli.run("backup", env=env, check=True)
    manifests = ok_manifests(nas)
    assert manifests["_globals"]["status"] == "ok" and manifests["_globals"]["kind"] == "globals"
    assert manifests["_globals"]["engine"] == "postgresql"
    sql = _globals_sql(nas)
    assert "CREATE ROLE app_owner" in sql and "role-secret-pw" not in sql and "SCRAM-SHA-256$" not in sql

    fresh_c = start_cluster("fresh-" + CANARY)
    fresh = PgServer(fresh_c.host, fresh_c.port, fresh_c.user, fresh_c.password)
    try:
        restore = subprocess.run(
            ["psql", "-X", "-q", "-h", fresh.host, "-p", str(fresh.port), "-U", fresh.user, "-d", "postgres"],
            input=sql, env={**os.environ, "PGPASSWORD": fresh.password}, capture_output=True, text=True)
        assert restore.returncode == 0, restore.stderr
        assert fresh.psql("postgres", "SELECT rolconnlimit, rolcanlogin FROM pg_roles "
                                      "WHERE rolname = 'app_owner'") == "7|t"
        assert fresh.psql("postgres", "SELECT pg_has_role('app_owner', 'readers', 'member')") == "t"
        assert "statement_timeout=42s" in fresh.psql("postgres", "SELECT setconfig FROM pg_db_role_setting "
                                                                 "JOIN pg_roles ON oid = setrole "
                                                                 "WHERE rolname = 'app_owner'")
        assert fresh.psql("postgres", "SELECT rolpassword IS NULL FROM pg_authid WHERE rolname = 'app_owner'") == "t"
    finally:
        fresh_c.stop()


def test_globals_keep_password_hashes_only_when_asked(cli: Cli, cluster: PgServer, nas: Path) -> None:
    cluster.psql("postgres", "DROP ROLE IF EXISTS hashed; CREATE ROLE hashed LOGIN PASSWORD 'hash-me-pw'")
    make_db(cluster, "shop", rows=10)
    env = {**cluster.env(POSTGRES_DB="shop"), "NAS_PATH": str(nas), "BACKUP_GLOBALS": "true",
           "BACKUP_GLOBALS_PASSWORDS": "true"}
    cli.run("backup", env=env, check=True)
    sql = _globals_sql(nas)
    assert "SCRAM-SHA-256$" in sql and "hash-me-pw" not in sql


def test_globals_without_superuser_rights_warn_and_leave_passwords_out(cli: Cli, cluster: PgServer,
                                                                       nas: Path) -> None:
    cluster.psql("postgres", "DROP ROLE IF EXISTS backup_user; "
                             f"CREATE ROLE backup_user LOGIN PASSWORD '{CANARY}' IN ROLE pg_read_all_data")
    make_db(cluster, "shop", rows=10)
    env = {**cluster.env(POSTGRES_DB="shop", POSTGRES_USER="backup_user"), "NAS_PATH": str(nas),
           "BACKUP_GLOBALS": "true", "BACKUP_GLOBALS_PASSWORDS": "true"}
    result = cli.run("backup", env=env, check=True)
    manifest = ok_manifests(nas)["_globals"]
    assert manifest["status"] == "ok"
    assert any("not a superuser" in w for w in manifest["warnings"]), manifest["warnings"]
    assert "not a superuser" in result.stderr
    assert "SCRAM-SHA-256$" not in _globals_sql(nas)


def test_star_applies_the_same_naming_rule_as_explicit_names(cli: Cli, cluster: PgServer, nas: Path) -> None:
    """Issue 10 #8: a name that cannot be listed, restored or pruned is never backed up "ok"; `_globals` never
    shares a retention group with the globals artifact. The others are backed up; the run exits 1."""
    odd = [".hidden", "a/b", "_globals"]
    for name in odd:
        make_db(cluster, name, rows=5)
    make_db(cluster, "shop", rows=5)
    try:
        env = {**cluster.env(POSTGRES_DB="*", POSTGRES_DB_EXCLUDE="postgres,blog,scratch_*,slow_one,quick_one"),
               "NAS_PATH": str(nas), "BACKUP_GLOBALS": "true"}
        result = cli.run("backup", env=env)
        assert result.returncode == 1
        assert "3 of 5 backup(s) failed" in result.stderr
        assert "database name '.hidden' cannot be used in a backup path" in result.stderr
        assert "database name 'a/b' cannot be used in a backup path" in result.stderr
        assert "a database named '_globals' would share its backups with the cluster's globals" in result.stderr
        assert sorted(p.name for p in nas.iterdir() if not p.name.startswith(".")) == ["_globals", "shop"]
        assert {m["kind"] for m in ok_manifests(nas).values()} == {"database", "globals"}
        assert ok_manifests(nas)["_globals"]["kind"] == "globals"
        explicit = cli.run("backup", env={**env, "POSTGRES_DB": ".hidden"})
        assert explicit.returncode == 2 and "database name '.hidden' cannot be used in a backup path" in explicit.stderr
    finally:
        for name in odd:
            cluster.drop_db(name)
