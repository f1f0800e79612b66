"""Extracting a tar stream safely into a directory, on every Python the sidecar supports.

Python 3.11.4+ has extraction filters (PEP 706) and the ``tar`` filter is what restore-files and restore-pitr
want: leading slashes stripped, nothing that lands outside the destination, setuid/setgid/sticky and
group/other write bits cleared. Debian 12's Python 3.11.2 has no filters, so there the same rules are applied
by hand, member by member.
"""

from __future__ import annotations

import copy
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

HAS_FILTERS = hasattr(tarfile, "tar_filter")


def tar_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """PEP 706's ``tar`` filter, for Pythons that lack it: leading slashes stripped, nothing that would land
    outside ``dest``, setuid/setgid/sticky and group/other write bits cleared (links are kept as they are)."""
    name = member.name.lstrip("/" + os.sep)
    root = os.path.realpath(dest)
    if os.path.isabs(name) or os.path.commonpath([os.path.realpath(os.path.join(root, name)), root]) != root:
        raise tarfile.TarError(f"{member.name!r} would be extracted outside {dest}")
    member = copy.copy(member)  # TarInfo.replace() came with the filters
    member.name = name
    if member.mode is not None:
        member.mode &= 0o755
    return member


def extract_all(tar: tarfile.TarFile, dest: Path, seen: Callable[[tarfile.TarInfo], None] | None = None) -> None:
    """Extract every member of ``tar`` (a stream) into ``dest`` under the ``tar`` filter's rules; ``seen`` is
    called for each member first (progress, counts). extractall sets directory modes last, so read-only
    directories still fill."""

    def members() -> Iterator[tarfile.TarInfo]:
        for member in tar:
            if seen is not None:
                seen(member)
            yield member if HAS_FILTERS else tar_filter(member, str(dest))

    if HAS_FILTERS:
        tar.extractall(dest, members=members(), filter="tar")
    else:
        tar.extractall(dest, members=members())  # noqa: S202 - every member went through tar_filter
