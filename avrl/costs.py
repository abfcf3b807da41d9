"""What training cost, measured on the models themselves (the pure estimators are avrl/measures.py):

- `kl_to_base`: KL(base || tuned) per token on held-out prompts: completions sampled from the base (keyed streams
  that do not depend on the run, so every run and every validation scores the same completions), their log-probs
  under the base and under the tuned model, Schulman's k3 and k1 with their standard errors (`measures.forward_kl`);
- `sampled_results`: n keyed samples per item, scored (for pass@k: `measures.pass_at_k_metrics`);
- `greedy_lengths`: the number of tokens of each greedy completion, up to and including its stop token;
- `base_weights`, `trained_weights`: fp32 CPU state dicts of the base (loaded from the model config) and of the
  trained model (LoRA: the adapters merged into a CPU copy of the base), for `measures.parameter_change`;
- `base_model`: the base the KL is measured against (GRPO's frozen reference, a LoRA model with its adapters off,
  else the model config's weights loaded in fp32).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from omegaconf import DictConfig, open_dict
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from avrl import measures
from avrl.models import load_model
from avrl.models.lora import apply_lora
from avrl.policy import Policy, to_device
from avrl.sampling import row_key
from avrl.scoring import score_batch

# The random streams of the measures' samples: fixed, not the run's seed, so that every run (and the base row) is
# measured on the same draws where the models agree (common random numbers for the comparisons between arms).
KL_STREAM = "kl"
PASS_AT_K_STREAM = "pass@k"


def stream_keys(stream: str, items, num: int, draw: int = 0) -> list[int]:
    """One key per (item, sample), grouped by item: the stream's own, independent of seed and step."""
    return [row_key(0, 0, f"{stream}/{item.id}", draw * num + g) for item in items for g in range(num)]


def full_distribution(max_new_tokens: int, temperature: float) -> dict:
    """Sampling settings with nothing cut off (no top-p, no top-k): the KL and pass@k need the model's own
    distribution at `temperature`."""
    return {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": 1.0, "top_k": 0}


@contextlib.contextmanager
def eval_mode(*models):
    """The models in eval mode (no dropout: LoRA's would perturb the log-probs) for the duration."""
    before = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(models, before, strict=True):
            m.train(training)


@torch.no_grad()
def kl_to_base(
    base: Policy, tuned: Policy, loader, samples: int, settings: dict, base_context=contextlib.nullcontext
) -> dict[str, measures.Estimate]:
    """KL(base || tuned) per token over every prompt of `loader`, `samples` completions each, sampled from `base`
    under `settings`; log-probs at the same temperature. `base_context()` is entered around every call of the base
    (a LoRA model's `disable_adapter`, when base and tuned are one model). Returns "k3" and "k1" per-token
    estimates with their standard errors over sequences."""
    device = next(tuned.model.parameters()).device
    base_logps, tuned_logps, masks = [], [], []
    for raw in loader:
        if not raw["items"]:
            continue
        batch = to_device(raw, device)
        keys = stream_keys(KL_STREAM, batch["items"], samples)
        with base_context():
            media = base.encode(batch)
            ids, mask = base.generate(batch, media, samples, settings, keys=keys)
            b, _ = base.completion_logps(batch, media, ids, mask, samples, settings["temperature"])
        t, _ = tuned.completion_logps(batch, tuned.encode(batch), ids, mask, samples, settings["temperature"])
        width = settings["max_new_tokens"]  # batches end at different lengths: pad to one width
        base_logps.append(_pad(b, width))
        tuned_logps.append(_pad(t, width))
        masks.append(_pad(mask, width))
    if not masks:
        raise ValueError("KL(base || tuned): the loader gave no items")
    base_all, tuned_all, mask_all = torch.cat(base_logps), torch.cat(tuned_logps), torch.cat(masks)
    return {name: measures.forward_kl(base_all, tuned_all, mask_all, name)["per_token"] for name in ("k3", "k1")}


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x.detach().float().cpu(), (0, width - x.shape[1]))


@torch.no_grad()
def sampled_results(policy: Policy, loader, prompt, samples: int, settings: dict) -> list[dict]:
    """Every item of `loader` completed `samples` times from the keyed pass@k streams and scored (strict
    protocol): score_batch's results, each with its samples' correctness under "correct_per_sample"."""
    device = next(policy.model.parameters()).device
    results = []
    for raw in loader:
        if raw["items"]:
            batch = to_device(raw, device)
            keys = lambda k, items=batch["items"]: stream_keys(PASS_AT_K_STREAM, items, 1, draw=k)  # noqa: E731
            results += score_batch(policy, batch, prompt, settings, samples=samples, keys=keys)
    return results


@torch.no_grad()
def greedy_lengths(policy: Policy, loader, settings: dict) -> list[int]:
    """The tokens of each item's greedy completion, up to and including its stop token (all of them when it was
    cut at max_new_tokens)."""
    device = next(policy.model.parameters()).device
    lengths = []
    for raw in loader:
        if raw["items"]:
            batch = to_device(raw, device)
            ids, mask = policy.generate(batch, policy.encode(batch), 1, settings)
            lengths += mask.sum(dim=1).tolist()
    return lengths


def fp32_config(model_cfg: DictConfig) -> DictConfig:
    out = copy.deepcopy(model_cfg)
    with open_dict(out):
        out.dtype = "float32"
    return out


def base_weights(model_cfg: DictConfig, module=None) -> dict[str, torch.Tensor]:
    """The base model's weights as the model config names them, in fp32 on the CPU: the copy `base_model` already
    loaded for the KL when `module` holds one (the same config's weights in fp32), else loaded here."""
    cached = getattr(module, "_kl_base", None)
    model = cached[0] if cached else load_model(fp32_config(model_cfg))
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter")


def trained_weights(model, model_cfg: DictConfig, lora_cfg=None) -> dict[str, torch.Tensor]:
    """The trained model's weights in fp32 on the CPU, under the base's names. A LoRA model: its adapters loaded
    into a fresh fp32 CPU copy of the base and merged (base + B A scaled), the live model left as it is."""
    if not is_peft(model):
        return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if lora_cfg is None:
        raise ValueError("a LoRA model's merged weights need its adapters' config (algorithm.lora)")
    copy_ = apply_lora(load_model(fp32_config(model_cfg)), lora_cfg)
    adapters = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(copy_, adapters)
    return {k: v.detach() for k, v in copy_.merge_and_unload().state_dict().items()}


def base_model(module, model_cfg: DictConfig):
    """The base the KL compares with, and the context to enter around its calls: a LoRA model itself with its
    adapters off; GRPO's frozen reference when it has one; else the model config's weights in fp32, on the
    module's device."""
    if is_peft(module.model):
        return module.model, module.model.disable_adapter
    ref = getattr(module, "ref_model", None)
    if ref is not None:
        return ref, contextlib.nullcontext
    # Loaded once per module (every validation measures against it): held in a list, so that it is no registered
    # submodule and never enters a checkpoint.
    cached = getattr(module, "_kl_base", None)
    if cached is None:
        cached = [load_model(fp32_config(model_cfg)).eval().requires_grad_(False)]
        module._kl_base = cached
    return cached[0].to(module.device), contextlib.nullcontext
