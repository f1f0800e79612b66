"""Leases: the claim session survives the server's idle timeouts, a lost claim fails the run and says so,
and a second replica then makes the only ok backup of the slot."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import CANARY, Cli, PgServer
from test_runtime import manifests, table_locked, wait_pg_dump_blocked
from truth_support import backup_role, fixed_slot_env, sample_db

from app import pg as pglib
from app.coordination import app_name, lock_key
from app.leases import AdvisoryLease, FileLease, LeaseLost
from app.locks import file_lock
from app.settings import load_settings


def _claim_pids(pg: PgServer, host: str) -> list[int]:
    with pg.connect() as conn:
        rows = conn.execute(
            "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory' "
            "AND l.granted WHERE a.application_name = %s", (app_name(host),)).fetchall()
    return [r[0] for r in rows]


def _wait_claim(pg: PgServer, host: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pids := _claim_pids(pg, host):
            return pids[0]
        time.sleep(0.1)
    raise AssertionError(f"{host} never claimed the slot")


def test_claim_session_survives_idle_session_timeout_of_the_role(cli: Cli, pg: PgServer, nas: Path) -> None:
    db = sample_db(pg)
    role = backup_role(pg)
    pg.psql("postgres", f"ALTER ROLE {role} SET idle_session_timeout = '1s'")  # as managed services set it
    env = {**pg.env(POSTGRES_DB=db, POSTGRES_USER=role, BACKUP_HOSTNAME="idle-host"), "NAS_PATH": str(nas)}
    with table_locked(pg, db):
        proc = cli.popen("backup", env=env)
        claim = _wait_claim(pg, "idle-host")
        wait_pg_dump_blocked(pg, db)
        time.sleep(3)  # three idle timeouts long: the claim would have been ended long ago
        assert _claim_pids(pg, "idle-host") == [claim]
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    (made,) = manifests(nas)
    assert made.ok and made.system_identifier, "pg_control_system() is readable by the backup role"
    assert CANARY not in out + err


def test_terminated_claim_fails_the_run_and_a_second_replica_makes_the_only_backup(
    cli: Cli, pg: PgServer, nas: Path, tmp_path: Path
) -> None:
    db = sample_db(pg)
    base = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), **fixed_slot_env()}
    with table_locked(pg, db):
        a = cli.popen("backup", "--scheduled", env={**base, "BACKUP_HOSTNAME": "replica-a",
                                                    "LOCK_FILE": str(tmp_path / "a.lock")})
        claim = _wait_claim(pg, "replica-a")
        wait_pg_dump_blocked(pg, db)
        with pg.connect() as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (claim,))  # a failover, an operator, a NAT timeout
        time.sleep(1.1)  # backup IDs are per second: a run started in the same second would collide on it
        b = cli.popen("backup", "--scheduled", env={**base, "BACKUP_HOSTNAME": "replica-b",
                                                    "LOCK_FILE": str(tmp_path / "b.lock")})
        _wait_claim(pg, "replica-b")
    a_out, a_err = a.communicate(timeout=60)
    b_out, b_err = b.communicate(timeout=60)
    assert a.returncode == 1, a_err
    assert "the database lock claiming this slot was lost" in a_err
    assert b.returncode == 0, b_err
    ok = [m for m in manifests(nas) if m.ok]
    assert [m.host for m in ok] == ["replica-b"], "a second ok backup of the slot was published"
    (failed,) = [m for m in manifests(nas) if not m.ok]
    assert failed.host == "replica-a" and "claiming this slot was lost" in (failed.error or "")
    assert failed.slot == ok[0].slot


def test_advisory_lease_notices_a_terminated_session_and_file_lease_a_replaced_file(
    pg: PgServer, tmp_path: Path
) -> None:
    db = sample_db(pg)
    settings = load_settings(pg.env(POSTGRES_DB=db))
    conn = pglib.connect(settings.db, db, app_name=app_name("lease-test"))
    lease = AdvisoryLease.acquire(conn, lock_key(db), db)
    assert lease is not None
    try:
        lease.check()
        with pg.connect() as other:
            assert other.execute("SHOW idle_session_timeout").fetchone() is not None
            other.execute("SELECT pg_terminate_backend(%s)", (_claim_pids(pg, "lease-test")[0],))
        time.sleep(AdvisoryLease.PROBE_S * 2)
        with pytest.raises(LeaseLost, match="database lock claiming this slot was lost"):
            lease.check()
    finally:
        lease.release()
    path = tmp_path / "lock"
    with file_lock(path, "backup", "h") as holder:
        assert isinstance(holder.lease, FileLease)
        holder.lease.check()
        path.unlink()
        path.write_text("")  # another instance would now lock this new inode
        with pytest.raises(LeaseLost, match="was removed or replaced while held"):
            holder.lease.check()
