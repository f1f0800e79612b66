"""SQLITE_PATHS end to end: backups of files an application keeps writing, in WAL and rollback-journal mode,
through both targets; restores with the stock sqlite3 CLI and with `restore`, which refuses a file held open."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Cli, S3Server, require_tool

#: A writer process: each transaction inserts the next id and sets the counter to it, as fast as it can.
WRITER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
conn.execute("PRAGMA busy_timeout = 60000")
n = conn.execute("SELECT value FROM counter").fetchone()[0]
print("ready", flush=True)
while True:
    n += 1
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO events (id, payload) VALUES (?, ?)", (n, "x" * 200))
    conn.execute("UPDATE counter SET value = ?", (n,))
    conn.execute("COMMIT")
"""


def make_db(path: Path, mode: str, rows: int = 20000) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode = {mode}")
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
    conn.execute("CREATE TABLE counter (value INTEGER NOT NULL)")
    conn.execute("CREATE INDEX events_payload ON events (payload)")
    conn.execute("CREATE VIEW recent AS SELECT * FROM events WHERE id > 10")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO events VALUES (?, ?)", ((i, "seed " * 40) for i in range(1, rows + 1)))
    conn.execute("INSERT INTO counter VALUES (?)", (rows,))
    conn.execute("COMMIT")
    conn.close()


def start_writer(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    return proc


def manifests(nas: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(nas.rglob("*.manifest.json"))]


def assert_consistent_prefix(path: Path, at_least: int) -> int:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        count, low, high = conn.execute("SELECT count(*), min(id), max(id) FROM events").fetchone()
        [(counter,)] = conn.execute("SELECT value FROM counter").fetchall()
    finally:
        conn.close()
    assert (low, high, count) == (1, counter, counter)  # every write up to the counter, none after it
    assert counter >= at_least
    return counter


@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_backup_under_a_writer_restores_a_consistent_prefix_with_stock_sqlite3_and_restore(
        cli: Cli, s3: S3Server, bucket: str, nas: Path, tmp_path: Path, mode: str) -> None:
    sqlite3_cli = require_tool("sqlite3", "sqlite3")
    data = tmp_path / "app"
    data.mkdir()
    db = data / "workshop.sqlite"
    make_db(db, mode)
    env = {"SQLITE_PATHS": str(db), "NAS_PATH": str(nas), **s3.env(bucket)}
    writer = start_writer(db)
    try:
        result = cli.run("backup", env=env, check=True)
        time.sleep(0.3)
        assert writer.poll() is None  # the writer was never failed by a lock it waited too long for
    finally:
        writer.terminate()
        writer.wait()
    [m] = manifests(nas)
    assert m["status"] == "ok" and m["engine"] == "sqlite" and m["artifact"].endswith(".sqlite.zst")
    assert m["position"]["journal_mode"] == mode and m["position"]["snapshot_s"] >= 0
    assert m["contents"]["objects"] == {"tables": 2, "indexes": 1, "views": 1, "triggers": 0}
    assert "workshop-" in result.stdout

    stock = tmp_path / "stock.sqlite"
    with open(stock, "wb") as out:
        subprocess.run(["zstd", "-dc", str(nas / m["artifact"])], stdout=out, check=True)
    check = subprocess.run([sqlite3_cli, str(stock), "PRAGMA integrity_check;"], capture_output=True, text=True)
    assert check.stdout.strip() == "ok"
    prefix = assert_consistent_prefix(stock, 20000)
    assert m["contents"]["rows"] == {"events": prefix, "counter": 1}

    for source in ("nas", "s3"):
        copy = tmp_path / f"copy-{source}.sqlite"
        cli.run("restore", "latest", "--to-db", str(copy), "--create", "--yes", "--from", source, env=env,
                check=True)
        assert assert_consistent_prefix(copy, 20000) == prefix
    verify = cli.run("verify", "--restore-test", env=env, check=True)
    assert "integrity_check ok" in verify.stdout and "SQLite image complete" in verify.stdout


def test_restore_refuses_a_file_held_open_unless_forced_and_replaces_it_atomically(
        cli: Cli, nas: Path, tmp_path: Path) -> None:
    db = tmp_path / "app.sqlite"
    make_db(db, "wal", rows=100)
    env = {"SQLITE_PATHS": f"shop={db}", "NAS_PATH": str(nas)}
    cli.run("backup", env=env, check=True)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("INSERT INTO events VALUES (101, 'after the backup')")
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); "
                               "c.execute('SELECT 1 FROM events').fetchall(); print('open', flush=True); "
                               "time.sleep(600)", str(db)], stdout=subprocess.PIPE, text=True)
    conn.close()
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        refused = cli.run("restore", "latest", "--to-db", "shop", "--clean", "--yes", env=env)
        assert refused.returncode == 1 and "is open" in refused.stderr and "--force" in refused.stderr
        assert f"pid {holder.pid}" in refused.stderr
        assert sqlite3.connect(db).execute("SELECT count(*) FROM events").fetchone() == (101,)
        forced = cli.run("restore", "latest", "--to-db", "shop", "--clean", "--yes", "--force", env=env, check=True)
        assert "restart that application" in forced.stdout
    finally:
        holder.kill()
        holder.wait()
    assert sqlite3.connect(db).execute("SELECT count(*) FROM events").fetchone() == (100,)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".app")) == []


def test_damaged_backup_never_replaces_the_file(cli: Cli, nas: Path, tmp_path: Path) -> None:
    db = tmp_path / "app.sqlite"
    make_db(db, "delete", rows=500)
    env = {"SQLITE_PATHS": str(db), "NAS_PATH": str(nas)}
    cli.run("backup", env=env, check=True)
    [m] = manifests(nas)
    stored = nas / m["artifact"]
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    before = db.read_bytes()
    result = cli.run("restore", "latest", "--to-db", str(db), "--clean", "--yes", env=env)
    assert result.returncode == 1 and "was not touched" in result.stderr and "hint:" in result.stderr
    assert db.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if ".bs-restore-" in p.name] == []
    bad = cli.run("verify", env=env)
    assert bad.returncode == 1 and "FAILED" in bad.stdout


def test_missing_sqlite_file_fails_with_hint_and_a_failed_manifest(cli: Cli, nas: Path, tmp_path: Path) -> None:
    result = cli.run("backup", env={"SQLITE_PATHS": str(tmp_path / "nope.sqlite"), "NAS_PATH": str(nas)})
    assert result.returncode == 1 and "does not exist" in result.stderr and "SQLITE_PATHS" in result.stderr
    [m] = manifests(nas)
    assert m["status"] == "failed" and "hint:" in m["error"]
