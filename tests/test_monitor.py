"""Monitoring: per-layer statistics that partition the global norm, spikes and their policies."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import QUICK, read_metrics, run_cli

import trainer.loop
import trainer.monitor
import trainer.run
from trainer.__main__ import compose_config, preflight
from trainer.config import ConfigError
from trainer.loop import train
from trainer.monitor import SpikeDetector, Throughput, cpu_peak, group_order, store_peak


def config(tmp_path: Path, *extra: str):
    cfg, _ = compose_config(
        [
            *QUICK,
            "logger.progress_bar=false",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.log_interval=5",
            "train.eval_interval=1000",
            "optim.lr=3e-3",
            *extra,
        ]
    )
    return cfg


def test_groups_partition_the_global_norm_and_clipping_is_logged(tmp_path: Path) -> None:
    train(config(tmp_path, "train.max_steps=10", "optim.clip_grad_norm=0.5"), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [5, 10]
    expected_groups = [
        "embed",
        "block.0.attn",
        "block.0.mlp",
        "block.0.norm",
        "block.1.attn",
        "block.1.mlp",
        "block.1.norm",
        "head",
    ]
    for row in rows:
        groups = [k.split("/", 1)[1] for k in row if k.startswith("grad_norm/")]
        assert sorted(groups, key=group_order) == expected_groups
        assert sum(row[f"grad_norm/{g}"] ** 2 for g in groups) == pytest.approx(row["grad_norm"] ** 2, rel=1e-5)
        assert row["clip_coef"] == pytest.approx(min(1.0, 0.5 / (row["grad_norm"] + 1e-6)))
        assert row["grad_norm_clipped"] == pytest.approx(row["grad_norm"] * row["clip_coef"])
        for g in groups:
            assert row[f"param_norm/{g}"] > 0 and 0 < row[f"update_ratio/{g}"] < 1
        assert row["throughput/tokens_per_s"] > 0 and 0 < row["throughput/mfu"] < 1
        assert row["memory/peak_gb"] > 0 and row["spike/count"] == 0
        parts = sum(row[f"throughput/{k}_time_s"] for k in ("data", "compute", "optimizer"))
        assert parts <= row["throughput/step_time_s"] * 1.01


def test_spike_detector_flags_a_jump_and_keeps_it_out_of_the_baseline() -> None:
    rng = np.random.default_rng(0)
    detector = SpikeDetector(threshold=6.0, warmup=20)
    flags = [detector.update(3.0 + 0.05 * float(rng.standard_normal()))[0] for _ in range(300)]
    assert not any(flags)  # noise is not a spike
    mean, var = detector.mean, detector.var
    spike, z, baseline = detector.update(5.0)
    assert spike and z > 6 and baseline == pytest.approx(3.0, abs=0.05)
    assert (detector.mean, detector.var) == (mean, var)  # the spike did not move the baseline
    assert detector.update(math.inf)[0]
    early = SpikeDetector(threshold=6.0, warmup=20)
    assert not any(early.update(v)[0] for v in [1.0, 1.0, 50.0])  # still warming up


def test_a_blow_up_during_warmup_does_not_hide_the_next_spike() -> None:
    """A value far out during warmup is not flagged, but enters the baseline clipped to the
    threshold: without the clip its square would dominate the spread for ~100 steps (beta 0.95)
    and a later 8x jump would pass unseen."""
    rng = np.random.default_rng(0)
    detector = SpikeDetector(threshold=6.0, warmup=20)
    noise = lambda: 0.05 * float(rng.standard_normal())  # noqa: E731
    series = [noise() for _ in range(9)] + [math.log(28.0)] + [noise() for _ in range(14)]
    assert not any(detector.update(v)[0] for v in series)  # the blow-up falls in warmup
    assert math.sqrt(detector.var) < 0.3  # unclipped, log(28)^2 would leave a spread near 0.6
    spike, z, _ = detector.update(math.log(8.0))  # an 8x jump in the grad norm, 14 steps later
    assert spike and z > 6


CORRUPT_STEP = 24
# The runs that meet the corrupt batch: at lr 1e-3 this tiny model trains without spikes of its own
# (at 3e-3 some init seeds blow up for a step or two right after warmup).
POLICY = ("optim.warmup_steps=5", "optim.lr=1e-3")


@pytest.fixture
def corrupt_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch of step CORRUPT_STEP replaced by garbage (every target the corpus's rarest token):
    the kind of batch that makes a loss spike."""
    real_build = trainer.run.build_data

    def build(*args, **kwargs):
        data = real_build(*args, **kwargs)
        real_get, calls = data.train.get_batch, {"n": 0}
        rarest = int(np.bincount(np.asarray(data.train.tokens), minlength=data.vocab_size).argmin())

        def get_batch(indices):
            calls["n"] += 1
            x, y = real_get(indices)
            if calls["n"] == CORRUPT_STEP:
                g = torch.Generator().manual_seed(0)
                x, y = torch.randint(0, data.vocab_size, x.shape, generator=g), torch.full_like(y, rarest)
            return x, y

        data.train.get_batch = get_batch
        return data

    monkeypatch.setattr(trainer.run, "build_data", build)


