"""base-backup's refusals, each with its reason and a hint, and with nothing but a failed manifest stored."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import PgServer

from app.backup import BackupFailed
from app.basebackup import base_backup
from app.cancel import CancelToken
from app.settings import load_settings
from app.targets import make_targets


def test_base_backup_command_refuses_without_wal_archive_or_a_streaming_receiver(cli, pg: PgServer,
                                                                                  nas: Path) -> None:
    out = cli.run("base-backup", env=pg.env(NAS_PATH=str(nas)))
    assert out.returncode == 1 and "WAL_ARCHIVE is off" in out.stderr and "hint:" in out.stderr
    out = cli.run("base-backup", env=pg.env(NAS_PATH=str(nas), WAL_ARCHIVE="true",
                                            WAL_SLOT=f"nobody_{uuid.uuid4().hex[:8]}"))
    assert out.returncode == 1 and "no WAL receiver streams on the slot" in out.stderr
    assert "WAL_ARCHIVE=true" in out.stderr
    assert not list(nas.rglob("*"))


def _failed_manifest(nas: Path) -> dict:
    [manifest] = list(nas.rglob("_base-*.manifest.json"))
    assert not list(nas.rglob("*.tar*"))  # no artifact, not even a partial one
    return json.loads(manifest.read_text())


def test_base_backup_refuses_extra_tablespaces_with_the_reason(pg: PgServer, nas: Path) -> None:
    where = Path(tempfile.mkdtemp(prefix="bs-tblspc-"))
    shutil.chown(where, "postgres")
    name = f"ts_{uuid.uuid4().hex[:8]}"
    with pg.connect() as conn:
        conn.execute(f"CREATE TABLESPACE {name} LOCATION '{where}'")
    try:
        settings = load_settings(pg.env(NAS_PATH=str(nas), POSTGRES_DB="postgres", NAS_REQUIRE_MOUNT="false"))
        with pytest.raises(BackupFailed) as err:
            base_backup(settings, make_targets(settings), CancelToken())
        doc = _failed_manifest(nas)
        assert doc["status"] == "failed" and name in doc["error"]
        assert "one tar per tablespace" in doc["error"] and "hint:" in doc["error"]
        assert err.value.manifest.error == doc["error"]
    finally:
        with pg.connect() as conn:
            conn.execute(f"DROP TABLESPACE {name}")
        shutil.rmtree(where, ignore_errors=True)


def test_base_backup_refuses_a_role_without_replication_and_says_how_to_grant_it(pg: PgServer, nas: Path) -> None:
    role = f"norepl_{uuid.uuid4().hex[:8]}"
    with pg.connect() as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'")
    try:
        settings = load_settings(pg.env(NAS_PATH=str(nas), NAS_REQUIRE_MOUNT="false", POSTGRES_USER=role,
                                        POSTGRES_PASSWORD=f"pw-{role}", POSTGRES_DB="postgres"))
        with pytest.raises(BackupFailed):
            base_backup(settings, make_targets(settings), CancelToken())
        error = _failed_manifest(nas)["error"]
        assert "lacks REPLICATION" in error and f"ALTER ROLE {role} REPLICATION" in error
        assert "pg_hba.conf" in error
    finally:
        with pg.connect() as conn:
            conn.execute(f"DROP ROLE {role}")
