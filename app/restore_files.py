"""``restore-files``: the application's files back out of a files archive into a directory.

Two passes over the stored bytes: the first checks size, SHA-256, decompression and the tar structure to the
end, so a damaged archive is refused before a single file is written; the second extracts. Paths stay
inside DIR (tarfile's ``tar`` filter: no absolute paths, no escapes, setuid/setgid and group/other write
bits cleared).
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

from app.catalog import Entry
from app.errors import SidecarError
from app.readpath import Progress, archive_chunks
from app.selection import pick_source, resolve_entry
from app.settings import Settings
from app.targets import Target, make_targets
from app.tarsafe import extract_all
from app.verify import ArchiveInvalid, ChunkReader, check_tar

log = logging.getLogger(__name__)


def _files_entry(settings: Settings, targets: list[Target], ref: str, source: str | None = None) -> Entry:
    name = settings.files.name if settings.files and ref == "latest" else None
    entry = resolve_entry(targets, ref, name, source, kind="files")
    if entry.manifest.kind != "files":
        raise SidecarError(f"{entry.id} is a {entry.manifest.kind} backup, not a files archive "
                           "(hint: use `restore` for databases; files archives show as kind files in `list --json`)")
    return entry


def restore_files_command(settings: Settings, ref: str, to_dir: Path, *, force: bool, source: str | None) -> None:
    """Extract the files archive ``ref`` into ``to_dir``; refuses a non-empty directory unless ``force``."""
    targets = make_targets(settings)
    entry = _files_entry(settings, targets, ref, source)
    target = pick_source(entry, targets, source)
    dest = to_dir.absolute()
    if dest.exists() and not dest.is_dir():
        raise SidecarError(f"{dest} exists and is not a directory (hint: give a directory with --to)")
    if dest.exists() and any(dest.iterdir()) and not force:
        raise SidecarError(f"{dest} is not empty (hint: restore into an empty directory, or pass --force to "
                           "write over what is there)")
    manifest = entry.manifest_on(target.name)
    try:
        checked = check_tar(archive_chunks(target, manifest))
    except ArchiveInvalid as exc:
        raise SidecarError(f"{manifest.id} on {target.name}: {exc}") from exc
    log.info("%s on %s: %s; extracting into %s", manifest.id, target.name, checked, dest)
    dest.mkdir(parents=True, exist_ok=True)
    progress = Progress(f"restore-files {manifest.id}", manifest.size_bytes)
    reader = io.BufferedReader(ChunkReader(archive_chunks(target, manifest, progress)), buffer_size=1 << 20)
    count = 0

    def seen(_member: tarfile.TarInfo) -> None:
        nonlocal count
        count += 1

    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            extract_all(tar, dest, seen)
    except (tarfile.TarError, OSError) as exc:
        raise SidecarError(f"restoring {manifest.id} into {dest} failed after {count} entries: {exc} "
                           "(hint: check free space and permissions of the directory; it is partly written)") from exc
    progress.finish()
    print(f"{manifest.id}: {count} entries restored into {dest}")
