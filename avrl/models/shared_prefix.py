"""Shared-prefix GRPO: each prompt's tokens go through the language model once, not G times.

A GRPO group is one prompt (a long one: ~250 audio tokens per 10 s of audio) and G short completions. The repeated
path (TRL's, the papers') runs the prompt G times: G prefills in generation, G copies in each log-prob forward
and backward. Here (after Prefix Grouper, arXiv 2506.05433):

- Generation (`generate`): one prefill per prompt; its key/value cache is copied to the G rows and decoding goes
  on from there, sampling each row from its keyed stream (avrl/sampling.py) exactly as the repeated path does.
- Log-probs (`completion_logits`): one packed row per prompt, [prompt, completion 1, ..., completion G], with an
  attention mask under which each completion sees the prompt and its own past only, and rope positions that
  restart after the prompt for every completion. The prompt's hidden states are computed once and every
  completion attends to them, so outputs and gradients (which flow from all G completions into the one copy of
  the prompt) equal the repeated path's; tests/test_shared_prefix.py checks both (fp32, to rounding).

The packed mask is a dense (L x L) mask: it needs `attn_implementation` sdpa or eager (flash-attention takes no
custom mask; set `algorithm.shared_prefix=false` there). Its attention costs (P + G T)^2 instead of G (P + T)^2,
which is smaller for every shape avrl trains and small next to the projections and MLPs it saves.
"""

from __future__ import annotations

import inspect

import torch

from avrl.models.families import Family
from avrl.models.multimodal import unwrap


# ------------------------------------------------------------------------------------------------ positions
def prompt_positions(model, family: Family, batch: dict) -> torch.Tensor:
    """Rope positions of the (left-padded) prompts: (B, P) for a 1-D rope, (3, B, P) for a 3-D one, the latter
    from the model's own rule (media sizes), as its forward computes them when given no positions."""
    if not family.rope_from_media:
        return family.position_ids(batch["attention_mask"])
    feature_mask = batch.get("feature_attention_mask")
    positions, _ = unwrap(model).model.get_rope_index(
        batch["input_ids"],
        batch.get("image_grid_thw"),
        None,
        batch["attention_mask"],
        False,
        feature_mask.sum(-1) if feature_mask is not None else None,
    )
    return positions


def following_positions(prompt_pos: torch.Tensor, length: int, offset: int = 0) -> torch.Tensor:
    """Positions of `length` text tokens after the prompt, starting `offset` tokens in: the prompt's last position
    + 1 + i in every rope dimension (a prompt ends with text, whose position is the same in all three)."""
    steps = torch.arange(offset + 1, offset + 1 + length, device=prompt_pos.device)
    return prompt_pos[..., -1:] + steps


