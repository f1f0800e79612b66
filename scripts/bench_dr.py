#!/usr/bin/env python3
"""Benchmark: disaster recovery of a cluster of many databases, and the drill RTO of the benchmark database.

1. A source cluster with ``--databases`` databases (each ``--tables`` tables of ``--rows`` rows, owned by
   a role of their own, with a grant to a reader role) is backed up with POSTGRES_DB=* and BACKUP_GLOBALS.
2. Into a new, empty cluster each time:
   - the stock way: ``psql -f globals.sql`` (without ON_ERROR_STOP, since ``role "postgres" already exists``
     would stop it), then ``zstd -dc X.dump.zst | pg_restore -C -d postgres`` for each database in turn;
   - ``backup-sidecar restore-cluster --yes`` with --jobs 1 and --jobs 4.
   Each is checked afterwards: every database present with its tables.
3. Drill RTO: ``verify --restore-test`` of the ``--size-mb`` benchmark database (the RTO its drill record
   says) against ``zstd -dc | pg_restore --single-transaction`` into a scratch database.

    python scripts/bench_dr.py --databases 30 --size-mb 200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ensure_database  # noqa: E402
from local_pg import Cluster, start_cluster  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "bench-dr-pw"


def psql(c: Cluster, db: str, sql: str, check: bool = True) -> str:
    return subprocess.run(["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", c.host, "-p", str(c.port),
                           "-U", c.user, "-d", db, "-c", sql], env={**os.environ, "PGPASSWORD": c.password},
                          capture_output=True, text=True, check=check).stdout.strip()


def sidecar(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run([sys.executable, "-m", "app", *args],
                          env={**base, "PYTHONPATH": str(REPO), "NAS_REQUIRE_MOUNT": "false", **env},
                          cwd=cwd, capture_output=True, text=True)


def cluster_env(c: Cluster, **extra: str) -> dict[str, str]:
    return {"POSTGRES_HOST": c.host, "POSTGRES_PORT": str(c.port), "POSTGRES_USER": c.user,
            "POSTGRES_PASSWORD": c.password, "LOCK_FILE": "/tmp/bench-dr.lock", **extra}


def build(c: Cluster, databases: int, tables: int, rows: int) -> list[str]:
    psql(c, "postgres", "CREATE ROLE reader NOLOGIN")
    names = []
    for i in range(databases):
        name, owner = f"app{i:02d}", f"owner{i:02d}"
        psql(c, "postgres", f"CREATE ROLE {owner} NOLOGIN")
        psql(c, "postgres", f"CREATE DATABASE {name} OWNER {owner}")
        psql(c, name, f"""SET ROLE {owner};
            DO $$BEGIN FOR t IN 1..{tables} LOOP
              EXECUTE format('CREATE TABLE t%s (id int PRIMARY KEY, v text)', t);
              EXECUTE format('INSERT INTO t%s SELECT g, md5(g::text) FROM generate_series(1, {rows}) g', t);
              EXECUTE format('GRANT SELECT ON t%s TO reader', t);
            END LOOP; END$$;""")
        names.append(name)
    return names


def check(c: Cluster, names: list[str], tables: int) -> str:
    bad = [n for n in names if psql(c, n, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                                    check=False) != str(tables)]
    return "all restored" if not bad else f"{len(bad)} incomplete ({', '.join(bad[:3])})"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--databases", type=int, default=30)
    ap.add_argument("--tables", type=int, default=20)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--size-mb", type=int, default=200, help="the drill benchmark database (default 200)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dr-"))
    nas = work / "nas"
    nas.mkdir()
    settings = "-c fsync=off -c full_page_writes=off -c synchronous_commit=off -c max_connections=60"
    source = start_cluster(PASSWORD, settings=settings)
    rows: list[tuple[str, float, str]] = []
    try:
        print(f"building {args.databases} databases ...", file=sys.stderr)
        names = build(source, args.databases, args.tables, args.rows)
        env = cluster_env(source, POSTGRES_DB="*", POSTGRES_DB_EXCLUDE="postgres", NAS_PATH=str(nas),
                          BACKUP_GLOBALS="true", BACKUP_CONCURRENCY="4", PRUNE_AFTER_BACKUP="false")
        backup_s, result = timed(lambda: sidecar(["backup"], env, work))
        assert result.returncode == 0, result.stderr  # type: ignore[attr-defined]

        def stock() -> str:
            target = start_cluster(PASSWORD, settings=settings)
            try:
                penv = {**os.environ, "PGHOST": target.host, "PGPORT": str(target.port), "PGUSER": target.user,
                        "PGPASSWORD": target.password}
                [glob] = nas.glob("_globals/*/*/*/*.sql.zst")
                t0 = time.monotonic()
                subprocess.run(f"zstd -dc {glob} | psql -X -q -d postgres", shell=True, env=penv,
                               capture_output=True, check=True)
                for name in names:
                    [dump] = nas.glob(f"{name}/*/*/*/*.dump.zst")
                    subprocess.run(f"set -o pipefail; zstd -dc {dump} | pg_restore -C -d postgres", shell=True,
                                   env=penv, executable="/bin/bash", check=True, capture_output=True)
                seconds = time.monotonic() - t0
                return f"{seconds:.2f}|{check(target, names, args.tables)}"
            finally:
                target.stop()

        def ours(jobs: int) -> str:
            target = start_cluster(PASSWORD, settings=settings)
            try:
                t0 = time.monotonic()
                out = sidecar(["restore-cluster", "--yes", "--jobs", str(jobs)],
                              cluster_env(target, NAS_PATH=str(nas)), work)
                seconds = time.monotonic() - t0
                verdict = check(target, names, args.tables) if out.returncode == 0 else f"exit {out.returncode}"
                return f"{seconds:.2f}|{verdict}"
            finally:
                target.stop()

        for label, fn in (("stock: psql globals + pg_restore -C loop", stock),
                          ("backup-sidecar restore-cluster --jobs 1", lambda: ours(1)),
                          ("backup-sidecar restore-cluster --jobs 4", lambda: ours(4))):
            seconds, verdict = str(fn()).split("|")
            rows.append((label, float(seconds), verdict))

        print(f"building the {args.size_mb} MB drill database ...", file=sys.stderr)
        drill_db = ensure_database(source, args.size_mb)
        denv = cluster_env(source, POSTGRES_DB=drill_db, NAS_PATH=str(nas), PRUNE_AFTER_BACKUP="false")
        sidecar(["backup", "--force"], denv, work)
        [dump] = sorted(nas.glob(f"{drill_db}/*/*/*/*.dump.zst"))[-1:]
        penv = {**os.environ, "PGHOST": source.host, "PGPORT": str(source.port), "PGUSER": source.user,
                "PGPASSWORD": source.password}
        psql(source, "postgres", "CREATE DATABASE drill_baseline TEMPLATE template0")
        base_s, _ = timed(lambda: subprocess.run(
            f"set -o pipefail; zstd -dc {dump} | pg_restore --single-transaction -d drill_baseline", shell=True,
            env=penv, executable="/bin/bash", check=True))
        psql(source, "postgres", "DROP DATABASE drill_baseline")
        out = sidecar(["verify", "latest", "--db", drill_db, "--restore-test"], denv, work)
        assert out.returncode == 0, out.stdout + out.stderr
        [record] = [json.loads(p.read_text()) for p in nas.glob(f"{drill_db}/*/*/*/*.drill-*.json")]
    finally:
        source.stop()
        shutil.rmtree(work, ignore_errors=True)

    base = rows[0][1]
    print(f"disaster recovery: {args.databases} databases x {args.tables} tables x {args.rows} rows "
          f"(+ globals), backed up in {backup_s:.1f}s")
    print(f"{'method':<45} {'seconds':>8} {'vs stock':>9}  result")
    for label, seconds, verdict in rows:
        print(f"{label:<45} {seconds:>8.2f} {seconds / base:>8.2f}x  {verdict}")
    print(f"\ndrill of {drill_db} ({args.size_mb} MB)")
    print(f"{'method':<45} {'seconds':>8} {'vs stock':>9}")
    print(f"{'stock: zstd -dc | pg_restore --single-transaction':<45} {base_s:>8.2f} {1:>8.2f}x")
    rto = float(record["rto_s"])
    print(f"{'drill RTO (verify --restore-test record)':<45} {rto:>8.2f} {rto / base_s:>8.2f}x  "
          f"{record['compared']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
