"""/health latency under load while a large backup runs in the same process.

    python scripts/bench_health.py [--size-mb 500] [--rate 200] [--seconds 30] [--dsn postgresql://...]

Starts `backup-sidecar run` against a database of ``--size-mb`` MB of poorly compressible rows (the
persistent benchmark cluster of scripts/benchlib.py, or ``--dsn``), with a NAS directory and/or moto's S3
server as targets (``--targets``): first idle, then with BACKUP_ON_START, restarted on fresh targets until
backups have run for ``--seconds`` while /health is asked ``--rate`` times a second, open loop. Latency is
measured two ways: from sending the request (service time) and from when it was due (includes queueing in
this client, so a stalled server cannot hide behind a slow client). Only answers that say a backup is
running count as "during backup". Target: p99 < 20 ms during backups.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import REPO, bench_cluster, cluster_env, database_size, ensure_database, print_table, s3_server
from local_pg import free_port


@dataclass
class Sample:
    service_ms: float
    due_ms: float
    running: bool
    ok: bool


@dataclass
class Load:
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    backup_over: bool = False  # an answer said no backup runs any more


def hammer(port: int, rate: float, seconds: float, workers: int = 16, until_backup_ends: bool = False) -> list[Sample]:
    """Open-loop load: request i is due at start + i/rate, whatever happened to earlier ones.

    With ``until_backup_ends`` the load also stops at the first answer that says no backup is running.
    """
    due: queue.Queue[float | None] = queue.Queue()
    load = Load()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while (when := due.get()) is not None:
            sent = time.monotonic()
            ok, running = False, False
            try:
                conn.request("GET", "/health")
                resp = conn.getresponse()
                body = resp.read()
                ok = resp.status in (200, 503)
                running = json.loads(body).get("running") is not None
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            done = time.monotonic()
            with load.lock:
                load.samples.append(Sample((done - sent) * 1000, (done - when) * 1000, running, ok))
                load.backup_over = load.backup_over or (ok and not running)
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    start = time.monotonic()
    total = int(rate * seconds)
    for i in range(total):
        if until_backup_ends and load.backup_over:
            break
        when = start + i / rate
        delay = when - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        due.put(when)
    for _ in threads:
        due.put(None)
    for t in threads:
        t.join(30)
    return load.samples


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] if ordered else float("nan")


@contextmanager
def sidecar(env: dict[str, str], port: int, log: Path) -> Iterator[None]:
    """`backup-sidecar run` answering /health on ``port``; always stopped on the way out."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "run"],
        env={
            **keep,
            "PYTHONPATH": str(REPO),
            "HEALTH_BIND": "127.0.0.1",
            "HEALTH_PORT": str(port),
            "PRUNE_AFTER_BACKUP": "false",
            **env,
        },
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/health")
                conn.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the sidecar did not answer /health: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_running(port: int, want: bool, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        if (json.loads(conn.getresponse().read()).get("running") is not None) == want:
            return
        time.sleep(0.05)
    raise SystemExit(f"the backup did not {'start' if want else 'end'}: {log.read_text()[-3000:]}")


def row(name: str, samples: list[Sample]) -> tuple[object, ...]:
    service = [s.service_ms for s in samples]
    due = [s.due_ms for s in samples]
    errors = sum(not s.ok for s in samples)
    return (
        name,
        len(samples),
        errors,
        f"{pct(service, 50):.1f}",
        f"{pct(service, 99):.1f}",
        f"{max(service, default=float('nan')):.1f}",
        f"{pct(due, 50):.1f}",
        f"{pct(due, 99):.1f}",
    )


def run(args: argparse.Namespace, db_env: dict[str, str], size_mb: float) -> None:
    """Idle once; then backups one after another (fresh targets each round) until the window is covered."""
    work = Path(tempfile.mkdtemp(prefix="bench-health-"))
    targets = set(args.targets.split(","))
    rows = []
    during: list[Sample] = []
    after: list[Sample] = []
    backups: list[str] = []
    with s3_server() as s3:

        def settings(round_: int) -> dict[str, str]:
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            s3.client().make_bucket(bucket)
            nas = work / f"nas-{round_}"
            nas.mkdir()
            return {
                **db_env,
                **(s3.env(bucket) if "s3" in targets else {}),
                **({"NAS_PATH": str(nas)} if "nas" in targets else {}),
                "LOCK_FILE": str(work / "lock"),
            }

        port = free_port()
        with sidecar(settings(0), port, work / "idle.log"):
            rows.append(row("idle", hammer(port, args.rate, min(args.seconds, 10))))
        window = args.rate * args.seconds
        round_ = 0
        while len(during) < window and round_ < 20:
            round_ += 1
            port = free_port()
            log = work / f"busy-{round_}.log"
            with sidecar({**settings(round_), "BACKUP_ON_START": "true"}, port, log):
                wait_running(port, True, 60, log)
                remaining = (window - len(during)) / args.rate
                samples = hammer(port, args.rate, remaining, until_backup_ends=True)
                during += [x for x in samples if x.running]
                after += [x for x in samples if not x.running]
                wait_running(port, False, 3600, log)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                last = json.loads(conn.getresponse().read()).get("last_run") or {}
                backups.append(f"{last.get('status', '?')} in {last.get('duration_s', '?')} s")
    shutil.rmtree(work, ignore_errors=True)
    rows.append(row("during backup", during))
    rows.append(row("between backups", after))
    print()
    print(
        f"database {size_mb:.0f} MB; targets {args.targets}; {args.rate:.0f} requests/s; "
        f"{len(during) / args.rate:.0f} s under backup; backups: {', '.join(backups)}"
    )
    print_table(("phase", "requests", "errors", "p50 ms", "p99 ms", "max ms", "p50 due ms", "p99 due ms"), rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=500, help="database size to build and back up (500)")
    p.add_argument("--rate", type=float, default=200, help="/health requests per second (200)")
    p.add_argument("--seconds", type=float, default=30, help="seconds of load while backups run (30)")
    p.add_argument("--targets", default="nas,s3", help="nas, s3 or nas,s3 (moto's S3 server) (nas,s3)")
    p.add_argument("--dsn", help="back up this database instead of the benchmark cluster (BACKUP_DATABASE_URL)")
    args = p.parse_args()
    if args.dsn:
        run(args, {"BACKUP_DATABASE_URL": args.dsn}, float("nan"))
        return 0
    with bench_cluster() as cluster:
        print(f"preparing the {args.size_mb} MB database (reused between runs) ...", file=sys.stderr)
        db = ensure_database(cluster, args.size_mb)
        run(args, cluster_env(cluster, db), database_size(cluster, db) / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
