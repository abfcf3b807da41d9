"""Files that are whole or absent: a reader (a resumed run, a sweep report, a person) never sees half of one.

Each file is written beside its target (never in $TMPDIR, which on a cluster is another filesystem where the final
move degrades into a copy that truncates the target in place), flushed to disk, renamed over the target, and the
folder entry is flushed too, so a crash or a kill at any moment leaves the old file or the new one.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class NoSpaceError(OSError):
    """The disk of `folder` is too full for a file of `needed` bytes; nothing already there was touched."""

    def __init__(self, folder: Path, needed: int, free: int, what: str = "a file"):
        super().__init__(
            errno.ENOSPC,
            f"no space left in {folder}: {what} needs {_size(needed)}, {_size(free)} "
            "free; nothing there was replaced (free some space, or write elsewhere)",
        )
        self.folder, self.needed, self.free = folder, needed, free


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` atomically (text as UTF-8); a full disk raises NoSpaceError, the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        partial.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise NoSpaceError(path.parent, len(payload), shutil.disk_usage(path.parent).free, path.name) from error
        raise
    os.replace(partial, path)
    sync_folder(path.parent)
    return path


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a filesystem that cannot open folders: the rename is as durable as it gets there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
