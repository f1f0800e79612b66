"""Helpers for the tests that check what the sidecar reports against the truth (issue 11)."""

from __future__ import annotations

import uuid

from conftest import CANARY, PgServer


def backup_role(pg: PgServer) -> str:
    """The least-privileged role the README documents for backups: pg_read_all_data and CREATEDB."""
    name = f"bk_{uuid.uuid4().hex[:8]}"
    with pg.connect() as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN CREATEDB IN ROLE pg_read_all_data PASSWORD '{CANARY}'")
    return name


def sample_db(pg: PgServer, name: str | None = None, rows: int = 1000) -> str:
    """A database owned by the superuser with one table of ``rows`` rows (analysed: estimates are real)."""
    name = pg.create_db(name)
    pg.psql(name, f"CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, md5(g::text) "
                  f"FROM generate_series(1, {rows}) g; ANALYZE t;")
    return name


def check(doc: dict, name: str, database: str | None = None) -> dict:
    found = [c for c in doc["checks"] if c["name"] == name and (database is None or c.get("database") == database)]
    assert found, f"no {name} check for {database}: {doc['checks']}"
    return found[0]


def fixed_slot_env() -> dict[str, str]:
    """BACKUP_SCHEDULE and CLOCK_SKEW_TOLERANCE such that every `backup --scheduled` of the next hour names one
    slot (a daily time two hours ahead, within a three-hour tolerance): no waiting for a minute's start."""
    from datetime import UTC, datetime, timedelta

    at = datetime.now(UTC) + timedelta(hours=2)
    return {"BACKUP_SCHEDULE": f"{at:%H:%M}", "TZ": "UTC", "CLOCK_SKEW_TOLERANCE": "3h"}
