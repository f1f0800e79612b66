"""PGDUMP_EXTRA_OPTS read the way pg_dump reads its command line, so a reserved option cannot slip through.

pg_dump parses its arguments with getopt_long: a long option may be abbreviated to any unique prefix
(``--form=plain`` is ``--format=plain``), short flags group (``-vFp`` is ``-v -F p``), a value may be
attached (``-Fp``, ``--file=x``) or be the next argument (``-F p``, ``--format plain``), and ``--`` ends the
options. Matching tokens against a list of spellings misses all of that, and an option the sidecar sets
itself (format, compression, output, connection) would then quietly change what is stored.

The table is the union of pg_dump's options from PostgreSQL 13 to 18 (its ``long_options[]`` and short
option string). The union is sound for this check: an abbreviation that is unique in it is unique, or
unknown, in every version; one that is ambiguous in it with a reserved candidate is refused, which at worst
refuses what that version of pg_dump would have rejected as ambiguous itself. tests/test_dumpopts.py holds
the table against the installed ``pg_dump --help`` and the parser against the C library's getopt_long.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: (long name, takes an argument, short letter or "" ) for every pg_dump option, PostgreSQL 13-18.
OPTIONS: tuple[tuple[str, bool, str], ...] = (
    ("data-only", False, "a"), ("blobs", False, "b"), ("large-objects", False, "b"), ("no-blobs", False, "B"),
    ("no-large-objects", False, "B"), ("clean", False, "c"), ("create", False, "C"), ("dbname", True, "d"),
    ("extension", True, "e"), ("encoding", True, "E"), ("file", True, "f"), ("format", True, "F"),
    ("host", True, "h"), ("jobs", True, "j"), ("schema", True, "n"), ("exclude-schema", True, "N"),
    ("no-owner", False, "O"), ("port", True, "p"), ("no-reconnect", False, "R"), ("schema-only", False, "s"),
    ("superuser", True, "S"), ("table", True, "t"), ("exclude-table", True, "T"), ("username", True, "U"),
    ("verbose", False, "v"), ("version", False, "V"), ("no-password", False, "w"), ("password", False, "W"),
    ("no-privileges", False, "x"), ("no-acl", False, "x"), ("compress", True, "Z"), ("help", False, "?"),
    ("attribute-inserts", False, ""), ("binary-upgrade", False, ""), ("column-inserts", False, ""),
    ("disable-dollar-quoting", False, ""), ("disable-triggers", False, ""), ("enable-row-security", False, ""),
    ("exclude-extension", True, ""), ("exclude-table-and-children", True, ""), ("exclude-table-data", True, ""),
    ("exclude-table-data-and-children", True, ""), ("extra-float-digits", True, ""), ("filter", True, ""),
    ("if-exists", False, ""), ("include-foreign-data", True, ""), ("inserts", False, ""),
    ("load-via-partition-root", False, ""), ("lock-wait-timeout", True, ""), ("no-comments", False, ""),
    ("no-data", False, ""), ("no-policies", False, ""), ("no-publications", False, ""), ("no-schema", False, ""),
    ("no-security-labels", False, ""), ("no-statistics", False, ""), ("no-subscriptions", False, ""),
    ("no-sync", False, ""), ("no-synchronized-snapshots", False, ""), ("no-table-access-method", False, ""),
    ("no-tablespaces", False, ""), ("no-toast-compression", False, ""), ("no-unlogged-table-data", False, ""),
    ("on-conflict-do-nothing", False, ""), ("quote-all-identifiers", False, ""), ("restrict-key", True, ""),
    ("role", True, ""), ("rows-per-insert", True, ""), ("section", True, ""), ("sequence-data", False, ""),
    ("serializable-deferrable", False, ""), ("snapshot", True, ""), ("statistics", False, ""),
    ("statistics-only", False, ""), ("strict-names", False, ""), ("sync-method", True, ""),
    ("table-and-children", True, ""), ("use-set-session-authorization", False, ""), ("with-data", False, ""),
    ("with-schema", False, ""), ("with-statistics", False, ""),
)

_SET = "which the sidecar sets itself"
#: Options the sidecar sets itself, or that stop pg_dump from producing the stream: (why, hint).
RESERVED: dict[str, tuple[str, str]] = {
    "f": (_SET, "the dump streams to the targets; set NAS_PATH or S3_BUCKET"),
    "F": (_SET, "use BACKUP_FORMAT"),
    "Z": (_SET, "use BACKUP_COMPRESSION and BACKUP_COMPRESSION_LEVEL"),
    "j": ("which needs the directory format, not a stream", "use BACKUP_CONCURRENCY for parallel databases"),
    "d": (_SET, "use POSTGRES_DB or the database URL"),
    "h": (_SET, "use POSTGRES_HOST or the database URL"),
    "p": (_SET, "use POSTGRES_PORT or the database URL"),
    "U": (_SET, "use POSTGRES_USER or the database URL"),
    "W": ("which makes pg_dump prompt for a password nobody can type", "set POSTGRES_PASSWORD or _FILE"),
    "?": ("which prints help instead of dumping", "remove it"),
    "V": ("which prints the version instead of dumping", "remove it"),
}


@dataclass(frozen=True)
class Option:
    """One parsed option: its canonical name (``-F`` / ``--format`` as ``F``) and what it was written as."""

    key: str  # the short letter, or the long name for options without one
    written: str
    value: str | None


class OptionsError(ValueError):
    """pg_dump would reject the line (or read it differently than the sidecar can allow)."""


def _key(long_name: str, short: str) -> str:
    return short or long_name


def _label(key: str) -> str:
    """``-F/--format`` for a key, as pg_dump's own messages write an option."""
    names = [name for name, _, short in OPTIONS if _key(name, short) == key]
    short = next((s for _, _, s in OPTIONS if s and s == key), "")
    return "/".join(([f"-{short}"] if short else []) + [f"--{n}" for n in names])


