"""Loggers: readable step lines through `logging` (console and logs/rank{R}.log), the first lines of a
run, wandb's mode, name, group and tags, sectioned metric names, and TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import QUICK, read_metrics, run_cli

from trainer.__main__ import compose_config
from trainer.checkpoint import step_dir_name
from trainer.config import ConfigError, LoggerConfig
from trainer.loggers import (
    Loggers,
    human,
    human_bytes,
    human_duration,
    job_name,
    sweep_group,
    wandb_mode,
    wandb_names,
)
from trainer.loop import console_line, train

STEP_LINE = re.compile(
    r"step (\d+)/\d+ \| loss [\d.]+ (\| val_loss [\d.]+ )?\| lr [\d.e-]+ \| grad_norm [\d.]+ \| [\d.]+k? tok/s "
    r"\([\d.]+k? target\) \| MFU [\d.]+% \| peak mem [\d.]+ [kMG]B \| \d\d:\d\d:\d\d \| elapsed \d+:\d\d:\d\d"
    r" \| ETA \d+:\d\d:\d\d"
)


def wandb_records(path: Path):
    """The protobuf records of a wandb run file (run-ID.wandb): LevelDB's log format, 32 KiB blocks of
    chunks (checksum 4 bytes, length 2, type 1: full, first, middle, last) after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            return
        chunks = data[pos + 7 : pos + 7 + length] if kind in (1, 2) else chunks + data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            yield record


def wandb_run(offline_dir: Path) -> tuple[object, list[dict]]:
    """(the run record: display_name, run_group, tags; the logged rows) of an offline run. wandb's
    service may still be writing the file when finish() returns: read it once it holds the exit record."""
    path, deadline = next(offline_dir.glob("run-*.wandb")), time.monotonic() + 30
    records = list(wandb_records(path))
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.1)
        records = list(wandb_records(path))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    items = [
        [(i.key or "/".join(i.nested_key), i.value_json) for i in r.history.item] for r in records if r.history.item
    ]
    rows = [{key: json.loads(value) for key, value in row if not key.startswith("_")} for row in items]
    return run, rows


def test_numbers_read_with_units() -> None:
    assert f"{human(15300)} tok/s" == "15.3k tok/s"
    assert (human(950), human(999.7), human(2.5e6), human(0.5)) == ("950", "1k", "2.5M", "0.5")
    assert (human_bytes(4.2e9), human_bytes(3.12e8), human_bytes(1.5e12)) == ("4.2 GB", "312 MB", "1.5 TB")
    assert (human_duration(65), human_duration(90061.4)) == ("0:01:05", "25:01:01")


def test_a_step_line_has_time_throughput_mfu_and_memory() -> None:
    metrics = {
        "step": 10, "loss": 4.69123, "lr": 3e-4, "grad_norm": 0.81234, "skipped_steps": 0, "tokens_per_s": 15300.0,
        "throughput/target_tokens_per_s": 14900.0, "throughput/mfu": 0.1234, "memory/peak_gb": 4.2,
    }  # fmt: skip
    line = console_line(metrics, 600, 65.0, 3840.0)
    assert re.fullmatch(
        r"step 10/600 \| loss 4\.691 \| lr 0\.0003 \| grad_norm 0\.8123 \| 15\.3k tok/s \(14\.9k target\) \| "
        r"MFU 12\.3% \| peak mem 4\.2 GB \| \d\d:\d\d:\d\d \| elapsed 0:01:05 \| ETA 1:04:00",
        line,
    ), line
    skipped = console_line({**metrics, "skipped_steps": 3, "spike/loss": 1, "spike/action": "skip"}, 600, 1.0, None)
    assert "| skipped_steps 3 |" in skipped and skipped.endswith("| elapsed 0:00:01 | SPIKE (skip)")


def test_wandb_names_come_from_the_hydra_job() -> None:
    choices = {"model": "gpt2", "parallel": "fsdp", "data": "stdlib", "experiment": None}
    overrides = [
        "model=gpt2", "parallel=fsdp", "optim.lr=3e-4", "data.cache_dir=/tmp/cache", "train.log_interval=1",
        "logger.project=x", "train.compile=true", "model.bias=false", "model.pretrained=/models/Llama-3.1-8B",
    ]  # fmt: skip
    assert job_name(choices, overrides) == "gpt2-fsdp-lr3e-4-compile-no_bias-Llama-3.1-8B"
    assert sweep_group("multirun/2025-01-02/12-30-00") == "2025-01-02_12-30-00"  # Hydra's default layout
    assert sweep_group("/scratch/sweeps/lr") == "lr"


def test_outside_hydra_the_run_dir_names_the_run_and_logger_keys_override(tmp_path: Path) -> None:
    assert wandb_names(LoggerConfig(), tmp_path / "14-03-59") == ("14-03-59", None, [])
    chosen = LoggerConfig(wandb_name="baseline", wandb_group="ablation", wandb_tags=["a", "b"])
    assert wandb_names(chosen, tmp_path / "14-03-59") == ("baseline", "ablation", ["a", "b"])


