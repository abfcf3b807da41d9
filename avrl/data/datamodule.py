"""The Lightning DataModule: builds the splits from the `data` config and collates prompts through the processor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from avrl.data.items import QAItem
from avrl.data.media import with_media
from avrl.data.readers import READERS
from avrl.data.synthetic import SyntheticAudioQA
from avrl.models.processing import AudioTextProcessor
from avrl.prompts import PromptSpec, render_question
from avrl.resume import EpochSampler

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class ItemList(Dataset):
    def __init__(self, items: list[QAItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> QAItem:
        return self.items[index]


def build_split(cfg: DictConfig, split: str) -> tuple[Dataset, list[dict]]:
    """The dataset of one split and the records skipped while reading it."""
    if cfg.format == "synthetic":
        size = cfg[f"{split}_size"]
        dataset = SyntheticAudioQA(split, size, seed=cfg.seed, tasks=list(cfg.tasks), seconds=cfg.seconds,
                                   label_mode=cfg.label_mode if split == "train" else "gold")
        return dataset, []
    if cfg.format not in READERS:
        raise ValueError(f"data.format must be 'synthetic' or one of {sorted(READERS)}, got {cfg.format!r}")
    path = cfg.get(f"{split}_path")
    if path is None:
        raise ValueError(f"data config {cfg.name!r} has no {split}_path (set data.{split}_path=...)")
    items, skipped = READERS[cfg.format](path, cfg.get("root"), cfg.get("on_error", "raise"))
    limit = cfg.get("limit")
    return ItemList(items[:limit] if limit else items), skipped


class PromptCollator:
    """Turns a list of items into model inputs for their prompts; the items travel along for scoring."""

    def __init__(self, processor: AudioTextProcessor, prompt: PromptSpec, max_audio_seconds: float):
        self.processor, self.prompt, self.max_audio_seconds = processor, prompt, max_audio_seconds

    def __call__(self, items: list[QAItem]) -> dict:
        loaded = [with_media(it, self.processor.sampling_rate, self.max_audio_seconds) for it in items]
        items = [it for it, _ in loaded]
        images = [im for _, im in loaded]
        prompts = [
            self.processor.render(render_question(self.prompt, it), it.has_audio, im is not None)
            for it, im in zip(items, images)
        ]
        batch = self.processor(prompts, [it.waveform for it in items], images if any(images) else None)
        for it in items:  # the waveform is not needed after feature extraction; keep batches light
            it.waveform = None
        batch["items"] = items
        return batch


class AudioQADataModule(L.LightningDataModule):
    def __init__(self, cfg: DictConfig, processor: AudioTextProcessor, prompt: PromptSpec, splits=SPLITS,
                 shuffle_seed: int = 0):
        super().__init__()
        self.shuffle_seed = shuffle_seed
        self.cfg, self.collate = cfg, PromptCollator(processor, prompt, cfg.max_audio_seconds)
        self.splits = splits
        self.datasets: dict[str, Dataset] = {}
        self.skipped: list[dict] = []

    def setup(self, stage: str | None = None) -> None:
        for split in self.splits:
            if split not in self.datasets:
                self.datasets[split], skipped = build_split(self.cfg, split)
                self.skipped += skipped
        if self.skipped:
            log.warning("skipped %d bad records (data.on_error=skip); see skipped_items.json", len(self.skipped))

    def write_skipped(self, out_dir: str | Path) -> Path | None:
        if not self.skipped:
            return None
        path = Path(out_dir) / "skipped_items.json"
        path.write_text(json.dumps(self.skipped, indent=2))
        return path

    def _loader(self, split: str, batch_size: int, sampler=None) -> DataLoader:
        return DataLoader(
            self.datasets[split], batch_size=batch_size, sampler=sampler, collate_fn=self.collate,
            num_workers=self.cfg.num_workers, drop_last=sampler is not None,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by an EpochSampler (seeded by the run's seed, split over ranks): its position can be restored
        exactly on resume (avrl/resume.py)."""
        trainer = self.trainer
        sampler = EpochSampler(len(self.datasets["train"]), self.cfg.batch_size, self.shuffle_seed,
                               rank=trainer.global_rank if trainer else 0, world_size=trainer.world_size if trainer else 1)
        return self._loader("train", self.cfg.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.cfg.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.cfg.eval_batch_size)
