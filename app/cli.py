"""The command line: the only place that turns outcomes into exit codes (0 done, 1 failed, 2 usage/config)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from app import __version__, encryption
from app.cancel import CancelToken
from app.errors import SidecarError, UsageError
from app.logs import mask, register_secrets, setup_logging
from app.settings import ConfigError, Settings, describe, environment, load_settings

if TYPE_CHECKING:
    from app.catalog import Entry
    from app.manifest import Manifest

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: `run` stops within about 10 s of SIGTERM; queued notifications get this long on top (none: no wait at all)
NOTIFY_DRAIN_AT_STOP_S = 5.0
log = logging.getLogger("backup-sidecar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="backup-sidecar",
        description="Streamed, checksummed PostgreSQL backups to S3/MinIO and a NAS directory.",
        epilog="Settings come from the environment and an optional .env file; see `backup-sidecar config`.",
    )
    p.add_argument("--version", action="version", version=f"backup-sidecar {__version__}")
    p.add_argument("--env-file", metavar="PATH", help="read settings from this file instead of ./.env")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", help="the long-running sidecar: scheduler + /health + /metrics")

    s = sub.add_parser("backup", help="one backup now, then exit")
    s.add_argument("--db", metavar="NAME", help="only this database (comma list); default: POSTGRES_DB")
    s.add_argument("--force", action="store_true",
                   help="with --scheduled: back up even if this slot already has a backup (deletes none)")
    s.add_argument("--scheduled", action="store_true",
                   help="a scheduled run (CronJob): skip when this BACKUP_SCHEDULE slot already has a backup")

    s = sub.add_parser("list", help="backups known to the targets, newest first")
    s.add_argument("--db", metavar="NAME", help="only this database")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = sub.add_parser("verify", help="checksum and archive integrity of backups")
    s.add_argument("ref", nargs="?", default="latest", metavar="ID|latest")
    s.add_argument("--all", action="store_true", help="verify every ok backup")
    s.add_argument("--db", metavar="NAME", help="with latest or --all: only this database")
    s.add_argument("--restore-test", action="store_true",
                   help="also restore into a scratch database, count tables and rows, then drop it")

    s = sub.add_parser("restore", help="stream a backup into a database")
    s.add_argument("ref", nargs="?", default="latest", metavar="ID|latest")
    s.add_argument("--to-db", required=True, metavar="NAME", help="database to restore into")
    s.add_argument("--db", metavar="NAME", help="with latest: the newest backup of this database")
    s.add_argument("--create", action="store_true", help="create the database if it does not exist")
    s.add_argument("--clean", action="store_true", help="allow restoring over existing tables (drops them)")
    s.add_argument("--no-owner", action="store_true",
                   help="leave object owners out: everything belongs to the restoring role (custom format)")
    s.add_argument("--no-acl", action="store_true", help="leave grants and revokes out (custom format)")
    s.add_argument("--force", action="store_true",
                   help="SQLite: replace the file even while a process holds it open (restart it afterwards)")
    s.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    s.add_argument("--from", dest="source", choices=("nas", "s3"), help="read from this target only")

    s = sub.add_parser("restore-cluster",
                       help="disaster recovery: the globals, then the latest backup of every database, into "
                            "the server POSTGRES_* points at")
    s.add_argument("--db", metavar="NAME", help="only these databases (comma list); default: every one backed up")
    s.add_argument("--clean", action="store_true", help="replace databases that exist and have tables")
    s.add_argument("--no-globals", action="store_true", help="do not apply the globals backup (roles exist)")
    s.add_argument("--jobs", type=int, metavar="N", help="databases restored side by side (BACKUP_CONCURRENCY)")
    s.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    s.add_argument("--from", dest="source", choices=("nas", "s3"), help="read from this target only")

    s = sub.add_parser("restore-files", help="extract a files archive (FILES_PATHS) into a directory")
    s.add_argument("ref", nargs="?", default="latest", metavar="ID|latest")
    s.add_argument("--to", dest="to_dir", required=True, metavar="DIR", help="directory to extract into")
    s.add_argument("--force", action="store_true", help="allow a non-empty directory (files are overwritten)")
    s.add_argument("--from", dest="source", choices=("nas", "s3"), help="read from this target only")

    s = sub.add_parser("sync", help="copy backups a target lacks from a target that holds a good copy")
    s.add_argument("--db", metavar="NAME", help="only this database")

    s = sub.add_parser("prune", help="apply retention")
    s.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")

    # its options (--url, --timeout, --help) are healthcheck/check.py's own, parsed there, so that a usage error
    # exits 3 (UNKNOWN) like every other answer a monitor cannot read, never 2 (CRITICAL)
    sub.add_parser("health", add_help=False, help="one Nagios-style status line; exit 0/1/2/3 "
                   "(options: --url URL, --timeout SECONDS; default HEALTH_URL or http://127.0.0.1:HEALTH_PORT/health)")

    sub.add_parser("config", help="validate and print the effective settings, secrets masked")

    s = sub.add_parser("check", help="live preflight: database, every target, lock, schedule, notification channels")
    s.add_argument("--notify-optional", action="store_true",
                   help="report an unreachable notification channel as a warning, not a failure (for init steps: "
                        "a mail outage must not stop backups)")

    s = sub.add_parser("fetch", help="copy one backup's stored bytes, checked against its manifest, to a file or -")
    s.add_argument("ref", nargs="?", default="latest", metavar="ID|latest")
    s.add_argument("--db", metavar="NAME", help="with latest: the newest backup of this database")
    s.add_argument("--from", dest="source", choices=("nas", "s3"), help="read from this target only")
    s.add_argument("-o", "--output", metavar="FILE|-",
                   help="where to write (default: the artifact's file name here; - for stdout)")
    s.add_argument("--force", action="store_true", help="overwrite an existing file")

    for name, what in (("hold", "put a legal hold on one backup's S3 objects (S3_OBJECT_LOCK)"),
                       ("release", "lift the legal hold of one backup")):
        s = sub.add_parser(name, help=what)
        s.add_argument("ref", metavar="ID|latest")
        s.add_argument("--db", metavar="NAME", help="with latest: the newest backup of this database")

    sub.add_parser("base-backup", help="physical base backup now (needs `run` streaming WAL: WAL_ARCHIVE=true)")
    s = sub.add_parser("restore-pitr", help="lay out a data directory that recovers to a point in time")
    s.add_argument("--to-dir", metavar="DIR", help="new or empty directory for the data directory")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--time", metavar="T", help="recover up to this time (ISO 8601; no offset: TZ)")
    which.add_argument("--lsn", metavar="L", help="recover up to this WAL location, e.g. 0/3027F28")
    which.add_argument("--latest", action="store_true", help="recover everything the archive holds")
    s.add_argument("--from", dest="source", choices=("nas", "s3"), help="read from this target only")
    s.add_argument("--drill", action="store_true", help="recover into a scratch directory, start a throwaway "
                   "server on it, check the target was reached, record RTO and recovery point, clean up")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "health":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "health":
        from healthcheck.check import main as health_main

        env, problems = environment(args.env_file)  # HEALTH_URL / HEALTH_PORT may come from the env file
        if problems:
            print(f"BACKUP UNKNOWN - {problems[0]}")
            return 3
        os.environ.update({k: v for k, v in env.items() if k in ("HEALTH_URL", "HEALTH_PORT")})
        return health_main(extra)
    setup_logging()
    try:
        settings = load_settings(env_file=args.env_file)
    except ConfigError as exc:
        print(f"backup-sidecar: {len(exc.problems)} configuration problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {mask(problem)}", file=sys.stderr)
        return EXIT_USAGE
    encryption.use_identity(settings.encryption.identity_file)
    register_secrets(settings.secrets())
    setup_logging(settings.log_level, settings.log_format)
    for warning in settings.warnings:
        log.warning("%s", warning)
    cancel = CancelToken()
    # the pipeline polls the token: pg_dump (pg_basebackup) is stopped, a failed manifest written
    if args.command in ("backup", "base-backup", "sync"):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: cancel.cancel(signal.Signals(signum).name))
    elif args.command != "run":  # `run` installs its own; elsewhere unwind at once, which kills the children
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _dispatch(args, settings, cancel)
    except SidecarError as exc:
        print(f"backup-sidecar: error: {mask(str(exc)).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("backup-sidecar: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # a bug or an unforeseen library error: one masked line, the trace in the log
        log.debug("unexpected failure", exc_info=True)
        text = mask(str(exc)).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"backup-sidecar: error: unexpected {exc.__class__.__name__}: {text} (hint: rerun with "
              "LOG_LEVEL=DEBUG for the traceback, and please report it)", file=sys.stderr)
        return EXIT_FAILED


def _dispatch(args: argparse.Namespace, settings: Settings, cancel: CancelToken) -> int:
    if args.command == "config":
        return _config(settings)
    if args.command == "check":
        return _check(settings, args.notify_optional)
    if args.command == "fetch":
        return _fetch(settings, args)
    if args.command == "list":
        return _list(settings, args.db, args.json)
    if args.command == "backup":
        return _backup(settings, args, cancel)
    if args.command == "sync":
        return _sync(settings, args.db, cancel)
    if args.command == "run":
        from app import drills
        from app.notify import Notifier
        from app.notify.hooks import attach_to_runtime
        from app.runtime import run

        notifier = Notifier.from_settings(settings)
        notifier.announce()
        stop_reports = attach_to_runtime(notifier, settings)
        stop_drills = drills.attach(settings, notifier)
        try:
            return run(settings)
        finally:
            stop_drills.set()
            stop_reports.set()
            notifier.close(NOTIFY_DRAIN_AT_STOP_S)
    if args.command == "verify":
        from app.notify import Notifier
        from app.verify import verify_command

        notifier = Notifier.from_settings(settings)
        try:
            ok = verify_command(settings, args.ref, args.all, args.db, args.restore_test, notifier)
        finally:
            notifier.close()
        return EXIT_OK if ok else EXIT_FAILED
    if args.command == "restore":
        from app.restore import restore_command

        restore_command(settings, args.ref, args.to_db, database=args.db, create=args.create, clean=args.clean,
                        yes=args.yes, source=args.source, owner=not args.no_owner, acl=not args.no_acl,
                        force=args.force)
        return EXIT_OK
    if args.command == "restore-cluster":
        from app.cluster import restore_cluster_command

        only = [d.strip() for d in args.db.split(",") if d.strip()] if args.db else None
        ok = restore_cluster_command(settings, source=args.source, only=only, clean=args.clean, yes=args.yes,
                                     with_globals=not args.no_globals, jobs=args.jobs)
        return EXIT_OK if ok else EXIT_FAILED
    if args.command == "restore-files":
        from pathlib import Path

        from app.restore_files import restore_files_command

        restore_files_command(settings, args.ref, Path(args.to_dir), force=args.force, source=args.source)
        return EXIT_OK
    if args.command == "prune":
        from app.notify import Notifier
        from app.retention import prune_command

        notifier = Notifier.from_settings(settings)
        try:
            ok = prune_command(settings, dry_run=args.dry_run, notifier=notifier)
        finally:
            notifier.close()
        return EXIT_OK if ok else EXIT_FAILED
    if args.command in ("hold", "release"):
        from app.holds import hold_command

        print(hold_command(settings, args.ref, args.db, on=args.command == "hold"))
        return EXIT_OK
    if args.command in ("base-backup", "restore-pitr"):
        return _pitr(args, settings, cancel)
    raise AssertionError(f"unhandled command {args.command}")


def _pitr(args: argparse.Namespace, settings: Settings, cancel: CancelToken) -> int:
    """base-backup and restore-pitr (app/basebackup.py, app/pitr.py)."""
    from pathlib import Path

    from app.notify import Notifier

    if args.command == "base-backup":
        from app.basebackup import base_backup_command
        from app.targets import make_targets

        notifier = Notifier.from_settings(settings)
        try:
            manifest = base_backup_command(settings, make_targets(settings), cancel)
            notifier.backup_finished(manifest)
        except Exception as exc:
            manifest = getattr(exc, "manifest", None)
            if manifest is not None:
                notifier.backup_finished(manifest)
            else:
                notifier.failure("backup", "_base", str(exc) or exc.__class__.__name__)
            raise
        finally:
            notifier.close()
        p = manifest.physical or {}
        print(f"{manifest.id} ok {manifest.size_bytes} bytes sha256:{manifest.sha256} WAL {p.get('start_lsn')} to "
              f"{p.get('stop_lsn')} timeline {p.get('timeline')}")
        return EXIT_OK
    from app.pitr import parse_target, pitr_drill_command, restore_pitr_command

    target = parse_target(args.time, args.lsn, args.latest, settings.schedule.tz)
    if args.drill:
        return EXIT_OK if pitr_drill_command(settings, target, args.source) else EXIT_FAILED
    if not args.to_dir:
        print("backup-sidecar: error: restore-pitr needs --to-dir DIR (hint: or --drill for a scratch recovery)",
              file=sys.stderr)
        return EXIT_USAGE
    restore_pitr_command(settings, Path(args.to_dir), target, args.source)
    return EXIT_OK


def _backup(settings: Settings, args: argparse.Namespace, cancel: CancelToken) -> int:
    """One backup job now; every outcome also reaches the notifier, which is drained before exiting."""
    from app.jobs import backup_once
    from app.notify import Notifier
    from app.notify.hooks import report_job
    from app.preflight import describe_active

    dbs = [d.strip() for d in args.db.split(",") if d.strip()] if args.db else None
    for line in describe_active(settings):
        log.info("%s", line if dbs is None or not line.startswith("databases:") else f"databases: {', '.join(dbs)}")
    slot = None
    if args.scheduled:  # slot deduplication is for scheduled runs only; a manual backup always backs up
        from datetime import UTC, datetime

        from app.coordination import scheduled_slot
        from app.schedule_spec import parse_schedule

        schedule = parse_schedule(settings.schedule.spec, settings.schedule.tz)
        slot = scheduled_slot(schedule, datetime.now(UTC), settings.health.skew_tolerance_s)
    notifier = Notifier.from_settings(settings)
    notifier.run_started(dbs or settings.db.databases)
    try:
        result = backup_once(settings, dbs, force=args.force, cancel=cancel, slot=slot)
    except Exception as exc:
        notifier.failure("backup", None, str(exc) or exc.__class__.__name__)
        notifier.run_finished(False)
        notifier.close()
        raise
    report_job(notifier, result, settings)
    notifier.close()
    for why in result.skipped:
        print(f"backup-sidecar: skipped: {why}", file=sys.stderr)
    if result.failures:
        failed = result.failures
        print(f"backup-sidecar: error: {len(failed)} of {len(result.manifests)} backup(s) failed: "
              + "; ".join(f"{m.id}: {m.error}" for m in failed), file=sys.stderr)
    if result.error:
        print(f"backup-sidecar: error: {result.error}", file=sys.stderr)
    for failure in result.verify_failures:
        print(f"backup-sidecar: error: verify after backup: {failure}", file=sys.stderr)
    for m in result.manifests:
        for line in m.sanity:
            print(f"backup-sidecar: warning: {m.id}: {line}", file=sys.stderr)
    if result.failures or result.error or result.verify_failures:
        return EXIT_FAILED
    for m in result.manifests:
        print(f"{m.id} ok {m.size_bytes} bytes sha256:{m.sha256}")
    return EXIT_OK


def _sync(settings: Settings, database: str | None, cancel: CancelToken) -> int:
    """Catch-up now: 0 when every target holds every kept backup."""
    from app.notify import Notifier
    from app.sync import sync_command

    report = sync_command(settings, database, cancel)
    for line in report.copied:
        print(f"copied {line}")
    problems = report.errors + [f"{name}: {error}" for name, error in report.unavailable.items()]
    if problems:
        notifier = Notifier.from_settings(settings)
        for problem in problems:
            print(f"backup-sidecar: error: sync: {problem}", file=sys.stderr)
            notifier.failure("upload", None, f"sync: {problem}")
        notifier.close()
    if cancel.cancelled:
        print(f"backup-sidecar: error: sync interrupted: {cancel.reason}", file=sys.stderr)
        return EXIT_FAILED
    if not report.copied and not problems:
        print("every target holds every backup")
    return EXIT_OK if report.ok else EXIT_FAILED


def _config(settings: Settings) -> int:
    from app.targets import make_targets

    width = max(len(name) for name, _ in describe(settings))
    for name, value in describe(settings):
        print(f"{name:<{width}}  {mask(value)}")
    print(f"{'targets':<{width}}  {', '.join(t.describe() for t in make_targets(settings)) or '-'}")
    return EXIT_OK


def _check(settings: Settings, notify_optional: bool) -> int:
    from app.preflight import describe_active, exit_status, run_checks

    for line in describe_active(settings):
        print(f"{'info':<4}  {mask(line)}")
    findings = run_checks(settings, notify_optional=notify_optional)
    for finding in findings:
        print(mask(finding.line()), flush=True)
    failed = sum(f.status == "FAIL" for f in findings)
    warned = sum(f.status == "warn" for f in findings)
    print(f"check: {len(findings) - failed - warned} ok, {warned} warning(s), {failed} failed", file=sys.stderr)
    return EXIT_OK if exit_status(findings) else EXIT_FAILED


def _fetch(settings: Settings, args: argparse.Namespace) -> int:
    """One artifact's stored bytes through the verified read path: size and SHA-256 match, or exit 1.

    To a file: written beside it as FILE.partial and renamed only once the checksum matched, so a file of
    that name is always a whole, verified copy. To stdout: the last chunk is held back until the checksum
    matched, so a consumer of a damaged copy sees a truncated stream and fails too.
    """
    import os
    from pathlib import Path

    from app.readpath import stored_chunks
    from app.selection import pick_source, resolve_entry
    from app.targets import make_targets

    targets = make_targets(settings)
    entry = resolve_entry(targets, args.ref, args.db)
    source = pick_source(entry, targets, args.source)
    manifest = entry.manifest_on(source.name)
    name = manifest.artifact.rsplit("/", 1)[-1]
    if args.output == "-":
        if sys.stdout.isatty():
            raise SidecarError("refusing to write a binary backup to a terminal (hint: -o FILE, or pipe it: "
                               "-o - | zstd -dc | pg_restore ...)")
        out = sys.stdout.buffer
        for chunk in stored_chunks(source, manifest):
            out.write(chunk)
        out.flush()
        print(f"{entry.id}: {manifest.size_bytes} bytes from {source.name}, sha256 verified", file=sys.stderr)
        return EXIT_OK
    path = Path(args.output or name)
    if path.is_dir():
        path = path / name
    if path.exists() and not args.force:
        raise SidecarError(f"{path} exists (hint: --force to overwrite, or -o another file)")
    partial = path.with_name(f"{path.name}.partial")
    try:
        with open(partial, "wb") as f:
            for chunk in stored_chunks(source, manifest):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    print(f"{path}: {entry.id}, {manifest.size_bytes} bytes from {source.describe()}, sha256 "
          f"{manifest.sha256} verified")
    return EXIT_OK


def _missing_directories(settings: Settings) -> dict[str, str]:
    """NAS directories that do not exist: reading them lists nothing, which must not pass for "no backups"."""
    if settings.nas is None or settings.nas.path.is_dir():
        return {}
    import os

    if settings.nas.create_missing:
        why = (f"NAS_PATH is unset and its default ./backups is relative to the current directory ({os.getcwd()}), "
               "which has none: nothing was ever backed up here (hint: run from the directory the sidecar runs in, "
               "set NAS_PATH, or `source .local/run-local.env` after scripts/run-local.sh)")
    else:
        why = (f"NAS_PATH={settings.nas.path} does not exist or is not a directory (hint: mount the backup volume "
               "there or fix NAS_PATH)")
    return {"nas": f"{settings.nas.path}: {why}"}


def _drill_cell(drill: dict | None) -> str:
    """``ok 12.3s`` (the drill's RTO), ``FAILED`` or ``-`` (never drilled)."""
    if not drill:
        return "-"
    if drill.get("status") == "ok":
        return f"ok {drill.get('rto_s') or 0:.1f}s"
    return "FAILED"


def _lock_states(settings: Settings, targets: list, entries: list) -> dict[str, dict]:
    """With S3_OBJECT_LOCK: each S3 copy's retain-until date and legal hold (two requests a backup)."""
    if settings.s3 is None or not settings.s3.object_lock:
        return {}
    from app.targets.s3 import S3Target

    [s3] = [t for t in targets if isinstance(t, S3Target)]
    states = {}
    for e in entries:
        if e.copies.get("s3"):
            until, held = s3.lock_state(e.manifest_on("s3").artifact)
            states[e.id] = {"retain_until": until.isoformat() if until else None, "held": held}
    return states


def _encryption_cell(e: Entry) -> str:
    """The fingerprints each backup's copies are encrypted to: one list when every copy agrees, else per target
    (BACKUP_ENCRYPT_TARGETS=s3: ``nas:- s3:FP``), ``-`` for a plain copy."""
    def cell(m: Manifest) -> str:
        return ",".join((m.encryption or {}).get("recipients") or []) or "-"

    per = {name: cell(m) for name, m in sorted(e.manifests.items()) if e.copies.get(name)} or {"": cell(e.manifest)}
    if len(set(per.values())) == 1:
        return next(iter(per.values()))
    return " ".join(f"{name}:{value}" for name, value in per.items())


def _lock_cell(state: dict | None) -> str:
    if state is None:
        return "-"
    if state["held"]:
        return "held"
    return f"until {state['retain_until'][:10]}" if state["retain_until"] else "none"


def _list(settings: Settings, database: str | None, as_json: bool) -> int:
    from app.catalog import load_catalog
    from app.durations import format_size
    from app.identity import of_manifest, try_server_identity
    from app.manifest import utc_iso
    from app.targets import make_targets

    targets = make_targets(settings)
    missing = _missing_directories(settings)
    catalog = load_catalog([t for t in targets if t.name not in missing], database)
    catalog.errors.update(missing)
    cluster = try_server_identity(settings)
    foreign = {e.id for e in catalog.entries if cluster is not None and not cluster.matches(e.manifest)}
    locks = _lock_states(settings, targets, catalog.entries)
    if as_json:
        rows = []
        for e in catalog.entries:
            doc = json.loads(e.manifest.to_json())
            doc["state"] = e.status
            doc["stored_on"] = sorted(name for name, ok in e.copies.items() if ok)
            doc["copies"] = {name: {"artifact": m.artifact, "size_bytes": m.size_bytes, "sha256": m.sha256,
                                    "encryption": m.encryption, "intact": e.copies.get(name, False)}
                             for name, m in sorted(e.manifests.items())}
            doc["last_drill"] = {k: v for k, v in e.drill.items() if k != "_key"} if e.drill else None
            doc["foreign"] = e.id in foreign
            if e.id in locks:
                doc["s3_lock"] = locks[e.id]
            rows.append(doc)
        print(json.dumps({"backups": rows, "errors": catalog.errors}, indent=2))
    else:
        header = ("ID", "DATABASE", "FINISHED (UTC)", "SIZE", "STATUS", "STORED ON", "DRILL", "ENCRYPTED TO",
                  "S3 LOCK", "WARNINGS")
        table = [header] + [
            (
                e.id,
                e.manifest.database,
                (utc_iso(e.manifest.finished_at) or "-").replace("T", " ").rstrip("Z"),
                format_size(e.manifest.size_bytes) if e.manifest.ok else "-",
                e.status + (" (other cluster)" if e.id in foreign else "")
                + (" (warnings)" if e.manifest.sanity else ""),
                ",".join(sorted(n for n, ok in e.copies.items() if ok)) or "-",
                _drill_cell(e.drill),
                _encryption_cell(e),
                _lock_cell(locks.get(e.id)),
                str(len(e.manifest.warnings)) if e.manifest.warnings else "-",
            )
            for e in catalog.entries
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if not catalog.entries:
            print("(no backups yet)" if not catalog.errors else "(none found; see the warnings below)")
        for e in catalog.entries:
            for warning in e.manifest.warnings if e.manifest.ok else ():
                print(f"  {e.id}: warning: {warning}")
    others: dict[str, set[str]] = {}
    for e in catalog.entries:
        if e.id in foreign:
            others.setdefault(e.manifest.database, set()).add(of_manifest(e.manifest).describe())
    for name, where in sorted(others.items()):
        count = sum(1 for e in catalog.entries if e.id in foreign and e.manifest.database == name)
        print(f"backup-sidecar: warning: {count} backup(s) of {name} come from another cluster "
              f"({', '.join(sorted(where))}), not this server ({cluster.describe() if cluster else '?'}); backup, "
              "restore latest, prune and /health ignore them (hint: give each cluster its own S3_PREFIX or NAS_PATH)",
              file=sys.stderr)
    for name, error in catalog.errors.items():
        print(f"backup-sidecar: warning: {name}: {error}", file=sys.stderr)
    return EXIT_FAILED if catalog.errors else EXIT_OK
