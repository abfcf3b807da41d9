"""GRPO advantages and loss against an independent float64 computation written loop by loop."""

import math

import pytest
import torch

from avrl import strategies
from avrl.algorithms.grpo import _micro_batch_weight, group_advantages, grpo_loss


def ref_advantages(rewards, G, scale):
    r = [float(x) for x in rewards]
    out = []
    all_mean = sum(r) / len(r)
    all_std = math.sqrt(sum((x - all_mean) ** 2 for x in r) / (len(r) - 1))
    for g in range(0, len(r), G):
        group = r[g : g + G]
        mean = sum(group) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (G - 1))
        for x in group:
            a = x - mean
            if scale == "group":
                a /= std + 1e-4
            elif scale == "batch":
                a /= all_std + 1e-4
            out.append(a)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages(scale):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (24,), generator=g).double() + torch.rand(24, generator=g, dtype=torch.float64)
    rewards[:4] = 1.0  # a group with zero std
    got = group_advantages(rewards, 4, scale)
    assert torch.allclose(got, ref_advantages(rewards, 4, scale), atol=1e-10)
    assert torch.all(got[:4] == 0)


def ref_loss(logps, old, ref, adv, mask, beta, eps, eps_high, loss_type, max_len):
    B, T = len(logps), len(logps[0])
    eps_high = eps if eps_high is None else eps_high
    per_seq, total, ntok = [], 0.0, 0
    for b in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[b][t]:
                continue
            ratio = math.exp(logps[b][t] - old[b][t])
            clipped = min(max(ratio, 1 - eps), 1 + eps_high)
            term = -min(ratio * adv[b], clipped * adv[b])
            if beta:
                d = ref[b][t] - logps[b][t]
                term += beta * (math.exp(d) - d - 1)
            s += term
            n += 1
        per_seq.append(s / max(n, 1))
        total += s
        ntok += n
    if loss_type == "grpo":
        return sum(per_seq) / B
    if loss_type in ("bnpo", "dapo"):
        return total / max(ntok, 1)
    return total / (B * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_loss_matches_reference(loss_type, beta, eps_high):
    g = torch.Generator().manual_seed(1)
    B, T = 6, 7
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5  # ratios far from 1: clipping is active
    ref = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1, 7, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    loss, metrics = grpo_loss(
        logps,
        old,
        ref if beta else None,
        adv,
        mask,
        beta=beta,
        epsilon=0.2,
        epsilon_high=eps_high,
        loss_type=loss_type,
        max_completion_length=10,
    )
    expected = ref_loss(
        logps.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), beta, 0.2, eps_high, loss_type, 10
    )
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert 0 < metrics["clip_ratio"].item() < 1  # the case exercises clipping
    assert ("kl" in metrics) == (beta != 0)


def test_ratio_one_gives_policy_gradient():
    """With old == logps the loss is -mean(A) and its gradient is -A/len per token (REINFORCE with a baseline)."""
    logps = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, _ = grpo_loss(logps, logps.detach(), None, adv, mask, beta=0.0, epsilon=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.0 / 1 + -2.0 / 1) / 2)
    expected = torch.tensor([[-1 / 2 / 2, -1 / 2 / 2, 0], [2 / 3 / 2, 2 / 3 / 2, 2 / 3 / 2]], dtype=torch.float64)
    assert torch.allclose(logps.grad, expected)


