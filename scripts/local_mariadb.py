"""A throwaway MariaDB server with password auth, from the installed server binaries (mariadbd).

Used by the test suite and the benchmarks. It has its own data directory, socket and port and never reads
the machine's option files (``--no-defaults``), so a shared server on 3306 is never touched. root connects
over the server's own socket (unix_socket auth); the password user ``backup`` (all privileges) is for the
sidecar and the tests, over TCP. Binary logging is on, so the dump can record the server's position.

    python scripts/local_mariadb.py start --password-file PW --dir DIR   # prints the port
    python scripts/local_mariadb.py stop --dir DIR
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_pg import free_port  # noqa: E402  (scripts/ is not a package)


@dataclass
class MariaDb:
    root: Path
    port: int
    password: str
    user: str = "backup"
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "sock"

    def as_root(self, sql: str, database: str | None = None) -> str:
        """Run ``sql`` as root over the server's socket with the stock client; its output."""
        argv = ["mariadb", "--no-defaults", f"--socket={self.socket}", "-uroot", "--batch", "--skip-column-names"]
        out = subprocess.run([*argv, *([database] if database else [])], input=sql, capture_output=True,
                             text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"mariadb as root failed: {out.stderr.strip()}")
        return out.stdout

    def stop(self, remove: bool = True) -> None:
        pid_file = self.root / "pid"
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        elif pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass
            for _ in range(300):
                if not pid_file.exists():
                    break
                time.sleep(0.1)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)


def _ready(server: MariaDb, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            break
        ping = subprocess.run(["mariadb-admin", "--no-defaults", f"--socket={server.socket}", "-uroot", "ping"],
                              capture_output=True, text=True)
        if ping.returncode == 0:
            return
        time.sleep(0.2)
    log = (server.root / "err.log").read_text(errors="replace")[-2000:] if (server.root / "err.log").exists() else ""
    raise RuntimeError(f"MariaDB did not start on port {server.port}: {log}")


def start_server(password: str, port: int | None = None, root: Path | None = None,
                 extra: tuple[str, ...] = ()) -> MariaDb:
    """mariadb-install-db + mariadbd on 127.0.0.1:``port`` (a free one by default); a few seconds."""
    for tool in ("mariadb-install-db", "mariadbd", "mariadb"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise RuntimeError(f"{tool} not found (hint: apt-get install mariadb-server mariadb-client)")
    root = root or Path(tempfile.mkdtemp(prefix="bs-mariadb-"))
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    user = ["--user=mysql"] if os.geteuid() == 0 else []
    if os.geteuid() == 0:
        shutil.chown(root, "mysql")
        root.chmod(0o755)
    if not (data / "mysql").exists():
        subprocess.run(["mariadb-install-db", "--no-defaults", *user, f"--datadir={data}",
                        "--auth-root-authentication-method=socket", "--skip-test-db"],
                       check=True, capture_output=True)
    port = port or free_port()
    mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
    server = MariaDb(root, port, password)
    server.proc = subprocess.Popen(
        [mariadbd, "--no-defaults", *user, f"--datadir={data}", f"--port={port}", "--bind-address=127.0.0.1",
         f"--socket={server.socket}", f"--pid-file={root / 'pid'}", f"--log-error={root / 'err.log'}",
         "--skip-name-resolve", f"--log-bin={root / 'binlog'}", "--server-id=1", "--innodb-buffer-pool-size=128M",
         "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0", "--event-scheduler=OFF", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    _ready(server, 60)
    quoted = password.replace("\\", "\\\\").replace("'", "\\'")
    server.as_root(f"CREATE USER IF NOT EXISTS 'backup'@'%' IDENTIFIED BY '{quoted}';\n"
                   "GRANT ALL PRIVILEGES ON *.* TO 'backup'@'%' WITH GRANT OPTION;\n")
    return server


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--port", type=int)
    p.add_argument("--password-file", type=Path, help="start: the backup user's password")
    args = p.parse_args()
    if args.action == "stop":
        MariaDb(args.dir, 0, "").stop(remove=False)
        return 0
    if not args.password_file:
        p.error("start needs --password-file")
    server = start_server(args.password_file.read_text().strip(), args.port, args.dir)
    server.proc = None  # keep running after this script exits
    print(server.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
