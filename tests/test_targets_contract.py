"""One contract, every target: the NAS directory and S3 must behave the same to the rest of the code."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import S3Server

from app.settings import S3Settings
from app.targets.base import Target, TargetError
from app.targets.nas import NasTarget
from app.targets.s3 import S3Target, max_object_size, part_size_for


@pytest.fixture(params=["nas", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "nas":
        return NasTarget(tmp_path / "nas", create=True)
    s3: S3Server = request.getfixturevalue("s3")
    bucket = s3.make_bucket()
    return S3Target(S3Settings(endpoint=s3.endpoint, bucket=bucket, prefix="team/db", access_key=s3.access_key,
                               secret_key=s3.secret_key, region="us-east-1", secure=False,
                               part_size=5 * 1024 * 1024))


def test_put_stream_then_list_open_stat_delete(target: Target) -> None:
    target.check()
    payload = os.urandom(12 * 1024 * 1024 + 12345)  # several parts on S3 with 5 MiB parts
    upload = target.begin("app/2026/11/22/app-20261122T030000Z.dump.zst")
    for i in range(0, len(payload), 1024 * 1024):
        upload.write(payload[i : i + 1024 * 1024])
    upload.commit()
    target.put_bytes("app/2026/11/22/app-20261122T030000Z.manifest.json", b"{}")

    keys = [o.key for o in target.list()]
    assert keys == ["app/2026/11/22/app-20261122T030000Z.dump.zst", "app/2026/11/22/app-20261122T030000Z.manifest.json"]
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


def test_partial_write_stays_invisible_and_abort_leaves_nothing(target: Target) -> None:
    target.check()
    key = "app/2026/11/22/app-20261122T040000Z.dump.zst"
    upload = target.begin(key)
    upload.write(os.urandom(6 * 1024 * 1024))
    upload.write(os.urandom(1024))
    assert target.stat(key) is None
    assert list(target.list()) == []
    upload.abort()
    assert target.stat(key) is None
    assert list(target.list()) == []
    assert target.cleanup_incomplete(timedelta(0)) == []  # abort already removed the partial


def test_abandoned_partial_is_cleaned_up_later(target: Target, request: pytest.FixtureRequest) -> None:
    target.check()
    upload = target.begin("app/2026/11/22/app-20261122T050000Z.dump.zst")
    upload.write(os.urandom(6 * 1024 * 1024))
    upload.write(b"x")  # on S3 the first part is now in flight: a real incomplete multipart upload
    if isinstance(target, S3Target):
        upload._wait_pending()  # type: ignore[attr-defined]
    if isinstance(target, NasTarget) or not request.getfixturevalue("s3").is_moto:
        # moto reports every upload as initiated in 2010, so "young" cannot be told apart there
        assert target.cleanup_incomplete(timedelta(days=1)) == []  # young partials stay
    assert target.cleanup_incomplete(timedelta(0)) == ["app/2026/11/22/app-20261122T050000Z.dump.zst"]


def test_small_object_commit_and_missing_key(target: Target) -> None:
    target.put_bytes("x/2026/01/01/x-20260101T000000Z.manifest.json", b"tiny")
    assert target.read_bytes("x/2026/01/01/x-20260101T000000Z.manifest.json") == b"tiny"
    with pytest.raises(TargetError):
        target.open("x/2026/01/01/missing.dump")


def test_nas_never_replaces_an_existing_backup(tmp_path: Path) -> None:
    target = NasTarget(tmp_path, create=True)
    target.put_bytes("a/b.dump", b"first")
    with pytest.raises(TargetError, match="already exists"):
        target.put_bytes("a/b.dump", b"second")
    assert target.read_bytes("a/b.dump") == b"first"
    assert [o.key for o in target.list()] == ["a/b.dump"]


def test_missing_nas_directory_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="does not exist.*hint"):
        NasTarget(tmp_path / "not-mounted").check()


def test_missing_bucket_is_refused_with_a_hint(s3: S3Server) -> None:
    target = S3Target(S3Settings(endpoint=s3.endpoint, bucket="no-such-bucket-here", prefix="",
                                 access_key=s3.access_key, secret_key=s3.secret_key, region="us-east-1",
                                 secure=False, part_size=None))
    with pytest.raises(TargetError, match="does not exist.*never creates buckets"):
        target.check()


def test_part_sizes_grow_so_the_part_limit_allows_terabytes() -> None:
    assert part_size_for(1, None) == 16 * 1024**2
    assert part_size_for(1001, None) == 32 * 1024**2
    assert max_object_size(None) > 10 * 1024**4  # > 10 TiB with 10,000 parts
    assert max_object_size(5 * 1024**2) == 10_000 * 5 * 1024**2  # a fixed S3_PART_SIZE caps as documented
