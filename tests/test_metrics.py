"""/metrics: Prometheus text that promtool accepts, fed by the targets' manifests and this process's runs."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Cli, PgServer, require_tool
from prometheus_client.parser import text_string_to_metric_families
from test_runtime import HOUR, Sidecar, manifests, nas_target, plant, sidecars, small_db

from app.locks import file_lock

PROMTOOL = "/usr/bin/promtool"


@pytest.fixture
def sidecar(cli: Cli) -> Iterator[Callable[[dict[str, str]], Sidecar]]:
    yield from sidecars(cli)


def scrape(s: Sidecar) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    status, body = s.get("/metrics")
    assert status == 200
    text = body.decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return text, samples


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    promtool = require_tool(PROMTOOL, "prometheus")
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)


def test_metrics_pass_promtool_and_describe_the_run(sidecar, pg: PgServer, nas: Path) -> None:
    db = small_db(pg)
    s = sidecar(pg.env(POSTGRES_DB=db, NAS_PATH=str(nas), BACKUP_ON_START="true"))
    s.wait_for("the backup", lambda d: d["status"] == "ok", timeout=60)
    text, samples = scrape(s)
    s.stop()
    lint = promtool_check(text)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    (made,) = manifests(nas)
    label = (("database", db),)
    assert samples[("backup_sidecar_runs_total", label)] == 1
    assert samples[("backup_sidecar_failures_total", label)] == 0
    assert samples[("backup_sidecar_last_success_timestamp_seconds", label)] == made.finished_at.timestamp()
    assert samples[("backup_sidecar_last_success_size_bytes", label)] == made.size_bytes
    assert samples[("backup_sidecar_last_duration_seconds", label)] == made.duration_s
    assert samples[("backup_sidecar_last_run_success", label)] == 1
    assert samples[("backup_sidecar_health_status", ())] == 0
    assert samples[("backup_sidecar_target_up", (("target", "nas"),))] == 1


def test_replica_reports_manifest_ages_and_counts_lock_skips(sidecar, nas: Path, tmp_path: Path) -> None:
    made = plant(nas_target(nas), "app", age_s=27 * HOUR)
    lock = tmp_path / "shared.lock"
    with file_lock(lock, "backup", "the-other-pod"):
        s = sidecar({"NAS_PATH": str(nas), "POSTGRES_DB": "app", "LOCK_FILE": str(lock), "BACKUP_ON_START": "true"})
        s.wait_log("already running on the-other-pod since", timeout=30)
        s.wait_for("the skip", lambda d: d["running"] is None, timeout=10)
        text, samples = scrape(s)
    s.stop()
    assert promtool_check(text).returncode == 0
    assert samples[("backup_sidecar_skips_total", (("reason", "lock"),))] == 1
    assert samples[("backup_sidecar_runs_total", (("database", "app"),))] == 0
    assert samples[("backup_sidecar_last_success_timestamp_seconds", (("database", "app"),))] == (
        made.finished_at.timestamp()
    )
    assert samples[("backup_sidecar_health_status", ())] == 1
    assert s.log().count("already running on the-other-pod") == 1, "one log line per skip"
