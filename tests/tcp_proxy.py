"""A small TCP proxy for fault tests: put it between a client and a real server (S3, PostgreSQL) and make the
connection pass, stall (stop reading: the client's writes block once the socket buffers are full), drop
(reset every connection, refuse new ones), throttle, or flip one byte of what the client sends.

    with TcpProxy("127.0.0.1", server_port) as proxy:
        env["S3_ENDPOINT"] = f"http://{proxy.address}"   # or POSTGRES_PORT=str(proxy.port)
        proxy.stall()      # from now on nothing moves in either direction
        proxy.pass_()      # and everything flows again

Every thread is a daemon and every wait is bounded, so a test that forgets to close it cannot hang.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from types import TracebackType

POLL_S = 0.05
CHUNK = 256 * 1024


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((listen_host, 0))
        self._listener.settimeout(POLL_S)
        self.host, self.port = self._listener.getsockname()[:2]
        self.mode = "pass"
        self.rate: float | None = None  # bytes per second per direction while throttled
        self._corrupt: bytes | None = None
        self.corrupted = 0  # how many times a byte was flipped
        self.bytes_up = 0  # client -> server, counted while passing
        self.connections = 0
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="tcp-proxy-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # --- modes ----------------------------------------------------------------------------------------
    def pass_(self) -> None:
        self.mode, self.rate = "pass", None

    def stall(self) -> None:
        """Keep every connection open but move no byte: a server that stopped reading and answering."""
        self.mode = "stall"

    def drop(self) -> None:
        """Reset open connections and every new one (until pass_)."""
        self.mode = "drop"
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _reset(s)

    def throttle(self, bytes_per_s: float) -> None:
        self.mode, self.rate = "pass", bytes_per_s

    def corrupt(self, marker: bytes) -> None:
        """Flip one bit in the first client->server chunk that contains ``marker`` (once)."""
        self._corrupt = marker

    def stall_after(self, up_bytes: int) -> None:
        """Stall once the clients have sent ``up_bytes`` more bytes (a server that stops reading mid-upload)."""
        limit = self.bytes_up + up_bytes

        def watch() -> None:
            while not self._closed.is_set() and self.bytes_up < limit:
                time.sleep(0.01)
            self.stall()

        threading.Thread(target=watch, name="tcp-proxy-stall-after", daemon=True).start()

    # --- plumbing -------------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            if self.mode == "drop":
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            self.connections += 1
            with self._lock:
                self._socks.update((client, server))
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(src, dst, up), name="tcp-proxy-pipe", daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while not self._closed.is_set():
                if self.mode == "stall":
                    time.sleep(POLL_S)
                    continue
                if self.mode == "drop":
                    break
                readable, _, _ = select.select([src], [], [], POLL_S)
                if not readable:
                    continue
                data = src.recv(CHUNK)
                if not data:
                    break
                if up:
                    data = self._maybe_corrupt(data)
                    self.bytes_up += len(data)
                if self.rate:
                    time.sleep(len(data) / self.rate)
                dst.sendall(data)
        except (OSError, ValueError):  # ValueError: the other direction closed the socket under select()
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._socks.difference_update((src, dst))

    def _maybe_corrupt(self, data: bytes) -> bytes:
        marker = self._corrupt
        if marker is None:
            return data
        at = data.find(marker)
        if at < 0:
            return data
        self._corrupt = None
        self.corrupted += 1
        flipped = bytearray(data)
        flipped[at] ^= 0x01
        return bytes(flipped)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _reset(s)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.close()
