"""A Lightning callback for tests that kill a run at a known point: once `last.ckpt` exists, the run writes a marker
file and then waits, before its next batch, until it is killed. The test kills it only after seeing the marker, so
the kill always lands mid-training whatever the scheduler does (no sleeps, no race with the end of the run).

Used through the `callbacks` config key: `+callbacks.hold._target_=tests.support.hold.HoldAfterCheckpoint
+callbacks.hold.marker=<path>` (run.py's folder, the repository root, is on the run's sys.path)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def announce(marker: Path, step: int) -> None:
    """Write the step the run is held at into `marker`, atomically: the test never reads a half-written marker."""
    partial = marker.with_suffix(".partial")
    partial.write_text(str(step))
    partial.rename(marker)


class HoldAfterCheckpoint(Callback):
    """Holds before the first batch after the run's `checkpoints`-th checkpoint (counted by the steps at which one
    was saved) and `batches_after` more batches: those batches' metrics are logged but in no checkpoint."""

    def __init__(self, marker: str, checkpoints: int = 1, batches_after: int = 0):
        self.marker, self.checkpoints, self.batches_after = Path(marker), checkpoints, batches_after
        self.saved_at: set[int] = set()
        self.since = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step not in self.saved_at:
            self.saved_at.add(trainer.global_step)
            self.since = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.since += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if len(self.saved_at) < self.checkpoints or self.since < self.batches_after:
            return
        announce(self.marker, trainer.global_step)
        threading.Event().wait()  # never set: only the test's SIGKILL ends the run from here


class HoldAt(Callback):
    """Before the first batch at or after `step`, the run writes `marker` and waits until the file `release`
    exists; a run started again after that (a requeued job, a resume) goes straight on. The test acts on the run
    at a known step (signals it, cancels its job) and then lets it go on."""

    def __init__(self, marker: str, release: str, step: int = 0):
        self.marker, self.release, self.step, self.held = Path(marker), Path(release), step, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.held or trainer.global_step < self.step or self.release.exists():
            return
        self.held = True
        announce(self.marker, trainer.global_step)
        while not self.release.exists():
            time.sleep(0.1)
