"""Downstream evaluation during training: `eval.tasks` through lm-evaluation-harness and perplexity on
`eval.files`, every `eval.interval` steps (default: train.eval_interval) and at the last step.

    Downstream.build(cfg, tokenizer)    the tasks loaded once, before the first step (None: nothing to do)
    Downstream.evaluate(run)            collective: every rank scores its share, rank 0's figures on all

Tasks run through `HarnessLM` (lm.py), the class `python -m trainer.evaluate` uses, over the training
model as the strategy holds it (sharded or not) and under its precision; each rank gets its share of
every task's documents and lm_eval gathers the per-document scores on rank 0, so the figures are the
single-process ones. Unlike lm_eval's own multi-rank runs, every rank builds every document's prompt
and keeps its share, so few-shot examples are those a single process draws. Metrics are logged as
`eval/<task>/<metric>` (lm_eval's "acc,none" -> acc, "exact_match,strip" -> exact_match_strip) and
`eval/<task>/<metric>_stderr`, perplexity as `eval/ppl/<file stem>`, the time taken as `eval/time_s` (outside
the throughput window). Training's random state is untouched: the evaluation runs on forked RNGs
seeded as lm_eval seeds them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import Config, ConfigError, EvalConfig

log = logging.getLogger("trainer")

FEWSHOT_SEED = 1234  # lm_eval's default fewshot_random_seed (and its torch / numpy seeds); random's is 0


def check_eval(cfg: EvalConfig) -> Any:
    """The eval.* section before anything is built: lm_eval installed, include_path a directory, every
    task known and its local data present. Returns the TaskManager (None without tasks); raises
    ConfigError (one line)."""
    if not cfg.tasks:
        return None
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f'eval.tasks={cfg.tasks} needs lm_eval, not installed: pip install -e ".[eval]"')
    if cfg.include_path and not Path(cfg.include_path).expanduser().is_dir():
        raise ConfigError(
            f"eval.include_path={cfg.include_path} is not a directory: point it at a folder of task YAMLs"
        )
    from trainer.evaluation import registry as cli

    try:
        manager = cli.task_manager([cfg.include_path] if cfg.include_path else [], cfg.tasks)
        cli.check_tasks(manager, cfg.tasks)
        cli.check_task_data(manager, cfg.tasks)
    except cli.EvaluateError as error:
        message = str(error).replace("--include-path DIR", "eval.include_path=DIR")
        raise ConfigError(f"eval.tasks: {message}") from error
    return manager


def metric_key(task: str, key: str) -> str:
    """lm_eval's results key ("acc,none", "exact_match_stderr,strip") as a logged name."""
    metric, _, filter_name = key.partition(",")
    stderr = metric.endswith("_stderr")
    metric = metric.removesuffix("_stderr") + (f"_{filter_name}" if filter_name and filter_name != "none" else "")
    return f"eval/{task}/{metric}" + ("_stderr" if stderr else "")


def logged_metrics(results: dict) -> dict[str, float]:
    """eval/<task>/<metric> for every numeric figure of lm_eval's results (groups included)."""
    out = {}
    for task, figures in results["results"].items():
        for key, value in figures.items():
            if "," in key and isinstance(value, int | float) and not isinstance(value, bool):
                out[metric_key(task, key)] = float(value)
    return out


