"""`python -m trainer [overrides]`: check the config, then let Hydra run the training job.

Before Hydra creates a run directory, the command line is composed and validated here, so a
misspelled key, a wrong type or an impossible shape stops the run with one line naming the
problem (exit code 2), and an existing run directory is never written over. `--cfg` and `--info`
pass the same checks before Hydra prints; `--help` prints the harness's own help
(trainer/config/help.py: groups and every key with its description), then Hydra's flags.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.config import Config, ConfigError, register_configs
from trainer.config.load import CONFIG_DIR, compose_config, to_config
from trainer.config.load import one_line as _one_line
from trainer.loggers import console_only_on_rank0
from trainer.parallel.dist import (
    barrier,
    broadcast_string,
    default_run_dir,
    env_rank,
    env_world_size,
    exit_process,
    init_distributed,
)
from trainer.preflight import check_run

register_configs()


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


def parse_args(argv: list[str]) -> argparse.Namespace | None:
    """The command line as Hydra reads it (flags, and `overrides`); None when Hydra will refuse it itself."""
    from hydra._internal.utils import get_args_parser

    quiet = io.StringIO()  # argparse's own messages (an unknown flag, --version) are Hydra's to print
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        try:
            return get_args_parser().parse_args(argv)
        except SystemExit:
            return None


def _checked_by_us(args: argparse.Namespace | None) -> bool:
    """Whether the command composes configs/ into a job (a run, a sweep, --cfg, --info): then it is checked."""
    return not (
        args is None
        or args.help
        or args.hydra_help
        or args.shell_completion
        or args.experimental_rerun
        or any((args.config_path, args.config_name, args.config_dir))  # another config than configs/
    )


def preflight(argv: list[str]) -> list[str]:
    """Validate the command line before Hydra starts; raise ConfigError with a one-line reason.

    Returns the arguments to hand to Hydra: under torchrun, with `hydra.run.dir` fixed by
    rank 0 so every rank writes into the same run directory. `--cfg` and `--info` get the same
    checks as a run (an invalid config is not printed as if it would run), then Hydra prints.
    """
    args = parse_args(argv)
    if not _checked_by_us(args):
        return argv  # --hydra-help, --version, another config dir ...: Hydra's own business
    cfg, composed = _compose_one_line(args.overrides)
    check_paths(cfg)
    check_run(cfg, env_world_size(), will_use_gpu(cfg))
    if args.multirun or args.cfg or args.info:
        return argv  # no run dir of its own to check (a sweep's jobs each get a new one)
    run_dir = OmegaConf.select(composed, "hydra.run.dir")
    if env_world_size() > 1:
        init_distributed(cfg.parallel.timeout_s)
        if not any(a.startswith("hydra.run.dir=") for a in args.overrides):
            run_dir = broadcast_string(default_run_dir())  # collective: rank 0 decides
            argv = [*argv, f"hydra.run.dir={run_dir}"]
    holds_a_run = (Path(run_dir) / "metrics.jsonl").exists() or (Path(run_dir) / "checkpoints").exists()
    problem = ""
    if env_rank() == 0 and holds_a_run and cfg.train.resume == "none":
        problem = (
            f"run dir {run_dir} already holds a run: continue it with train.resume=auto, or choose another "
            "hydra.run.dir (nothing there was changed)"
        )
    if env_world_size() > 1:  # collective: every rank stops on rank 0's finding (none waits for a rank gone)
        problem = broadcast_string(problem)
    if problem:
        raise ConfigError(problem)
    barrier()  # collective: no rank writes before rank 0 has checked the run dir
    return argv


def _compose_one_line(overrides: list[str]) -> tuple[Config, DictConfig]:
    """compose_config on the command's overrides (a sweep by its first values); any error as one line."""
    try:
        return compose_config(_first_of_sweeps(overrides))
    except Exception as error:  # Hydra and OmegaConf raise many types; all end here as one line
        raise ConfigError(_one_line(error)) from error


def app_help(argv: list[str]) -> str:
    """`--help`: the harness's help (groups, every key with its description and this command's value),
    then Hydra's flags. Overrides on the same command line show their values (`model=gpt2 --help`)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import get_args_parser

    from trainer.config.help import help_text

    cfg, composed = _compose_one_line(parse_args(argv).overrides)
    groups = OmegaConf.to_container(composed.hydra.runtime.choices)
    flags = Hydra.format_args_help(get_args_parser()).splitlines()
    hydra_flags = "\n".join(line for line in flags if line[:1] not in ("", " "))  # each flag's first line
    return (
        f"{help_text(CONFIG_DIR, cfg, groups)}\n"
        f"Hydra's flags (`python -m trainer --hydra-help` for the rest of Hydra's help):\n{hydra_flags}\n"
    )


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
    if cfg.data.source == "shards":  # each shard directory whole and finished (meta.json and sizes only)
        from trainer.data.shards import open_sources

        open_sources(cfg.data)


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
    from trainer.checkpoint import CheckpointWriteError
    from trainer.loop import TrainingError, train
    from trainer.objectives.rewards import RewardError
    from trainer.parallel.dist import CollectiveError
    from trainer.preemption import Preempted

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
    except (TrainingError, CheckpointWriteError) as error:  # every rank has the same line: rank 0 says it
        logging.getLogger("trainer").error(str(error))
        if env_rank() == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(3)
    # this rank's own line (which collective, waiting for whom; which reward function failed on its completions)
    except (CollectiveError, RewardError) as error:
        logging.getLogger("trainer").error(str(error))
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(3)
    except Preempted:  # saved and closed: exit code 75 for a restart / requeue (trainer/preemption.py)
        raise
    except BaseException:
        logging.getLogger("trainer").exception(f"rank {env_rank()} failed")  # into this rank's log file
        raise


def main() -> None:
    """The command line, for in-process callers: returns, or raises SystemExit with the exit code.
    `python -m trainer` and the `trainer` script end through `entry`, which exits the process."""
    try:
        args = parse_args(sys.argv[1:])
        if args is not None and args.help:
            text = app_help(sys.argv[1:])
            if env_rank() == 0:
                print(text, end="")
            return
        sys.argv[1:] = preflight(sys.argv[1:])
    except ConfigError as error:
        if env_rank() == 0:  # one line, not one per rank
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    _run()


def entry() -> None:
    """Entry point of `python -m trainer` and the `trainer` console script: main, then the process ends
    through exit_process (every rank saved and closed: no interpreter teardown under live gloo threads).
    Never called in-process: it ends the caller's process too."""
    try:
        main()
    except SystemExit as stop:  # sys.exit(2 / 3) above, Preempted (75), Hydra's exit after a traceback
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    else:
        code = 0
    exit_process(code)


if __name__ == "__main__":
    entry()
