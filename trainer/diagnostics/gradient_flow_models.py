"""The GPTs that `python -m trainer.diagnose gradient-flow` measures, and the batch it measures them on.

From Hydra overrides: the model the config builds, at initialisation (train.seed). From a run
directory (--run): the model of its newest verified checkpoint (read as trainer.export reads it,
in this one process), and the same model at the initialisation the run's seed draws (the run's
.hydra/config.yaml; the exact init when this device type is the run's). The batch: random tokens
from --seed, or with --data the first sequences of the config's validation split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import Config, ConfigError, ModelConfig, TrainConfig
from trainer.config.load import compose_config, one_line
from trainer.diagnostics.gradient_flow import model_gradient_flow
from trainer.model.gpt import GPT
from trainer.preflight import resolve_model_config

MAX_DEFAULT_SEQ_LEN = 128  # enough tokens to see the gradient's shape; --seq-len for more


class FlowInputError(Exception):
    """The tool cannot measure what was asked (its message is one line naming the fix)."""


def gpt_study(args: argparse.Namespace) -> dict[str, Any]:
    """The GPT study the command line asks for: --run RUN_DIR, else the overrides' config."""
    device = pick_device(args.device)
    if args.run is not None:
        return run_study(args.run, args, device)
    return config_study(args.overrides, args, device)


