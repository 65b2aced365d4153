"""Metrics fan-out: metrics.jsonl, wandb, TensorBoard and the console. metrics.jsonl holds exactly what
wandb receives.

Only rank 0 builds a `Loggers` that writes metrics; every rank writes its console lines through
`logging` (rank 0's console, and each rank's logs/rank{R}.log). wandb never blocks or fails a run:
an online start that fails runs offline, and any other error turns it off with one warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainer.config import LoggerConfig

log = logging.getLogger("trainer")

# Headline keys stay top-level (the metrics.jsonl contract: trainer.report and users read them); each
# is also logged under its wandb section (wandb lays out one section per `prefix/`), and the top-level
# copy is hidden in wandb's workspace, so every chart shows once. The families (grad_norm/*, throughput/*,
# spike/*, memory/*, ...) are sections already.
SECTIONS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "grad_norm_clipped": "train/grad_norm_clipped", "clip_coef": "train/clip_coef",
    "target_tokens": "train/target_tokens", "global_batch": "train/global_batch",
    "skipped_steps": "train/skipped_steps", "loss_scale": "train/loss_scale", "val_loss": "val/loss",
}  # fmt: skip
HIDDEN = (*SECTIONS, "tokens_per_s")  # tokens_per_s: its section copy is throughput/tokens_per_s


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


def log_files(world_size: int = 1) -> str:
    """Where this process's log lines are written, for the first lines of a run."""
    files = [Path(h.baseFilename) for h in logging.getLogger().handlers if isinstance(h, RankFileHandler)]
    if not files:
        return "logs: console only (no log file outside `python -m trainer`)"
    if world_size > 1:
        return f"logs: {files[0].parent}/rank{{0..{world_size - 1}}}.log (one per rank)"
    return f"logs: {files[0]}"


# -- readable numbers for the console -------------------------------------------------------------


def human(value: float, units: tuple[str, ...] = ("", "k", "M", "G", "T"), base: float = 1000.0) -> str:
    """Three significant digits and a unit prefix: 15300 -> '15.3k', 950 -> '950', 2.5e6 -> '2.5M'."""
    for unit in units:
        text = f"{value:.3g}"
        if abs(float(text)) < base or unit == units[-1]:
            return text + unit
        value /= base
    raise AssertionError("unreachable")


def human_bytes(n_bytes: float) -> str:
    """Decimal units, as memory/peak_gb: 4.2e9 -> '4.2 GB', 3.12e8 -> '312 MB'."""
    return human(n_bytes, (" B", " kB", " MB", " GB", " TB"))


