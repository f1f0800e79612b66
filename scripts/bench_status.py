"""Status page and /api/v1 latency with a year of daily history for ten databases, idle and during a backup.

    python scripts/bench_status.py [--days 365] [--databases 10] [--size-mb 300] [--rate 40] [--seconds 20]
                                   [--targets nas|s3|nas,s3]

Plants ``--days`` daily backups (every 9th failed, some drilled) of ``--databases`` databases on the targets,
then starts `backup-sidecar run` on them: first idle, then with BACKUP_ON_START backing up the databases (one of
``--size-mb`` MB of poorly compressible rows from scripts/benchlib.py, the others small; restarted until the
backups have run for ``--seconds``) while the page, each
API endpoint and /health (the reference, measured in the same run) are asked ``--rate`` times a second in all,
open loop, round robin. Latency is service time (send to last byte). Only requests sent while /health says a
backup runs count as "during backup". Target: the page under 100 ms (p99), also during a backup.
Also prints what the background model build costs (in this process, from the same planted targets).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench_health import pct, sidecar
from benchlib import (
    REPO,
    S3Process,
    bench_cluster,
    cluster_env,
    database_size,
    ensure_database,
    print_table,
    psql,
    s3_server,
)
from local_pg import free_port

sys.path.insert(0, str(REPO))
from app import layout  # noqa: E402
from app.manifest import Manifest  # noqa: E402

ENDPOINTS = ("/health", "/", "/?days=365", "/api/v1/status", "/api/v1/backups", "/api/v1/runs")


@dataclass
class Sample:
    path: str
    sent: float
    service_ms: float
    ok: bool
    size: int


def plant(names: list[str], days: int, nas: Path | None, s3: S3Process | None, bucket: str | None) -> int:
    """Daily backups of each name: manifests and artifacts in the layout, every 9th failed, every 30th drilled."""
    client = s3.client() if s3 is not None else None
    now = datetime.now(UTC).replace(microsecond=0)
    count = 0

    def put(key: str, data: bytes) -> None:
        if nas is not None:
            path = nas / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if client is not None:
            client.put_object(bucket, key, io.BytesIO(data), len(data))

    for name in names:
        for i in range(1, days + 1):
            started = now - timedelta(days=i, hours=1)
            ok = i % 9 != 4
            data = os.urandom(200 + i % 97)
            m = Manifest(id=layout.backup_id(name, started), status="ok" if ok else "failed", database=name,
                         started_at=started, finished_at=started + timedelta(seconds=30 + i % 40), host="bench",
                         format="custom", compression="zstd", artifact=layout.artifact_key(name, started, "dump.zst"),
                         size_bytes=len(data) if ok else 0, sha256=hashlib.sha256(data).hexdigest() if ok else None,
                         error=None if ok else "pg_dump: error: connection to server failed")
            if ok:
                put(m.artifact, data)
                if i % 30 == 0:
                    at = started + timedelta(hours=2)
                    record = {"backup_id": m.id, "database": name, "status": "ok", "rto_s": 12.5,
                              "started_at": at.strftime("%Y-%m-%dT%H:%M:%SZ")}
                    put(layout.drill_key(m.id, at), json.dumps(record).encode())
            put(layout.manifest_key(name, started), m.to_json())
            count += 1
    return count


class Client:
    """Open-loop load: request i is due at start + i/rate, whatever happened to earlier ones."""

    def __init__(self, port: int, workers: int = 8) -> None:
        self.port = port
        self.workers = workers

    def run(self, rate: float, seconds: float, stop: threading.Event | None = None) -> list[Sample]:
        due: queue.Queue[tuple[float, str] | None] = queue.Queue()
        samples: list[Sample] = []
        lock = threading.Lock()

        def worker() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            while (item := due.get()) is not None:
                _, path = item
                sent = time.monotonic()
                ok, size = False, 0
                try:
                    conn.request("GET", path)
                    resp = conn.getresponse()
                    body = resp.read()
                    ok, size = resp.status in (200, 503), len(body)
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                with lock:
                    samples.append(Sample(path, sent, (time.monotonic() - sent) * 1000, ok, size))
            conn.close()

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            if stop is not None and stop.is_set():
                break
            when = start + i / rate
            if (delay := when - time.monotonic()) > 0:
                time.sleep(delay)
            due.put((when, ENDPOINTS[i % len(ENDPOINTS)]))
        for _ in threads:
            due.put(None)
        for t in threads:
            t.join(30)
        return samples


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


class RunningWatch:
    """Polls /health every 0.1 s and keeps the intervals in which a backup ran."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.intervals: list[list[float]] = []
        self.ended = threading.Event()
        self.started = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                running = get_json(self.port, "/health").get("running") is not None
            except (OSError, ValueError):
                running = False
            if running and (not self.intervals or self.intervals[-1][1] >= 0):
                self.intervals.append([now, -1.0])
                self.started.set()
            elif not running and self.intervals and self.intervals[-1][1] < 0:
                self.intervals[-1][1] = now
                self.ended.set()
            time.sleep(0.1)

    def during(self, at: float) -> bool:
        return any(a <= at and (b < 0 or at <= b) for a, b in self.intervals)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def rows(phase: str, samples: list[Sample]) -> list[tuple[object, ...]]:
    reference = pct([s.service_ms for s in samples if s.path == "/health"], 99)
    out = []
    for path in ENDPOINTS:
        mine = [s for s in samples if s.path == path]
        service = [s.service_ms for s in mine]
        p99 = pct(service, 99)
        out.append((phase, path, len(mine), sum(not s.ok for s in mine), f"{pct(service, 50):.1f}", f"{p99:.1f}",
                    f"{max(service, default=float('nan')):.1f}", f"{p99 / reference:.2f}" if reference else "-",
                    f"{max((s.size for s in mine), default=0) / 1024:.0f}"))
    return out


