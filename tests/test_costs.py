"""What training costs, wired on the tiny model (avrl/costs.py, avrl/final_eval.py), against independent
computations: the KL from a float64 loop over the two models' logits (plain transformers forwards, one unpadded
sequence at a time) on the same completions; pass@k by enumerating k-subsets of each item's samples; the greedy
completion length from transformers' own generate; the parameters changed from a direct comparison of two state
dicts (LoRA: against PEFT's own merge)."""

import copy
import itertools

import numpy as np
import pytest
import torch

from avrl import costs, final_eval, measures
from avrl.datamodule import AudioQADataModule
from avrl.models import families, load_model, load_processor
from avrl.models.lora import apply_lora
from avrl.policy import Policy
from avrl.prompts import prompt_spec
from tests.support import compose


@pytest.fixture(scope="module")
def tiny():
    cfg = compose(["data.val_size=3", "data.eval_batch_size=1", "algorithm.max_completion_length=8"])
    processor, prompt = load_processor(cfg.model), prompt_spec(cfg)
    dm = AudioQADataModule(cfg.data, processor, prompt, splits=("val",))
    dm.setup()
    base = load_model(cfg.model).eval()
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "trained" model: every weight moved a little, a few moved more
        for p in tuned.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    family = families.get(cfg.model.family)
    return cfg, processor, prompt, dm, base, tuned, family


def policy(model, processor, family):
    return Policy(model, processor, family, shared_prefix=False)


def reference_logps(model, batch, ids: torch.Tensor) -> np.ndarray:
    """Per-token log-probs of `ids` after the (single, unpadded) prompt of `batch`, from one transformers forward
    of prompt + completion, log-softmax in float64."""
    input_ids = torch.cat([batch["input_ids"], ids[None]], dim=1)
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            input_features=batch["input_features"],
            feature_attention_mask=batch["feature_attention_mask"],
        ).logits[0]
    start = batch["input_ids"].shape[1]
    logps = torch.log_softmax(logits[start - 1 : -1].double(), dim=-1)
    return logps.gather(-1, ids[:, None]).squeeze(-1).numpy()


@pytest.mark.slow  # 12-30 s on 2 cores: the full suite runs it
def test_kl_to_base_equals_a_float64_loop_over_both_models_logits(tiny):
    cfg, processor, prompt, dm, base, tuned, family = tiny
    settings = costs.full_distribution(8, 1.0)
    samples = 3
    got = costs.kl_to_base(
        policy(base, processor, family), policy(tuned, processor, family), dm.val_dataloader(), samples, settings
    )
    # The same completions (the base's keyed draws), scored token by token here.
    k3_sum = k1_sum = 0.0
    tokens, per_seq_k3 = 0, []
    for batch in dm.val_dataloader():
        p = policy(base, processor, family)
        ids, mask = p.generate(
            batch, p.encode(batch), samples, settings, keys=costs.stream_keys(costs.KL_STREAM, batch["items"], samples)
        )
        for row in range(samples):
            n = int(mask[row].sum())
            lb = reference_logps(base, batch, ids[row, :n])
            lt = reference_logps(tuned, batch, ids[row, :n])
            log_r = lt - lb
            k3 = np.sum(np.exp(log_r) - 1 - log_r)
            k3_sum += k3
            k1_sum += np.sum(-log_r)
            tokens += n
            per_seq_k3.append((k3, n))
    assert got["k3"].n == 3 * samples
    assert got["k3"].mean == pytest.approx(k3_sum / tokens, rel=1e-4)
    assert got["k1"].mean == pytest.approx(k1_sum / tokens, rel=1e-3, abs=1e-6)
    s, lengths = np.array([k for k, _ in per_seq_k3]), np.array([n for _, n in per_seq_k3], dtype=float)
    ratio = s.sum() / lengths.sum()
    se = np.sqrt(((s - ratio * lengths) ** 2).sum() / (len(s) * (len(s) - 1))) / lengths.mean()
    assert got["k3"].se == pytest.approx(se, rel=1e-3)
    assert got["k3"].mean > 0
    # The base against itself: exactly 0.
    same = costs.kl_to_base(
        policy(base, processor, family), policy(base, processor, family), dm.val_dataloader(), 2, settings
    )
    assert same["k3"].mean == pytest.approx(0.0, abs=1e-9)


