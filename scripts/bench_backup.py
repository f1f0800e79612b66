"""Backup throughput, CPU and memory: backup-sidecar against the stock streaming pipeline, the pipe limit and
the temp-file approach, on the same S3 server in the same run.

    pip install awscli        # for (e); the benchmark only, not a dependency of the sidecar
    python scripts/bench_backup.py [--sizes 700,1400] [--repeat 2]

For each database size (MB of poorly compressible rows; the default is the benchmark database and one twice
its size) it measures, in one run:
  (a) pg_dump -Fc -Z0 | zstd -3 > /dev/null                       the limit
  (b) the same into a temp file, then upload it (minio fput_object) what most backup images do
  (c) backup-sidecar backup to S3                                 (moto's S3 server in its own process)
  (d) backup-sidecar backup to a NAS directory
  (e) pg_dump -Fc -Z0 | zstd -3 -T2 | aws s3 cp - s3://...         the stock streaming pipeline, same server
and prints wall seconds, client CPU seconds (every process of the method, pg_dump included, from wait4), the
peak RSS of the processes doing the work besides pg_dump (the sidecar; zstd + aws for the pipelines) and the
temporary disk used. (c) and (e) run --repeat times, alternating; the fastest run of each is shown.
Targets: (c) wall at most 1.0x (e), client CPU at most 0.85x (e), peak RSS at most the part memory in use
(two parts) + 64 MB and flat (within 10%) as the database doubles.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    PeakRss,
    bench_cluster,
    cluster_env,
    database_size,
    ensure_database,
    print_table,
    s3_server,
    sidecar_env,
)

UPLOAD_SNIPPET = """
import sys
from minio import Minio
c = Minio(sys.argv[1], "bench", "bench-secret", secure=False, region="us-east-1")
c.fput_object(sys.argv[2], "tempfile-upload.dump.zst", sys.argv[3])
"""
MB = 1e6
PART_MEMORY_IN_USE_MB = 2 * 16 * 1024 * 1024 / MB  # two 16 MiB parts: what a database of these sizes gets


@dataclass
class Run:
    wall: float
    cpu: float  # user + system seconds of every process, children included
    rss: float  # MB, the peak of the processes doing the work (pg_dump excluded)


def _reap(proc: subprocess.Popen) -> float:
    """Wait for ``proc`` and return its CPU seconds, including the children it waited for."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed ({proc.returncode}): {proc.args}")
    return usage.ru_utime + usage.ru_stime


def run_pipeline(stages: list[list[str]], env: dict[str, str], out: Path | None = None) -> Run:
    """``stages`` as a pipe (stdout of one into stdin of the next); peak RSS over all stages but the first."""
    t0 = time.monotonic()
    procs: list[subprocess.Popen] = []
    sink = open(out or os.devnull, "wb")  # noqa: SIM115 - closed below
    for i, argv in enumerate(stages):
        last = i == len(stages) - 1
        procs.append(subprocess.Popen(argv, env=env, stdin=procs[-1].stdout if procs else subprocess.DEVNULL,
                                      stdout=sink if last else subprocess.PIPE))
        if i:
            procs[-2].stdout.close()  # type: ignore[union-attr] - only the next stage holds the pipe
    peaks = [PeakRss(p.pid) for p in procs[1:]]
    cpu = sum(_reap(p) for p in procs)
    wall = time.monotonic() - t0
    sink.close()
    return Run(wall, cpu, sum(p.stop() for p in peaks))


