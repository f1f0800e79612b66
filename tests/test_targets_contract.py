"""One contract, every target: the NAS directory and S3 must behave the same to the rest of the code, and one
target failing at any point of a run (check, mid-stream, commit, manifest write) never costs the other its copy.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import S3Server

from app import layout
from app.backup import Artifact, BackupFailed, run_artifact
from app.cancel import CancelToken
from app.catalog import load_catalog
from app.settings import S3Settings, Settings, load_settings
from app.targets.base import Target, TargetError, Upload
from app.targets.nas import NasTarget
from app.targets.s3 import MIB, S3Target, plan_part_size

KEY = "app/2026/11/22/app-20261122T030000Z.dump.zst"


def s3_settings(s3: S3Server, bucket: str, prefix: str = "team/db", **kw: object) -> S3Settings:
    base = dict(endpoint=s3.endpoint, bucket=bucket, prefix=prefix, access_key=s3.access_key,
                secret_key=s3.secret_key, region="us-east-1", secure=False, part_size=5 * MIB,
                part_memory=10 * MIB)
    return S3Settings(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(params=["nas", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "nas":
        return NasTarget(tmp_path / "nas", create=True)
    s3: S3Server = request.getfixturevalue("s3")
    return S3Target(s3_settings(s3, s3.make_bucket()))


def _stream(target: Target, key: str, payload: bytes, step: int = 1024 * 1024) -> str | None:
    upload = target.begin(key, size_hint=len(payload))
    for i in range(0, len(payload), step):
        upload.write(payload[i : i + step])
    return upload.commit(hashlib.sha256(payload).hexdigest())


def test_put_stream_then_list_open_stat_delete(target: Target) -> None:
    target.check()
    payload = os.urandom(12 * 1024 * 1024 + 12345)  # several parts on S3 with 5 MiB parts
    stored = _stream(target, KEY, payload)
    target.put_bytes("app/2026/11/22/app-20261122T030000Z.manifest.json", b"{}")

    keys = [o.key for o in target.list()]
    assert keys == [KEY, "app/2026/11/22/app-20261122T030000Z.manifest.json"]
    assert [o.key for o in target.list("app/2026/")] == keys
    assert list(target.list("other/")) == []
    info = target.stat(keys[0])
    assert info is not None and info.size == len(payload)
    with target.open(keys[0]) as f:
        assert f.read() == payload
    assert target.read_bytes(keys[1]) == b"{}"

    target.delete(keys[0])
    assert target.stat(keys[0]) is None
    assert [o.key for o in target.list()] == [keys[1]]
    target.delete(keys[0])  # deleting twice is not an error
    assert stored


def test_stat_and_list_show_the_fingerprint_recorded_at_commit(target: Target) -> None:
    target.check()
    payload = os.urandom(11 * MIB)
    stored = _stream(target, KEY, payload)
    assert stored is not None
    if isinstance(target, NasTarget):
        assert stored == f"sha256:{hashlib.sha256(payload).hexdigest()}"
    else:
        assert stored.startswith("etag:") and stored.endswith("-3")  # a multipart ETag: 5 + 5 + 1 MiB
    stat = target.stat(KEY)
    assert stat is not None and stat.checksum == stored
    assert [o.checksum for o in target.list() if o.key == KEY] == [stored]


def test_partial_write_stays_invisible_and_abort_leaves_nothing(target: Target) -> None:
    target.check()
    upload = target.begin(KEY)
    upload.write(os.urandom(6 * 1024 * 1024))
    upload.write(os.urandom(1024))
    assert target.stat(KEY) is None
    assert list(target.list()) == []
    upload.abort()
    assert target.stat(KEY) is None
    assert list(target.list()) == []
    assert target.cleanup_incomplete(timedelta(0)) == []  # abort already removed the partial


def test_abandoned_partial_is_cleaned_up_later(target: Target, request: pytest.FixtureRequest) -> None:
    target.check()
    key = "app/2026/11/22/app-20261122T050000Z.dump.zst"
    upload = target.begin(key)
    upload.write(os.urandom(5 * MIB))
    upload.write(b"x")  # on S3 the first part is now in flight: a real incomplete multipart upload
    if isinstance(target, S3Target):
        upload._settle()  # type: ignore[attr-defined]
    if isinstance(target, NasTarget) or not request.getfixturevalue("s3").is_moto:
        # moto reports every upload as initiated in 2010, so "young" cannot be told apart there
        assert target.cleanup_incomplete(timedelta(days=1)) == []  # young partials stay
    assert target.cleanup_incomplete(timedelta(0)) == [key]


def test_small_object_commit_and_missing_key(target: Target) -> None:
    target.put_bytes("x/2026/01/01/x-20260101T000000Z.manifest.json", b"tiny")
    assert target.read_bytes("x/2026/01/01/x-20260101T000000Z.manifest.json") == b"tiny"
    with pytest.raises(TargetError):
        target.open("x/2026/01/01/missing.dump")


def test_replace_bytes_overwrites_a_manifest(target: Target) -> None:
    key = "x/2026/01/01/x-20260101T000000Z.manifest.json"
    target.put_bytes(key, b'{"status": "failed"}')
    target.replace_bytes(key, b'{"status": "ok"}')
    assert target.read_bytes(key) == b'{"status": "ok"}'
    assert [o.key for o in target.list()] == [key]


def test_nas_never_replaces_an_existing_backup(tmp_path: Path) -> None:
    target = NasTarget(tmp_path, create=True)
    target.put_bytes("a/b.dump", b"first")
    with pytest.raises(TargetError, match="already exists"):
        target.put_bytes("a/b.dump", b"second")
    assert target.read_bytes("a/b.dump") == b"first"
    assert [o.key for o in target.list()] == ["a/b.dump"]


def test_a_copy_whose_stat_visible_checksum_disagrees_is_not_intact(target: Target, tmp_path: Path) -> None:
    settings = load_settings({"NAS_PATH": str(tmp_path / "unused"), "BACKUP_COMPRESSION": "none"})
    run = run_artifact(settings, [target], random_artifact(6 * MIB), CancelToken())
    [entry] = load_catalog([target]).entries
    assert entry.good and entry.copies == {target.name: True}
    other = os.urandom(run.size_bytes)  # same size: only the fingerprint can tell
    if isinstance(target, NasTarget):
        path = target.root / run.artifact
        os.unlink(path)
        path.write_bytes(other)  # another backup's file in its place, with that file's attribute
        os.setxattr(path, "user.backup_sidecar.sha256", hashlib.sha256(other).hexdigest().encode())
    else:
        target.put_bytes(run.artifact, other)  # replaced in the bucket: a new ETag
    [entry] = load_catalog([target]).entries
    assert entry.status == "broken" and entry.copies == {target.name: False}


def test_missing_nas_directory_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="does not exist.*hint"):
        NasTarget(tmp_path / "not-mounted").check()


def test_missing_bucket_is_refused_with_a_hint(s3: S3Server) -> None:
    target = S3Target(s3_settings(s3, "no-such-bucket-here", prefix=""))
    with pytest.raises(TargetError, match="does not exist.*never creates buckets"):
        target.check()


# --- part sizes ------------------------------------------------------------------------------------------------

def test_one_part_size_from_the_estimate_with_headroom_bounded_by_memory() -> None:
    settings = S3Settings("h", "b", "", "", "", None, False, None, part_memory=64 * MIB)
    assert plan_part_size(700 * 10**6, settings) == 16 * MIB  # small: the floor
    assert plan_part_size(None, settings) == 32 * MIB  # unknown: the largest the budget allows
    big = 100 * 1024**3
    part = plan_part_size(big, S3Settings("h", "b", "", "", "", None, False, None, part_memory=256 * MIB))
    assert part * 10_000 >= 4 * big and part <= 128 * MIB
    with pytest.raises(TargetError, match=r"S3_PART_MEMORY=.*hint: set S3_PART_MEMORY=\d+MiB"):
        plan_part_size(big, settings)
    fixed = S3Settings("h", "b", "", "", "", None, False, 5 * MIB, part_memory=10 * MIB)
    with pytest.raises(TargetError, match="outgrow 10,000 parts"):
        plan_part_size(60 * 1024**3, fixed)


def test_an_object_that_outgrows_its_estimate_fails_at_part_10001_not_at_commit(s3: S3Server, bucket: str
                                                                                 ) -> None:
    target = S3Target(s3_settings(s3, bucket))
    upload = target.begin(KEY)
    import app.targets.s3 as s3mod

    old, s3mod.MAX_PARTS = s3mod.MAX_PARTS, 3  # the same rule, at a size a test can reach
    try:
        for _ in range(3):
            upload.write(os.urandom(5 * MIB))  # exactly 3 full parts: still fits
        with pytest.raises(TargetError, match="outgrew 3|outgrew 10,000"):
            upload.write(b"one byte too many")
    finally:
        s3mod.MAX_PARTS = old
        upload.abort()
    assert target.stat(KEY) is None


# --- one target failing at each point of a run never costs the other its copy ---------------------------------

class Faulty(Target):
    """A real target that fails at one point of a run, like a broken mount or an endpoint going away."""

    def __init__(self, inner: Target, at: str) -> None:
        self.inner, self.at, self.name = inner, at, inner.name

    def describe(self) -> str:
        return self.inner.describe()

    def check(self) -> None:
        if self.at == "check":
            raise TargetError(f"{self.name}: injected failure at check (hint: none)")
        self.inner.check()

    def begin(self, key: str, size_hint: int | None = None) -> Upload:
        inner, at, name = self.inner.begin(key, size_hint), self.at, self.name

        class FaultyUpload(Upload):
            written = 0

            def write(self, data: bytes) -> None:
                self.written += len(data)
                if at == "mid-stream" and self.written > 3 * MIB:
                    raise TargetError(f"{name}: injected failure at mid-stream (hint: none)")
                inner.write(data)

            def commit(self, sha256: str | None = None) -> str | None:
                if at == "commit":
                    raise TargetError(f"{name}: injected failure at commit (hint: none)")
                return inner.commit(sha256)

            def abort(self) -> None:
                inner.abort()

        return FaultyUpload()

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.at == "manifest" and json.loads(data)["status"] == "ok":
            raise TargetError(f"{self.name}: injected failure at manifest write (hint: none)")
        self.inner.put_bytes(key, data)

    def open(self, key: str):  # noqa: ANN201
        return self.inner.open(key)

    def stat(self, key: str):  # noqa: ANN201
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def cleanup_incomplete(self, older_than: timedelta) -> list[str]:
        return self.inner.cleanup_incomplete(older_than)


def random_artifact(size: int) -> Artifact:
    @contextmanager
    def source() -> Iterator[tuple[Iterator[bytes], Callable[[], list[str]]]]:
        yield (os.urandom(MIB) for _ in range(size // MIB)), list

    return Artifact("app", "database", "custom", source, size_estimate=lambda: size)


@pytest.mark.parametrize("at", ["check", "mid-stream", "commit", "manifest"])
@pytest.mark.parametrize("failing", ["nas", "s3"])
def test_one_target_failing_keeps_the_other_copy_good(failing: str, at: str, s3: S3Server, bucket: str,
                                                      tmp_path: Path) -> None:
    nas = NasTarget(tmp_path / "nas", create=True)
    s3t = S3Target(s3_settings(s3, bucket, part_size=None, part_memory=32 * MIB))
    targets: list[Target] = [Faulty(nas, at) if failing == "nas" else nas, Faulty(s3t, at) if failing == "s3" else s3t]
    settings = load_settings({"NAS_PATH": str(tmp_path / "nas"), "S3_BUCKET": bucket, "BACKUP_COMPRESSION": "none"})
    with pytest.raises(BackupFailed) as failed:
        run_artifact(settings, targets, random_artifact(8 * MIB), CancelToken())
    run = failed.value.manifest
    assert run.status == "failed" and f"no copy on {failing}: " in (run.error or "")
    assert f"injected failure at {at}" in (run.error or "")
    healthy = [t for t in targets if t.name != failing]
    assert f"the copy on {healthy[0].name} is kept" in (run.error or "")

    catalog = load_catalog(targets)
    [entry] = catalog.entries
    assert entry.good and entry.copies.get(healthy[0].name) is True
    assert not entry.copies.get(failing)
    with healthy[0].open(entry.manifest.artifact) as f:
        assert hashlib.sha256(f.read()).hexdigest() == entry.manifest.sha256
    sick = next(t for t in targets if t.name == failing)
    keys = [o.key for o in sick.list()]
    assert entry.manifest.artifact not in keys  # nothing half-published at the final name
    if at == "check":  # a target that failed its check is not written to at all
        assert keys == []
    else:  # it still takes writes: it holds a failed manifest saying why
        [key] = keys
        doc = json.loads(sick.read_bytes(key))
        assert doc["status"] == "failed" and doc["target"] == failing and f"at {at}" in doc["error"]


@pytest.mark.parametrize("at", ["mid-stream", "commit"])
@pytest.mark.parametrize("failing", ["nas", "s3"])
def test_with_only_the_s3_copy_encrypted_one_target_failing_keeps_the_other_copy_good(
        failing: str, at: str, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    """BACKUP_ENCRYPT_TARGETS=s3: two streams (plain for the NAS, age for S3) from one dump; either one failing
    midway or at commit leaves the other's copy whole and checkable against its own manifest."""
    import subprocess

    key = tmp_path / "ops.key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True).stdout
    nas = NasTarget(tmp_path / "nas", create=True)
    s3t = S3Target(s3_settings(s3, bucket, part_size=None, part_memory=32 * MIB))
    targets: list[Target] = [Faulty(nas, at) if failing == "nas" else nas, Faulty(s3t, at) if failing == "s3" else s3t]
    settings = load_settings({"NAS_PATH": str(tmp_path / "nas"), "S3_BUCKET": bucket, "BACKUP_COMPRESSION": "none",
                              "BACKUP_ENCRYPT_RECIPIENTS": public.strip(), "BACKUP_ENCRYPT_TARGETS": "s3"})
    with pytest.raises(BackupFailed) as failed:
        run_artifact(settings, targets, random_artifact(8 * MIB), CancelToken())
    assert f"injected failure at {at}" in (failed.value.manifest.error or "")
    healthy = next(t for t in targets if t.name != failing)
    [entry] = load_catalog(targets).entries
    assert entry.good and entry.copies == {healthy.name: True, failing: False}
    m = entry.manifest_on(healthy.name)
    assert m.artifact.endswith(".dump.age") == (healthy.name == "s3") and bool(m.encryption) == (healthy.name == "s3")
    with healthy.open(m.artifact) as f:
        data = f.read()
    assert len(data) == m.size_bytes == (8 * MIB if healthy.name == "nas" else len(data))
    assert hashlib.sha256(data).hexdigest() == m.sha256
    if healthy.name == "s3":  # the ciphertext opens to the 8 MiB the dump wrote
        opened = subprocess.run(["age", "-d", "-i", str(key)], input=data, capture_output=True, check=True).stdout
        assert len(opened) == 8 * MIB and len(data) > 8 * MIB
    sick = next(t for t in targets if t.name == failing)
    [left] = [o.key for o in sick.list()]
    doc = json.loads(sick.read_bytes(left))
    assert doc["status"] == "failed" and doc["artifact"].endswith(".age") == (failing == "s3")


