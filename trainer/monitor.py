"""Monitoring: turns the per-group numbers a strategy hands over into metrics, and finds spikes.

The monitor never touches gradients: strategies reduce per-group sums of squares across ranks
(shard-aware) and pass plain tensors here. Groups (embed, block.i.attn|mlp|norm, head) partition
the parameters, so sum over groups of grad_norm/<group>^2 equals grad_norm^2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import resource
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

from trainer.files import replace_text

log = logging.getLogger("trainer")

# Dense (no sparsity) bf16 tensor-core peak per GPU, FLOP/s, from the vendors' datasheets. Names as
# torch.cuda.get_device_name gives them; the first pattern that matches wins, so the NVL / PCIe parts
# come before the SXM part of the same name (an H100 PCIe is not an SXM: its MFU would read 1.31x low).
PEAK_FLOPS = (
    (r"H100.*NVL", 835e12),
    (r"H100.*PCIe", 756e12),
    (r"H100", 989e12),  # SXM5 (H100 80GB HBM3)
    (r"H200.*NVL", 835e12),
    (r"H200", 989e12),  # SXM
    (r"GH200", 989e12),
    (r"B200", 2250e12),
    (r"A100", 312e12),  # SXM4 and PCIe
    (r"L40S", 362e12),
    (r"A10G", 125e12),
)


def gpu_peak_flops(name: str) -> float | None:
    """The datasheet dense bf16 peak of the GPU called `name`, or None for a GPU not in the table."""
    return next((flops for pattern, flops in PEAK_FLOPS if re.search(pattern, name)), None)


class SpikeDetector:
    """A running baseline (EMA mean and variance) of one series; flags values far above it.

    z = (value - mean) / std. After `warmup` observations, z > threshold is a spike. Spikes do
    not enter the baseline, so one bad step cannot raise the bar for the next; during warmup,
    values beyond the threshold enter clipped to it.
    """

    def __init__(self, threshold: float, warmup: int, beta: float = 0.95, min_std: float = 1e-12) -> None:
        self.threshold, self.warmup, self.beta, self.min_std = threshold, warmup, beta, min_std
        self.mean, self.var, self.count = 0.0, 0.0, 0

    def update(self, value: float) -> tuple[bool, float, float]:
        """Returns (is_spike, z, the baseline mean this value was compared with)."""
        baseline = self.mean
        if not math.isfinite(value):
            return self.count >= self.warmup, math.inf, baseline
        if self.count == 0:
            self.mean, self.count = value, 1
            return False, 0.0, value
        # A floor on the spread (1% of the mean): a very smooth curve must not make noise a spike.
        std = max(math.sqrt(self.var), 0.01 * abs(self.mean), self.min_std)
        z = (value - self.mean) / std
        spike = self.count >= self.warmup and z > self.threshold
        if not spike:
            # Winsorised at the threshold: a blow-up during warmup (never flagged) moves the
            # baseline as if it sat at threshold x std, so it cannot inflate the spread for the rest
            # of the run and hide the next spike. After warmup every value that enters is within it.
            limit = self.threshold * std
            delta = max(-limit, min(value - self.mean, limit))
            self.mean += (1 - self.beta) * delta
            self.var = self.beta * (self.var + (1 - self.beta) * delta * delta)
            self.count += 1
        return spike, z, baseline

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


class SpikeWatch:
    """One detector for the loss, one for the grad norm, and the count of spike steps.

    The grad norm is watched in log space: its step-to-step noise is multiplicative and heavy
    tailed (a clean run's norm can double for a step), so z counts standard deviations of
    log(norm), and a spike means a jump by a large factor, not by a large amount.
    """

    def __init__(self, z: float, warmup: int) -> None:
        self.loss = SpikeDetector(z, warmup)
        self.grad_norm = SpikeDetector(z, warmup, min_std=0.05)  # at least a 5% factor
        self.count = 0

    def check(self, loss: float, grad_norm: float) -> tuple[bool, dict[str, Any]]:
        """Whether this step spiked, and its spike/* fields for the log."""
        loss_spike = self.loss.update(loss)
        log_norm = math.log(grad_norm) if grad_norm > 0 else -math.inf
        spiked_norm, z_norm, log_baseline = self.grad_norm.update(log_norm if math.isfinite(grad_norm) else math.inf)
        norm_spike = (spiked_norm, z_norm, math.exp(log_baseline))
        spiked = loss_spike[0] or norm_spike[0]
        self.count += int(spiked)
        fields = {**spike_fields("loss", *loss_spike), **spike_fields("grad_norm", *norm_spike)}
        return spiked, {**fields, "spike/count": self.count}

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.state_dict(), "grad_norm": self.grad_norm.state_dict(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.load_state_dict(state["loss"])
        self.grad_norm.load_state_dict(state["grad_norm"])
        self.count = int(state["count"])


class Throughput:
    """Tokens and host-clock seconds since the last logged step: tokens/s (all tokens, and target tokens:
    those that counted toward the loss), MFU, and where the time
    went (data, compute = forward / backward / gradient statistics, optimizer = the rest of the
    step). The window closes when the log row is built: evaluation and writing the row fall
    between windows and are not counted.

    On a GPU the host clock of a step's pieces is launch time; the device's own time is measured
    with CUDA events: one recorded when the window opens and one after each step's work is queued
    (no sync), read when the row is built (the log step has synced already):
    `throughput/device_step_time_s`."""

    def __init__(
        self, flops_per_token: float, peak: Peak, world_size: int = 1, device: torch.device | None = None
    ) -> None:
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak, world_size
        self.cuda = device is not None and device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.tokens, self.target_tokens, self.steps = 0, 0, 0
        self.seconds = {"data": 0.0, "compute": 0.0, "optimizer": 0.0}
        self.events = [self._event()] if self.cuda else []  # window start, then one per step

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # queued behind the work launched so far: no host sync
        return event

    def add(self, tokens: int, target_tokens: int, data_s: float, timings: dict[str, float]) -> None:
        """One step of `tokens` tokens, `target_tokens` of them in the loss; timings: a StepResult's pieces."""
        self.tokens += tokens
        self.target_tokens += target_tokens
        self.steps += 1
        self.seconds["data"] += data_s
        compute = timings.get("forward_backward", 0.0) + timings.get("grad_stats", 0.0)
        self.seconds["compute"] += compute
        self.seconds["optimizer"] += sum(timings.values()) - compute
        if self.cuda:
            self.events[1:] = [self._event()]  # only the window's first and latest events are read

    def metrics(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed
        return {
            "tokens_per_s": rate, "throughput/tokens_per_s": rate,
            "throughput/target_tokens_per_s": self.target_tokens / elapsed,
            "throughput/mfu": self.mfu(rate),
            "throughput/step_time_s": elapsed / self.steps,
            **{f"throughput/{k}_time_s": v / self.steps for k, v in self.seconds.items()},
            **self.device_metrics(),
        }  # fmt: skip

    def mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation: each rank's share of the model's FLOP/s over one rank's peak, at
        most 1 (a faster window raises the peak: Peak.raise_to); 0 where the peak is unknown."""
        if not self.peak.flops:
            return 0.0
        flops = self.flops_per_token * tokens_per_s / self.world_size
        if flops > self.peak.flops:
            self.peak.raise_to(flops)
        return min(1.0, flops / self.peak.flops)

    def device_metrics(self) -> dict[str, float]:
        """Seconds per step on the GPU's clock (CUDA events): from the window's start to the end of its
        last step's work, so host time after the last kernel (logging, checks) is not in it."""
        if not self.cuda or len(self.events) < 2:
            return {}
        self.events[-1].synchronize()  # host sync: already done by the log step's read-back
        return {"throughput/device_step_time_s": self.events[0].elapsed_time(self.events[-1]) / 1e3 / self.steps}


def step_metrics(result: Any, clip_grad_norm: float) -> dict[str, Any]:
    """The headline figures of one StepResult: loss, lr, norm before and after clipping, and, on
    monitor steps, per-layer gradient and parameter norms and update ratios (a host sync each)."""
    norm = result.grad_norm
    coef = min(1.0, clip_grad_norm / (norm + 1e-6)) if clip_grad_norm > 0 else 1.0
    metrics = {
        "loss": result.loss, "lr": result.lr, "grad_norm": norm, "grad_norm_clipped": norm * coef,
        "clip_coef": coef,
    }  # fmt: skip
    if result.param_sumsq:  # a monitor step
        metrics.update(group_norms("grad_norm", result.grad_sumsq))
        params = group_norms("param_norm", result.param_sumsq)
        metrics.update(params)
        for key, value in group_norms("update_ratio", result.update_sumsq).items():
            metrics[key] = value / max(params["param_norm/" + key.split("/", 1)[1]], 1e-12)
    return metrics


def group_norms(prefix: str, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """{'<prefix>/<group>': sqrt(sum of squares)} for each group (one host sync for all)."""
    if not sums:
        return {}
    names = sorted(sums, key=group_order)
    values = torch.stack([sums[n] for n in names]).sqrt().tolist()  # host sync
    return {f"{prefix}/{name}": value for name, value in zip(names, values, strict=True)}


def group_order(name: str) -> tuple[int, int, str]:
    """embed, block.0.*, block.1.*, ..., head: the order of the layers in the model."""
    if name == "embed":
        return (0, 0, "")
    if name == "head":
        return (2, 0, "")
    _, index, kind = name.split(".")
    return (1, int(index), {"attn": "a", "mlp": "b", "norm": "c"}.get(kind, kind))


# -- the peak MFU divides by: configured, a GPU's datasheet figure, or this CPU's measured matmul rate --

MATMUL_SIZE, MATMUL_REPEATS = 1536, 5  # 1536: saturates 2 threads here (512 read half that), ~0.3 s in all
PEAK_CACHE_FILE = "cpu_peak.json"


@dataclass
class Peak:
    """One rank's peak FLOP/s for MFU (0: unknown, MFU logged as 0) and where the figure comes from;
    for a measured CPU peak, its cache entry's key (a raised peak is stored there too)."""

    flops: float
    source: str
    cache_key: str | None = None
    raised: bool = False

    def __str__(self) -> str:
        if not self.flops:
            return f"unknown ({self.source}): MFU is logged as 0"
        return f"{format_flops(self.flops)} per rank ({self.source})"

    def raise_to(self, flops: float) -> None:
        """A window ran at `flops` per rank, above this peak: the observed rate becomes the peak."""
        # MFU above 1 is impossible, so a window faster than the peak proves the peak was
        # under-measured (the matmul timed while other processes shared the cores) or configured
        # too low. Clamping alone would hide that and keep reading 1.0 for every fast window; instead
        # the observed rate becomes the peak: this window reads 1.0, later ones are against it, and a
        # measured CPU peak is raised in its cache too, so the next run starts from it. Said once a run.
        if not self.raised:
            log.warning(
                f"MFU: a step ran at {format_flops(flops)} per rank, above the peak of {format_flops(self.flops)} "
                f"({self.source}): "
                + (
                    "it was under-measured; MFU is now against the step's rate, cached for the next run"
                    if self.cache_key
                    else "it is too low; MFU is now against the step's rate (monitor.peak_flops sets it)"
                )
            )
        self.flops, self.raised = flops, True
        if self.cache_key is not None:
            path = peak_cache_dir() / PEAK_CACHE_FILE
            cached = read_peaks(path).get(self.cache_key, {"flops": 0.0})
            if flops > cached["flops"]:  # another rank may be ahead
                how, today = "raised to a training step's rate", date.today().isoformat()
                store_peak(path, self.cache_key, {**cached, "flops": flops, "how": how, "date": today})


def format_flops(flops: float) -> str:
    for scale, unit in ((1e12, "TFLOP/s"), (1e9, "GFLOP/s")):
        if flops >= scale:
            return f"{flops / scale:.4g} {unit}"
    return f"{flops:.4g} FLOP/s"


def mfu_peak(device: torch.device, configured: float | None) -> Peak:
    """One rank's peak FLOP/s for MFU: configured, else a known GPU's datasheet value, else this
    CPU's fp32 matmul rate at torch's thread count now (the run's), measured once and cached."""
    if configured:
        return Peak(configured, "monitor.peak_flops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = gpu_peak_flops(name)
        if flops is None:
            log.warning(
                f"MFU: the peak of {name!r} is not in trainer/monitor.py's table: MFU is logged as 0; "
                "set monitor.peak_flops to its dense bf16 FLOP/s"
            )
            return Peak(0.0, f"{name} is not in trainer/monitor.py's PEAK_FLOPS")
        return Peak(flops, f"{name}: datasheet dense bf16, trainer/monitor.py PEAK_FLOPS")
    return cpu_peak(torch.get_num_threads())


def peak_flops(device: torch.device, configured: float | None) -> float:
    """mfu_peak's FLOP/s alone (the benchmarks' MFU)."""
    return mfu_peak(device, configured).flops


def cpu_peak(threads: int) -> Peak:
    """This CPU's fp32 matmul peak on `threads` threads: the cached figure for this CPU, thread count
    and torch version, else measured now (about 0.3 s) and cached (peak_cache_dir()). A figure
    measured on a busy machine is provisional: measured again by the first run that finds it quiet."""
    counted = f"{threads} thread{'s' * (threads != 1)}"
    key = f"{cpu_name()} | {counted} | torch {torch.__version__}"
    path = peak_cache_dir() / PEAK_CACHE_FILE
    cached = read_peaks(path).get(key)
    entry = cached
    if cached is None or (cached.get("busy") and not busy()):
        is_busy, before = busy(), torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            flops = measured_matmul_flops()
        finally:
            torch.set_num_threads(before)
        how = f"fp32 {MATMUL_SIZE}x{MATMUL_SIZE} matmul best of {MATMUL_REPEATS}"
        entry = {"flops": flops, "how": how, "date": date.today().isoformat(), "busy": is_busy}
        if cached is not None and cached["flops"] > flops:  # the busy figure, since raised by a run, stands
            entry = {**cached, "busy": False}
        store_peak(path, key, entry)
    busy_note = ", on a busy machine (measured again when it is quiet)" if entry.get("busy") else ""
    source = f"CPU, {counted}, {entry['how']}, measured {entry['date']}{busy_note}, cached in {path}"
    return Peak(entry["flops"], source, key)


def busy() -> bool:
    """Whether more is runnable than there are CPUs (the 1-minute load average above the CPU count):
    a matmul timed now reads low."""
    return hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1)


def peak_cache_dir() -> Path:
    """Per-user cache: $TRAINER_CACHE_DIR, else $XDG_CACHE_HOME/trainer, else ~/.cache/trainer."""
    if os.environ.get("TRAINER_CACHE_DIR"):
        return Path(os.environ["TRAINER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainer"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def read_peaks(path: Path) -> dict[str, dict[str, Any]]:
    """The cache's entries by key; those that are not a positive finite FLOP/s are left out (measured again)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {
        key: entry for key, entry in entries.items()
        if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float))
        and math.isfinite(entry["flops"]) and entry["flops"] > 0 and {"how", "date"} <= entry.keys()
    }  # fmt: skip


def store_peak(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Set one entry of the cache, atomically (a temp file per process: ranks may write at once).
    A cache that cannot be written is a warning: the peak is measured again next run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**read_peaks(path), key: entry}, indent=1) + "\n"
        replace_text(path, text, tmp=path.with_name(f"{path.name}.{os.getpid()}.tmp"))
    except OSError as error:
        log.warning(f"MFU: the CPU peak could not be cached in {path} ({error}): it is measured again next run")


def measured_matmul_flops(n: int = MATMUL_SIZE, repeats: int = MATMUL_REPEATS) -> float:
    """Best-of-`repeats` rate of an n x n fp32 matmul on the CPU (the CPU's practical peak), on
    torch's current thread count: the best, since other processes can only slow a repeat down."""
    # A generator of its own: drawing from torch's global one would shift the run's dropout masks
    # by whether this run measured or read the cache
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
    a @ b  # warm up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: max allocated by torch; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def spike_fields(name: str, spike: bool, z: float, baseline: float) -> dict[str, Any]:
    return {f"spike/{name}": int(spike), f"spike/{name}_z": z, f"spike/{name}_baseline": baseline}
