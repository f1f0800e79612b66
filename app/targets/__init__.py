"""Choosing the targets: a plain factory over the settings, no plugin registry."""

from __future__ import annotations

from app.settings import Settings
from app.targets.base import ObjectInfo, ObjectLocked, Target, TargetError, Upload

__all__ = ["ObjectInfo", "ObjectLocked", "Target", "TargetError", "Upload", "make_targets"]


def make_targets(settings: Settings) -> list[Target]:
    """Every configured target, NAS first (cheapest to read back from), then S3."""
    targets: list[Target] = []
    if settings.nas is not None:
        from app.targets.nas import NasTarget

        targets.append(NasTarget(settings.nas.path, create=settings.nas.create_missing,
                                 require_mount=settings.nas.require_mount,
                                 group_readable=settings.nas.group_readable))
    if settings.s3 is not None:
        from app.targets.s3 import S3Target

        targets.append(S3Target(settings.s3))
    return targets
