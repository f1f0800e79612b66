"""`backup-sidecar run` as a real process: /health while idle and during a backup, schedules, SIGTERM."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import CANARY, Cli, PgServer, S3Server, free_port

from app import layout
from app.manifest import Manifest
from app.runtime import _STOP, Runtime
from app.settings import load_settings
from app.targets import make_targets
from app.targets.base import Target

HOUR = 3600


def plant(
    target: Target,
    db: str,
    age_s: float,
    *,
    error: str | None = None,
    data: bytes = b"\x28\xb5" * 500,
    duration_s: int = 42,
) -> Manifest:
    """A backup (artifact + manifest) that finished ``age_s`` ago, written through the Target API."""
    finished = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=age_s)
    started = finished - timedelta(seconds=duration_s)
    ok = error is None
    m = Manifest(
        id=layout.backup_id(db, started),
        status="ok" if ok else "failed",
        database=db,
        started_at=started,
        finished_at=finished,
        host="planted",
        format="custom",
        compression="zstd",
        artifact=layout.artifact_key(db, started, layout.artifact_ext("custom", "zstd")),
        size_bytes=len(data) if ok else 0,
        sha256=hashlib.sha256(data).hexdigest() if ok else None,
        error=error,
    )
    if ok:
        target.put_bytes(m.artifact, data)
    target.put_bytes(layout.manifest_key(db, started), m.to_json())
    return m


def nas_target(nas: Path) -> Target:
    return make_targets(load_settings({"NAS_PATH": str(nas)}))[0]


class Sidecar:
    """A running `python -m app run`, its log in a file (a pipe nobody reads would block it)."""

    def __init__(self, cli: Cli, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log_path = cli.cwd / f"sidecar-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "run"],
            env={**cli.base_env(), "HEALTH_BIND": "127.0.0.1", "HEALTH_PORT": str(self.port), **env},
            cwd=cli.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.returncode: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:  # noqa: S310 - local test server
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def health(self, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
        status, body = self.get("/health", timeout)
        return status, json.loads(body)

    def wait_for(self, what: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        """Poll /health until ``pred(payload)``; fail with the log when the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited {self.proc.returncode} waiting for {what}:\n{self.log()}")
            with contextlib.suppress(OSError):
                _, last = self.health()
                if pred(last):
                    return last
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last /health {last}\n{self.log()}")

    def wait_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the log:\n{self.log()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> float:
        """Send ``sig`` and return seconds until exit; the exit code lands in ``returncode``."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"sidecar still running {timeout}s after {sig}:\n{self.log()}") from None
        self.returncode = self.proc.returncode
        self._log.close()
        assert CANARY not in self.log()
        return time.monotonic() - t0


def sidecars(cli: Cli) -> Iterator[Callable[[dict[str, str]], Sidecar]]:
    """Body of a ``sidecar`` fixture: a starter of sidecars, each killed at teardown if still running."""
    started: list[Sidecar] = []

    def start(env: dict[str, str]) -> Sidecar:
        s = Sidecar(cli, env)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


@pytest.fixture
def sidecar(cli: Cli) -> Iterator[Callable[[dict[str, str]], Sidecar]]:
    yield from sidecars(cli)


@contextlib.contextmanager
def table_locked(pg: PgServer, dbname: str, table: str = "t") -> Iterator[None]:
    """Hold ACCESS EXCLUSIVE on ``table`` in another session, so pg_dump blocks until the block ends."""
    with pg.connect(dbname) as conn:
        conn.autocommit = False
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.rollback()


def wait_for_early_minute(latest_second: int = 45) -> None:
    """Start near a minute's beginning, so processes started together compute the same slot."""
    while datetime.now(UTC).second >= latest_second:
        time.sleep(0.2)


def small_db(pg: PgServer) -> str:
    name = pg.create_db()
    pg.psql(
        name,
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, md5(g::text) FROM "
        "generate_series(1, 1000) g;",
    )
    return name


def wait_pg_dump_blocked(pg: PgServer, dbname: str, timeout: float = 30) -> None:
    """Until a pg_dump session of the sidecar waits for a lock in ``dbname``."""
    deadline = time.monotonic() + timeout
    with pg.connect() as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                (dbname,),
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.1)
    raise AssertionError("pg_dump never blocked on the table lock")


def manifests(root: Path) -> list[Manifest]:
    return [Manifest.from_json(p.read_bytes()) for p in sorted(root.rglob("*.manifest.json"))]


def artifacts(root: Path) -> list[Path]:
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(".manifest.json") and not p.name.startswith(".")
    ]


