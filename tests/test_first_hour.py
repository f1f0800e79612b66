"""The operator's first hour: the preflight against each fault, env files, defaults that never surprise,
logs in causal order, and fetching one verified artifact. All through the real CLI against real servers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import CANARY, REPO, Cli, PgServer, S3Server, free_port
from test_notify import Smtp, Tls, smtp_factory, tls  # noqa: F401 - pytest fixtures

from app.settings import load_settings


@pytest.fixture
def db(pg: PgServer) -> Iterator[str]:
    name = pg.create_db()
    pg.psql(name, "CREATE TABLE t (id int PRIMARY KEY, note text); INSERT INTO t SELECT g, 'n' || g "
                  "FROM generate_series(1, 100) g;")
    yield name
    pg.drop_db(name)


class Listener:
    """A TCP server that accepts and records what clients send: proves a probe connected and sent nothing."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received = b""
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.settimeout(1.0)
            try:
                while chunk := conn.recv(4096):
                    self.received += chunk
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


def lines(text: str, status: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{status} ")]


# --- check: the preflight ----------------------------------------------------------------------------------


def test_check_passes_a_working_setup_and_leaves_no_probe_behind(
    cli: Cli, pg: PgServer, s3: S3Server, bucket: str, nas: Path, db: str,
    smtp_factory: Callable[..., Smtp], tls: Tls, listener: Listener,  # noqa: F811
) -> None:
    server = smtp_factory(auth=True, require_starttls=True, tls_context=tls.server_context(),
                          auth_require_tls=True)
    env = {**pg.env(POSTGRES_DB=db), **s3.env(bucket), "NAS_PATH": str(nas), "SMTP_HOST": "127.0.0.1",
           "SMTP_PORT": str(server.port), "SMTP_USER": "backup", "SMTP_PASSWORD": CANARY,
           "MAIL_TO": "ops@example.com", "SSL_CERT_FILE": str(tls.cert), "NOTIFY_TIMEOUT": "5s",
           "WEBHOOK_URL": f"http://127.0.0.1:{listener.port}/hooks/T0KEN"}
    result = cli.run("check", env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert lines(out, "FAIL") == []
    [database] = [line for line in lines(out, "ok") if line.startswith(f"ok    database {db}:")]
    assert "PostgreSQL 15" in database and "pg_dump 15" in database
    assert len([line for line in lines(out, "ok") if "wrote, read back, listed and removed a probe" in line]) == 2
    assert any(line.startswith(f"ok    bucket {bucket}: versioning") for line in lines(out, "ok"))
    [mail] = [line for line in lines(out, "ok") if "mail via" in line]
    assert "STARTTLS" in mail and "login as backup" in mail and "1 recipient(s) accepted" in mail
    assert "no message sent" in mail
    assert any(line.startswith("ok    webhook to 127.0.0.1:") for line in lines(out, "ok"))
    assert server.recorder.mails == [], "the preflight sent a mail"
    assert server.logins == [("backup", CANARY)]
    time.sleep(0.2)
    assert listener.connections == 1 and listener.received == b"", "the webhook probe sent a request"
    assert s3.keys(bucket) == [] and list(nas.rglob("*")) == [], "a probe was left behind"
    assert any(line.startswith("ok    schedule: daily at 03:00 UTC: next runs ") for line in lines(out, "ok"))
    assert CANARY not in out + result.stderr


def test_check_finds_a_wrong_password(cli: Cli, pg: PgServer, nas: Path, db: str) -> None:
    env = {**pg.env(POSTGRES_DB=db, POSTGRES_PASSWORD="wrong-" + CANARY[::-1]), "NAS_PATH": str(nas)}
    result = cli.run("check", env=env, timeout=60)
    assert result.returncode == 1
    [fail] = lines(result.stdout, "FAIL")
    assert fail.startswith(f"FAIL  database {db}: ") and "password authentication failed" in fail
    assert "(hint: check POSTGRES_PASSWORD" in fail
    assert lines(result.stdout, "ok"), "the other checks still ran"
    assert CANARY[::-1] not in result.stdout + result.stderr


def test_check_finds_a_missing_nas_directory(cli: Cli, pg: PgServer, tmp_path: Path, db: str) -> None:
    result = cli.run("check", env={**pg.env(POSTGRES_DB=db), "NAS_PATH": str(tmp_path / "not-mounted")}, timeout=60)
    assert result.returncode == 1
    [fail] = lines(result.stdout, "FAIL")
    assert fail.startswith(f"FAIL  target {tmp_path / 'not-mounted'}: ") and "does not exist" in fail
    assert "hint:" in fail and not (tmp_path / "not-mounted").exists()


def test_check_finds_a_missing_bucket(cli: Cli, pg: PgServer, s3: S3Server, nas: Path, db: str) -> None:
    env = {**pg.env(POSTGRES_DB=db), **s3.env("no-such-bucket-here"), "NAS_PATH": str(nas)}
    result = cli.run("check", env=env, timeout=60)
    assert result.returncode == 1
    [fail] = lines(result.stdout, "FAIL")
    assert fail.startswith("FAIL  target s3://no-such-bucket-here: ") and "does not exist" in fail
    assert "the sidecar never creates buckets" in fail


def test_check_finds_an_unwritable_lock_directory(cli: Cli, pg: PgServer, nas: Path, tmp_path: Path,
                                                   db: str) -> None:
    locks = tmp_path / "locks"
    locks.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing: a read-only mount stops it too
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(locks)]).returncode == 0
        if not mounted:
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        locks.chmod(0o500)
    try:
        env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "LOCK_FILE": str(locks / "backup-sidecar.lock")}
        result = cli.run("check", env=env, timeout=60)
    finally:
        if mounted:
            subprocess.run(["umount", str(locks)], check=True)
    assert result.returncode == 1
    [fail] = lines(result.stdout, "FAIL")
    assert fail.startswith(f"FAIL  lock {locks / 'backup-sidecar.lock'}: cannot create files in {locks}")
    assert "hint: LOCK_FILE must be on a writable volume" in fail


