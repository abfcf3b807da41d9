"""The Lightning DataModule: builds the splits from the `data` config and collates prompts through the processor."""

from __future__ import annotations

import copy
import json
import logging
import os
import zlib
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from avrl.data import audio_controls
from avrl.data.items import DataError, QAItem
from avrl.data.media import ImageResize, with_media
from avrl.data.readers import READERS
from avrl.data.synthetic import SyntheticAudioQA
from avrl.models.processing import AudioTextProcessor
from avrl.prompts import PromptSpec, render_question
from avrl.resume import EpochSampler

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
SKIPPED_FILE = "skipped_items.json"


def _rank_zero() -> bool:
    """Whether this process is rank 0 (or alone); known before any Trainer exists (Lightning reads the launcher's
    RANK/LOCAL_RANK at import), as tracking.make_logger relies on too."""
    return getattr(rank_zero_only, "rank", 0) == 0


class ItemList(Dataset):
    def __init__(self, items: list[QAItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> QAItem:
        return self.items[index]


def build_split(cfg: DictConfig, split: str) -> tuple[Dataset, list[dict]]:
    """The dataset of one split and the records skipped while reading it. Split "ood" is the out-of-distribution
    one (data.ood_size synthetic items, or data.ood_path), evaluated after training when it exists."""
    if cfg.format == "synthetic":
        size = cfg[f"{split}_size"]
        dataset = SyntheticAudioQA(
            split,
            size,
            seed=cfg.seed,
            tasks=list(cfg.tasks),
            seconds=cfg.seconds,
            label_mode=cfg.label_mode if split == "train" else "gold",
        )
        return dataset, []
    if cfg.format not in READERS:
        raise ValueError(f"data.format must be 'synthetic' or one of {sorted(READERS)}, got {cfg.format!r}")
    path = cfg[f"{split}_path"]
    if path is None:
        raise ValueError(f"data config {cfg.name!r} has no {split}_path (set data.{split}_path=...)")
    items, skipped = READERS[cfg.format](path, cfg.root, cfg.on_error, check_audio=cfg.check_audio)
    return ItemList(items[: cfg.limit] if cfg.limit else items), skipped


class PromptCollator:
    """Turns a list of items into model inputs for their prompts; the items travel along for scoring.

    A media file that cannot be decoded (non-audio, truncated, unreadable image) is only found here, when its item
    is loaded: with on_error="raise" the DataError names the file and the item; with "skip" the item is left out
    of the batch and listed in batch["skipped"] (counted by `SkippedItems`). A batch can end up with no items."""

    def __init__(
        self,
        processor: AudioTextProcessor,
        prompt: PromptSpec,
        max_audio_seconds: float,
        on_error: str = "raise",
        keep_media: bool = False,
        for_eval: bool = False,
        audio: str = "real",
        audio_channel: int | None = None,
        image_resize: ImageResize | None = None,
    ):
        self.processor, self.prompt, self.max_audio_seconds = processor, prompt, max_audio_seconds
        self.audio_channel = audio_channel  # data.audio_channel: null = the mean of the channels
        self.image_resize = image_resize  # data.image_min_pixels/max_pixels/factor: null = the processor's limits
        self.on_error, self.keep_media = on_error, keep_media
        self.for_eval = for_eval  # task=eval: the prompt's eval_template, where the paper evaluates with another
        self.audio = audio_controls.check(audio)  # muted / noise replace the loaded signal (audio_controls.py)
        self.mix: list[PromptSpec] = []  # training data shown in several prompt formats (data.prompt_mix)

    def spec(self, item: QAItem) -> PromptSpec:
        """The item's prompt: the run's, or with a mix one of the mix's, fixed per item (a hash of its id)."""
        return self.mix[zlib.crc32(item.id.encode()) % len(self.mix)] if self.mix else self.prompt

    def load(self, item: QAItem) -> tuple[QAItem, object]:
        """The item with its audio loaded under the data settings, and its image (or None)."""
        rate, seconds = self.processor.sampling_rate, self.max_audio_seconds
        return with_media(item, rate, seconds, self.audio_channel, self.image_resize)

    def __call__(self, items: list[QAItem]) -> dict:
        loaded, skipped = [], []
        for it in items:
            try:
                loaded.append(self.load(it))
            except DataError as e:
                if self.on_error != "skip":
                    raise
                skipped.append({"source": it.source, "reason": str(e)})
        if not loaded:
            return {"items": [], "skipped": skipped}
        items = [it for it, _ in loaded]
        for it in items:
            audio_controls.replace_clips(it, self.audio)
        images = [im for _, im in loaded]
        specs = [self.spec(it) for it in items]
        prompts = [  # one audio placeholder per clip, in order (MMAU-Pro's items may have several)
            self.processor.render(
                render_question(spec, it, self.for_eval), len(it.waveforms), im is not None, spec.system
            )
            for spec, it, im in zip(specs, items, images)
        ]
        batch = self.processor(prompts, [it.waveforms for it in items], images if any(images) else None)
        batch["prompts"] = prompts  # rendered, placeholders not yet expanded (what vLLM takes)
        if self.keep_media:  # for vLLM, which encodes the raw audio and images itself
            batch["images"] = images
        else:
            for it in items:  # the waveforms are not needed after feature extraction; keep batches light
                it.waveform, it.more_waveforms = None, ()
        batch["items"], batch["skipped"] = items, skipped
        if self.mix:
            batch["prompt_specs"] = specs  # SFT writes each item's target in its own prompt's format
        return batch


class AudioQADataModule(L.LightningDataModule):
    def __init__(
        self,
        cfg: DictConfig,
        processor: AudioTextProcessor,
        prompt: PromptSpec,
        splits=SPLITS,
        shuffle_seed: int = 0,
        keep_media: bool = False,
        audio: str = "real",
        prompt_mix: list[PromptSpec] | None = None,
    ):
        super().__init__()
        self.shuffle_seed = shuffle_seed
        self.cfg = cfg
        # task=eval's audio-contribution control for the test split (avrl/data/audio_controls.py)
        self.audio = audio_controls.check(audio)
        self.collate = PromptCollator(
            processor,
            prompt,
            cfg.max_audio_seconds,
            cfg.on_error,
            keep_media,
            audio_channel=cfg.get("audio_channel"),
            image_resize=ImageResize.from_config(cfg),
        )
        self.splits = splits
        self.prompt_mix = prompt_mix or []  # the train split's prompt formats (validation keeps the run's prompt)
        self.datasets: dict[str, Dataset] = {}
        self.skipped: list[dict] = []

    def setup(self, stage: str | None = None) -> None:
        for split in self.splits:
            self._read(split)
        if self.skipped and _rank_zero():
            log.warning("skipped %d bad records (data.on_error=skip); see skipped_items.json", len(self.skipped))

    def write_skipped(self, out_dir: str | Path) -> Path | None:
        """skipped_items.json, written by rank 0 alone (every rank reads all the data, and skips the same records)
        and replaced whole (a reader never sees half a file)."""
        if not self.skipped or not _rank_zero():
            return None
        path = Path(out_dir) / SKIPPED_FILE
        partial = path.with_name(f".{SKIPPED_FILE}.partial")
        partial.write_text(json.dumps(self.skipped, indent=2))
        os.replace(partial, path)
        return path

    def _read(self, split: str) -> Dataset:
        """A split, read on first use (an "ood" one only when it is evaluated)."""
        if split not in self.datasets:
            self.datasets[split], skipped = build_split(self.cfg, split)
            known = {r["source"] for r in self.skipped}  # a file read for two splits is counted once
            self.skipped += [r for r in skipped if r["source"] not in known]
        return self.datasets[split]

    def _loader(self, dataset: Dataset, batch_size: int, sampler=None, collate=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate or self.collate,
            num_workers=self.cfg.num_workers,
            drop_last=sampler is not None,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by an EpochSampler (seeded by the run's seed, split over ranks): its position can be restored
        exactly on resume (avrl/resume.py)."""
        trainer = self.trainer
        sampler = EpochSampler(
            len(self.datasets["train"]),
            self.cfg.batch_size,
            self.shuffle_seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )
        collate = self.collate
        if self.prompt_mix:
            collate = copy.copy(self.collate)
            collate.mix = self.prompt_mix
        return self._loader(self.datasets["train"], self.cfg.batch_size, sampler, collate=collate)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"], self.cfg.eval_batch_size)

    def has_split(self, split: str) -> bool:
        """Whether the data config defines this split (an "ood" one is optional)."""
        if self.cfg.format == "synthetic":
            return bool(self.cfg[f"{split}_size"])
        return self.cfg[f"{split}_path"] is not None

    def control_loader(self, split: str, audio: str = "real", for_eval: bool = False) -> DataLoader:
        """A split's evaluation loader under an audio-contribution control (avrl/data/audio_controls.py: the
        collator mutes or replaces the signal; "shuffled" gives each item another item's clip)."""
        dataset = self._read(split)
        if audio == "shuffled":
            dataset = audio_controls.ShuffledAudio(dataset, self.shuffle_seed)
        collate = copy.copy(self.collate)
        collate.audio, collate.for_eval = audio_controls.check(audio), for_eval
        return self._loader(dataset, self.cfg.eval_batch_size, collate=collate)

    def test_dataloader(self) -> DataLoader:
        """task=eval's items, rendered with the prompt's eval_template (if it has one), under eval.audio."""
        return self.control_loader("test", self.audio, for_eval=True)


class SkippedItems(Callback):
    """Items the collator left out (undecodable media, data.on_error=skip): appended to skipped_items.json in the
    output folder and counted, with the records the readers skipped, in the MLflow metric `data/skipped`.

    The count is the whole run's, counted once:
    - the readers' skips are the same on every rank (each rank reads all the data; the sampler splits indices)
      and after a resume (the data is read again, with the same checks): rank 0 alone writes and logs them;
    - the collator's skips differ between ranks (each loads its own share of the training batches): after every
      batch the ranks exchange theirs (one small all-reduce, and a gather only when some rank skipped), so each
      rank holds all of them; validation batches, the same on every rank, repeat and are counted once;
    - they are saved in the checkpoint (`state_dict`) and put back on resume, before the first resumed batch."""

    def __init__(self, datamodule: AudioQADataModule, out_dir: str | Path):
        self.datamodule, self.out_dir = datamodule, Path(out_dir)
        self.seen: set[str] = {r["source"] for r in datamodule.skipped}
        self.loaded: list[dict] = []  # the collator's skips (the readers' are in datamodule.skipped from the start)
        self._restored = False

    def _add(self, records: list[dict]) -> list[dict]:
        new = []
        for r in records:
            if r["source"] not in self.seen:  # val batches repeat, and so do the ranks' copies of them
                self.seen.add(r["source"])
                new.append(r)
        self.loaded += new
        self.datamodule.skipped += new
        return new

    def _publish(self, trainer) -> None:
        if trainer.is_global_zero:
            self.datamodule.write_skipped(self.out_dir)
        if trainer.logger is not None:  # rank 0's alone (tracking.make_logger)
            trainer.logger.log_metrics({"data/skipped": len(self.datamodule.skipped)}, step=trainer.global_step)

    def _record(self, trainer, module, batch) -> None:
        mine = list(batch.get("skipped", []))
        if trainer.world_size > 1:
            mine = gather_records(trainer, module, mine)
        new = self._add(mine)
        if not new:
            return
        if trainer.is_global_zero:
            log.warning("skipped %d item(s) with unreadable media: %s", len(new), new[0]["reason"])
        self._publish(trainer)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._record(trainer, module, batch)

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._record(trainer, module, batch)

    def state_dict(self) -> dict:
        return {"loaded": [dict(r) for r in self.loaded]}

    def load_state_dict(self, state: dict) -> None:
        self._add(state.get("loaded", []))
        self._restored = True

    def on_train_start(self, trainer, module) -> None:
        """After a resume (the checkpoint is restored by now): the file and the count hold the skips from before
        it too (the run wrote only the readers' skips before the checkpoint was loaded)."""
        if self._restored and self.loaded:
            self._publish(trainer)


def gather_records(trainer, module, records: list[dict]) -> list[dict]:
    """Every rank's records, on every rank, in rank order. Called by all ranks at the same batch (each rank runs
    the same number of batches); an all-reduce of the counts first, so that the usual batch with nothing skipped
    costs one small collective and no gather."""
    count = torch.tensor([len(records)], device=module.device)
    if trainer.strategy.reduce(count, reduce_op="sum").item() == 0:
        return records
    everyone: list = [None] * trainer.world_size
    dist.all_gather_object(everyone, records)
    return [r for rank in everyone for r in rank]
