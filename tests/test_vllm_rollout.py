"""rollout=vllm without a GPU: the weight names vLLM loads, the importance-sampling correction, the config."""

import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from avrl.algorithms.grpo import grpo_loss
from avrl.models import families, load_model
from avrl.models.lora import apply_lora
from avrl.vllm_rollout import VLLMRollout, checkpoint_name, importance_weights, weights_for_sync
from tests.support import ROOT, compose


def saved_names(asset):
    with safe_open(ROOT / "avrl/assets" / asset / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize(
    "model, prefix", [("tiny_qwen2_audio", ""), ("tiny_qwen2_5_omni", "thinker."), ("tiny_qwen3_omni", "thinker.")]
)
def test_synced_weights_are_the_checkpoint_names_and_values(model, prefix):
    """transformers' own save_pretrained wrote the tiny assets in checkpoint layout (names; Qwen3-Omni's experts one
    by one); the hub's Omni checkpoints, which vLLM loads, hold the thinker under "thinker."."""
    from safetensors.torch import load_file

    cfg = compose([f"model={model}"])
    synced = dict(weights_for_sync(load_model(cfg.model), families.get(cfg.model.family)))
    saved = {prefix + n: t for n, t in load_file(ROOT / "avrl/assets" / model / "model.safetensors").items()}
    assert set(synced) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(synced[name], tensor), name


def test_lora_weights_are_merged_into_the_copy_and_the_model_is_left_as_it_was():
    cfg = compose(["algorithm=grpo_lora"])
    model = apply_lora(load_model(cfg.model), cfg.algorithm.lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.fill_(0.01)  # fresh adapters are zero: make them count
    before = {n: t.clone() for n, t in model.state_dict().items()}
    synced = dict(weights_for_sync(model, families.get("qwen2_audio")))
    assert set(synced) == saved_names("tiny_qwen2_audio")
    q_proj = "language_model.model.layers.0.self_attn.q_proj.weight"
    base = before["base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight"]
    module = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    torch.testing.assert_close(synced[q_proj], base + module.get_delta_weight("default"))
    assert not torch.allclose(synced[q_proj], base)  # the adapter's update is in the synced copy
    after = model.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)  # and the model is bit-for-bit unchanged


def test_unknown_families_and_unmapped_names_are_refused():
    with pytest.raises(ValueError, match="unknown model.family 'llama'; expected one of"):
        families.get("llama")
    with pytest.raises(ValueError, match="has no checkpoint name"):
        checkpoint_name("talker.lm_head.weight", families.get("qwen3_omni"))


def test_truncated_importance_weights():
    train = torch.tensor([[-1.0, -2.0, -0.1]])
    vllm = torch.tensor([[-1.0, -1.0, -2.0]])
    w = importance_weights(train, vllm, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, torch.exp(torch.tensor(-1.0)).item(), 2.0]]))


def test_importance_weights_scale_the_surrogate_not_the_kl():
    g = torch.Generator().manual_seed(0)
    logps, old, ref = (-torch.rand(4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    adv, mask = torch.randn(4, generator=g, dtype=torch.float64), torch.ones(4, 5, dtype=torch.long)
    w = torch.rand(4, 5, generator=g, dtype=torch.float64) * 2
    kwargs = dict(beta=0.1, epsilon=0.2, loss_type="bnpo")
    weighted, _ = grpo_loss(logps, old, ref, adv, mask, importance_weights=w, **kwargs)
    ratio = torch.exp(logps - old)
    surrogate = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    assert torch.allclose(weighted, (surrogate * w + 0.1 * kl).mean())


def test_vllm_rollout_config_composes_and_asks_for_a_gpu_on_cpu():
    cfg = compose(["rollout=vllm"])
    assert cfg.rollout.backend == "vllm" and cfg.rollout.seed == cfg.seed and cfg.rollout.importance_sampling_cap == 2.0
    from avrl.models import load_processor
    from avrl.prompts import prompt_spec
    from avrl.train import build_module

    module = build_module(cfg, load_processor(cfg.model), prompt_spec(cfg))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="rollout=vllm needs a CUDA GPU"):
            module.configure_model()


def test_each_completion_is_sampled_with_the_algorithms_settings_and_its_own_key(monkeypatch):
    """What VLLMRollout hands vLLM, with a stand-in `vllm` module (no GPU): one request per completion, its
    SamplingParams carrying the algorithm's temperature, top-p, top-k, repetition penalty and min-p and the row's
    keyed seed; the outputs come back right-padded with their log-probs."""
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=SimpleNamespace))
    algo = compose(["algorithm.repetition_penalty=1.1", "algorithm.min_p=0.05", "algorithm.top_k=20"]).algorithm
    seen = []

    def generate(requests, params, use_tqdm):
        seen.extend(zip(requests, params))
        tokens = [[5, 6, 2], [7]]
        return [
            SimpleNamespace(
                outputs=[SimpleNamespace(token_ids=t, logprobs=[{x: SimpleNamespace(logprob=-0.5)} for x in t])]
            )
            for t in tokens * (len(requests) // 2)
        ]

    rollout = VLLMRollout.__new__(VLLMRollout)  # the engine itself needs a GPU
    rollout.algo, rollout.pad_token_id, rollout.stop_token_ids = algo, 0, [2]
    rollout.llm = SimpleNamespace(generate=generate)
    ids, mask, logps = rollout._sample(["p0"], [torch.zeros(4)], None, [101, 102], 2, 16000)
    assert [p.seed for _, p in seen] == [101, 102]
    for _, p in seen:
        assert (p.temperature, p.top_p, p.top_k) == (algo.temperature, algo.top_p, 20)
        assert (p.repetition_penalty, p.min_p) == (1.1, 0.05)
        assert p.max_tokens == algo.max_completion_length and p.stop_token_ids == [2]
    assert ids[0, :3].tolist() == [5, 6, 2] and mask.sum(1).tolist() == [3, 1] and logps[1, 0] == -0.5
