"""Every copy stands on its own, end to end: the real CLI and `run` against real PostgreSQL, moto's S3 server
behind a TCP proxy that can drop, stall or damage the connection, and real directories (and mounts)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Cli, PgServer, S3Server, free_port
from tcp_proxy import TcpProxy
from test_runtime import Sidecar, sidecars

from app.targets.nas import MARKER

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024


@pytest.fixture
def s3_proxy(s3: S3Server) -> Iterator[TcpProxy]:
    host, port = s3.endpoint.split(":")
    with TcpProxy(host, int(port)) as proxy:
        yield proxy


@pytest.fixture
def sidecar(cli: Cli) -> Iterator[Callable[[dict[str, str]], Sidecar]]:
    yield from sidecars(cli)


@pytest.fixture(scope="module")
def db(pg: PgServer) -> str:
    name = pg.create_db()
    pg.psql(name, "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g")
    return name


@pytest.fixture(scope="module")
def big_db(pg: PgServer) -> str:
    """About 35 MB of poorly compressible rows: four 5 MiB parts on S3, many seconds of work at zstd level 19."""
    name = pg.create_db()
    pg.psql(name, "CREATE TABLE t AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS v "
                  "FROM generate_series(1, 480000) g")
    return name


def nas_files(nas: Path) -> list[Path]:
    return sorted(p for p in nas.rglob("*") if p.is_file() and p.name != MARKER)


def nas_manifests(nas: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in nas_files(nas) if p.name.endswith(".manifest.json")]


def s3_env(s3: S3Server, proxy: TcpProxy, bucket: str, **extra: str) -> dict[str, str]:
    return s3.env(bucket, S3_ENDPOINT=f"http://{proxy.address}", **extra)


def s3_manifests(s3: S3Server, bucket: str) -> dict[str, dict]:
    return {k: json.loads(s3.client.get_object(bucket, k).read()) for k in s3.keys(bucket)
            if k.endswith(".manifest.json")}


# --- outage, recovery, catch-up ----------------------------------------------------------------------------

def test_s3_outage_of_several_runs_then_run_catches_up_by_itself_and_health_clears(
    cli: Cli, sidecar, pg: PgServer, s3: S3Server, bucket: str, nas: Path, db: str, s3_proxy: TcpProxy
) -> None:
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), **s3_env(s3, s3_proxy, bucket)}
    s3_proxy.drop()  # the object store is gone: connections reset
    for _ in range(3):
        result = cli.run("backup", "--force", env=env, timeout=120)
        assert result.returncode == 1, result.stderr
        assert "no copy on s3" in result.stderr and "the copy on nas is kept" in result.stderr
    ids = sorted(m["id"] for m in nas_manifests(nas))
    assert len(ids) == 3 and all(m["status"] == "ok" for m in nas_manifests(nas))
    listing = json.loads(cli.run("list", "--json", env={**env}, timeout=60).stdout)
    assert {b["id"]: b["stored_on"] for b in listing["backups"]} == {i: ["nas"] for i in ids}

    s = sidecar({**env, "BACKUP_SCHEDULE": "03:00", "SYNC_SCHEDULE": "every 2s"})
    s.wait_for("S3 reported unreadable", lambda d: d["status"] != "ok" and any(
        c["name"] == "target:s3" and c["status"] != "ok" for c in d["checks"]), timeout=60)
    s3_proxy.pass_()  # the store is back: the scheduled catch-up copies what it missed
    doc = s.wait_for("health ok after the catch-up", lambda d: d["status"] == "ok", timeout=90)
    assert doc["code"] == 0
    assert s.stop() < 10 and s.returncode == 0
    assert "sync: copied 3 backup(s)" in s.log()

    on_s3 = s3_manifests(s3, bucket)
    assert sorted(m["id"] for m in on_s3.values()) == ids
    for m in on_s3.values():
        assert m["status"] == "ok" and m["target"] == "s3" and m["synced_from"] == "nas"
        data = s3.client.get_object(bucket, m["artifact"]).read()
        assert len(data) == m["size_bytes"] and hashlib.sha256(data).hexdigest() == m["sha256"]
        assert (nas / m["artifact"]).read_bytes() == data
    listing = json.loads(cli.run("list", "--json", env=env, timeout=60).stdout)
    assert {b["id"]: b["stored_on"] for b in listing["backups"]} == {i: ["nas", "s3"] for i in ids}


def test_sync_command_copies_what_s3_missed_and_then_has_nothing_to_do(
    cli: Cli, pg: PgServer, s3: S3Server, bucket: str, nas: Path, db: str, s3_proxy: TcpProxy
) -> None:
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), **s3_env(s3, s3_proxy, bucket)}
    s3_proxy.drop()
    assert cli.run("backup", env=env, timeout=120).returncode == 1
    [failed_on_s3] = [m for m in nas_manifests(nas)]
    result = cli.run("sync", env=env, timeout=60)
    assert result.returncode == 1 and "s3" in result.stderr and "hint:" in result.stderr  # still down: says so
    s3_proxy.pass_()
    result = cli.run("sync", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"copied {failed_on_s3['id']}: nas -> s3" in result.stdout
    result = cli.run("sync", env=env, timeout=60)
    assert result.returncode == 0 and "every target holds every backup" in result.stdout


def test_sync_refuses_a_source_copy_that_does_not_match_its_manifest(
    cli: Cli, pg: PgServer, s3: S3Server, bucket: str, nas: Path, db: str, s3_proxy: TcpProxy
) -> None:
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), **s3_env(s3, s3_proxy, bucket)}
    s3_proxy.drop()
    cli.run("backup", env=env, timeout=120)
    s3_proxy.pass_()
    [artifact] = [p for p in nas_files(nas) if not p.name.endswith(".manifest.json")]
    st = artifact.stat()
    damaged = bytearray(artifact.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10  # bit rot: same size, same mtime, the attribute still claims the sum
    artifact.write_bytes(bytes(damaged))
    os.utime(artifact, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = cli.run("sync", env=env, timeout=60)
    assert result.returncode == 1
    assert "does not match its manifest" in result.stderr and "backup-sidecar verify" in result.stderr
    assert [k for k in s3.keys(bucket) if not k.endswith(".manifest.json")] == []  # the damage did not spread


# --- S3 that every server accepts ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checking_s3() -> Iterator[str]:
    """moto plus the server-side checksum check AWS and MinIO make (tests/checking_s3.py)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "checking_s3.py"), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_parts_have_one_size_and_a_part_damaged_in_transit_is_refused(
    checking_s3: str, s3: S3Server, tmp_path: Path
) -> None:
    from minio import Minio
    from test_targets_contract import random_artifact

    from app.backup import BackupFailed, run_artifact
    from app.cancel import CancelToken
    from app.settings import load_settings
    from app.targets import make_targets

    client = Minio(checking_s3, s3.access_key, s3.secret_key, secure=False, region="us-east-1")
    bucket = "checked"
    client.make_bucket(bucket)
    host, port = checking_s3.split(":")
    with TcpProxy(host, int(port)) as proxy:
        env = {"NAS_PATH": str(tmp_path / "nas"), "NAS_REQUIRE_MOUNT": "false", "BACKUP_COMPRESSION": "none",
               **s3.env(bucket, S3_ENDPOINT=f"http://{proxy.address}", S3_PART_MEMORY="10MiB")}
        (tmp_path / "nas").mkdir()
        settings = load_settings(env)
        targets = make_targets(settings)
        sizes: list[int] = []
        upload_part = targets[1].client._upload_part  # type: ignore[attr-defined]

        def spy(bucket_name, object_name, data, headers, upload_id, number):  # noqa: ANN001, ANN202
            sizes.append(len(data))
            return upload_part(bucket_name, object_name, data, headers, upload_id, number)

        targets[1].client._upload_part = spy  # type: ignore[attr-defined]
        run = run_artifact(settings, targets, random_artifact(17 * MIB), CancelToken())
        assert run.ok
        assert sizes == [5 * MIB, 5 * MIB, 5 * MIB, 2 * MIB]  # every non-trailing part the same length
        obj = client.stat_object(bucket, run.artifact)
        assert obj.size == 17 * MIB and obj.etag.endswith("-4")

        proxy.corrupt(b"\x00CORRUPT-ME\x00")  # one bit flipped on the wire, inside a part

        def marked() -> Iterator[bytes]:
            yield os.urandom(3 * MIB) + b"\x00CORRUPT-ME\x00" + os.urandom(3 * MIB)
            yield os.urandom(6 * MIB)

        from app.backup import Artifact

        artifact = Artifact("app", "database", "custom", _source(marked), size_estimate=lambda: 12 * MIB)
        with pytest.raises(BackupFailed) as failed:
            run_artifact(settings, targets, artifact, CancelToken())
    assert proxy.corrupted == 1
    error = failed.value.manifest.error or ""
    assert "no copy on s3" in error and "BadDigest" in error and "the copy on nas is kept" in error
    m = failed.value.manifest
    assert [k.object_name for k in client.list_objects(bucket, prefix=m.artifact)] == []
    doc = json.loads(client.get_object(bucket, m.artifact.replace(".dump", ".manifest.json")).read())
    assert doc["status"] == "failed" and "BadDigest" in doc["error"]


