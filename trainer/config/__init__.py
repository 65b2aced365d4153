"""Typed configuration: the dataclasses Hydra validates every YAML and override against.

Each dataclass field is a config key (`train.max_steps`, `model.n_head`, ...). Hydra merges
the YAML files of configs/ onto these schemas in struct mode, so a misspelled or mistyped key
fails at start. `__post_init__` checks one section at a time; `check_run` checks what spans
sections. Neither mutates the config: derived values are computed where they are used.
`resolve_model_config` gives the model a run builds: with model.pretrained, the checkpoint's
architecture with the PRETRAINED_OVERRIDABLE fields applied.
"""

from __future__ import annotations

from trainer.config.checks import PRETRAINED_OVERRIDABLE, check_run, resolve_model_config
from trainer.config.schema import (
    STRATEGIES,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LoggerConfig,
    LoraConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    SpikeConfig,
    TrainConfig,
    register_configs,
)

__all__ = [
    "PRETRAINED_OVERRIDABLE", "STRATEGIES", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LoggerConfig",
    "LoraConfig", "ModelConfig", "MonitorConfig", "OptimConfig", "ParallelConfig", "PrecisionConfig", "SpikeConfig",
    "TrainConfig", "check_run", "register_configs", "resolve_model_config",
]  # fmt: skip
