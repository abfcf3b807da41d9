"""The `algorithm` and `data` groups extend typed schemas (avrl/schemas.py: AlgorithmConfig, DataConfig), as `model`
and `optim` do: every preset composes under its schema, a misspelt key in a preset or on the command line is refused
naming the key, interpolated defaults still resolve, and the schema's defaults are the values the code runs with."""

import subprocess
import sys

import pytest
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from avrl.schemas import AlgorithmConfig, DataConfig, LoraConfig
from tests.support import CONF, HANG_GUARD, ROOT, compose


def options(folder):
    """The selectable presets of a group folder (files starting with "_" are bases that options extend)."""
    return sorted(p.stem for p in (CONF / folder).glob("*.yaml") if not p.stem.startswith("_"))


def compose_with(searchpath, overrides, hydra_config=False):
    """Compose with a folder of the user's own configs on Hydra's search path (as a user adds presets)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = [f"hydra.searchpath=[file://{searchpath}]", "output_dir=/tmp/avrl-test", *overrides]
        return hydra_compose("config", overrides=overrides, return_hydra_config=hydra_config)


def refused(error) -> str:
    """The text of a composition error and of its cause (Hydra wraps OmegaConf's)."""
    return str(error.value) + str(error.value.__cause__)


def job_overrides(params) -> list[list[str]]:
    """The overrides a sweeper gives its jobs for each swept key of `hydra.sweeper.params`: every value of a list,
    choice or range, and both ends of an interval (Optuna's), one key at a time."""
    parser = OverridesParser.create()
    jobs = []
    for key, value in params.items():
        (override,) = parser.parse_overrides([f"{key}={value}"])
        swept = override.value()
        if isinstance(swept, ChoiceSweep):
            values = swept.list
        elif isinstance(swept, RangeSweep):
            values = list(override.sweep_iterator())
        elif isinstance(swept, IntervalSweep):
            values = [swept.start, swept.end]
        else:
            values = [swept]
        jobs += [[f"{key}={v}"] for v in values]
    return jobs


def assert_typed(cfg):
    assert OmegaConf.get_type(cfg.algorithm) is AlgorithmConfig
    assert OmegaConf.get_type(cfg.data) is DataConfig
    if cfg.algorithm.lora is not None:
        assert OmegaConf.get_type(cfg.algorithm.lora) is LoraConfig
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves, and to its field's type


# --------------------------------------------------------------------------------- every preset composes
@pytest.mark.parametrize(
    "override", [f"algorithm={o}" for o in options("algorithm")] + [f"data={o}" for o in options("data")]
)
def test_every_algorithm_and_data_option_composes_under_its_schema(override):
    assert_typed(compose([override]))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_preset_composes_under_the_schemas(experiment):
    assert_typed(compose([f"experiment={experiment}"]))


@pytest.mark.parametrize("experiment", ["r1_aqa", "echoink_r1"])
@pytest.mark.parametrize("algorithm", ["grpo", "sft", "lora"])
def test_the_rl_vs_sft_sweep_composes_sft_with_a_paper_presets_grpo_keys(experiment, algorithm):
    """sweeps/rl_vs_sft.yaml runs algorithm=grpo,sft,lora under a paper preset, whose `algorithm:` block sets GRPO's
    keys: one AlgorithmConfig holds them, so each arm composes, with the preset's values."""
    cfg = compose([f"experiment={experiment}", "sweep=rl_vs_sft", f"algorithm={algorithm}"])
    assert_typed(cfg)
    preset = yaml.safe_load((ROOT / "experiments" / f"{experiment}.yaml").read_text())["algorithm"]
    assert {k: cfg.algorithm[k] for k in preset} == preset
    assert cfg.algorithm.name == algorithm
    assert cfg.algorithm.shared_prefix is (algorithm == "grpo")  # sft.yaml (and lora, extending it) sets false


@pytest.mark.parametrize("sweep", ["rl_vs_sft", "think_ablation"])
def test_the_embedded_sweeps_run_in_the_toy_world_unless_an_experiment_is_named(sweep):
    """docs/toy_world.md: alone, each embedded sweep composes experiments/toy_world.yaml (the prior-skill base, pitch
    only, retention on the prior skills, its seeds and steps); with `experiment=r1_aqa` the paper's world replaces
    it whole, none of the toy world's keys left behind."""
    toy = yaml.safe_load((ROOT / "experiments" / "toy_world.yaml").read_text())
    alone = compose([f"sweep={sweep}"])
    assert alone.model.name_or_path.endswith("tiny_qwen2_audio_prior")
    assert list(alone.data.tasks) == toy["data"]["tasks"] == ["pitch"]
    assert list(alone.final_eval.benchmarks) == ["synthetic_prior"]
    assert alone.seeds == toy["seeds"] and alone.trainer.max_steps == toy["trainer"]["max_steps"]
    paper = compose([f"sweep={sweep}", "experiment=r1_aqa"])
    assert paper.model.name_or_path == "Qwen/Qwen2-Audio-7B-Instruct" and paper.data.name == "avqa"
    assert paper.seeds == 1 and list(paper.final_eval.benchmarks) == [] and paper.trainer.max_steps != 165
    assert list(paper.final_eval.ood_shifts)  # the sweep's own measures stay (a real data option scores none)


def test_a_paper_presets_data_keys_meet_another_data_option():
    """experiments/r1_aqa.yaml trains on data=avqa and sets data.version for its evaluation with data=mmau."""
    cfg = compose(["experiment=r1_aqa", "task=eval", "data=mmau"])
    assert_typed(cfg)
    assert cfg.data.version == "2025-01-28" and cfg.data.test_path.endswith("mmau-test-mini-2025-01-28.json")


@pytest.mark.parametrize(
    "preset", [f"sweep={o}" for o in options("sweep")] + [f"search={o}" for o in options("search")]
)
def test_every_sweep_and_search_presets_jobs_compose_under_the_schemas(preset):
    cfg = compose_with(ROOT / "conf", [preset], hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) or {}
    assert params
    for overrides in job_overrides(params):
        assert_typed(compose([preset, *overrides]))


# ---------------------------------------------------------------------------------- a typo is refused
@pytest.mark.parametrize(
    "overrides,key",
    [
        (["algorithm.num_generatons=8"], "num_generatons"),
        (["algorithm=sft", "algorithm.shared_prefx=true"], "shared_prefx"),
        (["algorithm=lora", "algorithm.lora.rnk=4"], "rnk"),
        (["data.bach_size=4"], "bach_size"),
        (["data=mmau", "data.verion=original"], "verion"),
    ],
)
def test_a_misspelt_key_on_the_command_line_is_refused_naming_it(overrides, key):
    with pytest.raises(ConfigCompositionException) as e:
        compose(overrides)
    assert f"Key '{key}' not in" in refused(e)


@pytest.mark.parametrize(
    "path,text,selection,key",
    [
        (
            "algorithm/my_grpo.yaml",
            "defaults:\n  - grpo\n  - _self_\nname: my_grpo\nnum_generatons: 8\n",
            "algorithm=my_grpo",
            "num_generatons",
        ),
        (
            "algorithm/my_sft.yaml",
            "defaults:\n  - sft\n  - _self_\nname: my_sft\nvalidate_at_strat: false\n",
            "algorithm=my_sft",
            "validate_at_strat",
        ),
        (
            "data/my_data.yaml",
            "defaults:\n  - avqa\n  - _self_\nname: my_data\ntrian_path: /data/train.jsonl\n",
            "data=my_data",
            "trian_path",
        ),
        (
            "experiment/my_paper.yaml",
            "# @package _global_\ndefaults:\n  - override /algorithm: grpo\n"
            "algorithm:\n  num_generations: 8\n  betta: 0.01\n",
            "experiment=my_paper",
            "betta",
        ),
        (
            "experiment/my_data_paper.yaml",
            "# @package _global_\ndata:\n  batch_size: 2\n  eval_bach_size: 8\n",
            "experiment=my_data_paper",
            "eval_bach_size",
        ),
    ],
)
def test_a_misspelt_key_in_a_preset_is_refused_naming_it(tmp_path, path, text, selection, key):
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_text(text)
    with pytest.raises(ConfigCompositionException) as e:
        compose_with(tmp_path, [selection])
    assert key in refused(e)


def test_a_misspelt_key_in_a_sweep_preset_is_refused_when_its_jobs_compose(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep/my_grid.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n"
        "      algorithm.betta: 0.0,0.04\n      data.bach_size: 2,4\n"
    )
    cfg = compose_with(tmp_path, ["sweep=my_grid"], hydra_config=True)
    for overrides in job_overrides(OmegaConf.to_container(cfg.hydra.sweeper.params)):
        with pytest.raises(ConfigCompositionException) as e:
            compose_with(tmp_path, ["sweep=my_grid", *overrides])
        assert overrides[0].split("=")[0].split(".")[1] in refused(e)


def test_a_value_of_the_wrong_type_is_refused():
    for override in ("algorithm.num_generations=many", "data.batch_size=big", "algorithm.shared_prefix=maybe"):
        with pytest.raises(ConfigCompositionException):
            compose([override])


# ------------------------------------------------------------------------------------- interpolations
def test_interpolated_defaults_resolve_and_follow_their_source():
    cfg = compose()
    assert cfg.algorithm.sampling_seed == cfg.seed == 42
    assert cfg.data.ood_size == cfg.data.val_size == 96
    cfg = compose(["seed=7", "data.val_size=10"])
    assert (cfg.algorithm.sampling_seed, cfg.data.ood_size) == (7, 10)
    assert compose(["algorithm=sft", "seed=3"]).algorithm.sampling_seed == 3
    assert compose(["data.ood_size=0"]).data.ood_size == 0


def test_cli_prints_the_interpolations_as_written():
    out = subprocess.run(
        [sys.executable, "run.py", "--cfg", "job"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD
    )
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["algorithm"]["sampling_seed"] == "${seed}"
    assert printed["data"]["ood_size"] == "${.val_size}"


# ------------------------------------------------------------------------ the code runs with the schema
def module_of(*overrides):
    """The configured LightningModule, with a stand-in model (nothing is loaded)."""
    import torch

    from avrl.train import build_module

    cfg = compose(list(overrides))
    return cfg, build_module(cfg, processor=None, prompt=None, model=torch.nn.Linear(1, 1))


def test_the_schemas_defaults_are_the_default_runs():
    """The default run (algorithm=grpo, data=synthetic) sets nothing the schema does not: its values are the
    schema's, and they are what the module runs with (shared_prefix true and the run's seed for the sampling
    streams, where the code used to fall back on false and 0)."""
    from avrl.data.items import QAItem
    from avrl.datamodule import build_split
    from avrl.rollout import sampling_settings
    from avrl.sampling import rollout_keys

    cfg, module = module_of()
    algorithm = OmegaConf.structured(AlgorithmConfig(name="grpo", _target_="avrl.algorithms.grpo.GRPOModule"))
    algorithm.sampling_seed = cfg.seed  # the schema's ${seed}, resolved against the run's config
    assert OmegaConf.to_container(cfg.algorithm, resolve=True) == OmegaConf.to_container(algorithm)
    data = OmegaConf.structured(DataConfig(name="synthetic"))
    data.ood_size = data.val_size
    assert OmegaConf.to_container(cfg.data, resolve=True) == OmegaConf.to_container(data)

    assert AlgorithmConfig.shared_prefix is True and module.policy.shared_prefix is True
    items = [QAItem(id="a", question="q", choices=["x", "y"], answer_index=0)]
    assert module.rollout_keys(items, 4) == rollout_keys(42, 0, items, 4) != rollout_keys(0, 0, items, 4)
    assert sampling_settings(module.algo) == {
        "max_new_tokens": 16,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "repetition_penalty": 1.0,
        "min_p": 0.0,
    }
    assert len(build_split(cfg.data, "ood")[0]) == 96  # ood_size: ${.val_size}


def test_sft_runs_with_its_presets_values():
    """SFT reads the schema's shared keys; its preset sets shared_prefix false (one target per prompt), the value
    SFT always ran with."""
    cfg, module = module_of("algorithm=sft")
    assert type(module).__name__ == "SFTModule"
    assert module.policy.shared_prefix is False
    assert (module.algo.num_iterations, module.algo.top_k, module.algo.sampling_seed) == (1, 0, cfg.seed)
