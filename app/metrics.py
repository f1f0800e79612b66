"""/metrics: Prometheus text, from the same cached manifests as /health plus this process's own counters.

Gauges about backups (last success, size, duration) come from the targets through the health cache, so
they are right on a replica that never ran the backup; counters (runs, failures, skips) count what this
process did since it started, which is what Prometheus' ``rate``/``increase`` expect.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.health import CODES, HealthMonitor, Snapshot, last_drills
from app.jobs import JobResult
from app.manifest import parse_utc

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SKIP_REASONS = ("lock", "claim", "slot", "overrun")


class _FromHealth(Collector):
    """Gauges read from the health monitor's snapshot at scrape time (no target I/O)."""

    def __init__(self, monitor: HealthMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.monitor.snapshot()
        ts = GaugeMetricFamily(
            "backup_sidecar_last_success_timestamp_seconds",
            "Unix time the newest good backup of the database finished",
            labels=["database"],
        )
        size = GaugeMetricFamily(
            "backup_sidecar_last_success_size_bytes",
            "Stored size of the newest good backup of the database",
            labels=["database"],
        )
        dur = GaugeMetricFamily(
            "backup_sidecar_last_duration_seconds",
            "How long the newest run of the database took, whatever its outcome",
            labels=["database"],
        )
        ok = GaugeMetricFamily(
            "backup_sidecar_last_run_success",
            "1 when the newest run of the database succeeded, 0 when it failed",
            labels=["database"],
        )
        expected = GaugeMetricFamily(
            "backup_sidecar_expected",
            "1 for each artifact the job is expected to produce (database, globals, files), 0 for a retired one",
            labels=["database", "kind"],
        )
        copies = GaugeMetricFamily(
            "backup_sidecar_last_success_copies_missing",
            "Configured targets lacking an intact copy of the newest good backup",
            labels=["database"],
        )
        missed = GaugeMetricFamily(
            "backup_sidecar_missed_slots",
            "Scheduled slots in a row that passed without a backup",
            labels=["database"],
        )
        payload = self.monitor.payload()
        missed_by_db = {c.get("database"): c.get("missed_slots", 0) for c in payload["checks"] if c["name"] == "slots"}
        for db in snap.retired:
            expected.add_metric([db.name, db.kind], 0.0)
        for db in snap.databases:
            expected.add_metric([db.name, db.kind], 1.0)
            copies.add_metric([db.name], float(len(db.missing_copies)))
            if db.name in missed_by_db:
                missed.add_metric([db.name], float(missed_by_db[db.name]))
            if db.last_good is not None:
                finished = db.last_good.finished_at or db.last_good.started_at
                ts.add_metric([db.name], finished.timestamp())
                size.add_metric([db.name], db.last_good.size_bytes)
            if db.last_run is not None:
                if db.last_run.duration_s is not None:
                    dur.add_metric([db.name], db.last_run.duration_s)
                ok.add_metric([db.name], 1.0 if db.last_run_state == "ok" else 0.0)
        yield from (ts, size, dur, ok, expected, copies, missed)
        yield from _drill_metrics(snap)
        up = GaugeMetricFamily(
            "backup_sidecar_target_up",
            "1 when the target's last read succeeded, 0 when it failed",
            labels=["target"],
        )
        for view in snap.targets:
            if view.read_at is not None:
                up.add_metric([view.target.name], 0.0 if view.error else 1.0)
        yield up
        yield GaugeMetricFamily(
            "backup_sidecar_backup_running",
            "1 while this process runs a backup",
            value=1.0 if snap.running_since else 0.0,
        )
        if snap.next_run_at is not None:
            yield GaugeMetricFamily(
                "backup_sidecar_next_run_timestamp_seconds",
                "Unix time of the next scheduled backup",
                value=snap.next_run_at.timestamp(),
            )
        status = payload["status"]
        yield GaugeMetricFamily(
            "backup_sidecar_health_status",
            "The /health code: 0 ok, 1 warning, 2 critical",
            value=float(CODES[status]),
        )


def _drill_metrics(snap: Snapshot) -> Iterator[GaugeMetricFamily]:
    """The newest restore drill per database: outcome, when, and the recovery time it measured."""
    drill_ok = GaugeMetricFamily("backup_sidecar_last_drill_success",
                                 "1 when the newest restore drill of the database passed, 0 when it failed",
                                 labels=["database"])
    drill_ts = GaugeMetricFamily("backup_sidecar_last_drill_timestamp_seconds",
                                 "Unix time the newest restore drill of the database started", labels=["database"])
    rto = GaugeMetricFamily("backup_sidecar_last_drill_rto_seconds",
                            "Seconds the newest passing drill took to restore and compare the database",
                            labels=["database"])
    for name, drill in sorted(last_drills(snap).items()):
        drill_ok.add_metric([name], 1.0 if drill.get("status") == "ok" else 0.0)
        started = parse_utc(drill.get("started_at"))
        if started is not None:
            drill_ts.add_metric([name], started.timestamp())
        if drill.get("status") == "ok" and drill.get("rto_s") is not None:
            rto.add_metric([name], float(drill["rto_s"]))
    yield from (drill_ok, drill_ts, rto)


class _FromWal(Collector):
    """Point-in-time recovery: the recovery point's age, the slot's retained WAL, the spool, base backups."""

    def __init__(self, status: object, monitor: HealthMonitor) -> None:
        self.status = status
        self.monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        from datetime import UTC, datetime

        s = self.status.copy()  # type: ignore[attr-defined]
        now = datetime.now(UTC)
        yield GaugeMetricFamily("backup_sidecar_wal_archive_age_seconds",
                                "Seconds since everything pg_receivewal received was on every target (the "
                                "recovery point's age)", value=s.age_s(now))
        if s.archived_at is not None:
            yield GaugeMetricFamily("backup_sidecar_wal_last_archived_timestamp_seconds",
                                    "Unix time the newest WAL file was stored", value=s.archived_at.timestamp())
        if s.archived_lsn is not None:
            yield GaugeMetricFamily("backup_sidecar_wal_archived_lsn_bytes", "How far the archive reaches, as an LSN "
                                    "in bytes", value=float(s.archived_lsn))
        yield GaugeMetricFamily("backup_sidecar_wal_receiver_up", "1 while pg_receivewal streams",
                                value=1.0 if s.receiver_streaming else 0.0)
        yield CounterMetricFamily("backup_sidecar_wal_receiver_restarts", "pg_receivewal restarts by this process",
                                  value=s.receiver_restarts)
        yield CounterMetricFamily("backup_sidecar_wal_files_shipped", "WAL files this process stored",
                                  value=s.files_shipped)
        yield GaugeMetricFamily("backup_sidecar_wal_spool_pending_files",
                                "Spooled WAL files that some target still lacks", value=s.pending)
        yield GaugeMetricFamily("backup_sidecar_wal_conflicts", "WAL files a target holds with other bytes",
                                value=len(s.conflicts))
        if s.slot is not None and s.slot.retained_bytes is not None:
            yield GaugeMetricFamily("backup_sidecar_wal_slot_retained_bytes",
                                    "WAL the replication slot keeps on the database server",
                                    value=float(s.slot.retained_bytes))
        base = self.monitor.snapshot().newest_base
        if base is not None:
            yield GaugeMetricFamily("backup_sidecar_base_backup_last_success_timestamp_seconds",
                                    "Unix time the newest good base backup finished",
                                    value=(base.finished_at or base.started_at).timestamp())
            yield GaugeMetricFamily("backup_sidecar_base_backup_last_success_size_bytes",
                                    "Stored size of the newest good base backup", value=float(base.size_bytes))


class Metrics:
    """The registry behind /metrics; ``record`` counts one finished job."""

    def __init__(self, monitor: HealthMonitor, databases: list[str] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.runs = Counter(
            "backup_sidecar_runs",
            "Backup runs started by this process, per database",
            ["database"],
            registry=self.registry,
        )
        self.failures = Counter(
            "backup_sidecar_failures",
            "Backup runs of this process that failed, per database",
            ["database"],
            registry=self.registry,
        )
        self.skips = Counter(
            "backup_sidecar_skips",
            "Runs skipped: lock (LOCK_FILE held), claim (another host dumping), "
            "slot (slot already backed up), overrun (previous run still going)",
            ["reason"],
            registry=self.registry,
        )
        for name in databases if databases is not None else monitor.configured:  # every unit has its series
            if name != "*":
                self.runs.labels(name)
                self.failures.labels(name)
        for reason in SKIP_REASONS:
            self.skips.labels(reason)
        self.registry.register(_FromHealth(monitor))
        self._monitor = monitor

    def watch_wal(self, status: object) -> None:
        """WAL_ARCHIVE=true: the archiver's series (app/walstatus.py WalStatus) beside the backup ones."""
        self.registry.register(_FromWal(status, self._monitor))

    def record(self, result: JobResult) -> None:
        for m in result.manifests:
            self.runs.labels(m.database).inc()
            if not m.ok:
                self.failures.labels(m.database).inc()
        for kind in result.skip_kinds:
            self.skip(kind)

    def skip(self, reason: str) -> None:
        self.skips.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