def parse(args: Sequence[str], table: Sequence[tuple[str, bool, str]] = OPTIONS) -> list[Option]:
    """The options in ``args`` in order, as getopt_long would return them with ``table``; positional words raise.

    Unknown options are kept (key ``?unknown``): pg_dump reports them itself, and a newer pg_dump may know
    them. A positional word is refused, since pg_dump would take it as the database to dump.
    """
    out: list[Option] = []
    by_short = {short: (name, takes) for name, takes, short in table if short}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            if i < len(args):
                raise OptionsError(f"{args[i]!r} after '--' would be read as the database to dump "
                                   "(hint: the sidecar names the database itself: use POSTGRES_DB)")
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            exact = [o for o in table if o[0] == name]
            found = exact or [o for o in table if o[0].startswith(name)]
            keys = {(_key(n, s), takes) for n, takes, s in found}
            if not found:
                out.append(Option("?unknown", arg, value if eq else None))
                continue
            if len(keys) > 1:
                names = ", ".join(f"--{n}" for n, _, _ in found)
                raise OptionsError(f"{arg.split('=')[0]} is ambiguous (could be {names}) "
                                   "(hint: write the option's full name)")
            (key, takes), = keys
            if takes and not eq:
                if i >= len(args):
                    raise OptionsError(f"{arg} needs a value (hint: --name=value)")
                value, i = args[i], i + 1
            elif not takes and eq:
                raise OptionsError(f"--{found[0][0]} takes no value ({arg}) (hint: drop the =value)")
            out.append(Option(key, arg, value if takes else None))
        elif arg.startswith("-") and arg != "-":
            pos = 1
            while pos < len(arg):
                letter = arg[pos]
                pos += 1
                if letter not in by_short:
                    out.append(Option("?unknown", f"-{letter}", None))
                    continue
                _, takes = by_short[letter]
                if not takes:
                    out.append(Option(letter, f"-{letter}", None))
                    continue
                if pos < len(arg):
                    value = arg[pos:]
                elif i < len(args):
                    value, i = args[i], i + 1
                else:
                    raise OptionsError(f"-{letter} needs a value (hint: -{letter}VALUE)")
                out.append(Option(letter, arg if pos == 2 else f"-{letter} (in {arg})", value))
                break
        else:
            raise OptionsError(f"{arg!r} would be read by pg_dump as the database to dump "
                               "(hint: the sidecar names the database itself: use POSTGRES_DB; quote option values "
                               "with spaces like a shell would)")
    return out


def reserved_problems(args: Sequence[str]) -> list[str]:
    """One line per option in ``args`` that the sidecar must refuse, with why; [] when the line is fine."""
    try:
        options = parse(args)
    except OptionsError as exc:
        return [str(exc)]
    problems = []
    for opt in options:
        if opt.key in RESERVED:
            why, hint = RESERVED[opt.key]
            problems.append(f"{opt.written} is {_label(opt.key)}, {why} (hint: {hint})")
    return problems
