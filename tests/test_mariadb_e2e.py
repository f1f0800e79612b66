"""The real CLI against a real MariaDB server (password auth over TCP), a real S3 server and a real directory.

The sample database has InnoDB and MyISAM tables, utf8mb4 text, blobs, a view, a trigger, a procedure and an
event. Backups are made as a least-privileged user (SELECT, SHOW VIEW, TRIGGER, EVENT, LOCK TABLES), restored
with the stock client and with `restore`, and compared table by table (ordered-row checksums) and by
SHOW CREATE.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import threading
import time
from pathlib import Path

import pymysql
import pytest
from conftest import CANARY, Cli, MariaDb, S3Server, all_files_text, free_port

LEAST = "bs_reader"
LEAST_PW = CANARY + "-ro"
_GRANTS = "SELECT, SHOW VIEW, TRIGGER, EVENT, LOCK TABLES"


def connect(server: MariaDb, db: str | None = None, user: str = "backup", password: str | None = None
            ) -> pymysql.Connection:
    return pymysql.connect(host=server.host, port=server.port, user=user, password=password or server.password,
                           database=db, autocommit=True, charset="utf8mb4")


def sql(server: MariaDb, statements: str, db: str | None = None) -> None:
    server.as_root(statements, db)


def env_for(server: MariaDb, db: str, nas: Path, **extra: str) -> dict[str, str]:
    return {"MYSQL_HOST": server.host, "MYSQL_PORT": str(server.port), "MYSQL_USER": LEAST,
            "MYSQL_PASSWORD": LEAST_PW, "MYSQL_DATABASE": db, "NAS_PATH": str(nas), **extra}


def admin_env(server: MariaDb, db: str, nas: Path, **extra: str) -> dict[str, str]:
    """The restoring user: creates databases, tables, views, triggers, routines and events with DEFINERs."""
    return {**env_for(server, db, nas), "MYSQL_USER": "backup", "MYSQL_PASSWORD": server.password, **extra}


@pytest.fixture(scope="module")
def reader(mariadb: MariaDb) -> str:
    sql(mariadb, f"CREATE USER IF NOT EXISTS '{LEAST}'@'%' IDENTIFIED BY '{LEAST_PW}';\n"
                 f"GRANT {_GRANTS} ON *.* TO '{LEAST}'@'%';\n")
    return LEAST


def build_shop(server: MariaDb, name: str, rows: int = 200) -> str:
    sql(server, f"""
CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
USE `{name}`;
CREATE TABLE accounts (id INT PRIMARY KEY, owner VARCHAR(100) NOT NULL, balance BIGINT NOT NULL,
  note TEXT, photo BLOB) ENGINE=InnoDB;
