"""prune end to end on the real targets: a NAS directory and an S3 server, with real and synthetic backups."""

from __future__ import annotations

import hashlib
import io
import os
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from conftest import CANARY, Cli, PgServer, S3Server

from app.catalog import load_catalog
from app.layout import MANIFEST_SUFFIX, artifact_key, backup_id, manifest_key
from app.locks import file_lock
from app.manifest import Manifest
from app.retention import prune
from app.settings import Settings, load_settings
from app.targets import Target, TargetError, make_targets
from app.targets.nas import NasTarget
from app.targets.s3 import S3Target

PREFIX = "team/pg"
OLD = (datetime.now(UTC) - timedelta(days=30)).timestamp()


def put_backup(targets: list[Target], db: str, when: datetime, status: str = "ok", slot: str | None = None) -> str:
    """A manifest/artifact pair written through the Target API, as a backup of ``when`` would have left it."""
    payload = os.urandom(64)
    m = Manifest(id=backup_id(db, when), status=status, database=db, started_at=when,
                 finished_at=when + timedelta(minutes=1), host="replica-a", format="custom", compression="zstd",
                 artifact=artifact_key(db, when, "dump.zst"), slot=slot)
    if status == "ok":
        m.size_bytes, m.sha256 = len(payload), hashlib.sha256(payload).hexdigest()
    else:
        m.error = "pg_dump failed: could not connect (hint: test)"
    for t in targets:
        if status == "ok":
            t.put_bytes(m.artifact, payload)
        t.put_bytes(manifest_key(db, when), m.to_json())
    return m.id


def day(text: str, hour: int = 3, second: int = 0) -> datetime:
    return datetime.fromisoformat(text).replace(hour=hour, second=second, tzinfo=UTC)


