"""Helpers for tests that run the trainer for real: one process or torchrun, and their outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

QUICK = [  # a synthetic run that takes seconds on 2 CPU cores
    "experiment=synthetic", "logger.wandb=false", "train.sample_tokens=0", "model.n_layer=2",
    "model.n_embd=64", "train.seq_len=32", "model.bias=false",
]


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS` in a subprocess."""
    command = [sys.executable, "-m", "trainer", *args]
    return subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def torchrun(*args: str, cwd: Path, nproc: int = 2, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node NPROC [EXTRA] ARGS` in a subprocess."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra, *args
    ]
    return subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
