"""Shared pieces of the point-in-time recovery tests: a cluster that streams WAL (1 MiB segments so tests fill
them in seconds), the sidecar's `run` as a process, a steady writer of time-stamped rows, and a server started on
a recovered data directory."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from conftest import Cli, free_port, start_cluster


@dataclass
class WalCluster:
    """The source server: superuser for the test's own writes, the least-privileged ``backup`` role for the
    sidecar (LOGIN REPLICATION, pg_read_all_data), as the README documents."""

    host: str
    port: int
    password: str
    backup_password: str
    root: Path
    stop: Any = None

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(host=self.host, port=self.port, user="postgres", password=self.password,
                               dbname=dbname, autocommit=True)

    def sidecar_env(self, **extra: str) -> dict[str, str]:
        return {"POSTGRES_HOST": self.host, "POSTGRES_PORT": str(self.port), "POSTGRES_USER": "backup",
                "POSTGRES_PASSWORD": self.backup_password, "POSTGRES_DB": "app", **extra}

    def pg_wal(self) -> Path:
        return self.root / "data" / "pg_wal"

    def switch(self) -> str:
        with self.connect() as conn:
            conn.execute("SELECT pg_switch_wal()")
            return str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])


def start_wal_cluster() -> WalCluster:
    password = "pitr-" + secrets.token_hex(6)
    backup_pw = "Canary-bk-" + secrets.token_hex(6)
    c = start_cluster(password, settings="-c fsync=off -c wal_level=replica "
                      "-c max_wal_senders=10 -c max_replication_slots=10 -c wal_keep_size=256MB",
                      initdb_args=("--wal-segsize=1",))
    wc = WalCluster(c.host, c.port, password, backup_pw, c.root, c.stop)
    with wc.connect() as conn:
        conn.execute(f"CREATE ROLE backup LOGIN REPLICATION PASSWORD '{backup_pw}'")
        conn.execute("GRANT pg_read_all_data TO backup")
        conn.execute("CREATE ROLE app_owner LOGIN")
        conn.execute("CREATE DATABASE app OWNER app_owner")
    with wc.connect("app") as conn:
        conn.execute("SET ROLE app_owner")
        conn.execute("CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT "
                     "clock_timestamp(), body text NOT NULL)")
    return wc


def wal_cluster() -> Iterator[WalCluster]:
    """One streaming cluster per test module: ``wal_pg = pytest.fixture(scope="module")(wal_cluster)``."""
    cluster = start_wal_cluster()
    yield cluster
    cluster.stop()


def scratch_dir() -> Iterator[Path]:
    """A directory the postgres user can reach (pytest's tmp_path is root-only): ``scratch`` fixtures."""
    path = Path(tempfile.mkdtemp(prefix="bs-pitr-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Writer:
    """Inserts one time-stamped row per transaction every ``every_s`` until stopped."""

    def __init__(self, cluster: WalCluster, every_s: float = 0.02, body: int = 2000) -> None:
        self.cluster = cluster
        self.every_s = every_s
        self.body = body
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.rows = 0

    def _run(self) -> None:
        with self.cluster.connect("app") as conn:
            while not self._stop.is_set():
                conn.execute("INSERT INTO events (body) VALUES (repeat(md5(random()::text), %s))", (self.body // 32,))
                self.rows += 1
                time.sleep(self.every_s)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(10)


def rows(conn: psycopg.Connection) -> list[tuple[int, Any]]:
    return [(r[0], r[1]) for r in conn.execute("SELECT id, at FROM events ORDER BY id").fetchall()]


@dataclass
class Sidecar:
    """`backup-sidecar run` as its own process, with its /health."""

    cli: Cli
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None

    def start(self) -> Sidecar:
        self.proc = self.cli.popen("run", env={**self.env, "HEALTH_PORT": str(self.port), "HEALTH_BIND": "127.0.0.1"})
        self.wait_for(lambda h: h is not None, 30, "health to answer")
        return self

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:  # noqa: S310
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())
        except OSError:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"run exited {self.proc.returncode}: {self.proc.stderr.read()}") from None
            return None

    def check(self, name: str) -> dict[str, Any] | None:
        h = self.health() or {}
        return next((c for c in h.get("checks", []) if c["name"] == name), None)

    def wait_for(self, pred: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.health()
            if pred(last):
                return last
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last /health: {json.dumps(last)[:3000]}")

    def wait_check(self, name: str, status: str, timeout: float = 60, contains: str = "") -> dict[str, Any]:
        def ok(h: dict[str, Any] | None) -> bool:
            c = next((c for c in (h or {}).get("checks", []) if c["name"] == name), None)
            return c is not None and c["status"] == status and contains in c["message"]

        h = self.wait_for(ok, timeout, f"{name} {status} {contains!r}")
        return next(c for c in h["checks"] if c["name"] == name)

    def receiver_pid(self) -> int | None:
        assert self.proc is not None
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid and b"pg_receivewal" in cmd:
                return int(pid)
        return None

    def stop(self, timeout: float = 20) -> str:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=timeout)
        return err

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.communicate(timeout=10)


class RecoveredServer:
    """A server started on a data directory restore-pitr laid out, run the way its next command says."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.sock = data_dir.parent / f"sock-{self.port}"
        self.sock.mkdir()
        self.hba = data_dir.parent / f"hba-{self.port}.conf"
        self.hba.write_text("local all all trust\n")
        for path in (self.sock, self.hba):
            os.chown(path, data_dir.stat().st_uid, data_dir.stat().st_gid)

    def start(self, timeout: float = 120) -> psycopg.Connection:
        from local_pg import _as_owner, pg_bin_dir

        out = subprocess.run([*_as_owner(), str(pg_bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "-l",
                              str(self.data_dir / "recovery.log"), "-w", "-t", "120", "-o",
                              f"-p {self.port} -k {self.sock} -c listen_addresses='' -c hba_file={self.hba}", "start"],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr + (self.data_dir / "recovery.log").read_text(errors="replace")
        conn = psycopg.connect(host=str(self.sock), port=self.port, user="postgres", dbname="app", autocommit=True)
        deadline = time.monotonic() + timeout
        while conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
            assert time.monotonic() < deadline, (self.data_dir / "recovery.log").read_text(errors="replace")
            time.sleep(0.2)
        return conn

    def log(self) -> str:
        return (self.data_dir / "recovery.log").read_text(errors="replace")

    def stop(self) -> None:
        from local_pg import _as_owner, pg_bin_dir

        subprocess.run([*_as_owner(), str(pg_bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                        "stop"], capture_output=True)
