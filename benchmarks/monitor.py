"""Per-layer monitoring: what it adds to the step time at the default interval.

    python -m benchmarks.monitor                              # tiny and gpt2, ~5 minutes on 2 CPU cores
    python -m benchmarks.monitor --models gpt2 --steps 40     # one model, more monitored steps
    python -m benchmarks.monitor --repeats 2 --threads 0      # two runs per variant; torch's threads
    python -m benchmarks.monitor --out /tmp/monitor.json      # default: benchmarks/results/monitor.json

Every step the loop computes per-group gradient sums of squares (for the global norm and
clipping); every `monitor.interval` steps (default: every logged step, train.log_interval=10)
it also copies the weights before the optimizer step (`strategy.snapshot_params`) and, in
the log block, turns the gradient sums into per-layer norms and computes per-layer parameter
norms and update ratios. This script runs the real loop, `trainer.loop.train` on a config
composed like the command line's, per model with the same steps, data and seed:

  monitored   monitor.interval=null (per-layer statistics at every logged step, the default)
  plain       monitor.interval=1000000 (never within the run; the global norm is still computed)

It only observes the loop: `Loggers.advance` (called once per step, after the step's log
block) stamps the time, so each step's wall time includes its monitoring; the strategy's
methods, `forward_backward` and `group_norms` are wrapped in timers, which gives the cost of
each monitoring piece inside the real steps. The run is stopped after --steps steps, before
the final checkpoint and sample; max_steps is one more, so no measured step is the last one
and evaluation never runs. The first logged window (log_interval steps) is warm-up and is
left out. Data: ~2 MB of the standard library's source as one text file in a temporary
directory, byte tokens (gpt2 keeps its 50257-entry vocabulary); seq 128; micro batch 16
(tiny) or 1 (gpt2); fp32, parallel=none. One torch thread by default (train.num_threads=1):
on a CPU shared with other jobs two threads ran several times slower and far noisier.

Figures (medians over the measured steps):
  step s             a step without monitoring: the unlogged steps of run `plain`
  monitored step s   the steps with per-layer statistics (every 10th) of run `monitored`
  extra              monitored step - the other steps of the same run (same drift, both
                     include the logging, which costs milliseconds: `log_extra_s` in the JSON)
  pieces s           the timed pieces of a monitored step: snapshot + grad norms + param
                     norms + update ratios
  amortised %        extra / interval / step s: the monitoring's share at the default
                     interval; `(pieces)` uses the timed pieces instead of extra
  end-to-end %       mean step time of run `monitored` over run `plain`, minus 1
  noise %            the unmonitored steps of run `monitored` over those of run `plain`,
                     minus 1: the same work, so this is the machine's drift between runs
  missing from step_time_s   per logged window, its wall time minus the loop's own
                     throughput/step_time_s x steps: the log block after that figure is taken
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

MODELS = {  # model -> overrides on top of the shared ones (micro batch as the issue asks)
    "tiny": ["model=tiny", "train.micro_batch_size=16"],
    "gpt2": ["model=gpt2", "train.micro_batch_size=1"],
}
DEFAULT_STEPS = {"tiny": 100, "gpt2": 30}
LOG_INTERVAL = 10
PIECES = ("snapshot", "grad_norms", "param_norms", "update_ratios")  # monitored steps only
ALWAYS = ("forward_backward", "grad_sumsq", "clip_and_step")  # every step
GOAL_PERCENT = 5.0


class StopRun(Exception):
    """Raised from the logger once the measured steps are done."""


class Probe:
    """Timestamps of each step's end and per-step timings of named pieces, from one train() run."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.stamps: list[float] = [time.perf_counter()]
        self.pieces: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.rows: list[dict[str, Any]] = []
        self.strategy: Any = None  # while the run lasts
        self.n_params = 0
        self.device = "cpu"

    def timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # so the time is the piece's, not the next host sync's
            step = len(self.stamps)  # stamps holds the start and each finished step's end
            self.pieces[step][name] += time.perf_counter() - start
            return out

        return wrapper

    def timed_group_norms(self, fn: Callable) -> Callable:
        names = {
            "grad_norm": "grad_norms",
            "param_norm": "param_norms",
            "update_ratio": "update_ratios",
        }
        return lambda prefix, sums: self.timed(names[prefix], fn)(prefix, sums)

    def build_strategy(self, fn: Callable) -> Callable:
        def build(cfg: Any) -> Any:
            self.strategy = strategy = fn(cfg)
            for method, name in (
                ("grad_sumsq_by_group", "grad_sumsq"), ("clip_and_step", "clip_and_step"),
                ("snapshot_params", "snapshot"), ("param_sumsq_by_group", "param_norms"),
                ("update_sumsq_by_group", "update_ratios"),
            ):  # fmt: skip
                setattr(strategy, method, self.timed(name, getattr(strategy, method)))
            return strategy

        return build

    def loggers(self, base: type) -> type:
        probe = self

        class TimedLoggers(base):
            def log(self, metrics: dict[str, Any]) -> None:
                super().log(metrics)
                probe.rows.append(dict(metrics))

            def write(self, text: str) -> None:
                pass  # keep the benchmark's output to its table

            def advance(self, steps: int = 1, **postfix: Any) -> None:
                super().advance(steps, **postfix)
                probe.stamps.append(time.perf_counter())
                if len(probe.stamps) - 1 >= probe.steps:
                    self.close()
                    raise StopRun

        return TimedLoggers

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        import trainer.loop as loop

        with (
            mock.patch.object(loop, "Loggers", self.loggers(loop.Loggers)),
            mock.patch.object(loop, "build_strategy", self.build_strategy(loop.build_strategy)),
            mock.patch.object(
                loop, "forward_backward", self.timed("forward_backward", loop.forward_backward)
            ),
            mock.patch.object(loop, "group_norms", self.timed_group_norms(loop.group_norms)),
        ):
            yield

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:], strict=True)]


