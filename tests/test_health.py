"""/health verdicts from real manifests on real targets, its latency with a hung target, and real monitors."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import S3Server, free_port, require_tool
from test_runtime import HOUR, Sidecar, nas_target, plant, sidecars

from app import layout
from app.health import HealthMonitor
from app.settings import load_settings
from app.targets import make_targets

CHECK_HTTP = "/usr/lib/nagios/plugins/check_http"


def monitor_for(env: dict[str, str], **kwargs: float) -> HealthMonitor:
    settings = load_settings({"POSTGRES_DB": "app", "NAS_REQUIRE_MOUNT": "false", **env})  # tmp dirs, no mounts
    monitor = HealthMonitor(settings, make_targets(settings), watch_loop=False, read_server=False,
                            **kwargs)  # type: ignore[arg-type]
    monitor.refresh_all(wait=20)
    return monitor


@pytest.fixture
def sidecar(cli) -> Iterator[Callable[[dict[str, str]], Sidecar]]:
    yield from sidecars(cli)


def check(doc: dict, name: str) -> dict:
    return next(c for c in doc["checks"] if c["name"] == name)


def test_fresh_backup_is_ok_and_the_payload_has_the_spec_shape(nas: Path) -> None:
    made = plant(nas_target(nas), "app", age_s=HOUR)
    doc = monitor_for({"NAS_PATH": str(nas)}).payload()
    assert (doc["status"], doc["code"]) == ("ok", 0)
    assert set(doc) >= {"status", "code", "last_success", "last_run", "next_run_at", "checks"}
    assert doc["last_success"]["id"] == made.id
    assert HOUR <= doc["last_success"]["age_seconds"] < HOUR + 60
    assert doc["last_success"]["size_bytes"] == made.size_bytes
    assert doc["last_run"] == {**doc["last_run"], "status": "ok", "error": None}
    assert doc["thresholds"] == {"warn_age_seconds": 26 * HOUR, "crit_age_seconds": 48 * HOUR}
    assert all({"name", "status", "message"} <= set(c) for c in doc["checks"])


def test_backup_27h_old_is_a_warning(nas: Path) -> None:
    plant(nas_target(nas), "app", age_s=27 * HOUR)
    doc = monitor_for({"NAS_PATH": str(nas)}).payload()
    assert (doc["status"], doc["code"]) == ("warning", 1)
    assert check(doc, "backup_age")["message"] == "last backup of app is 1d3h old, older than HEALTH_WARN_AGE 1d2h"


def test_backup_older_than_crit_age_is_critical(nas: Path) -> None:
    plant(nas_target(nas), "app", age_s=3 * HOUR)
    doc = monitor_for({"NAS_PATH": str(nas), "HEALTH_WARN_AGE": "1h", "HEALTH_CRIT_AGE": "2h"}).payload()
    assert (doc["status"], doc["code"]) == ("critical", 2)
    assert check(doc, "backup_age")["status"] == "critical"
    assert doc["thresholds"] == {"warn_age_seconds": HOUR, "crit_age_seconds": 2 * HOUR}


def test_failed_last_run_is_critical_even_with_a_fresh_backup(nas: Path) -> None:
    target = nas_target(nas)
    good = plant(target, "app", age_s=2 * HOUR)
    plant(target, "app", age_s=HOUR, error="pg_dump failed: connection refused")
    doc = monitor_for({"NAS_PATH": str(nas)}).payload()
    assert (doc["status"], doc["code"]) == ("critical", 2)
    assert doc["last_success"]["id"] == good.id
    assert doc["last_run"]["status"] == "failed"
    assert doc["last_run"]["error"] == "pg_dump failed: connection refused"
    assert "connection refused" in check(doc, "last_run")["message"]


def test_interrupted_last_run_is_critical_and_says_it_was_interrupted(nas: Path) -> None:
    target = nas_target(nas)
    plant(target, "app", age_s=2 * HOUR)
    plant(target, "app", age_s=HOUR, error="pg_dump interrupted: SIGTERM received, the sidecar is stopping")
    doc = monitor_for({"NAS_PATH": str(nas)}).payload()
    assert (doc["status"], check(doc, "last_run")["status"]) == ("critical", "critical")
    assert "interrupted: SIGTERM received" in check(doc, "last_run")["message"]


def test_no_backup_yet_is_a_warning(nas: Path) -> None:
    doc = monitor_for({"NAS_PATH": str(nas)}).payload()
    assert (doc["status"], doc["last_success"], doc["last_run"]) == ("warning", None, None)
    assert check(doc, "backup_age")["message"] == "no backup of app yet"


def test_every_database_setting_with_no_backup_at_all_is_a_warning(nas: Path) -> None:
    doc = monitor_for({"NAS_PATH": str(nas), "POSTGRES_DB": "*"}).payload()
    assert (doc["status"], check(doc, "backup_age")["message"]) == ("warning", "no backup yet")
    plant(nas_target(nas), "shop", age_s=HOUR)
    assert monitor_for({"NAS_PATH": str(nas), "POSTGRES_DB": "*"}).payload()["status"] == "ok"


def test_each_database_is_judged_and_the_stalest_is_reported(nas: Path) -> None:
    target = nas_target(nas)
    plant(target, "app", age_s=HOUR)
    stale = plant(target, "billing", age_s=30 * HOUR)
    plant(target, "someone-elses-db", age_s=100 * HOUR)
    doc = monitor_for({"NAS_PATH": str(nas), "POSTGRES_DB": "app,billing"}).payload()
    assert doc["status"] == "warning"
    assert doc["last_success"]["id"] == stale.id
    assert set(doc["databases"]) == {"app", "billing"}


def test_nas_with_less_free_space_than_the_last_backup_needs_warns(nas: Path) -> None:
    target = nas_target(nas)
    made = plant(target, "app", age_s=HOUR)
    huge = shutil.disk_usage(nas).free + 2**30
    os.truncate(nas / made.artifact, huge)  # sparse: as big as a backup that would not fit again
    path = nas / layout.manifest_key("app", made.started_at)
    made.size_bytes = huge
    path.write_bytes(made.to_json())
    doc = monitor_for({"NAS_PATH": str(nas)}).payload()
    assert doc["status"] == "warning"
    space = check(doc, "space:nas")
    assert space["status"] == "warning" and "free, the last backup took" in space["message"]


def test_unreachable_s3_is_a_warning_and_the_nas_still_tells_the_age(nas: Path) -> None:
    made = plant(nas_target(nas), "app", age_s=HOUR)
    env = {"NAS_PATH": str(nas), "S3_BUCKET": "backups", "S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    doc = monitor_for(env).payload()
    assert doc["status"] == "warning"
    assert doc["last_success"]["id"] == made.id
    s3_check = check(doc, "target:s3")
    assert s3_check["status"] == "warning" and "S3: cannot check the bucket" in s3_check["message"]
    assert "hint: check S3_ENDPOINT" in s3_check["message"]


def test_unmounted_nas_is_reported_not_shown_as_empty(tmp_path: Path) -> None:
    doc = monitor_for({"NAS_PATH": str(tmp_path / "not-mounted")}).payload()
    nas_check = check(doc, "target:nas")
    assert nas_check["status"] == "warning" and "does not exist or is not a directory" in nas_check["message"]
    assert check(doc, "backup_age")["message"] == "app: no target could be read yet"
    assert not (tmp_path / "not-mounted").exists()


def test_replica_that_never_ran_sees_the_backup_another_host_made(s3: S3Server, bucket: str) -> None:
    env = s3.env(bucket)
    made = plant(make_targets(load_settings({"POSTGRES_DB": "app", **env}))[0], "app", age_s=HOUR)
    doc = monitor_for(env).payload()
    assert (doc["status"], doc["last_success"]["id"]) == ("ok", made.id)


def test_stopped_scheduler_loop_is_critical(nas: Path) -> None:
    plant(nas_target(nas), "app", age_s=HOUR)
    settings = load_settings({"NAS_PATH": str(nas), "POSTGRES_DB": "app"})
    monitor = HealthMonitor(settings, make_targets(settings), tick_limit_s=60)
    monitor.refresh_all(wait=10)
    monitor.heartbeat = time.monotonic() - 125
    doc = monitor.payload()
    assert (doc["status"], check(doc, "scheduler")["message"]) == ("critical", "no scheduler tick for 2m5s")
    monitor.beat()
    assert monitor.payload()["status"] == "ok"


@pytest.fixture
def hanging_endpoint() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: the worst S3 endpoint there is."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    t.join(2)
    for conn in held:
        conn.close()
    server.close()


def test_health_answers_within_a_second_while_s3_hangs(sidecar, nas: Path, hanging_endpoint: str) -> None:
    plant(nas_target(nas), "app", age_s=HOUR)
    s = sidecar({"NAS_PATH": str(nas), "POSTGRES_DB": "app", "S3_BUCKET": "backups", "S3_ENDPOINT": hanging_endpoint})
    s.wait_for("the first verdict", lambda d: "status" in d, timeout=30)
    slowest, doc = 0.0, {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        _, doc = s.health(timeout=5)
        slowest = max(slowest, time.monotonic() - t0)
        if "no answer for" in check(doc, "target:s3")["message"]:
            break
        time.sleep(0.2)
    assert "no answer for" in check(doc, "target:s3")["message"], doc
    assert check(doc, "target:s3")["status"] == "warning"
    assert doc["last_success"] is not None, "the NAS still answers for the backup's age"
    assert slowest < 1.0
    s.stop()


def test_nagios_check_http_and_the_health_command_read_the_verdict(sidecar, cli, nas: Path) -> None:
    check_http = require_tool(CHECK_HTTP, "monitoring-plugins-basic")
    plant(nas_target(nas), "app", age_s=HOUR)
    ok = sidecar({"NAS_PATH": str(nas), "POSTGRES_DB": "app"})
    ok.wait_for("ok", lambda d: d["status"] == "ok", timeout=30)
    nagios = subprocess.run(
        [
            check_http,
            "-H",
            "127.0.0.1",
            "-p",
            str(ok.port),
            "-u",
            "/health",
            "-e",
            "200",
            "-s",
            '"status":"ok"',
        ],
        capture_output=True,
        text=True,
    )
    assert nagios.returncode == 0, nagios.stdout
    assert nagios.stdout.startswith("HTTP OK")
    line = cli.run("health", "--url", f"{ok.url}/health", env={})
    assert line.returncode == 0 and line.stdout.startswith("BACKUP OK - last backup 1h0m ago"), line.stdout
    assert re.search(r"\| age=360\ds;93600;172800$", line.stdout.strip()), line.stdout
    ok.stop()

    plant(nas_target(nas), "app", age_s=HOUR // 2, error="pg_dump failed: disk quota exceeded")
    bad = sidecar({"NAS_PATH": str(nas), "POSTGRES_DB": "app"})
    bad.wait_for("critical", lambda d: d["status"] == "critical", timeout=30)
    nagios = subprocess.run(
        [check_http, "-H", "127.0.0.1", "-p", str(bad.port), "-u", "/health", "-e", "200"],
        capture_output=True,
        text=True,
    )
    assert nagios.returncode == 2, nagios.stdout
    assert "503" in nagios.stdout
    line = cli.run("health", "--url", f"{bad.url}/health", env={})
    assert line.returncode == 2
    assert line.stdout.startswith("BACKUP CRITICAL - last run failed: pg_dump failed: disk quota exceeded")
    # HEALTH_PORT from the env file, as every other setting (the process environment wins over the file)
    (cli.cwd / "health.env").write_text(f"HEALTH_PORT={bad.port}\n")
    from_file = cli.run("--env-file", "health.env", "health", env={})
    assert from_file.returncode == 2 and from_file.stdout.startswith("BACKUP CRITICAL - last run failed"), from_file
    missing = cli.run("--env-file", "no-such.env", "health", env={})
    assert missing.returncode == 3 and missing.stdout.startswith("BACKUP UNKNOWN - --env-file=no-such.env: no such")
    typo = cli.run("health", "--url", env={})  # a monitor's own mistake is UNKNOWN, never CRITICAL
    assert typo.returncode == 3 and typo.stdout.startswith("BACKUP UNKNOWN - argument --url"), typo
    bad.stop()


def test_health_listeners_hear_each_status_change(nas: Path, tmp_path: Path) -> None:
    from app.runtime import Runtime

    settings = load_settings(
        {
            "NAS_PATH": str(nas),
            "POSTGRES_DB": "app",
            "HEALTH_BIND": "127.0.0.1",
            "HEALTH_PORT": "0",
            "LOCK_FILE": str(tmp_path / "lock"),
        }
    )
    rt = Runtime(settings, refresh_s=0.3)
    heard: list[tuple[str | None, str]] = []
    rt.on_health.append(lambda old, new, doc: heard.append((old, new)))
    loop = threading.Thread(target=rt.run, daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while not heard and time.monotonic() < deadline:
            time.sleep(0.05)
        assert heard == [(None, "warning")], "the first verdict after start: no backup yet"
        plant(nas_target(nas), "app", age_s=60)
        while len(heard) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert heard == [(None, "warning"), ("warning", "ok")]
    finally:
        rt.stop_signal = "TEST"
        loop.join(10)
    assert not loop.is_alive()


def test_a_target_without_the_manifest_is_judged_only_a_while_after_another_showed_it(
    nas: Path, s3: S3Server, bucket: str
) -> None:
    made = plant(nas_target(nas), "app", age_s=HOUR)  # on the NAS only: as if a replica were still writing S3
    monitor = monitor_for({"NAS_PATH": str(nas), **s3.env(bucket)})
    assert monitor.payload()["status"] == "ok"
    monitor._first_seen[made.id] -= 60  # the NAS showed it a minute ago; S3 was read after that
    doc = monitor.payload()
    assert doc["status"] == "critical"
    assert f"the newest backup {made.id} has no intact copy on s3" in check(doc, "copies")["message"]


def test_missed_slots_count_from_the_newest_backup_or_the_start_and_escalate(nas: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from app.schedule_spec import parse_schedule

    made = plant(nas_target(nas), "app", age_s=30)
    settings = load_settings({"POSTGRES_DB": "app", "NAS_PATH": str(nas), "BACKUP_TIMEOUT": "10m",
                              "CLOCK_SKEW_TOLERANCE": "1m"})
    monitor = HealthMonitor(settings, make_targets(settings), watch_loop=False, read_server=False,
                            schedule=parse_schedule("every 1h"))
    monitor.refresh_all(wait=10)
    monitor.started_wall = made.started_at - timedelta(days=1)
    base = made.started_at.replace(minute=0, second=0) + timedelta(hours=1)  # the next fire time
    for hours_later, status, missed in ((0, "ok", 1), (1, "warning", 2), (2, "critical", 3)):
        at = base + timedelta(hours=hours_later, minutes=11)  # BACKUP_TIMEOUT + tolerance after the fire
        doc = monitor.payload(now=at)
        slots = check(doc, "slots")
        assert (slots["status"], slots["missed_slots"]) == (status, missed), (hours_later, slots)
    assert monitor.payload(now=base + timedelta(minutes=5))["status"] == "ok", "a slot still running is not missed"
    assert datetime.now(UTC) > made.started_at


def test_minimal_detail_keeps_the_fields_and_drops_paths(tmp_path: Path) -> None:
    secret_path = tmp_path / "not-mounted-secret-path"
    doc = monitor_for({"NAS_PATH": str(secret_path), "HEALTH_DETAIL": "minimal",
                       "BACKUP_HOSTNAME": "node-secret"}).payload()
    assert set(doc) >= {"status", "code", "last_success", "last_run", "next_run_at", "checks"}
    assert "host" not in doc
    assert str(secret_path) not in str(doc) and "node-secret" not in str(doc)
    assert check(doc, "target:nas")["message"] == "nas: cannot be read"


@pytest.mark.parametrize("where", ["nas", "s3"])
def test_refreshes_fetch_only_new_or_replaced_manifests(where: str, nas: Path, s3: S3Server, bucket: str) -> None:
    """A year of history must not cost a GET per manifest per minute; a replaced manifest is still seen."""
    env = {"NAS_PATH": str(nas)} if where == "nas" else s3.env(bucket)
    monitor = monitor_for(env)
    [view] = monitor.views
    target = view.target
    made = [plant(target, "app", age_s=HOUR * (3 + i)) for i in range(5)]
    monitor.refresh_all(wait=20)
    assert view.cache.fetched == 5 and len(view.entries or []) == 5
    monitor.refresh_all(wait=20)
    assert view.cache.fetched == 5  # nothing changed: no GET
    plant(target, "app", age_s=HOUR)
    failed = made[0]
    time.sleep(1.1)  # S3 lists modification times to the second
    key = layout.manifest_key("app", failed.started_at)
    target.replace_bytes(key, dataclasses.replace(failed, status="failed", error="replaced").to_json())
    monitor.refresh_all(wait=20)
    assert view.cache.fetched == 7  # the new one and the replaced one
    entry = next(e for e in view.entries or [] if e.id == failed.id)
    assert entry.status == "failed"
    target.delete(key)
    target.delete(failed.artifact)
    monitor.refresh_all(wait=20)
    assert failed.id not in {e.id for e in view.entries or []} and view.cache.fetched == 7
