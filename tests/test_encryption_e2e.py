"""Encrypted backups (age) end to end: the real CLI, real PostgreSQL, the suite's S3 server and a directory.

A canary row never appears in the stored bytes; restore decrypts with AGE_IDENTITY_FILE; the stock one-liner
`age -d -i key | zstd -dc | pg_restore` restores it too; verify without the identity still checks size and
SHA-256; a backup encrypted to a key that was rotated out is flagged.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

from conftest import CANARY, SECRET_ROW, Cli, MariaDb, PgServer, S3Server, require_tool

from app.encryption import fingerprint, parse_recipients


def keypair(tmp_path: Path, name: str) -> tuple[Path, str]:
    keygen = require_tool("age-keygen", "age")
    key = tmp_path / f"{name}.key"
    subprocess.run([keygen, "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run([keygen, "-y", str(key)], check=True, capture_output=True, text=True).stdout.strip()
    return key, public


def manifests(nas: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(nas.rglob("*.manifest.json"))]


def db_comment(pg: PgServer, db: str) -> str | None:
    with pg.connect() as conn:
        row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                           (db,)).fetchone()
    return row[0] if row else None


def rows(pg: PgServer, db: str) -> list[tuple]:
    with pg.connect(db) as conn:
        return conn.execute("SELECT id, value FROM secrets ORDER BY id").fetchall()


def test_round_trip_on_both_targets_restores_with_the_identity_and_with_the_stock_one_liner(
        cli: Cli, pg: PgServer, secret_db: str, s3: S3Server, bucket: str, nas: Path, tmp_path: Path) -> None:
    key, public = keypair(tmp_path, "ops")
    env = {**pg.env(POSTGRES_DB=secret_db), "NAS_PATH": str(nas), **s3.env(bucket),
           "BACKUP_ENCRYPT_RECIPIENTS": public}
    result = cli.run("backup", env=env, check=True)
    [m_nas] = [m for m in manifests(nas)]
    assert m_nas["artifact"].endswith(".dump.zst.age")
    assert m_nas["encryption"] == {"scheme": "age", "recipients": [fingerprint(public)]}
    stored = (nas / m_nas["artifact"]).read_bytes()
    assert stored.startswith(b"age-encryption.org/v1\n")
    s3_bytes = s3.client.get_object(bucket, m_nas["artifact"]).read()
    for blob in (stored, s3_bytes):
        assert SECRET_ROW.encode() not in blob and b"secrets" not in blob
    manifest_text = json.dumps(manifests(nas)) + s3.client.get_object(
        bucket, m_nas["artifact"].removesuffix(".dump.zst.age") + ".manifest.json").read().decode()
    assert public not in manifest_text and "AGE-SECRET-KEY" not in manifest_text
    # table names, row counts and the database's properties are sealed; object counts stay readable
    assert "public.secrets" not in manifest_text and "Lisbon" not in manifest_text
    assert m_nas["sealed"].startswith("-----BEGIN AGE ENCRYPTED FILE-----")
    assert m_nas["database_properties"] is None and m_nas["contents"]["objects"]["tables"] == 1
    opened = json.loads(cli.run("list", "--json", env={**env, "AGE_IDENTITY_FILE": str(key)}, check=True).stdout)
    [doc] = [b for b in opened["backups"] if b["id"] == m_nas["id"]]
    assert doc["contents"]["rows"] == {"public.secrets": 2000}
    assert doc["database_properties"]["comment"] == "payroll of the Lisbon office"
    assert CANARY not in result.stdout + result.stderr

    # restore with the identity, from each target
    for source in ("nas", "s3"):
        to_db = f"restored_{source}_{secret_db}"
        cli.run("restore", "latest", "--db", secret_db, "--to-db", to_db, "--create", "--from", source, "--yes",
                env={**env, "AGE_IDENTITY_FILE": str(key)}, check=True)
        assert rows(pg, to_db) == rows(pg, secret_db)
        assert db_comment(pg, to_db) == "payroll of the Lisbon office"  # --create from the sealed properties

    # the stock one-liner from the README: age -d -i key FILE | zstd -dc | pg_restore
    stock_db = pg.create_db()
    pipeline = (f"age -d -i {key} {nas / m_nas['artifact']} | zstd -dc | "
                f"pg_restore --exit-on-error --no-owner -h {pg.host} -p {pg.port} -U {pg.user} -d {stock_db}")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], env={**os.environ, "PGPASSWORD": pg.password},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert rows(pg, stock_db) == rows(pg, secret_db)


def test_restore_without_the_identity_fails_with_the_setting_to_set(
        cli: Cli, pg: PgServer, secret_db: str, nas: Path, tmp_path: Path) -> None:
    _, public = keypair(tmp_path, "ops")
    env = {**pg.env(POSTGRES_DB=secret_db), "NAS_PATH": str(nas), "BACKUP_ENCRYPT_RECIPIENTS": public}
    cli.run("backup", env=env, check=True)
    result = cli.run("restore", "latest", "--db", secret_db, "--to-db", f"x_{secret_db}", "--create", "--yes",
                     env=env)
    assert result.returncode == 1
    assert "is encrypted (age) and AGE_IDENTITY_FILE is not set" in result.stderr and "hint:" in result.stderr
    with pg.connect() as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (f"x_{secret_db}",)).fetchone() is None


def test_verify_without_identity_checks_the_bytes_and_a_rotated_out_key_is_flagged(
        cli: Cli, pg: PgServer, secret_db: str, nas: Path, tmp_path: Path) -> None:
    old_key, old_public = keypair(tmp_path, "old")
    new_key, new_public = keypair(tmp_path, "new")
    env = {**pg.env(POSTGRES_DB=secret_db), "NAS_PATH": str(nas)}
    cli.run("backup", env={**env, "BACKUP_ENCRYPT_RECIPIENTS": old_public}, check=True)
    cli.run("backup", env={**env, "BACKUP_ENCRYPT_RECIPIENTS": f"{old_public},{new_public}"}, check=True)
    made, both = manifests(nas)
    listed = cli.run("list", env=env, check=True).stdout
    line_old = next(line for line in listed.splitlines() if line.startswith(made["id"]))
    line_both = next(line for line in listed.splitlines() if line.startswith(both["id"]))
    assert fingerprint(old_public) in line_old and fingerprint(new_public) not in line_old
    assert f"{fingerprint(old_public)},{fingerprint(new_public)}" in line_both

    plain = cli.run("verify", made["id"], env=env)
    assert plain.returncode == 0, plain.stderr
    assert "size and sha256 ok; archive check skipped" in plain.stdout + plain.stderr

    opened = cli.run("verify", made["id"], env={**env, "AGE_IDENTITY_FILE": str(old_key)})
    assert opened.returncode == 0 and "archive check skipped" not in opened.stdout + opened.stderr, opened.stderr

    # the key was rotated: new backups go to the new key, and the old identity was thrown away too early
    rotated = {**env, "BACKUP_ENCRYPT_RECIPIENTS": new_public, "AGE_IDENTITY_FILE": str(new_key)}
    flagged = cli.run("verify", made["id"], env=rotated)
    assert flagged.returncode == 1
    assert "no configured identity opens it" in flagged.stdout + flagged.stderr
    assert fingerprint(old_public) in flagged.stdout + flagged.stderr

    # a damaged copy is still caught without any identity
    artifact = nas / made["artifact"]
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    damaged = cli.run("verify", made["id"], env=env)
    assert damaged.returncode == 1 and "SHA-256 mismatch" in damaged.stdout + damaged.stderr


def test_age_killed_mid_stream_fails_the_run_and_leaves_no_artifact(
        cli: Cli, pg: PgServer, nas: Path, tmp_path: Path) -> None:
    """An age that dies (here: a fake one that exits after some input) fails the run cleanly."""
    _, public = keypair(tmp_path, "ops")
    db = pg.create_db()
    with pg.connect(db) as conn:
        conn.execute("CREATE TABLE big AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 200000) g")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "age").write_text("#!/bin/sh\nhead -c 65536 > /dev/null\necho 'age: error: killed' >&2\nkill -9 $$\n")
    (fake / "age").chmod(0o755)
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "BACKUP_ENCRYPT_RECIPIENTS": public,
           "PATH": f"{fake}:{os.environ['PATH']}"}
    result = cli.run("backup", env=env)
    assert result.returncode == 1, result.stderr
    assert "age" in result.stderr and "hint:" in result.stderr
    [failed] = manifests(nas)
    assert failed["status"] == "failed"
    assert not (nas / failed["artifact"]).exists()


def test_bad_recipients_are_refused_at_start_and_a_private_key_is_never_echoed(cli: Cli, tmp_path: Path) -> None:
    key, public = keypair(tmp_path, "ops")
    private = next(line for line in key.read_text().splitlines() if line.startswith("AGE-SECRET-KEY-"))
    result = cli.run("config", env={"BACKUP_ENCRYPT_RECIPIENTS": f"{public}, {private}, age1nope",
                                    "NAS_PATH": str(tmp_path / "nas")})
    assert result.returncode == 2
    assert "entry 2 is a private key" in result.stderr and "entry 3 (age1nope...) is not an age recipient" in \
        result.stderr
    assert private not in result.stdout + result.stderr
    found, problems = parse_recipients(f"# team keys\n{public}\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB user@host\n",
                                       "F")
    assert found == [public, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB"] and problems == []


def test_check_reports_encryption_and_an_identity_that_opens_none_of_the_recipients(
        cli: Cli, pg: PgServer, secret_db: str, nas: Path, tmp_path: Path) -> None:
    key, public = keypair(tmp_path, "ops")
    other_key, _ = keypair(tmp_path, "other")
    env = {**pg.env(POSTGRES_DB=secret_db), "NAS_PATH": str(nas), "BACKUP_ENCRYPT_RECIPIENTS": public}
    good = cli.run("check", env={**env, "AGE_IDENTITY_FILE": str(key)})
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"age to 1 recipient(s): {fingerprint(public)}" in good.stdout + good.stderr
    stale = cli.run("check", env={**env, "AGE_IDENTITY_FILE": str(other_key)})
    assert "new backups cannot be restored with it" in stale.stdout + stale.stderr
    missing = cli.run("check", env={**env, "AGE_IDENTITY_FILE": str(tmp_path / "nope.key")})
    assert missing.returncode == 1 and "AGE_IDENTITY_FILE" in missing.stdout + missing.stderr


def test_sqlite_and_mariadb_backups_are_encrypted_too_and_restore_with_the_identity(
        cli: Cli, mariadb: MariaDb, nas: Path, tmp_path: Path) -> None:
    from test_mariadb_e2e import admin_env, build_shop, connect

    key, public = keypair(tmp_path, "ops")
    # SQLite: the stock one-liner gives back a file that passes integrity_check with every row
    path = tmp_path / "workshop.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.executemany("INSERT INTO notes VALUES (?, ?)", [(i, f"{SECRET_ROW} {i}") for i in range(500)])
    conn.commit()
    conn.close()
    env = {"SQLITE_PATHS": str(path), "NAS_PATH": str(nas), "BACKUP_ENCRYPT_RECIPIENTS": public}
    cli.run("backup", env=env, check=True)
    [m] = manifests(nas)
    assert m["artifact"].endswith(".sqlite.zst.age") and m["encryption"]["recipients"] == [fingerprint(public)]
    stored = nas / m["artifact"]
    assert SECRET_ROW.encode() not in stored.read_bytes()
    out = tmp_path / "stock.sqlite"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", f"age -d -i {key} {stored} | zstd -dc > {out}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    check = sqlite3.connect(out)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert check.execute("SELECT count(*) FROM notes").fetchone() == (500,)
    check.close()

    # MariaDB: encrypted on the NAS, restored by `restore` with the identity
    shop = build_shop(mariadb, f"enc_{os.urandom(3).hex()}", rows=30)
    my_nas = tmp_path / "my-nas"
    my_nas.mkdir()
    my_env = {**admin_env(mariadb, shop, my_nas), "BACKUP_ENCRYPT_RECIPIENTS": public}
    cli.run("backup", env=my_env, check=True)
    [mm] = manifests(my_nas)
    assert mm["artifact"].endswith(".sql.zst.age")
    assert b"INSERT INTO" not in (my_nas / mm["artifact"]).read_bytes()
    to_db = f"{shop}_back"
    cli.run("restore", mm["id"], "--to-db", to_db, "--create", "--yes",
            env={**my_env, "AGE_IDENTITY_FILE": str(key)}, check=True)
    with connect(mariadb, to_db) as c, c.cursor() as cur:
        cur.execute("SELECT count(*) FROM accounts")
        assert cur.fetchone() == (30,)


def test_hung_encrypted_dump_is_stopped_at_the_deadline_with_the_deadlines_error(
        cli: Cli, pg: PgServer, nas: Path, tmp_path: Path) -> None:
    """age is one more process in the pipeline; the run's one deadline still stops it all, and the error is the
    deadline's (with its hint), not a broken pipe of age's."""
    from test_backup_e2e import _assert_failed_cleanly, backup_while_blocked

    _, public = keypair(tmp_path, "ops")
    db = pg.create_db()
    pg.psql(db, "CREATE TABLE items AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g")
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "BACKUP_TIMEOUT": "2s",
           "BACKUP_ENCRYPT_RECIPIENTS": public}
    result, elapsed = backup_while_blocked(cli, pg, db, env)
    assert elapsed < 15
    failed = _assert_failed_cleanly(result, nas, {}, "timed out after 2s")
    assert "BACKUP_TIMEOUT" in failed["error"] and "age" not in failed["error"].replace("(age)", "")



def test_point_in_time_recovery_is_refused_while_encryption_is_on(cli: Cli, pg: PgServer, nas: Path,
                                                                  tmp_path: Path) -> None:
    """WAL segments and base backups are not encrypted yet: refuse at start rather than store the cluster in the
    clear beside encrypted dumps (base-backup itself needs WAL_ARCHIVE)."""
    _, public = keypair(tmp_path, "ops")
    refused = cli.run("config", env={**pg.env(), "NAS_PATH": str(nas), "BACKUP_ENCRYPT_RECIPIENTS": public,
                                     "WAL_ARCHIVE": "true"})
    assert refused.returncode == 2 and "WAL archive and base backups are not encrypted yet" in refused.stderr