def test_run_serves_health_and_exits_at_once_on_sigterm_when_idle(sidecar, nas: Path) -> None:
    s = sidecar({"NAS_PATH": str(nas), "BACKUP_SCHEDULE": "03:00", "POSTGRES_PASSWORD": CANARY})
    doc = s.wait_for("a verdict", lambda d: "status" in d, timeout=30)
    assert doc["next_run_at"].endswith("T03:00:00Z")
    assert {c["name"] for c in doc["checks"]} >= {"scheduler", "backup_age", "target:nas"}
    assert "next backup at" in s.log()
    assert s.stop() < 3
    assert s.returncode == 0
    assert "SIGTERM received: stopping" in s.log()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_sidecar_does_not_spin(sidecar, nas: Path) -> None:
    """Idle means idle: no busy loop in the scheduler, the HTTP server or the health refresher."""
    s = sidecar({"NAS_PATH": str(nas)})
    s.wait_for("a verdict", lambda d: "status" in d, timeout=30)
    time.sleep(1)
    before = _cpu_seconds(s.proc.pid)
    time.sleep(3)
    used = _cpu_seconds(s.proc.pid) - before
    s.stop()
    assert used < 0.3, f"{used:.2f} s of CPU in 3 s of idling"


def test_sigint_stops_like_sigterm(sidecar, nas: Path) -> None:
    s = sidecar({"NAS_PATH": str(nas)})
    s.wait_for("a verdict", lambda d: "status" in d, timeout=30)
    assert s.stop(signal.SIGINT) < 3
    assert s.returncode == 0


def test_backup_on_start_makes_a_backup_then_health_is_ok(sidecar, pg: PgServer, nas: Path) -> None:
    db = small_db(pg)
    s = sidecar(pg.env(POSTGRES_DB=db, NAS_PATH=str(nas), BACKUP_ON_START="true"))
    doc = s.wait_for("the first backup", lambda d: d["status"] == "ok" and d["last_success"], timeout=60)
    assert doc["last_success"]["id"].startswith(f"{db}-")
    assert doc["last_run"]["status"] == "ok"
    (m,) = manifests(nas)
    assert m.ok and m.slot and m.slot.endswith("Z") and len(m.slot) == len("2026-11-22T03:00Z")
    s.wait_log("next backup at", timeout=10)
    assert s.log().count("next backup at") >= 2  # at start and after the run
    s.stop()
    assert s.returncode == 0


def test_scheduled_slot_fires_a_backup_with_the_slot_in_its_manifest(sidecar, pg: PgServer, nas: Path) -> None:
    db = small_db(pg)
    s = sidecar(pg.env(POSTGRES_DB=db, NAS_PATH=str(nas), BACKUP_SCHEDULE="every 5s"))
    s.wait_for("a scheduled backup", lambda d: d["last_success"] is not None, timeout=40)
    s.stop()
    (m,) = [m for m in manifests(nas) if m.ok][:1]
    fired = datetime.strptime(m.slot or "", "%Y-%m-%dT%H:%MZ").replace(tzinfo=UTC)
    assert 0 <= (m.started_at - fired).total_seconds() < 70
    assert "scheduled backup for slot" in s.log()


def test_overrunning_backup_skips_slots_instead_of_piling_up(sidecar, pg: PgServer, nas: Path) -> None:
    db = small_db(pg)
    wait_for_early_minute(40)  # a new minute would be a new slot, and rightly a second backup
    with table_locked(pg, db):
        s = sidecar(pg.env(POSTGRES_DB=db, NAS_PATH=str(nas), BACKUP_SCHEDULE="every 1s", BACKUP_ON_START="true"))
        wait_pg_dump_blocked(pg, db)
        s.wait_log("is still running", timeout=10)
        time.sleep(1.5)
    s.wait_for("the backup to finish", lambda d: d["last_success"] is not None, timeout=30)
    _, metrics = s.get("/metrics")
    s.stop()
    ok = [m for m in manifests(nas) if m.ok]
    assert len(ok) == 1, "slots due during the backup must not queue more backups"
    overruns = [
        line
        for line in metrics.decode().splitlines()
        if line.startswith('backup_sidecar_skips_total{reason="overrun"}')
    ]
    assert overruns and float(overruns[0].split()[-1]) >= 2


