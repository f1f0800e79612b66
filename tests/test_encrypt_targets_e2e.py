"""Encrypting only the off-site copy (BACKUP_ENCRYPT_TARGETS=s3) end to end: the real CLI, real PostgreSQL, the
suite's S3 server and a directory.

The NAS copy is plain (restorable without any key, its manifest in the clear); the S3 copy holds ciphertext and
a sealed manifest that names no table; each copy is checked against its own manifest; sync encrypts a plain copy
on its way to S3 and never decrypts one on its way to the NAS.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import zstandard
from conftest import SECRET_ROW, Cli, PgServer, S3Server
from tcp_proxy import TcpProxy
from test_encryption_e2e import db_comment, keypair, manifests, rows

from app.encryption import fingerprint


def s3_manifests(s3: S3Server, bucket: str) -> list[dict]:
    return [json.loads(s3.client.get_object(bucket, k).read()) for k in s3.keys(bucket)
            if k.endswith(".manifest.json")]


def test_only_the_s3_copy_is_encrypted_and_each_copy_restores_on_its_own(
        cli: Cli, pg: PgServer, secret_db: str, s3: S3Server, bucket: str, nas: Path, tmp_path: Path) -> None:
    key, public = keypair(tmp_path, "ops")
    env = {**pg.env(POSTGRES_DB=secret_db), "NAS_PATH": str(nas), **s3.env(bucket),
           "BACKUP_ENCRYPT_RECIPIENTS": public, "BACKUP_ENCRYPT_TARGETS": "s3"}
    checked = cli.run("check", env=env)
    assert "copies on s3 only, the copies on nas are not encrypted" in checked.stdout + checked.stderr
    cli.run("backup", env=env, check=True)

    [on_nas], [on_s3] = manifests(nas), s3_manifests(s3, bucket)
    assert on_nas["id"] == on_s3["id"]
    # the NAS copy: plain zstd, its manifest in the clear
    assert on_nas["artifact"].endswith(".dump.zst") and on_nas["encryption"] is None and not on_nas.get("sealed")
    assert on_nas["contents"]["rows"] == {"public.secrets": 2000}
    plain = (nas / on_nas["artifact"]).read_bytes()
    assert SECRET_ROW.encode() in zstandard.ZstdDecompressor().decompressobj().decompress(plain)
    # the S3 copy: ciphertext of the same dump, a sealed manifest that names no table and no property
    assert on_s3["artifact"] == on_nas["artifact"] + ".age"
    assert on_s3["encryption"] == {"scheme": "age", "recipients": [fingerprint(public)]}
    sealed = s3.client.get_object(bucket, on_s3["artifact"]).read()
    assert sealed.startswith(b"age-encryption.org/v1\n") and SECRET_ROW.encode() not in sealed
    s3_text = json.dumps(on_s3)
    assert "public.secrets" not in s3_text and "Lisbon" not in s3_text and public not in s3_text
    assert on_s3["size_bytes"] == len(sealed) != on_nas["size_bytes"] and on_s3["sha256"] != on_nas["sha256"]
    assert [k for k in s3.keys(bucket) if not k.endswith(".manifest.json")] == [on_s3["artifact"]]
    opened = subprocess.run(["age", "-d", "-i", str(key)], input=sealed, capture_output=True, check=True).stdout
    assert opened == plain  # one dump, two stored forms

    listed = cli.run("list", env=env, check=True).stdout
    line = next(line for line in listed.splitlines() if line.startswith(on_nas["id"]))
    assert f"nas:- s3:{fingerprint(public)}" in line and "nas,s3" in line
    doc = json.loads(cli.run("list", "--json", env=env, check=True).stdout)["backups"][0]
    assert doc["copies"]["nas"]["encryption"] is None and doc["copies"]["s3"]["artifact"] == on_s3["artifact"]

    # verify without the identity: the NAS copy to the end of its archive, the S3 copy by size and SHA-256
    verified = cli.run("verify", on_nas["id"], env=env)
    assert verified.returncode == 0, verified.stderr
    said = verified.stdout + verified.stderr
    nas_line = next(line for line in said.splitlines() if " nas" in line and on_nas["id"] in line)
    s3_line = next(line for line in said.splitlines() if " s3" in line and on_nas["id"] in line)
    assert "archive check skipped" not in nas_line and "archive check skipped" in s3_line

    # restore without any key reads the plain NAS copy; --from s3 needs the identity and says so
    to_nas = f"from_nas_{secret_db}"
    cli.run("restore", "latest", "--db", secret_db, "--to-db", to_nas, "--create", "--yes", env=env, check=True)
    assert rows(pg, to_nas) == rows(pg, secret_db) and db_comment(pg, to_nas) == "payroll of the Lisbon office"
    refused = cli.run("restore", "latest", "--db", secret_db, "--to-db", f"x_{secret_db}", "--create",
                      "--from", "s3", "--yes", env=env)
    assert refused.returncode == 1 and "AGE_IDENTITY_FILE is not set" in refused.stderr and "hint:" in refused.stderr
    to_s3 = f"from_s3_{secret_db}"
    cli.run("restore", "latest", "--db", secret_db, "--to-db", to_s3, "--create", "--from", "s3", "--yes",
            env={**env, "AGE_IDENTITY_FILE": str(key)}, check=True)
    assert rows(pg, to_s3) == rows(pg, secret_db) and db_comment(pg, to_s3) == "payroll of the Lisbon office"
    with pg.connect() as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (f"x_{secret_db}",)).fetchone() is None

    # the stock one-liner on the S3 object
    stock_db = pg.create_db()
    fetched = tmp_path / "fetched.dump.zst.age"
    fetched.write_bytes(sealed)
    pipeline = (f"age -d -i {key} {fetched} | zstd -dc | "
                f"pg_restore --exit-on-error --no-owner -h {pg.host} -p {pg.port} -U {pg.user} -d {stock_db}")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], env={**os.environ, "PGPASSWORD": pg.password},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert rows(pg, stock_db) == rows(pg, secret_db)

    # prune removes each copy's own artifact
    cli.run("backup", "--force", env=env, check=True)
    pruned = cli.run("prune", env={**env, "BACKUP_KEEP_DAILY": "1", "BACKUP_KEEP_WEEKLY": "0",
                                   "BACKUP_KEEP_MONTHLY": "0", "BACKUP_KEEP_MIN": "1"})
    assert pruned.returncode == 0, pruned.stderr
    [kept_nas], [kept_s3] = manifests(nas), s3_manifests(s3, bucket)
    assert kept_nas["id"] == kept_s3["id"] != on_nas["id"]
    assert not (nas / on_nas["artifact"]).exists()
    assert sorted(s3.keys(bucket)) == sorted([kept_s3["artifact"], kept_s3["artifact"].removesuffix(".dump.zst.age")
                                              + ".manifest.json"])


def test_sync_encrypts_a_plain_copy_for_s3_and_never_decrypts_one_for_the_nas(
        cli: Cli, pg: PgServer, secret_db: str, s3: S3Server, bucket: str, nas: Path, tmp_path: Path) -> None:
    key, public = keypair(tmp_path, "ops")
    host, port = s3.endpoint.split(":")
    proxy = TcpProxy(host, int(port))
    both = {**pg.env(POSTGRES_DB=secret_db), "BACKUP_ENCRYPT_RECIPIENTS": public, "BACKUP_ENCRYPT_TARGETS": "s3",
            "NAS_PATH": str(nas), **s3.env(bucket, S3_ENDPOINT=f"http://{proxy.address}")}
    with proxy:
        proxy.drop()  # S3 is down: only the plain NAS copy is made
        outage = cli.run("backup", env=both)
        assert outage.returncode == 1 and "the copy on nas is kept" in outage.stderr, outage.stderr
        proxy.pass_()
        [made] = manifests(nas)
        synced = cli.run("sync", env=both)
        assert synced.returncode == 0, synced.stderr
        assert f"{made['id']}: nas -> s3 (encrypted)" in synced.stdout
        [copy] = s3_manifests(s3, bucket)
        assert copy["artifact"] == made["artifact"] + ".age" and copy["synced_from"] == "nas"
        assert copy["encryption"] == {"scheme": "age", "recipients": [fingerprint(public)]}
        assert "public.secrets" not in json.dumps(copy) and "Lisbon" not in json.dumps(copy)
        sealed = s3.client.get_object(bucket, copy["artifact"]).read()
        assert SECRET_ROW.encode() not in sealed and len(sealed) == copy["size_bytes"]
        verified = cli.run("verify", made["id"], env={**both, "AGE_IDENTITY_FILE": str(key)})
        assert verified.returncode == 0 and "archive check skipped" not in verified.stdout + verified.stderr
        to_db = f"synced_{secret_db}"
        cli.run("restore", made["id"], "--to-db", to_db, "--create", "--from", "s3", "--yes",
                env={**both, "AGE_IDENTITY_FILE": str(key)}, check=True)
        assert rows(pg, to_db) == rows(pg, secret_db)
        assert "every target holds every backup" in cli.run("sync", env=both, check=True).stdout

        # the other way: a backup made while the NAS was away exists encrypted on S3 only; the sidecar holds no
        # identity, so the NAS gets the ciphertext as it is (encrypted, restorable with the key), never nothing
        away = nas.rename(tmp_path / "nas-away")  # the NAS is unmounted: only the encrypted S3 copy is made
        outage = cli.run("backup", "--force", env=both)
        assert outage.returncode == 1 and "the copy on s3 is kept" in outage.stderr, outage.stderr
        away.rename(nas)
        [later] = [m for m in s3_manifests(s3, bucket) if m["id"] != made["id"]]
        synced = cli.run("sync", env=both)
        assert synced.returncode == 0, synced.stderr
        assert f"{later['id']}: s3 -> nas (kept encrypted)" in synced.stdout
        [on_nas] = [m for m in manifests(nas) if m["id"] == later["id"]]
        assert on_nas["artifact"] == later["artifact"] and on_nas["encryption"] == later["encryption"]
        assert SECRET_ROW.encode() not in (nas / on_nas["artifact"]).read_bytes()
        listed = cli.run("list", env=both, check=True).stdout
        assert fingerprint(public) in next(line for line in listed.splitlines() if line.startswith(later["id"]))


def test_a_failed_s3_manifest_of_an_encrypted_copy_names_no_table(
        cli: Cli, pg: PgServer, secret_db: str, s3: S3Server, bucket: str, nas: Path, tmp_path: Path) -> None:
    """A run that fails after the dump started still writes its failed manifests; on the encrypted target that
    manifest must not carry the table names and properties the sealed one would have hidden."""
    from test_backup_e2e import backup_while_blocked

    _, public = keypair(tmp_path, "ops")
    pg.psql(secret_db, "CREATE TABLE items (id int)")  # the table backup_while_blocked locks: pg_dump hangs
    env = {**pg.env(POSTGRES_DB=secret_db), "NAS_PATH": str(nas), **s3.env(bucket), "BACKUP_TIMEOUT": "3s",
           "BACKUP_ENCRYPT_RECIPIENTS": public, "BACKUP_ENCRYPT_TARGETS": "s3"}
    result, _ = backup_while_blocked(cli, pg, secret_db, env)
    assert result.returncode == 1 and "timed out after 3s" in result.stderr, result.stderr
    [failed_s3] = s3_manifests(s3, bucket)
    assert failed_s3["status"] == "failed" and failed_s3["artifact"].endswith(".age")
    assert "public.secrets" not in json.dumps(failed_s3) and "Lisbon" not in json.dumps(failed_s3)
    [failed_nas] = manifests(nas)  # the plain target's failed manifest shows what the run had recorded
    assert failed_nas["status"] == "failed" and failed_nas["id"] == failed_s3["id"]
    assert "public.secrets" in json.dumps(failed_nas)
    assert s3.keys(bucket) == [failed_s3["artifact"].removesuffix(".dump.zst.age") + ".manifest.json"]


def test_encrypt_targets_must_name_configured_targets_and_needs_recipients(
        cli: Cli, pg: PgServer, nas: Path, tmp_path: Path) -> None:
    _, public = keypair(tmp_path, "ops")
    env = {**pg.env(), "NAS_PATH": str(nas)}
    wrong = cli.run("config", env={**env, "BACKUP_ENCRYPT_RECIPIENTS": public, "BACKUP_ENCRYPT_TARGETS": "s3"})
    assert wrong.returncode == 2
    assert "BACKUP_ENCRYPT_TARGETS=s3: s3 is not a configured target" in wrong.stderr and "hint:" in wrong.stderr
    alone = cli.run("config", env={**env, "BACKUP_ENCRYPT_TARGETS": "nas"})
    assert alone.returncode == 2 and "without BACKUP_ENCRYPT_RECIPIENTS" in alone.stderr and "hint:" in alone.stderr


def test_a_drill_record_beside_an_encrypted_copy_counts_its_differences_instead_of_naming_tables(
        s3: S3Server, bucket: str, tmp_path: Path) -> None:
    from test_targets_contract import random_artifact

    from app.backup import run_artifact
    from app.cancel import CancelToken
    from app.catalog import load_catalog
    from app.drills import DrillRecord, store
    from app.settings import load_settings
    from app.targets import make_targets

    _, public = keypair(tmp_path, "ops")
    (tmp_path / "nas").mkdir()
    settings = load_settings({"NAS_PATH": str(tmp_path / "nas"), "NAS_REQUIRE_MOUNT": "false", **s3.env(bucket),
                              "BACKUP_ENCRYPT_RECIPIENTS": public, "BACKUP_ENCRYPT_TARGETS": "s3"})
    targets = make_targets(settings)
    run_artifact(settings, targets, random_artifact(1024 * 1024), CancelToken())
    [entry] = load_catalog(targets).entries
    record = DrillRecord(entry.id, "app", "failed", "2026-12-03T00:00:00Z", problems=[
        "public.payroll: 10 rows dumped, 9 restored"])
    assert store(targets, entry, record) == []
    [reloaded] = load_catalog(targets).entries
    on_nas = json.loads(targets[0].read_bytes(reloaded.drill_keys["nas"][0]))
    on_s3 = json.loads(targets[1].read_bytes(reloaded.drill_keys["s3"][0]))
    assert on_nas["problems"] == ["public.payroll: 10 rows dumped, 9 restored"]
    assert "payroll" not in json.dumps(on_s3) and on_s3["problems"][0].startswith("1 difference(s)")