def test_greedy_lengths_count_transformers_generate_tokens_up_to_the_stop(tiny):
    cfg, processor, prompt, dm, base, tuned, family = tiny
    settings = costs.full_distribution(8, 1.0)
    got = costs.greedy_lengths(policy(tuned, processor, family), dm.val_dataloader(), settings)
    want = []
    for batch in dm.val_dataloader():
        out = tuned.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            input_features=batch["input_features"],
            feature_attention_mask=batch["feature_attention_mask"],
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=processor.stop_token_ids,
            pad_token_id=processor.tokenizer.pad_token_id,
        )[0, batch["input_ids"].shape[1] :].tolist()
        stops = [i for i, token in enumerate(out) if token in processor.stop_token_ids]
        want.append(stops[0] + 1 if stops else len(out))
    assert got == want


@pytest.mark.slow  # 12-30 s on 2 cores: the full suite runs it
def test_pass_at_k_of_the_final_evaluation_enumerates_each_items_samples(tiny):
    cfg, processor, prompt, dm, base, tuned, family = tiny
    scorer = final_eval.ModelScorer(tuned, processor, family, prompt, cfg.algorithm)
    settings = compose(["final_eval.pass_at_k.samples=4", "final_eval.pass_at_k.ks=[1,2,4,8]"]).final_eval
    metrics, per_item = final_eval.pass_at_k(settings, scorer, dm)
    results = costs.sampled_results(scorer.policy, dm.val_dataloader(), prompt, 4, costs.full_distribution(8, 1.0))
    assert set(per_item) == {"pass_at_1", "pass_at_2", "pass_at_4"}  # 8 > 4 samples: left out
    for k in (1, 2, 4):
        brute = {
            r["id"]: np.mean([any(s) for s in itertools.combinations(np.array(r["correct_per_sample"]) > 0.5, k)])
            for r in results
        }
        assert per_item[f"pass_at_{k}"] == pytest.approx(brute)
        assert metrics[f"final/pass_at_{k}"] == pytest.approx(np.mean(list(brute.values())))


def direct_change(before: dict, after: dict, threshold: float) -> tuple[float, float]:
    """Share of floating-point elements with |after - before| > threshold and the L2 norm of the difference, by a
    plain loop over the two state dicts in float64."""
    changed = total = 0
    squares = 0.0
    for key, a in before.items():
        if not a.is_floating_point():
            continue
        d = after[key].double() - a.double()
        changed += int((d.abs() > threshold).sum())
        total += d.numel()
        squares += float((d**2).sum())
    return changed / total, squares**0.5


def test_parameters_changed_against_a_direct_comparison_of_two_state_dicts(tiny):
    cfg, processor, prompt, dm, base, tuned, family = tiny
    before = costs.base_weights(cfg.model)
    assert all(v.dtype == torch.float32 for v in before.values() if v.is_floating_point())
    moved = copy.deepcopy(base)
    with torch.no_grad():
        first = next(moved.parameters())
        first.view(-1)[:10] += 1e-3  # ten elements above the threshold, ten below
        first.view(-1)[10:20] += 1e-7
    after = costs.trained_weights(moved, cfg.model)
    got = measures.parameter_change(before, after, 1e-5)
    share, norm = direct_change({k: v for k, v in base.state_dict().items()}, after, 1e-5)
    assert got["params_changed"] == pytest.approx(share) and got["update_norm"] == pytest.approx(norm, rel=1e-6)
    assert share * sum(v.numel() for v in before.values() if v.is_floating_point()) == pytest.approx(10)


def trained_lora(base, lora_cfg, std: float, seed: int):
    """LoRA adapters on a copy of `base` with B drawn from N(0, std) (fresh adapters have B = 0: no change)."""
    peft_model = apply_lora(copy.deepcopy(base), lora_cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std, generator=torch.Generator().manual_seed(seed))
    return peft_model


