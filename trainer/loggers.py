"""Metrics fan-out: metrics.jsonl, wandb and the console. metrics.jsonl holds exactly what wandb receives.

Only rank 0 builds a `Loggers` that writes; other ranks get one whose methods do nothing.
wandb never blocks or fails a run: it runs offline without an API key, and any error it
raises turns it off with one warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from trainer.config import LoggerConfig


class RankFileHandler(logging.FileHandler):
    """A FileHandler that creates its directory (Hydra writes logs/rank{R}.log through it)."""

    def __init__(self, filename: str, *args: Any, **kwargs: Any) -> None:
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(filename, *args, **kwargs)


def console_only_on_rank0() -> None:
    """Drop the console handlers of the root logger on ranks other than 0 (files stay)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)


def _jsonable(value: Any) -> Any:
    """Plain floats for JSON (NaN / inf become strings, as json cannot hold them strictly)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _wandb_mode(requested: str) -> str:
    """`auto`: online when an API key is configured (env or netrc), otherwise offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("offline", "online", "disabled"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if netrc.is_file() and "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


class Loggers:
    """Writes each logged step to metrics.jsonl and wandb (same dict), and drives the progress bar."""

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        run_config: dict[str, Any],
        max_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        run_id: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.wandb = None
        self.bar = None
        self.run_id = run_id  # wandb's run id: a resumed run continues the same wandb run
        if not enabled:
            return
        self.metrics_path = run_dir / "metrics.jsonl"
        self.metrics_file = open(self.metrics_path, "a", buffering=1)  # line-buffered: readable live
        if cfg.wandb:
            self._start_wandb(cfg, run_dir, run_config)
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=max_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stdout,
                disable=None,  # disable=None: off when stdout is not a terminal
            )

    def _start_wandb(self, cfg: LoggerConfig, run_dir: Path, run_config: dict[str, Any]) -> None:
        mode = _wandb_mode(cfg.mode)
        try:
            import wandb

            self.wandb = wandb.init(
                project=cfg.project,
                dir=str(run_dir),
                config=run_config,
                mode=mode,
                name=run_dir.name,
                id=self.run_id,
                resume="allow" if self.run_id else None,
                settings=wandb.Settings(console="off", silent=True, init_timeout=60),
            )
            self.run_id = self.wandb.id
            # Optimizer step is the x-axis of every panel; tokens seen is the other x-axis offered.
            # Metric names carry their family (grad_norm/*, param_norm/*, update_ratio/*, spike/*,
            # throughput/*, memory/*), which wandb's default workspace turns into one section each.
            self.wandb.define_metric("step")
            self.wandb.define_metric("tokens")
            self.wandb.define_metric("*", step_metric="step")
            self.wandb.define_metric("spike/count", step_metric="step", summary="max")
        except Exception as error:  # wandb must never fail a run
            warnings.warn(
                f"wandb disabled ({type(error).__name__}: {error}); metrics.jsonl still written", stacklevel=2
            )
            self.wandb = None

    def log(self, metrics: dict[str, Any]) -> None:
        """Record one step's metrics (must include 'step')."""
        if not self.enabled:
            return
        row = {key: _jsonable(value) for key, value in metrics.items()}
        self.metrics_file.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log(row)
            except Exception as error:
                warnings.warn(f"wandb.log failed ({error}); wandb disabled for this run", stacklevel=2)
                self.wandb = None

    def alert(self, title: str, text: str) -> None:
        """A wandb alert (and a summary count) for an event such as a loss spike."""
        if self.wandb is None:
            return
        try:
            self.wandb.alert(title=title, text=text)
        except Exception:  # offline runs cannot alert; the event is in metrics.jsonl anyway
            pass

    def advance(self, steps: int = 1, **postfix: Any) -> None:
        """Move the progress bar and show the latest figures beside it."""
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()})

    def write(self, text: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics_file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass
