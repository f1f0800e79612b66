"""Every backup comes back: realistic databases backed up by the least-privileged backup role, restored by
`restore`, drilled by `verify --restore-test` on a drill cluster, and recovered whole by `restore-cluster`
into an empty cluster -- each compared with the source: content, schema, owners, grants, large objects,
database properties, roles and memberships."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CANARY, Cli, PgServer, S3Server, require_tool, start_cluster
from realistic import WIDE_TABLES, build_world, fingerprint, memberships, roles, sort_order

from app.layout import manifest_key_for_id
from app.manifest import Manifest


@dataclass
class World:
    source: PgServer
    nas: Path
    env: dict[str, str]  # the backup role's settings
    ids: dict[str, str]  # database -> backup id
    prints: dict[str, object]


def _server(password: str) -> tuple[PgServer, object]:
    c = start_cluster(password)
    return PgServer(c.host, c.port, c.user, password), c


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The realistic cluster, backed up once (POSTGRES_DB=* and the globals) by backup_user."""
    source, cluster = _server(CANARY)
    names = build_world(source)
    nas = tmp_path_factory.mktemp("nas")
    env = {**source.env(POSTGRES_DB="*", POSTGRES_USER="backup_user"), "NAS_PATH": str(nas),
           "BACKUP_GLOBALS": "true", "PRUNE_AFTER_BACKUP": "false", "BACKUP_CONCURRENCY": "2"}
    result = Cli(tmp_path_factory.mktemp("cli")).run("backup", env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    ids = {line.split()[0].rsplit("-", 1)[0]: line.split()[0] for line in result.stdout.splitlines()}
    assert set(names) | {"_globals", "postgres"} <= set(ids), ids
    prints = {name: fingerprint(source, name) for name in ("shop", "legacy", "sorted_de")}
    yield World(source, nas, env, ids, prints)
    cluster.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def drill_server() -> Iterator[PgServer]:
    server, cluster = _server("drill-" + CANARY)
    yield server
    cluster.stop()  # type: ignore[attr-defined]


def superuser_env(world: World, **extra: str) -> dict[str, str]:
    return {**world.env, "POSTGRES_USER": "postgres", **extra}


def manifest(world: World, db: str) -> dict:
    return json.loads((world.nas / manifest_key_for_id(world.ids[db])).read_text())


def test_the_manifest_records_contents_and_database_properties(world: World) -> None:
    shop = manifest(world, "shop")
    assert shop["contents"]["rows_exact"] is True
    assert shop["contents"]["rows"]["sales.customers"] == 3000
    assert shop["contents"]["rows"]["sales.secrets"] == 500  # all of them: BYPASSRLS, not the policy's view
    assert shop["contents"]["rows"]["sales.orders_2025"] + shop["contents"]["rows"]["sales.orders_2026"] == 20000
    objects = shop["contents"]["objects"]
    assert (objects["large_objects"], objects["partitioned_tables"], objects["materialized_views"]) == (2, 1, 1)
    props = shop["database_properties"]
    assert props["owner"] == "app_owner" and props["comment"].startswith("the shop")
    assert {"grantee": "app_reader", "privilege": "CONNECT", "grantable": False} in props["acl"]
    assert not any(g["grantee"] == "PUBLIC" for g in props["acl"])
    legacy = manifest(world, "legacy")["database_properties"]
    assert (legacy["encoding"], legacy["collate"]) == ("LATIN1", "C")
    icu = manifest(world, "sorted_de")["database_properties"]
    assert (icu["locale_provider"], icu["icu_locale"]) == ("icu", "de-DE")
    assert manifest(world, "shop")["warnings"] == []


@pytest.mark.parametrize("db", ["shop", "legacy", "sorted_de"])
def test_restore_create_brings_the_database_back_with_its_properties(world: World, cli: Cli, db: str) -> None:
    """Issue 10 #2: encoding, ICU locale, owner, comment, settings and ACL came back under the new name."""
    copy = f"{db}_copy"
    result = cli.run("restore", "latest", "--db", db, "--to-db", copy, "--create", "--yes",
                     env=superuser_env(world))
    assert result.returncode == 0, result.stderr
    assert "left out" not in result.stdout
    want, got = world.prints[db], fingerprint(world.source, copy)
    assert got.tables == want.tables and got.schema == want.schema and got.lobs == want.lobs  # type: ignore[attr-defined]
    assert got.matviews == want.matviews  # type: ignore[attr-defined]
    assert got.props == want.props  # type: ignore[attr-defined]
    if db == "sorted_de":
        assert sort_order(world.source, copy) == sort_order(world.source, db)
        assert sort_order(world.source, copy) == "Ähre,apfel,Apfel,Äpfel,ober,Öl,zahl,Zebra"  # C: Apfel,Zebra,...
    if db == "shop":  # the ACL: PUBLIC may not connect to the copy either
        assert world.source.psql(copy, "SELECT has_database_privilege('public', current_database(), 'CONNECT')") \
            == "f"
    world.source.drop_db(copy)


def test_restore_as_a_role_that_owns_nothing_fails_with_pg_restores_own_words_and_no_owner_works(
        world: World, cli: Cli) -> None:
    """Issue 10 #1: the error keeps PostgreSQL's line and `Command was:`, the hint is right; --no-owner/--no-acl
    restore as that role and say what they left out."""
    world.source.psql("postgres", f"DROP ROLE IF EXISTS restorer; CREATE ROLE restorer LOGIN CREATEDB "
                                  f"PASSWORD '{CANARY}'")
    env = {**world.env, "POSTGRES_USER": "restorer"}
    world.source.psql("postgres", "CREATE DATABASE shop_mine OWNER restorer")
    refused = cli.run("restore", "latest", "--db", "shop", "--to-db", "shop_mine", "--yes", env=env)
    assert refused.returncode == 1
    line = refused.stderr.strip().splitlines()[-1]
    assert re.search(r'must be (?:member|able to SET ROLE) of role "?app_owner', line), line
    assert "Command was: ALTER " in line and "OWNER TO app_owner" in line, line
    assert "--no-owner" in line and "missing roles or extensions" not in line
    assert "the transaction was rolled back and the database is as it was" in line
    assert world.source.psql("shop_mine", "SELECT count(*) FROM pg_tables WHERE schemaname = 'sales'") == "0"

    created = cli.run("restore", "latest", "--db", "shop", "--to-db", "shop_owned", "--create", "--yes", env=env)
    assert created.returncode == 1
    assert 'cannot give database shop_owned its owner app_owner: must be member of role "app_owner"' \
        in created.stderr and "--no-owner/--no-acl" in created.stderr, created.stderr
    assert world.source.psql("postgres", "SELECT count(*) FROM pg_database WHERE datname = 'shop_owned'") == "0"

    result = cli.run("restore", "latest", "--db", "shop", "--to-db", "shop_plain_copy", "--create", "--no-owner",
                     "--no-acl", "--yes", env=env)
    assert result.returncode == 0, result.stderr
    assert "left out: object owners (--no-owner: everything belongs to restorer)" in result.stdout
    assert "left out: grants and revokes on objects (--no-acl)" in result.stdout
    assert "left out: database ACL" in result.stdout and "left out: owner app_owner" in result.stdout
    got = fingerprint(world.source, "shop_plain_copy")
    assert got.tables == world.prints["shop"].tables  # type: ignore[attr-defined]
    assert world.source.psql("shop_plain_copy", "SELECT DISTINCT tableowner FROM pg_tables "
                                                "WHERE schemaname = 'sales'") == "restorer"
    untrusted = cli.run("restore", "latest", "--db", "ext_app", "--to-db", "ext_mine", "--create", "--no-owner",
                        "--yes", env=env)
    assert untrusted.returncode == 1
    line = untrusted.stderr.strip().splitlines()[-1]
    assert 'permission denied to create extension "postgres_fdw"' in line and "Command was: CREATE EXTENSION" in line
    assert "this extension needs a superuser" in line and "the database created for it was dropped" in line, line
    for name in ("shop_mine", "shop_plain_copy"):
        world.source.drop_db(name)
    world.source.psql("postgres", "DROP ROLE restorer")  # the cluster's roles are what the backup holds again


def test_verify_restore_test_drills_every_database_on_the_drill_server(world: World, cli: Cli,
                                                                        drill_server: PgServer) -> None:
    """As the backup role, with the drill server a separate cluster: globals first so owners exist, then each
    database restored, compared with the manifest's contents, recorded, and the scratch database dropped."""
    drill_url = f"postgresql://postgres:{drill_server.password}@{drill_server.host}:{drill_server.port}/postgres"
    env = {**world.env, "DRILL_DATABASE_URL": drill_url}
    result = cli.run("verify", "--restore-test", env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for db in ("shop", "legacy", "sorted_de", "ext_app", "wide"):
        line = next(x for x in result.stdout.splitlines() if world.ids[db] in x and "restore-test" in x)
        assert line.startswith("ok"), line
        assert "(exact)" in line and f"on 127.0.0.1:{drill_server.port}" in line and "DIFFERS" not in line, line
    assert f"{WIDE_TABLES} tables" in next(x for x in result.stdout.splitlines()
                                          if world.ids["wide"] in x and "restore-test" in x)
    assert drill_server.psql("postgres", "SELECT count(*) FROM pg_database WHERE datname LIKE 'backup_sidecar%'") \
        == "0"
    assert drill_server.psql("postgres", "SELECT pg_has_role('app_reader', 'readers', 'member')") == "t"
    assert CANARY not in result.stdout + result.stderr and drill_server.password not in result.stdout
    listed = cli.run("list", "--db", "shop", env=env)
    assert re.search(rf"^{world.ids['shop']} .* ok [\d.]+s", listed.stdout, re.M), listed.stdout
    doc = json.loads(cli.run("list", "--json", "--db", "shop", env=env).stdout)
    drill = doc["backups"][0]["last_drill"]
    assert drill["status"] == "ok" and drill["rto_s"] > 0 and "3000" not in drill["server"]


def test_a_drill_notices_what_did_not_come_back(world: World, cli: Cli, drill_server: PgServer,
                                                tmp_path: Path) -> None:
    """The archive is fine but the manifest says more rows were dumped: the drill fails and /health would go
    CRITICAL (the record says failed)."""
    nas = tmp_path / "nas"
    src = world.nas / manifest_key_for_id(world.ids["legacy"])
    m = Manifest.from_json(src.read_bytes())
    for path in (src.parent / Path(m.artifact).name, src):
        dest = nas / path.relative_to(world.nas)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())
    m.contents["rows"]["public.kunden"] = 4  # type: ignore[index]
    (nas / manifest_key_for_id(m.id)).write_bytes(m.to_json())
    drill_url = f"postgresql://postgres:{drill_server.password}@{drill_server.host}:{drill_server.port}/postgres"
    result = cli.run("verify", m.id, "--restore-test", env={**world.env, "NAS_PATH": str(nas),
                                                             "DRILL_DATABASE_URL": drill_url})
    assert result.returncode == 1
    line = next(x for x in result.stdout.splitlines() if "restore-test" in x)
    assert line.startswith("FAILED") and "public.kunden: 4 rows dumped, 3 restored" in line, line
    [record] = list(nas.rglob("*.drill-*.json"))
    assert json.loads(record.read_text())["status"] == "failed"


def test_one_transaction_out_of_lock_slots_keeps_postgresqls_hint(world: World, cli: Cli, tmp_path: Path) -> None:
    """Issue 10 #5: an archive without recorded contents (an older backup) restored in one transaction: the
    server's HINT reaches the operator, and the database created for it is dropped."""
    nas = tmp_path / "nas"
    src = world.nas / manifest_key_for_id(world.ids["wide"])
    m = Manifest.from_json(src.read_bytes())
    for path in (src.parent / Path(m.artifact).name,):
        dest = nas / path.relative_to(world.nas)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())
    m.contents = None
    (nas / manifest_key_for_id(m.id)).write_bytes(m.to_json())
    result = cli.run("restore", m.id, "--to-db", "wide_one_txn", "--create", "--yes",
                     env=superuser_env(world, NAS_PATH=str(nas)))
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "out of shared memory" in line and "PostgreSQL says: You might need to increase" in line, line
    assert "max_locks_per_transaction" in line and "the database created for it was dropped" in line
    assert world.source.psql("postgres", "SELECT count(*) FROM pg_database WHERE datname = 'wide_one_txn'") == "0"


def test_restore_cluster_recovers_everything_into_an_empty_cluster(world: World, cli: Cli) -> None:
    """Issue 10 #4: one command; the bootstrap superuser that already exists is fine; roles, memberships and
    every database with its properties come back; the 2,000-table database is staged, not one transaction."""
    target, cluster = _server("new-" + CANARY)
    try:
        env = {**target.env(), "NAS_PATH": str(world.nas), "BACKUP_CONCURRENCY": "2"}
        result = cli.run("restore-cluster", "--yes", env=env, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(rf"^ok +\(globals\) +{world.ids['_globals']} .*existing role", result.stdout, re.M)
        for db in ("shop", "legacy", "sorted_de", "ext_app", "wide", "postgres"):
            assert re.search(rf"^ok +{db} +{world.ids[db]} ", result.stdout, re.M), result.stdout
        assert re.search(r"^ok +wide .*staged in bs_staging_", result.stdout, re.M)
        assert result.stdout.strip().endswith(f"6 database(s) into 127.0.0.1:{target.port}: all ok")
        assert roles(target) == roles(world.source) and memberships(target) == memberships(world.source)
        for db in ("shop", "legacy", "sorted_de"):
            got, want = fingerprint(target, db), world.prints[db]
            assert got.tables == want.tables and got.schema == want.schema, db  # type: ignore[attr-defined]
            assert got.lobs == want.lobs and got.props == want.props, db  # type: ignore[attr-defined]
        assert target.psql("wide", "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == str(WIDE_TABLES)
        assert sort_order(target, "sorted_de") == sort_order(world.source, "sorted_de")
        again = cli.run("restore-cluster", "--yes", "--db", "legacy", env=env)
        assert again.returncode == 1 and "is not empty" in again.stdout and "--clean" in again.stdout
    finally:
        cluster.stop()  # type: ignore[attr-defined]


def test_an_encrypted_backup_by_backup_user_restores_owners_grants_and_properties(
        world: World, cli: Cli, tmp_path: Path) -> None:
    """Encryption as operators run it: the least-privileged backup role backs up a LATIN1 database owned by
    another role, its properties sealed in the manifest; restore --create with the identity brings back rows,
    schema with owners and grants, large objects and the database's properties."""
    keygen = require_tool("age-keygen", "age")
    key = tmp_path / "ops.key"
    subprocess.run([keygen, "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run([keygen, "-y", str(key)], check=True, capture_output=True, text=True).stdout.strip()
    nas = tmp_path / "nas-enc"
    nas.mkdir()
    env = {**world.env, "POSTGRES_DB": "legacy", "NAS_PATH": str(nas), "BACKUP_GLOBALS": "false",
           "BACKUP_ENCRYPT_RECIPIENTS": public}
    made = cli.run("backup", env=env, check=True)
    assert CANARY not in made.stdout + made.stderr
    [doc] = [json.loads(p.read_text()) for p in nas.rglob("*.manifest.json")]
    assert doc["sealed"] and doc["database_properties"] is None and "app_owner" not in json.dumps(doc)
    copy = "legacy_enc_copy"
    cli.run("restore", "latest", "--db", "legacy", "--to-db", copy, "--create", "--yes", check=True,
            env={**env, "POSTGRES_USER": "postgres", "AGE_IDENTITY_FILE": str(key)})
    want, got = world.prints["legacy"], fingerprint(world.source, copy)
    assert got.tables == want.tables and got.schema == want.schema and got.lobs == want.lobs  # type: ignore[attr-defined]
    assert got.props == want.props  # type: ignore[attr-defined]
    world.source.drop_db(copy)


def test_only_the_s3_copy_encrypted_by_backup_user_and_each_copy_restores_whole(
        world: World, cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    """BACKUP_ENCRYPT_TARGETS=s3 as operators run it: backup_user backs up shop (objects owned by app_owner,
    grants, row-level security, large objects, extensions, database properties) to a plain NAS copy and an
    encrypted S3 copy; each copy comes back whole on its own: the NAS one with no key, the S3 one with the
    identity."""
    keygen = require_tool("age-keygen", "age")
    key = tmp_path / "ops.key"
    subprocess.run([keygen, "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run([keygen, "-y", str(key)], check=True, capture_output=True, text=True).stdout.strip()
    nas = tmp_path / "nas-mixed"
    nas.mkdir()
    env = {**world.env, "POSTGRES_DB": "shop", "NAS_PATH": str(nas), "BACKUP_GLOBALS": "false", **s3.env(bucket),
           "BACKUP_ENCRYPT_RECIPIENTS": public, "BACKUP_ENCRYPT_TARGETS": "s3"}
    made = cli.run("backup", env=env, check=True)
    assert CANARY not in made.stdout + made.stderr
    [on_s3] = [json.loads(s3.client.get_object(bucket, k).read()) for k in s3.keys(bucket)
               if k.endswith(".manifest.json")]
    assert on_s3["sealed"] and "app_owner" not in json.dumps(on_s3) and "sales.customers" not in json.dumps(on_s3)
    want = world.prints["shop"]
    for source, extra in (("nas", {}), ("s3", {"AGE_IDENTITY_FILE": str(key)})):
        copy = f"shop_from_{source}"
        cli.run("restore", "latest", "--db", "shop", "--to-db", copy, "--create", "--from", source, "--yes",
                check=True, env={**env, "POSTGRES_USER": "postgres", **extra})
        got = fingerprint(world.source, copy)
        assert got.tables == want.tables and got.schema == want.schema and got.lobs == want.lobs  # type: ignore[attr-defined]
        assert got.matviews == want.matviews and got.props == want.props  # type: ignore[attr-defined]
        world.source.drop_db(copy)
