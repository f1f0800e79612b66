"""Ask the sidecar's /health and print one Nagios-style line; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.

Standard library only: it runs as Docker's HEALTHCHECK (``python3 -m healthcheck``), as a file copied onto a
monitoring host (``python3 check.py --url ...``) and behind ``backup-sidecar health``. The verdict is the
sidecar's own ``code``; this script only fetches, checks the shape and words it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, NoReturn

#: No proxies: the sidecar is local or directly reachable, and an HTTP(S)_PROXY meant for the application
#: would otherwise swallow the probe and turn a healthy container "unhealthy".
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
CODE_BY_STATUS = {"ok": OK, "warning": WARNING, "critical": CRITICAL}
DEFAULT_WARN_AGE, DEFAULT_CRIT_AGE = "26h", "48h"
MAX_BODY = 1 << 20
MAX_DETAIL = 1000  # an error with its hint fits; Nagios keeps 8 KB of plugin output, Docker 4 KB

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_CHECK_RANK = {"critical": 3, "unknown": 2, "warning": 1}
_SAME_URL_HINT = "is this the sidecar's /health URL?"
_HEADERS = {"Accept": "application/json", "User-Agent": "backup-sidecar-healthcheck"}


class Unknown(Exception):
    """Why no verdict could be read; str() is the text after ``BACKUP UNKNOWN - ``."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error, which a monitor would read as CRITICAL; make it UNKNOWN."""

    def error(self, message: str) -> NoReturn:
        raise Unknown(f"{message} (hint: see --help)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def main(argv: list[str] | None = None) -> int:
    """Print the status line and return the Nagios exit code (the caller exits with it)."""
    try:
        args = _parser().parse_args(argv)
        url, source = _health_url(args.url)
        payload = fetch(url, args.timeout, source)
        warn_s, crit_s = thresholds(payload)
        code, line = format_status(payload, warn_s, crit_s)
    except _Exit as done:
        return done.status
    except Unknown as exc:
        code, line = UNKNOWN, f"BACKUP UNKNOWN - {exc}"
    print(line)
    return code


def _parser() -> _ArgumentParser:
    p = _ArgumentParser(prog="healthcheck", description=__doc__.splitlines()[0])
    p.add_argument(
        "--url", help="the /health URL (default: HEALTH_URL, else http://127.0.0.1:HEALTH_PORT/health)"
    )
    p.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to connect and for each read (5)")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _health_url(cli_url: str | None) -> tuple[str, str]:
    """The URL and where it came from, so an error can name the setting to fix."""
    if cli_url:
        return cli_url, "--url"
    if os.environ.get("HEALTH_URL"):
        return os.environ["HEALTH_URL"], "HEALTH_URL"
    port = os.environ.get("HEALTH_PORT") or "8080"
    return f"http://127.0.0.1:{port}/health", "HEALTH_PORT"


def fetch(url: str, timeout: float, source: str = "--url") -> dict[str, Any]:
    """The decoded /health object; a 503 carries the CRITICAL payload, so its body is read like a 200's."""
    try:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("only http and https are supported")
        request = urllib.request.Request(url, headers=_HEADERS)  # noqa: S310 - scheme checked above
        response = _OPENER.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        response = exc
    except urllib.error.URLError as exc:
        raise _unreachable(url, exc.reason, timeout, source) from exc
    except ValueError as exc:
        raise Unknown(f'cannot use URL "{url}": {_one_line(str(exc))} (hint: check {source})') from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _unreachable(url, exc, timeout, source) from exc
    try:
        with response:
            status, body = response.status, response.read(MAX_BODY + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise _unreachable(url, exc, timeout, source) from exc
    if status not in (200, 503):
        raise Unknown(f"{url} answered HTTP {status} (hint: {_SAME_URL_HINT})")
    if len(body) > MAX_BODY:
        raise Unknown(f"{url} answered more than {MAX_BODY} bytes (hint: {_SAME_URL_HINT})")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Unknown(f"{url} did not answer JSON (HTTP {status}: {exc}) (hint: {_SAME_URL_HINT})") from exc
    if not isinstance(payload, dict):
        raise Unknown(f"unexpected /health payload: a JSON {type(payload).__name__}, not an object")
    return payload


def _unreachable(url: str, reason: object, timeout: float, source: str) -> Unknown:
    if isinstance(reason, TimeoutError):
        return Unknown(
            f"no answer from {url} within {timeout:g}s "
            "(hint: the sidecar may be busy or hung; raise --timeout)"
        )
    detail = (
        reason.strerror
        if isinstance(reason, OSError) and reason.strerror
        else str(reason) or type(reason).__name__
    )
    detail = detail[:1].lower() + detail[1:]
    return Unknown(f"cannot reach {url}: {_one_line(detail)} (hint: is the sidecar running? check {source})")


def thresholds(payload: dict[str, Any]) -> tuple[int, int]:
    """Age thresholds for the perfdata: the sidecar's own if /health states them, else HEALTH_*_AGE here.

    The sidecar may publish ``"thresholds": {"warn_age_seconds": N, "crit_age_seconds": N}``.
    """
    given = payload.get("thresholds")
    if isinstance(given, dict):
        warn, crit = given.get("warn_age_seconds"), given.get("crit_age_seconds")
        if _is_number(warn) and _is_number(crit):
            return int(warn), int(crit)
    return _env_duration("HEALTH_WARN_AGE", DEFAULT_WARN_AGE), _env_duration(
        "HEALTH_CRIT_AGE", DEFAULT_CRIT_AGE
    )


def _env_duration(name: str, default: str) -> int:
    text = os.environ.get(name) or default
    m = _DURATION.match(text)
    if not m:
        raise Unknown(f'{name} "{text}" is not a duration (hint: use seconds or 30s, 15m, 26h, 7d)')
    return int(m[1]) * _UNIT_SECONDS[m[2].lower()]


def format_status(payload: dict[str, Any], warn_s: int, crit_s: int) -> tuple[int, str]:
    """The exit code and the one status line for a /health payload; UNKNOWN when its shape is unexpected."""
    try:
        return _format(payload, warn_s, crit_s)
    except Unknown as exc:
        return UNKNOWN, f"BACKUP UNKNOWN - {exc}"


def _format(payload: dict[str, Any], warn_s: int, crit_s: int) -> tuple[int, str]:
    code = payload.get("code")
    if not isinstance(code, int) or isinstance(code, bool) or code not in (OK, WARNING, CRITICAL):
        raise _shape('"code" is missing or not 0, 1 or 2')
    if CODE_BY_STATUS.get(payload.get("status")) != code:
        raise _shape(f'"status" {payload.get("status")!r} does not match "code" {code}')
    success = _optional_object(payload, "last_success")
    last_run = _optional_object(payload, "last_run")
    checks = payload.get("checks", [])
    if not isinstance(checks, list) or not all(isinstance(c, dict) for c in checks):
        raise _shape('"checks" is not a list of objects')

    parts: list[str] = []
    error = _one_line(str(last_run.get("error") or "")) if last_run is not None else ""
    if last_run is not None and last_run.get("status") == "failed":
        parts.append(f"last run failed: {_detail(error)}" if error else "last run failed")
    if success is None:
        age_value = "U"
        parts.append("no backup yet")
    else:
        age = success.get("age_seconds")
        if not _is_number(age) or age < 0:
            raise _shape('"last_success.age_seconds" is not a number of seconds')
        age_value = f"{int(age)}s"
        backup_id = success.get("id")
        parts.append(f"last backup {format_age(age)} ago" + (f" ({_detail(backup_id)})" if backup_id else ""))
    if code != OK:
        worst = _worst_check(checks)
        if worst is not None:
            raw = _one_line(str(worst.get("message") or worst.get("status")))
            message = _detail(raw)
            said = any(message in part for part in parts) or (error and error in raw)  # each thing once
            if not said:
                name = worst.get("name")
                parts.append(f"{_detail(name)}: {message}" if name else message)
    text = "; ".join(parts)
    return code, f"BACKUP {STATE_NAMES[code]} - {text} | age={age_value};{warn_s};{crit_s}"


def _optional_object(payload: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = payload.get(key)
    if value is not None and not isinstance(value, dict):
        raise _shape(f'"{key}" is neither an object nor null')
    return value


def _worst_check(checks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first of the most severe non-ok checks: the one an operator should read first."""
    ranked = [(-_CHECK_RANK.get(str(c.get("status")).lower(), 0), i) for i, c in enumerate(checks)]
    candidates = [item for item in ranked if item[0] < 0]
    return checks[min(candidates)[1]] if candidates else None


def _shape(problem: str) -> Unknown:
    return Unknown(
        f"unexpected /health payload: {problem} "
        "(hint: the sidecar and this checker may be different versions)"
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _detail(value: object) -> str:
    """Sidecar text made safe for one status line: no newlines, no '|' (it starts perfdata), bounded."""
    text = _one_line(str(value)).replace("|", "/")
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def format_age(seconds: float) -> str:
    """``3h12m``, ``2d3h``, ``5m10s``: the two largest units, as the sidecar's own logs write ages."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{s}s"
    return f"{s}s"


if __name__ == "__main__":
    raise SystemExit(main())
