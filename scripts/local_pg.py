"""A throwaway PostgreSQL cluster with scram password auth, from the installed server binaries.

Used by the test suite, the benchmarks and scripts/run-local.sh (when no database answers on the machine).
initdb refuses to run as root, so as root the cluster runs as the ``postgres`` user.

    python scripts/local_pg.py start --port 5433 --password-file PW --dir DIR   # prints the port
    python scripts/local_pg.py stop --dir DIR
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    """Until something accepts connections on 127.0.0.1:``port`` (a server process just started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def pg_bin_dir() -> Path:
    for major in (18, 17, 16, 15, 14, 13):
        path = Path(f"/usr/lib/postgresql/{major}/bin")
        if (path / "initdb").exists():
            return path
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("no PostgreSQL server binaries found (hint: apt-get install postgresql)")


def _as_owner() -> list[str]:
    """initdb and pg_ctl refuse root: as root they run as ``postgres`` (runuser lives in sbin, often off PATH)."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser") or next(
        (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if Path(p).exists()), None)
    if runuser is None:
        raise RuntimeError("runuser not found (hint: apt-get install util-linux)")
    return [runuser, "-u", "postgres", "--"]


@dataclass
class Cluster:
    root: Path
    port: int
    password: str
    host: str = "127.0.0.1"
    user: str = "postgres"

    def stop(self, remove: bool = True) -> None:
        subprocess.run([*_as_owner(), str(pg_bin_dir() / "pg_ctl"), "-D", str(self.root / "data"), "-m",
                        "fast", "stop"], capture_output=True)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(password: str, port: int | None = None, root: Path | None = None,
                  settings: str = "-c fsync=off -c full_page_writes=off -c synchronous_commit=off",
                  initdb_args: tuple[str, ...] = ()) -> Cluster:
    """initdb + start on 127.0.0.1:``port`` (a free one by default); about two seconds."""
    bindir = pg_bin_dir()
    root = root or Path(tempfile.mkdtemp(prefix="bs-pg-"))
    root.mkdir(parents=True, exist_ok=True)
    data, sock, pwfile = root / "data", root / "sock", root / "pw"
    sock.mkdir(exist_ok=True)
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        for path in (root, sock, pwfile):
            shutil.chown(path, "postgres")
        root.chmod(0o755)
    if not (data / "PG_VERSION").exists():
        subprocess.run(
            [*_as_owner(), str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=peer",
             "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8", *initdb_args],
            check=True, capture_output=True,
        )
    pwfile.unlink()
    port = port or free_port()
    result = subprocess.run(
        [*_as_owner(), str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
         "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=60 {settings}", "start"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        log = (root / "server.log").read_text(errors="replace")[-2000:] if (root / "server.log").exists() else ""
        raise RuntimeError(f"PostgreSQL did not start on port {port}: {result.stderr.strip()} {log}")
    return Cluster(root, port, password)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--port", type=int)
    p.add_argument("--password-file", type=Path, help="start: read the postgres password from this file")
    args = p.parse_args()
    if args.action == "stop":
        Cluster(args.dir, 0, "").stop(remove=False)
        return 0
    if not args.password_file:
        p.error("start needs --password-file")
    try:
        cluster = start_cluster(args.password_file.read_text().strip(), args.port, args.dir)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) \
            and exc.stderr else str(exc)
        print(f"local_pg: cannot start PostgreSQL: {detail}", file=sys.stderr)
        return 1
    print(cluster.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