def nas_files(root: Path) -> set[str]:
    """Every file under the NAS root, hidden ones included, as relative paths."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != ".backup-sidecar"}


def backup_keys(db: str, when: datetime) -> set[str]:
    return {artifact_key(db, when, "dump.zst"), manifest_key(db, when)}


def make_settings(nas: Path, s3: S3Server, bucket: str, **extra: str) -> Settings:
    return load_settings({"NAS_PATH": str(nas), **s3.env(bucket, S3_PREFIX=PREFIX, S3_PART_SIZE="5MiB"),
                          "LOCK_FILE": str(nas.parent / "prune.lock"), **extra})


#: The synthetic history: 200 days of daily backups with an outage, a failed-only day and a slot run twice.
FIRST, LAST = date(2025, 1, 1), date(2025, 7, 19)
OUTAGE = {"2025-07-10", "2025-07-11", "2025-07-12"}
#: Newest first: the days that hold an ok backup at the recent end of the spread.
RECENT_OK_DAYS = ["2025-07-19", "2025-07-18", "2025-07-17", "2025-07-16", "2025-07-15", "2025-07-14", "2025-07-09",
                  "2025-07-08", "2025-07-07", "2025-07-06", "2025-07-05", "2025-07-04", "2025-07-03", "2025-07-02"]


def write_history(targets: list[Target], db: str) -> dict[str, datetime]:
    written: dict[str, datetime] = {}
    d = FIRST
    while d <= LAST:
        text = d.isoformat()
        if text == "2025-07-13":
            written[put_backup(targets, db, day(text), "failed")] = day(text)
        elif text == "2025-07-18":
            for second in (0, 40):  # two replicas ran the same slot
                when = day(text, second=second)
                written[put_backup(targets, db, when, slot="2025-07-18T03:00Z")] = when
        elif text not in OUTAGE:
            written[put_backup(targets, db, day(text))] = day(text)
        d += timedelta(days=1)
    return written


FOREIGN = ["README.txt", "{db}/notes.txt", "{db}/2025/07/19/{db}-20250719T030000Z.dump.zst.bak",
           "{db}/2025/01/01/hand-made.dump", "other-tool/{db}-20250101T030000Z.dump.zst", "{db}/2025/01/01/x.sql"]


def test_prune_applies_retention_on_nas_and_s3_and_touches_nothing_foreign(
        pg: PgServer, s3: S3Server, bucket: str, nas: Path, cli: Cli) -> None:
    db = pg.create_db(f"app_{os.urandom(3).hex()}")
    pg.psql(db, "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, md5(g::text) "
                "FROM generate_series(1, 500) g;")
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), **s3.env(bucket, S3_PREFIX=PREFIX),
           "PRUNE_AFTER_BACKUP": "false"}
    settings = make_settings(nas, s3, bucket)
    targets = make_targets(settings)
    write_history(targets, db)
    real = [cli.run("backup", "--force", env=env, check=True).stdout.split()[0] for _ in range(2)]

    foreign = [f.format(db=db) for f in FOREIGN]
    for key in foreign:
        (nas / key).parent.mkdir(parents=True, exist_ok=True)
        (nas / key).write_text("not the sidecar's")
        s3.client.put_object(bucket, f"{PREFIX}/{key}", io.BytesIO(b"foreign"), 7)
    outside = f"elsewhere/{db}/2025/01/01/{db}-20250101T030000Z.dump.zst"
    s3.client.put_object(bucket, outside, io.BytesIO(b"outside"), 7)
    stray = f"{db}/2025/03/03/{db}-20250303T120000Z.dump.zst"  # an interrupted run's artifact, no manifest
    unreadable = f"{db}/2025/02/02/{db}-20250202T120000Z"  # its manifest is damaged: nothing of it may go
    for t in targets:
        t.put_bytes(stray, b"partial dump")
        t.put_bytes(f"{unreadable}.dump.zst", b"dump")
        t.put_bytes(f"{unreadable}{MANIFEST_SUFFIX}", b"{not json")
    for key in (stray, f"{unreadable}.dump.zst", f"{unreadable}{MANIFEST_SUFFIX}"):
        os.utime(nas / key, (OLD, OLD))
    before_nas, before_s3 = nas_files(nas), set(s3.keys(bucket))

    dry = cli.run("prune", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert (nas_files(nas), set(s3.keys(bucket))) == (before_nas, before_s3)
    out = dry.stdout
    assert "dry run: nothing is deleted" in out
    assert re.search(rf"keep +{db}-20250719T030000Z +daily 2025-07-19, weekly 2025-W29, monthly 2025-07", out)
    assert re.search(rf"keep +{db}-20250630T030000Z +monthly 2025-06$", out, re.M)
    assert re.search(rf"delete +{db}-20250101T030000Z +outside retention", out)
    assert re.search(rf"delete +{db}-20250718T030000Z +duplicate of {db}-20250718T030040Z", out)
    assert re.search(rf"delete +{db}-20250713T030000Z +failed, older than a day", out)
    assert re.search(rf"delete +nas:{stray} +artifact without a manifest, older than a day", out)
    assert re.search(rf"keep +s3:{stray} +artifact without a manifest, younger than a day", out)
    assert re.search(rf"keep +nas:{unreadable}.dump.zst +its manifest on nas cannot be read", out)
    assert "README" not in out and "hand-made" not in out and CANARY not in out + dry.stderr

    result = cli.run("prune", env=env)
    assert result.returncode == 0, result.stderr
    real_days = len({r.rsplit("-", 1)[1][:8] for r in real})  # 2 only if the backups straddled midnight
    kept_synthetic = [day(d, second=40 if d == "2025-07-18" else 0) for d in RECENT_OK_DAYS[: 14 - real_days]]
    kept_synthetic.append(day("2025-06-30"))  # monthly: June's newest
    kept_real = [datetime.strptime(r.rsplit("-", 1)[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
                 for r in (real if real_days == 2 else real[1:])]
    survivors = {key for when in kept_synthetic + kept_real for key in backup_keys(db, when)}
    ours_left = survivors | {f"{unreadable}.dump.zst", f"{unreadable}{MANIFEST_SUFFIX}"}
    assert nas_files(nas) - {"backup-sidecar.lock"} == ours_left | set(foreign)
    assert set(s3.keys(bucket)) == {f"{PREFIX}/{k}" for k in ours_left | set(foreign) | {stray}} | {outside}
    assert "deleted" in result.stdout and "aborted" in result.stdout

    # A day later the S3 stray has aged out too, and stale incomplete uploads on both targets are aborted.
    s3_target = next(t for t in targets if isinstance(t, S3Target))
    upload = s3_target.begin(f"{db}/2026/01/01/{db}-20260101T030000Z.dump.zst")
    upload.write(os.urandom(5 * 1024 * 1024))
    upload.write(b"x")
    upload._settle()  # type: ignore[attr-defined] - the first part is stored: a real incomplete upload
    nas_partial = NasTarget(nas).begin(f"{db}/2026/01/01/{db}-20260101T030000Z.dump.zst")
    nas_partial.write(b"half")
    plan = prune(settings, targets, now=datetime.now(UTC) + timedelta(days=2))
    assert plan.ok, plan.errors
    assert set(s3.keys(bucket)) == {f"{PREFIX}/{k}" for k in ours_left | set(foreign)} | {outside}
    assert s3_target.client._list_multipart_uploads(bucket).uploads == []
    assert nas_files(nas) - {"backup-sidecar.lock"} == ours_left | set(foreign)
    assert sorted(plan.aborted) == [f"nas:{db}/2026/01/01/{db}-20260101T030000Z.dump.zst",
                                    f"s3:{db}/2026/01/01/{db}-20260101T030000Z.dump.zst"]


class _FailingDeletes:
    """Mixin: deletes of one kind of key fail, as a target dying between the two deletes would."""

    fail_on = "artifact"

    def delete(self, key: str) -> None:
        is_manifest = key.endswith(MANIFEST_SUFFIX)
        if is_manifest == (self.fail_on == "manifest"):
            name = self.name  # type: ignore[attr-defined]
            raise TargetError(f"{name}: cannot delete {key}: connection reset (hint: injected fault)")
        super().delete(key)  # type: ignore[misc]


class FailingNas(_FailingDeletes, NasTarget):
    pass


class FailingS3(_FailingDeletes, S3Target):
    pass


def _target(kind: str, failing: bool, nas: Path, settings: Settings) -> Target:
    if kind == "nas":
        return FailingNas(nas) if failing else NasTarget(nas)
    assert settings.s3 is not None
    return FailingS3(settings.s3) if failing else S3Target(settings.s3)


@pytest.mark.parametrize("kind", ["nas", "s3"])
@pytest.mark.parametrize("fail_on", ["artifact", "manifest"])
def test_a_failed_delete_never_leaves_an_ok_manifest_without_its_artifact(
        kind: str, fail_on: str, s3: S3Server, bucket: str, nas: Path) -> None:
    settings = make_settings(nas, s3, bucket, BACKUP_KEEP_DAILY="3", BACKUP_KEEP_WEEKLY="0",
                             BACKUP_KEEP_MONTHLY="0", BACKUP_KEEP_MIN="1")
    healthy = _target(kind, False, nas, settings)
    for i in range(10):
        put_backup([healthy], "app", day("2026-11-01") + timedelta(days=i))
    failing = _target(kind, True, nas, settings)
    failing.fail_on = fail_on  # type: ignore[attr-defined]

    plan = prune(settings, [failing])
    assert not plan.ok and "injected fault" in plan.errors[0]
    catalog = load_catalog([healthy])
    assert [e.status for e in catalog.entries if e.status != "ok"] == []  # no ok manifest points at nothing
    if fail_on == "artifact":
        assert len(catalog.entries) == 9  # the newest expired backup lost its manifest; prune stopped there
        assert [o.key for o in catalog.orphans[kind]] == [artifact_key("app", day("2026-11-07"), "dump.zst")]
    else:
        assert len(catalog.entries) == 10 and catalog.orphans[kind] == []

    later = prune(settings, [healthy], now=datetime.now(UTC) + timedelta(days=2))
    assert later.ok, later.errors
    catalog = load_catalog([healthy])
    assert [e.id for e in catalog.entries] == [backup_id("app", day("2026-11-01") + timedelta(days=i))
                                               for i in (9, 8, 7)]
    assert catalog.orphans[kind] == []


def test_prune_never_goes_below_the_minimum_or_removes_the_newest(s3: S3Server, bucket: str, nas: Path) -> None:
    settings = make_settings(nas, s3, bucket, BACKUP_KEEP_DAILY="0", BACKUP_KEEP_WEEKLY="0",
                             BACKUP_KEEP_MONTHLY="0", BACKUP_KEEP_MIN="2")
    targets = make_targets(settings)
    ids = [put_backup(targets, "app", day("2026-10-01") + timedelta(days=i)) for i in range(5)]
    put_backup(targets, "app", day("2026-10-10"), "failed")  # newer, but failed: it does not count
    plan = prune(settings, targets, now=day("2026-10-20"))
    assert plan.ok, plan.errors
    for t in targets:
        assert [e.id for e in load_catalog([t]).entries] == [ids[4], ids[3]]


def test_prune_refuses_to_decide_when_a_target_cannot_be_read(
        pg: PgServer, s3: S3Server, nas: Path, cli: Cli) -> None:
    settings = load_settings({"NAS_PATH": str(nas), "BACKUP_KEEP_DAILY": "0", "BACKUP_KEEP_WEEKLY": "0",
                              "BACKUP_KEEP_MONTHLY": "0", "BACKUP_KEEP_MIN": "1"})
    nas_only = make_targets(settings)
    for i in range(3):
        put_backup(nas_only, "app", day("2026-10-01") + timedelta(days=i))
    before = nas_files(nas)
    env = {"NAS_PATH": str(nas), **s3.env("no-such-bucket-here"), "BACKUP_KEEP_DAILY": "0",
           "BACKUP_KEEP_WEEKLY": "0", "BACKUP_KEEP_MONTHLY": "0", "BACKUP_KEEP_MIN": "1"}
    result = cli.run("prune", env=env)
    assert result.returncode == 1
    assert "prune skipped" in result.stderr and "NoSuchBucket" in result.stderr
    assert nas_files(nas) == before


def test_prune_skips_with_exit_0_while_another_run_holds_the_lock(nas: Path, cli: Cli) -> None:
    lock = cli.cwd / "held.lock"
    put_backup(make_targets(load_settings({"NAS_PATH": str(nas)})), "app", day("2020-01-01"), "failed")
    with file_lock(lock, "backup", "other-host"):
        result = cli.run("prune", env={"NAS_PATH": str(nas), "LOCK_FILE": str(lock)})
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and "other-host" in result.stderr
    assert manifest_key("app", day("2020-01-01")) in nas_files(nas)