def test_check_finds_an_unreachable_smtp_server_and_an_init_step_can_take_it_as_a_warning(
    cli: Cli, pg: PgServer, nas: Path, db: str
) -> None:
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "SMTP_HOST": "127.0.0.1",
           "SMTP_PORT": str(free_port()), "SMTP_STARTTLS": "false", "MAIL_TO": "ops@example.com",
           "NOTIFY_TIMEOUT": "3s"}
    result = cli.run("check", env=env, timeout=60)
    assert result.returncode == 1
    [fail] = lines(result.stdout, "FAIL")
    assert fail.startswith("FAIL  mail via 127.0.0.1:") and "cannot reach it: Connection refused" in fail
    lenient = cli.run("check", "--notify-optional", env=env, timeout=60)
    assert lenient.returncode == 0, lenient.stdout
    assert any("mail via" in line and "never stops a backup" in line for line in lines(lenient.stdout, "warn"))


def test_run_logs_the_preflight_at_start_and_starts_anyway(cli: Cli, pg: PgServer, nas: Path, db: str) -> None:
    port = free_port()
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), "HEALTH_PORT": str(port), "HEALTH_BIND": "127.0.0.1",
           "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(free_port()), "SMTP_STARTTLS": "false",
           "MAIL_TO": "ops@example.com", "NOTIFY_TIMEOUT": "2s"}
    proc = cli.popen("run", env=env)
    try:
        deadline, seen = time.monotonic() + 30, ""
        while "preflight: mail via" not in seen and time.monotonic() < deadline:  # the last check
            seen += proc.stderr.readline()  # type: ignore[union-attr]
        assert proc.poll() is None, seen
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # /health serves although a channel failed
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=20)[1]
    log = seen + rest
    assert f"preflight: database {db}: PostgreSQL" in log
    assert "ERROR app.preflight: preflight: mail via 127.0.0.1" in log
    assert f"databases: {db} on " in log and f"targets: {nas}" in log


# --- env files and settings --------------------------------------------------------------------------------


