"""Legal holds on one backup's S3 objects (`backup-sidecar hold|release ID`): a hold keeps the artifact and its
manifest undeletable past their retention date, by prune or by anyone, until it is released.

S3 Object Lock only: a hold needs a bucket with Object Lock on (S3_OBJECT_LOCK), and a NAS has no such thing.
"""

from __future__ import annotations

from app.errors import SidecarError
from app.selection import resolve_entry
from app.settings import Settings
from app.targets import make_targets
from app.targets.s3 import S3Target


def hold_command(settings: Settings, ref: str, database: str | None, on: bool) -> str:
    """Put (``on``) or lift the legal hold of backup ``ref``; the line to print."""
    verb = "hold" if on else "release"
    if settings.s3 is None or not settings.s3.object_lock:
        raise SidecarError(f"cannot {verb} {ref}: legal holds need S3 with Object Lock",
                           hint="set S3_OBJECT_LOCK=governance|compliance on a bucket created with Object Lock")
    [target] = [t for t in make_targets(settings) if isinstance(t, S3Target)]
    target.check()
    entry = resolve_entry([target], ref, database)  # the one selector: its errors say why there is none
    artifact = entry.manifest_on("s3").artifact
    keys = [artifact, entry.manifest_keys["s3"]] + entry.drill_keys.get("s3", [])
    for key in keys:
        target.hold(key, on)
    until, _ = target.lock_state(artifact)
    after = f"; retained until {until:%Y-%m-%d %H:%M} UTC" if until else ""
    if on:
        return f"held {entry.id}: {len(keys)} object(s) on S3 cannot be deleted until released{after}"
    return f"released {entry.id}: {len(keys)} object(s) on S3 follow their retention again{after}"
