"""Decoding options against transformers' own processors: the keyed sampler's repetition penalty, temperature,
top-k, top-p and min-p (same filtered distribution, same order as generate builds them), greedy decoding with a
repetition penalty, both generation paths on a tiny model, and k samples per prompt in one generate call drawing
what k calls drew."""

import math

import pytest
import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
)

from avrl.models import multimodal as mm
from avrl.policy import Policy
from avrl.sampling import KeyedSampler, padding_lengths, row_key
from tests.test_shared_prefix import tiny

VOCAB, ROWS, LENGTH = 300, 6, 40


def transformers_processors(settings: dict, attention_mask: torch.Tensor) -> LogitsProcessorList:
    """The processors transformers' generate builds for sampling with these settings (its own
    `_get_logits_processor`, so its order and its definitions), on a tiny Llama: what the keyed sampler must
    reproduce before its draw."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1))  # fmt: skip
    config = GenerationConfig(do_sample=True, **settings)
    return model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=attention_mask.shape[1],
        logits_processor=LogitsProcessorList(),
        device="cpu",
        model_kwargs={"attention_mask": attention_mask},
    )


def random_rows(seed: int):
    """Scores, sequences (prompt ids with left padding, some ids past the output vocabulary, repeated ids) and the
    attention mask of the prompt part."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(ROWS, VOCAB, generator=g) * 3
    ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g)
    ids[0, 5] = VOCAB + 7  # an embedding id the output layer does not have
    ids[1, :10] = ids[1, 10]  # a repeated id: penalised once
    mask = torch.ones(ROWS, LENGTH - 8, dtype=torch.long)  # the prompt: the first LENGTH - 8 ids, 8 generated
    for row in range(ROWS):
        mask[row, : 3 * row] = 0  # left padding, up to 15 ids
    return scores, ids, mask


SETTINGS = [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7, temperature=0.6),
    dict(repetition_penalty=1.1, temperature=0.7, top_k=20, top_p=0.5),  # the shape of Qwen2-Audio-Instruct's file
    dict(temperature=1.3, min_p=0.05),
    dict(repetition_penalty=1.2, temperature=0.8, top_k=50, top_p=0.9, min_p=0.1),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_the_sampler_filters_as_transformers_processors_do(settings):
    scores, ids, mask = random_rows(sum(map(hash, settings)) % 1000)
    want = transformers_processors(settings, mask)(ids, scores.clone())
    sampler = KeyedSampler(
        list(range(ROWS)), LENGTH - 8, **{"top_k": 0, **settings}, prompt_padding=padding_lengths(mask)
    )
    got = sampler.warp(scores.clone(), ids)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))  # the same tokens kept
    assert torch.isfinite(got).sum() < got.numel() or "top_k" not in settings
    torch.testing.assert_close(got.softmax(-1), want.softmax(-1), rtol=0, atol=1e-6)  # the same distribution
    # What is drawn is one of the kept tokens, and the scores handed back make greedy emit it.
    onehot = sampler(ids, scores.clone())
    assert torch.isfinite(want.gather(1, onehot.argmax(1, keepdim=True))).all()


def test_draws_follow_the_penalised_min_p_distribution():
    scores, ids, mask = random_rows(3)
    settings = dict(repetition_penalty=1.5, temperature=0.9, min_p=0.02)
    probs = transformers_processors(settings, mask[:1])(ids[:1], scores[:1].clone()).softmax(-1)[0].double()
    n = 20000
    keys = [row_key(0, 0, f"item{i}", 0) for i in range(n)]
    sampler = KeyedSampler(keys, LENGTH - 8, **settings, prompt_padding=padding_lengths(mask[:1]).expand(n))
    drawn = sampler.draw(scores[:1].expand(n, -1).clone(), 0, ids[:1].expand(n, -1))
    kept = probs > 0
    assert set(drawn.tolist()) <= set(kept.nonzero().flatten().tolist())
    counts = torch.bincount(drawn, minlength=VOCAB).double()[kept]
    expected = n * probs[kept]
    # tokens pooled into cells of >= 5 expected draws; chi-square at its 0.999 quantile (Wilson-Hilferty)
    order = expected.argsort()
    cells, got_cells, acc, acc_got = [], [], 0.0, 0.0
    for i in order.tolist():
        acc, acc_got = acc + float(expected[i]), acc_got + float(counts[i])
        if acc >= 5:
            cells.append(acc), got_cells.append(acc_got)
            acc = acc_got = 0.0
    cells[-1] += acc
    got_cells[-1] += acc_got
    chi2 = sum((o - e) ** 2 / e for o, e in zip(got_cells, cells))
    dof = len(cells) - 1
    assert chi2 < dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3, (chi2, dof)


