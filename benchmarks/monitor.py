"""Per-layer monitoring: what it adds to the step time at the default interval.

    python -m benchmarks.monitor                              # tiny and gpt2, ~5 minutes on 2 CPU cores
    python -m benchmarks.monitor --models gpt2 --steps 40     # one model, more monitored steps
    python -m benchmarks.monitor --repeats 2 --threads 0      # two runs per variant; torch's threads
    python -m benchmarks.monitor --out /tmp/monitor.json      # default: benchmarks/results/monitor.json

Every step, `trainer.step.train_step` computes per-group gradient sums of squares (for the
global norm and clipping). Every `monitor.interval` steps (default: every logged step,
train.log_interval=10) it also copies the weights before the optimizer step (`snapshot`) and,
after it, computes per-group sums of squares of the weights and of the update (`param_stats`,
on the device); the loop's log block then turns the sums into per-layer norms and update
ratios on the host (`trainer.monitor.group_norms`, one host sync per family). This script runs
the real loop, `trainer.loop.train`, on a config composed like the command line's, per model
with the same steps, data and seed:

  monitored   monitor.interval=null (per-layer statistics at every logged step, the default)
  plain       monitor.interval=1000000 (never within the run; the global norm is still computed)

It only observes the loop, through the loop's Callback protocol: `on_step_end` (called once per
step, after the step's log block) stamps the time, so each step's wall time includes its
monitoring, and keeps the step's `StepResult.timings` (train_step's own host-clock pieces:
forward_backward, grad_stats, snapshot, clip_and_step and, on monitor steps, param_stats) and
the logged rows. On a GPU the probe synchronises before it stamps, so a step's wall time holds
its own kernels; train_step's pieces are host time without a sync, so there snapshot and
param_stats are mostly launch time and their device work is waited for in the log block's host
sync (which the `group_norms` figure below includes). The probe stops the run after --steps
steps (by returning True: no final checkpoint or sample); max_steps is one more, so no
measured step is the last one and evaluation never runs. The first logged window
(log_interval steps; the first step also holds building the run) is warm-up and is left out.
The loop's console lines go to stderr; stdout keeps the tables. Data: ~2 MB of the standard
library's source as one text file in a temporary directory, byte tokens (gpt2 keeps its
50257-entry vocabulary); seq 128; micro batch 16 (tiny) or 1 (gpt2); fp32, parallel=none. One
torch thread by default (train.num_threads=1): on a CPU shared with other jobs two threads ran
several times slower and far noisier.

Figures (medians over the measured steps):
  step s             a step without monitoring: the unlogged steps of run `plain`
  monitored step s   the steps with per-layer statistics (every 10th) of run `monitored`
  extra              monitored step - the other steps of the same run (same drift, both
                     include the logging, which costs milliseconds: `log_extra_s` in the JSON)
  pieces s           the monitoring pieces of a monitored step: snapshot + param_stats
                     (train_step's timings) + group_norms, the per-layer norms and update
                     ratios of the log block: the time a monitored step spends outside
                     train_step (data, counters, log block) minus the same for the logged
                     steps of run `plain`, whose log block has no per-layer figures
  amortised %        extra / interval / step s: the monitoring's share at the default
                     interval; `(pieces)` uses the timed pieces instead of extra
  end-to-end %       mean step time of run `monitored` over run `plain`, minus 1
  noise %            the unmonitored steps of run `monitored` over those of run `plain`,
                     minus 1: the same work, so this is the machine's drift between runs
  always s           train_step's pieces of every step (run `plain`): forward_backward,
                     grad_stats (unscale, gradient sums of squares, global norm, the step's
                     one host sync), clip_and_step
  missing from step_time_s   per logged window, its wall time minus the loop's own
                     throughput/step_time_s x steps: the part of the log block after that
                     figure is taken (evaluation, writing the row, the console line)
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks import write_report

if TYPE_CHECKING:
    from trainer.run import Run
    from trainer.step import StepResult

MODELS = {  # model -> overrides on top of the shared ones (micro batch as the issue asks)
    "tiny": ["model=tiny", "train.micro_batch_size=16"],
    "gpt2": ["model=gpt2", "train.micro_batch_size=1"],
}
DEFAULT_STEPS = {"tiny": 100, "gpt2": 30}
LOG_INTERVAL = 10
PIECES = ("snapshot", "param_stats", "group_norms")  # monitored steps only
ALWAYS = ("forward_backward", "grad_stats", "clip_and_step")  # every step: train_step's timings
GOAL_PERCENT = 5.0


class Probe:
    """A trainer.loop Callback: the wall time at each step's end, each step's StepResult.timings
    and the logged rows of one train() run. Stops the run once `steps` steps are done."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.stamps: list[float] = [time.perf_counter()]  # the start, then each step's end
        self.timings: list[dict[str, float]] = []  # per step: train_step's pieces, seconds
        self.rows: list[dict[str, Any]] = []  # what the loop logged
        self.n_params = 0
        self.device = "cpu"

    def on_step_end(self, run: Run, result: StepResult, metrics: dict[str, Any] | None) -> bool:
        if run.strategy.device.type == "cuda":
            torch.cuda.synchronize()  # host sync: the step's kernels are done, its time is its own
        self.stamps.append(time.perf_counter())
        self.timings.append(dict(result.timings))
        if metrics is not None:
            self.rows.append(dict(metrics))
        if not self.n_params:
            self.n_params = sum(p.numel() for p in run.strategy.model.parameters())
            self.device = str(run.strategy.device)
        return len(self.timings) >= self.steps  # True stops the run here

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