def spike_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("spike/loss") or r.get("spike/grad_norm")]


@pytest.mark.usefixtures("corrupt_batch")
def test_spike_policy_log_records_the_event(tmp_path: Path) -> None:
    train(config(tmp_path, "train.max_steps=30", *POLICY), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    (event,) = spike_rows(rows)
    assert event["step"] == CORRUPT_STEP and event["spike/action"] == "log"
    assert event["spike/grad_norm"] == 1 and event["spike/grad_norm_z"] > 6
    # 3.0x here (3.4x under the init drawn before its per-block generators: the same seed, other values)
    assert event["grad_norm"] > 2 * event["spike/grad_norm_baseline"]
    assert event["loss"] > event["spike/loss_baseline"]
    assert rows[-1]["spike/count"] == 1 and rows[-1]["skipped_steps"] == 0


@pytest.mark.usefixtures("corrupt_batch")
def test_spike_policy_skip_leaves_weights_and_optimizer_untouched(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        "train.max_steps=26",
        *POLICY,
        "monitor.spike.action=skip",
        "checkpoint.interval=1",
        "checkpoint.keep=10",
    )
    train(cfg, tmp_path / "run")
    (event,) = spike_rows(read_metrics(tmp_path / "run"))
    assert event["step"] == CORRUPT_STEP and event["spike/action"] == "skip"
    ckpt = tmp_path / "run" / "checkpoints"
    before, after, later = (
        ckpt / f"step_{s:08d}" / "model" for s in (CORRUPT_STEP - 1, CORRUPT_STEP, CORRUPT_STEP + 1)
    )
    shards = sorted(p.name for p in before.glob("*.distcp"))  # tensors (.metadata names the path)
    assert shards
    for name in shards:  # model and optimizer state, byte for byte
        assert (after / name).read_bytes() == (before / name).read_bytes(), name
    assert any((later / n).read_bytes() != (after / n).read_bytes() for n in shards)  # training went on


@pytest.mark.usefixtures("corrupt_batch")
def test_spike_policy_rollback_reloads_and_skips_the_data(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        "train.max_steps=30",
        *POLICY,
        "monitor.spike.action=rollback",
        "checkpoint.interval=5",
        "checkpoint.keep=3",
        "train.log_interval=1",
    )
    train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    (event,) = spike_rows(rows)
    assert event["step"] == CORRUPT_STEP and event["spike/action"] == "rollback"
    steps = [r["step"] for r in rows]
    after = steps[steps.index(CORRUPT_STEP) + 1 :]
    assert after == list(range(21, 31))  # back to the checkpoint at step 20, then on to the end
    first = {r["step"]: r["loss"] for r in rows[: steps.index(CORRUPT_STEP)]}
    again = {r["step"]: r["loss"] for r in rows[steps.index(CORRUPT_STEP) + 1 :]}
    assert all(first[s] != again[s] for s in (21, 22, 23))  # other data: the window was skipped


def test_rollbacks_that_spike_again_stop_the_run(tmp_path: Path) -> None:
    """z = 0.01 flags every step: each rollback to step 1 meets a spike at step 2 again (fresh data,
    the same model). The run stops after monitor.spike.max_rollbacks of them instead of looping."""
    cfg = config(
        tmp_path, "train.max_steps=6", "monitor.spike.action=rollback", "monitor.spike.z=0.01",
        "monitor.spike.warmup=1", "monitor.spike.max_rollbacks=2", "checkpoint.interval=1", "train.log_interval=1",
    )  # fmt: skip
    with pytest.raises(
        trainer.loop.TrainingError, match=r"^spike at step 2 again after 2 rollbacks in a row to step_0+1 "
    ):
        train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 2, 2]  # the spike, then two rollbacks that spiked again


