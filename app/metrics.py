"""/metrics: Prometheus text, from the same cached manifests as /health plus this process's own counters.

Gauges about backups (last success, size, duration) come from the targets through the health cache, so
they are right on a replica that never ran the backup; counters (runs, failures, skips) count what this
process did since it started, which is what Prometheus' ``rate``/``increase`` expect.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.health import CODES, HealthMonitor
from app.jobs import JobResult

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
        for db in snap.databases:
            if db.last_good is not None:
                finished = db.last_good.finished_at or db.last_good.started_at
                ts.add_metric([db.name], finished.timestamp())
                size.add_metric([db.name], db.last_good.size_bytes)
            if db.last_run is not None:
                if db.last_run.duration_s is not None:
                    dur.add_metric([db.name], db.last_run.duration_s)
                ok.add_metric([db.name], 1.0 if db.last_run_state == "ok" else 0.0)
        yield from (ts, size, dur, ok)
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
        status = self.monitor.payload()["status"]
        yield GaugeMetricFamily(
            "backup_sidecar_health_status",
            "The /health code: 0 ok, 1 warning, 2 critical",
            value=float(CODES[status]),
        )


class Metrics:
    """The registry behind /metrics; ``record`` counts one finished job."""

    def __init__(self, monitor: HealthMonitor, databases: list[str]) -> None:
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
        for name in databases:
            if name != "*":
                self.runs.labels(name)
                self.failures.labels(name)
        for reason in SKIP_REASONS:
            self.skips.labels(reason)
        self.registry.register(_FromHealth(monitor))

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
