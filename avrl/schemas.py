"""Typed schemas (Hydra ConfigStore) for the config groups: `model`, `optim`, `algorithm` (with its LoRA adapter
block) and `data`. Each group's YAML options extend their schema (`defaults: [_schema, _self_]`), so every default
lives here, a misspelt key in a YAML file (an option, an experiment or sweep preset) or on the command line fails
at compose time with the key's name, and a value of the wrong type is refused. The code reads the composed config
and keeps no defaults of its own.

Not a schema: `trainer` (Lightning's own arguments, passed to the Trainer whole), `rollout`, `reward`, `prompt`,
`logger` and the top-level keys (conf/config.yaml holds every one of them).

A value that is an interpolation (`sampling_seed: ${seed}`, `ood_size: ${.val_size}`) is stored as written and
checked against the field's type when it is resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = MISSING  # an entry of avrl/models/families
    name_or_path: str = MISSING  # local folder or hub id
    processor_path: Optional[str] = None  # the tokenizer/feature extractor's folder when not name_or_path
    revision: Optional[str] = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = False
    freeze_audio_encoder: bool = False
    freeze_vision_encoder: bool = True
    images: bool = False
    trust_remote_code: bool = False
    default_lr: float = 1.0e-3


@dataclass
class OptimConfig:
    lr: float = MISSING
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    scheduler: str = "constant_with_warmup"
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    max_skipped_in_row: int = 10


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    include_audio_encoder: bool = False
    merge_on_save: bool = False


@dataclass
class AlgorithmConfig:
    """The `algorithm` group (conf/algorithm/): GRPO's keys, with TRL GRPOConfig's names and meanings, and the keys
    both methods read. The defaults are GRPO's (algorithm=grpo, the default run); conf/algorithm/sft.yaml sets what
    SFT runs with differently.

    One schema for GRPO and SFT, not one per method: the RL-vs-SFT sweep (sweeps/rl_vs_sft.yaml) runs algorithm=sft
    and algorithm=lora beside algorithm=grpo under one paper preset (experiments/r1_aqa.yaml, echoink_r1.yaml), and
    the preset's `algorithm:` block (num_generations, beta, ...) is merged into whichever method the job picked. An
    SFT schema without GRPO's keys would refuse that sweep; one that accepts them is this schema under another
    name. So the typo check covers every key of every method, and SFT runs carry GRPO's keys (unread; logged with
    the config). Who reads what:

    - both methods (avrl/algorithms/base.py, avrl/train.py, avrl/evaluation.py): name, _target_, the sampling
      settings of validation's greedy generation (max_completion_length, temperature, top_p, top_k), sampling_seed,
      shared_prefix, num_iterations (the schedule's length), validate_at_start, log_completions_every_n_steps (SFT
      has no completions to log), lora;
    - GRPO alone (avrl/algorithms/grpo.py, the rollout backends): num_generations, beta, kl_clamp, epsilon,
      epsilon_high, loss_type, scale_rewards, mask_truncated_completions, micro_batch_prompts,
      log_completions_rows;
    - avrl/train.py, before the data is built: prompts_per_step (sets data.batch_size; SFT reads it too).
    """

    name: str = MISSING
    _target_: str = MISSING  # the LightningModule: avrl.algorithms.grpo.GRPOModule | avrl.algorithms.sft.SFTModule
    num_generations: int = 4  # G completions per prompt (at least 2; presets use the papers' values)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off; the papers' trainers sample with transformers' default 50
    repetition_penalty: float = 1.0  # transformers' (CTRL's) penalty on tokens already in the sequence; 1.0 = off
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0 = off
    # Completions are drawn from streams keyed by (seed, step, item, index): avrl/sampling.py.
    sampling_seed: int = "${seed}"  # type: ignore[assignment]  (an interpolation, resolved to an int)
    max_completion_length: int = 16  # completion tokens (SFT: validation's greedy generation)
    beta: float = 0.04  # KL weight (R1-AQA's value); 0 loads no reference model
    kl_clamp: Optional[float] = None  # clamp ref - policy log-ratio to +-this before the k3 KL (EchoInk-R1: 10)
    epsilon: float = 0.2  # lower clip
    epsilon_high: Optional[float] = None  # upper clip (DAPO's clip-higher); null = epsilon
    num_iterations: int = 1  # mu: updates per rollout
    loss_type: str = "grpo"  # grpo | bnpo | dapo | dr_grpo
    scale_rewards: str = "group"  # group | batch | none
    mask_truncated_completions: bool = False
    # Each prompt through the LM once per group, in generation and in the loss; false = the repeated path (G
    # copies, as TRL): same tokens, log-probs and gradients.
    shared_prefix: bool = True
    micro_batch_prompts: Optional[int] = None  # prompts per forward/backward in the update; null = all
    # Prompts per optimizer step over every device (a paper's global batch): data.batch_size is then set to its share
    # per device from trainer.devices x trainer.num_nodes (strategies.per_device_prompts), so 1 GPU and 8 run the
    # same optimizer steps. null = data.batch_size prompts per device.
    prompts_per_step: Optional[int] = None
    validate_at_start: bool = True  # log val/accuracy at step 0
    log_completions_every_n_steps: int = 25  # 0 = never
    log_completions_rows: int = 16
    # PEFT LoRA adapters (conf/algorithm/_lora_adapters.yaml under this key: algorithm=lora, grpo_lora); null =
    # every weight trained.
    lora: Optional[LoraConfig] = None


@dataclass
class DataConfig:
    """The `data` group (conf/data/): the embedded synthetic task's keys, the file readers' keys, and the loaders'.

    One schema for every reader, not one per format: a preset's `data:` block meets whichever data option the
    command line picks (experiments/r1_aqa.yaml sets `data.version` for its evaluation with `data=mmau` while it
    trains with `data=avqa`), and the options used to extend synthetic.yaml, so each already held every key. Who
    reads what (avrl/datamodule.py, avrl/train.py, avrl/evaluation.py):

    - format synthetic (avrl/data/synthetic.py): seed, tasks, seconds, label_mode and the split sizes;
    - the file formats avqa, avqa_r1, mmau, mmar, mmsu, mmau_pro (avrl/data/readers.py): the split paths, root,
      check_audio, limit; mmau also `version` (its test_path names the file; evaluation prints it); the benchmark
      formats pick their official scoring rule in task=eval (avrl/rules/);
    - every format: name, format, prompt_mix, max_audio_seconds, on_error, the batch sizes, num_workers.
    """

    name: str = MISSING
    format: str = "synthetic"  # synthetic | avqa | avqa_r1 | mmau | mmar | mmsu | mmau_pro
    # synthetic: seeded audio QA that can only be answered by listening
    seed: int = 0
    # any of pitch, loudness, count, order (the tiny model learns pitch in minutes)
    tasks: list[str] = field(default_factory=lambda: ["pitch"])
    seconds: float = 1.5
    # train on several prompt formats, e.g. [no_think, think, echoink] (the tiny base)
    prompt_mix: Optional[list[str]] = None
    # gold | random (random labels teach only the format: the tiny base), or a mapping task -> gold | random
    label_mode: Any = "gold"
    train_size: int = 20000
    val_size: int = 96
    test_size: int = 300
    # out-of-distribution items (tones from unseen frequency bands), scored after training as val_ood/accuracy;
    # 0 or null = none
    ood_size: Optional[int] = "${.val_size}"  # type: ignore[assignment]  (an interpolation, resolved to an int)
    # file formats
    train_path: Optional[str] = None
    val_path: Optional[str] = None
    test_path: Optional[str] = None
    ood_path: Optional[str] = None  # an out-of-distribution split in the same format, scored after training
    root: Optional[str] = None  # folder that relative media paths start from (default: the data file's folder)
    version: Optional[str] = None  # mmau: original | v05.15.25 (conf/data/mmau.yaml)
    check_audio: bool = True  # read every audio file's header with the data (not audio, no samples, cut short)
    limit: Optional[int] = None  # use only the first N items of each split
    # every format
    max_audio_seconds: float = 30
    # which channel of a multi-channel file: null = the mean of the channels (librosa's mono); 0 = the first
    # (R1-AQA's loader keeps channel 0)
    audio_channel: Optional[int] = None
    # images resized (aspect kept) to multiples of image_factor px per side with image_min_pixels <= h*w <=
    # image_max_pixels before the processor sees them (EchoInk's qwen_omni_utils: 28, 3,136, 200,704); null = the
    # processor's own limits
    image_min_pixels: Optional[int] = None
    image_max_pixels: Optional[int] = None
    image_factor: int = 28
    on_error: str = "raise"  # raise | skip (skipped items listed in skipped_items.json and counted)
    batch_size: int = 32  # prompts per device per optimizer step
    eval_batch_size: int = 32
    num_workers: int = 0


def register() -> None:
    store = ConfigStore.instance()
    store.store(group="model", name="_schema", node=ModelConfig)
    store.store(group="optim", name="_schema", node=OptimConfig)
    store.store(group="algorithm", name="_schema", node=AlgorithmConfig)
    store.store(group="algorithm", name="_lora_schema", node=LoraConfig)
    store.store(group="data", name="_schema", node=DataConfig)


__all__ = ["AlgorithmConfig", "DataConfig", "LoraConfig", "ModelConfig", "OptimConfig", "register"]
