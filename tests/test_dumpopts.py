"""PGDUMP_EXTRA_OPTS against pg_dump's own option table and the C library's getopt_long, which pg_dump uses.

The table comes from the installed `pg_dump --help`; the oracle is glibc's getopt_long called through ctypes
with that table, so "the way pg_dump parses it" is tested against the real parser, not a re-statement of it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import re
import subprocess

import pytest
from conftest import require_tool

from app import dumpopts
from app.settings import ConfigError, load_settings

_HELP_LINE = re.compile(r"^\s+(?:-(\S), )?--([a-z][a-z0-9-]*)(=\S+)?")


def help_table() -> list[tuple[str, bool, str]]:
    """(long name, takes a value, short letter) for every option `pg_dump --help` lists."""
    out = subprocess.run([require_tool("pg_dump", "postgresql-client"), "--help"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    table = [(m[2], bool(m[3]), m[1] or "") for line in out.splitlines() if (m := _HELP_LINE.match(line))]
    assert len(table) > 50, out
    return table


# --- glibc's getopt_long as the oracle ---------------------------------------------------------------------


class _COption(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("has_arg", ctypes.c_int), ("flag", ctypes.POINTER(ctypes.c_int)),
                ("val", ctypes.c_int)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.getopt_long.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p), ctypes.c_char_p,
                              ctypes.POINTER(_COption), ctypes.POINTER(ctypes.c_int)]
_libc.getopt_long.restype = ctypes.c_int
ERROR = "error"


def glibc_parse(table: list[tuple[str, bool, str]], argv: list[str]) -> list[tuple[str, str | None]] | str:
    """What getopt_long returns for ``argv`` with pg_dump's table: [(key, value)], or ERROR.

    An option value of '?' (pg_dump's --help) is an error too: pg_dump only honours --help as its first
    argument and otherwise exits with "Try --help".
    """
    ctypes.c_int.in_dll(_libc, "optind").value = 0  # glibc: 0 re-initialises the scanner
    ctypes.c_int.in_dll(_libc, "opterr").value = 0
    keys = {}
    longs = (_COption * (len(table) + 1))()
    for i, (name, takes, short) in enumerate(table):
        val = ord(short) if short and short != "?" else 1000 + i
        keys[val] = short if short else name
        longs[i] = _COption(name.encode(), 1 if takes else 0, None, val)
    shorts = "".join(s + (":" if takes else "") for _, takes, s in table if s and s != "?")
    args = [b"pg_dump", *(a.encode() for a in argv)]
    cargv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
    index = ctypes.c_int(0)
    found: list[tuple[str, str | None]] = []
    while (c := _libc.getopt_long(len(args), cargv, shorts.encode(), longs, ctypes.byref(index))) != -1:
        if c == ord("?") or c == ord(":"):
            return ERROR
        optarg = ctypes.c_char_p.in_dll(_libc, "optarg").value
        found.append((keys[c], optarg.decode() if optarg is not None else None))
    if ctypes.c_int.in_dll(_libc, "optind").value < len(args):  # a positional word: the database to dump
        return ERROR
    return ERROR if any(key == "?" for key, _ in found) else found


def ours(table: list[tuple[str, bool, str]], argv: list[str]) -> list[tuple[str, str | None]] | str:
    try:
        options = dumpopts.parse(argv, table)
    except dumpopts.OptionsError:
        return ERROR
    if any(o.key in ("?unknown", "?") for o in options):
        return ERROR
    return [(o.key, o.value) for o in options]


def generated_lines(table: list[tuple[str, bool, str]]) -> list[list[str]]:
    """Every prefix of every long option (alone, =value, value apart), short flags in pairs and groups."""
    lines: list[list[str]] = []
    for name, _, _ in table:
        for end in range(1, len(name) + 1):
            prefix = f"--{name[:end]}"
            lines += [[prefix], [f"{prefix}=plain"], [prefix, "plain"], ["-v", prefix, "x", "--no-owner"]]
    letters = [s for _, _, s in table if s and s != "?"] + ["X", "q"]
    for a, b in itertools.product(letters, repeat=2):
        lines += [[f"-{a}{b}"], [f"-{a}{b}p"], [f"-{a}", f"-{b}"], [f"-{a}{b}", "p"]]
    lines += [["--"], ["--", "db"], ["db"], ["-"], ["--no-owner", "db", "-Fp"], ["--exclude-table-data", "-Fp"],
              ["-n", "-Fp"], ["-vFp"], ["--form=plain"], ["--format"], ["-F"], ["--no-owner=x"]]
    return lines


# --- tests -------------------------------------------------------------------------------------------------


def test_the_option_table_holds_every_option_the_installed_pg_dump_lists() -> None:
    known = {name: (takes, short) for name, takes, short in dumpopts.OPTIONS}
    for name, takes, short in help_table():
        assert name in known, f"--{name} (pg_dump --help) is missing from app/dumpopts.OPTIONS"
        assert known[name] == (takes, short), f"--{name}: pg_dump says {(takes, short)}, the table {known[name]}"


def test_the_parser_reads_every_line_exactly_as_getopt_long_does() -> None:
    table = help_table()
    lines = generated_lines(table)
    assert len(lines) > 2000
    mismatches = [(line, ours(table, line), glibc_parse(table, line)) for line in lines
                  if ours(table, line) != glibc_parse(table, line)]
    assert mismatches == [], mismatches[:10]


def test_whatever_this_pg_dump_reads_as_a_reserved_option_is_refused() -> None:
    """Soundness of the union table: no spelling the installed pg_dump resolves to a reserved option passes."""
    table = help_table()
    slipped = []
    for line in generated_lines(table):
        parsed = glibc_parse(table, line)
        if parsed != ERROR and any(key in dumpopts.RESERVED for key, _ in parsed):
            if not dumpopts.reserved_problems(line):
                slipped.append(line)
    assert slipped == []


@pytest.mark.parametrize("line", ["--form=plain", "-vFp", "-Fp", "-F p", "--format plain", "--comp=9", "-xZ0",
                                  "--fil=/tmp/x", "-f/tmp/x", "--host=elsewhere", "-Uroot", "--pass", "-j4",
                                  "otherdb", "-- otherdb", "--db=otherdb"])
def test_reserved_options_are_refused_in_any_spelling(line: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"NAS_PATH": "/tmp", "PGDUMP_EXTRA_OPTS": line})
    [problem] = err.value.problems
    assert problem.startswith("PGDUMP_EXTRA_OPTS: ") and "(hint: " in problem


@pytest.mark.parametrize("line", ["--no-owner", "--exclude-table-data=audit.*", "-n public -T 'big*'",
                                  "--exclude-table-data -Fp", "-vx --no-comments", "--lock-wait=30s"])
def test_ordinary_options_pass(line: str) -> None:
    settings = load_settings({"NAS_PATH": "/tmp", "PGDUMP_EXTRA_OPTS": line})
    assert settings.db.extra_dump_opts


def test_the_refusal_names_the_option_it_is_and_what_to_use() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"NAS_PATH": "/tmp", "PGDUMP_EXTRA_OPTS": "-vFp --form=plain"})
    assert err.value.problems == [
        "PGDUMP_EXTRA_OPTS: -F (in -vFp) is -F/--format, which the sidecar sets itself (hint: use BACKUP_FORMAT)",
        "PGDUMP_EXTRA_OPTS: --form=plain is -F/--format, which the sidecar sets itself (hint: use BACKUP_FORMAT)",
    ]
