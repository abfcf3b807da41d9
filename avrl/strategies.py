"""Lightning's DeepSpeed strategy with what avrl's runs need on top of it.

- DeepSpeed configs written for the HF Trainer (R1-AQA's and EchoInk-R1's zero3.json) hold "auto" values that
  Lightning passes to DeepSpeed unresolved. `resolve_auto` fills them the way the HF Trainer does, but reads the
  hidden size from the *text* config: Qwen2.5-Omni keeps it only there, which is why EchoInk-R1's users had to edit
  `hidden_size` into their config by hand.
- The clipping norm comes from `optim.max_grad_norm`: under DeepSpeed the engine clips inside its step and
  Lightning's `clip_gradients` does nothing, so the norm has to be in DeepSpeed's config.
- `trainer.accelerator=cpu` runs DeepSpeed on CPU processes over gloo (Lightning allows CUDA only). Nothing a GPU
  run does changes; it lets a DeepSpeed configuration be debugged, and tested, without a GPU.

The end of this file holds every other strategy mechanic the algorithms need, so that they ask here instead of
testing strategy types themselves: where fp32 master weights live, clipping, zeroing gradients, DeepSpeed's
accumulation boundaries, the cross-rank finite check, sums and the std over every rank (the loss's global token
count, scale_rewards=batch), and gathering the full weights (ZeRO-3) to save them.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from avrl import console
from avrl.atomic import write_atomic
from avrl.checkpoints import is_deepspeed_folder
from avrl.models import families
from avrl.models.multimodal import audio_encoder, unwrap

log = logging.getLogger(__name__)

# Filled by Lightning from the Trainer and the data loader when absent (it refuses gradient_accumulation_steps).
FROM_TRAINER = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps")
# Lightning adds the block matching trainer.precision when absent.
PRECISION_BLOCKS = ("fp16", "bf16")
# avrl's optimizer and schedule come from the `optim` group (configure_optimizers), as "auto" means in HF configs.
OPTIMIZER_BLOCKS = ("optimizer", "scheduler")


def bucket_sizes(hidden_size: int) -> dict[str, int]:
    """The HF Trainer's values for DeepSpeed's "auto" ZeRO sizes (transformers.integrations.deepspeed)."""
    return {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }


def resolve_auto(config: dict, hidden_size: int | None, max_grad_norm: float) -> dict:
    """A copy of a DeepSpeed config with every "auto" replaced, or removed where Lightning fills the value in."""
    config = {key: (dict(value) if isinstance(value, dict) else value) for key, value in config.items()}
    for key in FROM_TRAINER:
        if config.get(key) == "auto":
            del config[key]
    for key in PRECISION_BLOCKS:
        if isinstance(config.get(key), dict) and config[key].get("enabled") == "auto":
            del config[key]
    for key in OPTIMIZER_BLOCKS:
        if _has_auto(config.get(key)):
            log.info("DeepSpeed config: the '%s' block is dropped; avrl's optim group sets it", key)
            del config[key]
    clip = config.get("gradient_clipping", "auto")
    if clip == "auto":
        config["gradient_clipping"] = float(max_grad_norm)
    elif float(clip) != float(max_grad_norm):
        raise ValueError(
            f"the DeepSpeed config sets gradient_clipping={clip} but optim.max_grad_norm="
            f'{max_grad_norm}: set one of them to the other (or gradient_clipping to "auto")'
        )
    zero = config.get("zero_optimization", {})
    for key, value in bucket_sizes(hidden_size or 0).items():
        if zero.get(key) == "auto":
            if not hidden_size:
                raise ValueError(f'zero_optimization.{key} is "auto" but the model\'s hidden size is unknown')
            zero[key] = value
    left = list(_auto_paths(config))
    if left:
        raise ValueError(f'DeepSpeed config values left "auto" that avrl cannot fill: {", ".join(left)}')
    return config


def _has_auto(value: Any) -> bool:
    return next(_auto_paths(value), None) is not None


def _auto_paths(value: Any, prefix: str = ""):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _auto_paths(inner, f"{prefix}{key}.")
    elif value == "auto":
        yield prefix.rstrip(".")


def text_hidden_size(model_cfg) -> int:
    """The language model's hidden size, read from the checkpoint's config (no weights are loaded)."""
    config = (
        families.get(model_cfg.family)
        .transformers_class()
        .config_class.from_pretrained(str(model_cfg.name_or_path), revision=model_cfg.revision)
    )
    return config.get_text_config().hidden_size


def requested_devices(trainer_cfg) -> int:
    """How many devices the run's Trainer will use: trainer.devices (a count, a list of indices, -1 or "auto" for
    every visible GPU) times trainer.num_nodes."""
    devices = trainer_cfg.devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in (-1, "auto"):
        devices = torch.cuda.device_count() if trainer_cfg.accelerator in ("gpu", "cuda", "auto") else 1
    count = len(devices) if not isinstance(devices, int) else devices
    return count * int(trainer_cfg.num_nodes)


def per_device_prompts(prompts_per_step: int, devices: int) -> int:
    """Prompts per device so that `devices` devices hold `prompts_per_step` prompts per optimizer step: the quotient,
    rounded up when it does not divide (every device gets at least one, and a step never holds fewer prompts than
    asked)."""
    if prompts_per_step < 1 or devices < 1:
        raise ValueError(f"prompts per step and devices must be >= 1, got {prompts_per_step} and {devices}")
    return -(-prompts_per_step // devices)


def apply_global_batch(cfg) -> None:
    """With algorithm.prompts_per_step set, data.batch_size (prompts per device per step) becomes its share on this
    run's devices (trainer.devices x trainer.num_nodes); avrl's micro-batches (algorithm.micro_batch_prompts) are the
    gradient accumulation. A warning, once (rank 0), when the devices cannot divide the prompts exactly."""
    total = cfg.algorithm.prompts_per_step
    if total is None:
        return
    devices = requested_devices(cfg.trainer)
    per_device = per_device_prompts(total, devices)
    if per_device * devices != total:
        rank_zero_warn(
            f"algorithm.prompts_per_step={total} does not divide over {devices} device(s): each takes {per_device} "
            f"prompts, {per_device * devices} per optimizer step instead of {total} (the preset's global batch is "
            "not reproduced exactly; choose a device count that divides it)"
        )
    log.info(
        "algorithm.prompts_per_step=%d on %d device(s): data.batch_size=%d prompts per device per step",
        total,
        devices,
        per_device,
    )
    cfg.data.batch_size = per_device


def check(cfg) -> None:
    """Refuse, before anything starts, a strategy avrl knows it cannot run as configured."""
    if not _is_fsdp(cfg.trainer.strategy):
        return
    devices = requested_devices(cfg.trainer)
    if cfg.trainer.accelerator == "cpu" or devices < 2:
        where = "on CPU" if cfg.trainer.accelerator == "cpu" else f"on {devices} device(s)"
        raise ValueError(
            f"trainer=fsdp {where} (trainer.devices x trainer.num_nodes): FSDP shards a model across 2 or more GPUs "
            "(on one, torch falls back to NO_SHARD; on CPU it does not run) and avrl does not run it there. On one "
            "GPU use trainer=gpu (algorithm=grpo_lora for a 7B model) or, for full fine-tuning where host memory "
            "allows (about 210 GiB for a 7B model: README, GPU checks), trainer=deepspeed_zero3 trainer.devices=1 "
            "trainer.strategy.offload_optimizer=true trainer.strategy.offload_parameters=true; "
            "trainer=deepspeed_zero2/3 also run on CPU (trainer.accelerator=cpu)."
        )


def _is_fsdp(spec) -> bool:
    """trainer.strategy names FSDP: a `_target_` mapping or one of Lightning's registry names ("fsdp", ...)."""
    target = spec.get("_target_") if hasattr(spec, "get") else spec
    if not isinstance(target, str):
        return False
    return issubclass(get_class(target), FSDPStrategy) if "." in target else target.startswith("fsdp")


