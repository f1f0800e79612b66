"""healthcheck/: the standard-library /health checker, against a real local HTTP server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from healthcheck.check import format_age, format_status, main

REPO = Path(__file__).resolve().parents[1]
PERF = "93600;172800"  # the default HEALTH_WARN_AGE 26h and HEALTH_CRIT_AGE 48h in seconds

OK_PAYLOAD: dict[str, Any] = {
    "status": "ok",
    "code": 0,
    "last_success": {
        "id": "app-20261122T030000Z",
        "finished_at": "2026-11-22T03:00:41Z",
        "age_seconds": 11520,
        "size_bytes": 52428800,
    },
    "last_run": {"status": "ok", "finished_at": "2026-11-22T03:00:41Z", "error": None},
    "next_run_at": "2026-11-23T03:00:00Z",
    "checks": [
        {"name": "backup_age", "status": "ok", "message": "last backup 3h12m old"},
        {"name": "scheduler", "status": "ok", "message": "ticking"},
    ],
}
WARNING_PAYLOAD: dict[str, Any] = {
    **OK_PAYLOAD,
    "status": "warning",
    "code": 1,
    "last_success": {**OK_PAYLOAD["last_success"], "age_seconds": 97200},
    "checks": [
        {"name": "backup_age", "status": "warning", "message": "older than HEALTH_WARN_AGE 26h"},
        {"name": "scheduler", "status": "ok", "message": "ticking"},
    ],
}
CRITICAL_PAYLOAD: dict[str, Any] = {
    "status": "critical",
    "code": 2,
    "last_success": {
        "id": "app-20261120T030000Z",
        "finished_at": "2026-11-20T03:00:00Z",
        "age_seconds": 183600,
        "size_bytes": 52428800,
    },
    "last_run": {
        "status": "failed",
        "finished_at": "2026-11-22T03:00:02Z",
        "error": "pg_dump: connection refused",
    },
    "next_run_at": "2026-11-23T03:00:00Z",
    "checks": [
        {"name": "backup_age", "status": "warning", "message": "older than HEALTH_WARN_AGE 26h"},
        {"name": "last_run", "status": "critical", "message": "pg_dump: connection refused"},
        {"name": "scheduler", "status": "critical", "message": "no tick for 15m"},
    ],
}
NO_BACKUP_PAYLOAD: dict[str, Any] = {
    "status": "warning",
    "code": 1,
    "last_success": None,
    "last_run": None,
    "next_run_at": "2026-11-23T03:00:00Z",
    "checks": [{"name": "backup_age", "status": "warning", "message": "no backup yet"}],
}


class Routes:
    """What the fake sidecar answers per path: (HTTP status, body bytes).

    ``/slow`` stalls before its headers and ``/slow-body`` in the middle of its body, until released.
    """

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.release = threading.Event()

    def json(self, path: str, payload: object, status: int = 200) -> None:
        self.answers[path] = (status, json.dumps(payload).encode())


@pytest.fixture
def server() -> Iterator[tuple[str, Routes]]:
    routes = Routes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/slow":
                routes.release.wait(10)
            status, body = routes.answers.get(self.path, (404, b"not found"))
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path == "/slow-body":
                    self.wfile.write(body[:10])
                    self.wfile.flush()
                    routes.release.wait(10)
                self.wfile.write(body)
            except OSError:
                pass  # the client gave up (the timeout case)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
    routes.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HEALTH_URL", "HEALTH_PORT", "HEALTH_WARN_AGE", "HEALTH_CRIT_AGE"):
        monkeypatch.delenv(name, raising=False)


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1, out
    return code, out.rstrip("\n")


VERDICTS = [
    (
        OK_PAYLOAD,
        200,
        0,
        f"BACKUP OK - last backup 3h12m ago (app-20261122T030000Z) | age=11520s;{PERF}",
    ),
    (
        WARNING_PAYLOAD,
        200,
        1,
        "BACKUP WARNING - last backup 1d3h ago (app-20261122T030000Z); "
        f"backup_age: older than HEALTH_WARN_AGE 26h | age=97200s;{PERF}",
    ),
    (
        CRITICAL_PAYLOAD,
        503,
        2,
        "BACKUP CRITICAL - last run failed: pg_dump: connection refused; "
        f"last backup 2d3h ago (app-20261120T030000Z) | age=183600s;{PERF}",
    ),
    (
        NO_BACKUP_PAYLOAD,
        200,
        1,
        f"BACKUP WARNING - no backup yet | age=U;{PERF}",
    ),
    (
        {
            **OK_PAYLOAD,
            "status": "critical",
            "code": 2,
            "checks": [{"name": "scheduler", "status": "critical", "message": "no tick for 15m"}],
        },
        503,
        2,
        "BACKUP CRITICAL - last backup 3h12m ago (app-20261122T030000Z); scheduler: no tick for 15m "
        f"| age=11520s;{PERF}",
    ),
]


@pytest.mark.parametrize(("payload", "http_status", "code", "line"), VERDICTS)
def test_verdict_of_the_sidecar_becomes_exit_code_and_line(
    server: tuple[str, Routes],
    capsys: pytest.CaptureFixture[str],
    payload: dict[str, Any],
    http_status: int,
    code: int,
    line: str,
) -> None:
    base, routes = server
    routes.json("/health", payload, http_status)
    assert check(capsys, "--url", f"{base}/health") == (code, line)


def test_not_json_is_unknown(server: tuple[str, Routes], capsys: pytest.CaptureFixture[str]) -> None:
    base, routes = server
    routes.answers["/health"] = (200, b"<html>hello</html>")
    assert check(capsys, "--url", f"{base}/health") == (
        3,
        f"BACKUP UNKNOWN - {base}/health did not answer JSON "
        "(HTTP 200: Expecting value: line 1 column 1 (char 0)) "
        "(hint: is this the sidecar's /health URL?)",
    )


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ([1, 2], "a JSON list, not an object"),
        ({"status": "ok"}, '"code" is missing or not 0, 1 or 2'),
        ({**OK_PAYLOAD, "code": 7}, '"code" is missing or not 0, 1 or 2'),
        ({**OK_PAYLOAD, "code": True}, '"code" is missing or not 0, 1 or 2'),
        ({**OK_PAYLOAD, "status": "critical"}, '"status" \'critical\' does not match "code" 0'),
        ({**OK_PAYLOAD, "last_success": "yesterday"}, '"last_success" is neither an object nor null'),
        ({**OK_PAYLOAD, "last_run": [1]}, '"last_run" is neither an object nor null'),
        ({**OK_PAYLOAD, "checks": {"a": 1}}, '"checks" is not a list of objects'),
        (
            {**OK_PAYLOAD, "last_success": {"id": "x", "age_seconds": "3h"}},
            '"last_success.age_seconds" is not a number of seconds',
        ),
    ],
)
def test_unexpected_shape_is_unknown(
    server: tuple[str, Routes], capsys: pytest.CaptureFixture[str], payload: object, problem: str
) -> None:
    base, routes = server
    routes.json("/health", payload)
    code, line = check(capsys, "--url", f"{base}/health")
    assert code == 3
    suffix = (
        "" if isinstance(payload, list) else " (hint: the sidecar and this checker may be different versions)"
    )
    assert line == f"BACKUP UNKNOWN - unexpected /health payload: {problem}{suffix}"


def test_http_error_other_than_503_is_unknown(
    server: tuple[str, Routes], capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = server
    assert check(capsys, "--url", f"{base}/nothing-here") == (
        3,
        f"BACKUP UNKNOWN - {base}/nothing-here answered HTTP 404 (hint: is this the sidecar's /health URL?)",
    )


def test_slow_sidecar_times_out_as_unknown(
    server: tuple[str, Routes], capsys: pytest.CaptureFixture[str]
) -> None:
    base, routes = server
    routes.json("/slow", OK_PAYLOAD)
    assert check(capsys, "--url", f"{base}/slow", "--timeout", "0.3") == (
        3,
        f"BACKUP UNKNOWN - no answer from {base}/slow within 0.3s "
        "(hint: the sidecar may be busy or hung; raise --timeout)",
    )


def test_body_stalling_after_headers_times_out_as_unknown(
    server: tuple[str, Routes], capsys: pytest.CaptureFixture[str]
) -> None:
    base, routes = server
    routes.json("/slow-body", CRITICAL_PAYLOAD, 503)
    assert check(capsys, "--url", f"{base}/slow-body", "--timeout", "0.3") == (
        3,
        f"BACKUP UNKNOWN - no answer from {base}/slow-body within 0.3s "
        "(hint: the sidecar may be busy or hung; raise --timeout)",
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_closed_port_is_unknown_with_hint(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = closed_port()
    monkeypatch.setenv("HEALTH_PORT", str(port))
    assert check(capsys) == (
        3,
        f"BACKUP UNKNOWN - cannot reach http://127.0.0.1:{port}/health: connection refused "
        "(hint: is the sidecar running? check HEALTH_PORT)",
    )


def test_default_url_uses_health_port(
    server: tuple[str, Routes], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, routes = server
    routes.json("/health", OK_PAYLOAD)
    monkeypatch.setenv("HEALTH_PORT", base.rsplit(":", 1)[1])
    assert check(capsys)[0] == 0


def test_health_url_overrides_health_port_and_url_flag_overrides_both(
    server: tuple[str, Routes], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, routes = server
    routes.json("/health", OK_PAYLOAD)
    routes.json("/other", WARNING_PAYLOAD)
    monkeypatch.setenv("HEALTH_PORT", str(closed_port()))
    monkeypatch.setenv("HEALTH_URL", f"{base}/health")
    assert check(capsys)[0] == 0
    assert check(capsys, "--url", f"{base}/other")[0] == 1


def test_thresholds_in_payload_win_over_environment(
    server: tuple[str, Routes], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, routes = server
    monkeypatch.setenv("HEALTH_WARN_AGE", "1h")
    routes.json(
        "/health", {**OK_PAYLOAD, "thresholds": {"warn_age_seconds": 7200, "crit_age_seconds": 14400}}
    )
    assert check(capsys, "--url", f"{base}/health")[1].endswith("| age=11520s;7200;14400")


def test_thresholds_come_from_environment_durations(
    server: tuple[str, Routes], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, routes = server
    routes.json("/health", OK_PAYLOAD)
    monkeypatch.setenv("HEALTH_WARN_AGE", "30m")
    monkeypatch.setenv("HEALTH_CRIT_AGE", "7200")
    assert check(capsys, "--url", f"{base}/health")[1].endswith("| age=11520s;1800;7200")


def test_bad_threshold_in_environment_is_unknown(
    server: tuple[str, Routes], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, routes = server
    routes.json("/health", OK_PAYLOAD)
    monkeypatch.setenv("HEALTH_CRIT_AGE", "two days")
    assert check(capsys, "--url", f"{base}/health") == (
        3,
        'BACKUP UNKNOWN - HEALTH_CRIT_AGE "two days" is not a duration '
        "(hint: use seconds or 30s, 15m, 26h, 7d)",
    )


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--timeout", "0"], "BACKUP UNKNOWN - argument --timeout: '0' is not a positive number of seconds"),
        (["--bogus"], "BACKUP UNKNOWN - unrecognized arguments: --bogus"),
        (
            ["--url", "file:///etc/passwd"],
            'BACKUP UNKNOWN - cannot use URL "file:///etc/passwd": only http and https',
        ),
    ],
)
def test_usage_errors_are_unknown_not_critical(
    capsys: pytest.CaptureFixture[str], argv: list[str], line: str
) -> None:
    code, out = check(capsys, *argv)
    assert code == 3
    assert out.startswith(line)


def test_sidecar_text_cannot_break_the_status_line() -> None:
    payload = {
        **CRITICAL_PAYLOAD,
        "last_run": {"status": "failed", "error": "pg_dump: error:\n  a | b\n" + "x" * 3000},
        "checks": [],
    }
    code, line = format_status(payload, 60, 120)
    assert code == 2
    assert "\n" not in line
    assert line.count("|") == 1
    assert line.startswith("BACKUP CRITICAL - last run failed: pg_dump: error: a / b xxx")
    assert "...; last backup 2d3h ago (app-20261120T030000Z) | age=183600s;60;120" in line


def test_a_failed_run_is_said_once_and_whole() -> None:
    """The last run's error and the critical check that carries it are one fact: one mention, not cut."""
    error = ("app: user@db:5432/app: password authentication failed for user \"backup\" (hint: check "
             "POSTGRES_PASSWORD / POSTGRES_PASSWORD_FILE and POSTGRES_USER)") + " and more" * 20
    payload = {
        **CRITICAL_PAYLOAD,
        "last_run": {"status": "failed", "finished_at": "2026-11-22T03:00:41Z", "error": error},
        "checks": [{"name": "last_run", "status": "critical",
                    "message": f"app: app-20261122T030000Z failed: {error}"}],
    }
    code, line = format_status(payload, 60, 120)
    assert code == 2
    assert line.count("password authentication failed") == 1, line
    assert error in line, "the error is cut"
    assert line == f"BACKUP CRITICAL - last run failed: {error}; last backup 2d3h ago (app-20261120T030000Z) " \
                   "| age=183600s;60;120"


