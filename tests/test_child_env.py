"""No child the sidecar starts sees a secret the sidecar holds, not even a short ``--version`` run.

The e2e canary tests catch this only when they happen to sample the short-lived child; these fakes record the
environment every time.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app import pg
from app.engines import mysql

SECRETS = {"POSTGRES_PASSWORD": "canary-pg-pw", "MYSQL_PASSWORD": "canary-my-pw",
           "S3_SECRET_ACCESS_KEY": "canary-s3-key", "SMTP_PASSWORD": "canary-smtp-pw"}


def _fake(bin_dir: Path, name: str, version_line: str, record: Path) -> None:
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\nenv > {record}\necho '{version_line}'\n")
    script.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    return bin_dir


def _assert_clean(record: Path) -> None:
    seen = record.read_text()
    assert "PATH=" in seen  # the fake ran and recorded its environment
    for name, value in SECRETS.items():
        assert value not in seen and f"{name}=" not in seen, seen


def test_pg_client_version_runs_with_a_scratch_environment(fake_bin: Path, tmp_path: Path) -> None:
    record = tmp_path / "pg.env"
    _fake(fake_bin, "pg_dump", "pg_dump (PostgreSQL) 16.4", record)
    pg._client_version.cache_clear()
    try:
        assert pg.client_version("pg_dump") == ("16.4", 16)
    finally:
        pg._client_version.cache_clear()
    _assert_clean(record)


def test_mysql_client_version_runs_with_a_scratch_environment(fake_bin: Path, tmp_path: Path) -> None:
    record = tmp_path / "my.env"
    _fake(fake_bin, "mariadb-dump", "mariadb-dump  Ver 10.19 Distrib 10.11.19-MariaDB, for debian-linux-gnu", record)
    assert mysql.client_version("mariadb-dump").mariadb
    _assert_clean(record)