def model_build_ms(env: dict[str, str], repeat: int = 3) -> tuple[float, float]:
    """The background build (app.status.model.build) and one /health payload, in this process."""
    from app.health import HealthMonitor
    from app.settings import load_settings
    from app.status.model import build
    from app.targets import make_targets

    settings = load_settings(env)
    monitor = HealthMonitor(settings, make_targets(settings), watch_loop=False, read_server=False)
    monitor.refresh_all(wait=600)
    t0 = time.perf_counter()
    for _ in range(repeat):
        build(monitor)
    built = (time.perf_counter() - t0) / repeat * 1000
    t0 = time.perf_counter()
    for _ in range(repeat):
        monitor.payload()
    return built, (time.perf_counter() - t0) / repeat * 1000


def run(args: argparse.Namespace, cluster_env_: dict[str, str], names: list[str], size_mb: float) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-status-"))
    targets = set(args.targets.split(","))
    with s3_server() as s3:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3.client().make_bucket(bucket)
        nas = work / "nas"
        nas.mkdir()
        t0 = time.monotonic()
        planted = plant(names, args.days, nas if "nas" in targets else None, s3 if "s3" in targets else None, bucket)
        print(f"planted {planted} backups of {len(names)} databases in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        env = {**cluster_env_, "POSTGRES_DB": ",".join(names), "LOCK_FILE": str(work / "lock"),
               "NAS_REQUIRE_MOUNT": "false", "BACKUP_KEEP_DAILY": str(args.days + 2), "BACKUP_SCHEDULE": "03:00",
               **(s3.env(bucket) if "s3" in targets else {}), **({"NAS_PATH": str(nas)} if "nas" in targets else {})}
        built_ms, payload_ms = model_build_ms(env)
        results = []
        port = free_port()
        with sidecar({"LOG_LEVEL": "WARNING", **env}, port, work / "idle.log"):
            wait_loaded(port, planted)
            results += rows("idle", Client(port).run(args.rate, args.seconds))
        during: list[Sample] = []
        backups: list[str] = []
        for round_ in range(1, 11):  # backups one after another until the window is covered
            port = free_port()
            log = work / f"busy-{round_}.log"
            with sidecar({"LOG_LEVEL": "WARNING", **env, "BACKUP_ON_START": "true"}, port, log):
                watch = RunningWatch(port)
                if not watch.started.wait(60):
                    raise SystemExit(f"the backup did not start: {log.read_text()[-3000:]}")
                wait_loaded(port, planted)
                remaining = max(1.0, args.seconds - len(during) / args.rate)
                samples = Client(port).run(args.rate, remaining, stop=watch.ended)
                watch.ended.wait(3600)
                watch.stop()
                during += [s for s in samples if watch.during(s.sent)]
                last = get_json(port, "/health")["databases"][names[0]]["last_run"]
                backups.append(f"{last['status']} in {last['duration_s']:.0f} s")
            if len(during) >= args.rate * args.seconds:
                break
        ran = ", ".join(backups)
        results += rows("during backup", during)
    shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{len(names)} databases x {args.days} days = {planted} backups on {args.targets}; backed up: "
          f"{names[0]} ({size_mb:.0f} MB: {ran}) and {len(names) - 1} small ones; {args.rate:.0f} requests/s "
          f"round robin over {len(ENDPOINTS)} endpoints; {len(during)} requests during the backup")
    print(f"model build (background, after each target read): {built_ms:.0f} ms; one /health payload: "
          f"{payload_ms:.1f} ms (in this process)")
    print_table(("phase", "endpoint", "requests", "errors", "p50 ms", "p99 ms", "max ms", "p99 / /health p99",
                 "KiB"), results)


def wait_loaded(port: int, planted: int, timeout: float = 600) -> None:
    """Until the cache (and the model) hold every planted backup."""
    deadline = time.monotonic() + timeout
    while get_json(port, "/api/v1/backups?limit=1")["total"] < planted:
        if time.monotonic() > deadline:
            raise SystemExit("the sidecar never listed the planted backups")
        time.sleep(0.5)


def small_databases(cluster, count: int) -> list[str]:  # noqa: ANN001 - local_pg.Cluster
    names = [f"bench_status_{i:02d}" for i in range(1, count + 1)]
    for name in names:
        if psql(cluster, "postgres", f"SELECT 1 FROM pg_database WHERE datname = '{name}'") != "1":
            psql(cluster, "postgres", f"CREATE DATABASE {name}")
            psql(cluster, name, "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 1000) g")
    return names


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--days", type=int, default=365, help="days of daily history per database (365)")
    p.add_argument("--databases", type=int, default=10, help="databases with history (10)")
    p.add_argument("--size-mb", type=int, default=300, help="size of the database backed up during the load (300)")
    p.add_argument("--rate", type=float, default=40, help="requests per second over all endpoints (40)")
    p.add_argument("--seconds", type=float, default=20, help="seconds of load per phase (20)")
    p.add_argument("--targets", default="nas", help="nas, s3 or nas,s3 (moto's S3 server) (nas)")
    args = p.parse_args()
    with bench_cluster() as cluster:
        print(f"preparing the {args.size_mb} MB database (reused between runs) ...", file=sys.stderr)
        big = ensure_database(cluster, args.size_mb)
        names = [big, *small_databases(cluster, args.databases - 1)]
        env = cluster_env(cluster, big)
        run(args, env, names, database_size(cluster, big) / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