def write_corpus(directory: Path, max_bytes: int = 2_000_000) -> Path:
    """About max_bytes of the standard library's source, as one text file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    path = directory / "corpus.txt"
    path.write_text("\n".join(parts))
    return path


def run_once(
    model: str, monitored: bool, steps: int, threads: int, corpus: Path, work: Path
) -> Probe:
    """One train() run of `steps` steps; per-layer monitoring at the default interval or never."""
    from trainer.__main__ import compose_config
    from trainer.loop import train

    overrides = [
        *MODELS[model], "data=files", f"data.path={corpus}", "data.tokenizer=byte",
        f"data.cache_dir={work / 'cache'}", "train.seq_len=128", f"train.log_interval={LOG_INTERVAL}",
        f"train.max_steps={steps + 1}", "train.eval_interval=1000000000", "logger=none",
        "logger.progress_bar=false", f"monitor.interval={'null' if monitored else 1_000_000}",
        f"train.num_threads={threads}",
    ]  # fmt: skip
    cfg, _ = compose_config(overrides)
    probe = Probe(steps)
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"{model}-"))
    with probe.patched(), contextlib.suppress(StopRun):
        train(cfg, run_dir)
    if len(probe.stamps) - 1 < steps:
        raise RuntimeError(
            f"{model}: train() returned after {len(probe.stamps) - 1} of {steps} steps"
        )
    probe.n_params = sum(p.numel() for p in probe.strategy.model.parameters())
    probe.device = str(probe.strategy.device)
    probe.strategy = None  # let the model and optimizer go before the next run
    return probe


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def collect(probes: list[Probe]) -> dict[str, list[float]]:
    """Step times after warm-up, split into logged and other steps; each timed piece per step
    it ran in; and per logged window, the wall time the loop's throughput/step_time_s leaves
    out (window wall time - step_time_s x steps: the log block after that figure is taken)."""
    out: dict[str, list[float]] = defaultdict(list)
    for probe in probes:
        times = probe.step_times()
        for step, seconds in enumerate(times, start=1):
            if step <= LOG_INTERVAL:
                continue
            out["logged" if step % LOG_INTERVAL == 0 else "other"].append(seconds)
            for name, value in probe.pieces[step].items():
                out[name].append(value)
        for row in probe.rows:
            if row["step"] > LOG_INTERVAL and row["step"] % LOG_INTERVAL == 0:
                window = times[row["step"] - LOG_INTERVAL : row["step"]]
                out["unlogged"].append(sum(window) - LOG_INTERVAL * row["throughput/step_time_s"])
    return out


def summarize(model: str, runs: dict[str, list[Probe]], interval: int) -> dict[str, Any]:
    """Figures for one model from its `monitored` and `plain` runs (warm-up window left out)."""
    mon, plain = collect(runs["monitored"]), collect(runs["plain"])
    step_s = median(plain["other"])
    monitor_extra = median(mon["logged"]) - median(mon["other"])  # same run: the same drift
    piece_s = {name: median(mon[name]) for name in PIECES}
    pieces_s = sum(piece_s.values())
    mean_mon = statistics.fmean(mon["logged"] + mon["other"])
    mean_plain = statistics.fmean(plain["logged"] + plain["other"])
    amortised = 100 * monitor_extra / interval / step_s
    amortised_pieces = 100 * pieces_s / interval / step_s
    return {
        "model": model,
        "params": runs["plain"][0].n_params,
        "device": runs["plain"][0].device,
        "interval": interval,
        "runs_per_variant": len(runs["plain"]),
        "steps_per_run": runs["plain"][0].steps,
        "monitored_steps_measured": len(mon["logged"]),
        "step_s": step_s,
        "monitored_step_s": median(mon["logged"]),
        "other_step_s_monitored_run": median(mon["other"]),
        "logged_step_s_plain_run": median(plain["logged"]),
        "monitor_extra_s": monitor_extra,
        "log_extra_s": median(plain["logged"]) - step_s,
        "pieces_s": piece_s,
        "pieces_total_s": pieces_s,
        "always_s": {name: median(plain[name]) for name in ALWAYS},
        "amortised_percent": amortised,
        "amortised_pieces_percent": amortised_pieces,
        "mean_step_s_monitored": mean_mon,
        "mean_step_s_plain": mean_plain,
        "end_to_end_percent": 100 * (mean_mon / mean_plain - 1),
        "noise_percent": 100 * (median(mon["other"]) / step_s - 1),
        "unlogged_s_per_window": {
            "monitored": median(mon["unlogged"]),
            "plain": median(plain["unlogged"]),
        },
        "within_goal": max(amortised, amortised_pieces) <= GOAL_PERCENT,
        "step_times_s": {v: [p.step_times() for p in probes] for v, probes in runs.items()},
    }


def markdown_tables(results: list[dict[str, Any]]) -> str:
    """The headline table (one row per model) and the pieces table."""
    lines = [
        "| model | params | step s | monitored step s | extra per monitored step s | pieces s | amortised % "
        "| amortised % (pieces) | mean step s, monitored / plain | end-to-end % | noise % | amortised <= 5% |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['step_s']:.3f} | {r['monitored_step_s']:.3f} | "
            f"{r['monitor_extra_s']:+.3f} | {r['pieces_total_s']:.3f} | {r['amortised_percent']:+.2f} | "
            f"{r['amortised_pieces_percent']:+.2f} | {r['mean_step_s_monitored']:.3f} / {r['mean_step_s_plain']:.3f} | "
            f"{r['end_to_end_percent']:+.2f} | {r['noise_percent']:+.2f} | {'yes' if r['within_goal'] else 'no'} |"
        )
    lines += [
        "",
        "| model | snapshot s | grad norms s | param norms s | update ratios s | pieces / step "
        "| always: forward+backward s | grad sumsq s | clip+step s | missing from step_time_s, s per window (monitored / plain) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        unlogged = r["unlogged_s_per_window"]
        lines.append(
            f"| {r['model']} | "
            + " | ".join(f"{r['pieces_s'][n]:.4f}" for n in PIECES)
            + f" | {r['pieces_total_s'] / r['step_s']:.1%} | "
            + " | ".join(f"{r['always_s'][n]:.4f}" for n in ALWAYS)
            + f" | {unlogged['monitored']:.3f} / {unlogged['plain']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "gpt2"])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"steps per run, first {LOG_INTERVAL} are warm-up (default: {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (train.num_threads; 0: torch's default)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per variant, alternating order"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/monitor.json"))
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 2 * LOG_INTERVAL:
        parser.error(
            f"--steps must be at least {2 * LOG_INTERVAL} (the first {LOG_INTERVAL} are warm-up)"
        )

    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as tmp:
        work = Path(tmp)
        corpus = write_corpus(work)
        for model in args.models:
            steps = args.steps or DEFAULT_STEPS[model]
            runs: dict[str, list[Probe]] = {"monitored": [], "plain": []}
            for repeat in range(args.repeats):
                order = ("monitored", "plain") if repeat % 2 == 0 else ("plain", "monitored")
                for variant in order:
                    t0 = time.perf_counter()
                    runs[variant].append(
                        run_once(model, variant == "monitored", steps, args.threads, corpus, work)
                    )
                    print(
                        f"{model} {variant}: {steps} steps in {time.perf_counter() - t0:.1f}s",
                        file=sys.stderr,
                    )
            results.append(summarize(model, runs, LOG_INTERVAL))

    devices = ", ".join(sorted({r["device"] for r in results}))
    header = (
        f"per-layer monitoring every {LOG_INTERVAL} steps (train.log_interval={LOG_INTERVAL}, monitor.interval=null) "
        f"against monitor.interval=1000000; seq 128, fp32, parallel=none on {devices}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}; {time.perf_counter() - started:.0f}s"
    )
    print(header + "\n\n" + markdown_tables(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "header": header, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "platform": platform.platform(), "processor": platform.processor(), "goal_percent": GOAL_PERCENT,
        "results": results,
    }  # fmt: skip
    args.out.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