def config_study(overrides: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The configured GPT at initialisation."""
    try:
        cfg, _ = compose_config(overrides)
        seq_len = args.seq_len or min(cfg.train.seq_len, MAX_DEFAULT_SEQ_LEN)
        if args.data:
            batch, vocab, source = data_batch(cfg, args.batch_size or 4, seq_len)
        else:
            batch, vocab, source = None, guess_vocab(cfg, args.vocab), f"random tokens (seed {args.seed})"
        model_cfg = resolve_model_config(cfg.model, vocab)  # a pretrained model's vocabulary: its config.json
        batch = batch or random_batch(model_cfg.vocab_size, args.batch_size or 4, seq_len, args.seed)
        if seq_len > model_cfg.block_size:
            raise ConfigError(
                f"--seq-len {seq_len} exceeds model.block_size={model_cfg.block_size}: give a shorter one"
            )
        init = initial_model(model_cfg, cfg.train.seed, device)
    except Exception as error:  # Hydra, OmegaConf, ConfigError, a shape GPT rejects: one line
        raise FlowInputError(one_line(error)) from error
    states = [{"state": "init", "step": 0, "seed": cfg.train.seed, **measure(init, batch, device)}]
    return _result(model_cfg, states, batch, source, device)


def run_study(where: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """A run's GPT at its newest verified checkpoint and at its initialisation."""
    from trainer.export import ExportError, find_checkpoint, load_model

    try:
        checkpoint = find_checkpoint(where, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
        trained, info = load_model(checkpoint)
    except ExportError as error:
        raise FlowInputError(str(error)) from error
    if "lora" in info:
        raise FlowInputError(
            f"{checkpoint} holds LoRA adapters: measure the merged model instead (python -m trainer.export "
            f"{where} --merge --out DIR, then model.pretrained=DIR)"
        )
    run_dir, model_cfg = checkpoint.parent.parent, trained.cfg  # run_dir/checkpoints/step_N
    try:
        raw = _hydra_config(run_dir)
        seed = int(raw.train.seed) if raw is not None else TrainConfig().seed
        trained_len = int(raw.train.seq_len) if raw is not None else model_cfg.block_size
        seq_len = args.seq_len or min(trained_len, model_cfg.block_size, MAX_DEFAULT_SEQ_LEN)
        if seq_len > model_cfg.block_size:
            raise ConfigError(f"--seq-len {seq_len} exceeds the run's model.block_size={model_cfg.block_size}")
        if args.data and raw is None:
            raise ConfigError(f"{run_dir} has no .hydra/config.yaml: --data needs the run's config (drop --data)")
        if args.data:
            batch, _, source = data_batch(_typed(raw), args.batch_size or 4, seq_len)
        else:
            batch = random_batch(model_cfg.vocab_size, args.batch_size or 4, seq_len, args.seed)
            source = f"random tokens (seed {args.seed})"
    except Exception as error:  # the run's config (OmegaConf), its data (ConfigError, OSError): one line
        raise FlowInputError(one_line(error)) from error
    at_checkpoint = {"state": "checkpoint", "step": info["step"], **measure(trained, batch, device)}
    del trained  # one model in memory at a time
    try:
        init = initial_model(model_cfg, seed, device)
    except (ConfigError, ValueError, OSError) as error:  # e.g. a fine-tuning run's model.pretrained moved
        raise FlowInputError(f"cannot rebuild the run's initial model: {one_line(error)}") from error
    at_init = {"state": "init", "step": 0, "seed": seed, **measure(init, batch, device)}
    result = _result(model_cfg, [at_init, at_checkpoint], batch, source, device)
    return result | {"run": str(run_dir), "checkpoint": str(checkpoint)}


def initial_model(cfg: ModelConfig, seed: int, device: torch.device) -> GPT:
    """GPT(cfg) on `device` with the initial weights build_model draws from `seed` (or the pretrained
    ones): the init of a run with train.seed=seed (on a device of this type)."""
    from trainer.model.build import build_model
    from trainer.parallel.base import materialize

    model, weights = build_model(cfg, seed)  # on the meta device
    materialize(model, weights, device)
    return model


def measure(model: GPT, batch: tuple, device: torch.device) -> dict[str, Any]:
    """model_gradient_flow of model (moved to `device`, fp32) on the batch."""
    model.to(device=device, dtype=torch.float32)
    x, y, *positions = (t.to(device) for t in batch)
    return model_gradient_flow(model, x, y, positions[0] if positions else None)


def random_batch(vocab: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (B, T) int64: windows of uniformly random tokens, y the next token of x."""
    tokens = torch.randint(vocab, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def pick_device(name: str) -> torch.device:
    """`auto`: cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise FlowInputError(f"--device {name}: not a device ({error}); use cpu, cuda or auto") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlowInputError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def data_batch(cfg: Config, batch_size: int, seq_len: int) -> tuple[tuple, int, str]:
    """The first sequences of the config's validation split (x, y[, positions]), the tokenizer's
    vocabulary, and the batch in words. Builds or opens the data's token cache."""
    from trainer.data import build_data

    data = build_data(cfg.data, seq_len, cfg.train.seed, pretrained=cfg.model.pretrained)
    n = min(batch_size, len(data.val))
    return data.val.get_batch(np.arange(n)), data.vocab_size, f"the first {n} validation sequences of the data"


def guess_vocab(cfg: Config, given: int | None) -> int:
    """The vocabulary without building the data: model.vocab_size, --vocab, or the tokenizer's
    size the data settings imply (synthetic, byte, bpe)."""
    from trainer.data.tokenizer import ByteTokenizer, choose_tokenizer

    if cfg.model.vocab_size or cfg.model.pretrained:
        return cfg.model.vocab_size or 0  # a pretrained model's comes from its config.json
    if given:
        return given
    if cfg.data.source == "synthetic":
        return cfg.data.synthetic_vocab
    choice = choose_tokenizer(cfg.data, None)
    if choice in ("byte", "bpe"):
        return ByteTokenizer.vocab_size if choice == "byte" else cfg.data.bpe_vocab_size
    raise ConfigError(
        f"model.vocab_size is null and data.tokenizer={choice}: set model.vocab_size=N, --vocab N or --data"
    )


def _hydra_config(run_dir: Path) -> Any:
    """The run's composed config as Hydra saved it (a DictConfig), or None (a run made in-process)."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def _typed(raw: Any) -> Config:
    """The run's saved config as the typed Config (raises on keys this trainer lacks)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), raw))


def _result(cfg: ModelConfig, states: list[dict], batch: tuple, source: str, device: torch.device) -> dict:
    x = batch[0]
    return {
        "study": "gpt",
        "model": {"name": cfg.name, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                  "vocab_size": cfg.vocab_size, "norm": cfg.norm, "mlp": cfg.mlp, "init_std": cfg.init_std},
        "batch": {"source": source, "batch_size": x.size(0), "seq_len": x.size(1)},
        "device": str(device),
        "states": states,
    }  # fmt: skip