def build(spec: dict, cfg):
    """The Trainer's strategy from a `trainer.strategy` mapping; avrl's DeepSpeed gets the clipping norm and the
    model's hidden size from the rest of the config."""
    target = get_class(spec["_target_"])
    if issubclass(target, FSDPStrategy):
        log.warning(
            "FSDP has never run with avrl (it needs a GPU); GRPO calls the encoders and embeddings outside "
            "the root module's forward, which FSDP may not allow. DeepSpeed ZeRO-2/3 are checked against a "
            "one-process run (README, Scale-out)."
        )
    if issubclass(target, DeepSpeed):
        spec = {"max_grad_norm": cfg.optim.max_grad_norm, **spec}
        if spec.get("hidden_size") is None:
            spec["hidden_size"] = text_hidden_size(cfg.model)
    return instantiate(spec)


class DeepSpeed(DeepSpeedStrategy):
    """`lightning.pytorch.strategies.DeepSpeedStrategy` + "auto" values + the clipping norm + CPU processes.

    All of Lightning's arguments pass through (stage, offload_optimizer, offload_parameters, config=<json>, ...).
    """

    def __init__(self, *args, max_grad_norm: float = 1.0, hidden_size: int | None = None, **kwargs):
        console.quiet_deepspeed()  # before DeepSpeed's communication backend starts (it prints a build message)
        super().__init__(*args, **kwargs)
        self.config = resolve_auto(self.config, hidden_size, max_grad_norm)

    @contextmanager
    def model_sharded_context(self):
        """configure_model's context. Under ZeRO-3 transformers partitions a checkpoint while loading it (its own
        zero.Init, weights copied into the partitions) once it knows ZeRO-3 is on; Lightning's bare zero.Init would
        leave from_pretrained initialising and loading into empty partitions."""
        if not self.zero_stage_3:
            yield
            return

        self._init_config_if_needed()
        self.hf_deepspeed_config = HfDeepSpeedConfig(self.config)  # transformers keeps only a weak reference
        yield
        self._prepare_zero3(self.lightning_module)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """The engine's files under a tag per step (Lightning's tag is one fixed name, rewritten in place, so a
        crash mid-save left no good checkpoint). Once every rank has written, rank 0 points `latest` at the new tag
        atomically (DeepSpeed's loader and zero_to_fp32 read it) and removes all tags but the new and the
        previous one."""
        folder = Path(self.broadcast(str(filepath)))
        tag = f"step{checkpoint.get('global_step', 0):08d}"
        state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        self.deepspeed_engine.save_checkpoint(
            str(folder),
            client_state=state,
            tag=tag,
            save_latest=False,
            exclude_frozen_parameters=self.exclude_frozen_parameters,
        )
        self.barrier("avrl_checkpoint_written")
        if self.is_global_zero:
            latest = folder / "latest"
            previous = latest.read_text().strip() if latest.is_file() else None
            write_atomic(latest, tag)
            for old in folder.iterdir():
                if old.is_dir() and old.name.startswith("step") and old.name not in (tag, previous):
                    shutil.rmtree(old, ignore_errors=True)
        self.barrier("avrl_checkpoint_pointed")

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """Lightning's load, for the tags above: Lightning recognises a DeepSpeed folder by its one fixed tag
        (a `checkpoint` subfolder) and refuses any other; the engine reads the tag `latest` names."""
        if self.load_full_weights and self.zero_stage_3:
            return super().load_checkpoint(checkpoint_path, weights_only)

        folder = Path(checkpoint_path)
        if not is_deepspeed_folder(folder):
            raise FileNotFoundError(
                f"{folder} is not a DeepSpeed checkpoint folder (no file `latest` naming a tag folder beside it)"
            )
        module = self.lightning_module
        _, state = self.deepspeed_engine.load_checkpoint(
            str(folder),
            load_optimizer_states=module.trainer.state.fn == TrainerFn.FITTING,
            load_lr_scheduler_states=False,
            load_module_strict=module.strict_loading,
        )
        if state is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
        return state

    def teardown(self) -> None:
        """transformers' "ZeRO-3 is on" is process-wide: a later run in this process (the next job of a local
        sweep) would otherwise load its model partitioned, without DeepSpeed."""
        super().teardown()
        if getattr(self, "hf_deepspeed_config", None) is not None:
            unset_hf_deepspeed_config()
            self.hf_deepspeed_config = None

    def _prepare_zero3(self, module) -> None:
        """ZeRO-3 gathers a module's parameters when its forward runs. Qwen2-Audio's encoder reads its positional
        table's weight without calling that module, so the table is registered with the encoder as an external
        parameter. The frozen reference model gets an inference engine of its own (as TRL does), which shards it.
        The saved model's weight names are set right."""
        import deepspeed  # the deepspeed extra: only a DeepSpeed run gets here

        # transformers' ZeRO-3 load path records extra key renamings whose reverse, on save, writes the language
        # model as language_model.model.model.*; with none recorded it reverts the default mapping, which is what
        # a plain load records (a workaround on a private attribute of transformers 5).
        unwrap(module.model)._weight_conversions = None
        ref = getattr(module, "ref_model", None)
        for model in (module.model, ref):
            encoder = audio_encoder(unwrap(model)) if model is not None else None
            positions = getattr(encoder, "embed_positions", None)
            if isinstance(positions, torch.nn.Module):
                for param in positions.parameters():
                    deepspeed.zero.register_external_parameter(encoder, param)
        if ref is not None:
            config = {
                "zero_optimization": {
                    "stage": 3,
                    "stage3_param_persistence_threshold": self.config["zero_optimization"].get(
                        "stage3_param_persistence_threshold", 100_000
                    ),
                },
                "train_micro_batch_size_per_gpu": 1,
                **{key: self.config[key] for key in ("bf16", "fp16") if key in self.config},
            }
            self.ref_engine = deepspeed.initialize(model=ref, config=config, dist_init_required=False)[0]
            self.ref_engine.eval()

    @contextmanager
    def full_weights(self, model):
        """Inside, `model` holds its full weights on every rank (ZeRO-3 gathers its partitions: every rank must
        enter)."""
        if not self.zero_stage_3:
            yield
            return
        import deepspeed  # the deepspeed extra: only a DeepSpeed run gets here

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield

    @property
    def on_cpu(self) -> bool:
        return self.parallel_devices is not None and all(d.type == "cpu" for d in self.parallel_devices)

    def setup_environment(self) -> None:
        if not self.on_cpu:
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # Lightning's CUDA-only check skipped; DeepSpeed's CPU backend is gloo

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            return super().setup_distributed()

        reset_seed()  # as Lightning does, without its check that device indices match local ranks (CPUs have none)
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        if self.on_cpu:
            return torch.device("cpu", self.local_rank)  # DeepSpeed's engine wants a device index
        return super().root_device


