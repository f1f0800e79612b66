"""What the backup role cannot read is found before the dump (issue 10 #6): a failure with the exact SQL that
fixes it where data would be missing, a warning in the manifest, `list`, /health and the notification where
only metadata is lost. Every fix SQL is taken from the sidecar's own hint and run as printed."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

from conftest import CANARY, Cli, PgServer
from test_notify import Receiver, hook, http_factory  # noqa: F401 - pytest fixtures

from app.health import HealthMonitor
from app.settings import load_settings
from app.targets import make_targets


def manifests(nas: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in nas.rglob("*.manifest.json")), key=lambda m: m["started_at"])


def reader_role(pg: PgServer, *attrs: str) -> str:
    name = f"reader_{uuid.uuid4().hex[:8]}"
    pg.psql("postgres", f"CREATE ROLE {name} LOGIN PASSWORD '{CANARY}' {' '.join(attrs)} IN ROLE pg_read_all_data")
    return name


def hint_of(error: str) -> str:
    return error.split("(hint: ", 1)[1].rsplit(")", 1)[0]


def test_rls_without_bypassrls_fails_with_the_alter_role_that_fixes_it(pg: PgServer, cli: Cli, nas: Path) -> None:
    db = pg.create_db()
    pg.psql(db, "CREATE TABLE notes (id int, owner text); "
                "INSERT INTO notes SELECT g, 'x' FROM generate_series(1, 50) g; "
                "ALTER TABLE notes ENABLE ROW LEVEL SECURITY; "
                "CREATE POLICY mine ON notes USING (owner = current_user);")
    role = reader_role(pg)
    env = {**pg.env(POSTGRES_DB=db, POSTGRES_USER=role), "NAS_PATH": str(nas)}
    result = cli.run("backup", env=env)
    assert result.returncode == 1
    [failed] = manifests(nas)
    assert failed["status"] == "failed" and "1 table(s) with row-level security (public.notes)" in failed["error"]
    fix = hint_of(failed["error"]).split("  --")[0]
    assert fix == f'ALTER ROLE "{role}" BYPASSRLS;'
    pg.psql("postgres", fix)
    cli.run("backup", "--force", env=env, check=True)
    ok = manifests(nas)[-1]
    assert ok["status"] == "ok" and ok["contents"]["rows"]["public.notes"] == 50  # every row, not the policy's


def test_unreadable_large_objects_fail_with_the_grant_that_fixes_them(pg: PgServer, cli: Cli, nas: Path) -> None:
    db = pg.create_db()
    pg.psql(db, "SELECT lo_from_bytea(0, '\\x0102'::bytea); SELECT lo_from_bytea(0, '\\x03'::bytea);")
    role = reader_role(pg, "BYPASSRLS")
    env = {**pg.env(POSTGRES_DB=db, POSTGRES_USER=role), "NAS_PATH": str(nas)}
    assert cli.run("backup", env=env).returncode == 1
    [failed] = manifests(nas)
    assert "2 large object(s) the role" in failed["error"] and "pg_read_all_data does not cover" in failed["error"]
    grant = re.search(r"DO \$\$.*?END\$\$;", failed["error"])
    assert grant is not None, failed["error"]
    pg.psql(db, grant.group(0))
    cli.run("backup", "--force", env=env, check=True)
    assert manifests(nas)[-1]["contents"]["objects"]["large_objects"] == 2


def test_subscriptions_and_user_mappings_are_warnings_everywhere(pg: PgServer, cli: Cli, nas: Path,
                                                                hook: Receiver) -> None:  # noqa: F811
    db = pg.create_db()
    sub = f"sub_{db}"
    pg.psql(db, "CREATE EXTENSION postgres_fdw; CREATE SERVER remote FOREIGN DATA WRAPPER postgres_fdw "
                "OPTIONS (host 'replica', dbname 'x'); CREATE USER MAPPING FOR postgres SERVER remote "
                "OPTIONS (user 'remote_user', password 'remote-pw'); CREATE TABLE t AS SELECT 1 AS id;")
    pg.psql(db, f"CREATE SUBSCRIPTION {sub} CONNECTION 'host=127.0.0.1 port=1 dbname=x' PUBLICATION p "
                "WITH (connect = false, enabled = false, create_slot = false, slot_name = NONE)")
    try:
        role = reader_role(pg, "BYPASSRLS")
        env = {**pg.env(POSTGRES_DB=db, POSTGRES_USER=role), "NAS_PATH": str(nas), "NOTIFY_ON": "always",
               "WEBHOOK_URL": f"{hook.url}/hooks/x", "NOTIFY_RETRIES": "0"}
        cli.run("backup", env=env, check=True)
        [ok] = manifests(nas)
        assert ok["status"] == "ok" and len(ok["warnings"]) == 2, ok["warnings"]
        assert any("1 subscription(s) left out" in w for w in ok["warnings"])
        assert any("1 user mapping(s) whose options" in w for w in ok["warnings"])

        listed = cli.run("list", env=env)
        assert re.search(rf"^{ok['id']} .* 2$", listed.stdout, re.M), listed.stdout
        assert f"{ok['id']}: warning: {db}: 1 subscription(s) left out" in listed.stdout

        [posted] = [h.json() for h in hook.hits if h.path == "/hooks/x"]
        assert "1 subscription(s) left out" in posted["text"] and "remote-pw" not in posted["text"]

        settings = load_settings(env)
        monitor = HealthMonitor(settings, make_targets(settings), watch_loop=False)
        monitor.refresh_all(wait=30)
        doc = monitor.payload()
        run_check = next(c for c in doc["checks"] if c["name"] == "last_run")
        assert doc["status"] == "warning" and run_check["status"] == "warning"
        assert "ok with 2 warning(s)" in run_check["message"]
    finally:
        pg.psql(db, f"DROP SUBSCRIPTION {sub}")
