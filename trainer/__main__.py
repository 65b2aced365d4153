"""`python -m trainer [overrides]`: check the config, then let Hydra run the training job.

Before Hydra creates a run directory, the command line is composed and validated here, so a
misspelled key, a wrong type or an impossible shape stops the run with one line naming the
problem (exit code 2), and an existing run directory is never written over.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from trainer.config import Config, ConfigError, check_run, register_configs
from trainer.loggers import console_only_on_rank0
from trainer.parallel.dist import (
    barrier,
    broadcast_string,
    default_run_dir,
    env_rank,
    env_world_size,
    init_distributed,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
register_configs()


def _one_line(error: BaseException) -> str:
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


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """For validation, a multirun sweep (`optim.lr=1e-3,3e-4`) stands in by its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            out.append(f"{override.get_key_element()}={first}")
        else:
            out.append(override.input_line)
    return out


def compose_config(overrides: list[str]) -> tuple[Config, DictConfig]:
    """Compose configs/ with overrides into the typed Config (raises ConfigError on bad input)."""
    from hydra import compose, initialize_config_dir

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


def preflight(argv: list[str]) -> list[str]:
    """Validate the command line before Hydra starts; raise ConfigError with a one-line reason.

    Returns the arguments to hand to Hydra: under torchrun, with `hydra.run.dir` fixed by
    rank 0 so every rank writes into the same run directory.
    """
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in ("-m", "--multirun") for f in flags):
        return argv  # --help, --cfg, --info ...: Hydra's own business
    overrides = [a for a in argv if not a.startswith("-")]
    multirun = bool(flags)
    try:
        cfg, composed = compose_config(_first_of_sweeps(overrides))
    except Exception as error:  # Hydra and OmegaConf raise many types; all end here as one line
        raise ConfigError(_one_line(error)) from error
    check_paths(cfg)
    check_run(cfg, env_world_size(), will_use_gpu(cfg))
    if multirun:
        return argv
    run_dir = OmegaConf.select(composed, "hydra.run.dir")
    if env_world_size() > 1:
        init_distributed(cfg.parallel.timeout_s)
        if not any(a.startswith("hydra.run.dir=") for a in overrides):
            run_dir = broadcast_string(default_run_dir())  # collective: rank 0 decides
            argv = [*argv, f"hydra.run.dir={run_dir}"]
    holds_a_run = (Path(run_dir) / "metrics.jsonl").exists() or (Path(run_dir) / "checkpoints").exists()
    if env_rank() == 0 and holds_a_run and cfg.train.resume == "none":
        raise ConfigError(
            f"run dir {run_dir} already holds a run: continue it with train.resume=auto, or choose another "
            "hydra.run.dir (nothing there was changed)"
        )
    barrier()  # collective: no rank writes before rank 0 has checked the run dir
    return argv


def check_paths(cfg: Config) -> None:
    """Local paths named in the config must exist before any work starts."""
    from trainer.data.sources import local_paths  # a glob in data.path: checked by what it matches

    if (
        cfg.data.source == "files"
        and local_paths(cfg.data.path) is None
        and not Path(cfg.data.path).expanduser().exists()
    ):
        raise ConfigError(
            f"data.path={cfg.data.path} does not exist: point it at a text file or a directory of text files"
        )
    if cfg.model.pretrained:
        check_pretrained_dir(cfg.model.pretrained)


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_pretrained_dir(pretrained: str) -> None:
    """model.pretrained must be a local Hugging Face checkpoint: config.json and weights."""
    path = Path(pretrained).expanduser()
    fix = "point it at a local Hugging Face checkpoint (a save_pretrained directory: config.json + safetensors)"
    if not path.is_dir():
        raise ConfigError(f"model.pretrained={pretrained} is not a directory: {fix}")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.pretrained={pretrained} has no config.json: {fix}")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"model.pretrained={pretrained} holds no weights ({', '.join(WEIGHT_FILES)}): {fix}")


def will_use_gpu(cfg: Config) -> bool:
    """Whether this run computes on a GPU (the `has_gpu` of check_run)."""
    return torch.cuda.is_available() and cfg.train.device != "cpu"


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def _run(cfg: DictConfig) -> None:
    from trainer.loop import TrainingError, train

    if env_rank() != 0:
        console_only_on_rank0()  # other ranks log to their own file in the run dir
    try:
        config = to_config(cfg)
        check_paths(config)
        train(config, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as error:  # found while building: may concern this rank alone, so every rank says it
        where = f" (rank {env_rank()})" if env_rank() else ""
        print(f"error{where}: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingError as error:
        logging.getLogger("trainer").error(str(error))
        if env_rank() == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(3)
    except BaseException:
        logging.getLogger("trainer").exception(f"rank {env_rank()} failed")  # into this rank's log file
        raise


def main() -> None:
    """Entry point of `python -m trainer` and the `trainer` console script."""
    try:
        sys.argv[1:] = preflight(sys.argv[1:])
    except ConfigError as error:
        if env_rank() == 0:  # one line, not one per rank
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    _run()


if __name__ == "__main__":
    main()