# ------------------------------------------------------------------------------------ mechanics for the algorithms
def fp32_master_weights(trainer) -> bool:
    """Whether the module itself keeps its trained weights in float32: training outside DeepSpeed (which keeps
    its own fp32 master copy) under a precision meant to keep float32 weights ("32-true", "*-mixed")."""
    return (
        trainer is not None
        and str(trainer.precision) in ("32-true", "bf16-mixed", "16-mixed")
        and not isinstance(trainer.strategy, DeepSpeedStrategy)
    )


def shards_parameters(strategy) -> bool:
    """ZeRO-3: every model, the frozen reference included, is partitioned by an engine of its own."""
    return bool(getattr(strategy, "zero_stage_3", False))


def all_finite(strategy, tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor (the loss, the gradients) is finite on every rank: sharded gradients (ZeRO, FSDP)
    differ between ranks, and all ranks must take the same decision to step or to skip."""
    checks = [t.isfinite().all() for t in tensors]
    finite = not checks or bool(torch.stack(checks).all())
    return strategy.reduce_boolean_decision(finite, all=True) if strategy is not None else finite


def world_size(strategy) -> int:
    """How many processes train (1 without a strategy or on a single device)."""
    return int(getattr(strategy, "world_size", 1)) if strategy is not None else 1


def global_sum(strategy, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every rank (all-reduce), as a new tensor; `tensor` itself on one process."""
    if world_size(strategy) == 1:
        return tensor
    return strategy.reduce(tensor.detach().clone(), reduce_op="sum")


def global_std(strategy, values: torch.Tensor) -> torch.Tensor:
    """The std (Bessel-corrected, as torch.std and TRL's nanstd) of every rank's `values` together: what TRL
    computes after gathering all rewards. Two passes (count and mean, then squared deviations), so ranks may hold
    different counts; on one process torch.std itself."""
    if world_size(strategy) == 1:
        return values.std()
    count = global_sum(strategy, torch.tensor(float(values.numel()), dtype=values.dtype, device=values.device))
    mean = global_sum(strategy, values.sum()) / count
    return (global_sum(strategy, ((values - mean) ** 2).sum()) / (count - 1)).sqrt()


def clip_gradient_norm(module, optimizer, max_norm: float) -> None:
    """Clip to `max_norm` in the way the strategy allows."""
    strategy = module.trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        return  # the engine clips inside its step: gradient_clipping is set from optim.max_grad_norm (build())
    if isinstance(strategy, FSDPStrategy):
        # Lightning refuses norm clipping under FSDP: sharded gradients need the root module's clip_grad_norm_.
        strategy.model.clip_grad_norm_(max_norm)
        return
    module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


def zero_grad(strategy, optimizer) -> None:
    """Start an update with no gradients. Under DeepSpeed the engine's own ZeRO optimizer is called: Lightning's
    optimizer wrapper runs `zero_grad` on itself, and ZeRO-3's accumulation counter (`micro_step_id`) was reset
    on the wrapper only. After a skipped (non-finite) update the next update's gradients were then added to the
    skipped ones, and DeepSpeed dropped that update too ("OVERFLOW! Skipping step") while Lightning counted it."""
    if isinstance(strategy, DeepSpeedStrategy):
        strategy.deepspeed_engine.optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.zero_grad()


def accumulation_boundary(strategy, last: bool) -> None:
    """Start a micro-batch: say whether its backward pass is the last before the optimizer step. DeepSpeed's engine,
    configured with gradient_accumulation_steps=1 (one optimizer step per Lightning step), otherwise takes every
    backward for a boundary, and ZeRO-2 then replaces the previous micro-batch's gradients."""
    if isinstance(strategy, DeepSpeedStrategy):
        engine = strategy.deepspeed_engine
        # What engine.forward does first. All micro-batches run inside one Lightning forward, so each starts its
        # micro-step here; otherwise ZeRO-3 copies a micro-batch's gradients over the previous one's.
        if hasattr(engine.optimizer, "clear_backward_seen_flag"):
            engine.optimizer.clear_backward_seen_flag()
        engine.set_gradient_accumulation_boundary(last)


def full_weights(strategy, model):
    """A context inside which `model` holds its full weights on every rank (a no-op but under ZeRO-3)."""
    gather = getattr(strategy, "full_weights", None)
    return gather(model) if gather is not None else contextlib.nullcontext()
