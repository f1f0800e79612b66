"""Output sanity: does a fresh dump look like the database it came from?

Two signs of a dump that "succeeded" without the data: it is far smaller than the previous backup of the
same database (same cluster, format and compression), or the database had tables at the previous backup and
this one recorded none. Either is a warning on the manifest (in ``warnings``, prefixed ``output sanity:``),
in /health and in the notification; never a failure, because a database can legitimately shrink. The
check runs when the dump has ended and before the backup is published, so the warning is in the one ok
manifest written (targets never overwrite a manifest).
"""

from __future__ import annotations

from collections.abc import Sequence

from app.durations import format_size
from app.identity import of_manifest
from app.manifest import SANITY_PREFIX, Manifest


def table_count(m: Manifest) -> int | None:
    contents = m.contents or {}
    objects = contents.get("objects") or {}
    if isinstance(objects.get("tables"), int):
        return int(objects["tables"]) + int(objects.get("partitioned_tables") or 0)
    rows = contents.get("rows")
    return len(rows) if isinstance(rows, dict) else None


def previous_of(m: Manifest, history: Sequence[Manifest]) -> Manifest | None:
    """The newest ok backup of the same database and cluster made before ``m``."""
    cluster = of_manifest(m)
    earlier = [h for h in history if h.ok and h.id != m.id and h.database == m.database and h.kind == m.kind
               and h.started_at < m.started_at and cluster.matches(h)]
    return max(earlier, key=lambda h: h.started_at, default=None)


def check_output(m: Manifest, raw_bytes: int, previous: Manifest | None, drop: float) -> list[str]:
    """The sanity warnings (each starting with SANITY_PREFIX) for ``m`` whose producer wrote ``raw_bytes``,
    against ``previous``; ``drop`` is BACKUP_SIZE_DROP_WARN (0: off). Runs before the backup is published."""
    if previous is None or m.kind != "database":
        return []
    out: list[str] = []
    # raw to raw where the previous run recorded it; else raw against stored, which only errs on the quiet
    # side (compression makes the stored size smaller than the raw one)
    before = previous.raw_bytes if previous.raw_bytes is not None else previous.size_bytes
    same_format = previous.format == m.format
    if drop > 0 and same_format and before > 0 and raw_bytes < before * drop:
        out.append(f"{SANITY_PREFIX}the dump is {format_size(raw_bytes)}, less than {drop:.0%} of the previous "
                   f"backup {previous.id} ({format_size(before)}) (hint: check that the database still holds its "
                   "data, and PGDUMP_EXTRA_OPTS; BACKUP_SIZE_DROP_WARN sets the threshold)")
    now, had = table_count(m), table_count(previous)
    if now == 0 and had:
        out.append(f"{SANITY_PREFIX}the database has no tables, while the previous backup {previous.id} recorded "
                   f"{had} (hint: was it emptied or re-created? the earlier backups are kept by retention)")
    return out


def _text(value: object) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