def test_the_ok_policy_decides_the_outcome_never_the_copies(s3: S3Server, bucket: str, tmp_path: Path) -> None:
    nas = NasTarget(tmp_path / "nas", create=True)
    s3t = Faulty(S3Target(s3_settings(s3, bucket, part_size=None, part_memory=32 * MIB)), "commit")
    env = {"NAS_PATH": str(tmp_path / "nas"), "S3_BUCKET": bucket, "BACKUP_COMPRESSION": "none"}
    run = run_artifact(load_settings({**env, "BACKUP_OK_POLICY": "any"}), [nas, s3t], random_artifact(6 * MIB),
                       CancelToken())
    assert run.ok and any("no copy on s3" in w for w in run.warnings)
    run = run_artifact(load_settings({**env, "BACKUP_OK_POLICY": "nas"}), [nas, s3t], random_artifact(6 * MIB),
                       CancelToken())
    assert run.ok
    with pytest.raises(BackupFailed):
        run_artifact(load_settings({**env, "BACKUP_OK_POLICY": "s3"}), [nas, s3t], random_artifact(6 * MIB),
                     CancelToken())
    assert len([e for e in load_catalog([nas]).entries if e.good]) == 3  # every NAS copy stays, whatever the policy


def test_own_layout_predicate() -> None:
    assert layout.is_own_key(KEY)
    assert layout.is_own_key("app/2026/11/22/app-20261122T030000Z.manifest.json")
    assert not layout.is_own_key("app/2026/11/23/app-20261122T030000Z.dump.zst")  # date does not match
    assert not layout.is_own_key("other-app/uploads/video.mp4")
    assert not layout.is_own_key("app-20261122T030000Z.dump.zst")


