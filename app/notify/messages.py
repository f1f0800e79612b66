"""Subjects and texts: what happened, to which database or backup, on which host; every string masked.

One place for the wording so mail filters and chat searches can rely on it: subjects start with
``[backup-sidecar]`` and then FAILED, OK, CRITICAL, RECOVERED or ``weekly report``, e.g.
``[backup-sidecar] FAILED app on db-host-1: pg_dump: connection refused``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from app.durations import format_duration, format_size
from app.logs import mask
from app.manifest import Manifest
from app.notify.events import Event, FailureKind
from app.notify.report import WeeklyReport

PREFIX = "[backup-sidecar]"
SUBJECT_MAX = 200
ERROR_MAX = 4000  # characters of an error kept in a mail body
CHAT_ERROR_MAX = 1500


#: kind -> (event name, subject word, first sentence with {what}, what to do)
_FAILURES: dict[str, tuple[str, str, str, str]] = {
    "backup": (
        "backup_failed", "", "The backup of {what} FAILED.",
        "Nothing was published for this run; older backups are untouched. "
        "`backup-sidecar list` shows the backups that are kept.",
    ),
    "upload": (
        "upload_failed", "upload ", "Storing the backup of {what} on a target FAILED.",
        "The backup is not on every target; check the target's reachability, credentials and free space.",
    ),
    "lock": (
        "lock_timeout", "lock wait ", "Waiting for the backup lock of {what} timed out: this run did not back up.",
        "Another instance held LOCK_FILE longer than LOCK_TIMEOUT; look for a stuck or overlapping run.",
    ),
    "prune": (
        "prune_failed", "prune ", "Applying retention to {what} FAILED.",
        "Old backups were not removed, so storage keeps growing until this is fixed.",
    ),
    "verify": (
        "verify_failed", "verify ", "Verifying {what} FAILED.",
        "Do not rely on this backup until `backup-sidecar verify` passes.",
    ),
    "restore_test": (
        "restore_test_failed", "restore test ", "The restore test of {what} FAILED.",
        "The backup could not be restored into a scratch database; do not rely on it.",
    ),
}


def first_line(text: str | None, limit: int = 160) -> str:
    """The first non-blank line of ``text``, shortened: what fits a subject or a table cell."""
    for line in (text or "").splitlines():
        line = " ".join(line.split())
        if line:
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


def subject(head: str, reason: str | None = None) -> str:
    """``[backup-sidecar] HEAD: reason``, one line, masked, at most SUBJECT_MAX characters."""
    text = f"{PREFIX} {head}"
    reason_line = first_line(mask(reason or ""))
    if reason_line:
        text = f"{text}: {reason_line}"
    text = mask(" ".join(text.split()))
    return text if len(text) <= SUBJECT_MAX else text[: SUBJECT_MAX - 1] + "…"


def _bounded(text: str, limit: int) -> str:
    text = mask(text.strip())
    return text if len(text) <= limit else text[:limit] + f"\n… ({len(text) - limit} more characters in the log)"


def _when(at: datetime | None) -> str:
    return "-" if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _facts(pairs: list[tuple[str, object]]) -> list[str]:
    return [f"{name + ':':<10} {value}" for name, value in pairs if value not in (None, "")]


def _chat(head: str, error: str | None) -> str:
    """Subject line, plus the error in a code block when there is more to it than the subject shows."""
    if not error or error.strip() == first_line(error):
        return head
    return f"{head}\n```\n{_bounded(error, CHAT_ERROR_MAX)}\n```"


def backup_ok(m: Manifest, host: str) -> Event:
    detail = f"{m.id}, {format_size(m.size_bytes)}"
    if m.duration_s is not None:
        detail += f" in {format_duration(m.duration_s)}"
    if m.warnings:  # ok, but not everything is in it (e.g. what the backup role cannot read): say so up front
        detail += f", {len(m.warnings)} warning(s)"
    head = subject(f"OK {m.database} on {host}", detail)
    body = [f"The backup of {m.database} succeeded.", ""]
    body += _facts([
        ("Database", m.database), ("Backup", m.id), ("Host", host), ("Started", _when(m.started_at)),
        ("Finished", _when(m.finished_at)), ("Size", format_size(m.size_bytes)), ("Artifact", m.artifact),
        ("SHA-256", m.sha256),
    ])
    if m.warnings:
        body += ["", "Warnings:", *(f"  {w}" for w in m.warnings)]
    return Event(
        name="backup_ok", category="success", status="ok", subject=head, text=mask("\n".join(body) + "\n"),
        chat=mask(_chat(head, "\n".join(m.warnings) + "\n" if m.warnings else None)),
        host=host, database=m.database, backup_id=m.id, size_bytes=m.size_bytes, duration_s=m.duration_s,
    )


def backup_suspicious(m: Manifest, host: str) -> Event:
    """An ok backup whose output looks wrong (app.sanity): sent like a failure, because someone should look."""
    head = subject(f"WARNING {m.database} on {host}", m.sanity[0] if m.sanity else "the backup looks wrong")
    body = [f"The backup of {m.database} finished, but it does not look like the database it came from.", ""]
    body += _facts([("Database", m.database), ("Backup", m.id), ("Host", host), ("Finished", _when(m.finished_at)),
                    ("Size", format_size(m.size_bytes))])
    body += ["", "Warnings:", *(f"  {w}" for w in m.sanity), "",
             "The earlier backups are kept by retention; check the database before they age out."]
    return Event(
        name="backup_warning", category="failure", status="warning", subject=head, text=mask("\n".join(body) + "\n"),
        chat=head, host=host, database=m.database, backup_id=m.id, size_bytes=m.size_bytes, duration_s=m.duration_s,
        error=mask("; ".join(m.sanity)),
    )


def backup_failed(m: Manifest, host: str) -> Event:
    """A failed backup from its manifest (dump, pipeline or upload: the error says which)."""
    return failure("backup", host, m.error or "no error recorded", database=m.database, backup_id=m.id,
                   started=m.started_at, finished=m.finished_at, duration_s=m.duration_s)


def failure(kind: FailureKind, host: str, error: str, database: str | None = None, backup_id: str | None = None,
            started: datetime | None = None, finished: datetime | None = None,
            duration_s: float | None = None) -> Event:
    name, word, sentence, hint = _FAILURES[kind]
    error = mask(error or "no error recorded")
    # a backup is named by its database (the example operators grep for); verify and restore test by the backup ID
    what = (backup_id if kind != "backup" else None) or database or backup_id
    head = subject(f"FAILED {word}{what or ''} on {host}", error)
    body = [sentence.format(what=what or "the backups"), ""]
    body += _facts([
        ("Database", database), ("Backup", backup_id), ("Host", host), ("Started", started and _when(started)),
        ("Finished", _when(finished or datetime.now(UTC))),
        ("Duration", None if duration_s is None else format_duration(duration_s)),
    ])
    body += ["", "Error:", _bounded(error, ERROR_MAX), "", hint]
    return Event(
        name=name, category="failure", status="failed", subject=head, text=mask("\n".join(body) + "\n"),
        chat=_chat(head, error), host=host, database=database, backup_id=backup_id, error=error,
        duration_s=duration_s,
    )


def _checks(payload: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    checks = payload.get("checks")
    return [c for c in checks if isinstance(c, Mapping)] if isinstance(checks, list) else []


def _health_lines(payload: Mapping[str, Any]) -> list[str]:
    lines = ["Checks:"]
    for c in _checks(payload) or [{"name": "-", "status": payload.get("status", "?"), "message": ""}]:
        lines.append(f"  {str(c.get('status', '?')):<9} {c.get('name', '?')}: {c.get('message', '')}")
    last = payload.get("last_success")
    if isinstance(last, Mapping) and last.get("id"):
        age = last.get("age_seconds")
        age_text = f" ({format_duration(float(age))} ago)" if isinstance(age, int | float) else ""
        lines.append(f"Last good backup: {last.get('id')} finished {last.get('finished_at', '?')}{age_text}")
    else:
        lines.append("Last good backup: none on the targets")
    run = payload.get("last_run")
    if isinstance(run, Mapping) and run.get("status"):
        error = f": {first_line(str(run.get('error')), 300)}" if run.get("error") else ""
        lines.append(f"Last run: {run.get('status')} at {run.get('finished_at', '?')}{error}")
    if payload.get("next_run_at"):
        lines.append(f"Next run: {payload.get('next_run_at')}")
    return lines


def _reasons(payload: Mapping[str, Any], status: str) -> str:
    return "; ".join(f"{c.get('name', '?')}: {c.get('message', '')}" for c in _checks(payload)
                     if c.get("status") == status)


def health_critical(payload: Mapping[str, Any], host: str) -> Event:
    reason = _reasons(payload, "critical") or "status critical"
    head = subject(f"CRITICAL on {host}", reason)
    body = [f"/health on {host} turned CRITICAL: backups need attention now.", "", *_health_lines(payload), "",
            "You will get one more message when it recovers, not one per health check."]
    return Event(name="health_critical", category="critical", status="critical", subject=head,
                 text=mask("\n".join(body) + "\n"), chat=head, host=host, error=mask(reason),
                 extra={"health": _plain(payload)})


def health_recovered(new_status: str, payload: Mapping[str, Any], host: str) -> Event:
    reason = f"now {new_status}"
    warnings = _reasons(payload, "warning")
    head = subject(f"RECOVERED on {host}", f"{reason} ({warnings})" if warnings else reason)
    body = [f"/health on {host} is no longer CRITICAL: it is {new_status} now.", "", *_health_lines(payload)]
    return Event(name="health_recovered", category="recovery", status="recovered", subject=head,
                 text=mask("\n".join(body) + "\n"), chat=head, host=host, extra={"health": _plain(payload)})


def weekly_report(report: WeeklyReport) -> Event:
    n = len(report.databases)
    if report.attention:
        problems = [f"{s.database}: {', '.join(s.problems)}" for s in report.databases if s.problems]
        problems += [f"target {name} unreadable" for name in sorted(report.target_errors)]
        head = subject(f"weekly report on {report.host}", "ATTENTION " + "; ".join(problems or ["no backups"]))
    else:
        head = subject(f"weekly report on {report.host}", f"all {n} database(s) OK")
    chat_lines = [head] + [
        f"• {s.database}: {'ATTENTION ' + ', '.join(s.problems) if s.problems else 'OK'}; "
        f"{s.good_this_week} this week, {s.kept} kept ({format_size(s.kept_bytes)})"
        for s in report.databases
    ]
    return Event(
        name="weekly_report", category="report", status="attention" if report.attention else "ok", subject=head,
        text=report.render(), chat=mask("\n".join(chat_lines)), host=report.host,
        extra={"databases": [s.as_dict() for s in report.databases], "target_errors": dict(report.target_errors),
               "week_start": report.start.strftime("%Y-%m-%dT%H:%M:%SZ"),
               "week_end": report.end.strftime("%Y-%m-%dT%H:%M:%SZ")},
    )


def _plain(value: Any) -> Any:
    """A JSON-safe copy of the /health payload (it came from the health code, not from us)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