def test_sigterm_during_backup_interrupts_it_cleanly(
    sidecar, pg: PgServer, nas: Path, s3: S3Server, bucket: str
) -> None:
    db = small_db(pg)
    with table_locked(pg, db):
        s = sidecar(pg.env(POSTGRES_DB=db, NAS_PATH=str(nas), BACKUP_ON_START="true", **s3.env(bucket)))
        wait_pg_dump_blocked(pg, db)
        doc = s.wait_for("a running backup", lambda d: d["running"] is not None, timeout=10)
        status, _ = s.health()
        assert status in (200, 503) and doc["checks"]
        elapsed = s.stop()
    assert elapsed < 10
    assert s.returncode == 0
    (m,) = manifests(nas)
    assert m.status == "failed" and "interrupted" in (m.error or "")
    assert artifacts(nas) == [], "no partial or final artifact may remain"
    keys = s3.keys(bucket)
    assert [k for k in keys if not k.endswith(".manifest.json")] == []
    assert len(keys) == 1
    assert s3.client.list_objects(bucket, recursive=True) is not None
    incomplete = s3.client._list_multipart_uploads(bucket).uploads
    assert not incomplete
    assert "pg_dump interrupted: SIGTERM received" in s.log()


def test_busy_health_port_is_one_clear_error(cli: Cli, nas: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli.run(
            "run",
            env={"NAS_PATH": str(nas), "HEALTH_BIND": "127.0.0.1", "HEALTH_PORT": str(port)},
            timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "hint: set HEALTH_PORT" in result.stderr


def _runtime(tmp_path: Path, schedule: str) -> Runtime:
    return Runtime(load_settings({"NAS_PATH": str(tmp_path), "BACKUP_SCHEDULE": schedule, "TZ": "UTC"}))


@pytest.mark.parametrize(
    ("schedule", "expected", "noticed", "slot"),
    [
        ("03:00", "2026-11-22T03:00:00Z", "2026-11-22T03:00:00Z", "2026-11-22T03:00Z"),
        ("03:00", "2026-11-22T03:00:00Z", "2026-11-22T03:00:59Z", "2026-11-22T03:00Z"),  # a slow tick
        ("every 1m", "2026-11-22T03:00:00Z", "2026-11-22T03:02:10Z", "2026-11-22T03:02Z"),  # loop was stalled
        ("every 6h", "2026-11-22T06:00:00Z", "2026-11-22T06:00:00Z", "2026-11-22T06:00Z"),
    ],
)
def test_slot_is_the_scheduled_fire_time_not_when_the_loop_noticed(
    tmp_path: Path, schedule: str, expected: str, noticed: str, slot: str
) -> None:
    rt = _runtime(tmp_path, schedule)
    rt._expected = datetime.fromisoformat(expected)
    assert rt.slot_due(datetime.fromisoformat(noticed)) == slot


def test_slot_of_a_non_aligned_interval_is_the_current_minute(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, "every 7h")
    assert rt.slot_due(datetime(2026, 11, 22, 3, 4, 59, tzinfo=UTC)) == "2026-11-22T03:04Z"


def test_job_listeners_get_every_finished_job(tmp_path: Path, pg: PgServer) -> None:
    """Listeners run on their own thread with the JobResult (here: a job whose database is unreachable)."""
    env = {
        "NAS_PATH": str(tmp_path),
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(free_port()),
        "POSTGRES_CONNECT_TIMEOUT": "2",
        "LOCK_FILE": str(tmp_path / "lock"),
    }
    rt = Runtime(load_settings(env))
    seen: list[Any] = []
    rt.on_job_start.append(seen.append)
    rt.on_job.append(seen.append)
    import threading

    events = threading.Thread(target=rt._dispatch_events, daemon=True)
    events.start()
    assert rt.launch("2026-11-22T03:00Z", "test")
    rt._worker.join(30)  # type: ignore[union-attr]
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    rt._events.put(_STOP)
    started, result = seen
    assert started == "2026-11-22T03:00Z"
    assert not result.ok and result.failures[0].status == "failed"
    assert result.slot == "2026-11-22T03:00Z"
    assert os.path.exists(tmp_path / "lock")


def test_prune_after_backup_applies_retention_under_the_same_lock(cli: Cli, pg: PgServer, nas: Path) -> None:
    db = small_db(pg)
    old = plant(nas_target(nas), db, age_s=40 * 24 * HOUR)
    policy = {"BACKUP_KEEP_DAILY": "1", "BACKUP_KEEP_WEEKLY": "0", "BACKUP_KEEP_MONTHLY": "0", "BACKUP_KEEP_MIN": "1"}
    env = pg.env(POSTGRES_DB=db, NAS_PATH=str(nas), **policy)
    cli.run("backup", env={**env, "PRUNE_AFTER_BACKUP": "false"}, check=True)
    assert old.id in {m.id for m in manifests(nas)}
    cli.run("backup", "--force", env=env, check=True)
    kept = {m.id for m in manifests(nas)}
    assert old.id not in kept and len(kept) == 1