class CountdownLease:
    """A lease that is lost at its ``lose_at``-th check (the watchdog's view of a dropped advisory lock)."""

    def __init__(self, lose_at: int) -> None:
        self.checks, self.lose_at = 0, lose_at

    def check(self) -> None:
        from app.leases import LeaseLost

        self.checks += 1
        if self.checks >= self.lose_at:
            raise LeaseLost("the advisory lock on app was lost (hint: another host may be backing it up)")

    def release(self) -> None:
        pass


def both_targets(s3: S3Server, bucket: str, tmp_path: Path) -> tuple[NasTarget, S3Target, Settings]:
    nas = NasTarget(tmp_path / "nas", create=True)
    s3t = S3Target(s3_settings(s3, bucket, part_size=None, part_memory=32 * MIB))
    settings = load_settings({"NAS_PATH": str(tmp_path / "nas"), "S3_BUCKET": bucket, "BACKUP_COMPRESSION": "none"})
    return nas, s3t, settings


def test_a_lease_lost_mid_stream_fails_the_run_and_publishes_nothing(s3: S3Server, bucket: str,
                                                                     tmp_path: Path) -> None:
    nas, s3t, settings = both_targets(s3, bucket, tmp_path)
    with pytest.raises(BackupFailed) as failed:
        run_artifact(settings, [nas, s3t], random_artifact(8 * MIB), CancelToken(), lease=CountdownLease(4))
    assert "advisory lock on app was lost" in (failed.value.manifest.error or "")
    [entry] = load_catalog([nas, s3t]).entries
    assert not entry.good and entry.manifest.status == "failed"
    for t in (nas, s3t):
        assert [o.key for o in t.list()] == [entry.manifest_keys[t.name]]  # a failed manifest, no artifact