def _source(gen: Callable[[], Iterator[bytes]]):  # noqa: ANN202
    from contextlib import contextmanager

    @contextmanager
    def source():  # noqa: ANN202
        yield gen(), list

    return source


def test_prune_aborts_only_the_sidecars_own_stale_uploads(cli: Cli, s3: S3Server, bucket: str, nas: Path) -> None:
    ours = "prod/app/2026/11/22/app-20261122T030000Z.dump.zst"
    foreign = ["other-app/videos/big.mp4", "prod/app/notes/upload.bin", "prod/other/2026/11/22/x.dump"]
    for name in [ours, *foreign]:
        s3.client._create_multipart_upload(bucket, name, {})
    result = cli.run("prune", env={"NAS_PATH": str(nas), **s3.env(bucket, S3_PREFIX="prod")}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "aborted 1 incomplete upload" in result.stdout
    left = sorted(u.object_name for u in s3.client._list_multipart_uploads(bucket).uploads)
    assert left == sorted(foreign)  # moto dates every upload 2010: all are "old", only ours went


# --- the NAS as a vault ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [False, True])
def test_nas_files_and_directories_are_private_whatever_the_umask(
    cli: Cli, pg: PgServer, nas: Path, db: str, group: bool
) -> None:
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "BACKUP_GLOBALS": "true"}
    if group:
        env["NAS_GROUP_READABLE"] = "true"
    old = os.umask(0)  # the child inherits it: the most permissive umask there is
    try:
        cli.run("backup", env=env, timeout=120, check=True)
    finally:
        os.umask(old)
    file_mode, dir_mode = (0o640, 0o750) if group else (0o600, 0o700)
    paths = [p for p in nas.rglob("*") if p.name != MARKER]  # the fixture's marker predates the setting
    assert any(p.name.endswith(".sql.zst") for p in paths)  # the globals, role data inside
    for p in paths:
        mode = p.stat().st_mode & 0o777
        assert mode == (dir_mode if p.is_dir() else file_mode), f"{p}: {oct(mode)}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
