"""DRILL_SCHEDULE in `run`: the latest backups are drilled on schedule, and /health and /metrics show the last
drill; a failed drill makes /health CRITICAL (SPEC)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Cli, PgServer
from test_runtime import nas_target, plant, sidecar, small_db  # noqa: F401 - pytest fixture

from app import layout
from app.health import HealthMonitor
from app.settings import load_settings
from app.targets import make_targets


def test_scheduled_drill_shows_in_health_and_metrics(sidecar, pg: PgServer, nas: Path) -> None:  # noqa: F811
    db = small_db(pg)
    s = sidecar(pg.env(POSTGRES_DB=db, NAS_PATH=str(nas), BACKUP_ON_START="true", DRILL_SCHEDULE="every 5s"))
    doc = s.wait_for("a drill", lambda d: any(c["name"] == "last_drill" for c in d["checks"]), timeout=90)
    [check] = [c for c in doc["checks"] if c["name"] == "last_drill"]
    assert check["status"] == "ok" and f"{db}: {db}-" in check["message"] and "RTO" in check["message"], check
    status, body = s.get("/metrics")
    text = body.decode()
    assert f'backup_sidecar_last_drill_success{{database="{db}"}} 1.0' in text
    assert f'backup_sidecar_last_drill_rto_seconds{{database="{db}"}}' in text
    [record] = [json.loads(p.read_text()) for p in nas.rglob("*.drill-*.json")][:1]
    assert record["status"] == "ok" and record["compared"].startswith("1 tables")
    assert pg.psql("postgres", "SELECT count(*) FROM pg_database WHERE datname LIKE 'backup_sidecar%'") == "0"
    s.stop()
    assert s.returncode == 0


def test_a_failed_last_drill_makes_health_critical(nas: Path) -> None:
    target = nas_target(nas)
    m = plant(target, "shop", age_s=600)
    record = {"backup_id": m.id, "database": "shop", "status": "failed", "started_at": "2026-12-01T04:00:00Z",
              "error": "restore from nas into x failed: role \"app_owner\" does not exist"}
    target.put_bytes(layout.drill_key(m.id, m.finished_at), json.dumps(record).encode())  # type: ignore[arg-type]
    settings = load_settings({"NAS_PATH": str(nas), "POSTGRES_DB": "shop"})
    monitor = HealthMonitor(settings, make_targets(settings), watch_loop=False)
    monitor.refresh_all(wait=10)
    doc = monitor.payload()
    [check] = [c for c in doc["checks"] if c["name"] == "last_drill"]
    assert doc["status"] == "critical" and check["status"] == "critical"
    assert 'role "app_owner" does not exist' in check["message"]


def test_drill_settings_are_checked_and_the_drill_url_is_a_secret(cli: Cli, nas: Path) -> None:
    bad = cli.run("config", env={"NAS_PATH": str(nas), "DRILL_SCHEDULE": "sun 04:00"})
    assert bad.returncode == 2 and 'DRILL_SCHEDULE "sun 04:00"' in bad.stderr
    url = "postgresql://drill:Drill-Secret-pw@drill-host:5433/postgres"
    shown = cli.run("config", env={"NAS_PATH": str(nas), "DRILL_DATABASE_URL": url}, check=True)
    assert "Drill-Secret-pw" not in shown.stdout + shown.stderr
    assert "drill-host" in shown.stdout and "5433" in shown.stdout
