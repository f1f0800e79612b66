"""Reading mariadb-dump's output as it streams past: rows per table, the binary log position, and the
globals without password hashes. Nothing is buffered beyond the current line.

Rows are counted from the dump itself, so the manifest's counts are exactly what the artifact holds (a
second connection's count would see another snapshot). mariadb-dump escapes newlines inside strings, so a
raw newline never occurs inside a value: MariaDB 10.x writes one row per line after ``INSERT INTO `t` VALUES``
and ends the statement with ``);``; MySQL's mysqldump writes the whole statement on one line, whose tuples
are counted with string literals stripped. Statements inside ``DELIMITER ;;`` blocks (trigger and routine
bodies) are never data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

_HEADER = re.compile(rb"^INSERT INTO `((?:[^`]|``)+)` VALUES ?")
_CREATE = re.compile(rb"^CREATE TABLE `((?:[^`]|``)+)` \(")
_STRING = re.compile(rb"'(?:[^'\\]|\\.)*'")
_MARIADB_POS = re.compile(rb"^-- CHANGE (?:MASTER|REPLICATION SOURCE) TO (?:MASTER|SOURCE)_LOG_FILE='([^']*)', "
                          rb"(?:MASTER|SOURCE)_LOG_POS=(\d+)")
_MARIADB_GTID = re.compile(rb"^-- SET GLOBAL gtid_slave_pos='([^']*)'")
_MYSQL_GTID = re.compile(rb"^SET @@GLOBAL\.GTID_PURGED=(?:/\*!80000 '\+'\*/ )?'([^']*)'")
#: How a complete dump ends (with comments on, the default).
TRAILER = b"-- Dump completed"


def _name(raw: bytes) -> str:
    return raw.replace(b"``", b"`").decode("utf-8", "backslashreplace")


class DumpScanner:
    """Counts rows per table into ``rows`` and records the binlog file, position and GTID into ``position``."""

    def __init__(self, rows: dict[str, int], position: dict[str, Any]) -> None:
        self.rows, self.position = rows, position
        self._rest = b""
        self._table: str | None = None  # inside a one-row-per-line INSERT of this table
        self._in_body = False

    def scan(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Pass ``chunks`` through unchanged, counting as they go."""
        for chunk in chunks:
            self.feed(chunk)
            yield chunk
        if self._rest:
            self._feed_lines(self._rest + b"\n")
            self._rest = b""

    def feed(self, chunk: bytes) -> None:
        cut = chunk.rfind(b"\n")
        if cut < 0:
            self._rest += chunk
            return
        block, self._rest = self._rest + chunk[:cut + 1], chunk[cut + 1:]
        self._feed_lines(block)

    def _feed_lines(self, block: bytes) -> None:
        pos, end = 0, len(block)
        while pos < end:
            if self._table is not None:
                stop = block.find(b");\n", pos)
                region = block[pos:] if stop < 0 else block[pos:stop + 3]
                found = region.count(b"\n(") + (1 if region.startswith(b"(") else 0)
                self.rows[self._table] = self.rows.get(self._table, 0) + found
                if stop < 0:
                    return
                self._table, pos = None, stop + 3
                continue
            nl = block.find(b"\n", pos)
            self._line(block[pos:nl])
            pos = nl + 1

    def _line(self, line: bytes) -> None:
        if line.startswith(b"DELIMITER "):
            self._in_body = line.strip() != b"DELIMITER ;"
            return
        if self._in_body:
            return
        if line.startswith(b"INSERT INTO `"):
            m = _HEADER.match(line)
            if m:
                table, rest = _name(m.group(1)), line[m.end():]
                if rest:
                    self.rows[table] = self.rows.get(table, 0) + _STRING.sub(b"", rest).count(b"(")
                else:
                    self._table = table
                    self.rows.setdefault(table, 0)
            return
        if line.startswith(b"CREATE TABLE `"):
            m = _CREATE.match(line)
            if m:
                self.rows.setdefault(_name(m.group(1)), 0)
            return
        if line.startswith((b"-- ", b"SET @@GLOBAL")):
            if m := _MARIADB_POS.match(line):
                self.position.update(binlog_file=m.group(1).decode(), binlog_pos=int(m.group(2)))
            elif m := _MARIADB_GTID.match(line) or _MYSQL_GTID.match(line):
                self.position["gtid"] = m.group(1).decode()


_CREATE_USER = re.compile(rb"^CREATE USER (?:IF NOT EXISTS )?(`(?:[^`]|``)*`@`(?:[^`]|``)*`) IDENTIFIED ")
_NO_SECRET = re.compile(rb"IDENTIFIED VIA [^;]*USING 'invalid'")


def without_passwords(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``--system=users`` output with every password hash left out: such a user is created locked."""
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield b"".join(_no_password(line) + b"\n" for line in lines)
    if rest:
        yield _no_password(rest)


#: The credential clause a GRANT line repeats (MariaDB writes the hash there too).
_GRANT_SECRET = re.compile(rb" IDENTIFIED (?:BY PASSWORD '[^']*'|VIA \S+ USING '(?!invalid')[^']*'(?: OR \S+)*)")


def _no_password(line: bytes) -> bytes:
    if line.startswith(b"GRANT "):
        return _GRANT_SECRET.sub(b"", line)
    m = _CREATE_USER.match(line)
    if m is None or _NO_SECRET.search(line):
        return line
    return (b"-- password left out (BACKUP_GLOBALS_PASSWORDS=false): set one, then ALTER USER ... ACCOUNT UNLOCK\n"
            b"CREATE USER IF NOT EXISTS " + m.group(1) + b" ACCOUNT LOCK;")
