"""Keyed sampling: each completion's tokens are drawn from a random stream named by (seed, step, item, completion
index, position), not from the global generator.

Why: the rollouts then do not depend on how prompts are batched — one process with 8 prompts, two DDP ranks with 4
each, or micro-batches of 2 sample the same completions — so a multi-GPU run can be checked against a one-GPU run
(tests/test_ddp.py), and a resumed run needs no generator state to sample what the uninterrupted run sampled.

How: Gumbel-max. argmax(logits / T + g) with g ~ Gumbel(0, 1) i.i.d. per vocabulary entry is an exact draw from
softmax(logits / T). The uniforms behind g come from an integer hash of (row key, position, token id), computed
for the whole (rows, vocab) score matrix at once. The hash works on 31-bit integers in int64 arithmetic (no
overflow), so the uniforms have a resolution of 2^-31: tokens below ~1e-9 probability are never drawn.
"""

from __future__ import annotations

import hashlib

import torch

PRIME = 2_147_483_647  # 2^31 - 1
_ROUNDS = ((1_103_515_245, 12_345, 13), (1_664_525, 1_013_904_223, 11), (2_147_483_629, 7, 16))


def mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash: values in [0, 2^31) -> [0, 2^31); products stay below 2^62."""
    for a, c, shift in _ROUNDS:
        x = (x * a + c) % PRIME
        x = x ^ (x >> shift)
    return x


def row_key(seed: int, step: int, item_id: str, index: int) -> int:
    """The stream of one completion: completion `index` of item `item_id` at optimizer step `step`."""
    digest = hashlib.blake2b(f"{seed}/{step}/{item_id}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % PRIME


def rollout_keys(seed: int, step: int, items, num_generations: int, draw: int = 0) -> list[int]:
    """The streams of the G completions of each item at `step`, grouped by item; `draw` tells repeated draws of
    the same step apart (task=eval's eval.num_samples)."""
    return [row_key(seed, step, item.id, draw * num_generations + g) for item in items for g in range(num_generations)]


def uniforms(keys: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """(rows, vocab) uniforms in (0, 1) for token `position` of each row's stream."""
    per_row = mix(keys ^ int(mix(torch.tensor(position + 1)).item()))
    per_token = mix(torch.arange(vocab, device=keys.device, dtype=torch.int64) + 7_919)
    u = mix(per_row[:, None] ^ per_token[None, :])
    return (u.double() + 0.5) / PRIME


class KeyedSampler:
    """A transformers logits processor that samples each row from its own stream and returns scores that are -inf
    except at the drawn token, so that greedy decoding emits the sample. Temperature, top-k and top-p are applied
    here in transformers' order (generate runs with do_sample=False, so its own warpers stay out of the way)."""

    def __init__(
        self, keys: list[int], prompt_length: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
    ):
        self.keys = torch.tensor(keys, dtype=torch.int64)
        self.prompt_length, self.temperature, self.top_p, self.top_k = prompt_length, temperature, top_p, top_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        choice = self.draw(scores, input_ids.shape[1] - self.prompt_length)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, choice[:, None], 0.0)

    def draw(self, scores: torch.Tensor, position: int) -> torch.Tensor:
        """The token each row draws at completion `position` from `scores` (rows, vocab)."""
        logits = scores.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            logits = top_p_filter(logits, self.top_p)
        u = uniforms(self.keys.to(scores.device), position, scores.shape[-1])
        gumbel = -torch.log(-torch.log(u)).to(logits.dtype)
        return (logits + gumbel).argmax(dim=-1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (the most likely token always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
