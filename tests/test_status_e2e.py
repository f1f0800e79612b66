"""The status page and /api/v1 of a real `run` process, with real backups, failures, a skip and a drill on a
real NAS directory and S3 server, read by the real CLI, a headless Chromium and schemathesis.

One scenario is built once for the module (about 30 s): two manual `backup` runs (the database backs up, a
second unit names a database that does not exist and fails), a real drill (`verify --restore-test`), then
`run` with a 5 s schedule while LOCK_FILE is held elsewhere (a skip only the process knows of), one scheduled
job once it is free, and the lock held again so nothing changes while the tests compare. Backups run as a
role with only pg_read_all_data; the drill as the drill server's superuser (README: Roles).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from conftest import CANARY, Cli, PgServer, S3Server, require_tool
from test_runtime import Sidecar, manifests, small_db

from app.locks import file_lock

TOKEN = "st-" + secrets.token_hex(16)
ALERTS = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"


def fetch(s: Sidecar, path: str, token: str | None = TOKEN, auth: str | None = None) -> tuple[int, Message, bytes]:
    """GET ``path`` from the sidecar with the bearer ``token`` (or the raw ``auth`` header; neither: none)."""
    headers = {"Authorization": auth or f"Bearer {token}"} if (token or auth) else {}
    req = urllib.request.Request(s.url + path, headers=headers)  # noqa: S310 - the local sidecar
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - the local sidecar
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def fetch_json(s: Sidecar, path: str, token: str | None = TOKEN) -> dict[str, Any]:
    status, _, body = fetch(s, path, token)
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


@dataclass
class Scenario:
    sidecar: Sidecar
    cli: Cli
    env: dict[str, str]
    db: str
    missing: str
    nas: Path
    s3: S3Server
    bucket: str

    def get(self, path: str, token: str | None = TOKEN, auth: str | None = None) -> tuple[int, Message, bytes]:
        return fetch(self.sidecar, path, token, auth)

    def json(self, path: str) -> dict[str, Any]:
        return fetch_json(self.sidecar, path)


def _count(s: Sidecar, text: str) -> int:
    return s.log().count(text)


def _wait(what: str, pred, s: Sidecar, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline or s.proc.poll() is not None:
            raise AssertionError(f"timed out waiting for {what}:\n{s.log()[-4000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def scenario(pg: PgServer, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("status")
    cli = Cli(root)
    nas = root / "nas"
    nas.mkdir()
    bucket = s3.make_bucket()
    db = small_db(pg)
    role = f"status_backup_{secrets.token_hex(3)}"
    pg.psql("postgres", f"CREATE ROLE {role} LOGIN PASSWORD '{CANARY}' IN ROLE pg_read_all_data")
    missing = f"gone_{secrets.token_hex(3)}"
    lock = root / "shared.lock"
    env = {
        **pg.env(POSTGRES_USER=role, POSTGRES_DB=f"{db},{missing}"), "NAS_PATH": str(nas), **s3.env(bucket),
        "LOCK_FILE": str(lock), "STATUS_TOKEN": TOKEN, "PRUNE_AFTER_BACKUP": "false", "BACKUP_KEEP_DAILY": "1",
        "BACKUP_KEEP_WEEKLY": "0", "BACKUP_KEEP_MONTHLY": "0", "BACKUP_KEEP_MIN": "1", "BACKUP_HOSTNAME": "status-host",
        "DRILL_DATABASE_URL": f"postgresql://{pg.user}:{CANARY}@{pg.host}:{pg.port}/postgres",
    }
    for _ in range(2):
        made = cli.run("backup", env=env)
        assert made.returncode == 1 and "does not exist" in made.stderr, made.stderr
    cli.run("verify", "latest", "--db", db, "--restore-test", env=env, check=True)
    skip_line = "already running on the-other-pod"
    with file_lock(lock, "backup", "the-other-pod"):
        s = Sidecar(cli, {**env, "BACKUP_SCHEDULE": "every 5s"})
        s.wait_log(skip_line, timeout=30)

    def made(name: str) -> int:
        return sum(m.database == name for m in manifests(nas))

    _wait("a scheduled job of the run process", lambda: made(db) == 3 and made(missing) == 3, s)
    try:
        with file_lock(lock, "backup", "the-other-pod", timeout_s=60):  # freeze: every job now skips
            skips = _count(s, skip_line)
            _wait("a skip after the freeze", lambda: _count(s, skip_line) > skips, s)
            scenario = Scenario(s, cli, env, db, missing, nas, s3, bucket)
            _wait("the cache to hold every backup",
                  lambda: scenario.json("/api/v1/backups?limit=10000")["total"] == 6, s)
            yield scenario
    finally:
        s.stop()


def _normalized(message: str) -> str:
    return re.sub(r"\d+", "N", message)


def test_api_and_page_agree_with_list_json_and_health(scenario: Scenario) -> None:
    sc = scenario
    listed = json.loads(sc.cli.run("list", "--json", env=sc.env, check=True).stdout)
    api = sc.json("/api/v1/backups?limit=10000")
    assert [b["id"] for b in api["backups"]] == [b["id"] for b in listed["backups"]]
    fields = ("database", "kind", "status", "state", "slot", "started_at", "finished_at", "duration_s", "size_bytes",
              "raw_bytes", "sha256", "format", "compression", "stored_on", "foreign", "warnings", "error", "host")
    for mine, theirs in zip(api["backups"], listed["backups"], strict=True):
        assert {f: mine[f] for f in fields} == {f: theirs[f] for f in fields}, mine["id"]
        drill = theirs["last_drill"]
        assert (mine["last_drill"] or {}).get("rto_s") == (drill or {}).get("rto_s"), mine["id"]
    assert api["errors"] == listed["errors"] == {}
    ok = [b for b in listed["backups"] if b["database"] == sc.db]
    assert all(b["state"] == "ok" and b["stored_on"] == ["nas", "s3"] for b in ok) and len(ok) == 3
    failed = [b for b in listed["backups"] if b["database"] == sc.missing]
    assert len(failed) == 3 and all(b["state"] == "failed" and "does not exist" in b["error"] for b in failed)
    [drilled] = [b for b in listed["backups"] if b["last_drill"]]
    assert drilled["last_drill"]["status"] == "ok"

    status = sc.json("/api/v1/status")
    _, health = sc.sidecar.health()
    live = status["health"]
    assert (live["status"], live["code"]) == (health["status"], health["code"]) == ("critical", 2)
    assert [(c["name"], c["status"], _normalized(c["message"])) for c in live["checks"]] == \
        [(c["name"], c["status"], _normalized(c["message"])) for c in health["checks"]]
    units = {u["name"]: u for u in status["units"]}
    assert set(units) == {sc.db, sc.missing}
    assert units[sc.db]["last_success"]["id"] == ok[0]["id"] == health["databases"][sc.db]["last_success"]["id"]
    assert units[sc.db]["copies"] == ["nas", "s3"] and units[sc.db]["status"] == "ok"
    assert units[sc.db]["last_drill"]["backup_id"] == drilled["id"] and units[sc.db]["last_drill"]["rto_s"] > 0
    assert units[sc.missing]["status"] == "critical" and units[sc.missing]["last_success"] is None
    assert units[sc.missing]["last_run"] == health["databases"][sc.missing]["last_run"]
    assert {t["name"]: t["status"] for t in status["targets"]} == {"nas": "ok", "s3": "ok"}
    assert status["targets"][0]["free_bytes"] > 0 and status["targets"][1]["free_bytes"] is None

    runs = sc.json("/api/v1/runs?limit=10000")["runs"]
    from_manifests = [r for r in runs if r["recorded"] == "manifest"]
    assert sorted(r["id"] for r in from_manifests) == sorted(b["id"] for b in listed["backups"])
    skips = [r for r in runs if r["outcome"] == "skipped"]
    assert len(skips) >= 2 and {r["skip"] for r in skips} == {"lock"}
    assert all("already running on the-other-pod" in r["reason"] for r in skips)
    assert [r["outcome"] for r in runs if r["database"] == sc.missing] == ["failed"] * 3

    status_code, _, body = sc.get("/")
    page = body.decode()
    assert status_code == 200
    for b in listed["backups"]:
        assert b["id"] in page, b["id"]
    for c in health["checks"]:
        assert f'data-name="{c["name"]}"' in page
    for body in (page, json.dumps(status), json.dumps(api), json.dumps(runs)):
        for secret in (CANARY, TOKEN, sc.s3.secret_key):
            assert secret not in body


def test_retention_plan_on_the_page_is_prunes_dry_run(scenario: Scenario) -> None:
    dry = scenario.cli.run("prune", "--dry-run", env=scenario.env, check=True).stdout
    planned = sorted((m[1], m[2].strip()) for m in re.finditer(r"^  delete +(\S+) +(.+)$", dry, re.M))
    status = scenario.json("/api/v1/status")
    assert sorted((d["id"], d["reason"]) for d in status["retention"]["delete"]) == planned
    assert len(planned) == 2 and status["retention"]["blocked"] is None  # BACKUP_KEEP_DAILY=1: the two older go
    page = scenario.get("/")[2].decode()
    for backup_id, _ in planned:
        assert f"<code>{backup_id}</code> outside retention" in page


def chromium(tmp_path: Path):
    """Debian's chromium through its chromedriver, headless, with a fresh profile (the machine's flags)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary = require_tool("/usr/bin/chromium", "chromium")
    driver_path = require_tool("/usr/bin/chromedriver", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1280,1600"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_page_renders_in_headless_chromium_on_a_desktop_and_a_phone(scenario: Scenario, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = chromium(tmp_path)
    try:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {TOKEN}"}})
        driver.get(scenario.sidecar.url + "/")
        assert driver.find_element(By.ID, "verdict").text == "CRITICAL"
        charts = {c.get_attribute("data-database"): c for c in driver.find_elements(By.CSS_SELECTOR, "svg.chart")}
        assert set(charts) == {scenario.db, scenario.missing}
        bars = charts[scenario.db].find_elements(By.CSS_SELECTOR, "rect.backup")
        assert len(bars) == 3 and all(b.size["height"] > 0 for b in bars)
        assert len(charts[scenario.db].find_elements(By.CSS_SELECTOR, "path.drill.ok")) == 1
        assert len(charts[scenario.missing].find_elements(By.CSS_SELECTOR, "g.failure.failed")) == 3
        assert not charts[scenario.missing].find_elements(By.CSS_SELECTOR, "rect.backup")
        runs = driver.find_elements(By.CSS_SELECTOR, "#runs tr.run")
        assert sum("skipped" in r.get_attribute("class") for r in runs) >= 2
        failed = [r for r in runs if r.get_attribute("class") == "run failed"]
        assert len(failed) == 3 and all("does not exist" in r.text for r in failed)
        units = driver.find_elements(By.CSS_SELECTOR, "article.unit")
        assert [u.get_attribute("data-database") for u in units] == [scenario.db, scenario.missing]
        assert "nas, s3" in units[0].find_element(By.CSS_SELECTOR, ".copies").text
        assert "RTO" in units[0].find_element(By.CSS_SELECTOR, ".last-drill").text
        driver.set_window_size(1280, driver.execute_script("return document.documentElement.scrollHeight") + 100)
        shot = tmp_path / "status-desktop.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")

        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
        driver.get(scenario.sidecar.url + "/?days=7")
        assert driver.execute_script("return window.innerWidth") == 390
        width = driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways on a phone: {width}px wide"
        assert driver.find_element(By.CSS_SELECTOR, "svg.chart").size["width"] <= 390
        phone = tmp_path / "status-phone.png"
        assert driver.save_screenshot(str(phone))
        print(f"screenshot: {phone}")
    finally:
        driver.quit()


