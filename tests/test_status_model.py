"""The status page's model, chart, API and token, from real manifests on a real NAS directory, without a process.

What these prove at unit depth (fast, every state reachable): the chart draws each backup, failure and drill
in the window and nothing outside it; HEALTH_DETAIL=minimal withholds what /health withholds; the retention
plan is prune's own; the token check accepts exactly the token; a year of history for ten databases answers
in milliseconds. tests/test_status_e2e.py runs the real process, browser and fuzzer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import REPO
from test_runtime import HOUR, nas_target, plant

from app import layout
from app.health import HealthMonitor
from app.manifest import Manifest
from app.metrics import Metrics
from app.retention import prune
from app.settings import ConfigError, load_settings
from app.status import chart
from app.status.model import WINDOWS, build
from app.targets import make_targets
from app.targets.base import Target
from app.web import make_app

TOKEN = "status-token-" + "x" * 20
DAY = 24 * HOUR


def monitor_for(env: dict[str, str]) -> HealthMonitor:
    settings = load_settings({"POSTGRES_DB": "app", "NAS_REQUIRE_MOUNT": "false", **env})  # tmp dirs, no mounts
    monitor = HealthMonitor(settings, make_targets(settings), watch_loop=False, read_server=False)
    monitor.refresh_all(wait=30)
    return monitor


def drill(target: Target, m: Manifest, status: str = "ok", error: str | None = None, after_s: int = 600) -> None:
    at = (m.finished_at or m.started_at) + timedelta(seconds=after_s)
    record = {"backup_id": m.id, "database": m.database, "status": status, "started_at": at.strftime(
        "%Y-%m-%dT%H:%M:%SZ"), "rto_s": 4.25 if status == "ok" else None, "error": error, "server": "drill-host:5433",
        "compared": "1 tables, 1000 rows as dumped"}
    target.put_bytes(layout.drill_key(m.id, at), json.dumps(record).encode())


def test_chart_draws_each_backup_failure_and_drill_in_its_window_only() -> None:
    end = datetime(2026, 11, 30, 12, tzinfo=UTC)
    points = [chart.Point(end - timedelta(days=d), f"app-{d}", "failed" if d == 3 else "ok", 1000 + d, 10.0 + d,
                          "pg_dump: <boom> & more" if d == 3 else None) for d in range(0, 40)]
    drills = [chart.DrillMark(end - timedelta(days=2), "app-2", "ok", 3.5),
              chart.DrillMark(end - timedelta(days=35), "app-35", "failed", None, "restore failed")]
    svg = chart.render("app", points, drills, end - timedelta(days=30), end)
    assert svg.count('class="backup"') == 30  # days 0..30 minus the failure on day 3
    assert svg.count('class="failure failed"') == 1
    assert svg.count('class="drill ok"') == 1 and 'class="drill failed"' not in svg  # day 35 is outside
    assert "pg_dump: &lt;boom&gt; &amp; more" in svg, "titles are escaped"
    assert 'data-id="app-35"' not in svg
    # the largest backup in the window reaches the top, the smallest stays above the axis
    heights = [float(h) for h in re.findall(r'class="backup"[^>]*height="([0-9.]+)"', svg)]
    assert max(heights) == pytest.approx(chart.PLOT_H - 4) and min(heights) > 100
    empty = chart.render("app", [], [], end - timedelta(days=7), end)
    assert 'class="backup"' not in empty and "0 backup(s)" in empty


def test_model_shows_copies_drills_runs_and_the_window_counts(nas: Path) -> None:
    target = nas_target(nas)
    old = plant(target, "app", age_s=40 * DAY)
    good = plant(target, "app", age_s=2 * DAY)
    plant(target, "app", age_s=DAY, error="pg_dump: error: connection to server failed")
    newest = plant(target, "app", age_s=HOUR)
    drill(target, good)
    monitor = monitor_for({"NAS_PATH": str(nas)})
    monitor.job_finished([], skipped=[("lock", "backup: already running on pod-7 since T (pid 9, backup), skipping")],
                         slot="2026-11-30T03:00:00Z")
    model = build(monitor)
    unit = model.unit("app")
    assert unit is not None and unit.copies == ["nas"]
    assert unit.last_drill is not None and (unit.last_drill["backup_id"], unit.last_drill["rto_s"]) == (good.id, 4.25)
    assert unit.counts[30] == {**unit.counts[30], "backups": 2, "failed": 1, "drills": 1}
    assert unit.counts[90]["backups"] == 3 and set(unit.charts) == set(WINDOWS)
    assert [r["id"] for r in model.runs if r["recorded"] == "manifest"][:1] == [newest.id]
    [skip] = [r for r in model.runs if r["outcome"] == "skipped"]
    assert skip["skip"] == "lock" and "pod-7" in skip["reason"] and skip["slot"] == "2026-11-30T03:00:00Z"
    [failed] = [r for r in model.runs if r["outcome"] == "failed"]
    assert failed["error"] == "pg_dump: error: connection to server failed"
    assert [b["id"] for b in model.backups] == [newest.id, failed["id"], good.id, old.id]


def test_a_run_whose_manifest_no_target_took_is_listed_from_the_process(nas: Path) -> None:
    target = nas_target(nas)
    plant(target, "app", age_s=HOUR)
    monitor = monitor_for({"NAS_PATH": str(nas)})
    now = datetime.now(UTC).replace(microsecond=0)
    lost = Manifest(id=layout.backup_id("app", now), status="failed", database="app", started_at=now, finished_at=now,
                    host="h", format="custom", compression="zstd", artifact="x", error="NAS: no space left on device")
    monitor.job_finished([lost])
    [row] = [r for r in build(monitor).runs if r["id"] == lost.id]
    assert (row["outcome"], row["recorded"], row["error"]) == ("failed", "process", "NAS: no space left on device")


def test_minimal_detail_withholds_hosts_errors_and_paths_everywhere(nas: Path) -> None:
    target = nas_target(nas)
    good = plant(target, "app", age_s=2 * HOUR)
    plant(target, "app", age_s=HOUR, error="pg_dump: connection to db-secret-host.internal failed")
    drill(target, good, status="failed", error="restore on drill-host:5433 failed")
    monitor = monitor_for({"NAS_PATH": str(nas), "HEALTH_DETAIL": "minimal", "BACKUP_HOSTNAME": "pod-host-1"})
    monitor.job_finished([], skipped=[("claim", "app: slot claimed by backup-sidecar@pod-host-2")])
    client = make_app(monitor, Metrics(monitor)).test_client()
    bodies = {path: client.get(path).get_data(as_text=True)
              for path in ("/", "/api/v1/status", "/api/v1/backups", "/api/v1/runs")}
    for path, body in bodies.items():
        for secret in ("db-secret-host", "drill-host", "pod-host", str(nas), "planted"):
            assert secret not in body, (path, secret)
    runs = json.loads(bodies["/api/v1/runs"])["runs"]
    assert {r["reason"] for r in runs if r["outcome"] == "skipped"} == {"another host is backing up this slot"}
    assert all("host" not in r for r in runs)
    status = json.loads(bodies["/api/v1/status"])
    assert status["detail"] == "minimal" and [t["where"] for t in status["targets"]] == [None]
    assert status["health"] == {**status["health"], "status": "critical"} and "host" not in status["health"]


def test_retention_plan_is_what_prune_would_do(nas: Path) -> None:
    target = nas_target(nas)
    for days in (1, 2, 3, 10, 40, 100):
        plant(target, "app", age_s=days * DAY)
    plant(target, "app", age_s=3 * DAY + 60, error="failed long ago")
    env = {"NAS_PATH": str(nas), "BACKUP_KEEP_DAILY": "2", "BACKUP_KEEP_WEEKLY": "1", "BACKUP_KEEP_MONTHLY": "1",
           "BACKUP_KEEP_MIN": "2"}
    monitor = monitor_for(env)
    plan = build(monitor).plan
    dry = prune(monitor.settings, make_targets(monitor.settings), dry_run=True)
    expected = [{"id": d.backup.id, "database": d.backup.database, "reason": d.reason} for d in dry.decisions
                if not d.keep]
    assert plan.blocked is None and plan.delete == expected and len(expected) == 5
    assert "failed, older than a day" in {d["reason"] for d in plan.delete}
    assert plan.keep == sum(d.keep for d in dry.decisions)


def test_retention_plan_says_prune_deletes_nothing_while_a_target_cannot_be_read(nas: Path) -> None:
    plant(nas_target(nas), "app", age_s=HOUR)
    monitor = monitor_for({"NAS_PATH": str(nas / "missing")})
    plan = build(monitor).plan
    assert plan.blocked is not None and plan.blocked.startswith("prune would delete nothing now") and not plan.delete


def test_status_token_guards_page_and_api_only(nas: Path) -> None:
    plant(nas_target(nas), "app", age_s=HOUR)
    monitor = monitor_for({"NAS_PATH": str(nas), "STATUS_TOKEN": TOKEN})
    client = make_app(monitor, Metrics(monitor)).test_client()
    guarded = ("/", "/status", "/status?days=7", "/api/v1/status", "/api/v1/backups", "/api/v1/runs")
    basic = "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    wrong = ("Bearer " + TOKEN[:-1] + "y", "Bearer " + TOKEN + "x", "Basic " + base64.b64encode(
        f"{TOKEN}:".encode()).decode(), f"Token {TOKEN}", "Bearer ", TOKEN)
    for path in guarded:
        denied = client.get(path)
        assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Basic realm="), path
        assert TOKEN not in denied.get_data(as_text=True)
        for header in wrong:
            assert client.get(path, headers={"Authorization": header}).status_code == 401, (path, header)
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
        assert client.get(path, headers={"Authorization": basic}).status_code == 200, path
    for path in ("/health", "/metrics", "/api/v1/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.get("/api/v1/openapi.json").json["security"] == [{"bearer": []}, {"basic": []}]


def test_status_token_is_a_secret_of_at_least_16_printable_characters(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as short:
        load_settings({"NAS_PATH": str(tmp_path), "STATUS_TOKEN": "abc"})
    assert "STATUS_TOKEN is 3 characters long, shorter than 16" in short.value.problems[0]
    with pytest.raises(ConfigError) as spaced:
        load_settings({"NAS_PATH": str(tmp_path), "STATUS_TOKEN": "a token with spaces in it"})
    assert "printable ASCII without spaces" in spaced.value.problems[0]
    (tmp_path / "token").write_text(TOKEN + "\n")
    settings = load_settings({"NAS_PATH": str(tmp_path), "STATUS_TOKEN_FILE": str(tmp_path / "token")})
    assert settings.health.status_token == TOKEN and TOKEN in settings.secrets()
    assert TOKEN not in repr(settings)


def test_bad_query_parameters_are_a_400_with_the_reason(nas: Path) -> None:
    plant(nas_target(nas), "app", age_s=HOUR)
    monitor = monitor_for({"NAS_PATH": str(nas)})
    client = make_app(monitor, Metrics(monitor)).test_client()
    for path, why in (("/api/v1/backups?limit=0", "limit='0' is not a whole number from 1 to 10000"),
                      ("/api/v1/backups?limit=%2B5", "limit='+5' is not a whole number"),
                      ("/api/v1/runs?outcome=maybe", "outcome='maybe' is not one of ok, failed, broken, skipped"),
                      ("/api/v1/backups?state=ok&state=failed", "state is given 2 times")):
        r = client.get(path)
        assert r.status_code == 400 and r.json["error"].startswith(why), (path, r.json)
    page = client.get("/status?days=12")
    assert page.status_code == 400 and "days='12' is not one of 7, 30, 90, 365" in page.get_data(as_text=True)
    limited = client.get("/api/v1/backups?limit=1&database=app").json
    assert (limited["total"], limited["truncated"], len(limited["backups"])) == (1, False, 1)


def year_of_history(root: Path, databases: int, days: int) -> int:
    """``days`` daily backups of each of ``databases`` databases under the NAS directory ``root`` (manifests
    and artifacts in the layout, written directly: the Target API fsyncs each file), every 9th failed.
    Returns the ok backups per database."""
    now = datetime.now(UTC).replace(microsecond=0)
    for d in range(databases):
        name = f"db{d:02d}"
        for i in range(days):
            started = now - timedelta(days=i, hours=2)
            ok = i % 9 != 4
            data = b"\x28\xb5\x2f\xfd" + bytes([i % 251]) * (100 + i)
            m = Manifest(id=layout.backup_id(name, started), status="ok" if ok else "failed", database=name,
                         started_at=started, finished_at=started + timedelta(seconds=20 + i % 30), host="bench",
                         format="custom", compression="zstd", artifact=layout.artifact_key(name, started, "dump.zst"),
                         size_bytes=len(data) if ok else 0, sha256=hashlib.sha256(data).hexdigest() if ok else None,
                         error=None if ok else "pg_dump: error: connection to server failed")
            manifest = root / layout.manifest_key(name, started)
            manifest.parent.mkdir(parents=True, exist_ok=True)
            if ok:
                (root / m.artifact).write_bytes(data)
            manifest.write_bytes(m.to_json())
    return sum(i % 9 != 4 for i in range(days))


def test_a_year_of_ten_databases_renders_from_the_model_without_rebuilding(tmp_path: Path) -> None:
    nas = tmp_path / "nas"
    nas.mkdir()
    ok = year_of_history(nas, 10, 365)
    monitor = monitor_for({"NAS_PATH": str(nas), "POSTGRES_DB": ",".join(f"db{d:02d}" for d in range(10))})
    app = make_app(monitor, Metrics(monitor))
    cache = app.extensions["status_cache"]
    builds = []
    builder = cache.builder
    cache.builder = lambda m: builds.append(1) or builder(m)
    client = app.test_client()
    page = client.get("/?days=365").get_data(as_text=True)
    assert page.count('<svg class="chart"') == 10 and page.count('class="backup"') == 10 * ok
    api = client.get("/api/v1/backups?limit=10000").json
    assert api["total"] == 3650 and not api["truncated"]
    for path in ("/", "/status?days=7", "/api/v1/status", "/api/v1/runs"):
        assert client.get(path).status_code == 200
    assert len(builds) == 1, "the model is built on a change of the cache, never per request"
    monitor.refresh_all(wait=30)  # a new read of the target: the model follows, built in the background
    cache.current()
    assert len(builds) == 2 and client.get("/api/v1/status").status_code == 200 and len(builds) == 2


def test_package_data_ships_the_templates_and_the_openapi_document() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "app.status" in data["packages"]
    globs = data["package-data"]["app.status"]
    shipped = [p.relative_to(REPO / "app" / "status") for p in (REPO / "app" / "status").rglob("*")
               if p.is_file() and p.suffix in (".html", ".json")]
    assert shipped and all(any(p.match(g) for g in globs) for p in shipped), (shipped, globs)


def test_the_health_walk_is_cached_per_change_and_still_follows_the_clock(nas: Path) -> None:
    """/health walks the manifests once per change of the cache; a backup dated ahead of the clock still
    becomes the newest once the clock gets there (and is future again if the clock goes back)."""
    target = nas_target(nas)
    older = plant(target, "app", age_s=HOUR)
    ahead = plant(target, "app", age_s=-600)  # written by a host whose clock runs 10 minutes ahead
    monitor = monitor_for({"NAS_PATH": str(nas)})
    now = datetime.now(UTC)

    def newest(at: datetime) -> tuple[str, bool]:
        doc = monitor.payload(at)
        return doc["databases"]["app"]["last_success"]["id"], any(c["name"] == "clock_skew" for c in doc["checks"])

    assert newest(now) == (older.id, True)
    assert monitor.payload(now) == monitor.payload(now), "the same state answers the same"
    assert newest(now + timedelta(minutes=20)) == (ahead.id, False)
    assert newest(now) == (older.id, True)
    newer = plant(target, "app", age_s=60)
    assert newest(now)[0] == older.id, "nothing is re-read per request"
    monitor.refresh_all(wait=10)
    assert newest(now) == (newer.id, True)