CREATE TABLE audit (id INT AUTO_INCREMENT PRIMARY KEY, account INT, at DATETIME(6) DEFAULT NOW(6)) ENGINE=InnoDB;
CREATE TABLE legacy_log (id INT AUTO_INCREMENT PRIMARY KEY, msg TEXT, raw VARBINARY(64)) ENGINE=MyISAM;
CREATE TABLE empty_one (id INT PRIMARY KEY) ENGINE=InnoDB;
CREATE VIEW rich AS SELECT id, owner, balance FROM accounts WHERE balance > 1000;
CREATE TRIGGER accounts_ai AFTER INSERT ON accounts FOR EACH ROW INSERT INTO audit (account) VALUES (NEW.id);
CREATE PROCEDURE total_balance(OUT total BIGINT) SELECT SUM(balance) INTO total FROM accounts;
CREATE EVENT nightly ON SCHEDULE EVERY 1 DAY DO DELETE FROM legacy_log WHERE id < 0;
""")
    with connect(server, name) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO accounts VALUES (%s, %s, %s, %s, %s)", [
            (i, f"Zoë Ünïcødé 😀 #{i}", 1000, "line one\nline two),(with 'quotes' and \\ backslash; and );\n(",
             bytes(range(256)) * 3 + secrets.token_bytes(i % 50)) for i in range(1, rows + 1)])
        cur.executemany("INSERT INTO legacy_log (msg, raw) VALUES (%s, %s)",
                        [(f"entry {i} 日本語", bytes([i % 256, 0, 10, 39, 92])) for i in range(50)])
    return name


def table_checksums(server: MariaDb, db: str) -> dict[str, str]:
    """SHA-256 of every base table's rows in primary-key order, and of every object's SHOW CREATE text."""
    out = {}
    with connect(server, db) as conn, conn.cursor() as cur:
        cur.execute("SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES WHERE TABLE_SCHEMA=%s "
                    "ORDER BY TABLE_NAME", (db,))
        for name, kind in cur.fetchall():
            if kind == "BASE TABLE":
                cur.execute(f"SELECT * FROM `{name}` ORDER BY 1")
                out[f"rows:{name}"] = hashlib.sha256(repr(cur.fetchall()).encode()).hexdigest()
                cur.execute(f"SHOW CREATE TABLE `{name}`")
                out[f"table:{name}"] = cur.fetchone()[1]
            else:
                cur.execute(f"SHOW CREATE VIEW `{name}`")
                out[f"view:{name}"] = cur.fetchone()[1]
        for what, query in (("trigger", "SHOW TRIGGERS"), ("procedure", "SHOW PROCEDURE STATUS WHERE Db=DATABASE()"),
                            ("event", "SHOW EVENTS")):
            cur.execute(query)
            for row in cur.fetchall():
                name = row[0] if what == "trigger" else row[1]
                kind = {"trigger": "TRIGGER", "procedure": "PROCEDURE", "event": "EVENT"}[what]
                cur.execute(f"SHOW CREATE {kind} `{name}`")
                found = cur.fetchone()
                text = found[2] if what != "event" else found[3]
                out[f"{what}:{name}"] = text.split(" ON SCHEDULE")[0] if what == "event" else text
        cur.execute("SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA "
                    "WHERE SCHEMA_NAME=%s", (db,))
        out["database"] = repr(cur.fetchone())
    return out


def manifests(nas: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(nas.rglob("*.manifest.json"))]


def artifact_of(nas: Path, m: dict) -> Path:
    return nas / m["artifact"]


def stock_restore(server: MariaDb, artifact: Path, db: str) -> None:
    """`zstd -dc FILE | mariadb DB`: no code of the project involved."""
    sql(server, f"CREATE DATABASE `{db}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;")
    dec = subprocess.Popen(["zstd", "-dc", str(artifact)], stdout=subprocess.PIPE)
    out = subprocess.run(["mariadb", "--no-defaults", f"--socket={server.socket}", "-uroot", db], stdin=dec.stdout,
                         capture_output=True, text=True)
    assert dec.wait() == 0
    assert out.returncode == 0, out.stderr


def assert_canary_absent(result: subprocess.CompletedProcess[str], *roots: Path) -> None:
    for secret in (CANARY, LEAST_PW):
        assert secret not in result.stdout + result.stderr
        assert secret not in all_files_text(*roots)


def test_round_trip_through_both_targets_restores_with_stock_mariadb_and_with_restore(
        cli: Cli, mariadb: MariaDb, reader: str, s3: S3Server, bucket: str, nas: Path) -> None:
    src = build_shop(mariadb, f"shop_{secrets.token_hex(3)}")
    env = {**env_for(mariadb, src, nas), **s3.env(bucket), "BACKUP_GLOBALS": "true"}
    result = cli.run("backup", env=env, check=True)
    assert_canary_absent(result, nas)
    db_manifest = next(m for m in manifests(nas) if m["database"] == src)
    assert db_manifest["status"] == "ok" and db_manifest["engine"] == "mariadb" and db_manifest["format"] == "plain"
    assert db_manifest["artifact"].endswith(".sql.zst")
    assert db_manifest["contents"]["rows"] == {"accounts": 200, "audit": 200, "legacy_log": 50, "empty_one": 0}
    assert db_manifest["contents"]["objects"] == {"tables": 4, "views": 1, "sequences": 0, "triggers": 1,
                                                  "procedures": 1, "functions": 0, "events": 1}
    assert db_manifest["position"]["binlog_file"].startswith("binlog.") and db_manifest["position"]["binlog_pos"] > 0
    assert db_manifest["position"]["gtid"]
    assert db_manifest["database_properties"] == {"encoding": "utf8mb4", "collate": "utf8mb4_unicode_ci"}
    assert any("legacy_log (MyISAM)" in w and "MYSQLDUMP_LOCK_ALL_TABLES" in w for w in db_manifest["warnings"])
    assert db_manifest["source"] == f"{mariadb.host}:{mariadb.port}"
    assert sorted(s3.keys(bucket)) == sorted(k for m in manifests(nas) for k in
                                             (m["artifact"], m["artifact"].rsplit(".sql", 1)[0] + ".manifest.json"))
    expected = table_checksums(mariadb, src)

    stock = f"stock_{secrets.token_hex(3)}"
    stock_restore(mariadb, artifact_of(nas, db_manifest), stock)
    assert table_checksums(mariadb, stock) == expected

    for source in ("nas", "s3"):
        copy = f"copy_{source}_{secrets.token_hex(3)}"
        out = cli.run("restore", "latest", "--db", src, "--to-db", copy, "--create", "--yes", "--from", source,
                      env={**admin_env(mariadb, src, nas), **s3.env(bucket)}, check=True)
        assert "swapped in by one RENAME TABLE" in out.stdout and "(created)" in out.stdout
        assert table_checksums(mariadb, copy) == expected
    with connect(mariadb) as conn, conn.cursor() as cur:
        cur.execute("SHOW DATABASES LIKE 'bs\\_%'")
        assert cur.fetchall() == ()

    verify = cli.run("verify", "latest", "--db", src, "--restore-test", env=admin_env(mariadb, src, nas), check=True)
    assert "mariadb-dump trailer present" in verify.stdout and "restore-test from nas:" in verify.stdout
    listed = cli.run("list", "--json", env=env_for(mariadb, src, nas), check=True)
    ids = {b["database"]: b for b in json.loads(listed.stdout)["backups"]}
    assert ids[src]["last_drill"]["status"] == "ok" and ids["_globals"]["status"] == "ok"
    users = subprocess.run(["zstd", "-dc", str(artifact_of(nas, next(m for m in manifests(nas)
                                                                       if m["database"] == "_globals")))],
                           capture_output=True, check=True).stdout
    assert f"CREATE USER IF NOT EXISTS `{LEAST}`@`%` ACCOUNT LOCK;".encode() in users  # no hash without opt-in
    assert b"IDENTIFIED BY PASSWORD" not in users


def test_concurrent_money_moving_writer_leaves_the_restored_total_unchanged(
        cli: Cli, mariadb: MariaDb, reader: str, nas: Path) -> None:
    src = f"bank_{secrets.token_hex(3)}"
    sql(mariadb, f"CREATE DATABASE `{src}`; USE `{src}`; CREATE TABLE accounts (id INT PRIMARY KEY, "
                 "balance BIGINT NOT NULL) ENGINE=InnoDB; CREATE TABLE padding (id INT AUTO_INCREMENT PRIMARY KEY, "
                 "junk LONGTEXT) ENGINE=InnoDB;")
    with connect(mariadb, src) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO accounts VALUES (%s, 1000)", [(i,) for i in range(100)])
        cur.executemany("INSERT INTO padding (junk) VALUES (%s)", [(secrets.token_hex(20000),)] * 300)
    stop, moved = threading.Event(), [0]

    def writer() -> None:
        with connect(mariadb, src) as conn, conn.cursor() as cur:
            conn.autocommit(False)
            while not stop.is_set():
                a, b = secrets.randbelow(100), secrets.randbelow(100)
                amount = secrets.randbelow(50) + 1
                cur.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, a))
                cur.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, b))
                conn.commit()
                moved[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        cli.run("backup", env=env_for(mariadb, src, nas), check=True)
    finally:
        stop.set()
        thread.join()
    assert moved[0] > 20  # money was moving while the dump ran
    copy = f"bank_copy_{secrets.token_hex(3)}"
    cli.run("restore", "latest", "--to-db", copy, "--create", "--yes", env=admin_env(mariadb, src, nas), check=True)
    with connect(mariadb, copy) as conn, conn.cursor() as cur:
        cur.execute("SELECT SUM(balance), COUNT(*) FROM accounts")
        assert cur.fetchone() == (100 * 1000, 100)


def _find_dump(timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"mariadb-dump\0") \
                        or proc.name.isdigit() and b"/mariadb-dump\0" in (proc / "cmdline").read_bytes()[:80]:
                    return int(proc.name)
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError("mariadb-dump did not start")


class Blocked:
    """A session holding LOCK TABLES ... WRITE, so mariadb-dump waits on its SELECT."""

    def __init__(self, server: MariaDb, db: str) -> None:
        self.conn = connect(server, db)
        with self.conn.cursor() as cur:
            cur.execute("LOCK TABLES accounts WRITE")

    def release(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute("UNLOCK TABLES")
        self.conn.close()


@pytest.fixture(scope="module")
def small(mariadb: MariaDb, reader: str) -> str:
    return build_shop(mariadb, f"small_{secrets.token_hex(3)}", rows=20)


def test_password_only_in_an_option_file_pipe_never_in_argv_environment_or_disk(
        cli: Cli, mariadb: MariaDb, small: str, s3: S3Server, bucket: str, nas: Path, tmp_path: Path) -> None:
    env = {**env_for(mariadb, small, nas), **s3.env(bucket), "BACKUP_TIMEOUT": "60s"}
    blocker = Blocked(mariadb, small)
    proc = cli.popen("backup", env=env)
    try:
        pid = _find_dump()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert LEAST_PW.encode() not in environ and b"MYSQL_PWD" not in environ and b"S3_SECRET" not in environ
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        [option] = [a for a in argv if a.startswith(b"--defaults-file=")]
        fd = option.split(b"/dev/fd/")[1].decode()
        assert os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")  # a pipe, no file on any disk
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                assert LEAST_PW.encode() not in cmdline.read_bytes(), cmdline
            except OSError:
                continue
    finally:
        blocker.release()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert LEAST_PW not in out + err
    assert LEAST_PW not in all_files_text(nas, tmp_path)


def _assert_failed_cleanly(result: subprocess.CompletedProcess[str], nas: Path, before: set[str],
                           needle: str) -> dict:
    assert result.returncode == 1, result.stderr
    assert needle in result.stderr and "hint:" in result.stderr, result.stderr
    assert LEAST_PW not in result.stdout + result.stderr
    failed = [m for m in manifests(nas) if m["status"] == "failed"]
    assert failed and needle in failed[-1]["error"]
    leftovers = {str(p.relative_to(nas)) for p in nas.rglob("*") if p.is_file() and ".manifest" not in p.name}
    assert leftovers == before  # no artifact of the failed run, every earlier one kept
    return failed[-1]


def _artifacts(nas: Path) -> set[str]:
    return {str(p.relative_to(nas)) for p in nas.rglob("*") if p.is_file() and ".manifest" not in p.name}


def test_wrong_password_fails_with_hint_and_a_failed_manifest(cli: Cli, mariadb: MariaDb, small: str,
                                                              nas: Path) -> None:
    env = {**env_for(mariadb, small, nas), "MYSQL_PASSWORD": "not-" + LEAST_PW}
    failed = _assert_failed_cleanly(cli.run("backup", env=env, timeout=60), nas, set(), "Access denied")
    assert "MYSQL_PASSWORD" in failed["error"]


def test_unreachable_server_fails_within_seconds(cli: Cli, nas: Path, mariadb: MariaDb) -> None:
    env = {"MYSQL_HOST": "127.0.0.1", "MYSQL_PORT": str(free_port()), "MYSQL_USER": LEAST,
           "MYSQL_PASSWORD": LEAST_PW, "MYSQL_DATABASE": "shop", "NAS_PATH": str(nas)}
    t0 = time.monotonic()
    failed = _assert_failed_cleanly(cli.run("backup", env=env, timeout=60), nas, set(), "Can't connect")
    assert time.monotonic() - t0 < 30 and "MYSQL_HOST" in failed["error"]


def test_killed_dump_fails_cleanly_and_keeps_the_earlier_backup(cli: Cli, mariadb: MariaDb, small: str,
                                                                s3: S3Server, bucket: str, nas: Path) -> None:
    env = {**env_for(mariadb, small, nas), **s3.env(bucket)}
    cli.run("backup", env=env, check=True)
    before, s3_before = _artifacts(nas), set(s3.keys(bucket))
    blocker = Blocked(mariadb, small)
    try:
        proc = cli.popen("backup", "--force", env=env)
        os.kill(_find_dump(), 9)
        out, err = proc.communicate(timeout=60)
    finally:
        blocker.release()
    failed = _assert_failed_cleanly(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), nas, before,
                                    "killed by signal 9")
    new_s3 = sorted(set(s3.keys(bucket)) - s3_before)
    assert len(new_s3) == 1 and new_s3[0].endswith(f"{failed['id']}.manifest.json")


def test_hung_dump_is_killed_after_backup_timeout(cli: Cli, mariadb: MariaDb, small: str, nas: Path) -> None:
    env = {**env_for(mariadb, small, nas), "BACKUP_TIMEOUT": "2s"}
    blocker = Blocked(mariadb, small)
    try:
        t0 = time.monotonic()
        result = cli.run("backup", env=env, timeout=60)
        assert time.monotonic() - t0 < 20
    finally:
        blocker.release()
    failed = _assert_failed_cleanly(result, nas, set(), "timed out after 2s")
    assert "BACKUP_TIMEOUT" in failed["error"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_disk_full_mid_stream_leaves_no_partial_and_keeps_earlier_backups(
        cli: Cli, mariadb: MariaDb, reader: str, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    big = f"big_{secrets.token_hex(3)}"
    sql(mariadb, f"CREATE DATABASE `{big}`; CREATE TABLE `{big}`.junk (id INT AUTO_INCREMENT PRIMARY KEY, "
                 "v LONGTEXT) ENGINE=InnoDB;")
    with connect(mariadb, big) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO junk (v) VALUES (%s)", [(secrets.token_hex(5000),)] * 100)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(full)], check=True)
    try:
        tiny = f"tiny_{secrets.token_hex(3)}"
        sql(mariadb, f"CREATE DATABASE `{tiny}`; CREATE TABLE `{tiny}`.t (id INT PRIMARY KEY); "
                     f"INSERT INTO `{tiny}`.t VALUES (1);")
        cli.run("backup", env=env_for(mariadb, tiny, full), check=True)
        before = _artifacts(full)
        result = cli.run("backup", env=env_for(mariadb, big, full, BACKUP_COMPRESSION="none"), timeout=60)
        _assert_failed_cleanly(result, full, before, "full")
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_s3_down_fails_the_run_but_the_nas_keeps_its_copy(cli: Cli, mariadb: MariaDb, small: str, s3: S3Server,
                                                           nas: Path) -> None:
    env = {**env_for(mariadb, small, nas), **s3.env("backups"), "S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    result = cli.run("backup", env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "no copy on s3" in result.stderr and "S3_ENDPOINT" in result.stderr
    assert "the copy on nas is kept" in result.stderr
    [m] = manifests(nas)  # every copy stands on its own: the NAS copy is published with its own manifest
    assert m["status"] == "ok" and m["target"] == "nas" and m["artifact"] in _artifacts(nas)


def test_damaged_artifact_restore_over_a_live_database_leaves_it_as_it_was(
        cli: Cli, mariadb: MariaDb, reader: str, nas: Path) -> None:
    src = f"live_{secrets.token_hex(3)}"
    sql(mariadb, f"CREATE DATABASE `{src}`; USE `{src}`; CREATE TABLE t (id INT PRIMARY KEY, v TEXT); "
                 "CREATE VIEW v AS SELECT id FROM t; "
                 "INSERT INTO t VALUES (1, 'backed up'), (2, 'backed up');")
    cli.run("backup", env=env_for(mariadb, src, nas), check=True)
    sql(mariadb, "INSERT INTO t VALUES (3, 'after the backup');", src)
    live = table_checksums(mariadb, src)
    [m] = manifests(nas)
    path = artifact_of(nas, m)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    result = cli.run("restore", m["id"], "--to-db", src, "--clean", "--yes", env=admin_env(mariadb, src, nas))
    assert result.returncode == 1 and f"{src} was not touched" in result.stderr, result.stderr
    assert "staging database" in result.stderr and "was dropped" in result.stderr
    assert table_checksums(mariadb, src) == live


def test_clean_restore_swaps_tables_views_and_routines_in_place(cli: Cli, mariadb: MariaDb, reader: str,
                                                                nas: Path) -> None:
    src = f"app_{secrets.token_hex(3)}"
    sql(mariadb, f"CREATE DATABASE `{src}`; USE `{src}`; CREATE TABLE t (id INT PRIMARY KEY, v TEXT); "
                 "CREATE VIEW v AS SELECT id, v FROM t; CREATE FUNCTION two() RETURNS INT DETERMINISTIC RETURN 2; "
                 "INSERT INTO t VALUES (1, 'kept');")
    cli.run("backup", env=env_for(mariadb, src, nas), check=True)
    wanted = table_checksums(mariadb, src)
    sql(mariadb, "INSERT INTO t VALUES (2, 'later'); CREATE TABLE extra (id INT); CREATE VIEW w AS SELECT 1 AS one; "
                 "DROP FUNCTION two;", src)
    refused = cli.run("restore", "latest", "--to-db", src, "--yes", env=admin_env(mariadb, src, nas))
    assert refused.returncode == 1 and "--clean" in refused.stderr
    out = cli.run("restore", "latest", "--to-db", src, "--clean", "--yes", env=admin_env(mariadb, src, nas),
                  check=True)
    assert "RENAME TABLE" in out.stdout
    assert table_checksums(mariadb, src) == wanted
    with connect(mariadb) as conn, conn.cursor() as cur:
        cur.execute("SHOW DATABASES LIKE 'bs\\_%'")
        assert cur.fetchall() == ()


def test_restore_with_triggers_over_a_database_with_tables_is_refused_untouched(
        cli: Cli, mariadb: MariaDb, small: str, nas: Path) -> None:
    cli.run("backup", env=env_for(mariadb, small, nas), check=True)
    before = table_checksums(mariadb, small)
    result = cli.run("restore", "latest", "--to-db", small, "--clean", "--yes", env=admin_env(mariadb, small, nas))
    assert result.returncode == 1 and "triggers" in result.stderr and "--create" in result.stderr
    assert table_checksums(mariadb, small) == before


def test_a_client_older_than_the_server_is_refused_before_dumping(cli: Cli, mariadb: MariaDb, small: str,
                                                                  nas: Path, tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    old = fake / "mariadb-dump"
    old.write_text("#!/bin/sh\necho 'mariadb-dump  Ver 10.19 Distrib 10.3.39-MariaDB, for debian-linux-gnu'\n")
    old.chmod(0o755)
    env = {**env_for(mariadb, small, nas), "PATH": f"{fake}:{os.environ['PATH']}"}
    failed = _assert_failed_cleanly(cli.run("backup", env=env, timeout=60), nas, set(), "older than the server")
    assert "10.11 or newer" in failed["error"]


def test_a_running_claim_on_another_host_skips_the_backup(cli: Cli, mariadb: MariaDb, small: str,
                                                          nas: Path) -> None:
    with connect(mariadb) as conn, conn.cursor() as cur:
        cur.execute("SELECT GET_LOCK(%s, 0)", (f"backup-sidecar:{small}",))
        result = cli.run("backup", env=env_for(mariadb, small, nas), timeout=60)
    assert result.returncode == 0 and "already running" in result.stderr, result.stderr
    assert manifests(nas) == []


def test_a_claim_lost_mid_dump_fails_the_run_and_publishes_nothing(cli: Cli, mariadb: MariaDb, small: str,
                                                                   nas: Path) -> None:
    """An operator's KILL, a failover or wait_timeout ends the claim session: another host may now back the
    slot up, so this run must not publish a second copy of it."""
    before = {m["id"] for m in manifests(nas)}
    blocker = Blocked(mariadb, small)
    try:
        proc = cli.popen("backup", env={**env_for(mariadb, small, nas), "BACKUP_TIMEOUT": "90s"})
        _find_dump()
        with connect(mariadb) as conn, conn.cursor() as cur:
            cur.execute("SELECT IS_USED_LOCK(%s)", (f"backup-sidecar:{small}",))
            [(holder,)] = cur.fetchall()
            assert holder is not None, "the run holds its claim while it dumps"
            cur.execute(f"KILL {int(holder)}")
        time.sleep(2.5)  # the lease monitor probes every second
    finally:
        blocker.release()
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 1, err
    assert "the database lock claiming this slot was lost" in err and "hint:" in err, err
    new = [m for m in manifests(nas) if m["id"] not in before]
    assert [m["status"] for m in new] == ["failed"]
    assert not (nas / new[0]["artifact"]).exists()  # no partial or unpublished artifact left behind
    assert LEAST_PW not in out + err
