"""GPU checks (`pytest -m gpu` on any CUDA machine; skipped with the reason elsewhere) and their CPU half, which the
regular suite runs: precision that trains (bf16-mixed against fp32; each preset's fp32 master weights), DeepSpeed over
NCCL (equivalence with the plain strategy, NaN skipping, resume: bodies shared with the CPU tests in
tests/support/deepspeed_checks.py), the 7B shapes' published sizes. The GPU benchmark (benchmarks/gpu.py) is tested in
tests/test_benchmarks.py; its batch and processor serve the bf16 checks here.

Written without a GPU to run them on (no GPU was lent to the sessions that wrote them): the first GPU run is
their first run. Needs only torch, transformers, lightning, peft, hydra-core, omegaconf, pytest (and deepspeed for
the ZeRO checks): docs/gpu.md."""

from contextlib import nullcontext

import pytest
import torch

from tests.support import ROOT, assert_same_trained_weights, final_weights_of_cli_run
from tests.support.deepspeed_checks import check_deepspeed_resume, check_skipped_update
from tests.support.helpers import STRATEGY_RUN

SHAPES = ROOT / "avrl/assets/shapes"
# The DeepSpeed equivalence run of tests/test_strategies.py, on one GPU in fp32 (bf16 rollouts would sample different
# tokens on different strategies, so equality is checked where it is defined).
EQUIVALENCE = [
    *STRATEGY_RUN,
    "data.batch_size=4",
    "algorithm.micro_batch_prompts=2",
    "trainer.accelerator=gpu",
    "trainer.devices=1",
    "trainer.precision=32-true",
]


def test_qwen2_audio_7b_shape_has_the_published_parameter_count():
    """avrl/assets/shapes/qwen2_audio_7b holds Qwen2-Audio-7B-Instruct's published sizes; built on the meta device
    (no memory), it has the checkpoint's 8.4B parameters (the model card's figure)."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    config = Qwen2AudioConfig.from_pretrained(SHAPES / "qwen2_audio_7b")
    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(8.4e9, rel=0.005), count
    assert config.text_config.hidden_size == 4096 and config.audio_config.d_model == 1280


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_a_skipped_update_under_deepspeed_on_cuda_leaves_no_gradient_behind(
    cfg_factory, monkeypatch, tmp_path, stage, restored_environment
):
    """NaN skipping over NCCL: the weights after a skipped update are the plain strategy's (support/deepspeed_checks.py;
    on CPU in tests/test_reliability.py)."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    check_skipped_update(cfg_factory, monkeypatch, tmp_path, stage, "gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_resume_on_cuda_reaches_the_uninterrupted_weights(tmp_path, stage):
    """`ckpt_path=last` under DeepSpeed over NCCL (support/deepspeed_checks.py; on CPU in tests/test_resume.py)."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    check_deepspeed_resume(tmp_path, stage, "gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_on_one_cuda_gpu_equals_the_plain_strategy(tmp_path, stage):
    """Micro-batches, a binding clipping norm and beta > 0: DeepSpeed over NCCL on one GPU trains the same weights as
    Lightning's plain single-device strategy."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    plain = final_weights_of_cli_run(tmp_path / "plain", *EQUIVALENCE, "trainer.strategy=auto")
    # Hydra applies the group choice before key overrides, so EQUIVALENCE's GPU keys hold under trainer=<stage>.
    engine = final_weights_of_cli_run(tmp_path / stage, *EQUIVALENCE, f"trainer={stage}")
    assert_same_trained_weights(engine, plain)


def test_qwen2_5_omni_7b_thinker_shape_has_the_published_sizes():
    """avrl/assets/shapes/qwen2_5_omni_7b_thinker holds Qwen2.5-Omni-7B's thinker_config: built on the meta device,
    its language model (with the output head) has Qwen2.5-7B's parameters (that model card's 7.61B, 6.53B without
    the embeddings: the same LM), with its vision encoder Qwen2.5-VL-7B's 8.29B, and its audio encoder Qwen2-Audio's 32
    Whisper-large-v3 layers (the 7B Qwen2-Audio shape's encoder, whose learned position table Omni replaces by a
    sinusoidal one) plus the projection into the 3584-wide LM: 8.93B in all."""
    from transformers import (
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
    )

    config = Qwen2_5OmniThinkerConfig.from_pretrained(SHAPES / "qwen2_5_omni_7b_thinker")
    with torch.device("meta"):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration(config)
        qwen2_audio = Qwen2AudioForConditionalGeneration(Qwen2AudioConfig.from_pretrained(SHAPES / "qwen2_audio_7b"))

    def count(module):
        return sum(p.numel() for p in module.parameters())

    language_model = count(thinker.model.language_model) + count(thinker.lm_head)
    embeddings = count(thinker.model.language_model.embed_tokens) + count(thinker.lm_head)
    assert 7.61e9 <= language_model < 7.62e9  # the card's "7.61B"
    assert language_model - embeddings == pytest.approx(6.53e9, abs=0.005e9)  # its "Non-Embedding: 6.53B"
    assert language_model + count(thinker.model.visual) == pytest.approx(8.29e9, abs=0.005e9)
    whisper_layers = count(qwen2_audio.model.audio_tower) - qwen2_audio.model.audio_tower.embed_positions.weight.numel()
    audio = thinker.model.audio_tower
    own = count(audio.proj) + count(audio.ln_post) + count(audio.audio_bos_eos_token)
    assert count(audio) == whisper_layers - 2 * 1280 + own  # Qwen2-Audio's final layer_norm is Omni's ln_post
    assert count(thinker) == pytest.approx(8.93e9, abs=0.005e9)
    assert not config.text_config.tie_word_embeddings and config.text_config.rope_parameters["mrope_section"] == [
        16,
        24,
        24,
    ]


