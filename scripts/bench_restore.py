#!/usr/bin/env python3
"""Benchmark: `backup-sidecar restore` from S3 against `zstd -dc FILE | pg_restore` from a local file.

Builds a poorly compressible database (base64 of SHA-512 output: zstd saves ~25%), backs it up to an S3
server (moto's, in its own process) with the sidecar, downloads the artifact to a local file for the
baseline, then restores it both ways into empty databases, alternating, and prints a table. The sidecar
path does more work on purpose (S3 download, SHA-256, held-back tail, one transaction); the goal is to
stay within 1.2x of the stock pipeline.

Uses POSTGRES_HOST/PORT/USER/PASSWORD when POSTGRES_HOST is set, else starts a throwaway cluster from the
installed server binaries (as root it runs them as the postgres user). Example:

    python scripts/bench_restore.py --size-mb 500 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import s3_server  # noqa: E402  (scripts/ is on sys.path when run as a script)
from local_pg import start_cluster  # noqa: E402

from app.cancel import CancelToken  # noqa: E402
from app.durations import format_size  # noqa: E402
from app.pgdump import backup_database  # noqa: E402
from app.restore import restore  # noqa: E402
from app.settings import Settings, load_settings  # noqa: E402
from app.targets import make_targets  # noqa: E402
from app.targets.s3 import S3Target  # noqa: E402

ROW_BYTES = 8 * 88  # eight base64-encoded SHA-512 digests per row


@contextmanager
def postgres() -> Iterator[dict[str, str]]:
    """POSTGRES_* settings of the server to use: the environment's, or a throwaway cluster's."""
    if os.environ.get("POSTGRES_HOST"):
        yield {k: v for k, v in os.environ.items() if k.startswith("POSTGRES_")}
        return
    cluster = start_cluster(secrets.token_hex(12), settings="-c fsync=off -c full_page_writes=off "
                            "-c synchronous_commit=off -c max_wal_size=4GB")
    try:
        yield {"POSTGRES_HOST": cluster.host, "POSTGRES_PORT": str(cluster.port), "POSTGRES_USER": cluster.user,
               "POSTGRES_PASSWORD": cluster.password}
    finally:
        cluster.stop()


def psql(env: dict[str, str], dbname: str, sql: str) -> str:
    return subprocess.run(["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", dbname, "-c", sql], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


def libpq_env(pg: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "PGHOST": pg["POSTGRES_HOST"], "PGPORT": pg["POSTGRES_PORT"],
            "PGUSER": pg["POSTGRES_USER"], "PGPASSWORD": pg["POSTGRES_PASSWORD"]}


def fill(env: dict[str, str], size_mb: int) -> None:
    rows = size_mb * 1024 * 1024 // ROW_BYTES
    psql(env, "postgres", "DROP DATABASE IF EXISTS bench_src")
    psql(env, "postgres", "CREATE DATABASE bench_src")
    digests = " || ".join(f"sha512((g * 8 + {i})::text::bytea)" for i in range(8))
    psql(env, "bench_src", "CREATE TABLE blob (id int PRIMARY KEY, payload text NOT NULL); "
                           f"INSERT INTO blob SELECT g, encode({digests}, 'base64') FROM generate_series(1, {rows}) g")


def timed(fn: Callable[[], None]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=500, help="table size to generate (default 500)")
    ap.add_argument("--repeat", type=int, default=1, help="restores per method; the median is shown")
    args = ap.parse_args()
    for tool in ("zstd", "pg_restore", "psql"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    work = Path(tempfile.mkdtemp(prefix="bench-restore-"))
    try:
        with postgres() as pg, s3_server() as s3_process:
            endpoint = s3_process.endpoint
            env = libpq_env(pg)
            settings: Settings = load_settings({
                **pg, "POSTGRES_DB": "bench_src", "S3_ENDPOINT": f"http://{endpoint}", "S3_BUCKET": "bench",
                "S3_ACCESS_KEY_ID": "bench", "S3_SECRET_ACCESS_KEY": "bench-secret", "S3_REGION": "us-east-1",
                "LOCK_FILE": str(work / "lock"),
            })
            targets = make_targets(settings)
            s3 = targets[0]
            assert isinstance(s3, S3Target)
            s3.client.make_bucket("bench")
            print(f"generating ~{args.size_mb} MB of poorly compressible rows ...", file=sys.stderr)
            fill_s = timed(lambda: fill(env, args.size_mb))
            db_size = int(psql(env, "bench_src", "SELECT pg_database_size(current_database())"))
            t0 = time.monotonic()
            manifest = backup_database(settings, targets, "bench_src", CancelToken())
            backup_s = time.monotonic() - t0
            local = work / Path(manifest.artifact).name
            with s3.open(manifest.artifact) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
            stored = local.stat().st_size

            def baseline(dbname: str, single: bool) -> Callable[[], None]:
                flags = "--single-transaction " if single else ""
                cmd = f"set -o pipefail; zstd -dc {local} | pg_restore --no-password {flags}--dbname={dbname}"
                return lambda: subprocess.run(["bash", "-c", cmd], env=env, check=True)

            def ours(dbname: str) -> Callable[[], None]:
                def run() -> None:
                    restore(settings, targets, manifest.id, dbname, yes=True, source="s3", progress=False)

                return run

            methods: dict[str, Callable[[str], Callable[[], None]]] = {
                "zstd -dc FILE | pg_restore (local file)": lambda db: baseline(db, False),
                "zstd -dc FILE | pg_restore --single-transaction": lambda db: baseline(db, True),
                "backup-sidecar restore --from s3 (moto)": ours,
            }
            times: dict[str, list[float]] = {name: [] for name in methods}
            for _ in range(args.repeat):
                for name, make in methods.items():
                    psql(env, "postgres", "DROP DATABASE IF EXISTS bench_dst WITH (FORCE)")
                    psql(env, "postgres", "CREATE DATABASE bench_dst TEMPLATE template0")
                    times[name].append(timed(make("bench_dst")))
            psql(env, "postgres", "DROP DATABASE IF EXISTS bench_dst WITH (FORCE)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(times["zstd -dc FILE | pg_restore (local file)"])
    print(f"database {format_size(db_size)}, artifact {format_size(stored)} (zstd custom, "
          f"{db_size / stored:.2f}x), generated in {fill_s:.1f}s, backed up to S3 in {backup_s:.1f}s")
    print(f"{'method':<50} {'seconds':>8} {'MiB/s':>8} {'vs baseline':>12}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<50} {med:>8.1f} {stored / med / 2**20:>8.1f} {med / base:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
