"""Training diagnostics (noise scale, sharpness) and QAT: what each adds to the step time at its default interval.

    python -m benchmarks.diagnostics                                # 2-5 minutes on 2 shared CPU cores
    python -m benchmarks.diagnostics --steps 120 --estimates 8      # more steps and estimates
    python -m benchmarks.diagnostics model.attention_backend=math   # Hydra overrides, e.g. sharpness by double
                                                                    # backward on the CPU (SDPA's kernel has none)
    python -m benchmarks.diagnostics --out /tmp/diagnostics.json    # default: benchmarks/results/diagnostics.json

The instruments (trainer/diagnostics/instruments.py), and what each costs in the loop:

  noise_scale  diagnostics.noise_scale=true, every step: the gradients are reduced after the
               first micro-batch too (a collective under ddp / fsdp), their squared norm and the
               target count are read with the step's figures, and the step ends in a host sync
               (the loop defers no step: trainer.loop.can_defer). Needs train.grad_accum_steps >= 2.
  sharpness    diagnostics.sharpness.enabled=true: every diagnostics.sharpness.interval steps
               (default 100), after the step, λmax of the loss's Hessian on a held batch of
               diagnostics.sharpness.batch_size validation sequences (default 4) by Lanczos, up to
               diagnostics.sharpness.iterations Hessian-vector products (default 20; it stops
               early once λmax moves by under 1e-3), each a double backward or, where a kernel
               has none (auto's fallback; on the CPU, SDPA's), a central difference of two
               gradients. The loop also runs that step synchronously and logs it (not counted).

Shape: model=tiny (4 x 128), synthetic data (a Markov chain, vocabulary 32 padded to 64), seq 256,
micro batch 8, train.grad_accum_steps=2 (4,096 tokens per step), fp32, parallel=none, one torch
thread (--threads; train.num_threads); overrides after the flags change any of it.

Method. One real train() run per configuration, without a callback (a callback makes every step
synchronous), so the loop defers the steps it defers in a run (log_interval 10):

  baseline     diagnostics.noise_scale=false, diagnostics.sharpness.enabled=false
  noise_scale  the noise scale on
  sharpness    the sharpness on at its interval; the runs are shorter than the interval, so this
               measures its steps between estimates, which do the baseline's work: its `steps %`
               is the measurement's noise
  both         both on
  qat_int8     quant.qat=int8 (not a diagnostic; the same method measures its cost): every block
  qat_int4     linear's weight fake-quantised in each forward (quant.group_size 32 for int4)

and a fifth run that times the estimate (below). The five go in lockstep, each in its own thread,
one step at a time: only one thread works at any moment, every run takes one step a round, in a
new random order each round (so no run always follows the same one). A run hands the turn on
where the loop fetches its next batch (trainer.loop.next_batch, wrapped while they run). A shared
machine's drift, which moved whole runs of the same work by up to 16% here when they ran one after
another, then falls on neighbouring steps of every configuration alike. A step's time runs from
its batch fetch to the next one (data, train_step, the instruments, the log block); `step s` is
the median over --steps steps after WARMUP_STEPS. On a GPU the hand-off synchronises the device,
so each step's device time is its own, but the host no longer runs ahead of the device across
steps: there the cost of the noise scale's lost deferral is not measured.

The estimate, timed directly: the fifth run has the sharpness on (interval 10^6: the loop never
estimates) and a Callback that, after WARMUP_STEPS steps, calls run.instruments.sharpness() (what
the loop calls at the interval: the held batch, eval mode, the run's precision) 1 + --estimates
times, handing the turn on --steps / (--estimates + 1) times before each, so they spread over
the other runs' steps. The first, reported apart, settles the method (auto tries double backward
once and keeps its fallback, as the loop's first estimate does). Products per estimate are
counted at trainer.diagnostics.sharpness.top_eigenvalue. Every estimate is of the model
WARMUP_STEPS steps from its initialisation: Lanczos may need more or fewer products later on.

Figures per configuration (medians; the JSON keeps every step and estimate):
  step s             a step between estimates; p10-p90: the steps' 10th and 90th percentiles
  steps %            step s / baseline step s - 1
  estimate s         one sharpness estimate (sharpness configurations)
  step s at interval step s + estimate s / interval: a step's time at the default interval
  tokens/s           tokens per step / step s at interval
  overhead %         step s at interval / baseline step s - 1
  of which estimate %    estimate s / (interval x baseline step s)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks import write_report
from benchmarks.monitor import median
from benchmarks.throughput import cpu_name

if TYPE_CHECKING:
    from trainer.config import Config
    from trainer.run import Run
    from trainer.step import StepResult

SHAPE = [
    "model=tiny", "data=synthetic", "train.seq_len=256", "train.micro_batch_size=8", "train.grad_accum_steps=2",
    "precision=fp32", "parallel=none", "train.eval_interval=1000000000", "train.sample_tokens=0", "logger=none",
    "logger.progress_bar=false",
]  # fmt: skip
CONFIGS = {  # configuration -> (noise scale, sharpness, quant.qat)
    "baseline": (False, False, None),
    "noise_scale": (True, False, None),
    "sharpness": (False, True, None),
    "both": (True, True, None),
    "qat_int8": (False, False, "int8"),
    "qat_int4": (False, False, "int4"),
}
ESTIMATES = "estimates"  # the fifth run: it times sharpness estimates
WARMUP_STEPS = 2  # left out of the step times; the estimates start after them


def diagnostics_overrides(noise_scale: bool, sharpness: bool, qat: str | None = None) -> list[str]:
    return [
        f"diagnostics.noise_scale={str(noise_scale).lower()}",
        f"diagnostics.sharpness.enabled={str(sharpness).lower()}",
        *([f"quant.qat={qat}"] if qat else []),
    ]


def compose(overrides: list[str], work: Path) -> Config:
    """SHAPE, then `overrides` (the command line's, then the configuration's), the cache in `work`."""
    from trainer.__main__ import compose_config

    return compose_config([*SHAPE, f"data.cache_dir={work / 'cache'}", *overrides])[0]


class Lockstep:
    """Runs jobs in threads one turn at a time, in rounds: every job still running takes one turn
    a round, in a new random order each round (a job that leaves the machine's caches or the
    allocator in some state follows no one job every time). A job ends its turn with handoff();
    the wall time from getting the turn to handing it on is kept per job (`turns`), and the order
    of the turns (`log`)."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.shuffle = random.Random(seed).shuffle
        self.log: list[str] = []
        self.cond = threading.Condition()
        self.order: list[str] = []  # the jobs still running, in turn order
        self.current = ""
        self.started: dict[str, float] = {}
        self.turns: dict[str, list[float]] = {}
        self.errors: list[BaseException] = []

    def run(self, jobs: dict[str, Callable[[], None]]) -> None:
        self.order, self.current = list(jobs), next(iter(jobs))
        self.turns = {name: [] for name in jobs}
        threads = [
            threading.Thread(target=self._job, args=(name, job), name=name, daemon=True) for name, job in jobs.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.errors:
            raise self.errors[0]

    def handoff(self) -> None:
        """From a job's thread: end its turn, wait for its next one (other threads: nothing)."""
        name = threading.current_thread().name
        if name not in self.turns:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # host sync: the turn's kernels are done, its time is its own
        self.turns[name].append(time.perf_counter() - self.started[name])
        self._pass_on(name, leave=False)
        self._wait(name)

    def _job(self, name: str, job: Callable[[], None]) -> None:
        self._wait(name)
        try:
            job()
        except BaseException as error:  # re-raised by run(); the others go on
            self.errors.append(error)
        finally:
            self._pass_on(name, leave=True)

    def _wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.current == name)
        self.log.append(name)
        self.started[name] = time.perf_counter()

    def _pass_on(self, name: str, leave: bool) -> None:
        with self.cond:
            i = self.order.index(name)
            if leave:
                self.order.pop(i)
            else:
                i += 1
            if i >= len(self.order):  # the round is over
                self.shuffle(self.order)
                i = 0
            self.current = self.order[i] if self.order else ""
            self.cond.notify_all()


