"""Typed configuration: the dataclasses Hydra validates every YAML and override against.

Each dataclass field is a config key (`train.max_steps`, `model.n_head`, ...). Hydra merges
the YAML files of configs/ onto these schemas in struct mode, so a misspelled or mistyped key
fails at start. `__post_init__` checks one section at a time; `check_switches` refuses a key of
an optional section that is off (trainer/config/switches.py). Neither mutates the config: derived
values are computed where they are used.

This package is a leaf: it imports no component of trainer/. The rules that span sections and
components (`check_run`) and the model a run builds from a checkpoint (`resolve_model_config`)
live above the components they read, in trainer/preflight.py.
"""

from __future__ import annotations

from trainer.config.schema import (
    MODEL_TYPES,
    PRETRAINED_OVERRIDABLE,
    STRATEGIES,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoggerConfig,
    LoraConfig,
    ModelConfig,
    MonitorConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    SpikeConfig,
    TrainConfig,
    register_configs,
)
from trainer.config.switches import check_switches

__all__ = [
    "MODEL_TYPES", "PRETRAINED_OVERRIDABLE", "STRATEGIES", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "LoggerConfig",
    "LoraConfig", "ModelConfig", "MonitorConfig", "ObjectiveConfig", "OptimConfig", "ParallelConfig", "PrecisionConfig", "SpikeConfig",
    "TrainConfig", "check_switches", "register_configs",
]  # fmt: skip
