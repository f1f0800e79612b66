"""Failures during failures: cleanup that itself fails, stops in the middle, kills, clashing names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CANARY, Cli, PgServer
from sample_data import build_sample

from app import layout
from app.backup import BackupFailed, run_artifact
from app.cancel import CancelToken
from app.pgdump import dump_artifact
from app.settings import ConfigError, load_settings
from app.targets.base import Upload
from app.targets.nas import MARKER, NasTarget


class _BrokenDisk(NasTarget):
    """A real directory whose uploads fail mid-stream and whose cleanup fails too (a read-only remount)."""

    name = "broken"

    def begin(self, key: str, size_hint: int | None = None) -> Upload:
        inner = super().begin(key, size_hint)

        class Failing(Upload):
            def write(self, data: bytes) -> None:
                raise OSError(30, "Read-only file system")

            def commit(self, sha256: str | None = None) -> str | None:
                return inner.commit(sha256)

            def abort(self) -> None:
                inner.abort()
                raise OSError(116, "Stale file handle")

        return Failing()


def test_cleanup_errors_never_hide_the_failure_or_skip_the_failed_manifest(pg: PgServer, tmp_path: Path) -> None:
    db = pg.create_db()
    pg.psql(db, "CREATE TABLE t AS SELECT generate_series(1, 1000) AS x")
    good, broken = tmp_path / "good", tmp_path / "broken"
    good.mkdir()
    broken.mkdir()
    settings = load_settings({**pg.env(POSTGRES_DB=db), "NAS_PATH": str(good)})
    targets = [_BrokenDisk(broken), NasTarget(good)]
    with pytest.raises(BackupFailed) as failed:
        run_artifact(settings, targets, dump_artifact(settings, db, CancelToken()), CancelToken())
    assert "Read-only file system" in (failed.value.manifest.error or "")
    # the healthy target got the failed manifest and no artifact, despite the broken one's failing abort
    [manifest_path] = good.rglob("*.manifest.json")
    assert json.loads(manifest_path.read_text())["status"] == "failed"
    assert [p for p in good.rglob("*") if p.is_file() and p.name != MARKER] == [manifest_path]


def test_files_name_that_clashes_with_a_database_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FILES_NAME='app' clashes"):
        load_settings({"NAS_PATH": str(tmp_path), "POSTGRES_DB": "app", "FILES_PATHS": str(tmp_path),
                       "FILES_NAME": "app"})


def test_database_names_with_dots_are_recognised_as_our_artifacts() -> None:
    assert layout.artifact_stem("my.db-20261122T030000Z.dump.zst") == "my.db-20261122T030000Z"
    assert layout.artifact_stem("my.db-20261122T030000Z.manifest.json") is None
    assert layout.artifact_stem("notes.tar.gz") is None


def test_stop_during_a_multi_database_backup_exits_1_naming_what_was_not_backed_up(
    cli: Cli, pg: PgServer, nas: Path
) -> None:
    first, second = pg.create_db(), pg.create_db()
    pg.psql(first, "CREATE TABLE items AS SELECT generate_series(1, 100) AS x")
    blocker = pg.connect(first)
    blocker.autocommit = False
    blocker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")  # the first dump hangs until the stop
    try:
        proc = cli.popen("backup", env={**pg.env(POSTGRES_DB=f"{first},{second}"), "NAS_PATH": str(nas)})
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        blocker.rollback()
        blocker.close()
    assert proc.returncode == 1, err
    assert f"interrupted before {second} could be backed up" in err
    manifests = [json.loads(p.read_text()) for p in nas.rglob("*.manifest.json")]
    assert [(m["database"], m["status"]) for m in manifests] == [(first, "failed")]
    assert "interrupted" in manifests[0]["error"]


def _find(name: str, needle: bytes, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            args = cmdline.split(b"\0")
            if proc.name.isdigit() and any(a.endswith(name.encode()) for a in args[:2]) and needle in cmdline:
                return int(proc.name)
        time.sleep(0.02)
    raise AssertionError(f"{name} did not start")


def test_killed_plain_restore_never_commits_a_partial_database(cli: Cli, pg: PgServer, nas: Path) -> None:
    src = pg.create_db()
    build_sample(pg, src)
    env = {**pg.env(POSTGRES_DB=src), "NAS_PATH": str(nas), "BACKUP_FORMAT": "plain"}
    cli.run("backup", env=env, check=True)
    dst = pg.create_db()
    proc = cli.popen("restore", "latest", "--db", src, "--to-db", dst, "--yes", env=env)
    psql = _find("psql", dst.encode())
    time.sleep(0.3)  # psql has received part of the dump
    os.kill(psql, signal.SIGSTOP)  # it cannot finish before the sidecar dies, however fast the machine
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup at all: psql just sees its input end
    proc.wait(10)
    os.kill(psql, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{psql}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    tables = pg.psql(dst, "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
                          "'information_schema')")
    assert tables == "0", "a killed restore left a partial database behind"
    staging = pg.psql("postgres", f"SELECT datname FROM pg_database WHERE datname LIKE 'bs\\_staging\\_%{dst}'")
    assert staging, "the kill leaves the staging database behind, as the README says"
    for name in staging.splitlines():
        pg.drop_db(name)
    assert CANARY not in subprocess.run(["ps", "axww"], capture_output=True, text=True).stdout