@contextlib.contextmanager
def handoff_at_each_batch(lockstep: Lockstep) -> Iterator[None]:
    """trainer.loop.next_batch, wrapped: a run's thread hands the turn on before each batch fetch."""
    from trainer import loop

    original = loop.next_batch

    def next_batch(run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        lockstep.handoff()
        return original(run)

    loop.next_batch = next_batch
    try:
        yield
    finally:
        loop.next_batch = original


@contextlib.contextmanager
def counting_products() -> Iterator[list[int]]:
    """The Hessian-vector products of each Lanczos run while inside (top_eigenvalue's second value)."""
    from trainer.diagnostics import sharpness as module

    original, counts = module.top_eigenvalue, []

    def counted(*args: Any, **kwargs: Any) -> tuple[float, int]:
        value, products = original(*args, **kwargs)
        counts.append(products)
        return value, products

    module.top_eigenvalue = counted
    try:
        yield counts
    finally:
        module.top_eigenvalue = original


class EstimateTimer:
    """A trainer.loop Callback: after WARMUP_STEPS steps, 1 + `timed` sharpness estimates through the
    run's own Instruments, each one's wall time (the first apart: it settles the method), `between`
    called before each (the lockstep's hand-off); then stops the run."""

    def __init__(self, timed: int, between: Callable[[], None]) -> None:
        self.timed, self.between = timed, between
        self.first_s = 0.0  # the estimate that settles the method
        self.seconds: list[float] = []  # the timed estimates
        self.lambda_max: list[float] = []
        self.products: list[int] = []  # per estimate, the first's included
        self.method = ""

    def on_step_end(self, run: Run, result: StepResult, metrics: dict[str, Any] | None) -> bool:
        if run.state.step < WARMUP_STEPS:
            return False
        with counting_products() as counts:
            for i in range(1 + self.timed):
                self.between()
                started = time.perf_counter()
                value, self.method = run.instruments.sharpness()
                if run.strategy.device.type == "cuda":
                    torch.cuda.synchronize()  # host sync: the estimate's kernels are done
                if i == 0:
                    self.first_s = time.perf_counter() - started
                else:
                    self.seconds.append(time.perf_counter() - started)
                self.lambda_max.append(value)
                run.instruments.method = self.method  # as after the loop's first estimate: auto keeps its fallback
        self.products = counts
        return True  # stops the run here


def measure(args: argparse.Namespace, work: Path) -> tuple[dict[str, list[float]], dict[str, bool], EstimateTimer]:
    """The five runs in lockstep: each configuration's step times (warm-up left out), whether each
    logged the noise scale, and the timed estimates."""
    from trainer.loop import train

    user = [f"train.num_threads={args.threads}", *args.overrides]
    # diagnostics.sharpness.* keys of the command line go to the configurations with the sharpness on
    # (the others would be refused: a key of a section that is off)
    without_sharpness = [o for o in user if not o.startswith("diagnostics.sharpness.")]
    cfgs = {
        name: compose(
            [
                *(user if flags[1] else without_sharpness),
                *diagnostics_overrides(*flags),
                f"train.max_steps={WARMUP_STEPS + args.steps + 1}",
            ],
            work,
        )  # fmt: skip
        for name, flags in CONFIGS.items()
    }  # the last step is not timed: nothing is fetched after it
    cfgs[ESTIMATES] = compose(
        [*user, *diagnostics_overrides(False, True), "diagnostics.sharpness.interval=1000000"], work
    )
    device = torch.device("cuda" if torch.cuda.is_available() and cfgs[ESTIMATES].train.device != "cpu" else "cpu")
    lockstep = Lockstep(device)
    gap = max(1, args.steps // (args.estimates + 1))  # turns handed on between estimates: they span the runs

    def between() -> None:
        for _ in range(gap):
            lockstep.handoff()

    timer = EstimateTimer(args.estimates, between)
    jobs = {name: (lambda name=name: train(cfgs[name], work / name)) for name in CONFIGS}
    jobs[ESTIMATES] = lambda: train(cfgs[ESTIMATES], work / ESTIMATES, callbacks=(timer,))
    # The loop's console lines: to stderr, so stdout keeps the table.
    with handoff_at_each_batch(lockstep), contextlib.redirect_stdout(sys.stderr):
        lockstep.run(jobs)
    # turns: the build (to the first fetch), then one per step
    steps = {name: lockstep.turns[name][1 + WARMUP_STEPS :] for name in CONFIGS}
    last_rows = {name: json.loads((work / name / "metrics.jsonl").read_text().splitlines()[-1]) for name in CONFIGS}
    return steps, {name: "noise_scale/b_simple" in row for name, row in last_rows.items()}, timer


def summarize(
    steps: dict[str, list[float]], estimate_s: float, interval: int, tokens_per_step: int
) -> dict[str, dict[str, Any]]:
    """Per configuration: median step time, the estimate amortised over the interval, tokens/s and
    the overhead against the baseline's median step."""
    base = median(steps["baseline"])
    out = {}
    for name, (_, sharpness, _) in CONFIGS.items():
        step_s = median(steps[name])
        deciles = statistics.quantiles(steps[name], n=10, method="inclusive") if len(steps[name]) > 1 else [step_s] * 9
        estimate = estimate_s if sharpness else 0.0
        at_interval = step_s + estimate / interval
        out[name] = {
            "step_s": step_s, "p10_p90_s": [deciles[0], deciles[-1]], "mean_step_s": statistics.fmean(steps[name]),
            "steps_s": steps[name], "steps_overhead_percent": 100 * (step_s / base - 1),
            "estimate_s": estimate if sharpness else None, "step_s_at_interval": at_interval,
            "tokens_per_s": tokens_per_step / at_interval, "overhead_percent": 100 * (at_interval / base - 1),
            "estimate_percent": 100 * estimate / (interval * base) if sharpness else None,
        }  # fmt: skip
    return out


def markdown_table(results: dict[str, dict[str, Any]], interval: int) -> str:
    lines = [
        f"| configuration | step s | p10-p90 | steps % | estimate s | step s at interval {interval} | tokens/s "
        "| overhead % | of which estimate % |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        estimate = "-" if r["estimate_s"] is None else f"{r['estimate_s']:.2f}"
        share = "-" if r["estimate_percent"] is None else f"{r['estimate_percent']:+.2f}"
        lines.append(
            f"| {name} | {r['step_s']:.3f} | {r['p10_p90_s'][0]:.3f}-{r['p10_p90_s'][1]:.3f} | "
            f"{r['steps_overhead_percent']:+.2f} | {estimate} | {r['step_s_at_interval']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {r['overhead_percent']:+.2f} | {share} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after the benchmark's shape (model.n_layer=2)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per configuration")
    parser.add_argument("--estimates", type=int, default=5, help="timed sharpness estimates (after one more)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (train.num_threads; 0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/diagnostics.json"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.estimates < 1:
        parser.error("--steps and --estimates must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-diagnostics-") as tmp:
        steps, noise_logged, timer = measure(args, Path(tmp))
        cfg = compose([f"train.num_threads={args.threads}", *args.overrides], Path(tmp))

    tc, sharp = cfg.train, cfg.diagnostics.sharpness
    tokens_per_step = tc.micro_batch_size * tc.accumulation_steps(1) * tc.seq_len
    estimate_s = median(timer.seconds)
    results = summarize(steps, estimate_s, sharp.interval, tokens_per_step)
    device = "cuda" if torch.cuda.is_available() and tc.device != "cpu" else "cpu"
    header = (
        f"diagnostics at their default intervals: {cfg.model.name} ({cfg.model.n_layer} x {cfg.model.n_embd}), seq "
        f"{tc.seq_len}, micro batch {tc.micro_batch_size} x {tc.accumulation_steps(1)} = {tokens_per_step:,} tokens "
        f"per step, {cfg.precision.dtype}, parallel={cfg.parallel.strategy} on {device}, {torch.get_num_threads()} "
        f"threads; {args.steps} steps per configuration in lockstep (log interval {tc.log_interval}); "
        f"torch {torch.__version__}; {time.perf_counter() - started:.0f}s; load average {load_before:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores)"
    )
    note = (
        f"sharpness: {timer.method.replace('_', ' ')}, {median(timer.products):g} Hessian-vector products per "
        f"estimate (iterations {sharp.iterations}) on {sharp.batch_size} x {tc.seq_len} tokens: {estimate_s:.2f}s "
        f"(median of {len(timer.seconds)}; the first, settling the method: {timer.first_s:.2f}s), every "
        f"{sharp.interval} steps; λmax {timer.lambda_max[-1]:.4g} after {WARMUP_STEPS} steps"
    )
    print(header + "\n\n" + markdown_table(results, sharp.interval) + "\n\n" + note)
    estimate = {
        "method": timer.method, "interval": sharp.interval, "iterations": sharp.iterations,
        "batch_size": sharp.batch_size, "tokens": sharp.batch_size * tc.seq_len, "median_s": estimate_s,
        "seconds": timer.seconds, "first_s": timer.first_s, "products": timer.products,
        "lambda_max": timer.lambda_max, "after_steps": WARMUP_STEPS,
    }  # fmt: skip
    record = {
        "header": header, "overrides": args.overrides, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": device, "cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
        "tokens_per_step": tokens_per_step, "log_interval": tc.log_interval, "steps": args.steps,
        "warmup_steps": WARMUP_STEPS,
        "noise_scale_logged": noise_logged, "results": results, "sharpness_estimate": estimate,
    }  # fmt: skip
    write_report(args.out, record)


if __name__ == "__main__":
    main()
