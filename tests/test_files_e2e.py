"""The application's files beside the dumps: archived, listed, verified and restored with the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Cli, PgServer, S3Server


def tree_state(root: Path, skip: set[str] = frozenset()) -> dict[str, tuple]:  # type: ignore[assignment]
    """Path -> (kind, mode, content hash or link target) for every entry under ``root``."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel in skip:
            continue
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@pytest.fixture
def app_files(tmp_path: Path) -> Path:
    root = tmp_path / "srv" / "uploads"
    (root / "Ünïcødé dir" / "日本語").mkdir(parents=True)
    (root / "Ünïcødé dir" / "日本語" / "ファイル.txt").write_text("こんにちは\n")
    (root / "private.key").write_bytes(os.urandom(2048))
    (root / "private.key").chmod(0o600)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "locked").mkdir()
    (root / "locked").chmod(0o750)
    (root / "empty").mkdir()
    (root / "link-to-key").symlink_to("private.key")
    (root / "link-to-dir").symlink_to("Ünïcødé dir")
    (root / "dangling").symlink_to("/nonexistent/target")
    (root / "cache").mkdir()
    (root / "cache" / "big.tmp").write_bytes(b"x" * 10000)
    (root / "notes.tmp").write_text("scratch")
    return root


def files_env(pg: PgServer, nas: Path, root: Path, **extra: str) -> dict[str, str]:
    db = pg.create_db()
    return {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "FILES_PATHS": str(root),
            "FILES_EXCLUDE": "*.tmp,cache", "PRUNE_AFTER_BACKUP": "false", **extra}


def files_manifests(nas: Path) -> list[dict]:
    return [m for m in (json.loads(p.read_text()) for p in nas.rglob("*.manifest.json")) if m["kind"] == "files"]


def test_files_round_trip_keeps_content_modes_links_and_unicode(
    cli: Cli, pg: PgServer, s3: S3Server, bucket: str, nas: Path, app_files: Path, tmp_path: Path
) -> None:
    env = files_env(pg, nas, app_files, **s3.env(bucket))
    result = cli.run("backup", env=env, check=True)
    [manifest] = files_manifests(nas)
    assert manifest["status"] == "ok" and manifest["format"] == "tar" and manifest["database"] == "files"
    assert manifest["artifact"].endswith(".tar.zst") and manifest["warnings"] == []
    assert manifest["id"] in result.stdout
    assert manifest["id"] in cli.run("list", env=env, check=True).stdout

    verify = cli.run("verify", manifest["id"], env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    expected = tree_state(app_files, skip={"notes.tmp", "cache", "cache/big.tmp"})
    for source in ("nas", "s3"):
        dest = tmp_path / f"restored-{source}"
        cli.run("restore-files", manifest["id"], "--to", str(dest), "--from", source, env=env, check=True)
        restored_root = dest / app_files.as_posix().lstrip("/")
        assert tree_state(restored_root) == expected
        assert not (restored_root / "notes.tmp").exists() and not (restored_root / "cache").exists()


def test_restore_files_refuses_a_non_empty_directory_unless_forced(
    cli: Cli, pg: PgServer, nas: Path, app_files: Path, tmp_path: Path
) -> None:
    env = files_env(pg, nas, app_files)
    cli.run("backup", env=env, check=True)
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    refused = cli.run("restore-files", "latest", "--to", str(dest), env=env)
    assert refused.returncode == 1 and "not empty" in refused.stderr and "--force" in refused.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]
    cli.run("restore-files", "latest", "--to", str(dest), "--force", env=env, check=True)
    assert (dest / "keep.txt").read_text() == "mine"
    assert (dest / app_files.as_posix().lstrip("/") / "run.sh").exists()


def test_damaged_files_archive_is_refused_before_anything_is_written(
    cli: Cli, pg: PgServer, nas: Path, app_files: Path, tmp_path: Path
) -> None:
    env = files_env(pg, nas, app_files, BACKUP_COMPRESSION="none")
    cli.run("backup", env=env, check=True)
    [manifest] = files_manifests(nas)
    artifact = nas / manifest["artifact"]
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    dest = tmp_path / "out"
    result = cli.run("restore-files", manifest["id"], "--to", str(dest), env=env)
    assert result.returncode == 1 and "SHA-256" in result.stderr
    assert not dest.exists() or not any(dest.iterdir())


def test_file_growing_during_the_run_is_a_warning_not_a_failure(
    cli: Cli, pg: PgServer, nas: Path, tmp_path: Path
) -> None:
    root = tmp_path / "live"
    root.mkdir()
    growing = root / "app.log"
    with open(growing, "wb") as f:
        f.write(os.urandom(64 * 1024 * 1024))  # large enough that reading it takes a while
    (root / "steady.txt").write_text("steady")
    stop = threading.Event()

    def append() -> None:
        with open(growing, "ab") as f:
            while not stop.is_set():
                f.write(b"log line\n" * 100)
                f.flush()
                time.sleep(0.001)

    writer = threading.Thread(target=append, daemon=True)
    writer.start()
    try:
        result = cli.run("backup", env=files_env(pg, nas, root, BACKUP_COMPRESSION="none"), check=True)
    finally:
        stop.set()
        writer.join()
    [manifest] = files_manifests(nas)
    assert manifest["status"] == "ok"
    assert any("app.log changed while it was read" in w for w in manifest["warnings"]), manifest["warnings"]
    assert "changed while it was read" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop CAP_DAC_OVERRIDE")