def test_nas_refuses_a_directory_that_is_not_a_mounted_volume_unless_it_was_used_before(
    cli: Cli, pg: PgServer, tmp_path: Path, db: str
) -> None:
    store = tmp_path / "backups"
    store.mkdir()
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(store), "NAS_REQUIRE_MOUNT": "true"}  # the default
    result = cli.run("backup", env=env, timeout=60)
    assert result.returncode == 1
    assert "is not on a mounted volume" in result.stderr and "NAS_REQUIRE_MOUNT=false" in result.stderr
    assert list(store.iterdir()) == []  # nothing written to the root disk
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(store)], check=True)
    try:
        cli.run("backup", env=env, timeout=60, check=True)
        assert (store / MARKER).is_file()
    finally:
        subprocess.run(["umount", str(store)], check=True)
    result = cli.run("backup", "--force", env=env, timeout=60)  # the volume is gone again: refused
    assert result.returncode == 1 and "is not on a mounted volume" in result.stderr
    assert list(store.iterdir()) == []
    cli.run("backup", "--force", env={**env, "NAS_REQUIRE_MOUNT": "false"}, timeout=60, check=True)  # opted out
    assert (store / MARKER).is_file()
    cli.run("backup", "--force", env={**env, "NAS_REQUIRE_MOUNT": "true"}, timeout=60, check=True)  # marked now


# --- one deadline, and stops that end within the grace -----------------------------------------------------------

