"""/api/v1: the status page's content as JSON for automation and dashboards, described by /api/v1/openapi.json.

``status`` carries the /health payload itself (the same verdict, checks and messages) plus each unit, target
and the retention plan; ``backups`` the backups the targets hold (the fields of `list --json`, without the
per-table contents); ``runs`` every run the targets record plus this process's skips and job errors. Lists are
newest first; ``limit`` bounds them and ``total``/``truncated`` say how many matched.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

from flask import Blueprint, Response, request

from app.health import HealthMonitor
from app.manifest import utc_iso
from app.status.model import Model, StatusCache, units_now

BACKUP_STATES = ("ok", "failed", "broken")
RUN_OUTCOMES = ("ok", "failed", "broken", "skipped")
DEFAULT_LIMIT, MAX_LIMIT = 100, 10000


class BadRequest(ValueError):
    """A query parameter the API does not take; its message is the 400's ``error``."""


@cache
def _openapi() -> dict[str, Any]:
    return json.loads(resources.files("app.status").joinpath("openapi.json").read_text(encoding="utf-8"))


def openapi_doc(protected: bool) -> dict[str, Any]:
    """The OpenAPI document as this server answers: security required only when STATUS_TOKEN is set."""
    doc = copy.deepcopy(_openapi())
    if not protected:
        doc["security"] = []
        for item in doc["paths"].values():
            for operation in item.values():
                operation["responses"].pop("401", None)
    return doc


def blueprint(monitor: HealthMonitor, cache_: StatusCache) -> Blueprint:
    bp = Blueprint("api", __name__, url_prefix="/api/v1")

    @bp.get("/status")
    def status() -> Response:
        payload = monitor.payload()
        model = cache_.get()
        return json_response(status_doc(payload, model))

    @bp.get("/backups")
    def backups() -> Response:
        model = cache_.get()
        doc = _listing("backups", model.backups, "state", BACKUP_STATES)
        doc["errors"] = {t.name: t.error for t in model.targets if t.error is not None}
        return json_response({**_meta(model), **doc})

    @bp.get("/runs")
    def runs() -> Response:
        model = cache_.get()
        return json_response({**_meta(model), **_listing("runs", model.runs, "outcome", RUN_OUTCOMES)})

    @bp.errorhandler(BadRequest)
    def bad_request(exc: BadRequest) -> Response:
        return json_response({"error": str(exc)}, 400)

    return bp


def status_doc(payload: dict[str, Any], model: Model) -> dict[str, Any]:
    checks = {c["name"]: c for c in payload["checks"]}
    targets = []
    for t in model.targets:
        live = checks.get(f"target:{t.name}", {})
        targets.append({"name": t.name, "where": t.where, "status": live.get("status"), "message": live.get("message"),
                        "backups": t.backups, "free_bytes": t.free_bytes, "read_at": t.read_at, "error": t.error,
                        "space": (checks.get(f"space:{t.name}") or {}).get("message")})
    plan = model.plan
    return {
        **_meta(model),
        "health": payload,
        "units": units_now(payload, model),
        "targets": targets,
        "retention": {"policy": plan.policy, "blocked": plan.blocked, "keep": plan.keep, "delete": plan.delete,
                      "bases_left_out": plan.bases},
    }


def _meta(model: Model) -> dict[str, Any]:
    return {"detail": "minimal" if model.minimal else "full", "generated_at": utc_iso(datetime.now(UTC)),
            "built_at": utc_iso(model.built_at)}


def json_response(doc: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(doc, separators=(",", ":"))
    return Response(body, status, {"Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})})


def _listing(key: str, rows: list[dict[str, Any]], field: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``rows`` filtered by ``database`` and ``field`` from the query, cut at ``limit``."""
    database = _one("database")
    value = _choice(field, allowed)
    limit = _limit()
    found = [r for r in rows
             if (database is None or r["database"] == database) and (value is None or r[field] == value)]
    return {"total": len(found), "truncated": len(found) > limit, key: found[:limit]}


def _one(name: str) -> str | None:
    values = request.args.getlist(name)
    if len(values) > 1:
        raise BadRequest(f"{name} is given {len(values)} times (hint: give it once)")
    return values[0] if values else None


def _choice(name: str, allowed: tuple[str, ...]) -> str | None:
    value = _one(name)
    if value is not None and value not in allowed:
        raise BadRequest(f"{name}={value!r} is not one of {', '.join(allowed)}")
    return value


def _limit() -> int:
    value = _one("limit")
    if value is None:
        return DEFAULT_LIMIT
    if not re.fullmatch(r"[0-9]{1,6}", value) or not 1 <= int(value) <= MAX_LIMIT:
        raise BadRequest(f"limit={value!r} is not a whole number from 1 to {MAX_LIMIT}")
    return int(value)