def test_rejects_bad_options():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(x, x, None, torch.zeros(1), torch.ones(1, 2), beta=0.0, epsilon=0.2, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(x, x, None, torch.zeros(1), torch.ones(1, 2), beta=0.1, epsilon=0.2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "rank")


def trl_step_loss(ranks, loss_type, max_len, beta, eps):
    """TRL GRPOTrainer.compute_loss (trl/trainer/grpo_trainer.py) over every rank's micro-batches, in float64 loops:
    the value whose gradient an optimizer step applies (each micro-batch's loss as TRL scales it, summed over the
    accumulation steps, averaged over ranks as DDP averages gradients). `ranks`: per rank, a list of micro-batches
    (logps, old, ref, adv, mask), each a list of rows. steps_per_generation = accumulation steps (TRL's default)."""
    world = len(ranks)
    num_items = sum(m for rank in ranks for micro in rank for row in micro[4] for m in row)  # gathered token count
    total = 0.0
    for rank in ranks:
        accumulation = len(rank)
        for logps, old, ref, adv, mask in rank:
            flat = ref_loss(logps, old, ref, adv, mask, beta, eps, None, "dapo", max_len)  # sum / tokens
            tokens = sum(m for row in mask for m in row)
            token_sum = flat * max(tokens, 1)
            if loss_type == "grpo":
                loss = ref_loss(logps, old, ref, adv, mask, beta, eps, None, "grpo", max_len) / accumulation
            elif loss_type == "bnpo":
                loss = token_sum / max(tokens, 1) / accumulation
            elif loss_type == "dr_grpo":
                loss = token_sum / (len(mask) * max_len) / accumulation
            else:  # dapo: num_items_in_batch / num_processes * accumulation / steps_per_generation
                loss = token_sum / (max(num_items, 1) / world)
            total += loss
    return total / world


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_micro_batch_and_rank_weights_give_trls_step_loss(loss_type):
    """Two ranks x two micro-batches of 3 completions with different token counts: avrl's weighted micro-batch
    losses (grpo.py's _micro_batch_weight, with the global token count of strategies.global_sum), summed per rank
    and averaged over ranks, equal TRL's step loss; on one process with one micro-batch, grpo_loss's own value."""
    g = torch.Generator().manual_seed(3)
    R, K, B, T = 2, 2, 3, 6
    rows = R * K * B
    logps = -torch.rand(rows, T, generator=g, dtype=torch.float64) * 3
    old = logps + torch.randn(rows, T, generator=g, dtype=torch.float64) * 0.5
    ref = logps + torch.randn(rows, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 2, 5, 6, 6, 3, 0, 4, 2, 1, 6])  # unequal counts per micro-batch and rank
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    kwargs = dict(beta=0.04, epsilon=0.2, loss_type=loss_type, max_completion_length=T)

    global_tokens = mask.sum()
    avrl, ranks = 0.0, []
    for r in range(R):
        own = slice(r * K * B, (r + 1) * K * B)
        m = mask[own]
        rank_value, micro_batches = 0.0, []
        for k in range(K):
            s = slice(r * K * B + k * B, r * K * B + (k + 1) * B)
            loss, _ = grpo_loss(logps[s], old[s], ref[s], adv[s], mask[s], **kwargs)
            local = slice(k * B, (k + 1) * B)
            rank_value += loss.item() * _micro_batch_weight(loss_type, m, local, K, global_tokens.item() / R)
            micro_batches.append([x[s].tolist() for x in (logps, old, ref)] + [adv[s].tolist(), mask[s].tolist()])
        avrl += rank_value / R
        ranks.append(micro_batches)
    assert avrl == pytest.approx(trl_step_loss(ranks, loss_type, T, 0.04, 0.2), rel=1e-12)

    whole, _ = grpo_loss(logps, old, ref, adv, mask, **kwargs)
    assert _micro_batch_weight(loss_type, mask, slice(0, rows), 1, mask.sum().item()) == 1.0
    everything = [[x.tolist() for x in (logps, old, ref, adv, mask)]]
    assert whole.item() == pytest.approx(trl_step_loss([everything], loss_type, T, 0.04, 0.2), rel=1e-12)


def test_global_std_on_one_process_is_torch_std():
    rewards = torch.tensor([0.0, 1.0, 2.0, 2.0, 0.5], dtype=torch.float64)
    assert strategies.global_std(None, rewards) is not None
    assert strategies.global_std(None, rewards).item() == rewards.std().item()
    assert strategies.world_size(None) == 1