def test_copying_env_example_leaves_config_output_identical(cli: Cli, tmp_path: Path) -> None:
    env = {"BACKUP_HOSTNAME": "db-host-1"}
    without = cli.run("config", env=env, check=True)
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    with_copy = cli.run("config", env=env, check=True)
    assert with_copy.stdout == without.stdout
    assert with_copy.stderr == without.stderr
    assert "dump.level" in without.stdout  # the output is the full table, not an error


@pytest.mark.parametrize("how", ["--env-file", "ENV_FILE", "directory"])
def test_an_env_file_that_cannot_be_read_is_a_configuration_error(cli: Cli, tmp_path: Path, how: str) -> None:
    missing = tmp_path / "prod.env"
    if how == "--env-file":
        result = cli.run("--env-file", str(missing), "backup", env={})
    elif how == "ENV_FILE":
        result = cli.run("backup", env={"ENV_FILE": str(missing)})
    else:
        missing.mkdir()
        result = cli.run("backup", env={"ENV_FILE": str(missing)})
    assert result.returncode == 2
    assert str(missing) in result.stderr and "hint:" in result.stderr
    assert not (tmp_path / "backups").exists(), "it fell back to the defaults and backed something up"


def test_familiar_names_of_other_tools_warn_with_the_name_the_sidecar_reads(tmp_path: Path) -> None:
    env = {"NAS_PATH": str(tmp_path), "PG_PASSWORD": "x", "PGPASSWORD": "y", "HEALTHPORT": "9090", "SMTP_PASS": "z",
           "AWS_ACCESS_KEY_ID": "k", "MINIO_ROOT_USER": "minio", "PG_MAJOR": "17", "UNRELATED": "u"}
    assert load_settings(env).warnings == (
        "AWS_ACCESS_KEY_ID is not read by backup-sidecar and is ignored (hint: did you mean S3_ACCESS_KEY_ID?)",
        "HEALTHPORT is not read by backup-sidecar and is ignored (hint: did you mean HEALTH_PORT?)",
        "PGPASSWORD is not read by backup-sidecar and is ignored (hint: did you mean POSTGRES_PASSWORD?)",
        "PG_PASSWORD is not read by backup-sidecar and is ignored (hint: did you mean POSTGRES_PASSWORD?)",
        "SMTP_PASS is not a setting backup-sidecar knows and is ignored (hint: did you mean SMTP_PASSWORD?)",
    )
    # a shell that carries PGPASSWORD for psql beside a sidecar configured the sidecar's way is not a typo
    assert load_settings({"NAS_PATH": str(tmp_path), "PGPASSWORD": "y", "POSTGRES_PASSWORD": "p"}).warnings == ()


def test_the_s3_access_key_id_is_shown_and_the_secret_key_is_not(cli: Cli, s3: S3Server, bucket: str,
                                                                 tmp_path: Path) -> None:
    env = {**s3.env(bucket), "S3_ACCESS_KEY_ID": "backup-sidecar", "S3_SECRET_ACCESS_KEY": CANARY,
           "BACKUP_HOSTNAME": "backup-sidecar-7", "LOCK_FILE": str(tmp_path / "backup-sidecar.lock")}
    config = cli.run("config", env=env, check=True)
    assert "s3.access_key" in config.stdout and "backup-sidecar" in config.stdout
    assert CANARY not in config.stdout and "****" in config.stdout
    check = cli.run("check", env=env, timeout=60)
    assert "as backup-sidecar" in check.stdout and "****" not in check.stdout
    assert f"lock {tmp_path}/backup-sidecar.lock" in check.stdout
    assert CANARY not in check.stdout + check.stderr


# --- what run and backup say, and in which order ------------------------------------------------------------


def test_backup_says_what_it_backs_up_and_that_s3_replaced_the_default_directory(
    cli: Cli, pg: PgServer, s3: S3Server, bucket: str, db: str
) -> None:
    result = cli.run("backup", env={**pg.env(POSTGRES_DB=db), **s3.env(bucket)}, check=True)
    assert f"databases: {db} on {pg.user}@{pg.host}:{pg.port}" in result.stderr
    assert f"targets: s3://{bucket} at http://{s3.endpoint}" in result.stderr
    assert "NAS_PATH is not set, so backups go to S3 only" in result.stderr


