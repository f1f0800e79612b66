"""Backup throughput and memory: backup-sidecar against the pipe limit and the temp-file approach.

    python scripts/bench_backup.py [--sizes 500,1000]

For each database size (MB of poorly compressible rows) it measures, in one run:
  (a) pg_dump -Fc -Z0 | zstd -3 > /dev/null        the limit
  (b) the same into a temp file, then upload it      what most backup images do (minio fput_object)
  (c) backup-sidecar backup to S3                    (moto's S3 server in its own process)
  (d) backup-sidecar backup to a NAS directory
and prints wall seconds, MB/s (database size / wall), the peak RSS of the process doing the work, and the
temporary disk used. The upload of (b) is also shown alone: it is the S3 server's own ingest rate,
the floor for any streamed upload (moto, the stand-in here, is far slower than MinIO).
Targets: (c) within 1.3x of (a) and faster than (b); no temp disk; peak RSS at most 2 x part size + 64 MB
(16 MiB first parts -> 96 MB), the same within 10% for the database twice as large.
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


def timed(argv: list[str], env: dict[str, str], shell: bool = False) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a command."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv if not shell else argv[0], env=env, shell=shell)  # noqa: S602 - fixed bench pipeline
    rss = PeakRss(proc.pid)
    if proc.wait() != 0:
        raise SystemExit(f"benchmark step failed: {argv}")
    return time.monotonic() - t0, rss.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="500,1000", help="database sizes in MB, comma separated")
    args = p.parse_args()
    rows = []
    with bench_cluster() as cluster, s3_server() as s3:
        client = s3.client()
        for size in [int(s) for s in args.sizes.split(",")]:
            print(f"preparing the {size} MB database (reused between runs) ...", file=sys.stderr)
            db = ensure_database(cluster, size)
            mb = database_size(cluster, db) / 1e6
            pgenv = {**os.environ, "PGPASSWORD": cluster.password}
            dump = f"pg_dump -Fc -Z0 -h {cluster.host} -p {cluster.port} -U {cluster.user} {db}"

            wall_a, _ = timed([f"{dump} | zstd -3 -q > /dev/null"], pgenv, shell=True)
            rows.append((f"{size}", "(a) pg_dump | zstd > /dev/null", f"{wall_a:.1f}", f"{mb / wall_a:.0f}", "-", "0"))

            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            client.make_bucket(bucket)
            tmpdir = Path(tempfile.mkdtemp(prefix="bench-tmpfile-"))
            tmpfile = tmpdir / "dump.zst"
            dump_s, _ = timed([f"{dump} | zstd -3 -q > {tmpfile}"], pgenv, shell=True)
            upload_s, rss_b = timed([sys.executable, "-c", UPLOAD_SNIPPET, s3.endpoint, bucket, str(tmpfile)], pgenv)
            wall_b = dump_s + upload_s
            temp_mb = tmpfile.stat().st_size / 1e6
            shutil.rmtree(tmpdir)
            rows.append((f"{size}", "(b) temp file, then upload", f"{wall_b:.1f}", f"{mb / wall_b:.0f}",
                         f"{rss_b:.0f}", f"{temp_mb:.0f}"))
            rows.append((f"{size}", "    of which the upload alone", f"{upload_s:.1f}", f"{mb / upload_s:.0f}", "",
                         ""))

            env = sidecar_env({**cluster_env(cluster, db), **s3.env(bucket)})
            wall_c, rss_c = timed([sys.executable, "-m", "app", "backup", "--force"], env)
            rows.append((f"{size}", "(c) backup-sidecar -> S3", f"{wall_c:.1f}", f"{mb / wall_c:.0f}", f"{rss_c:.0f}",
                         "0"))

            nas = Path(tempfile.mkdtemp(prefix="bench-nas-"))
            env = sidecar_env({**cluster_env(cluster, db), "NAS_PATH": str(nas)})
            wall_d, rss_d = timed([sys.executable, "-m", "app", "backup", "--force"], env)
            shutil.rmtree(nas)
            rows.append((f"{size}", "(d) backup-sidecar -> NAS", f"{wall_d:.1f}", f"{mb / wall_d:.0f}",
                         f"{rss_d:.0f}", "0"))
            floor = max(wall_a, upload_s)  # a stream can go no faster than its slower end
            rows.append((f"{size}", "    (c)/(a)  (c)/(b)  (c)/max(a, upload)", f"{wall_c / wall_a:.2f}x",
                         f"{wall_c / wall_b:.2f}x", f"{wall_c / floor:.2f}x", ""))
            rows.append((f"{size}", "    (d)/(a)", f"{wall_d / wall_a:.2f}x", "", "", ""))
    print()
    print_table(("DB MB", "method", "wall s", "MB/s", "peak RSS MB", "temp disk MB"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