def test_token_protects_the_page_and_api_and_nothing_else(scenario: Scenario) -> None:
    guarded = ("/", "/status", "/status?days=90", "/api/v1/status", "/api/v1/backups", "/api/v1/runs")
    basic = "Basic " + base64.b64encode(f"operator:{TOKEN}".encode()).decode()
    for path in guarded:
        status, headers, body = scenario.get(path, token=None)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm="), path
        assert json.loads(body)["error"].startswith("this page needs STATUS_TOKEN")
        assert scenario.get(path, token=TOKEN[:-1])[0] == 401
        assert scenario.get(path, auth=f"Basic {base64.b64encode(b'operator:wrong').decode()}")[0] == 401
        assert scenario.get(path)[0] == 200 and scenario.get(path, auth=basic)[0] == 200
    for path in ("/health", "/metrics", "/api/v1/openapi.json"):
        status, _, _ = scenario.get(path, token=None)
        assert status in (200, 503), path  # /health is 503 while CRITICAL, and open all the same
    headers = scenario.get("/")[1]
    assert "default-src 'none'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"


def test_openapi_document_validates_and_schemathesis_finds_no_server_error(scenario: Scenario,
                                                                          tmp_path: Path) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    _, _, body = scenario.get("/api/v1/openapi.json", token=None)
    doc = json.loads(body)
    validator.validate(doc)
    assert set(doc["paths"]) == {"/api/v1/status", "/api/v1/backups", "/api/v1/runs"}
    st = Path(sys.executable).with_name("schemathesis")
    if not st.exists():
        pytest.skip("schemathesis is missing: pip install -e '.[test]'")
    run = subprocess.run(
        [str(st), "run", scenario.sidecar.url + "/api/v1/openapi.json", "--header", f"Authorization: Bearer {TOKEN}",
         "--checks", "all", "--max-examples", "100", "--seed", "1616", "--workers", "1",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "10"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or "passed" in run.stdout.lower(), run.stdout[-3000:]


def test_monitoring_files_name_only_metrics_the_sidecar_serves(scenario: Scenario) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    _, _, body = scenario.get("/metrics", token=None)
    served = set()
    for family in text_string_to_metric_families(body.decode()):
        served |= {s.name for s in family.samples} | {family.name}
    used = set(re.findall(r"\bbackup_sidecar_[a-z_]+", (ALERTS / "alerts.yml").read_text()
                          + (ALERTS / "grafana-dashboard.json").read_text()))
    assert used and used <= served, used - served
    samples = {(s.name, s.labels.get("database")): s.value for f in text_string_to_metric_families(body.decode())
               for s in f.samples}
    assert samples[("backup_sidecar_last_run_success", scenario.missing)] == 0  # BackupLastRunFailed fires
    assert samples[("backup_sidecar_last_run_success", scenario.db)] == 1
    assert samples[("backup_sidecar_last_drill_success", scenario.db)] == 1


def test_minimal_detail_page_and_api_of_a_second_replica(scenario: Scenario) -> None:
    """A replica on the same targets with HEALTH_DETAIL=minimal and no token: it shows the same backups, and no
    host, error text, path or bucket."""
    env = {k: v for k, v in scenario.env.items() if k != "STATUS_TOKEN"}
    s = Sidecar(scenario.cli, {**env, "HEALTH_DETAIL": "minimal", "BACKUP_SCHEDULE": "03:00",
                               "LOCK_FILE": str(scenario.cli.cwd / "replica.lock")})
    try:
        s.wait_for("the targets read", lambda d: d["last_success"] is not None or d["status"] == "critical")
        _wait("both targets", lambda: fetch_json(s, "/api/v1/backups", None)["total"] == 6, s, timeout=30)
        bodies = {p: fetch(s, p, token=None)[2].decode() for p in
                  ("/", "/api/v1/status", "/api/v1/backups", "/api/v1/runs")}
        for path, body in bodies.items():
            for secret in ("status-host", "does not exist", str(scenario.nas), scenario.bucket, "127.0.0.1", CANARY):
                assert secret not in body, (path, secret)
        backups = json.loads(bodies["/api/v1/backups"])["backups"]
        assert {b["id"] for b in backups} == {b["id"] for b in scenario.json("/api/v1/backups")["backups"]}
        assert all("host" not in b for b in backups)
        assert {b["error"] for b in backups if b["state"] == "failed"} == {
            "failed (details withheld: HEALTH_DETAIL=minimal)"}
    finally:
        s.stop()


def test_page_and_api_answer_at_once_while_a_target_hangs(cli: Cli, nas: Path) -> None:
    """S3 accepts connections and never answers: the page and API still answer from what the NAS showed, the
    hanging target is a check, and the retention plan says prune would delete nothing."""
    import socket

    from test_runtime import HOUR, nas_target, plant

    made = plant(nas_target(nas), "app", age_s=HOUR)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    s = Sidecar(cli, {"NAS_PATH": str(nas), "POSTGRES_DB": "app", "S3_BUCKET": "backups",
                      "S3_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "STATUS_TOKEN": TOKEN})
    try:
        slowest, status = 0.0, {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                code, _, body = fetch(s, "/")
                status = fetch_json(s, "/api/v1/status")
            except OSError:  # not listening yet
                time.sleep(0.2)
                continue
            slowest = max(slowest, time.monotonic() - t0)
            assert code == 200
            s3_check = next((c for c in status["health"]["checks"] if c["name"] == "target:s3"), {})
            if "no answer for" in s3_check.get("message", ""):
                break
            time.sleep(0.2)
        assert "no answer for" in s3_check["message"] and s3_check["status"] == "warning", status
        assert slowest < 1.0, f"a request took {slowest:.2f}s while S3 hangs"
        assert status["units"][0]["last_success"]["id"] == made.id and status["units"][0]["copies"] == ["nas"]
        assert status["retention"]["blocked"].startswith("prune would delete nothing now: a target cannot be read")
        assert "no answer for" in body.decode() and made.id in body.decode()
    finally:
        s.stop()
        server.close()