def test_lora_weights_are_the_merged_adapters_against_the_base(tiny):
    cfg, processor, prompt, dm, base, tuned, family = tiny
    lora_cfg = compose(["algorithm=lora"]).algorithm.lora
    peft_model = trained_lora(base, lora_cfg, std=0.01, seed=1)
    got = costs.trained_weights(peft_model, cfg.model, lora_cfg)
    want = copy.deepcopy(peft_model).merge_and_unload().state_dict()  # PEFT's own merge
    assert set(got) == set(want)
    for key in want:
        assert torch.allclose(got[key], want[key].float(), atol=1e-7), key
    change = measures.parameter_change(costs.base_weights(cfg.model), got, 0.0)
    assert change["params_changed"] == pytest.approx(direct_change(base.state_dict(), got, 0.0)[0])
    assert 0 < change["params_changed"] < 1


@pytest.mark.slow
def test_a_training_run_logs_the_costs_at_its_last_step(cfg_factory):
    """GRPO (its frozen reference is the base) with every cost measure on: final/* logged at the last step, pass@k
    per item in final_eval.json; the KL and the parameters changed recomputed here from the saved final model
    against the base loaded from the model config agree with what the run logged."""
    import json
    from pathlib import Path

    from avrl.train import train
    from tests.support import mlflow_runs

    cfg = cfg_factory(
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.val_size=4",
        "data.batch_size=2",
        "data.eval_batch_size=1",
        "algorithm.num_generations=2",
        "algorithm.max_completion_length=8",
        "trainer.enable_progress_bar=false",
        "final_eval.audio=[]",
        "final_eval.ood=false",
        "final_eval.completion_tokens=true",
        "final_eval.kl.samples=2",
        "final_eval.pass_at_k.samples=4",
        "final_eval.pass_at_k.ks=[1,4]",
        "final_eval.params.enabled=true",
    )
    metrics = train(cfg)
    client, (run,) = mlflow_runs(cfg.logger.tracking_uri)
    logged = run.data.metrics
    for key in ("kl_k3", "kl_k3_se", "kl_k1", "pass_at_1", "pass_at_4", "completion_tokens", "params_changed_share"):
        assert f"final/{key}" in logged and logged[f"final/{key}"] == pytest.approx(metrics[f"final/{key}"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "final/kl_k3")] == [2]
    per_item = json.loads((Path(cfg.output_dir) / "final_eval.json").read_text())
    assert len(per_item["pass_at_4"]) == 4 and logged["final/pass_at_1"] <= logged["final/pass_at_4"]

    processor, prompt = load_processor(cfg.model), prompt_spec(cfg)
    dm = AudioQADataModule(cfg.data, processor, prompt, splits=("val",))
    dm.setup()
    family = families.get(cfg.model.family)
    trained = load_model(cfg.model, path=str(Path(cfg.output_dir) / "final_model")).eval()
    base = load_model(cfg.model).eval()
    kl = costs.kl_to_base(
        policy(base, processor, family),
        policy(trained, processor, family),
        dm.val_dataloader(),
        2,
        costs.full_distribution(8, 1.0),
    )
    assert logged["final/kl_k3"] == pytest.approx(kl["k3"].mean, rel=1e-3)
    share, norm = direct_change(base.state_dict(), trained.state_dict(), 1e-5)
    assert logged["final/params_changed_share"] == pytest.approx(share) and logged[
        "final/update_norm"
    ] == pytest.approx(norm, rel=1e-5)


