"""A database with the shapes that break naive backups, and ways to compare two databases."""

from __future__ import annotations

import os
import subprocess

from conftest import PgServer

SCHEMA_SQL = r"""
CREATE SCHEMA sales;
CREATE SCHEMA "Ünïcode schema";
CREATE SEQUENCE sales.invoice_no START 1000 INCREMENT 7;
CREATE TABLE sales.customers (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    profile jsonb,
    avatar bytea,
    tags text[],
    balance numeric(20, 6),
    joined timestamptz DEFAULT now()
);
CREATE TABLE sales.invoices (
    no integer PRIMARY KEY DEFAULT nextval('sales.invoice_no'),
    customer_id bigint REFERENCES sales.customers(id),
    amount numeric(12, 2) NOT NULL,
    issued timestamptz NOT NULL
);
CREATE TABLE "Ünïcode schema"."Grüße" (id int PRIMARY KEY, "wört" text, emoji text);
CREATE TABLE public.events (id bigint PRIMARY KEY, kind smallint, payload text, at timestamptz);
CREATE INDEX events_kind_at ON public.events (kind, at);
CREATE VIEW sales.big_customers AS SELECT c.id, c.name, sum(i.amount) AS total
    FROM sales.customers c JOIN sales.invoices i ON i.customer_id = c.id
    GROUP BY c.id, c.name HAVING sum(i.amount) > 500;
CREATE FUNCTION sales.invoice_total(cid bigint) RETURNS numeric LANGUAGE sql STABLE
    AS $$ SELECT coalesce(sum(amount), 0) FROM sales.invoices WHERE customer_id = cid $$;

INSERT INTO sales.customers (name, profile, avatar, tags, balance, joined)
SELECT 'customer ' || g || ' ' || chr(1000 + g % 500),
       jsonb_build_object('n', g, 'nested', jsonb_build_object('ok', g % 2 = 0), 'list', jsonb_build_array(g, g * 2)),
       decode(md5(g::text), 'hex') || '\x00ff'::bytea,
       ARRAY['t' || (g % 7), 'quote''s', 'comma,and "dq"'],
       (g * 12345.678901)::numeric(20, 6),
       timestamptz '2024-01-01 00:00:00+00' + g * interval '37 minutes'
FROM generate_series(1, 2000) g;
INSERT INTO sales.invoices (customer_id, amount, issued)
SELECT 1 + g % 2000, (g % 997) + 0.25, timestamptz '2025-03-30 00:30:00+01' + g * interval '1 hour'
FROM generate_series(1, 5000) g;
INSERT INTO "Ünïcode schema"."Grüße" VALUES (1, 'Straße', '🐘'), (2, 'naïve café', '日本語'), (3, E'tab\there', NULL);
INSERT INTO public.events
SELECT g, g % 5, md5(g::text) || repeat(chr(65 + g % 26), g % 40), timestamptz '2026-01-01' + g * interval '1 second'
FROM generate_series(1, 300000) g;
SELECT setval('sales.invoice_no', 99999);
"""


def build_sample(pg: PgServer, dbname: str) -> None:
    pg.psql(dbname, SCHEMA_SQL)


def table_checksums(pg: PgServer, dbname: str) -> dict[str, str]:
    """md5 over the ordered rows of every user table, plus sequence positions."""
    with pg.connect(dbname) as conn:
        tables = conn.execute(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
        ).fetchall()
        out = {}
        for (table,) in tables:
            row = conn.execute(f"SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t")
            count, digest = row.fetchone()
            out[table] = f"{count}:{digest}"
        for (seq,) in conn.execute(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename) FROM pg_sequences ORDER BY 1"
        ).fetchall():
            out[seq] = str(conn.execute(f"SELECT last_value FROM {seq}").fetchone()[0])
        return out


def schema_dump(pg: PgServer, dbname: str) -> str:
    out = subprocess.run(
        ["pg_dump", "--schema-only", "--no-owner", "-h", pg.host, "-p", str(pg.port), "-U", pg.user, dbname],
        env={**os.environ, "PGPASSWORD": pg.password}, capture_output=True, text=True, check=True,
    ).stdout
    # \restrict lines carry a random key per dump (PostgreSQL 15.14+); they are not schema
    skip = ("-- Dumped", "\\restrict", "\\unrestrict")
    return "\n".join(line for line in out.splitlines() if not line.startswith(skip))
