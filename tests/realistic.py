"""A cluster shaped like a real one, for restore, drill and disaster-recovery tests, and the fingerprints that
compare a database with its restored copy: content, schema with owners and grants, large objects, and the
database's own properties; roles and memberships for a whole cluster.

Roles: ``app_owner`` owns the databases and their objects, ``app_reader`` is granted reads (and CONNECT where
PUBLIC lost it), ``backup_user`` is the least-privileged backup role the README documents
(pg_read_all_data, BYPASSRLS, SELECT on the large objects).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any

from conftest import CANARY, PgServer
from sample_data import table_checksums

from app.dbadmin import properties

ROLES_SQL = f"""
CREATE ROLE app_owner NOLOGIN;
CREATE ROLE readers NOLOGIN;
CREATE ROLE app_reader LOGIN CONNECTION LIMIT 5 IN ROLE readers;
ALTER ROLE app_reader SET statement_timeout = '42s';
CREATE ROLE backup_user LOGIN PASSWORD '{CANARY}' BYPASSRLS IN ROLE pg_read_all_data;
"""

#: run as the superuser inside ``shop`` (extensions first: only a superuser may create them here)
SHOP_SQL = """
CREATE EXTENSION hstore; CREATE EXTENSION pg_trgm; CREATE EXTENSION citext;
CREATE SCHEMA sales AUTHORIZATION app_owner;
SET ROLE app_owner;
CREATE TABLE sales.customers (id serial PRIMARY KEY, email citext UNIQUE, attrs hstore, name text NOT NULL);
CREATE INDEX customers_name_trgm ON sales.customers USING gin (name gin_trgm_ops);
INSERT INTO sales.customers (email, attrs, name)
SELECT 'User' || g || '@Example.com', hstore('tier', (g % 3)::text), 'customer ' || g || ' ✓'
FROM generate_series(1, 3000) g;
CREATE TABLE sales.orders (id bigint, placed date NOT NULL, amount numeric(12, 2)) PARTITION BY RANGE (placed);
CREATE TABLE sales.orders_2025 PARTITION OF sales.orders FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE sales.orders_2026 PARTITION OF sales.orders FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO sales.orders SELECT g, date '2025-01-01' + (g % 700), g % 997 + 0.5 FROM generate_series(1, 20000) g;
CREATE MATERIALIZED VIEW sales.daily AS SELECT placed, sum(amount) AS total FROM sales.orders GROUP BY placed;
CREATE TABLE sales.secrets (id int PRIMARY KEY, tenant text NOT NULL, note text);
ALTER TABLE sales.secrets ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_tenant ON sales.secrets USING (tenant = current_user);
INSERT INTO sales.secrets SELECT g, CASE WHEN g % 2 = 0 THEN 'app_reader' ELSE 'other' END, 'note ' || g
FROM generate_series(1, 500) g;
CREATE FUNCTION sales.touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.name := trim(NEW.name); RETURN NEW; END$$;
CREATE TRIGGER customers_touch BEFORE INSERT ON sales.customers FOR EACH ROW EXECUTE FUNCTION sales.touch();
SELECT lo_from_bytea(0, convert_to('large object one', 'UTF8'));
SELECT lo_from_bytea(0, decode(repeat('00ff10', 50000), 'hex'));
GRANT USAGE ON SCHEMA sales TO app_reader;
GRANT SELECT ON sales.customers, sales.daily TO app_reader;
GRANT SELECT, INSERT ON sales.secrets TO readers;
RESET ROLE;
DO $$DECLARE o oid; BEGIN FOR o IN SELECT oid FROM pg_largeobject_metadata LOOP
  EXECUTE format('GRANT SELECT ON LARGE OBJECT %s TO %I', o, 'backup_user'); END LOOP; END$$;
