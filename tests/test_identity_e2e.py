"""Two clusters with the same database name and schedule share one NAS and bucket: each backs up its own
slot, /health, list and prune tell the other cluster's backups apart."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Cli, PgServer, S3Server
from test_runtime import Sidecar, manifests, sidecars
from truth_support import backup_role, check, fixed_slot_env, sample_db


@pytest.fixture
def sidecar(cli: Cli) -> Iterator[Callable[[dict[str, str]], Sidecar]]:
    yield from sidecars(cli)


def test_two_clusters_sharing_targets_each_back_up_and_see_only_their_own(
    cli: Cli, pg: PgServer, pg2: PgServer, nas: Path, s3: S3Server, bucket: str, sidecar
) -> None:
    name = "shop_identity"
    sample_db(pg, name, rows=500)
    sample_db(pg2, name, rows=700)
    try:
        shared = {"NAS_PATH": str(nas), **s3.env(bucket), **fixed_slot_env(), "POSTGRES_DB": name}
        one = {**pg.env(POSTGRES_USER=backup_role(pg), BACKUP_HOSTNAME="cluster-one"), **shared}
        two = {**pg2.env(POSTGRES_USER=backup_role(pg2), BACKUP_HOSTNAME="cluster-two"), **shared}
        cli.run("backup", "--scheduled", env=one, check=True)
        second = cli.run("backup", "--scheduled", env=two)
        assert second.returncode == 0 and "skipped" not in second.stderr, second.stderr
        made = {m.host: m for m in manifests(nas)}
        assert set(made) == {"cluster-one", "cluster-two"} and all(m.ok for m in made.values())
        assert made["cluster-one"].slot == made["cluster-two"].slot
        ids = {m.system_identifier for m in made.values()}
        assert len(ids) == 2 and None not in ids, "each manifest names its own cluster"
        assert all(m.database_oid for m in made.values())

        listed = cli.run("list", env=one, check=True)
        assert f"1 backup(s) of {name} come from another cluster (system identifier " \
               f"{made['cluster-two'].system_identifier})" in listed.stderr
        rows = json.loads(cli.run("list", "--json", env=one, check=True).stdout)["backups"]
        assert {r["host"]: r["foreign"] for r in rows} == {"cluster-one": False, "cluster-two": True}
        ambiguous = cli.run("restore", "latest", "--db", name, "--to-db", f"{name}_copy", "--create", "--yes", env=one)
        assert ambiguous.returncode == 1, ambiguous.stderr
        assert "`latest` is ambiguous" in ambiguous.stderr and "2 clusters" in ambiguous.stderr, ambiguous.stderr
        assert "hint: give the backup ID" in ambiguous.stderr

        s = sidecar({**two, "BACKUP_SCHEDULE": "03:00", "CLOCK_SKEW_TOLERANCE": "5m"})
        doc = s.wait_for("the verdict", lambda d: any(c["name"] == "foreign" for c in d["checks"]))
        assert doc["last_success"]["id"] == made["cluster-two"].id
        assert check(doc, "foreign", name)["status"] == "warning"
        s.stop()

        cli.run("backup", env=one, check=True)  # cluster one now has two backups, cluster two one
        keep_one = {"BACKUP_KEEP_DAILY": "0", "BACKUP_KEEP_WEEKLY": "0", "BACKUP_KEEP_MONTHLY": "0",
                    "BACKUP_KEEP_MIN": "1"}
        pruned = cli.run("prune", env={**one, **keep_one})
        assert pruned.returncode == 0, pruned.stderr
        assert "another cluster's backup (system identifier" in pruned.stdout
        left = {m.host for m in manifests(nas) if m.ok}
        assert sorted(m.host for m in manifests(nas) if m.ok) == ["cluster-one", "cluster-two"], left
        assert made["cluster-one"].id not in {m.id for m in manifests(nas)}, "cluster one's older backup went"
    finally:
        pg.drop_db(name)
        pg2.drop_db(name)
