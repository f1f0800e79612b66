#!/usr/bin/env python3
"""Benchmark: point-in-time recovery's recovery point under a steady write load, and its recovery time against
restoring the latest dump of the same database, in one run.

1. A throwaway cluster (16 MiB WAL segments, the default) with a poorly compressible benchmark database.
2. `backup-sidecar run` with WAL_ARCHIVE=true into a NAS directory takes its base backup; a dump of the
   database is taken with `backup-sidecar backup`.
3. A steady writer commits rows (one per transaction) for --load-s seconds while /health's WAL age (the
   recovery point's age as the sidecar measures it) is sampled every 0.5 s.
4. The sidecar is then killed with SIGKILL (no last shipment: the crash case) while the writer goes on, and
   `restore-pitr --latest` shows the real recovery point: the newest recovered row against the newest row the
   source had committed at the kill.
5. Time to recover the database: `restore-pitr --time T` + starting the server until it promotes, against
   `backup-sidecar restore latest --create` of the dump (each timed end to end, from the same NAS directory).

    python scripts/bench_pitr.py --size-mb 200 --load-s 60 --partial-interval 10s
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg  # noqa: E402
from benchlib import REPO, database_size, print_table, psql, sidecar_env  # noqa: E402
from local_pg import free_port, start_cluster  # noqa: E402

from app.pitr import ScratchServer  # noqa: E402

DB = "bench_pitr"


def cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "app", *args], env=sidecar_env(env), cwd=REPO, capture_output=True,
                         text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"{args} failed: {out.stderr[-2000:]}")
    return out


def health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:  # noqa: S310
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())
    except OSError:
        return {}


def wait(pred, timeout: float, what: str, port: int) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(port)
        if h and pred(h):
            return h
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}: {json.dumps(health(port))[:2000]}")


def check(h: dict, name: str) -> dict:
    return next((c for c in h.get("checks", []) if c["name"] == name), {})


def build_database(cluster, size_mb: int) -> str:  # noqa: ANN001
    name = DB
    psql(cluster, "postgres", f"CREATE DATABASE {name}")
    psql(cluster, name, "CREATE TABLE payload (id bigint PRIMARY KEY, body text NOT NULL)")
    rows = size_mb * 1024 * 1024 // 400
    for start in range(0, rows, 100_000):
        psql(cluster, name, f"INSERT INTO payload SELECT g, encode(decode({' || '.join(['md5(random()::text)'] * 16)}"
                            f", 'hex'), 'base64') FROM generate_series({start + 1}, {min(start + 100_000, rows)}) g")
    psql(cluster, name, "CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT "
                        "clock_timestamp(), body text NOT NULL)")
    psql(cluster, name, "VACUUM ANALYZE")
    return name


class Writer(threading.Thread):
    def __init__(self, conninfo: dict, rate: int) -> None:
        super().__init__(daemon=True)
        self.conninfo, self.rate = conninfo, rate
        self.stop_event = threading.Event()
        self.rows = 0

    def run(self) -> None:
        with psycopg.connect(**self.conninfo, autocommit=True) as conn:
            while not self.stop_event.is_set():
                conn.execute("INSERT INTO events (body) SELECT encode(decode(md5(random()::text) || "
                             "md5(random()::text), 'hex'), 'base64') FROM generate_series(1, 20)")
                self.rows += 20
                time.sleep(20 / self.rate)


def start_recovered(data_dir: Path, user: str) -> tuple[float, object]:
    """Start a server on ``data_dir`` (the drill's throwaway server); seconds until it promoted, newest row."""
    t0 = time.monotonic()
    server = ScratchServer(data_dir.parent, data_dir, 15)
    server.start()
    try:
        with server.connect(user) as conn:
            while conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                time.sleep(0.1)
            seconds = time.monotonic() - t0
        with psycopg.connect(host=str(server.sock), port=server.port, user=user, dbname=DB, autocommit=True) as c:
            newest = c.execute("SELECT max(at) FROM events").fetchone()[0]
    finally:
        server.stop()
    return seconds, newest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=200)
    p.add_argument("--load-s", type=int, default=60)
    p.add_argument("--rate", type=int, default=400, help="rows per second of the steady writer")
    p.add_argument("--partial-interval", default="10s")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-pitr-"))
    work.chmod(0o755)
    cluster = start_cluster(secrets.token_hex(12), root=work / "pg",
                            settings="-c fsync=off -c max_wal_size=4GB -c shared_buffers=256MB")
    try:
        db = build_database(cluster, args.size_mb)
        size = database_size(cluster, db)
        port = free_port()
        env = {"POSTGRES_HOST": cluster.host, "POSTGRES_PORT": str(cluster.port), "POSTGRES_USER": cluster.user,
               "POSTGRES_PASSWORD": cluster.password, "POSTGRES_DB": db, "NAS_PATH": str(work / "nas"),
               "WAL_ARCHIVE": "true", "WAL_SPOOL_DIR": str(work / "spool"),
               "WAL_PARTIAL_INTERVAL": args.partial_interval, "HEALTH_PORT": str(port), "HEALTH_BIND": "127.0.0.1",
               "BACKUP_SCHEDULE": "03:00", "LOCK_FILE": str(work / "lock"), "LOG_LEVEL": "WARNING"}
        (work / "nas").mkdir()
        t0 = time.monotonic()
        run = subprocess.Popen([sys.executable, "-m", "app", "run"], env=sidecar_env(env), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda h: check(h, "base_backup").get("status") == "ok", 1800, "the base backup", port)
        base_s = time.monotonic() - t0
        t0 = time.monotonic()
        cli("backup", env=env)
        dump_s = time.monotonic() - t0

        conninfo = {"host": cluster.host, "port": cluster.port, "user": cluster.user, "password": cluster.password,
                    "dbname": db}
        writer = Writer(conninfo, args.rate)
        writer.start()
        ages: list[float] = []
        end = time.monotonic() + args.load_s
        target = None
        while time.monotonic() < end:
            ages.append(float(health(port).get("wal", {}).get("age_seconds", 0)))
            if target is None and end - time.monotonic() < args.load_s / 3:
                target = datetime.now(UTC)  # the point in time to recover to: two thirds into the load
            time.sleep(0.5)
        assert target is not None
        time.sleep(1)
        run.send_signal(signal.SIGKILL)  # the disaster: no shutdown, no last partial shipment
        run.wait()
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            crash_newest = conn.execute("SELECT max(at) FROM events").fetchone()[0]
        writer.stop_event.set()
        writer.join()

        lat_dir = work / "latest"
        cli("restore-pitr", "--to-dir", str(lat_dir), "--latest", env=env)
        _, recovered_newest = start_recovered(lat_dir, cluster.user)
        lost_s = (crash_newest - recovered_newest).total_seconds()
        shutil.rmtree(lat_dir)

        t0 = time.monotonic()
        pitr_dir = work / "pitr"
        cli("restore-pitr", "--to-dir", str(pitr_dir), "--time", target.astimezone(UTC).isoformat(), env=env)
        layout_s = time.monotonic() - t0
        replay_s, _ = start_recovered(pitr_dir, cluster.user)
        pitr_s = time.monotonic() - t0
        wal_mb = sum(f.stat().st_size for f in (pitr_dir / "pg_wal").iterdir() if f.is_file()) / 2**20

        t0 = time.monotonic()
        cli("restore", "latest", "--db", db, "--to-db", f"{db}_restored", "--create", "--yes", env=env)
        restore_s = time.monotonic() - t0
    finally:
        cluster.stop(remove=False)
        shutil.rmtree(work, ignore_errors=True)

    print(f"database {db}: {size / 2**20:.0f} MiB; steady load {args.rate} rows/s for {args.load_s}s; "
          f"WAL_PARTIAL_INTERVAL={args.partial_interval}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print()
    print_table(["recovery point (seconds behind)", "value"], [
        ["/health wal age: median", f"{statistics.median(ages):.1f}"],
        ["/health wal age: p95", f"{sorted(ages)[int(len(ages) * 0.95) - 1]:.1f}"],
        ["/health wal age: max", f"{max(ages):.1f}"],
        ["writes lost when the sidecar is SIGKILLed (restore-pitr --latest)", f"{lost_s:.1f}"],
    ])
    print()
    print_table(["recover the database", "seconds", "ratio"], [
        ["restore latest dump (backup-sidecar restore --create)", f"{restore_s:.1f}", "1.00"],
        ["restore-pitr --time T + server start until promoted", f"{pitr_s:.1f}", f"{pitr_s / restore_s:.2f}"],
        ["  of which: lay out + verify + fetch WAL", f"{layout_s:.1f}", ""],
        [f"  of which: replay {wal_mb:.0f} MiB of WAL and promote", f"{replay_s:.1f}", ""],
        ["(base backup of the cluster, for reference)", f"{base_s:.1f}", ""],
        ["(dump of the database, for reference)", f"{dump_s:.1f}", ""],
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