@pytest.mark.parametrize("stall", ["at-commit", "mid-stream"])
def test_s3_that_stops_reading_is_abandoned_at_the_deadline_and_the_process_exits(
    request: pytest.FixtureRequest, cli: Cli, pg: PgServer, s3: S3Server, bucket: str, nas: Path,
    s3_proxy: TcpProxy, stall: str
) -> None:
    name = request.getfixturevalue("db" if stall == "at-commit" else "big_db")
    env = {**pg.env(POSTGRES_DB=name), "NAS_PATH": str(nas), "BACKUP_TIMEOUT": "6s",
           **s3_env(s3, s3_proxy, bucket, S3_PART_MEMORY="10MiB")}
    s3_proxy.stall_after(64 * 1024)  # the check went through; then the server stops reading mid-upload
    t0 = time.monotonic()
    result = cli.run("backup", env=env, timeout=60)
    elapsed = time.monotonic() - t0
    assert result.returncode == 1, result.stderr
    assert elapsed < 6 + 6, f"lingered {elapsed:.1f}s after a 6s BACKUP_TIMEOUT"
    [line] = [x for x in result.stderr.splitlines() if x.startswith("backup-sidecar: error:")]
    assert "S3" in line and "BACKUP_TIMEOUT 6s" in line and "hint:" in line
    [m] = nas_manifests(nas)
    if stall == "at-commit":  # the dump was complete: the NAS copy was published before S3's turn
        assert "the copy on nas is kept" in line
        assert m["status"] == "ok" and m["target"] == "nas", result.stderr
    else:  # S3 held the stream up until the deadline: the run failed as a whole, the NAS got a failed manifest
        assert "abandoned at BACKUP_TIMEOUT 6s" in line
        assert m["status"] == "failed" and m["target"] == "nas", result.stderr
        assert [p for p in nas_files(nas) if not p.name.endswith(".manifest.json")] == []
    assert [p for p in nas_files(nas) if ".partial-" in p.name] == []
    s3_proxy.pass_()
    assert cli.run("backup", "--force", env={**env, "BACKUP_TIMEOUT": "60s"}, timeout=120).returncode == 0  # no lock


@pytest.mark.parametrize("case", ["level-19", "stalled-s3"])
def test_sigterm_ends_a_backup_within_the_grace(
    cli: Cli, pg: PgServer, s3: S3Server, bucket: str, nas: Path, big_db: str, s3_proxy: TcpProxy, case: str
) -> None:
    env = {**pg.env(POSTGRES_DB=big_db), "NAS_PATH": str(nas)}
    if case == "level-19":
        env["BACKUP_COMPRESSION_LEVEL"] = "19"
    else:
        env.update(s3_env(s3, s3_proxy, bucket, S3_PART_MEMORY="10MiB"))
        s3_proxy.stall_after(64 * 1024)  # mid-upload: the stream waits for a part that never gets through
    proc = cli.popen("backup", env=env)
    time.sleep(3)
    assert proc.poll() is None, proc.communicate()
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    elapsed = time.monotonic() - t0
    assert elapsed < 9, f"took {elapsed:.1f}s to stop: an orchestrator's 10 s grace would SIGKILL it"
    assert proc.returncode == 1
    assert "interrupted" in err
    [m] = nas_manifests(nas)
    assert m["status"] == "failed" and "interrupted" in m["error"]
    assert [p for p in nas_files(nas) if not p.name.endswith(".manifest.json")] == []


def test_sigterm_ends_runs_backup_at_level_19_within_its_stop_budget(
    sidecar, pg: PgServer, nas: Path, big_db: str
) -> None:
    s = sidecar({**pg.env(POSTGRES_DB=big_db), "NAS_PATH": str(nas), "BACKUP_ON_START": "true",
                 "BACKUP_COMPRESSION_LEVEL": "19"})
    s.wait_for("a running backup", lambda d: d["running"] is not None, timeout=30)
    time.sleep(2)  # deep in the dump: zstd's workers are busy with level-19 jobs
    elapsed = s.stop()
    assert elapsed < 9.5, f"{elapsed:.1f}s: past the 9 s stop budget (an orchestrator's 10 s grace)"
    assert s.returncode == 0, s.log()
    [m] = nas_manifests(nas)
    assert m["status"] == "failed" and "interrupted" in m["error"]
    assert [p for p in nas_files(nas) if not p.name.endswith(".manifest.json")] == []
