"""Shared pieces of the benchmark scripts: a persistent benchmark cluster, a poorly compressible database,
an S3 server process, peak-RSS sampling and table printing. Benchmarks print tables; they are not tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_pg import Cluster, free_port, start_cluster, wait_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BENCH_ROOT = Path(os.environ.get("BENCH_ROOT", "/tmp/backup-sidecar-bench"))
PASSWORD = "bench-" + "pw"


@contextmanager
def bench_cluster() -> Iterator[Cluster]:
    """A cluster whose data survives between runs (building 500 MB of random rows takes a while)."""
    cluster = start_cluster(PASSWORD, root=BENCH_ROOT / "pg", settings="-c fsync=off -c shared_buffers=256MB")
    try:
        yield cluster
    finally:
        cluster.stop(remove=False)


def psql(cluster: Cluster, db: str, sql: str) -> str:
    return subprocess.run(
        ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", cluster.host, "-p", str(cluster.port), "-U",
         cluster.user, "-d", db, "-c", sql],
        env={**os.environ, "PGPASSWORD": cluster.password}, capture_output=True, text=True, check=True,
    ).stdout.strip()


def ensure_database(cluster: Cluster, size_mb: int) -> str:
    """A database of about ``size_mb`` MB of base64 random text (compresses ~1.3x, unlike pgbench padding)."""
    name = f"bench_{size_mb}mb"
    if psql(cluster, "postgres", f"SELECT 1 FROM pg_database WHERE datname = '{name}'") != "1":
        psql(cluster, "postgres", f"CREATE DATABASE {name}")
        psql(cluster, name, "CREATE TABLE payload (id bigint PRIMARY KEY, body text NOT NULL) "
                            "WITH (toast_tuple_target = 8160)")
        psql(cluster, name, "ALTER TABLE payload ALTER COLUMN body SET STORAGE EXTERNAL")
        rows = size_mb * 1024 * 1024 // 360  # 256 random bytes -> 344 base64 chars + row overhead
        batch = 200_000
        for start in range(0, rows, batch):
            psql(cluster, name, f"""
                INSERT INTO payload
                SELECT g, encode(decode({' || '.join(['md5(random()::text)'] * 16)}, 'hex'), 'base64')
                FROM generate_series({start + 1}, {min(start + batch, rows)}) g""")
        psql(cluster, name, "VACUUM ANALYZE payload")
    return name


def database_size(cluster: Cluster, name: str) -> int:
    return int(psql(cluster, name, "SELECT pg_database_size(current_database())"))


def cluster_env(cluster: Cluster, db: str) -> dict[str, str]:
    return {"POSTGRES_HOST": cluster.host, "POSTGRES_PORT": str(cluster.port), "POSTGRES_USER": cluster.user,
            "POSTGRES_PASSWORD": cluster.password, "POSTGRES_DB": db}


@dataclass
class S3Process:
    endpoint: str
    access_key: str = "bench"
    secret_key: str = "bench-secret"

    def env(self, bucket: str) -> dict[str, str]:
        return {"S3_ENDPOINT": f"http://{self.endpoint}", "S3_BUCKET": bucket, "S3_ACCESS_KEY_ID": self.access_key,
                "S3_SECRET_ACCESS_KEY": self.secret_key, "S3_REGION": "us-east-1"}

    def client(self):  # noqa: ANN201 - minio.Minio
        from minio import Minio

        return Minio(self.endpoint, self.access_key, self.secret_key, secure=False, region="us-east-1")


@contextmanager
def s3_server() -> Iterator[S3Process]:
    """moto's S3 server in its own process (MinIO cannot be installed here); speaks real S3 over HTTP."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    try:
        yield S3Process(f"127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(10)


class PeakRss:
    """Samples a process's VmHWM (its own peak RSS, children excluded) until it exits."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while True:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except (OSError, ValueError):
                return
            time.sleep(0.05)

    def stop(self) -> float:
        self._thread.join(timeout=2)
        return self.peak_kb / 1024


def sidecar_env(extra: dict[str, str]) -> dict[str, str]:
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    # NAS_REQUIRE_MOUNT=false: the benchmarks' NAS directories are scratch directories on the local disk
    return {**keep, "PYTHONPATH": str(REPO), "LOG_LEVEL": "WARNING", "PRUNE_AFTER_BACKUP": "false",
            "NAS_REQUIRE_MOUNT": "false", **extra}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
