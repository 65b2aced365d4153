"""Every shipped config composes into the typed schema; bad input stops with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.__main__ import CONFIG_DIR, compose_config, preflight
from trainer.config import Config, ConfigError

GROUPS = ["model", "data", "optim", "parallel", "precision", "lora", "logger", "experiment"]


def shipped_options() -> list[tuple[str, str]]:
    return [
        (group, path.stem)
        for group in GROUPS
        for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
    ]


def test_default_composes() -> None:
    cfg, _ = compose_config([])
    assert isinstance(cfg, Config)
    assert cfg.model.name == "tiny" and cfg.data.source == "stdlib" and cfg.parallel.strategy == "none"


def test_every_group_has_options() -> None:
    options = shipped_options()
    assert {group for group, _ in options} >= {"model", "data", "optim", "parallel", "precision", "logger"}


@pytest.mark.parametrize("group,option", shipped_options())
def test_every_shipped_config_composes(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option in ("files", "hf"):
        overrides.append("data.path=somewhere")
    if group == "model":  # big presets have long contexts; the default seq_len fits them all
        overrides.append("train.seq_len=64")
    cfg, _ = compose_config(overrides)
    assert isinstance(cfg, Config)
    if group == "model":
        assert cfg.model.name == option
    if group == "data":
        assert cfg.data.source == {"files": "files", "hf": "hf", "synthetic": "synthetic"}.get(option, "stdlib")


def test_every_shipped_yaml_starts_with_its_command() -> None:
    for path in CONFIG_DIR.rglob("*.yaml"):
        lines = [line for line in path.read_text().splitlines() if not line.startswith("# @package")]
        assert lines[0].startswith(("# python -m trainer", "# torchrun ")), path


def test_overrides_reach_the_dataclasses() -> None:
    cfg, _ = compose_config(["train.max_steps=7", "optim.lr=3e-4", "model.n_layer=2", "data.tokenizer=bpe"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 3e-4 and cfg.model.n_layer == 2
    assert cfg.data.tokenizer == "bpe"


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["train.max_stepz=3"], "unknown config key 'train.max_stepz'"),
        (["trian.max_steps=3"], "unknown config key 'trian'"),
        (["train.max_steps=abc"], "train.max_steps"),
        (["train.max_steps=-1"], "train.max_steps must be >= 0"),
        (["model.n_head=3"], "model.n_head=3 does not divide model.n_embd=128"),
        (["train.seq_len=4096"], "train.seq_len=4096 exceeds the model's context"),
        (["model=nosuchmodel"], "Could not find 'model/nosuchmodel'"),
        (["data=files", "data.path=/no/such/corpus"], "data.path=/no/such/corpus does not exist"),
        (["data=files"], "data.source=files needs data.path"),
        (["model.norm=batchnorm"], "model.norm='batchnorm'"),
        (["optim.clip_grad_norm=-1"], "optim.clip_grad_norm must be >= 0"),
        (["model.pretrained=/no/such/checkpoint"], "model.pretrained=/no/such/checkpoint is not a directory"),
    ],
)
def test_bad_input_is_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        preflight(overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_multirun_sweep_is_validated_by_its_first_value() -> None:
    preflight(["-m", "optim.lr=1e-3,3e-4"])
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        preflight(["-m", "optim.lrr=1e-3,3e-4"])


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_bad_key_exits_2_with_one_line_and_no_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train.max_stepz=3", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'train.max_stepz': check its spelling "
        "(`python -m trainer --cfg job` prints every key)"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert not run_dir.exists()


def test_cli_never_writes_over_an_existing_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run_dir / ".hydra" / "config.yaml").write_text("precious: true\n")
    result = run_cli("train.max_steps=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    assert "already holds a run" in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "precious: true\n"
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "metrics.jsonl"]


def test_cli_empty_corpus_stops_before_training(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_text("")
    result = run_cli(
        "data=files", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}", "logger.wandb=false", cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "empty" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_tokenizer_larger_than_model_vocabulary(tmp_path: Path) -> None:
    result = run_cli(
        "data=synthetic", "data.synthetic_vocab=300", "model.vocab_size=256",
        f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", "logger.wandb=false", cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: the tokenizer's vocabulary (300) exceeds model.vocab_size=256: set model.vocab_size=300 "
        "or larger (or null), or use a smaller data.tokenizer"
    ]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
