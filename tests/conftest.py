"""Real servers for the tests: PostgreSQL with scram password auth, an S3 server, and the real CLI.

With a Docker engine, PostgreSQL and MinIO come from testcontainers; without one (CI, these machines) a
throwaway PostgreSQL cluster is started from the installed server binaries and moto's S3 server stands in
for MinIO. Either way the tests speak real protocols over real sockets.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from minio import Minio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from local_mariadb import MariaDb, start_server  # noqa: E402
from local_pg import free_port, start_cluster, wait_port  # noqa: E402  (scripts/ is not a package)

__all__ = ["free_port", "start_cluster", "MariaDb"]
#: A password that must never appear anywhere but in PGPASSWORD of a child's environment.
CANARY = "Canary-" + secrets.token_hex(8) + "-pw"


def require_tool(path: str, package: str) -> str:
    """``path`` of an external tool that scripts/setup.sh installs (Debian ``package``).

    Missing, a test skips with one line saying what to install; under CI, or when scripts/setup.sh found every
    package of scripts/apt-packages.txt installed (BACKUP_SIDECAR_TOOLS=installed), a missing tool is a
    failure, so a broken install step cannot hide behind skips.
    """
    import shutil

    found = path if Path(path).is_file() else shutil.which(path)
    if found:
        return found
    message = f"{path} is missing: apt-get install {package} (scripts/test.sh does it as root)"
    if os.environ.get("CI") or os.environ.get("BACKUP_SIDECAR_TOOLS") == "installed":
        pytest.fail(message)
    pytest.skip(message)


def docker_available() -> bool:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        return Path(host[len("unix://"):]).is_socket()
    return True  # tcp:// hosts: let testcontainers try


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    password: str
    stop: list = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """Sidecar settings that point at this server."""
        return {"POSTGRES_HOST": self.host, "POSTGRES_PORT": str(self.port), "POSTGRES_USER": self.user,
                "POSTGRES_PASSWORD": self.password, **extra}

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=dbname, autocommit=True, connect_timeout=10)

    def create_db(self, name: str | None = None) -> str:
        name = name or f"db_{uuid.uuid4().hex[:10]}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_db(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def psql(self, dbname: str, sql: str) -> str:
        out = subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h", self.host, "-p", str(self.port), "-U",
             self.user, "-d", dbname, "-c", sql],
            env={**os.environ, "PGPASSWORD": self.password}, capture_output=True, text=True, check=True,
        )
        return out.stdout.strip()


def _start_local_cluster() -> PgServer:
    cluster = start_cluster(CANARY, settings="-c fsync=off -c full_page_writes=off -c synchronous_commit=off")
    return PgServer(cluster.host, cluster.port, cluster.user, CANARY, [cluster.stop])


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """A PostgreSQL server that demands a password (scram-sha-256) over TCP."""
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:15", username="postgres", password=CANARY)
        container.start()
        server = PgServer(container.get_container_host_ip(), int(container.get_exposed_port(5432)), "postgres",
                          CANARY, [container.stop])
    else:
        server = _start_local_cluster()
    yield server
    for stop in server.stop:
        stop()


@pytest.fixture(scope="session")
def pg2() -> Iterator[PgServer]:
    """A second PostgreSQL cluster (another system identifier), for two clusters sharing one bucket or NAS."""
    server = _start_local_cluster()
    yield server
    for stop in server.stop:
        stop()


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDb]:
    """A throwaway MariaDB server (own datadir, socket and port, binary log on) whose ``backup`` user has the
    canary password; root connects over the server's socket. Never the shared server on 3306."""
    require_tool("mariadbd" if shutil.which("mariadbd") else "/usr/sbin/mariadbd", "mariadb-server")
    require_tool("mariadb-dump", "mariadb-client")
    server = start_server(CANARY)
    yield server
    server.stop()


@dataclass
class S3Server:
    endpoint: str  # host:port
    access_key: str
    secret_key: str
    client: Minio
    stop: list = field(default_factory=list)
    is_moto: bool = False

    def make_bucket(self) -> str:
        name = f"bs-{uuid.uuid4().hex[:12]}"
        self.client.make_bucket(name)
        return name

    def env(self, bucket: str, **extra: str) -> dict[str, str]:
        return {"S3_ENDPOINT": f"http://{self.endpoint}", "S3_BUCKET": bucket, "S3_ACCESS_KEY_ID": self.access_key,
                "S3_SECRET_ACCESS_KEY": self.secret_key, "S3_REGION": "us-east-1", **extra}

    def keys(self, bucket: str) -> list[str]:
        return sorted(o.object_name for o in self.client.list_objects(bucket, recursive=True))


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """MinIO through testcontainers when Docker answers, else moto's S3 server in its own process."""
    if docker_available():
        from testcontainers.minio import MinioContainer

        container = MinioContainer()
        container.start()
        cfg = container.get_config()
        server = S3Server(cfg["endpoint"], cfg["access_key"], cfg["secret_key"],
                          Minio(cfg["endpoint"], cfg["access_key"], cfg["secret_key"], secure=False),
                          [container.stop])
    else:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        endpoint = f"127.0.0.1:{port}"
        key, secret = "test-access-key", "test-secret-" + secrets.token_hex(6)
        server = S3Server(endpoint, key, secret, Minio(endpoint, key, secret, secure=False, region="us-east-1"),
                          [proc.terminate], is_moto=True)
    yield server
    for stop in server.stop:
        stop()


@dataclass
class Cli:
    """Runs the real `python -m app` with exactly the settings a test gives (no inherited sidecar settings)."""

    cwd: Path

    def base_env(self) -> dict[str, str]:
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "TMPDIR")
        env = {k: os.environ[k] for k in keep if k in os.environ}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["POSTGRES_CONNECT_TIMEOUT"] = "5"
        env["LOCK_FILE"] = str(self.cwd / "backup-sidecar.lock")  # tests never share a lock by accident
        # tests' NAS directories are tmp dirs on the root disk; the mount guard has tests of its own
        env["NAS_REQUIRE_MOUNT"] = "false"
        return env

    def run(self, *args: str, env: dict[str, str], timeout: float = 300,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "app", *args], env={**self.base_env(), **env},
                                cwd=self.cwd, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}\nstdout:{result.stdout}\nstderr:{result.stderr}")
        return result

    def popen(self, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "app", *args], env={**self.base_env(), **env}, cwd=self.cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


#: a row value the encryption tests look for in stored bytes: found in a plain copy, never in an encrypted one
SECRET_ROW = "canary-row-7f3a9c-do-not-leak"


@pytest.fixture
def secret_db(pg: PgServer) -> str:
    """A database with SECRET_ROW in 2000 rows of public.secrets and a comment that must not leak either."""
    name = pg.create_db()
    with pg.connect(name) as conn:
        conn.execute("CREATE TABLE secrets (id int PRIMARY KEY, value text NOT NULL)")
        conn.execute("INSERT INTO secrets SELECT g, %s || g FROM generate_series(1, 2000) g", (SECRET_ROW,))
        conn.execute(f"COMMENT ON DATABASE {name} IS 'payroll of the Lisbon office'")
    return name


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


@pytest.fixture
def nas(tmp_path: Path) -> Path:
    path = tmp_path / "nas"
    path.mkdir()
    return path


@pytest.fixture
def bucket(s3: S3Server) -> str:
    return s3.make_bucket()


def all_files_text(*roots: Path) -> str:
    """Every file's bytes under ``roots`` as text, for canary searches."""
    chunks = []
    for root in roots:
        for path in root.rglob("*") if root.is_dir() else [root]:
            if path.is_file():
                chunks.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(chunks)