@pytest.mark.slow  # a CLI run in a subprocess: the full suite's
@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("trainer", ["gpu", "deepspeed_zero2", "deepspeed_zero3"])
def test_each_presets_bf16_moves_the_master_weights_at_the_papers_lr(tmp_path, trainer, accelerator):
    """Each GPU preset's precision (bf16-mixed), on CUDA and on CPU: one GRPO step at lr 1e-6 on bfloat16-loaded
    weights changes most of the fp32 master weights (bf16-true would round the update away). trainer=gpu keeps the
    masters in the module, DeepSpeed in its optimizer: both are read from the step's checkpoint, as task=eval reads
    them. (trainer=fsdp is refused on one device: tests/test_strategies.py.)"""
    from transformers import Qwen2AudioForConditionalGeneration

    from avrl.evaluation import checkpoint_weights
    from tests.support import run_cli

    if trainer.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    run_cli(
        f"hydra.run.dir={tmp_path}",
        f"trainer={trainer}",
        f"trainer.accelerator={accelerator}",
        "trainer.devices=1",
        "model.dtype=bfloat16",
        "optim.lr=1e-6",
        "optim.scheduler=constant",
        "optim.warmup_ratio=0",
        "trainer.max_steps=1",
        "checkpoint_every_n_steps=1",
        "trainer.val_check_interval=1",
        "data.val_size=4",
        "algorithm.beta=0.04",
        "algorithm.temperature=1.5",
        "logger=none",
        "trainer.enable_progress_bar=false",
    )
    masters = checkpoint_weights(tmp_path / "checkpoints/last.ckpt")
    # The run loaded the asset rounded to bfloat16: a master weight the step did not move still equals that.
    base = Qwen2AudioForConditionalGeneration.from_pretrained(
        ROOT / "avrl/assets/tiny_qwen2_audio", dtype=torch.bfloat16
    ).state_dict()
    assert masters.keys() == base.keys()
    moved = sum(not torch.equal(masters[n].float(), base[n].float()) for n in masters)
    assert moved > len(masters) // 2


def one_adamw_step(model, batch, ids, mask, ref, advantages, G, precision: str, device):
    """A GRPO update as GRPOModule runs it at num_iterations 1, under Lightning's precision plugin for `precision`:
    (the flattened gradient, the weight change of one AdamW step at the papers' lr 1e-6)."""
    import copy

    from lightning.pytorch.plugins.precision import MixedPrecision

    from avrl.algorithms.grpo import grpo_loss
    from avrl.models import families
    from avrl.policy import Policy
    from benchmarks.audio_step import FullLengthProcessor

    model = copy.deepcopy(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    policy = Policy(
        model, FullLengthProcessor(model.config.text_config.vocab_size), families.get("qwen2_audio"), shared_prefix=True
    )
    context = MixedPrecision(precision, device.type).forward_context() if precision != "32-true" else nullcontext()
    with context:
        logps, _ = policy.completion_logps(batch, policy.encode(batch), ids, mask, G)
        loss, _ = grpo_loss(logps, logps.detach(), ref, advantages, mask, beta=0.04, epsilon=0.2)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in trained])
    torch.optim.AdamW(trained, lr=1e-6).step()
    return grad, torch.cat([(p.detach() - b).flatten() for p, b in zip(trained, before)])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_bf16_mixed_step_matches_the_fp32_step_within_bf16_tolerance(device):
    """The same rollout (2 prompts x G 4, 32 tokens, 10 s of audio) updated once in fp32 and once under trainer=gpu's
    bf16-mixed (autocast, fp32 master weights): the gradients agree to bf16's accuracy through the model (measured
    on CPU: 2.9 % relative error), and AdamW at lr 1e-6 moves the same weights in the same direction (99.5 % of
    signs agree on CPU). A step that lost bf16's updates or its gradients' direction would be far outside these."""
    from transformers import Qwen2AudioForConditionalGeneration

    from avrl.models import families
    from avrl.policy import Policy
    from benchmarks.audio_step import FullLengthProcessor, media_batch

    device = torch.device(device)
    torch.manual_seed(0)
    # fp32 masters holding bf16-loaded values (model.dtype=bfloat16, then configure_model's upcast)
    model = (
        Qwen2AudioForConditionalGeneration.from_pretrained(ROOT / "avrl/assets/tiny_qwen2_audio", dtype=torch.bfloat16)
        .float()
        .to(device)
    )
    model.model.audio_tower.requires_grad_(False)
    G, length = 4, 32
    batch = media_batch(model.config, families.get("qwen2_audio"), 2, 10.0, device)
    policy = Policy(
        model, FullLengthProcessor(model.config.text_config.vocab_size), families.get("qwen2_audio"), shared_prefix=True
    )
    with torch.no_grad():
        media = policy.encode(batch)
        ids, mask = policy.generate(
            batch,
            media,
            G,
            {"max_new_tokens": length, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
            keys=list(range(2 * G)),
        )
        ref = policy.completion_logps(batch, media, ids, mask, G)[0] - 0.05 * torch.rand(2 * G, length, device=device)
    advantages = torch.randn(2 * G, device=device)

    grad32, step32 = one_adamw_step(model, batch, ids, mask, ref, advantages, G, "32-true", device)
    grad16, step16 = one_adamw_step(model, batch, ids, mask, ref, advantages, G, "bf16-mixed", device)
    assert ((grad16 - grad32).norm() / grad32.norm()).item() < 0.1
    moved32, moved16 = (step32 != 0).float().mean().item(), (step16 != 0).float().mean().item()
    assert moved32 > 0.5 and moved16 >= 0.99 * moved32
    assert (torch.sign(step16) == torch.sign(step32)).float().mean().item() > 0.98
