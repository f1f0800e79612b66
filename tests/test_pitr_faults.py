"""Point-in-time recovery under faults: a killed sidecar and receiver, an S3 outage, a slot retaining WAL while
the sidecar is away, retention with base backups aged out, and a gap in the archive."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import S3Server
from pitr_support import RecoveredServer, Sidecar, WalCluster, Writer, rows, scratch_dir, wal_cluster
from tcp_proxy import TcpProxy
from test_notify import Receiver

from app.settings import load_settings
from app.targets import make_targets
from app.wal import SEGMENT, fetch, list_wal

wal_pg = pytest.fixture(scope="module", name="wal_pg")(wal_cluster)
scratch = pytest.fixture(name="scratch")(scratch_dir)


def nas_env(wal_pg: WalCluster, nas: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    return wal_pg.sidecar_env(NAS_PATH=str(nas), WAL_ARCHIVE="true", WAL_SPOOL_DIR=str(tmp_path / "spool"),
                              WAL_PARTIAL_INTERVAL="1s", BACKUP_SCHEDULE="03:00", **extra)


def wait_archived(sidecar: Sidecar) -> None:
    sidecar.wait_for(lambda h: h["wal"]["age_seconds"] <= 2 and h["wal"]["pending_files"] == 0, 60,
                     "the archive to cover the writes")


def recover_latest(cli, env: dict[str, str], scratch: Path) -> list:
    out = cli.run("restore-pitr", "--to-dir", str(scratch / "data"), "--latest", env=env)
    assert out.returncode == 0, out.stderr
    server = RecoveredServer(scratch / "data")
    try:
        conn = server.start()
        got = rows(conn)
        conn.close()
        return got
    finally:
        server.stop()


def test_killing_sidecar_and_receiver_mid_segment_leaves_no_gap_and_no_conflicting_segment(
        wal_pg: WalCluster, cli, nas: Path, tmp_path: Path, scratch: Path) -> None:
    env = nas_env(wal_pg, nas, tmp_path)
    first = Sidecar(cli, env).start()
    first.wait_check("base_backup", "ok", timeout=60)
    with Writer(wal_pg):
        time.sleep(1)
        crashed = first.receiver_pid()
        assert crashed is not None
        os.kill(crashed, signal.SIGKILL)  # pg_receivewal alone dies: `run` restarts it after a backoff
        deadline = time.monotonic() + 20
        while (receiver := first.receiver_pid()) in (None, crashed):
            assert time.monotonic() < deadline, "pg_receivewal was not restarted"
            time.sleep(0.2)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{first.port}/metrics").read().decode()  # noqa: S310
        assert "backup_sidecar_wal_receiver_restarts_total 1.0" in metrics
        time.sleep(1)
        os.kill(receiver, signal.SIGKILL)  # now both die mid-segment, with writes going on
        first.kill()
        time.sleep(2)
        second = Sidecar(cli, env).start()
        time.sleep(2)
        wal_pg.switch()
        time.sleep(2)
    try:
        wait_archived(second)
    finally:
        err = second.stop()
    assert "other bytes" not in err
    out = cli.run("verify", "--all", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "WAL archive continuous" in out.stdout
    # every completed segment is byte for byte the server's own segment (the server keeps them: wal_keep_size)
    target = make_targets(load_settings({**env}))[0]
    listing = list_wal(target)
    compared = 0
    for name, wal in listing.segments.items():
        own = wal_pg.pg_wal() / name
        if own.exists() and SEGMENT.match(name):
            assert fetch(target, wal) == own.read_bytes(), name
            compared += 1
    assert compared >= 3
    with wal_pg.connect("app") as conn:
        written = rows(conn)
    assert recover_latest(cli, env, scratch) == written


@pytest.mark.parametrize("outage", ["drop", "stall"])
def test_segments_catch_up_on_s3_after_an_outage(wal_pg: WalCluster, cli, nas: Path, s3: S3Server, bucket: str,
                                                  tmp_path: Path, outage: str) -> None:
    """S3 refusing connections (drop) or holding them without an answer (stall): the NAS keeps getting every
    segment at once, the spool keeps them for S3, and S3 catches up when it is back."""
    host, port = s3.endpoint.rsplit(":", 1)
    with TcpProxy(host, int(port)) as proxy:
        env = nas_env(wal_pg, nas, tmp_path, **{**s3.env(bucket), "S3_ENDPOINT": f"http://{proxy.address}"})
        sidecar = Sidecar(cli, env).start()
        try:
            sidecar.wait_check("base_backup", "ok", timeout=60)
            getattr(proxy, outage)()
            with Writer(wal_pg):
                for _ in range(3):
                    time.sleep(1)
                    wal_pg.switch()
            deadline = time.monotonic() + 20  # far below S3's 60 s read timeout: a stalled S3 holds back nothing
            while True:
                spooled = [p.name for p in (tmp_path / "spool").iterdir() if SEGMENT.match(p.name)]
                nas_names = {p.name for p in (nas / "_wal").rglob("*.zst")}
                if len(spooled) >= 3 and {n + ".zst" for n in spooled} <= nas_names:
                    break  # kept in the spool until S3 has them too, and the NAS got them meanwhile
                assert time.monotonic() < deadline, (spooled, sorted(nas_names), sidecar.health())
                time.sleep(0.2)
            if outage == "drop":
                sidecar.wait_check("wal_archive", "ok", timeout=30, contains="wait in the spool for s3")
            proxy.pass_()
            wait_archived(sidecar)
        finally:
            sidecar.stop()
        assert not [p for p in (tmp_path / "spool").iterdir() if SEGMENT.match(p.name)]
        s3_names = {k.rsplit("/", 1)[-1] for k in s3.keys(bucket) if k.startswith("_wal/")}
        assert {n + ".zst" for n in spooled} <= s3_names
        out = cli.run("verify", "--all", env=env)
        assert out.returncode == 0 and out.stdout.count("WAL archive continuous") == 2, out.stdout


def test_health_goes_critical_when_the_slot_retained_wal_while_the_sidecar_was_stopped(
        wal_pg: WalCluster, cli, nas: Path, tmp_path: Path) -> None:
    receiver = Receiver()
    env = nas_env(wal_pg, nas, tmp_path, WAL_SLOT_WARN_SIZE="2MiB", WAL_SLOT_CRIT_SIZE="4MiB",
                  WEBHOOK_URL=receiver.url)
    sidecar = Sidecar(cli, env).start()
    sidecar.wait_check("wal_slot", "ok", timeout=30, contains="retains")
    sidecar.stop()
    with wal_pg.connect("app") as conn:  # about 8 MB of WAL while nobody streams
        conn.execute("INSERT INTO events (body) SELECT md5(random()::text) FROM generate_series(1, 80000)")
    wal_pg.switch()
    sidecar = Sidecar(cli, env).start()
    try:
        check = sidecar.wait_check("wal_slot", "critical", timeout=30, contains="over WAL_SLOT_CRIT_SIZE")
        assert "max_slot_wal_keep_size" in check["message"]
        assert (sidecar.health() or {})["status"] == "critical"
        hits = receiver.wait(1, timeout=20)  # the operator is told, not only /health
        assert any("CRITICAL" in h.body.decode() and "retains" in h.body.decode() for h in hits), hits
        sidecar.wait_check("wal_slot", "ok", timeout=30, contains="retains")  # the receiver caught up
    finally:
        sidecar.stop()
        receiver.stop()


def test_prune_keeps_the_wal_chain_from_the_oldest_kept_base_backup_and_refuses_on_a_gap(
        wal_pg: WalCluster, cli, nas: Path, tmp_path: Path, scratch: Path) -> None:
    env = nas_env(wal_pg, nas, tmp_path, BACKUP_KEEP_DAILY="1", BACKUP_KEEP_WEEKLY="0", BACKUP_KEEP_MONTHLY="0",
                  BACKUP_KEEP_MIN="1")
    sidecar = Sidecar(cli, env).start()
    try:
        sidecar.wait_check("base_backup", "ok", timeout=60)
        for _ in range(3):
            wal_pg.switch()
            time.sleep(0.5)
        time.sleep(1)  # a new second: a new base backup ID
        out = cli.run("base-backup", env=env)
        assert out.returncode == 0, out.stderr
        second_start = out.stdout.split(" WAL ")[1].split()[0]
        with Writer(wal_pg):
            time.sleep(1)
            wal_pg.switch()
            time.sleep(1)
        wait_archived(sidecar)
    finally:
        sidecar.stop()
    target = make_targets(load_settings(env))[0]
    before = list_wal(target)
    size = 1024 * 1024
    from app.wal import parse_lsn, segment_of

    keep_from = segment_of(parse_lsn(second_start), size)
    assert any(f.log_seg[1] < keep_from for f in before.segments.values())

    out = cli.run("prune", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "wal     keep from " + second_start in out.stdout
    after = list_wal(target)
    assert all(f.log_seg[1] >= keep_from for f in after.segments.values())
    assert len(list(nas.glob("_base/*/*/*/_base-*.manifest.json"))) == 1
    verified = cli.run("verify", "--all", env=env)
    assert verified.returncode == 0 and "WAL archive continuous" in verified.stdout, verified.stdout
    with wal_pg.connect("app") as conn:
        written = rows(conn)
    assert recover_latest(cli, env, scratch) == written

    # a hole in the chain: verify names it, prune deletes nothing, restore-pitr refuses to lay out a directory
    middle = sorted(after.segments)[len(after.segments) // 2]
    gone = after.segments[middle]
    (nas / gone.key).unlink()
    (nas / gone.manifest_key).unlink()
    verified = cli.run("verify", "--all", env=env)
    assert verified.returncode == 1 and f"missing {middle}" in verified.stdout, verified.stdout
    pruned = cli.run("prune", env=env)
    assert pruned.returncode == 1 and "has a gap (missing" in pruned.stderr, pruned.stdout + pruned.stderr
    assert sorted(list_wal(target).segments) == sorted(n for n in after.segments if n != middle)
    again = scratch / "again"
    refused = cli.run("restore-pitr", "--to-dir", str(again), "--latest", env=env)
    assert refused.returncode == 1 and f"missing {middle}" in refused.stderr and "--lsn" in refused.stderr
    assert not again.exists()
