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
    except at the drawn token, so that greedy decoding emits the sample. The repetition penalty, temperature,
    top-k, top-p and min-p are applied here in the order transformers' generate applies them (its
    `_get_logits_processor`: the penalty on the raw scores, then the warpers in that order); generate runs with
    do_sample=False, so its own warpers stay out of the way.

    `prompt_padding` (rows,): the left-padding tokens at the start of each row's input_ids, which the penalty does
    not count (transformers' generate passes the same counts, from the attention mask, as its processor's
    `prompt_ignore_length`)."""

    def __init__(
        self,
        keys: list[int],
        prompt_length: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        min_p: float = 0.0,
        prompt_padding: torch.Tensor | None = None,
    ):
        self.keys = torch.tensor(keys, dtype=torch.int64)
        self.prompt_length, self.temperature, self.top_p, self.top_k = prompt_length, temperature, top_p, top_k
        self.repetition_penalty, self.min_p, self.prompt_padding = repetition_penalty, min_p, prompt_padding

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        choice = self.draw(scores, input_ids.shape[1] - self.prompt_length, input_ids)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, choice[:, None], 0.0)

    def draw(self, scores: torch.Tensor, position: int, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The token each row draws at completion `position` from `scores` (rows, vocab); `input_ids` (rows, length):
        the sequences so far, prompt included (needed only with a repetition penalty)."""
        logits = self.warp(scores, input_ids)
        u = uniforms(self.keys.to(scores.device), position, scores.shape[-1])
        gumbel = -torch.log(-torch.log(u)).to(logits.dtype)
        return (logits + gumbel).argmax(dim=-1)

    def warp(self, scores: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The logits the draw samples from (softmax of them): `scores` penalised, tempered and filtered."""
        logits = scores.float()
        if self.repetition_penalty != 1.0:
            if input_ids is None:
                raise ValueError("a repetition penalty needs the sequences so far (input_ids)")
            logits = penalize_repetition(logits, input_ids, self.repetition_penalty, self.prompt_padding)
        logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            logits = top_p_filter(logits, self.top_p)
        if self.min_p > 0.0:
            logits = min_p_filter(logits, self.min_p)
        return logits


def penalize_repetition(
    scores: torch.Tensor, input_ids: torch.Tensor, penalty: float, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """CTRL's repetition penalty as transformers' RepetitionPenaltyLogitsProcessor applies it: every token id that
    occurs in a row's input_ids (the prompt and the completion so far, after its first `ignore[row]` ids) has its
    score divided by `penalty` where positive, multiplied where negative, once however often it occurs. Ids past
    the scores' vocabulary (an embedding larger than the output layer) cannot be drawn and are not counted."""
    vocab = scores.shape[-1]
    counted = input_ids < vocab
    if ignore is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        counted &= positions[None, :] >= ignore.to(input_ids.device)[:, None]
    seen = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    seen = seen.scatter(1, input_ids.masked_fill(~counted, vocab).to(scores.device), True)[:, :vocab]
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (the most likely token always stays), by
    transformers' TopPLogitsWarper's rule: drop the tokens whose ascending cumulative probability is <= 1 - top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    drop[..., -1:] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop the tokens whose probability is below min_p x the most likely token's (transformers' MinPLogitsWarper;
    min_p <= 1 keeps the most likely token)."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def padding_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """The left-padding tokens of each row: what transformers' generate leaves out of the repetition penalty."""
    return (attention_mask != 0).int().argmax(dim=1)
