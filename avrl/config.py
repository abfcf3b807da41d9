"""OmegaConf resolvers and small helpers for the Hydra config tree in conf/."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from avrl import schemas
from avrl.models.tiny import build

ASSETS = Path(__file__).parent / "assets"
CONF = Path(__file__).resolve().parents[1] / "conf"


def asset_path(name: str) -> str:
    """Path of a checkpoint shipped in avrl/assets (the tiny offline models)."""
    path = ASSETS / name
    if not path.exists():
        raise FileNotFoundError(f"no shipped asset {name!r} in {ASSETS}; build it with experiments/tiny_base.yaml")
    return str(path)


def tiny_init_path(family: str) -> str:
    """A randomly initialised tiny checkpoint of `family`, built on first use into avrl's cache folder."""
    path = Path.home() / ".cache" / "avrl" / f"tiny-init-{family}"
    if not (path / "config.json").exists():
        build(path, family)
    return str(path)


def conf_path(name: str) -> str:
    """Absolute path of a file shipped in conf/ (the papers' DeepSpeed JSONs), whatever the working directory."""
    path = CONF / name
    if not path.exists():
        raise FileNotFoundError(f"no file {name!r} in {CONF}")
    return str(path)


# MMAU test-mini versions (../shared/data/README.md), by the date the Sakshi113/MMAU repository held the file:
# 2025-01-28 (in the repository when R1-AQA was published), original (the original set's last revision,
# 2025-03-25: one answer differs from 2025-01-28) and v05.15.25 (revised; scores not comparable with the others).
MMAU_FILES = {
    "2025-01-28": "mmau-test-mini-2025-01-28.json",
    "original": "mmau-test-mini-original.json",
    "v05.15.25": "mmau-test-mini.json",
}


def mmau_file(version: str) -> str:
    """The metadata file name of an MMAU test-mini version (`data.version`)."""
    if version not in MMAU_FILES:
        raise ValueError(f"data.version={version!r}: MMAU test-mini versions are {sorted(MMAU_FILES)}")
    return MMAU_FILES[version]


def register_resolvers() -> None:
    schemas.register()  # the typed schemas the group YAMLs extend (avrl/schemas.py)
    if not OmegaConf.has_resolver("avrl_conf"):
        OmegaConf.register_new_resolver("avrl_conf", conf_path)
    if not OmegaConf.has_resolver("avrl_mmau_file"):
        OmegaConf.register_new_resolver("avrl_mmau_file", mmau_file)
    if not OmegaConf.has_resolver("avrl_asset"):
        OmegaConf.register_new_resolver("avrl_asset", asset_path)
    if not OmegaConf.has_resolver("avrl_tiny_init"):
        OmegaConf.register_new_resolver("avrl_tiny_init", tiny_init_path)


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, object]:
    """{"algorithm.beta": 0.04, ...} for MLflow params."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def hydra_config():
    """The running job's Hydra config; None when not under @hydra.main (tests that compose configs)."""
    return HydraConfig.get() if HydraConfig.initialized() else None


register_resolvers()
