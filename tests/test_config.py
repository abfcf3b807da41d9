"""Every option of every config group composes and resolves; run.py --cfg job prints it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from avrl.config import MMAU_FILES
from tests.support import CONF, HANG_GUARD, ROOT, SHARED, compose


def options(group):
    """The selectable options of a group (files starting with "_" are bases that options extend)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


GROUPS = ["model", "algorithm", "prompt", "data", "reward"]


def test_groups_hold_what_the_product_promises():
    assert set(options("model")) >= {
        "tiny_qwen2_audio",
        "tiny_qwen2_5_omni",
        "tiny_qwen3_omni",
        "qwen2_audio_7b",
        "qwen2_5_omni_7b",
        "qwen2_5_omni_3b",
        "qwen3_omni_30b_a3b",
    }
    assert set(options("algorithm")) >= {"grpo", "sft", "lora"}
    assert set(options("prompt")) >= {"no_think", "think", "echoink"}
    assert set(options("data")) >= {"synthetic", "avqa", "avqa_r1", "mmau"}
    assert set(options("trainer")) >= {"cpu", "gpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"}
    assert set(options("logger")) == {"mlflow", "none"}


# One compose per option, the others at their defaults; the combinations that ship together are the presets
# (experiments/, composed below). The full cartesian product was ~1,000 composes of the same code path.
@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(override):
    cfg = compose([override])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    from avrl.models import families

    assert resolved["model"]["family"] in families.REGISTRY
    assert resolved["algorithm"]["_target_"].startswith("avrl.algorithms.")
    assert set(resolved["reward"]["weights"]) >= {"accuracy", "format"}


@pytest.mark.parametrize("trainer", options("trainer"))
@pytest.mark.parametrize("logger", options("logger"))
def test_trainer_and_logger_presets_compose(trainer, logger):
    cfg = compose([f"trainer={trainer}", f"logger={logger}"])
    assert cfg.trainer.accelerator in ("cpu", "gpu")
    assert OmegaConf.to_container(cfg.logger, resolve=True)["enabled"] == (logger == "mlflow")


@pytest.mark.parametrize("experiment", ["r1_aqa", "echoink_r1", "quickstart", "tiny_base"])
def test_experiment_presets(experiment):
    cfg = compose([f"experiment={experiment}"])
    if experiment == "r1_aqa":
        assert cfg.model.name_or_path == "Qwen/Qwen2-Audio-7B-Instruct"
        a = cfg.algorithm
        assert (a.num_generations, a.temperature, a.beta, a.max_completion_length) == (8, 1.0, 0.04, 256)
        assert (cfg.optim.lr, cfg.data.batch_size, a.micro_batch_prompts, cfg.trainer.max_steps) == (1e-6, 2, 1, 1000)
    if experiment == "echoink_r1":
        assert cfg.model.name_or_path == "Qwen/Qwen2.5-Omni-7B" and cfg.model.family == "qwen2_5_omni"
        a = cfg.algorithm
        assert (a.num_generations, a.beta, a.max_completion_length) == (
            16,
            0.001,
            1024,
        )  # the thinker cap: docs/papers.md
        assert (cfg.optim.lr, cfg.optim.scheduler, cfg.model.gradient_checkpointing) == (1e-6, "cosine", True)
        assert cfg.prompt.answer_style == "letter"


@pytest.mark.slow  # a CLI run in a subprocess: the full suite's
@pytest.mark.parametrize(
    "args",
    [
        [],
        ["model=qwen2_5_omni_7b", "data=avqa_r1", "prompt=echoink", "trainer=ddp"],
        ["experiment=r1_aqa"],
        ["algorithm=lora", "prompt=think", "data=mmau"],
    ],
)
def test_cli_prints_composed_config(args):
    out = subprocess.run(
        [sys.executable, "run.py", "--cfg", "job", *args], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD
    )
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert {"model", "algorithm", "prompt", "data", "trainer", "logger", "task", "seed", "ckpt_path"} <= set(printed)


@pytest.mark.slow  # a CLI run in a subprocess: the full suite's
@pytest.mark.parametrize(
    "sweep,params",
    [
        ("rl_vs_sft", {"algorithm": "grpo,sft,lora"}),
        ("think_ablation", {"prompt": "no_think,think"}),
        ("reward_weights", {"reward.weights.accuracy": "1.0,2.0", "reward.weights.format": "0.0,0.5,1.0"}),
    ],
)
def test_sweep_presets_set_the_grid(sweep, params):
    out = subprocess.run(
        [sys.executable, "run.py", "--cfg", "hydra", f"sweep={sweep}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["hydra"]["sweeper"]["params"] == params


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_presets_instantiate_their_strategy(trainer, caplog):
    from avrl import strategies

    cfg = compose([f"trainer={trainer}"])
    strategy = OmegaConf.to_container(cfg.trainer, resolve=True)["strategy"]
    if not isinstance(strategy, dict):
        assert strategy in ("auto", "ddp")
        return
    if "DeepSpeed" in strategy["_target_"]:
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    built = strategies.build(strategy, cfg)  # as build_trainer does
    assert type(built).__name__ == strategy["_target_"].rsplit(".", 1)[1]
    if trainer == "fsdp":
        assert "FSDP has never run with avrl" in caplog.text


def test_slurm_launcher_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed here")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.tasks_per_node == launcher.gpus_per_node


def test_typed_schemas_refuse_misspelt_keys_and_wrong_types(tmp_path):
    """model, optim and the LoRA block extend typed schemas (avrl/schemas.py): a misspelt key fails at compose time
    with its name, on the command line and in a YAML file, and a value of the wrong type is refused."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException

    for override, name in (
        ("model.dtipe=bfloat16", "dtipe"),
        ("optim.lrr=1e-4", "lrr"),
        ("algorithm.lora.rank=4", "rank"),
    ):
        with pytest.raises(ConfigCompositionException) as e:
            compose(["algorithm=grpo_lora", override])
        assert f"Key '{name}' not in" in str(e.value.__cause__ or e.value)
    with pytest.raises(ConfigCompositionException):
        compose(["optim.lr=fast"])
    # A YAML option of the user's own with a typo (found through hydra.searchpath, as a user adds models).
    (tmp_path / "model").mkdir()
    (tmp_path / "model/my_model.yaml").write_text(
        "defaults:\n  - _qwen2_audio\n  - _self_\nname: mine\nname_or_path: /models/mine\nfreeze_audio_encodr: true\n"
    )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as e:
            hydra_compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "model=my_model"])
    assert "freeze_audio_encodr" in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("version", sorted(MMAU_FILES))
def test_each_mmau_version_names_a_shared_file(version):
    """data.version picks one of the three MMAU test-mini files of ../shared/data (its README dates them)."""
    path = compose(["data=mmau", f"data.version={version}"]).data.test_path
    assert Path(path).name == MMAU_FILES[version]
    assert (SHARED / "data" / MMAU_FILES[version]).exists()


def test_the_2025_01_28_file_differs_from_the_original_revision_in_one_answer():
    """../shared/data/README.md: the 2025-03-25 revision changed the answer of one item only."""
    old, new = (
        {r["id"]: r for r in json.loads((SHARED / "data" / MMAU_FILES[v]).read_text())}
        for v in ("2025-01-28", "original")
    )
    assert set(old) == set(new)
    changed = [i for i in old if old[i] != new[i]]
    assert changed == ["1a5dd76a-7905-4a83-bd88-7ae26730656d"]
    assert (old[changed[0]]["answer"], new[changed[0]]["answer"]) == ("A bird chirping", "A cat meowing")