def test_unreadable_file_fails_the_run_and_is_named(cli: Cli, pg: PgServer, nas: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "fine.txt").write_text("ok")
    secret = root / "secret.txt"
    secret.write_text("no")
    secret.chmod(0o000)
    env = {**cli.base_env(), **files_env(pg, nas, root)}
    # root reads everything; without the DAC capabilities it meets permissions like any sidecar user would
    drop_caps = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
    result = subprocess.run([*drop_caps, sys.executable, "-m", "app", "backup"], env=env, cwd=cli.cwd,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"cannot read {secret}" in result.stderr and "hint:" in result.stderr
    [manifest] = files_manifests(nas)
    assert manifest["status"] == "failed" and str(secret) in manifest["error"]
    assert not [p for p in nas.rglob("*.tar*") if p.is_file()]


def test_missing_files_path_fails_with_hint(cli: Cli, pg: PgServer, nas: Path, tmp_path: Path) -> None:
    result = cli.run("backup", env=files_env(pg, nas, tmp_path / "not-mounted"))
    assert result.returncode == 1
    assert "not-mounted does not exist" in result.stderr and "FILES_PATHS" in result.stderr
    dumps = [p for p in nas.rglob("*.dump.zst")]
    assert len(dumps) == 1, "the database dump still happens when the files archive fails"


def test_the_extraction_rules_hold_on_pythons_without_pep_706_filters(tmp_path: Path):
    """Debian 12's Python 3.11.2 has no tarfile filters: restore-files applies the ``tar`` filter's rules itself,
    and they agree with the standard library's where it has them."""
    import tarfile

    from app.tarsafe import tar_filter

    dest = str(tmp_path)
    (tmp_path / "out").symlink_to("/")
    cases = []
    for name, mode, kind, linkname in (("/data/uploads/a.txt", 0o6777, tarfile.REGTYPE, ""),
                                       ("data/link", 0o777, tarfile.SYMTYPE, "/nonexistent/target"),
                                       ("../escape", 0o644, tarfile.REGTYPE, ""),
                                       ("out/etc/passwd", 0o644, tarfile.REGTYPE, "")):
        member = tarfile.TarInfo(name)
        member.mode, member.type, member.linkname = mode, kind, linkname
        cases.append(member)
    kept = tar_filter(cases[0], dest)
    assert (kept.name, kept.mode, cases[0].name) == ("data/uploads/a.txt", 0o755, "/data/uploads/a.txt")
    assert tar_filter(cases[1], dest).linkname == "/nonexistent/target", "the tar filter keeps links as they are"
    for bad in cases[2:]:
        with pytest.raises(tarfile.TarError):
            tar_filter(bad, dest)
    if hasattr(tarfile, "tar_filter"):
        for member in cases[:2]:
            theirs = tarfile.tar_filter(member, dest)
            assert (theirs.name, theirs.mode) == (tar_filter(member, dest).name, tar_filter(member, dest).mode)
        for member in cases[2:]:
            with pytest.raises(tarfile.FilterError):
                tarfile.tar_filter(member, dest)


@pytest.mark.parametrize("with_filters", [True, False])
def test_extract_all_gives_the_same_tree_with_and_without_pep_706_filters(tmp_path: Path, monkeypatch,
                                                                         with_filters: bool):
    import io
    import tarfile

    from app import tarsafe

    if with_filters and not tarsafe.HAS_FILTERS:
        pytest.skip("this Python has no PEP 706 filters (the other case runs the hand-made rules)")
    monkeypatch.setattr(tarsafe, "HAS_FILTERS", with_filters)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, mode in (("/srv/app/config.ini", 0o4766), ("/srv/app/data/blob", 0o600)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = 5, mode
            tar.addfile(info, io.BytesIO(b"hello"))
        ro = tarfile.TarInfo("/srv/app/readonly")
        ro.type, ro.mode = tarfile.DIRTYPE, 0o555
        tar.addfile(ro)
        inner = tarfile.TarInfo("/srv/app/readonly/inside")
        inner.size = 2
        tar.addfile(inner, io.BytesIO(b"ok"))
    buf.seek(0)
    dest = tmp_path / "out"
    dest.mkdir()
    seen = []
    with tarfile.open(fileobj=buf, mode="r|") as tar:
        tarsafe.extract_all(tar, dest, lambda m: seen.append(m.name))
    assert len(seen) == 4
    assert (dest / "srv/app/config.ini").read_bytes() == b"hello"
    assert (dest / "srv/app/config.ini").stat().st_mode & 0o7777 == 0o744, "setuid and group/other write cleared"
    assert (dest / "srv/app/readonly/inside").read_bytes() == b"ok", "a read-only directory still fills"