class Downstream:
    """The run's downstream evaluation (eval.*): its tasks, loaded once, and its held-out files."""

    def __init__(self, cfg: EvalConfig, interval: int, seq_len: int, hf_tokenizer: Any, tokenizer: Any,
                 manager: Any) -> None:  # fmt: skip
        self.cfg, self.interval, self.seq_len = cfg, interval, seq_len
        self.hf_tokenizer, self.tokenizer = hf_tokenizer, tokenizer
        self.loaded = None
        if cfg.tasks:
            with quiet_lm_eval(logging.ERROR):  # not its note on each local task's custom_dataset metadata
                self.loaded = manager.load(cfg.tasks)
        self.files = {Path(f).stem: Path(f).expanduser().read_text(encoding="utf-8") for f in cfg.files}

    @classmethod
    def build(cls, cfg: Config, tokenizer: Any) -> Downstream | None:
        """None when eval.tasks and eval.files are empty. Raises ConfigError (one line) on a task the
        run's tokenizer cannot serve (synthetic ids; generation with neither eos nor a stop sequence)."""
        ec = cfg.eval
        if not ec.enabled:
            return None
        hf = None
        manager = check_eval(ec)
        if ec.tasks:
            from trainer.data.tokenizer import to_hf

            try:
                hf = copy.deepcopy(to_hf(tokenizer))  # lm_eval sets its pad token and padding side: a copy
            except ValueError as error:
                raise ConfigError(f"eval.tasks: {error}") from error
            from trainer.evaluation import registry as cli

            try:
                cli.check_generation(manager, ec.tasks, hf)
            except cli.EvaluateError as error:
                raise ConfigError(f"eval.tasks: {error}") from error
        return cls(ec, ec.interval or cfg.train.eval_interval, cfg.train.seq_len, hf, tokenizer, manager)

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.interval == 0 or step == max_steps

    def evaluate(self, run: Any) -> dict[str, float]:
        """Collective: every task and file scored with the training model; the same figures on every rank."""
        strategy = run.strategy
        started = time.perf_counter()
        model = strategy.unwrapped()
        was_training = model.training
        metrics: dict[str, float] = {}
        try:
            with forked_rngs(strategy.device):
                if self.loaded is not None:
                    metrics.update(self._tasks(model, strategy))
                for name, text in self.files.items():
                    metrics[f"eval/ppl/{name}"] = self._perplexity(model, strategy, text)
        finally:
            model.train(was_training)
        metrics = broadcast_metrics(metrics, strategy)
        metrics["eval/time_s"] = time.perf_counter() - started
        return metrics

    def _tasks(self, model: torch.nn.Module, strategy: Any) -> dict[str, float]:
        import lm_eval.evaluator

        from trainer.evaluation.lm import HarnessLM

        ec = self.cfg
        tasks = self.loaded["tasks"]
        for task in tasks.values():  # the data-parallel share: tensor-parallel peers score the same documents
            configure_task(task, ec.num_fewshot, strategy.dp_rank, strategy.dp_size)
        lm = HarnessLM(
            model, self.hf_tokenizer, batch_size=ec.batch_size, device=strategy.device, rank=strategy.dp_rank,
            world_size=strategy.dp_size, autocast=strategy.autocast, quiet=True, group=strategy.data_group,
            lockstep=strategy.world_size > 1 and strategy.dp_size > 1,
        )  # fmt: skip
        try:
            with quiet_lm_eval():
                results = lm_eval.evaluator.evaluate(
                    lm=lm, task_dict=self.loaded, limit=ec.limit, apply_chat_template=ec.apply_chat_template,
                    bootstrap_iters=100_000, log_samples=False,
                )  # fmt: skip
        finally:
            lm.close()
        return logged_metrics(results) if results is not None else {}

    def _perplexity(self, model: torch.nn.Module, strategy: Any, text: str) -> float:
        """exp(mean token loss) of `text`, in windows of train.seq_len tokens, each predicting its tokens
        from the window's earlier ones (as training and val_loss see text). Windows are shared out over
        the ranks; every rank runs as many forwards as the busiest one (a sharded forward needs all)."""
        from trainer.model.loss import IGNORE_INDEX

        seq_len, batch = self.seq_len, self.cfg.batch_size
        ids = self.tokenizer.encode(text)
        windows = [ids[start : start + seq_len + 1] for start in range(0, max(len(ids) - 1, 0), seq_len)]
        rank, ranks = strategy.dp_rank, strategy.dp_size  # tensor-parallel peers take the same windows
        mine = windows[rank::ranks]
        batches = max(math.ceil(len(windows[r::ranks]) / batch) for r in range(ranks))
        device = strategy.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        model.eval()
        for b in range(batches):
            rows = mine[b * batch : (b + 1) * batch]
            if not rows:  # this rank's share is done: a one-token forward keeps a sharded model's ranks paired
                with torch.no_grad(), strategy.autocast():
                    model(torch.zeros(1, 1, dtype=torch.long, device=device))
                continue
            width = max(len(r) for r in rows) - 1
            x = torch.zeros(len(rows), width, dtype=torch.long)
            y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for i, row in enumerate(rows):
                x[i, : len(row) - 1] = torch.tensor(row[:-1])
                y[i, : len(row) - 1] = torch.tensor(row[1:])
            with torch.no_grad(), strategy.autocast():
                # each target's log-probability (fp32, 0 at padding): no MoE auxiliary loss in the figure
                total -= model(x.to(device), targets=y.to(device), token_logps=True).double().sum()
            count += int((y != IGNORE_INDEX).sum())
        sums = strategy.all_reduce_sum(torch.stack([total, torch.tensor(float(count), dtype=torch.float64,
                                                                          device=device)]), "eval.files perplexity")  # fmt: skip
        loss, tokens = sums.tolist()
        if tokens == 0:
            return float("nan")
        return math.exp(loss / tokens)


def configure_task(task: Any, num_fewshot: int | None, rank: int, world_size: int) -> None:
    """What lm_eval's simple_evaluate sets on a loaded task (num_fewshot: eval.num_fewshot, else the
    task's own, else 0; the few-shot seed, again before each evaluation), and this rank's share: every
    document's request built as one process builds it, then the documents i % world_size == rank kept
    (lm_eval's own share, but with a single process's few-shot draws)."""
    if num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
    if world_size == 1 or getattr(task, "_trainer_share", None) == (rank, world_size):
        return
    build = type(task).build_all_requests.__get__(task)

    def build_share(*args: Any, rank: int = 0, world_size: int = 1, **kwargs: Any) -> None:
        build(*args, rank=0, world_size=1, **kwargs)
        task._instances = [i for i in task._instances if i.doc_id % world_size == rank]

    task.build_all_requests = build_share
    task._trainer_share = (rank, world_size)


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.WARNING):
    """No lm_eval lines under `level` and no per-task progress bars in the training log."""
    import functools

    import lm_eval.api.task
    from tqdm import tqdm

    logger, bars = logging.getLogger("lm_eval"), lm_eval.api.task.tqdm
    before = logger.level
    logger.setLevel(level)
    lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        logger.setLevel(before)
        lm_eval.api.task.tqdm = bars


@contextlib.contextmanager
def forked_rngs(device: torch.device):
    """Python's, numpy's and torch's random state restored afterwards; inside, seeded as lm_eval seeds."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        random.seed(0)
        np.random.seed(FEWSHOT_SEED)
        torch.manual_seed(FEWSHOT_SEED)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def broadcast_metrics(metrics: dict[str, float], strategy: Any) -> dict[str, float]:
    """Rank 0's figures on every rank (lm_eval returns results on rank 0 only)."""
    if strategy.world_size == 1:
        return metrics
    import torch.distributed as dist

    from trainer.parallel.dist import collective

    box = [metrics if strategy.rank == 0 else None]
    with collective("broadcast_object_list (evaluation figures)"):
        dist.broadcast_object_list(box, src=0)  # collective
    return box[0]
