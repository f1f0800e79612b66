"""LOCK_FILE: never two runs on one volume, a skip that names the holder, no stale lock after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import CANARY, REPO, Cli, PgServer
from test_runtime import manifests, small_db, table_locked, wait_pg_dump_blocked

from app.locks import LockBusy, LockError, file_lock, read_holder


def test_lock_file_records_the_holder_and_a_second_taker_is_told_who(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    errors: list[LockBusy] = []
    with file_lock(path, "backup", "host-a") as holder:
        recorded = read_holder(path)
        assert recorded == holder
        assert (recorded.host, recorded.pid, recorded.what) == ("host-a", os.getpid(), "backup")

        def second() -> None:
            try:
                with file_lock(path, "prune", "host-b"):
                    pass
            except LockBusy as exc:
                errors.append(exc)

        t = threading.Thread(target=second)
        t.start()
        t.join()
    (busy,) = errors
    assert str(busy) == f"prune: already running on host-a since {holder.since} (pid {os.getpid()}, backup), skipping"
    assert read_holder(path) is None, "a released lock records no holder"
    with file_lock(path, "prune", "host-b"):
        pass


def test_nested_lock_in_the_same_thread_does_not_lock_itself_out(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with file_lock(path, "backup", "h"), file_lock(path, "prune", "h"):
        assert read_holder(path).what == "backup"  # type: ignore[union-attr]


def test_waiting_taker_gets_the_lock_when_the_holder_lets_go(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    got: list[float] = []
    with file_lock(path, "backup", "a"):
        t0 = time.monotonic()

        def waiter() -> None:
            with file_lock(path, "restore", "b", timeout_s=10):
                got.append(time.monotonic() - t0)

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.5)
        assert not got
    t.join(5)
    assert got and 0.5 <= got[0] < 2


def test_lock_file_in_a_missing_directory_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LockError, match=r"cannot open the lock file .*hint: LOCK_FILE must be on a writable volume"):
        with file_lock(tmp_path / "not-mounted" / "lock", "backup", "h"):
            pass


def _lock_holder_process(path: Path) -> subprocess.Popen[str]:
    """A separate process that takes the lock, says so, and sleeps: the victim of kill -9."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from app.locks import file_lock\n"
        f"with file_lock(Path({str(path)!r}), 'backup', 'doomed-host'):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(300)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_of_a_killed_process_never_blocks_the_next_run(cli: Cli, pg: PgServer, nas: Path, tmp_path: Path) -> None:
    db = small_db(pg)
    lock = tmp_path / "shared.lock"
    env = pg.env(POSTGRES_DB=db, NAS_PATH=str(nas), LOCK_FILE=str(lock))
    holder = _lock_holder_process(lock)
    busy = cli.run("backup", env=env, timeout=60)
    assert busy.returncode == 0
    assert "already running on doomed-host since" in busy.stderr
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert read_holder(lock) is not None, "the dead holder's record is still in the file"
    after = cli.run("backup", "--force", env=env, timeout=120)
    assert after.returncode == 0, after.stderr
    assert len([m for m in manifests(nas) if m.ok]) == 1


def test_kill_9_of_a_backup_holding_the_lock_then_the_next_backup_succeeds(
    cli: Cli, pg: PgServer, nas: Path, tmp_path: Path
) -> None:
    db = small_db(pg)
    env = pg.env(POSTGRES_DB=db, NAS_PATH=str(nas), LOCK_FILE=str(tmp_path / "shared.lock"))
    with table_locked(pg, db):
        victim = cli.popen("backup", env=env)
        wait_pg_dump_blocked(pg, db)
        victim.send_signal(signal.SIGKILL)
        victim.communicate()
    # the orphaned pg_dump dies once the table is free (its reader is gone); the next run does not wait
    after = cli.run("backup", env=env, timeout=120)
    assert after.returncode == 0, after.stderr
    assert "skipped" not in after.stderr
    assert [m.status for m in manifests(nas)] == ["ok"]


def test_second_backup_on_one_lock_file_skips_naming_the_holder(
    cli: Cli, pg: PgServer, nas: Path, tmp_path: Path
) -> None:
    db = small_db(pg)
    lock = tmp_path / "shared.lock"
    env = pg.env(POSTGRES_DB=db, NAS_PATH=str(nas), LOCK_FILE=str(lock), BACKUP_HOSTNAME="first-host")
    with table_locked(pg, db):
        first = cli.popen("backup", env=env)
        wait_pg_dump_blocked(pg, db)
        holder = json.loads(lock.read_text())
        second = cli.run("backup", env={**env, "BACKUP_HOSTNAME": "second-host"}, timeout=60)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert second.returncode == 0
    skip_lines = [line for line in second.stderr.splitlines() if "skipping" in line]
    assert skip_lines, second.stderr
    assert (
        f"already running on first-host since {holder['since']} (pid {first.pid}, backup), skipping" in skip_lines[-1]
    )
    assert CANARY not in second.stderr + err + out
    assert len(manifests(nas)) == 1


def test_lock_timeout_waits_for_the_holder_then_runs(cli: Cli, pg: PgServer, nas: Path, tmp_path: Path) -> None:
    db = small_db(pg)
    env = pg.env(POSTGRES_DB=db, NAS_PATH=str(nas), LOCK_FILE=str(tmp_path / "shared.lock"), LOCK_TIMEOUT="60")
    with table_locked(pg, db):
        first = cli.popen("backup", env=env)
        wait_pg_dump_blocked(pg, db)
        second = cli.popen("backup", "--force", env=env)
        time.sleep(1.0)
        assert second.poll() is None, "the second run waits while the first holds the lock"
    assert first.wait(60) == 0
    _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert "waiting up to 1m0s for the lock held by" in err
    assert len([m for m in manifests(nas) if m.ok]) == 2