def run_once(model: str, monitored: bool, steps: int, threads: int, corpus: Path, work: Path) -> Probe:
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
    # The loop prints a console line per logged step: to stderr, so stdout keeps the tables.
    with contextlib.redirect_stdout(sys.stderr):
        train(cfg, run_dir, callbacks=(probe,))
    if len(probe.timings) < steps:
        raise RuntimeError(f"{model}: train() returned after {len(probe.timings)} of {steps} steps")
    return probe


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def collect(probes: list[Probe]) -> dict[str, list[float]]:
    """Step times after warm-up, split into logged and other steps; the time each of those spent
    outside train_step (data, counters, the log block); train_step's pieces per step they ran
    in; and per logged window, the wall time the loop's throughput/step_time_s leaves out
    (window wall time - step_time_s x steps)."""
    out: dict[str, list[float]] = defaultdict(list)
    for probe in probes:
        times = probe.step_times()
        for step, (seconds, timings) in enumerate(zip(times, probe.timings, strict=True), start=1):
            if step <= LOG_INTERVAL:
                continue
            kind = "logged" if step % LOG_INTERVAL == 0 else "other"
            out[kind].append(seconds)
            out[f"outside_{kind}"].append(seconds - sum(timings.values()))
            for name in ALWAYS:
                out[name].append(timings[name])
            if "param_stats" in timings:  # a monitor step: train_step ran with stats=True
                out["snapshot"].append(timings["snapshot"])
                out["param_stats"].append(timings["param_stats"])
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
    piece_s = {
        "snapshot": median(mon["snapshot"]),
        "param_stats": median(mon["param_stats"]),
        # both logged steps: the same data and log block but for the per-layer figures
        "group_norms": median(mon["outside_logged"]) - median(plain["outside_logged"]),
    }
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
        "outside_train_step_s": {
            variant: {kind: median(c[f"outside_{kind}"]) for kind in ("logged", "other")}
            for variant, c in (("monitored", mon), ("plain", plain))
        },
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
        "| model | snapshot s | param + update sums s | per-layer norms, log block s | pieces / step "
        "| always: forward+backward s | grad stats s | clip+step s | missing from step_time_s, s per window (monitored / plain) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
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
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, alternating order")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/monitor.json"))
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 2 * LOG_INTERVAL:
        parser.error(f"--steps must be at least {2 * LOG_INTERVAL} (the first {LOG_INTERVAL} are warm-up)")

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
                    runs[variant].append(run_once(model, variant == "monitored", steps, args.threads, corpus, work))
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
    record = {
        "header": header, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "platform": platform.platform(), "processor": platform.processor(), "goal_percent": GOAL_PERCENT,
        "results": results,
    }  # fmt: skip
    write_report(args.out, record)


if __name__ == "__main__":
    main()