@pytest.mark.slow
def test_the_base_row_is_the_base_model_scored_once_on_the_sweeps_parent(tmp_path):
    """avrl/sweeps/base_row.py on the tiny base: val/accuracy equal to scoring the base model's greedy completions
    here, the retention benchmark (synthetic_prior: loudness and count items only) and pass@k logged on the sweep's
    parent run as base/<metric>; a second call finds them and adds nothing; the sweep still has no child run."""
    import json

    import mlflow

    from avrl.scoring import accuracy_metrics, score_batch
    from avrl.sweeps import base_row
    from avrl.tracking import PARENT_RUN_FILE

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = mlflow.tracking.MlflowClient(uri)
    parent = client.create_run(client.create_experiment("avrl"), run_name="sweep").info.run_id
    (tmp_path / PARENT_RUN_FILE).write_text(parent)
    overrides = ["data.val_size=4", "data.ood_size=3", "final_eval.audio=[]", "final_eval.benchmarks=[synthetic_prior]"]
    overrides += [
        "+eval.data.synthetic_prior.test_size=6",
        "final_eval.pass_at_k.samples=2",
        "final_eval.pass_at_k.ks=[1,2]",
    ]
    cfg = compose(overrides)
    assert base_row.evaluate_base(cfg, tmp_path, uri) is True
    run = client.get_run(parent)
    metrics = base_row.base_metrics(run)

    processor, prompt = load_processor(cfg.model), prompt_spec(cfg)
    dm = AudioQADataModule(cfg.data, processor, prompt, splits=("val",))
    dm.setup()
    base = policy(load_model(cfg.model).eval(), processor, family=families.get(cfg.model.family))
    settings = dict(max_new_tokens=cfg.algorithm.max_completion_length, temperature=1.0, top_p=1.0, top_k=0)
    with torch.no_grad():
        results = [r for batch in dm.val_dataloader() for r in score_batch(base, batch, prompt, settings)]
    assert metrics["val/accuracy"] == pytest.approx(accuracy_metrics(results, "val")["val/accuracy"])
    assert {"val_ood/accuracy", "eval/synthetic_prior/accuracy", "final/pass_at_1", "final/pass_at_2"} <= set(metrics)
    per_item = json.loads((tmp_path / "base" / "final_eval.json").read_text())
    assert len(per_item["eval/synthetic_prior"]) == 6 and len(per_item["val"]) == 4
    assert {k.split("/")[-1] for k in metrics if k.startswith("eval/synthetic_prior/accuracy/")} <= {
        "loudness",
        "count",
    }
    assert "base/final_eval.json" in {a.path for a in client.list_artifacts(parent, "base")}
    assert base_row.evaluate_base(cfg, tmp_path, uri) is False
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the parent alone: the base row is no run


@pytest.mark.slow
def test_the_validation_callback_logs_the_costs_at_each_validation(cfg_factory):
    """SFT (no reference model: the base loaded from the model config) with avrl.cost_callback.CostsAtValidation:
    at the step-2 validation, val/kl_k3 and val_eval/synthetic_prior/accuracy, the same model's as the final
    evaluation's final/kl_k3 and eval/synthetic_prior/accuracy at that step (same samples, same items)."""
    from avrl.train import train
    from tests.support import mlflow_runs

    cfg = cfg_factory(
        "algorithm=sft",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.val_size=3",
        "data.batch_size=2",
        "algorithm.max_completion_length=8",
        "trainer.enable_progress_bar=false",
        "save_final_model=false",
        "final_eval.audio=[]",
        "final_eval.ood=false",
        "final_eval.kl.samples=2",
        "final_eval.benchmarks=[synthetic_prior]",
        "+eval.data.synthetic_prior.test_size=4",
        "+callbacks.costs._target_=avrl.cost_callback.CostsAtValidation",
        "+callbacks.costs.kl_samples=${final_eval.kl.samples}",
        "+callbacks.costs.benchmarks=${final_eval.benchmarks}",
        "+callbacks.costs.eval_data=${eval.data}",
    )
    train(cfg)
    client, (run,) = mlflow_runs(cfg.logger.tracking_uri)

    def logged(metric):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}

    assert logged("val/kl_k3") == pytest.approx(logged("final/kl_k3")) and set(logged("val/kl_k3")) == {2}
    assert logged("val/kl_k3")[2] > 0
    prior = logged("val_eval/synthetic_prior/accuracy")
    assert prior == pytest.approx(logged("eval/synthetic_prior/accuracy")) and set(prior) == {2}