def test_a_lease_lost_after_a_copy_was_published_is_a_warning_on_that_copy(s3: S3Server, bucket: str,
                                                                           tmp_path: Path) -> None:
    nas, s3t, settings = both_targets(s3, bucket, tmp_path)
    # one check per chunk (8), then one right before the NAS copy is published (9) and before the S3 copy (10)
    with pytest.raises(BackupFailed) as failed:
        run_artifact(settings, [nas, s3t], random_artifact(8 * MIB), CancelToken(), lease=CountdownLease(10))
    error = failed.value.manifest.error or ""
    assert "advisory lock on app was lost" in error and "the copy on nas is kept" in error
    [entry] = load_catalog([nas, s3t]).entries
    assert entry.copies == {"nas": True, "s3": False}
    doc = json.loads(nas.read_bytes(entry.manifest_keys["nas"]))
    assert doc["status"] == "ok" and any("lease was lost after this copy was published" in w for w in doc["warnings"])


def test_a_manifest_that_cannot_be_sealed_costs_the_encrypted_copy_only(
        s3: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """age refusing to seal the manifest (after the stream) fails the S3 copy; the plain NAS copy is published."""
    import subprocess

    from app import encryption

    key = tmp_path / "ops.key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True).stdout
    nas = NasTarget(tmp_path / "nas", create=True)
    s3t = S3Target(s3_settings(s3, bucket, part_size=None, part_memory=32 * MIB))
    settings = load_settings({"NAS_PATH": str(tmp_path / "nas"), "S3_BUCKET": bucket, "BACKUP_COMPRESSION": "none",
                              "BACKUP_ENCRYPT_RECIPIENTS": public.strip(), "BACKUP_ENCRYPT_TARGETS": "s3"})

    def refuse(m: object, recipients: object) -> object:
        raise encryption.EncryptionError("age cannot seal the manifest: injected", hint="check the recipients")

    monkeypatch.setattr(encryption, "seal", refuse)
    with pytest.raises(BackupFailed) as failed:
        run_artifact(settings, [nas, s3t], random_artifact(2 * MIB), CancelToken())
    assert "no copy on s3: age cannot seal the manifest: injected" in (failed.value.manifest.error or "")
    assert "the copy on nas is kept" in (failed.value.manifest.error or "")
    [entry] = load_catalog([nas, s3t]).entries
    assert entry.copies == {"nas": True, "s3": False}
    assert [o.key for o in s3t.list() if not o.key.endswith(".manifest.json")] == []  # no ciphertext left behind