def test_worst_check_is_named_only_when_not_ok() -> None:
    payload = {**OK_PAYLOAD, "checks": [{"name": "disk", "status": "warning", "message": "90% full"}]}
    assert (
        format_status(payload, 1, 2)[1]
        == "BACKUP OK - last backup 3h12m ago (app-20261122T030000Z) | age=11520s;1;2"
    )
    warning = {**payload, "status": "warning", "code": 1}
    assert "; disk: 90% full |" in format_status(warning, 1, 2)[1]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (61, "1m1s"), (11520, "3h12m"), (183600, "2d3h"), (86400, "1d0h")],
)
def test_age_uses_two_largest_units(seconds: int, text: str) -> None:
    assert format_age(seconds) == text


def test_module_runs_as_docker_healthcheck(server: tuple[str, Routes]) -> None:
    base, routes = server
    routes.json("/health", CRITICAL_PAYLOAD, 503)
    done = subprocess.run(
        [sys.executable, "-m", "healthcheck", "--url", f"{base}/health"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stdout.startswith("BACKUP CRITICAL - last run failed: pg_dump: connection refused; ")
    assert done.stderr == ""


def test_script_file_runs_without_the_package(server: tuple[str, Routes], tmp_path: Path) -> None:
    base, routes = server
    routes.json("/health", OK_PAYLOAD)
    done = subprocess.run(
        [sys.executable, "-I", str(REPO / "healthcheck" / "check.py"), "--url", f"{base}/health"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (
        0,
        f"BACKUP OK - last backup 3h12m ago (app-20261122T030000Z) | age=11520s;{PERF}\n",
    )


def test_proxy_settings_of_the_environment_are_ignored(server: tuple[str, Routes], tmp_path: Path) -> None:
    """An HTTP_PROXY meant for the application must not swallow the probe and mark the container unhealthy."""
    base, routes = server
    routes.json("/health", OK_PAYLOAD)
    dead_proxy = f"http://127.0.0.1:{closed_port()}"
    env = {"PATH": os.environ["PATH"], "HTTP_PROXY": dead_proxy, "http_proxy": dead_proxy, "NO_PROXY": ""}
    done = subprocess.run(
        [sys.executable, "-I", str(REPO / "healthcheck" / "check.py"), "--url", f"{base}/health"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stdout
