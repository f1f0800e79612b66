"""Catch-up in both directions over the real targets: whichever target missed a backup gets it from the other,
re-hashed, with its own manifest, and a failed manifest of the missed run is replaced."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import S3Server
from test_targets_contract import Faulty, both_targets, random_artifact

from app.backup import BackupFailed, run_artifact
from app.cancel import CancelToken
from app.catalog import load_catalog
from app.sync import sync
from app.targets.base import Target

MIB = 1024 * 1024


@pytest.mark.parametrize("missed", ["nas", "s3"])
def test_the_target_that_missed_backups_gets_them_from_the_other(missed: str, s3: S3Server, bucket: str,
                                                                  tmp_path: Path) -> None:
    nas, s3t, settings = both_targets(s3, bucket, tmp_path)
    real: list[Target] = [nas, s3t]
    down = [Faulty(t, "commit") if t.name == missed else t for t in real]  # takes a failed manifest, no copy
    for _ in range(2):
        with pytest.raises(BackupFailed):
            run_artifact(settings, down, random_artifact(6 * MIB), CancelToken())
    before = load_catalog(real)
    assert [e.copies for e in before.entries] == [{"nas": missed != "nas", "s3": missed != "s3"}] * 2

    report = sync(settings, real, CancelToken())
    assert report.ok and len(report.copied) == 2
    after = load_catalog(real)
    assert all(e.good and e.copies == {"nas": True, "s3": True} for e in after.entries)
    target = next(t for t in real if t.name == missed)
    for entry in after.entries:
        doc = json.loads(target.read_bytes(entry.manifest_keys[missed]))
        assert doc["status"] == "ok" and doc["target"] == missed and doc["synced_from"] != missed
        with target.open(doc["artifact"]) as f:
            assert hashlib.sha256(f.read()).hexdigest() == doc["sha256"]
    assert sync(settings, real, CancelToken()).copied == []  # nothing left to do
