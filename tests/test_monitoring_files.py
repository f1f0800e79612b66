"""deploy/monitoring/: the Prometheus alerting rules pass promtool (syntax and their own unit tests), and the
Grafana dashboard's queries are valid PromQL over the sidecar's metric names.

tests/test_status_e2e.py::test_monitoring_files_name_only_metrics_the_sidecar_serves checks the names against a
real /metrics scrape.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from conftest import REPO, require_tool

MONITORING = REPO / "deploy" / "monitoring"
PROMTOOL = "/usr/bin/promtool"
#: The alerts the issue names, and the sidecar metric each one reads.
REQUIRED_ALERTS = {
    "BackupTooOld": "backup_sidecar_last_success_timestamp_seconds",
    "BackupLastRunFailed": "backup_sidecar_last_run_success",
    "BackupDrillFailed": "backup_sidecar_last_drill_success",
    "BackupCopiesMissing": "backup_sidecar_last_success_copies_missing",
}


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool(PROMTOOL, "prometheus"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_alerting_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = {r["alert"]: r for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    for alert, metric in REQUIRED_ALERTS.items():
        assert metric in rules[alert]["expr"], alert
    tests = (MONITORING / "alerts.test.yml").read_text()
    assert all(f"alertname: {alert}" in tests for alert in rules), "every alert has a promtool unit test"


def test_a_broken_rule_fails_promtool(tmp_path: Path) -> None:
    """The check can fail: promtool refuses a rule file with a PromQL error."""
    broken = "groups:\n- name: x\n  rules:\n  - alert: X\n    expr: rate(backup_sidecar_runs_total[5m]\n"
    (tmp_path / "bad.yml").write_text(broken)
    assert promtool("check", "rules", "bad.yml", cwd=tmp_path).returncode != 0


def dashboard_queries() -> list[str]:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_grafana_dashboard_panels_are_well_formed() -> None:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance", "database"} <= variables
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    for metric in REQUIRED_ALERTS.values():
        assert any(metric in q for q in dashboard_queries()), metric


def test_grafana_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query, with Grafana's variables put in, as a recording rule that promtool parses."""
    fill = {"$__rate_interval": "5m", "$__range": "1d", "$instance": ".*", "$database": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_queries()):
        for var, value in fill.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"an unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = promtool("check", "rules", "queries.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    used = {m for q in dashboard_queries() for m in re.findall(r"\bbackup_sidecar_[a-z_]+", q)}
    assert len(used) >= 10, used
