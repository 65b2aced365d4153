"""Loading a config: configs/ and command-line overrides composed into the typed `Config`
(`compose_config`), a composed DictConfig made typed (`to_config`), and Hydra's and OmegaConf's
many-line errors as one line (`one_line`). Used by `python -m trainer` and the tools that take
the same overrides (trainer.diagnose, trainer.estimate, trainer.data.preview, the benchmarks).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from trainer.config.schema import Config, ConfigError, register_configs

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"


def one_line(error: BaseException) -> str:
    """Turn Hydra / OmegaConf errors (several lines, a chained cause) into one readable line."""
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for err in chain:
        if isinstance(err, ConfigError):
            return str(err)
        full_key = getattr(err, "full_key", None)
        if isinstance(err, OmegaConfBaseException) and full_key:
            first = str(getattr(err, "msg", err)).strip().splitlines()[0]
            if isinstance(err, ConfigKeyError) or " not in " in first:
                return (
                    f"unknown config key '{full_key}': check its spelling "
                    "(`python -m trainer --cfg job` prints every key)"
                )
            return f"{full_key}: {first}"
    text = str(chain[0]).split("Config search path")[0]  # Hydra appends its search path
    lines = [line.strip() for line in text.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    return " ".join(lines)


def compose_config(overrides: list[str]) -> tuple[Config, DictConfig]:
    """Compose configs/ with overrides into the typed Config (raises ConfigError on bad input)."""
    from hydra import compose, initialize_config_dir

    register_configs()  # the schema that configs/config.yaml lists first in its defaults
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        composed = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    return to_config(composed), composed


def to_config(cfg: DictConfig) -> Config:
    """The typed dataclasses (their __post_init__ checks run here)."""
    if "hydra" in cfg:  # composed with return_hydra_config: drop Hydra's own node, keep the schema
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
    return OmegaConf.to_object(cfg)