# ------------------------------------------------------------------------------------------------ log-probs
def packed_attention_mask(
    prompt_mask: torch.Tensor, groups: int, length: int, dtype: torch.dtype, attn_implementation: str
) -> torch.Tensor:
    """(B, 1, L, L) mask of the packed rows [prompt, completion 1, ..., completion G], L = P + G * length: a
    completion token sees the prompt's real tokens and its own completion up to itself; a prompt token sees the
    prompt causally. Every token sees itself (a left-pad query would otherwise see nothing: NaN in softmax)."""
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"algorithm.shared_prefix needs model.attn_implementation sdpa or eager (a dense "
            f"attention mask), got {attn_implementation!r}; set algorithm.shared_prefix=false"
        )
    batch, prompt = prompt_mask.shape
    device = prompt_mask.device
    block = torch.cat(
        [torch.full((prompt,), -1, device=device), torch.arange(groups, device=device).repeat_interleave(length)]
    )
    index = torch.arange(block.shape[0], device=device)
    causal = index[None, :] <= index[:, None]  # (query, key)
    visible = causal & ((block[:, None] == block[None, :]) | (block[None, :] == -1))
    real_key = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(batch, groups * length, dtype=torch.bool)], 1)
    allowed = (visible[None] & real_key[:, None, :]) | torch.eye(block.shape[0], dtype=torch.bool, device=device)
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def completion_logits(
    model, family: Family, batch: dict, prompt_embeds: torch.Tensor, ids: torch.Tensor, groups: int
) -> torch.Tensor:
    """Logits that predict each completion token, (B * G, T, vocab), from one packed forward per prompt.
    `prompt_embeds` (B, P, d) are the prompts' embeddings with the media written in; `ids` (B * G, T) the
    completions grouped by prompt."""
    base = unwrap(model)
    num_prompts, prompt = batch["input_ids"].shape
    length = ids.shape[1]
    packed_ids = ids.reshape(num_prompts, groups * length)
    embeds = torch.cat([prompt_embeds, base.get_input_embeddings()(packed_ids)], dim=1)
    prompt_pos = prompt_positions(base, family, batch)
    completion_pos = following_positions(prompt_pos, length).repeat(*([1] * (prompt_pos.dim() - 1)), groups)
    positions = torch.cat([prompt_pos, completion_pos], dim=-1)
    mask = packed_attention_mask(
        batch["attention_mask"], groups, length, embeds.dtype, base.config._attn_implementation
    )
    hidden = base.model(
        input_ids=torch.cat([batch["input_ids"], packed_ids], 1) if family.forward_takes_input_ids else None,
        attention_mask=mask,
        inputs_embeds=embeds,
        position_ids=positions,
        use_cache=False,
    ).last_hidden_state
    # Token t of completion g is predicted at the token before it: the prompt's last for t = 0 (shared by the G
    # completions), else token t - 1 of the same completion.
    starts = prompt + length * torch.arange(groups, device=ids.device)
    before = torch.cat(
        [
            torch.full((groups, 1), prompt - 1, device=ids.device),
            starts[:, None] + torch.arange(length - 1, device=ids.device),
        ],
        dim=1,
    )
    picked = hidden[:, before.flatten()].reshape(num_prompts * groups, length, hidden.shape[-1])
    return base.lm_head(picked)


# ----------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(
    model,
    family: Family,
    batch: dict,
    prompt_embeds: torch.Tensor,
    groups: int,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    choose=None,
) -> torch.Tensor:
    """(B * G, T) completions: one prefill per prompt, its cache copied to the G rows, then decoding as
    transformers' generate does it (a finished row emits pad; all rows stop when all have stopped).
    `choose(scores, position) -> tokens` picks each next token (the keyed sampler); greedy when None."""
    base = unwrap(model)
    takes_ids = family.forward_takes_input_ids
    cache_argument = _cache_argument(base.model)
    prompt_pos = prompt_positions(base, family, batch)
    out = base.model(
        input_ids=batch["input_ids"] if takes_ids else None,
        attention_mask=batch["attention_mask"],
        inputs_embeds=prompt_embeds,
        position_ids=prompt_pos,
        use_cache=True,
    )
    cache = _cache_of(out)
    cache.batch_repeat_interleave(groups)
    logits = base.lm_head(out.last_hidden_state[:, -1]).float().repeat_interleave(groups, dim=0)
    prompt_pos = prompt_pos.repeat_interleave(groups, dim=-2)  # the batch dimension of (B, P) and (3, B, P)
    attention = batch["attention_mask"].repeat_interleave(groups, dim=0)
    stops = torch.tensor(stop_ids, device=logits.device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    tokens = []
    for t in range(max_new_tokens):
        step = choose(logits, t) if choose is not None else logits.argmax(dim=-1)
        step = torch.where(done, torch.full_like(step, pad_id), step)
        tokens.append(step)
        done = done | torch.isin(step, stops)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
        out = base.model(
            input_ids=step[:, None] if takes_ids else None,
            inputs_embeds=base.get_input_embeddings()(step[:, None]),
            attention_mask=attention,
            position_ids=following_positions(prompt_pos, 1, offset=t),
            use_cache=True,
            **{cache_argument: cache},
        )
        cache = _cache_of(out)
        logits = base.lm_head(out.last_hidden_state[:, -1]).float()
    return torch.stack(tokens, dim=1)


def _cache_argument(module) -> str:
    """transformers renamed `past_key_values` to `cache` within 5.x; whichever this version's forward takes."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