def run_sidecar(env: dict[str, str]) -> Run:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "app", "backup", "--force"], env=env)
    rss = PeakRss(proc.pid)
    cpu = _reap(proc)
    return Run(time.monotonic() - t0, cpu, rss.stop())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="700,1400", help="database sizes in MB, comma separated")
    p.add_argument("--repeat", type=int, default=2, help="runs of (c) and (e) each, alternating")
    args = p.parse_args()
    aws = shutil.which("aws")
    if aws is None:
        raise SystemExit("the stock pipeline (e) needs the AWS CLI: pip install awscli")
    rows, ratios = [], []
    sidecar_rss: list[float] = []
    with bench_cluster() as cluster, s3_server() as s3:
        client = s3.client()
        for size in [int(s) for s in args.sizes.split(",")]:
            print(f"preparing the {size} MB database (reused between runs) ...", file=sys.stderr)
            db = ensure_database(cluster, size)
            mb = database_size(cluster, db) / MB
            pgenv = {**os.environ, "PGPASSWORD": cluster.password}
            dump = ["pg_dump", "-Fc", "-Z0", "-h", cluster.host, "-p", str(cluster.port), "-U", cluster.user, db]

            a = run_pipeline([dump, ["zstd", "-3", "-q"]], pgenv)
            rows.append((f"{size}", "(a) pg_dump | zstd -3 > /dev/null", f"{a.wall:.1f}", f"{mb / a.wall:.0f}",
                         f"{a.cpu:.1f}", f"{a.rss:.0f}", "0"))

            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            client.make_bucket(bucket)
            tmpdir = Path(tempfile.mkdtemp(prefix="bench-tmpfile-"))
            tmpfile = tmpdir / "dump.zst"
            b1 = run_pipeline([dump, ["zstd", "-3", "-q"]], pgenv, out=tmpfile)
            b2 = run_pipeline([["true"], [sys.executable, "-c", UPLOAD_SNIPPET, s3.endpoint, bucket, str(tmpfile)]],
                              pgenv)
            temp_mb = tmpfile.stat().st_size / MB
            shutil.rmtree(tmpdir)
            wall_b = b1.wall + b2.wall
            rows.append((f"{size}", "(b) temp file, then upload", f"{wall_b:.1f}", f"{mb / wall_b:.0f}",
                         f"{b1.cpu + b2.cpu:.1f}", f"{max(b1.rss, b2.rss):.0f}", f"{temp_mb:.0f}"))
            rows.append((f"{size}", "    of which the upload alone", f"{b2.wall:.1f}", f"{mb / b2.wall:.0f}", "", "",
                         ""))
            _empty(client, bucket)

            awsenv = {**pgenv, "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                      "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
            stock = [dump, ["zstd", "-3", "-T2", "-q"],
                     [aws, "s3", "cp", "-", f"s3://{bucket}/stock.dump.zst", "--endpoint-url", f"http://{s3.endpoint}",
                      "--only-show-errors"]]
            env = sidecar_env({**cluster_env(cluster, db), **s3.env(bucket)})
            c_runs, e_runs = [], []
            for _ in range(args.repeat):
                e_runs.append(run_pipeline(stock, awsenv))
                _empty(client, bucket)
                c_runs.append(run_sidecar(env))
                _empty(client, bucket)
            c = min(c_runs, key=lambda r: r.wall)
            e = min(e_runs, key=lambda r: r.wall)
            sidecar_rss.append(max(r.rss for r in c_runs))
            rows.append((f"{size}", "(c) backup-sidecar -> S3", f"{c.wall:.1f}", f"{mb / c.wall:.0f}", f"{c.cpu:.1f}",
                         f"{max(r.rss for r in c_runs):.0f}", "0"))
            rows.append((f"{size}", "(e) pg_dump | zstd -T2 | aws s3 cp -", f"{e.wall:.1f}", f"{mb / e.wall:.0f}",
                         f"{e.cpu:.1f}", f"{max(r.rss for r in e_runs):.0f}", "0"))

            nas = Path(tempfile.mkdtemp(prefix="bench-nas-"))
            env = sidecar_env({**cluster_env(cluster, db), "NAS_PATH": str(nas), "NAS_REQUIRE_MOUNT": "false"})
            d = run_sidecar(env)
            shutil.rmtree(nas)
            rows.append((f"{size}", "(d) backup-sidecar -> NAS", f"{d.wall:.1f}", f"{mb / d.wall:.0f}", f"{d.cpu:.1f}",
                         f"{d.rss:.0f}", "0"))
            ratios.append((f"{size}", f"{c.wall / e.wall:.2f}x", f"{c.cpu / e.cpu:.2f}x",
                           f"{max(r.rss for r in c_runs):.0f} / {PART_MEMORY_IN_USE_MB + 64:.0f}",
                           f"{c.wall / a.wall:.2f}x", f"{c.wall / wall_b:.2f}x", f"{d.wall / a.wall:.2f}x"))
    print()
    print_table(("DB MB", "method", "wall s", "MB/s", "CPU s", "peak RSS MB", "temp disk MB"), rows)
    print()
    print_table(("DB MB", "wall (c)/(e)", "CPU (c)/(e)", "RSS (c) / 2 parts+64MB", "(c)/(a)", "(c)/(b)",
                 "(d)/(a)"), ratios)
    if len(sidecar_rss) > 1:
        print(f"\npeak RSS of (c), largest / smallest database: {sidecar_rss[-1] / sidecar_rss[0]:.2f}x")
    return 0


def _empty(client, bucket: str) -> None:  # noqa: ANN001 - minio.Minio
    """Drop what a step uploaded: moto keeps objects in memory, and the next step must not pay for them."""
    for obj in client.list_objects(bucket, recursive=True):
        client.remove_object(bucket, obj.object_name)


if __name__ == "__main__":
    sys.exit(main())
