"""Engine choice and the pieces that need no server: settings precedence, the dump-stream reader, the
client/server version rule, and the Laravel-style compose example."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

from app.engines.mysql import MysqlError, check_compatible, parse_version
from app.engines.mysql_stream import DumpScanner, without_passwords
from app.settings import KNOWN_SETTINGS, ConfigError, load_settings

COMPOSE = REPO / "deploy" / "compose" / "laravel-mariadb.yaml"


def settings(**env: str):
    return load_settings({"NAS_PATH": "/tmp", **env})


def test_a_mysql_url_selects_mariadb_and_mysql_database_overrides_its_database() -> None:
    s = settings(DATABASE_URL="mysql://app:p%40ss@db:3307/shop?charset=utf8mb4", MYSQL_DATABASE="a,b",
                 POSTGRES_HOST="pg")
    assert (s.db.engine, s.db.host, s.db.port, s.db.user, s.db.password) == ("mariadb", "db", 3307, "app", "p@ss")
    assert s.db.databases == ("a", "b")
    assert any("POSTGRES_HOST ignored" in w for w in s.warnings)


def test_backup_database_url_wins_over_database_url_across_engines() -> None:
    s = settings(BACKUP_DATABASE_URL="postgresql://u:pw@pg/app", DATABASE_URL="mariadb://root@db/shop")
    assert s.db.engine == "postgresql" and s.db.databases == ("app",)


def test_mariadb_twins_win_over_mysql_names_like_the_image_and_a_difference_is_logged() -> None:
    s = settings(MYSQL_HOST="old", MARIADB_HOST="new", MYSQL_DATABASE="shop", MYSQL_PASSWORD_FILE="/dev/null")
    assert s.db.engine == "mariadb" and s.db.host == "new" and s.db.password == ""
    assert any("MARIADB_HOST and MYSQL_HOST differ" in w for w in s.warnings)
    assert s.db.password not in s.secrets()


def test_both_server_engines_configured_is_one_configuration_error_with_a_hint() -> None:
    with pytest.raises(ConfigError) as err:
        settings(MYSQL_HOST="db", MYSQL_DATABASE="shop", POSTGRES_HOST="pg", POSTGRES_DB="app")
    [problem] = err.value.problems
    assert "one server" in problem and "hint:" in problem


def test_mariadb_without_a_database_is_refused_with_a_hint() -> None:
    with pytest.raises(ConfigError) as err:
        settings(MYSQL_HOST="db")
    assert any("MYSQL_DATABASE" in p and "hint:" in p for p in err.value.problems)


def test_sqlite_paths_alone_back_up_no_server_and_beside_a_server_they_add_units() -> None:
    from app.units import static_units

    alone = settings(SQLITE_PATHS="/data/workshop.sqlite,cache=/var/cache/app.db")
    assert alone.db.engine == "none"
    assert [(u.name, u.engine) for u in static_units(alone)] == [("workshop", "sqlite"), ("cache", "sqlite")]
    beside = settings(MYSQL_HOST="db", MYSQL_DATABASE="shop", SQLITE_PATHS="/data/workshop.sqlite",
                      BACKUP_GLOBALS="true")
    assert [(u.name, u.kind, u.engine) for u in static_units(beside)] == [
        ("shop", "database", "mariadb"), ("workshop", "database", "sqlite"), ("_globals", "globals", "mariadb")]


def test_sqlite_names_that_clash_or_relative_paths_are_refused() -> None:
    with pytest.raises(ConfigError) as err:
        settings(SQLITE_PATHS="/a/app.db,/b/app.sqlite,relative.db", MYSQL_HOST="db", MYSQL_DATABASE="x")
    text = "\n".join(err.value.problems)
    assert "two files are named 'app'" in text and "not an absolute path" in text
    with pytest.raises(ConfigError):
        settings(SQLITE_PATHS="shop=/a/shop.db", MYSQL_HOST="db", MYSQL_DATABASE="shop")


def test_every_new_setting_is_known() -> None:
    for name in ("MYSQL_HOST", "MARIADB_PASSWORD", "MARIADB_PASSWORD_FILE", "MYSQL_PASSWORD_FILE", "SQLITE_PATHS",
                 "MYSQLDUMP_LOCK_ALL_TABLES"):
        assert name in KNOWN_SETTINGS


DUMP = b"""-- CHANGE MASTER TO MASTER_LOG_FILE='binlog.000007', MASTER_LOG_POS=1281;
CREATE TABLE `a``b` (
  `id` int(11) NOT NULL
) ENGINE=InnoDB;
CREATE TABLE `empty` (
  `id` int(11) NOT NULL
) ENGINE=InnoDB;
INSERT INTO `a``b` VALUES
(1,'line\\nwith),(comma\\'s and );'),
(2,'(starts'),
(3,NULL);
DELIMITER ;;
CREATE TRIGGER t AFTER INSERT ON x FOR EACH ROW BEGIN
INSERT INTO `a``b` VALUES (9,'not data');
END */;;
DELIMITER ;
INSERT INTO `mysql_style` VALUES (1,'a),(b'),(2,'c\\'),(d'),(3,0x28);
-- SET GLOBAL gtid_slave_pos='0-1-42';
-- Dump completed on 2026-11-22  3:00:00
"""


@pytest.mark.parametrize("size", [1, 3, 64, 1 << 20])
def test_rows_and_position_are_read_from_the_dump_stream_whatever_the_chunking(size: int) -> None:
    rows: dict[str, int] = {}
    position: dict = {}
    out = b"".join(DumpScanner(rows, position).scan(DUMP[i:i + size] for i in range(0, len(DUMP), size)))
    assert out == DUMP
    assert rows == {"a`b": 3, "empty": 0, "mysql_style": 3}
    assert position == {"binlog_file": "binlog.000007", "binlog_pos": 1281, "gtid": "0-1-42"}


def test_globals_without_passwords_lock_users_and_drop_hashes_from_grants() -> None:
    text = (b"CREATE USER IF NOT EXISTS `app`@`%` IDENTIFIED BY PASSWORD '*ABC';\n"
            b"CREATE USER IF NOT EXISTS `root`@`localhost` IDENTIFIED VIA mysql_native_password USING 'invalid' "
            b"OR unix_socket;\n"
            b"GRANT SELECT ON *.* TO `app`@`%` IDENTIFIED BY PASSWORD '*ABC' WITH GRANT OPTION;\n")
    out = b"".join(without_passwords([text[:30], text[30:]]))
    assert b"*ABC" not in out
    assert b"CREATE USER IF NOT EXISTS `app`@`%` ACCOUNT LOCK;" in out
    assert b"USING 'invalid' OR unix_socket" in out  # no secret there: kept
    assert b"GRANT SELECT ON *.* TO `app`@`%` WITH GRANT OPTION;" in out


def test_client_of_the_other_family_or_older_than_the_server_is_refused_with_the_client_to_use() -> None:
    server = parse_version("10.11.19-MariaDB-0+deb12u1-log Debian 12")
    ok = parse_version("mariadb-dump  Ver 10.19 Distrib 10.11.19-MariaDB, for debian-linux-gnu (x86_64)")
    check_compatible("mariadb-dump", ok, server, "db")
    with pytest.raises(MysqlError, match="older than the server") as old:
        check_compatible("mariadb-dump", parse_version("mariadb-dump  Ver 10.19 Distrib 10.5.2-MariaDB"), server, "db")
    assert "10.11 or newer" in str(old.value)
    with pytest.raises(MysqlError, match="the other family") as other:
        check_compatible("mysqldump", parse_version("mysqldump  Ver 8.0.36 for Linux on x86_64"), server, "db")
    assert "mariadb-dump" in str(other.value)


def _compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(COMPOSE.read_text())


def test_laravel_compose_example_matches_the_compose_spec() -> None:
    import shutil
    import sys

    checker = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    result = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_laravel_compose_sidecars_run_real_commands_with_settings_the_sidecar_accepts(tmp_path: Path) -> None:
    from app.cli import build_parser

    services = _compose()["services"]
    sidecars = {n: s for n, s in services.items() if s.get("image") == "backup-sidecar:local"}
    assert set(sidecars) == {"backup-check", "backup-sidecar", "backup-once"}
    env_file = {k: v for k, v in (line.split("=", 1) for line in
                (REPO / "deploy/compose/laravel-mariadb.env.example").read_text().splitlines()
                if line and not line.startswith("#"))}
    for name, service in sidecars.items():
        build_parser().parse_args(service["command"])  # a real subcommand
        env = {k: re.sub(r"\$\{(\w+)(?::[-?][^}]*)?\}", lambda m: env_file.get(m.group(1), "backups"), str(v))
               for k, v in service["environment"].items()}
        unknown = set(env) - KNOWN_SETTINGS
        assert unknown == set(), name
        loaded = load_settings({**env, "NAS_PATH": str(tmp_path), "LOCK_FILE": str(tmp_path / "lock")})
        assert loaded.db.engine == "mariadb" and loaded.db.user == "backup" and loaded.files is not None
        assert loaded.db.password == env_file["BACKUP_DB_PASSWORD"]  # its own user, never root's password
    assert "mariadb-init" in services and "GRANT SELECT, SHOW VIEW, TRIGGER, EVENT, LOCK TABLES" in \
        " ".join(services["mariadb-init"]["command"])
    app_storage = [v for v in services["app"]["volumes"] if v.startswith("storage:")]
    sidecar_storage = [v for v in sidecars["backup-sidecar"]["volumes"] if v.startswith("storage:")]
    assert app_storage and sidecar_storage and sidecar_storage[0].endswith(":ro")