def test_final_eval_scores_each_ood_shift_as_its_own_split(tiny, tmp_path):
    cfg, processor, prompt, dm, base, tuned, family = tiny
    from omegaconf import open_dict

    from avrl.data.synthetic import make_item

    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.final_eval.audio, cfg.final_eval.ood, cfg.final_eval.ood_shifts = [], False, ["noise", "wording"]
        cfg.data.ood_size = 3
    scorer = final_eval.ModelScorer(base, processor, family, prompt, cfg.algorithm)
    metrics, per_item = final_eval.evaluate(cfg, scorer, dm, tmp_path, None, [], False)
    for shift in ("noise", "wording"):
        items = [make_item(0, f"ood_{shift}", i, tasks=tuple(cfg.data.tasks)) for i in range(3)]
        assert set(per_item[f"val_ood_{shift}"]) == {it.id for it in items}
        assert metrics[f"val_ood_{shift}/accuracy"] == pytest.approx(
            np.mean(list(per_item[f"val_ood_{shift}"].values()))
        )
    with open_dict(cfg):
        cfg.final_eval.ood_shifts = ["pink_noise"]
    with pytest.raises(ValueError, match="no shift of the synthetic data"):
        final_eval.evaluate(cfg, scorer, dm, tmp_path, None, [], False)


def test_a_lora_runs_kl_is_measured_against_its_adapters_switched_off(tiny):
    """final_eval.kl_metrics on a LoRA model (the base: the same model with its adapters off) equals the KL between
    the base loaded on its own and PEFT's merged model, on the same completions."""
    from types import SimpleNamespace

    cfg, processor, prompt, dm, base, tuned, family = tiny
    lora_cfg = compose(["algorithm=lora"]).algorithm.lora
    peft_model = trained_lora(base, lora_cfg, std=0.5, seed=2)
    module = SimpleNamespace(
        model=peft_model,
        processor=processor,
        family=family,
        model_cfg=cfg.model,
        device=torch.device("cpu"),
        policy=policy(peft_model, processor, family),
        algo=cfg.algorithm,
    )
    got = final_eval.kl_metrics(module, dm.val_dataloader(), 1, 8, 1.0)
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    want = costs.kl_to_base(policy(base, processor, family), policy(merged, processor, family), dm.val_dataloader(),
                            1, costs.full_distribution(8, 1.0))  # fmt: skip
    assert got["final/kl_k3"] == pytest.approx(want["k3"].mean, rel=1e-4) and got["final/kl_k3"] > 1e-4
    assert got["final/kl_k1"] == pytest.approx(want["k1"].mean, rel=1e-3, abs=1e-7)


@pytest.mark.slow
def test_the_validation_callback_scores_ood_and_its_shifts_before_the_last_step(cfg_factory):
    """`ood=true`: at the step-2 validation the callback logs val_ood/accuracy and val_ood_noise/accuracy; at the
    last step (4) the final evaluation does, the callback not again. With lr 0 the model at step 2 is the final
    one, so the two measurements must agree item for item (same splits, same greedy scoring)."""
    from avrl.train import train
    from tests.support import mlflow_runs

    cfg = cfg_factory(
        "algorithm=sft",
        "optim.lr=0.0",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "data.val_size=3",
        "data.ood_size=5",
        "data.batch_size=2",
        "algorithm.max_completion_length=8",
        "trainer.enable_progress_bar=false",
        "save_final_model=false",
        "final_eval.audio=[]",
        "final_eval.ood_shifts=[noise]",
        "+callbacks.costs._target_=avrl.cost_callback.CostsAtValidation",
        "+callbacks.costs.ood=${final_eval.ood}",
        "+callbacks.costs.ood_shifts=${final_eval.ood_shifts}",
    )
    train(cfg)
    client, (run,) = mlflow_runs(cfg.logger.tracking_uri)
    for metric in ("val_ood/accuracy", "val_ood_noise/accuracy", "val_ood_noise/format"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert sorted(m.step for m in history) == [2, 4], metric  # once each: the last one is final_eval's
        assert history[0].value == pytest.approx(history[1].value), metric