def test_measuring_the_peak_leaves_the_global_rng_alone() -> None:
    """A run that measures the CPU peak and one that reads it from the cache draw the same dropout masks."""
    state = torch.get_rng_state()
    trainer.monitor.measured_matmul_flops(64, repeats=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_clean_run_raises_no_false_spike(tmp_path: Path) -> None:
    train(config(tmp_path, "train.max_steps=150", "train.log_interval=25"), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["step"] == 150 and rows[-1]["spike/count"] == 0


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["monitor.interval=0"], "monitor.interval must be positive"),
        (["monitor.spike.z=0"], "monitor.spike.z must be positive"),
        (["monitor.spike.action=rollback"], "monitor.spike.action=rollback needs checkpoints"),
        (["monitor.spike.action=skip", "parallel=zero2"], "monitor.spike.action=skip is available for none"),
    ],
)
def test_bad_monitor_input_is_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        preflight(overrides)


def test_mfu_peak_table_tells_the_parts_apart() -> None:
    """Datasheet dense bf16 peaks by the names torch.cuda.get_device_name gives; an unknown GPU has none."""
    from trainer.monitor import gpu_peak_flops

    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA H100 NVL") == 835e12
    assert gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA H200 NVL") == 835e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == gpu_peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert gpu_peak_flops("NVIDIA L40S") == 362e12 and gpu_peak_flops("NVIDIA B200") == 2250e12
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090") is None


def test_the_cpu_peak_is_measured_once_per_thread_count_and_cached(tmp_path, monkeypatch) -> None:
    """The first call measures (for real) and writes the cache; the second reads it back; another
    thread count is another key, measured on that many threads. Torch's own count is left as it was."""
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(trainer.monitor, "busy", lambda: False)
    measure, threads_seen = trainer.monitor.measured_matmul_flops, []
    monkeypatch.setattr(
        trainer.monitor, "measured_matmul_flops", lambda: threads_seen.append(torch.get_num_threads()) or measure()
    )
    before = torch.get_num_threads()
    first, again = cpu_peak(1), cpu_peak(1)
    assert threads_seen == [1] and again.flops == first.flops and again.source == first.source
    assert math.isfinite(first.flops) and first.flops > 1e6  # FLOP/s: any CPU does millions
    path = tmp_path / "cache" / "cpu_peak.json"
    entries = json.loads(path.read_text())
    assert [entry["flops"] for entry in entries.values()] == [first.flops]
    assert list(entries) == [first.cache_key] and first.cache_key.endswith(f"| 1 thread | torch {torch.__version__}")
    assert re.fullmatch(
        rf"CPU, 1 thread, fp32 1536x1536 matmul best of 5, measured \d{{4}}-\d\d-\d\d, cached in {re.escape(str(path))}",
        first.source,
    )

    two = cpu_peak(2)
    assert threads_seen == [1, 2] and torch.get_num_threads() == before
    assert two.cache_key == first.cache_key.replace("| 1 thread |", "| 2 threads |")
    assert {k: e["flops"] for k, e in json.loads(path.read_text()).items()} == {
        first.cache_key: first.flops,
        two.cache_key: two.flops,
    }


def test_an_unreadable_cache_is_measured_again_and_rewritten(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(trainer.monitor, "busy", lambda: False)
    monkeypatch.setattr(trainer.monitor, "measured_matmul_flops", lambda: 5e10)
    (tmp_path / "cpu_peak.json").write_text('{"torn')
    peak = cpu_peak(1)
    assert peak.flops == 5e10 and json.loads((tmp_path / "cpu_peak.json").read_text())[peak.cache_key]["flops"] == 5e10


def test_a_peak_measured_on_a_busy_machine_is_measured_again_once_it_is_quiet(tmp_path, monkeypatch) -> None:
    """Other processes on the cores make the matmul read low: such a figure is cached as provisional
    (not measured again while the machine stays busy) and replaced by the first quiet measurement,
    unless a run has raised it above that."""
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path))
    rates, is_busy = [2e10, 8e10, 1e10], [True]
    monkeypatch.setattr(trainer.monitor, "busy", lambda: is_busy[0])
    monkeypatch.setattr(trainer.monitor, "measured_matmul_flops", lambda: rates.pop(0))
    first, still_busy = cpu_peak(1), cpu_peak(1)
    assert first.flops == still_busy.flops == 2e10 and len(rates) == 2
    assert ", on a busy machine (measured again when it is quiet), cached in " in still_busy.source
    is_busy[0] = False
    quiet = cpu_peak(1)
    assert (
        quiet.flops == 8e10
        and "on a busy machine" not in quiet.source
        and cpu_peak(1).flops == 8e10
        and len(rates) == 1
    )
    assert json.loads((tmp_path / "cpu_peak.json").read_text())[quiet.cache_key]["busy"] is False

    raised = {"flops": 3e10, "how": "raised to a training step's rate", "date": "2026-01-01", "busy": True}
    store_peak(tmp_path / "cpu_peak.json", quiet.cache_key, raised)
    assert cpu_peak(1).flops == 3e10 and not rates  # measured again (1e10): the raised figure stands
    assert json.loads((tmp_path / "cpu_peak.json").read_text())[quiet.cache_key] == {**raised, "busy": False}


