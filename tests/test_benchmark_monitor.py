"""benchmarks/monitor.py: the figures by hand from made-up probes, and the probe on one tiny real
run (no timings asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import monitor
from benchmarks.monitor import LOG_INTERVAL, Probe

STEPS = 2 * LOG_INTERVAL  # one warm-up window, one measured window


def made_up_probe(monitored: bool, logged_s: float, log_block_s: float) -> Probe:
    """A probe as a run of STEPS steps would leave it: a step takes 1 s, a logged step logged_s;
    train_step's pieces take all of it but 0.01 s outside train_step (log_block_s on a logged step)."""
    probe = Probe(STEPS)
    probe.stamps = [0.0]
    for step in range(1, STEPS + 1):
        logged = step % LOG_INTERVAL == 0
        seconds = logged_s if logged else 1.0
        probe.stamps.append(probe.stamps[-1] + seconds)
        outside = log_block_s if logged else 0.01
        timings = {"forward_backward": 0.5, "grad_stats": 0.1, "snapshot": 0.0}
        if monitored and logged:
            timings.update(snapshot=0.05, param_stats=0.15)
        timings["clip_and_step"] = seconds - outside - sum(timings.values())
        probe.timings.append(timings)
        if logged:  # the loop's own step time misses 0.001 s per window
            window_s = (LOG_INTERVAL - 1) * 1.0 + seconds
            probe.rows.append({"step": step, "throughput/step_time_s": (window_s - 0.001) / LOG_INTERVAL})
    probe.n_params = 1000
    return probe


def test_summarize_splits_a_monitored_step_into_its_pieces() -> None:
    runs = {
        # monitored steps take 0.3 s more; their log block 0.01 s more than the plain run's
        # (the per-layer figures)
        "monitored": [made_up_probe(True, logged_s=1.3, log_block_s=0.03)],
        "plain": [made_up_probe(False, logged_s=1.0, log_block_s=0.02)],
    }
    r = monitor.summarize("tiny", runs, LOG_INTERVAL)
    assert r["step_s"] == pytest.approx(1.0)
    assert r["monitored_step_s"] == pytest.approx(1.3)
    assert r["monitor_extra_s"] == pytest.approx(0.3)
    assert r["amortised_percent"] == pytest.approx(3.0)  # 0.3 s once per 10 steps of 1 s
    assert r["pieces_s"] == pytest.approx({"snapshot": 0.05, "param_stats": 0.15, "group_norms": 0.01})
    assert r["pieces_total_s"] == pytest.approx(0.21)
    assert r["always_s"]["forward_backward"] == pytest.approx(0.5)
    assert r["outside_train_step_s"]["plain"] == pytest.approx({"logged": 0.02, "other": 0.01})
    assert r["unlogged_s_per_window"]["plain"] == pytest.approx(0.001)
    assert r["monitored_steps_measured"] == 1  # step 20: step 10 is warm-up
    assert r["within_goal"]
    table = monitor.markdown_tables([r]).splitlines()
    assert table[2].startswith("| tiny | 0.00M | 1.000 | 1.300 | +0.300 | 0.210 | +3.00 |")
    assert table[6].startswith("| tiny | 0.0500 | 0.1500 | 0.0100 | 21.0% |")


@pytest.mark.heavy
def test_the_probe_sees_every_step_and_stops_the_run(tmp_path: Path) -> None:
    from trainer.__main__ import compose_config
    from trainer.loop import train

    cfg, _ = compose_config(
        [
            "model=tiny", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data=synthetic",
            f"data.cache_dir={tmp_path / 'cache'}", "train.seq_len=16", "train.micro_batch_size=2",
            f"train.log_interval={LOG_INTERVAL}", f"train.max_steps={STEPS + 1}",
            "train.eval_interval=1000000000", "train.device=cpu", "logger=none",
            "logger.progress_bar=false",
        ]
    )  # fmt: skip
    probe = Probe(STEPS)
    train(cfg, tmp_path / "run", callbacks=(probe,))

    assert len(probe.timings) == len(probe.stamps) - 1 == STEPS  # stopped after STEPS, not max_steps
    assert not (tmp_path / "run" / "checkpoints").exists()  # a stopped run writes no final checkpoint
    for step, timings in enumerate(probe.timings, start=1):
        assert set(monitor.ALWAYS) <= set(timings)
        # monitor.interval=null: per-layer statistics on the logged steps only
        assert ("param_stats" in timings) == (step % LOG_INTERVAL == 0)
    assert [row["step"] for row in probe.rows] == [LOG_INTERVAL, STEPS]
    assert all("grad_norm/embed" in row and "update_ratio/head" in row for row in probe.rows)
    assert probe.n_params > 0 and probe.device == "cpu"
