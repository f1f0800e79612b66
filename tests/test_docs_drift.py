"""The documentation cannot drift from the code: every setting the code reads is documented, and back."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

from app.settings import FILE_VARS, KNOWN_SETTINGS, SECRET_VARS, load_settings

#: Variables the code reads that are not settings of the sidecar (they belong to the OS or to libpq).
NOT_SETTINGS = {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TMPDIR", "PGSSLMODE", "PGSSLROOTCERT",
                "PGSSLCERT", "PGSSLKEY", "PGOPTIONS", "PGTZ", "PGCLIENTENCODING", "PGPASSWORD", "PGDATABASE",
                "DOCKER_HOST", "CI"}

_READS = [
    re.compile(r"""\br\.(?:raw|str|int|bool|duration|size|choice|list|_typed)\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""environ(?:ment)?\.get\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]"""),
    re.compile(r"""\benv\.get\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
]


def settings_read_by_code() -> set[str]:
    names: set[str] = set()
    for path in [*(REPO / "app").rglob("*.py"), *(REPO / "healthcheck").rglob("*.py")]:
        text = path.read_text()
        for pattern in _READS:
            names.update(pattern.findall(text))
    names.update(SECRET_VARS)  # read through r.raw(name) in loops, so the patterns cannot see all of them
    return names - NOT_SETTINGS


#: A documented setting in .env.example: commented out, one space after '#', with its default (examples are indented).
SETTING_LINE = re.compile(r"^# ([A-Z][A-Z0-9_]*)=(.*)$")


def env_example_names() -> set[str]:
    return {m[1] for line in (REPO / ".env.example").read_text().splitlines() if (m := SETTING_LINE.match(line))}


def test_code_reads_only_documented_settings() -> None:
    read = settings_read_by_code()
    assert len(read) > 50, "the scan found too few settings: the patterns no longer match the code"
    assert read - env_example_names() == set(), "read by the code but missing from .env.example"
    readme = (REPO / "README.md").read_text()
    assert {n for n in read if f"`{n}`" not in readme} == set(), "read by the code but missing from README.md"


def test_env_example_documents_nothing_the_code_ignores() -> None:
    assert env_example_names() - settings_read_by_code() == set()


def test_every_env_example_setting_has_an_explanation_line() -> None:
    lines = (REPO / ".env.example").read_text().splitlines()
    for i, line in enumerate(lines):
        if SETTING_LINE.match(line):
            above = lines[i - 1]
            assert above.startswith("# ") and len(above) > 6 and not SETTING_LINE.match(above), (
                f"no explanation above {line!r}")


def test_env_example_sets_nothing_so_copying_it_changes_nothing() -> None:
    """Every line is a comment or blank: `cp .env.example .env` must leave every default in force."""
    from dotenv import dotenv_values

    assigned = [line for line in (REPO / ".env.example").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert assigned == [], "uncommented lines in .env.example"
    assert dotenv_values(REPO / ".env.example") == {}


def test_env_example_loads_as_valid_settings(tmp_path: Path) -> None:
    settings = load_settings({}, env_file=str(REPO / ".env.example"))
    assert settings.schedule.spec == "03:00" and settings.retention.daily == 14
    assert settings.s3 is None and settings.nas is not None  # nothing configured: ./backups


def test_every_secret_is_marked_secret_in_env_example() -> None:
    lines = (REPO / ".env.example").read_text().splitlines()
    for name in SECRET_VARS:
        [i] = [i for i, line in enumerate(lines) if line.startswith(f"# {name}=")]
        assert "(secret" in lines[i - 1], name


def test_known_settings_list_matches_what_the_code_reads() -> None:
    known = KNOWN_SETTINGS - {f"{name}_FILE" for name in FILE_VARS}
    assert known == settings_read_by_code()


def test_a_typo_in_a_setting_name_is_reported_with_the_likely_name(tmp_path: Path) -> None:
    settings = load_settings({"NAS_PATH": str(tmp_path), "POSTGRES_HOSTT": "db", "BACKUP_SCHEDUEL": "04:00",
                              "POSTGRES_INITDB_ARGS": "--data-checksums", "UNRELATED_VAR": "x"})
    assert settings.warnings == (
        "BACKUP_SCHEDUEL is not a setting backup-sidecar knows and is ignored (hint: did you mean BACKUP_SCHEDULE?)",
        "POSTGRES_HOSTT is not a setting backup-sidecar knows and is ignored (hint: did you mean POSTGRES_HOST?)",
    )