def human_duration(seconds: float) -> str:
    """Hours:minutes:seconds: 65 -> '0:01:05', 90061 -> '25:01:01'."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -- wandb: mode, name, group and tags ----------------------------------------------------------------


def wandb_mode(requested: str) -> tuple[str | None, str]:
    """(the mode for wandb.init, why). `auto` leaves the decision to wandb: WANDB_MODE when set (None:
    wandb reads it), else online when wandb's own credential lookup finds credentials for its server
    (WANDB_API_KEY, the netrc entry or settings file of WANDB_BASE_URL's host, an identity token: a
    self-hosted server too), offline when it finds none. It never prompts."""
    if requested != "auto":
        return requested, f"logger.mode={requested}"
    if os.environ.get("WANDB_MODE"):
        return None, f"WANDB_MODE={os.environ['WANDB_MODE']}"
    import wandb

    wandb.setup(settings=wandb.Settings(silent=True))  # silent: no username look-up over the network
    if wandb.login(prompt=False, verify=False):  # only looks: no prompt, no request to the server
        return "online", "wandb found credentials"
    return "offline", "no W&B credentials found: `wandb login` or WANDB_API_KEY for online"


# Keys that do not change what is trained (where things go, how often they are logged or saved)
NOT_IN_NAME = (
    "hydra.", "logger.", "checkpoint.", "data.cache_dir", "data.prefetch", "train.resume", "train.sample_",
    "train.log_interval", "train.eval_interval", "train.eval_batches", "train.num_threads",
)  # fmt: skip
PATH_KEYS = ("path", "pretrained", "init_from", "deepspeed_config")


def short_override(key: str, value: str) -> str:
    """`optim.lr=3e-4` -> 'lr3e-4', `train.compile=true` -> 'compile', a path -> its last part."""
    leaf, value = key.rsplit(".", 1)[-1], value.strip("[]'\"").replace(",", "_")
    if leaf in PATH_KEYS or "/" in value:
        return Path(value).name
    if value.lower() in ("true", "false"):
        return leaf if value.lower() == "true" else f"no_{leaf}"
    return f"{leaf}{value}"


def job_name(choices: dict[str, Any], overrides: list[str]) -> str:
    """The Hydra job in a name: the command line's config-group choices and shortened overrides, in
    their order (`model=gpt2 parallel=fsdp optim.lr=3e-4` -> 'gpt2-fsdp-lr3e-4'). Groups an experiment
    sets are left to the experiment's own name; paths, logging and Hydra's keys are left out."""
    parts: list[str] = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if not value or key.startswith(NOT_IN_NAME):
            continue
        part = value if key in choices else short_override(key, value)
        if part and part not in parts:
            parts.append(part)
    return "-".join(parts)[:128]


def sweep_group(sweep_dir: str) -> str:
    """A multirun's wandb group: its sweep dir's name (Hydra's default multirun/DATE/TIME: DATE_TIME)."""
    path = Path(sweep_dir)
    if re.fullmatch(r"\d\d-\d\d-\d\d", path.name) and path.parent.name:
        return f"{path.parent.name}_{path.name}"
    return path.name


def wandb_names(cfg: LoggerConfig, run_dir: Path) -> tuple[str, str | None, list[str]]:
    """(name, group, tags) of the wandb run: from the Hydra job when Hydra launched it (name from the
    overrides, group the sweep under -m, tags the config-group choices), else the run dir's name;
    logger.wandb_name / wandb_group / wandb_tags override each."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    name, group, tags = run_dir.name, None, []
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    output_dir = OmegaConf.select(hydra, "runtime.output_dir", throw_on_missing=False) if hydra is not None else None
    if output_dir is None or Path(output_dir).resolve() != run_dir.resolve():
        hydra = None  # no Hydra job, or an earlier one in this process (--cfg job, compose): not this run's
    if hydra is not None:
        choices = {k: v for k, v in hydra.runtime.choices.items() if not k.startswith("hydra/")}
        name = job_name(choices, list(hydra.overrides.task)) or name
        group = sweep_group(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else None
        tags = sorted(f"{k}={v}"[:64] for k, v in choices.items() if v is not None)
    return (
        cfg.wandb_name or name,
        cfg.wandb_group if cfg.wandb_group is not None else group,
        list(cfg.wandb_tags) if cfg.wandb_tags is not None else tags,
    )


def _jsonable(value: Any) -> Any:
    """Plain floats for JSON (NaN / inf become strings, as json cannot hold them strictly)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def sectioned(metrics: dict[str, Any]) -> dict[str, Any]:
    """The row as logged: the metrics, and each headline key's copy under its section (SECTIONS)."""
    return {**metrics, **{SECTIONS[k]: v for k, v in metrics.items() if k in SECTIONS}}


class Loggers:
    """Writes each logged step to metrics.jsonl, wandb and TensorBoard (the same row), drives the
    progress bar, and writes console lines through `logging` on every rank."""

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
        self.tensorboard = None
        self.bar = None
        self.run_id = run_id  # wandb's run id: a resumed run continues the same wandb run
        self.stack = ExitStack()  # what close() undoes: the log lines' detour above the progress bar
        if enabled:
            self._start(cfg, run_dir, run_config, max_steps, start_step)
        self.started, self.start_step = time.time(), start_step  # elapsed and ETA count from the first step

    def _start(
        self, cfg: LoggerConfig, run_dir: Path, run_config: dict[str, Any], max_steps: int, start_step: int
    ) -> None:
        """metrics.jsonl, wandb, TensorBoard and the bar, each saying where it writes (rank 0)."""
        self.metrics_path = run_dir / "metrics.jsonl"
        self.metrics_file = open(self.metrics_path, "a", buffering=1)  # line-buffered: readable live
        log.info(f"metrics: {self.metrics_path.resolve()}")
        if cfg.wandb:
            self._start_wandb(cfg, run_dir, run_config)
        else:
            log.info("wandb: off (logger.wandb=false)")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events past its checkpoint, as metrics.jsonl does
            directory = (run_dir / "tensorboard").resolve()
            self.tensorboard = SummaryWriter(str(directory), purge_step=start_step + 1 if start_step else None)
            log.info(f"tensorboard: {directory} (tensorboard --logdir {directory})")
        if cfg.progress_bar:
            self._start_bar(max_steps, start_step)

    def _start_bar(self, max_steps: int, start_step: int) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(
            total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, file=sys.stdout,
            disable=None,  # disable=None: off when stdout is not a terminal
        )  # fmt: skip
        console = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
        if not self.bar.disable and console:  # log lines above the bar, not through it
            self.stack.enter_context(logging_redirect_tqdm())

    def _start_wandb(self, cfg: LoggerConfig, run_dir: Path, run_config: dict[str, Any]) -> None:
        name, group, tags = wandb_names(cfg, run_dir)
        try:
            import wandb

            mode, why = wandb_mode(cfg.mode)
            init = dict(
                project=cfg.project, dir=str(run_dir), config=run_config, name=name, group=group, tags=tags,
                id=self.run_id, resume="allow" if self.run_id else None,
                settings=wandb.Settings(console="off", silent=True, init_timeout=60),
            )  # fmt: skip
            try:
                self.wandb = wandb.init(mode=mode, **init)
            except Exception as error:
                if mode == "offline":
                    raise
                # no network, a server that is down, no credentials for WANDB_MODE=online: run offline
                why = f"could not start online: {type(error).__name__}: {str(error).splitlines()[0]}"
                self.wandb = wandb.init(mode="offline", **init)
            self.run_id = self.wandb.id
            self._define_metrics()
            log.info(self._describe_wandb(name, group, tags, why))
        except Exception as error:  # wandb must never fail a run
            log.warning(f"wandb disabled ({type(error).__name__}: {error}); metrics.jsonl still written")
            self.wandb = None

    def _define_metrics(self) -> None:
        """`step` is the x-axis of every panel (`tokens` is offered as the other); the contract's
        top-level copies of sectioned keys are hidden."""
        self.wandb.define_metric("step")
        self.wandb.define_metric("tokens")
        self.wandb.define_metric("*", step_metric="step")
        self.wandb.define_metric("spike/count", step_metric="step", summary="max")
        for key in HIDDEN:
            self.wandb.define_metric(key, step_metric="step", hidden=True)

    def _describe_wandb(self, name: str, group: str | None, tags: list[str], why: str) -> str:
        """Where the wandb run is: its URL online, the `wandb sync` command offline."""
        run = self.wandb
        about = f"run {name!r}" + (f", group {group!r}" if group else "") + (f", tags {','.join(tags)}" if tags else "")
        if run.disabled:
            return f"wandb: disabled ({why})"
        if run.offline:
            return f"wandb: offline ({why}), {about}; upload it with: wandb sync {Path(run.sync_dir).resolve()}"
        return f"wandb: {run.url} ({about})"

    def log(self, metrics: dict[str, Any]) -> None:
        """Record one step's metrics (must include 'step')."""
        if not self.enabled:
            return
        metrics = sectioned(metrics)
        row = {key: _jsonable(value) for key, value in metrics.items()}
        self.metrics_file.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log(row)
            except Exception as error:
                log.warning(f"wandb.log failed ({error}); wandb disabled for this run")
                self.wandb = None
        if self.tensorboard is not None:  # the names wandb shows (not the hidden copies), step as x
            for key, value in metrics.items():
                if key != "step" and key not in HIDDEN and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, metrics["step"])

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

    def timing(self, step: int, max_steps: int) -> tuple[float, float | None]:
        """(seconds since the loggers started, estimated seconds to max_steps at the rate so far)."""
        elapsed, done = time.time() - self.started, step - self.start_step
        return elapsed, (max_steps - step) * elapsed / done if done > 0 else None

    def write(self, text: str) -> None:
        """A console line, on every rank: rank 0's console and each rank's log file (above the bar)."""
        log.info(text)

    def close(self) -> None:
        self.stack.close()
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass
