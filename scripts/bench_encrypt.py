#!/usr/bin/env python3
"""The cost of encryption at rest: backup-sidecar backup and restore with and without BACKUP_ENCRYPT_RECIPIENTS,
on the same database and NAS directory in one run; then backups to a NAS directory and S3 (moto's server) with
no copy, every copy, and only the S3 copy encrypted (BACKUP_ENCRYPT_TARGETS=s3: two stored streams at once).

    python scripts/bench_encrypt.py [--size-mb 500] [--repeat 2]

Each method runs --repeat times, alternating; the fastest run is shown: wall seconds, CPU seconds of the
sidecar and all its children (pg_dump, age, pg_restore; from wait4) and the sidecar's peak RSS. Target: the
encrypted backup and restore at most 1.1x the wall time of the plain ones, and the same for the backup with
only the S3 copy encrypted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (
    PeakRss,
    bench_cluster,
    cluster_env,
    database_size,
    ensure_database,
    print_table,
    psql,
    s3_server,
    sidecar_env,
)


def run_cli(args: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Wall s, CPU s (process + children) and peak RSS MB of one `python -m app ...`."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "app", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    rss = PeakRss(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    peak = rss.stop()
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args} failed: {err}")
    return wall, usage.ru_utime + usage.ru_stime, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    for tool in ("age", "age-keygen", "pg_dump", "pg_restore"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (scripts/setup.sh installs it)")
    work = Path(tempfile.mkdtemp(prefix="bench-encrypt-"))
    results: dict[str, list[tuple[float, float, float]]] = {}
    try:
        key = work / "key.txt"
        subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
        public = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True,
                                text=True).stdout.strip()
        with bench_cluster() as cluster, s3_server() as s3:
            print(f"preparing the {args.size_mb} MB database (reused between runs) ...", file=sys.stderr)
            db = ensure_database(cluster, args.size_mb)
            size = database_size(cluster, db)
            base = sidecar_env({**cluster_env(cluster, db), "NAS_REQUIRE_MOUNT": "false",
                                "LOCK_FILE": str(work / "lock"), "AGE_IDENTITY_FILE": str(key)})
            modes = {"plain": {}, "age": {"BACKUP_ENCRYPT_RECIPIENTS": public}}
            for i in range(args.repeat):
                for mode, extra in modes.items():
                    nas = work / f"nas-{mode}-{i}"
                    nas.mkdir()
                    env = {**base, **extra, "NAS_PATH": str(nas)}
                    results.setdefault(f"backup {mode}", []).append(run_cli(["backup"], env))
                    psql(cluster, "postgres", "DROP DATABASE IF EXISTS bench_enc_dst WITH (FORCE)")
                    results.setdefault(f"restore {mode}", []).append(run_cli(
                        ["restore", "latest", "--db", db, "--to-db", "bench_enc_dst", "--create", "--yes"], env))
                    shutil.rmtree(nas, ignore_errors=True)
            psql(cluster, "postgres", "DROP DATABASE IF EXISTS bench_enc_dst WITH (FORCE)")
            client = s3.client()
            two = {"nas+s3 plain": {}, "nas+s3 age": {"BACKUP_ENCRYPT_RECIPIENTS": public},
                   "nas+s3 age s3 only": {"BACKUP_ENCRYPT_RECIPIENTS": public, "BACKUP_ENCRYPT_TARGETS": "s3"}}
            for i in range(args.repeat):
                for n, (mode, extra) in enumerate(two.items()):
                    nas, bucket = work / f"nas2-{n}-{i}", f"bench-enc-{n}-{i}"
                    nas.mkdir()
                    client.make_bucket(bucket)
                    env = {**base, **extra, "NAS_PATH": str(nas), **s3.env(bucket)}
                    results.setdefault(f"backup {mode}", []).append(run_cli(["backup"], env))
                    for obj in client.list_objects(bucket, recursive=True):  # moto holds objects in memory
                        client.remove_object(bucket, obj.object_name)
                    client.remove_bucket(bucket)
                    shutil.rmtree(nas, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {name: min(runs) for name, runs in results.items()}
    print(f"\ndatabase {size / 2**20:.0f} MiB, NAS target, fastest of {args.repeat} run(s) each\n")
    print_table(["method", "wall s", "CPU s", "peak RSS MB"],
                [(name, f"{w:.1f}", f"{c:.1f}", f"{r:.0f}") for name, (w, c, r) in best.items()])
    print()
    rows = []
    for step in ("backup", "restore"):
        (w0, c0, r0), (w1, c1, r1) = best[f"{step} plain"], best[f"{step} age"]
        rows.append((step, f"{w1 / w0:.2f}x", f"{c1 / c0:.2f}x", f"{r1 / r0:.2f}x", "<= 1.10x"))
    (w0, c0, r0) = best["backup nas+s3 plain"]
    for mode in ("nas+s3 age", "nas+s3 age s3 only"):
        w1, c1, r1 = best[f"backup {mode}"]
        rows.append((f"backup {mode.removeprefix('nas+s3 ')} (nas+s3)", f"{w1 / w0:.2f}x", f"{c1 / c0:.2f}x",
                     f"{r1 / r0:.2f}x", "<= 1.10x"))
    print_table(["step", "wall age/plain", "CPU age/plain", "RSS age/plain", "target (wall)"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
