"""Checkpoints that survive a crash, a kill or a full disk.

- `SafeCheckpointIO` (Lightning's CheckpointIO for every strategy but DeepSpeed): the file is written beside its
  target, flushed and renamed into place (avrl/atomic.py); the checkpoint it replaces is kept as `<name>.prev`;
  a last checkpoint that cannot be read (torn by a crash of the machine, a copy cut short) is replaced by its
  `.prev` with a warning naming both files. A disk too small for the next checkpoint stops the run with an error
  naming the folder and the space needed, before anything good is replaced.
- DeepSpeed's checkpoint folder (the engine's shards) is written by avrl's strategy under a tag per step, with the
  `latest` pointer replaced atomically once every rank has written, and the previous tag kept (avrl/strategies.py).

Loading: Lightning's checkpoints are read with `weights_only=True` (tensors and plain values only, never arbitrary
pickled objects); DeepSpeed's engine reads its own files with full unpickling (docs/reliability.md).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from avrl.atomic import NoSpaceError, sync_folder

log = logging.getLogger(__name__)
PREVIOUS = ".prev"
METADATA = 2**20  # room for a checkpoint's non-tensor bytes (its pickled structure, the zip records)


def is_deepspeed_folder(path: Path) -> bool:
    """A DeepSpeed checkpoint folder: the engine's files under a tag (avrl's: one per step), named in `latest`."""
    latest = Path(path) / "latest"
    return latest.is_file() and (Path(path) / latest.read_text().strip()).is_dir()


def previous_of(path: Path) -> Path:
    return path.with_name(path.name + PREVIOUS)


def tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in a (nested) checkpoint: what its file needs, give or take the metadata."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


class SafeCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        needed = tensor_bytes(checkpoint) + METADATA
        free = shutil.disk_usage(path.parent).free
        if needed > free:
            raise NoSpaceError(path.parent, needed, free, f"the checkpoint {path.name}")
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError without errno
            partial.unlink(missing_ok=True)
            free = shutil.disk_usage(path.parent).free
            if getattr(error, "errno", None) == errno.ENOSPC or free < needed:
                raise NoSpaceError(path.parent, needed, free, f"the checkpoint {path.name}") from error
            raise
        if path.exists():
            keep_previous(path)
        os.replace(partial, path)
        sync_folder(path.parent)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as error:
            previous = previous_of(Path(path))
            if not previous.exists():
                raise RuntimeError(
                    f"checkpoint {path} cannot be read ({type(error).__name__}: {error}) and there "
                    f"is no previous one ({previous.name}) to fall back to"
                ) from error
            log.warning(
                "checkpoint %s cannot be read (%s: %s); resuming from the previous one, %s",
                path,
                type(error).__name__,
                str(error)[:200],
                previous,
            )
            return super().load_checkpoint(previous, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        previous_of(Path(path)).unlink(missing_ok=True)


def keep_previous(path: Path) -> None:
    """`path` becomes also `path.prev`, replacing the older one, without a moment where `path` is missing (a hard
    link; where the filesystem has none, a rename, which the loader's fallback covers)."""
    previous, link = previous_of(path), path.with_name(f".{path.name}.link-{os.getpid()}")
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous)
    except OSError:
        os.replace(path, previous)