def test_a_database_error_comes_first_without_a_lock_warning_before_it(cli: Cli, pg: PgServer, nas: Path,
                                                                       db: str) -> None:
    result = cli.run("backup", env={**pg.env(POSTGRES_DB=db, POSTGRES_PASSWORD="wrong"), "NAS_PATH": str(nas)})
    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if " WARNING " in line or " ERROR " in line
                or "error:" in line]
    assert problems and "password authentication failed" in problems[0], result.stderr
    assert "cannot take the database lock" not in result.stderr and "advisory lock" not in result.stderr


def test_one_shot_commands_do_not_announce_missing_channels(cli: Cli, pg: PgServer, nas: Path, db: str) -> None:
    result = cli.run("backup", env={**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas)}, check=True)
    assert "no notification channel" not in result.stderr
    assert "no notification channel" not in cli.run("list", env={"NAS_PATH": str(nas)}, check=True).stderr


def test_s3_retries_are_one_line_and_the_error_follows(cli: Cli, pg: PgServer, s3: S3Server, nas: Path,
                                                       db: str) -> None:
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas), **s3.env("backups"),
           "S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    result = cli.run("backup", env=env, timeout=120)
    assert result.returncode == 1
    assert "Retrying (" not in result.stderr
    summaries = [line for line in result.stderr.splitlines() if "retrying" in line]
    assert len(summaries) == 1 and "Connection refused" in summaries[0], result.stderr
    assert "S3: cannot" in result.stderr.split(summaries[0], 1)[1], "the error comes after the one retry line"


def test_list_from_another_directory_does_not_pass_off_the_wrong_place_as_no_backups(
    cli: Cli, pg: PgServer, nas: Path, tmp_path: Path, db: str
) -> None:
    result = cli.run("list", env={})  # cwd has no ./backups: the default points at nothing here
    assert result.returncode == 1 and "(no backups yet)" not in result.stdout
    assert "./backups is relative to the current directory" in result.stderr and "hint:" in result.stderr
    gone = cli.run("list", env={"NAS_PATH": str(tmp_path / "unmounted")})
    assert gone.returncode == 1 and "does not exist" in gone.stderr
    empty = cli.run("list", env={"NAS_PATH": str(nas)})
    assert empty.returncode == 0 and "(no backups yet)" in empty.stdout


# --- fetch ------------------------------------------------------------------------------------------------


def test_fetch_writes_a_verified_copy_or_nothing(cli: Cli, pg: PgServer, nas: Path, tmp_path: Path, db: str) -> None:
    env = {**pg.env(POSTGRES_DB=db), "NAS_PATH": str(nas)}
    backup_id = cli.run("backup", env=env, check=True).stdout.split()[0]
    [manifest_path] = nas.rglob(f"{backup_id}.manifest.json")
    manifest = json.loads(manifest_path.read_text())
    out = tmp_path / "copy.dump.zst"
    done = cli.run("fetch", backup_id, "-o", str(out), env=env, check=True)
    assert "sha256" in done.stdout and "verified" in done.stdout
    assert hashlib.sha256(out.read_bytes()).hexdigest() == manifest["sha256"]
    zstd = subprocess.run(["zstd", "-dc", str(out)], capture_output=True, check=True).stdout
    assert zstd.startswith(b"PGDMP"), "stock zstd reads it as pg_dump's custom archive"

    piped = subprocess.run([sys.executable, "-m", "app", "fetch", "latest", "--db", db, "-o", "-"],
                           env={**cli.base_env(), **env}, cwd=cli.cwd, capture_output=True, check=True)
    assert hashlib.sha256(piped.stdout).hexdigest() == manifest["sha256"]
    assert b"sha256 verified" in piped.stderr

    artifact = nas / manifest["artifact"]
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    bad = tmp_path / "bad.dump.zst"
    failed = cli.run("fetch", backup_id, "-o", str(bad), env=env)
    assert failed.returncode == 1 and "SHA-256 mismatch" in failed.stderr
    assert not bad.exists() and not list(tmp_path.glob("bad.dump.zst*")), "a damaged copy was left as a file"