def generate_reference(policy: Policy, batch, media, G: int, settings: dict, sampler=None):
    """transformers' generate building its own repetition penalty (from the attention mask, as for any model),
    followed by `sampler` (a keyed sampler without a penalty) or greedy: the inputs Policy.generate gives it."""
    model = mm.unwrap(policy.model)
    rep = mm.repeat_prompts(batch, G)
    out = model.generate(
        input_ids=rep["input_ids"],
        inputs_embeds=mm.embed(model, batch["input_ids"], media).repeat_interleave(G, dim=0),
        attention_mask=rep["attention_mask"],
        max_new_tokens=settings["max_new_tokens"],
        eos_token_id=policy.processor.stop_token_ids,
        pad_token_id=policy.processor.tokenizer.pad_token_id,
        do_sample=False,
        repetition_penalty=settings["repetition_penalty"],
        logits_processor=LogitsProcessorList([sampler] if sampler is not None else []),
        **policy.family.rope_inputs(rep),
    )
    return out[:, rep["input_ids"].shape[1] :]


@pytest.mark.slow  # 12-30 s on 2 cores: the full suite runs it
def test_generate_with_a_repetition_penalty_matches_transformers_on_the_tiny_model(tmp_path):
    model, processor, family, batch = tiny("tiny_qwen2_audio", tmp_path)
    model.eval()
    repeated, shared = (Policy(model, processor, family, shared_prefix=s) for s in (False, True))
    media = repeated.encode(batch)
    greedy = dict(max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=3.0)
    want = generate_reference(repeated, batch, media, 1, greedy)
    got = repeated.generate(batch, media, 1, greedy)[0]
    assert torch.equal(got, want)
    assert torch.equal(shared.generate(batch, media, 1, greedy)[0], want)
    plain = repeated.generate(batch, media, 1, greedy | dict(repetition_penalty=1.0))[0]
    assert not torch.equal(plain, want)  # the penalty changed the greedy completions

    G = 3
    sampled = dict(max_new_tokens=12, temperature=1.2, top_p=0.95, top_k=40, repetition_penalty=1.4, min_p=0.05)
    keys = list(range(11, 11 + 2 * G))
    plain_sampler = KeyedSampler(keys, batch["input_ids"].shape[1], 1.2, 0.95, 40, 1.0, 0.05)
    want = generate_reference(repeated, batch, media, G, sampled, plain_sampler)
    assert torch.equal(repeated.generate(batch, media, G, sampled, keys=keys)[0], want)
    assert torch.equal(shared.generate(batch, media, G, sampled, keys=keys)[0], want)
    assert len({tuple(row.tolist()) for row in want}) > 2  # the draws differ across the group


def test_k_samples_in_one_call_draw_what_k_calls_drew():
    from avrl.datamodule import AudioQADataModule
    from avrl.models import families, load_model, load_processor
    from avrl.prompts import prompt_spec
    from avrl.sampling import rollout_keys
    from avrl.scoring import score_batch
    from tests.support import compose

    cfg = compose(["data.val_size=4", "data.eval_batch_size=4"])
    processor, spec = load_processor(cfg.model), prompt_spec(cfg)
    dm = AudioQADataModule(cfg.data, processor, spec, splits=("val",))
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    policy = Policy(load_model(cfg.model).float().eval(), processor, families.get(cfg.model.family), False)
    settings = dict(max_new_tokens=10, temperature=1.5, top_p=1.0, top_k=0, repetition_penalty=1.2, min_p=0.01)
    k = 3

    def keys(draw, items=batch["items"]):
        return rollout_keys(7, 0, items, 1, draw=draw)

    with torch.no_grad():
        results = score_batch(policy, batch, spec, settings, samples=k, keys=keys)
        media = policy.encode(batch)
        one_by_one = [policy.decode(*policy.generate(batch, media, 1, settings, keys=keys(d))) for d in range(k)]
    assert [r["completions"] for r in results] == [[t[i] for t in one_by_one] for i in range(len(batch["items"]))]
    assert len({c for r in results for c in r["completions"]}) > len(results)  # the samples differ
