"""Benchmark the other engines against their stock tools, in one run (ratios, not absolute numbers):

  MariaDB: `backup-sidecar backup` of a ~SIZE MB database (to a NAS directory: mariadb-dump -> zstd -3 ->
           SHA-256 -> file) vs `mariadb-dump --single-transaction DB | zstd -3 > /dev/null`.
  SQLite:  `backup-sidecar backup` of a ~SIZE MB file (snapshot copy -> zstd -3 -> SHA-256 -> file) vs
           `sqlite3 DB ".backup FILE"` (an uncompressed copy, the stock tool's whole job).
  Writers: the longest a writer's commit waited during the sidecar's SQLite backup, in WAL and in
           rollback-journal mode (the bound the README states).

Wall time, CPU (user+sys of the whole process tree) and peak RSS (the largest process of the tree).
Data persists under BENCH_ROOT between runs (building it takes a few minutes).

    python scripts/bench_engines.py [--size-mb 500]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import BENCH_ROOT, PASSWORD, print_table, sidecar_env  # noqa: E402
from local_mariadb import start_server  # noqa: E402


def measure(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of ``argv`` and everything it waited for."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed ({proc.returncode}): {err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def mariadb_database(size_mb: int) -> tuple[object, str]:
    server = start_server(PASSWORD, root=BENCH_ROOT / "mariadb", extra=("--innodb-buffer-pool-size=512M",))
    name = f"bench_{size_mb}mb"
    if not (BENCH_ROOT / f"{name}.mariadb-done").exists():  # built completely once, then kept
        server.as_root(f"DROP DATABASE IF EXISTS {name}")
        rows = size_mb * 1024 * 1024 // 360
        server.as_root(f"CREATE DATABASE {name}; CREATE TABLE {name}.payload (id BIGINT PRIMARY KEY, "
                       "body TEXT NOT NULL) ENGINE=InnoDB;")
        for start in range(0, rows, 200_000):
            server.as_root(f"INSERT INTO payload SELECT seq, TO_BASE64(RANDOM_BYTES(256)) "
                           f"FROM seq_{start + 1}_to_{min(start + 200_000, rows)};", name)
        (BENCH_ROOT / f"{name}.mariadb-done").touch()
    return server, name


def sqlite_database(size_mb: int) -> Path:
    path = BENCH_ROOT / f"bench_{size_mb}mb.sqlite"
    if not path.exists():
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("CREATE TABLE payload (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        rows = size_mb * 1024 * 1024 // 360
        conn.execute("BEGIN")
        import base64

        conn.executemany("INSERT INTO payload VALUES (?, ?)",
                         ((i, base64.b64encode(os.urandom(256)).decode()) for i in range(rows)))
        conn.execute("COMMIT")
        conn.close()
    return path


WRITER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=120, isolation_level=None)
conn.execute("PRAGMA busy_timeout = 120000")
worst, n = 0.0, 0
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    t0 = time.monotonic()
    conn.execute("BEGIN IMMEDIATE"); conn.execute("INSERT INTO writes (at) VALUES (?)", (t0,)); conn.execute("COMMIT")
    worst = max(worst, time.monotonic() - t0); n += 1
    time.sleep(0.005)
print(f"{worst:.3f} {n}", flush=True)
"""


def writer_wait(db: Path, mode: str, nas: Path, duration: float) -> tuple[float, int, float]:
    """The longest commit of a writer running through a sidecar backup of ``db`` in ``mode``."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode = {mode}")
    conn.execute("CREATE TABLE IF NOT EXISTS writes (id INTEGER PRIMARY KEY, at REAL)")
    conn.close()
    env = sidecar_env({"SQLITE_PATHS": str(db), "NAS_PATH": str(nas), "LOCK_FILE": str(nas / ".lock")})
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(duration)], stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "app", "backup"], env=env, check=True, capture_output=True)
    backup_s = time.monotonic() - t0
    worst, commits = writer.stdout.readline().split()
    writer.wait()
    return float(worst), int(commits), backup_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=500)
    args = p.parse_args()
    BENCH_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-engines-", dir=BENCH_ROOT))
    rows = []
    server, name = mariadb_database(args.size_mb)
    try:
        opt = work / "client.cnf"
        opt.write_text(f"[client]\nuser=backup\npassword={PASSWORD}\nhost=127.0.0.1\nport={server.port}\n")
        opt.chmod(0o600)
        ref = measure(["bash", "-o", "pipefail", "-c", f"mariadb-dump --defaults-file={opt} --single-transaction "
                       f"--routines --triggers --events --hex-blob {name} | zstd -3 -q > /dev/null"])
        nas = work / "nas-mariadb"
        nas.mkdir()
        env = sidecar_env({"MYSQL_HOST": "127.0.0.1", "MYSQL_PORT": str(server.port), "MYSQL_USER": "backup",
                           "MYSQL_PASSWORD": PASSWORD, "MYSQL_DATABASE": name, "NAS_PATH": str(nas),
                           "LOCK_FILE": str(work / "lock")})
        ours = measure([sys.executable, "-m", "app", "backup"], env)
        size = sum(f.stat().st_size for f in nas.rglob("*.zst"))
        rows += [("mariadb-dump | zstd -3 > /dev/null", *ref, "-"),
                 ("backup-sidecar backup (MariaDB)", *ours, f"{size / 2**20:.0f} MiB stored"),
                 ("  ratio", *(f"{o / r:.2f}x" for o, r in zip(ours, ref, strict=True)), "")]
    finally:
        server.stop(remove=False)
    db = sqlite_database(args.size_mb)
    copy = work / "stock.sqlite"
    ref = measure(["sqlite3", str(db), f".backup {copy}"])
    copy.unlink()
    nas = work / "nas-sqlite"
    nas.mkdir()
    env = sidecar_env({"SQLITE_PATHS": str(db), "NAS_PATH": str(nas), "LOCK_FILE": str(work / "lock")})
    ours = measure([sys.executable, "-m", "app", "backup"], env)
    size = sum(f.stat().st_size for f in nas.rglob("*.zst"))
    rows += [('sqlite3 DB ".backup FILE"', *ref, f"{db.stat().st_size / 2**20:.0f} MiB file"),
             ("backup-sidecar backup (SQLite)", *ours, f"{size / 2**20:.0f} MiB stored"),
             ("  ratio", *(f"{o / r:.2f}x" for o, r in zip(ours, ref, strict=True)), "")]
    print_table(["run", "wall s", "CPU s", "peak RSS MiB", "note"],
                [(r[0], *(f"{v:.2f}" if isinstance(v, float) else v for v in r[1:4]), r[4]) for r in rows])
    print()
    waits = []
    for mode in ("wal", "delete"):
        shutil.rmtree(nas)
        nas.mkdir()
        worst, commits, backup_s = writer_wait(db, mode, nas, ours[0] * 1.5 + 3)
        waits.append((mode, f"{backup_s:.1f}", commits, f"{worst * 1000:.0f}"))
    print_table(["journal mode", "backup s", "writer commits", "longest commit ms"], waits)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