"""

SHOP_PROPERTIES_SQL = """
COMMENT ON DATABASE shop IS 'the shop: orders and customers';
REVOKE CONNECT, TEMPORARY ON DATABASE shop FROM PUBLIC;
GRANT CONNECT ON DATABASE shop TO app_reader, backup_user;
ALTER DATABASE shop SET work_mem = '8MB';
ALTER DATABASE shop SET search_path = sales, public;
ALTER ROLE app_reader IN DATABASE shop SET application_name = 'reader at the shop';
"""

LEGACY_SQL = """
CREATE TABLE public.kunden (id int PRIMARY KEY, name text, ort text);
INSERT INTO kunden VALUES (1, 'Müller', 'Straße 1, Köln'), (2, 'Ñandú café', 'São Paulo'), (3, 'Œuvre', '½ ¼');
ALTER TABLE kunden OWNER TO app_owner;
"""

SORTED_SQL = """
CREATE TABLE public.words (w text);
INSERT INTO words VALUES ('Zebra'), ('Äpfel'), ('apfel'), ('Apfel'), ('Öl'), ('ober'), ('zahl'), ('Ähre');
ALTER TABLE words OWNER TO app_owner;
"""

WIDE_TABLES = 2000


def build_world(pg: PgServer) -> list[str]:
    """Roles and the databases shop (UTF8), legacy (LATIN1), sorted_de (ICU de-DE), ext_app (an untrusted
    extension), wide (2,000 tables)."""
    pg.psql("postgres", ROLES_SQL)
    pg.psql("postgres", "CREATE DATABASE shop OWNER app_owner")
    pg.psql("shop", SHOP_SQL)
    pg.psql("postgres", SHOP_PROPERTIES_SQL)
    pg.psql("postgres", "CREATE DATABASE legacy OWNER app_owner ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
                        "TEMPLATE template0")
    pg.psql("legacy", LEGACY_SQL)
    pg.psql("postgres", "CREATE DATABASE sorted_de OWNER app_owner TEMPLATE template0 LOCALE_PROVIDER icu "
                        "ICU_LOCALE 'de-DE' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'")
    pg.psql("sorted_de", SORTED_SQL)
    pg.psql("postgres", "CREATE DATABASE ext_app OWNER app_owner")
    pg.psql("ext_app", "CREATE EXTENSION postgres_fdw; CREATE TABLE public.notes AS SELECT 1 AS id; "
                       "ALTER TABLE notes OWNER TO app_owner;")
    pg.psql("postgres", "CREATE DATABASE wide OWNER app_owner")
    with pg.connect("wide") as conn:  # in batches: one transaction cannot lock 2,000 new tables
        conn.execute("SET ROLE app_owner")
        for start in range(1, WIDE_TABLES + 1, 250):
            conn.execute(f"""DO $$BEGIN FOR i IN {start}..{min(start + 249, WIDE_TABLES)} LOOP
                  EXECUTE format('CREATE TABLE t%s (id int PRIMARY KEY, v text)', i);
                  EXECUTE format('INSERT INTO t%s VALUES (1, ''x'')', i);
                END LOOP; END$$""")
    return ["shop", "legacy", "sorted_de", "ext_app", "wide"]


def schema_with_owners(pg: PgServer, dbname: str) -> str:
    """pg_dump --schema-only with owners and grants (what --no-owner restores would lose)."""
    out = subprocess.run(
        ["pg_dump", "--schema-only", "-h", pg.host, "-p", str(pg.port), "-U", pg.user, dbname],
        env={**os.environ, "PGPASSWORD": pg.password}, capture_output=True, text=True, check=True,
    ).stdout
    skip = ("-- Dumped", "\\restrict", "\\unrestrict")
    return "\n".join(line for line in out.splitlines() if not line.startswith(skip))


def large_objects(pg: PgServer, dbname: str) -> list[tuple[Any, ...]]:
    with pg.connect(dbname) as conn:
        return conn.execute("SELECT md5(lo_get(oid)), pg_get_userbyid(lomowner), lomacl::text "
                            "FROM pg_largeobject_metadata ORDER BY 1").fetchall()


def db_properties(pg: PgServer, dbname: str) -> dict[str, Any]:
    with pg.connect() as conn:
        props = properties(conn, dbname)
    assert props is not None, dbname
    return props.to_doc()


def sort_order(pg: PgServer, dbname: str) -> str:
    return pg.psql(dbname, "SELECT string_agg(w, ',' ORDER BY w) FROM words")


@dataclass
class Fingerprint:
    tables: dict[str, str]
    schema: str
    lobs: list[tuple[Any, ...]]
    props: dict[str, Any]
    matviews: str


def fingerprint(pg: PgServer, dbname: str) -> Fingerprint:
    matviews = pg.psql(dbname, "SELECT string_agg(format('%I.%I', schemaname, matviewname) || ':' || ispopulated, ',') "
                               "FROM pg_matviews")
    return Fingerprint(table_checksums(pg, dbname), schema_with_owners(pg, dbname), large_objects(pg, dbname),
                       db_properties(pg, dbname), matviews)


def roles(pg: PgServer) -> list[tuple[Any, ...]]:
    """Every role but the built-in ones and the bootstrap superuser, with attributes and settings."""
    with pg.connect() as conn:
        return conn.execute(
            "SELECT r.rolname, r.rolsuper, r.rolinherit, r.rolcreaterole, r.rolcreatedb, r.rolcanlogin, "
            "r.rolbypassrls, r.rolconnlimit, (SELECT s.setconfig FROM pg_db_role_setting s "
            "WHERE s.setrole = r.oid AND s.setdatabase = 0) FROM pg_roles r "
            "WHERE r.rolname !~ '^pg_' AND r.rolname <> 'postgres' ORDER BY 1").fetchall()


def memberships(pg: PgServer) -> list[tuple[Any, ...]]:
    with pg.connect() as conn:
        return conn.execute(
            "SELECT pg_get_userbyid(roleid), pg_get_userbyid(member), admin_option FROM pg_auth_members "
            "ORDER BY 1, 2").fetchall()