def test_auto_mode_is_wandbs_decision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """WANDB_MODE is handed to wandb; without it, wandb's own credential lookup decides: none here, so
    offline. An explicit logger.mode is used as it is."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto") == (None, "WANDB_MODE=offline")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode("auto")[0] == "offline"
    assert wandb_mode("online") == ("online", "logger.mode=online")


def test_credentials_for_a_self_hosted_server_run_online(tmp_path: Path) -> None:
    """A netrc entry for WANDB_BASE_URL's host is credentials (wandb's lookup, not a grep for api.wandb.ai)."""
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine wandb.example.com\n  login user\n  password {'b' * 40}\n")
    netrc.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(NETRC=str(netrc), WANDB_BASE_URL="https://wandb.example.com", HOME=str(tmp_path))
    code = "from trainer.loggers import wandb_mode; print(wandb_mode('auto'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "('online', 'wandb found credentials')", done.stderr[-2000:]


def test_tensorboard_without_the_package_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError) as refused:
        LoggerConfig(tensorboard=True)
    assert str(refused.value) == (
        'logger.tensorboard=true needs TensorBoard: pip install -e ".[tensorboard]" (or logger.tensorboard=false)'
    )
    LoggerConfig(tensorboard=False)  # the default needs nothing


def test_one_row_reaches_jsonl_wandb_and_tensorboard_with_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An online start that fails runs offline (said in one line, with the sync command); metrics.jsonl
    holds exactly what wandb received: the contract keys and their train/ val/ copies; TensorBoard
    has the sectioned names with the same values, step as x."""
    pytest.importorskip("tensorboard")
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    real_init = wandb.init

    def no_network(mode: str | None = None, **kwargs):
        if mode != "offline":
            raise wandb.errors.CommError("no network")
        return real_init(mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", no_network)
    caplog.set_level(logging.INFO, logger="trainer")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = LoggerConfig(mode="online", tensorboard=True, progress_bar=False)
    loggers = Loggers(cfg, run_dir, {"seed": 1}, max_steps=4)
    common = {"tokens_per_s": 1000.0, "throughput/tokens_per_s": 1000.0, "spike/action": "log"}
    loggers.log({"step": 2, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "grad_norm/head": 0.25, **common})
    loggers.log({"step": 4, "loss": 2.25, "lr": 5e-4, "grad_norm": math.nan, "val_loss": 2.375, **common})
    loggers.close()

    offline = next((run_dir / "wandb").glob("offline-run-*"))
    assert (
        f"wandb: offline (could not start online: CommError: no network), run 'run'; upload it with: wandb sync "
        f"{offline}"
    ) in caplog.messages
    rows = read_metrics(run_dir)
    assert rows[0]["train/loss"] == rows[0]["loss"] == 2.5 and rows[1]["val/loss"] == rows[1]["val_loss"] == 2.375
    assert rows[1]["grad_norm"] == rows[1]["train/grad_norm"] == "nan"
    run, logged = wandb_run(offline)
    assert (run.display_name, run.run_group, list(run.tags)) == ("run", "", [])
    assert logged == rows  # exactly the same rows

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["train/loss"] == [(2, 2.5), (4, 2.25)] and scalars["val/loss"] == [(4, 2.375)]
    assert scalars["grad_norm/head"] == [(2, 0.25)] and scalars["throughput/tokens_per_s"] == [(2, 1000), (4, 1000)]
    assert scalars["train/grad_norm"][0] == (2, 0.5) and math.isnan(scalars["train/grad_norm"][1][1])
    assert not {"loss", "val_loss", "tokens_per_s", "step"} & scalars.keys()  # wandb's hidden copies: not shown


def test_first_lines_say_where_and_whether_it_resumed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trainer")
    run_dir = tmp_path / "run"

    def cfg(*extra: str):
        small = [
            "train.log_interval=1",
            "train.micro_batch_size=4",
            "train.eval_batches=1",
            "data.synthetic_tokens=20000",
        ]
        return compose_config([*QUICK, *small, f"data.cache_dir={tmp_path / 'cache'}", *extra])[0]

    train(cfg("train.max_steps=1"), run_dir)
    assert caplog.messages[0] == f"run dir: {run_dir} | logs: console only (no log file outside `python -m trainer`)"
    assert "train.resume=none: starting fresh" in caplog.messages
    assert "wandb: off (logger.wandb=false)" in caplog.messages
    caplog.clear()
    train(cfg("train.max_steps=3", "train.resume=auto"), run_dir)
    resumed = f"resumed from {run_dir / 'checkpoints' / step_dir_name(1)} at step 1 (train.resume=auto)"
    assert resumed in caplog.messages
    steps = [m for m in caplog.messages if m.startswith("step ")]
    assert [STEP_LINE.fullmatch(m)[1] for m in steps] == ["2", "3"], steps


@pytest.mark.heavy
def test_a_sweep_job_logs_its_lines_and_names_its_wandb_run(tmp_path: Path) -> None:
    """`python -m trainer -m ...` (a sweep of one job), wandb offline (WANDB_MODE=offline): the first
    lines, the step lines on the console and in logs/rank0.log, and the wandb run's name, group
    (the sweep) and tags (the config-group choices) in its offline run file."""
    sweep = tmp_path / "lr-sweep"
    args = [a for a in QUICK if a != "logger.wandb=false"]
    done = run_cli(
        "-m", *args, "train.max_steps=4", "train.log_interval=2", "optim.lr=3e-3", "train.resume=auto",
        f"data.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    job = sweep / "0"
    lines = done.stdout.splitlines()
    name = "synthetic-n_layer2-n_embd64-seq_len32-no_bias-max_steps4-lr0.003"  # the sweeper writes 3e-3 as 0.003
    tags = ["data=synthetic", "experiment=synthetic", "logger=default", "lora=none", "model=tiny", "objective=sft",
            "optim=adamw", "parallel=none", "precision=fp32"]  # fmt: skip
    offline = next((job / "wandb").glob("offline-run-*"))
    assert f"run dir: {job} | logs: {job / 'logs' / 'rank0.log'}" in lines
    assert f"train.resume=auto: no checkpoint in {job / 'checkpoints'}: starting fresh" in lines
    assert (
        f"wandb: offline (WANDB_MODE=offline), run '{name}', group 'lr-sweep', tags {','.join(tags)}; "
        f"upload it with: wandb sync {offline}"
    ) in lines
    steps = [line for line in lines if line.startswith("step ")]
    assert [STEP_LINE.fullmatch(line)[1] for line in steps] == ["2", "4"], steps
    logged = (job / "logs" / "rank0.log").read_text()
    assert all(f"[trainer][INFO] - {line}\n" in logged for line in steps)
    run, rows = wandb_run(offline)
    assert (run.display_name, run.run_group, list(run.tags)) == (name, "lr-sweep", tags)
    assert rows == read_metrics(job) and rows[-1]["val/loss"] == rows[-1]["val_loss"]