def test_a_window_faster_than_the_peak_reads_one_and_raises_the_cached_peak(tmp_path, monkeypatch, caplog) -> None:
    """MFU above 1 is impossible: the window reads 1.0, the observed rate becomes the peak (in the
    cache too, for a measured CPU peak), and the warning is said once."""
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(trainer.monitor, "busy", lambda: False)
    monkeypatch.setattr(trainer.monitor, "measured_matmul_flops", lambda: 1e3)  # a deliberately tiny peak
    peak = cpu_peak(1)
    meter = Throughput(flops_per_token=1e6, peak=peak, world_size=2)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        readings = []
        for tokens in (1000, 3000, 10):  # faster, faster again, then slower than the raised peak
            meter.reset()
            meter.add(tokens, tokens, 0.0, {})
            readings.append(meter.metrics()["throughput/mfu"])
    assert readings[:2] == [1.0, 1.0] and 0 < readings[2] < 1
    assert peak.flops > 1e6 and peak.raised  # each rank's share: 1e6 FLOPs x 3000 tokens / 2 ranks in microseconds
    cached = json.loads((tmp_path / "cpu_peak.json").read_text())[peak.cache_key]
    assert cached["flops"] == peak.flops and cached["how"] == "raised to a training step's rate"
    assert cpu_peak(1).flops == peak.flops  # the next run starts from the raised peak
    [warning] = [r.getMessage() for r in caplog.records]
    assert (
        warning.startswith("MFU: a step ran at ")
        and " per rank, above the peak of 1000 FLOP/s (CPU, 1 thread" in warning
    )
    assert warning.endswith("): it was under-measured; MFU is now against the step's rate, cached for the next run")


def test_a_tiny_configured_peak_never_logs_mfu_above_one(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer"):
        train(config(tmp_path, "train.max_steps=10", "monitor.peak_flops=1000"), tmp_path / "run")
    mfu = [row["throughput/mfu"] for row in read_metrics(tmp_path / "run")]
    assert len(mfu) == 2 and mfu[0] == 1.0 and 0 < mfu[1] <= 1.0
    [warning] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MFU:")]
    assert warning.endswith(
        "per rank, above the peak of 1000 FLOP/s (monitor.peak_flops): it is too low; MFU is now against the "
        "step's rate (monitor.peak_flops sets it)"
    )


def test_the_first_lines_state_the_cpu_peak(tmp_path: Path, trainer_cache_dir: Path) -> None:
    """A real run says its peak before its first step, the figure in the (test session's) cache, and logs no MFU above 1."""
    run_dir = tmp_path / "run"
    done = run_cli(
        *QUICK, "train.max_steps=3", "train.log_interval=1", "logger.progress_bar=false",
        f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (done.stdout + done.stderr).splitlines()
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step 1/3"))
    [(i, stated)] = [(i, line) for i, line in enumerate(lines) if line.startswith("MFU peak:")]
    assert i < first_step
    path = trainer_cache_dir / "cpu_peak.json"
    found = re.fullmatch(
        r"MFU peak: ([\d.]+) GFLOP/s per rank \(CPU, 1 thread, (fp32 1536x1536 matmul best of 5|raised to a training "
        rf"step's rate), measured \d{{4}}-\d\d-\d\d(, on a busy machine \(measured again when it is quiet\))?, "
        rf"cached in {re.escape(str(path))}\)",
        stated,
    )
    assert found, stated
    [entry] = [e for key, e in json.loads(path.read_text()).items() if "| 1 thread |" in key]
    stated_flops = float(found[1]) * 1e9
    raised_since = entry["how"].startswith("raised") and entry["flops"] > stated_flops  # by this run's own steps
    assert stated_flops == pytest.approx(entry["flops"], rel=1e-3) or raised_since
    assert all(0 < row["throughput/mfu"] <= 1.0 for row in read_metrics(run_dir))
