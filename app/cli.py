"""The command line: the only place that turns outcomes into exit codes (0 done, 1 failed, 2 usage/config)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence

from app import __version__
from app.cancel import CancelToken
from app.errors import SidecarError
from app.logs import mask, register_secrets, setup_logging
from app.settings import ConfigError, Settings, describe, load_settings

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
                   help="back up even if another host already made this slot's backup")

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
    s.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    s.add_argument("--from", dest="source", choices=("nas", "s3"), help="read from this target only")

    s = sub.add_parser("restore-files", help="extract a files archive (FILES_PATHS) into a directory")
    s.add_argument("ref", nargs="?", default="latest", metavar="ID|latest")
    s.add_argument("--to", dest="to_dir", required=True, metavar="DIR", help="directory to extract into")
    s.add_argument("--force", action="store_true", help="allow a non-empty directory (files are overwritten)")
    s.add_argument("--from", dest="source", choices=("nas", "s3"), help="read from this target only")

    s = sub.add_parser("prune", help="apply retention")
    s.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")

    s = sub.add_parser("health", help="one Nagios-style status line; exit 0/1/2/3")
    s.add_argument("--url", help="the /health URL (default: HEALTH_URL or http://127.0.0.1:HEALTH_PORT/health)")

    sub.add_parser("config", help="validate and print the effective settings, secrets masked")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "health":
        from healthcheck.check import main as health_main

        return health_main(["--url", args.url] if args.url else [])
    setup_logging()
    try:
        settings = load_settings(env_file=args.env_file)
    except ConfigError as exc:
        print(f"backup-sidecar: {len(exc.problems)} configuration problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {mask(problem)}", file=sys.stderr)
        return EXIT_USAGE
    register_secrets(settings.secrets())
    setup_logging(settings.log_level, settings.log_format)
    for warning in settings.warnings:
        log.warning("%s", warning)
    cancel = CancelToken()
    if args.command == "backup":  # the pipeline polls the token: pg_dump is stopped, a failed manifest written
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: cancel.cancel(signal.Signals(signum).name))
    elif args.command != "run":  # `run` installs its own; elsewhere unwind at once, which kills the children
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _dispatch(args, settings, cancel)
    except SidecarError as exc:
        print(f"backup-sidecar: error: {mask(str(exc)).splitlines()[0]}", file=sys.stderr)
        return EXIT_FAILED
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
    if args.command == "list":
        return _list(settings, args.db, args.json)
    if args.command == "backup":
        return _backup(settings, args, cancel)
    if args.command == "run":
        from app.notify import Notifier
        from app.notify.hooks import attach_to_runtime
        from app.runtime import run

        notifier = Notifier.from_settings(settings)
        stop_reports = attach_to_runtime(notifier, settings)
        try:
            return run(settings)
        finally:
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
                        yes=args.yes, source=args.source)
        return EXIT_OK
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
    raise AssertionError(f"unhandled command {args.command}")


def _backup(settings: Settings, args: argparse.Namespace, cancel: CancelToken) -> int:
    """One backup job now; every outcome also reaches the notifier, which is drained before exiting."""
    from app.jobs import backup_once
    from app.notify import Notifier
    from app.notify.hooks import report_job

    dbs = [d.strip() for d in args.db.split(",") if d.strip()] if args.db else None
    notifier = Notifier.from_settings(settings)
    notifier.run_started(dbs or settings.db.databases)
    try:
        result = backup_once(settings, dbs, force=args.force, cancel=cancel)
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
    if result.failures or result.error:
        return EXIT_FAILED
    for m in result.manifests:
        print(f"{m.id} ok {m.size_bytes} bytes sha256:{m.sha256}")
    return EXIT_OK


def _config(settings: Settings) -> int:
    from app.targets import make_targets

    width = max(len(name) for name, _ in describe(settings))
    for name, value in describe(settings):
        print(f"{name:<{width}}  {mask(value)}")
    print(f"{'targets':<{width}}  {', '.join(t.describe() for t in make_targets(settings)) or '-'}")
    return EXIT_OK


def _list(settings: Settings, database: str | None, as_json: bool) -> int:
    from app.catalog import load_catalog
    from app.durations import format_size
    from app.manifest import utc_iso
    from app.targets import make_targets

    targets = make_targets(settings)
    catalog = load_catalog(targets, database)
    if as_json:
        rows = []
        for e in catalog.entries:
            doc = json.loads(e.manifest.to_json())
            doc["state"] = e.status
            doc["stored_on"] = sorted(name for name, ok in e.copies.items() if ok)
            rows.append(doc)
        print(json.dumps({"backups": rows, "errors": catalog.errors}, indent=2))
    else:
        header = ("ID", "DATABASE", "FINISHED (UTC)", "SIZE", "STATUS", "STORED ON")
        table = [header] + [
            (
                e.id,
                e.manifest.database,
                (utc_iso(e.manifest.finished_at) or "-").replace("T", " ").rstrip("Z"),
                format_size(e.manifest.size_bytes) if e.manifest.ok else "-",
                e.status,
                ",".join(sorted(n for n, ok in e.copies.items() if ok)) or "-",
            )
            for e in catalog.entries
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if not catalog.entries:
            print("(no backups yet)")
    for name, error in catalog.errors.items():
        print(f"backup-sidecar: warning: {name}: {error}", file=sys.stderr)
    return EXIT_FAILED if catalog.errors else EXIT_OK
