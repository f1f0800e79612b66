"""MariaDB and SQLite get what PostgreSQL gets around a backup: /health and /metrics of a real `run`,
notifications of a failure to a real HTTP receiver, retention on both targets, and `list`.

The engines' own dump and restore paths are in tests/test_mariadb_e2e.py and tests/test_sqlite_e2e.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import CANARY, Cli, MariaDb, S3Server
from test_mariadb_e2e import LEAST_PW, env_for, manifests, reader, small  # noqa: F401 - fixtures
from test_metrics import promtool_check, scrape
from test_notify import Receiver, hook, http_factory  # noqa: F401 - fixtures
from test_runtime import Sidecar, sidecars
from test_sqlite_e2e import make_db


@pytest.fixture
def sidecar(cli: Cli) -> Iterator[Callable[[dict[str, str]], Sidecar]]:
    yield from sidecars(cli)


def sqlite_file(tmp_path: Path, name: str = "workshop") -> Path:
    path = tmp_path / f"{name}.db"
    make_db(path, "wal", rows=500)
    return path


def check_of(doc: dict, name: str) -> list[dict]:
    return [c for c in doc["checks"] if c["name"] == name]


def test_mariadb_run_reports_health_and_metrics_of_its_backup(sidecar, mariadb: MariaDb, small: str,  # noqa: F811
                                                               nas: Path) -> None:
    s = sidecar({**env_for(mariadb, small, nas), "BACKUP_ON_START": "true"})
    doc = s.wait_for("the backup", lambda d: d["last_success"] is not None, timeout=90)
    text, samples = scrape(s)
    s.stop()
    [made] = manifests(nas)
    assert (made["status"], made["engine"], made["database"]) == ("ok", "mariadb", small)
    assert doc["last_success"]["id"] == made["id"]
    # the sample's MyISAM table is outside the consistent snapshot: an ok backup, but /health says so
    assert (doc["status"], doc["code"]) == ("warning", 1)
    [last] = check_of(doc, "last_run")
    assert last["status"] == "warning" and "legacy_log (MyISAM)" in last["message"]
    lint = promtool_check(text)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    label = (("database", small),)
    assert samples[("backup_sidecar_runs_total", label)] == 1
    assert samples[("backup_sidecar_last_run_success", label)] == 1
    assert samples[("backup_sidecar_last_success_size_bytes", label)] == made["size_bytes"]
    assert LEAST_PW not in text + json.dumps(doc) + s.log()


def test_mariadb_failure_is_critical_named_and_notified_without_the_password(
        sidecar, mariadb: MariaDb, small: str, nas: Path, hook: Receiver) -> None:  # noqa: F811
    wrong = "wrong-" + CANARY[::-1]
    s = sidecar({**env_for(mariadb, small, nas), "MYSQL_PASSWORD": wrong, "BACKUP_ON_START": "true",
                 "WEBHOOK_URL": f"{hook.url}/hooks/T0KEN", "NOTIFY_TIMEOUT": "3s", "NOTIFY_RETRIES": "1"})
    doc = s.wait_for("the failure", lambda d: d["status"] == "critical" and d["last_run"] is not None, timeout=90)
    hook.wait(1, timeout=20)
    text, samples = scrape(s)
    s.stop()
    assert doc["code"] == 2 and doc["last_run"]["status"] == "failed"
    assert small in json.dumps(doc["checks"]) and "Access denied" in doc["last_run"]["error"]
    assert samples[("backup_sidecar_last_run_success", (("database", small),))] == 0
    [post] = [h for h in hook.hits if h.path == "/hooks/T0KEN"]
    body = post.json()
    assert (body["status"], body["database"]) == ("failed", small) and "Access denied" in body["error"]
    [failed] = manifests(nas)
    assert failed["status"] == "failed"
    everything = text + json.dumps(doc) + s.log() + b"".join(h.body for h in hook.hits).decode()
    assert wrong not in everything and CANARY[::-1] not in everything and LEAST_PW not in everything


def test_sqlite_run_reports_health_and_metrics_of_its_backup(sidecar, nas: Path, tmp_path: Path) -> None:
    path = sqlite_file(tmp_path)
    s = sidecar({"SQLITE_PATHS": str(path), "NAS_PATH": str(nas), "BACKUP_ON_START": "true"})
    doc = s.wait_for("the backup", lambda d: d["status"] == "ok" and d["last_success"] is not None, timeout=60)
    text, samples = scrape(s)
    s.stop()
    [made] = manifests(nas)
    assert (made["status"], made["database"]) == ("ok", "workshop")
    assert doc["last_success"]["id"] == made["id"]
    assert promtool_check(text).returncode == 0
    assert samples[("backup_sidecar_last_run_success", (("database", "workshop"),))] == 1


def test_sqlite_missing_file_turns_health_critical_naming_it(sidecar, nas: Path, tmp_path: Path) -> None:
    s = sidecar({"SQLITE_PATHS": str(tmp_path / "gone.db"), "NAS_PATH": str(nas), "BACKUP_ON_START": "true"})
    doc = s.wait_for("the failure", lambda d: d["status"] == "critical" and d["last_run"] is not None, timeout=60)
    s.stop()
    assert doc["code"] == 2 and "gone" in json.dumps(doc["checks"])


def _three_backups(cli: Cli, env: dict[str, str]) -> list[dict]:
    for _ in range(3):
        cli.run("backup", env=env, check=True)
    listed = json.loads(cli.run("list", "--json", env=env, check=True).stdout)
    return listed if isinstance(listed, list) else listed["backups"]


def _prune_keeps_the_newest(cli: Cli, env: dict[str, str], nas: Path, s3: S3Server, bucket: str) -> None:
    listed = _three_backups(cli, env)
    ids = sorted({b["id"] for b in listed}, reverse=True)
    assert len(ids) == 3
    keep = {**env, "BACKUP_KEEP_DAILY": "1", "BACKUP_KEEP_WEEKLY": "0", "BACKUP_KEEP_MONTHLY": "0",
            "BACKUP_KEEP_MIN": "1"}
    result = cli.run("prune", env=keep, check=True)
    assert "deleted" in result.stdout + result.stderr
    left_nas = {m["id"] for m in manifests(nas)}
    left_s3 = {o.object_name for o in s3.client.list_objects(bucket, recursive=True)}
    assert left_nas == {ids[0]}
    assert any(ids[0] in name for name in left_s3) and not any(i in n for i in ids[1:] for n in left_s3)
    after = json.loads(cli.run("list", "--json", env=env, check=True).stdout)
    rows = after if isinstance(after, list) else after["backups"]
    assert [b["id"] for b in rows] == [ids[0]]


def test_mariadb_prune_applies_retention_on_both_targets(cli: Cli, mariadb: MariaDb, small: str,  # noqa: F811
                                                         nas: Path, s3: S3Server, bucket: str) -> None:
    _prune_keeps_the_newest(cli, {**env_for(mariadb, small, nas), **s3.env(bucket)}, nas, s3, bucket)


def test_sqlite_prune_applies_retention_on_both_targets(cli: Cli, nas: Path, tmp_path: Path, s3: S3Server,
                                                        bucket: str) -> None:
    path = sqlite_file(tmp_path)
    _prune_keeps_the_newest(cli, {"SQLITE_PATHS": str(path), "NAS_PATH": str(nas), **s3.env(bucket)}, nas, s3,
                            bucket)
