"""`python -m trainer.export` on checkpoints of real runs: one process (GPT-2 and Llama layouts),
and fsdp / zero2 on 2 torchrun ranks. The export must equal the weights the run consolidated
itself (checkpoints/final/model.safetensors), transformers must load it and give our logits, and
bad input must stop with one line, exit code 2 and nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.__main__ import compose_config
from trainer.checkpoint import write_manifest
from trainer.config import ModelConfig
from trainer.export import main
from trainer.loop import train
from trainer.model import GPT
from trainer.model.hf_import import hf_to_trainer, read_hf_tensors

COMMON = [
    "experiment=synthetic",
    "logger.wandb=false",
    "logger.progress_bar=false",
    "train.max_steps=3",
    "train.sample_tokens=0",
    "model.n_layer=2",
    "model.n_embd=64",
    "train.seq_len=32",
    "train.micro_batch_size=4",
]
LLAMA = [  # LlamaForCausalLM's layout
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.position=rope",
    "model.bias=false",
    "model.tie_embeddings=false",
]
REPO = Path(__file__).resolve().parent.parent


def train_run(tmp: Path, *overrides: str) -> Path:
    cfg, _ = compose_config([*COMMON, f"data.cache_dir={tmp / 'cache'}", *overrides])
    train(cfg, tmp / "run")
    return tmp / "run"


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints at steps 2 and 3 (the default gpt2-like tiny layout), one process."""
    return train_run(tmp_path_factory.mktemp("gpt2"), "checkpoint.interval=2")


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("llama"), *LLAMA)


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def export_cli(*args: str) -> subprocess.CompletedProcess:
    return run("-m", "trainer.export", *args)


def step_dir(run: Path, step: int = 3) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def model_config(run: Path) -> ModelConfig:
    return ModelConfig(**json.loads((step_dir(run) / "model" / "info.json").read_text())["model_config"])


def exported_weights(out: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The exported tensors under GPT's names (renamed back from Hugging Face's if config.json)."""
    if (out / "config.json").exists():
        return hf_to_trainer(read_hf_tensors(out), cfg)
    return load_file(out / "model.safetensors")


def assert_equal_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == torch.float32, name
        assert torch.equal(actual[name], tensor), name


def assert_same_logits(hf_model: torch.nn.Module, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    ours = GPT(cfg)
    ours.load_state_dict(weights, strict=True)
    idx = torch.randint(cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model.eval()(idx).logits, ours.eval()(idx), atol=1e-5, rtol=0)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# -- exports that work ---------------------------------------------------------------------------


def test_gpt2_layout_loads_in_transformers_with_our_logits(gpt2_run: Path, tmp_path: Path, capsys) -> None:
    from transformers import GPT2LMHeadModel

    out = tmp_path / "export"
    assert main([str(gpt2_run), "--out", str(out)]) == 0
    line = one_line(capsys.readouterr().out)
    assert str(out) in line and "config.json (GPT2LMHeadModel)" in line and "step_00000003" in line
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    # synthetic data has no tokenizer: the special ids are null, not transformers' GPT-2 defaults (50256)
    assert config["model_type"] == "gpt2" and config["bos_token_id"] is None and config["eos_token_id"] is None
    cfg, final = model_config(gpt2_run), load_file(gpt2_run / "checkpoints" / "final" / "model.safetensors")
    # the run's 32 tokens in 64 rows (model.vocab_multiple); the export holds the 32 alone
    assert (cfg.vocab_size, cfg.padded_vocab_size, final["embed.wte.weight"].shape[0]) == (32, 64, 64)
    assert config["vocab_size"] == 32 and read_hf_tensors(out)["transformer.wte.weight"].shape == (32, 64)
    assert_equal_weights(exported_weights(out, cfg), final)  # the padding rows stayed zero in training
    assert_same_logits(GPT2LMHeadModel.from_pretrained(out), cfg, final)


def test_no_hf_keeps_our_names_and_config(gpt2_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert main([str(step_dir(gpt2_run)), "--out", str(out), "--no-hf"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "trainer_config.json"]
    final = load_file(gpt2_run / "checkpoints" / "final" / "model.safetensors")
    assert_equal_weights(load_file(out / "model.safetensors"), final)
    info = json.loads((step_dir(gpt2_run) / "model" / "info.json").read_text())
    assert json.loads((out / "trainer_config.json").read_text()) == info["model_config"]


def test_llama_layout_loads_as_llama_for_causal_lm(llama_run: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    out = tmp_path / "export"
    assert main([str(llama_run), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    cfg, final = model_config(llama_run), load_file(llama_run / "checkpoints" / "final" / "model.safetensors")
    assert "head.weight" in final  # untied
    assert_equal_weights(exported_weights(out, cfg), final)
    assert_same_logits(LlamaForCausalLM.from_pretrained(out), cfg, final)


def test_a_checkpoint_from_before_vocab_padding_exports_its_rows(tmp_path: Path) -> None:
    """Its info.json has no vocab_multiple: its embedding holds vocab_size rows, not padded (here
    32; a default of 64 would look for 64 rows)."""
    run = train_run(tmp_path, "model.vocab_multiple=1", "train.max_steps=1")
    checkpoint = step_dir(run, 1)
    info = json.loads((checkpoint / "model" / "info.json").read_text())
    info["model_config"].pop("vocab_multiple")
    (checkpoint / "model" / "info.json").write_text(json.dumps(info))
    write_manifest(checkpoint)
    out = tmp_path / "export"
    assert main([str(checkpoint), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 32
    final = load_file(run / "checkpoints" / "final" / "model.safetensors")
    assert final["embed.wte.weight"].shape == (32, 64)
    assert torch.equal(read_hf_tensors(out)["transformer.wte.weight"], final["embed.wte.weight"])


def test_run_dir_falls_back_past_a_failing_checkpoint(gpt2_run: Path, tmp_path: Path, capsys) -> None:
    run_copy = shutil.copytree(gpt2_run, tmp_path / "run_copy")
    shard = next((step_dir(run_copy) / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    out = tmp_path / "export"
    assert main([str(run_copy), "--out", str(out), "--no-hf"]) == 0
    captured = capsys.readouterr()
    assert "step_00000003 fails verification" in captured.err and "truncated" in captured.err
    assert "step_00000002 (step 2" in one_line(captured.out)
    final = load_file(run_copy / "checkpoints" / "final" / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert not torch.equal(exported["embed.wte.weight"], final["embed.wte.weight"])  # one step earlier


# -- errors: one line, exit code 2, nothing written --------------------------------------------------


def test_missing_source_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = export_cli(str(tmp_path / "nowhere"), "--out", str(out))
    assert result.returncode == 2, result.stderr
    expected = f"error: {tmp_path / 'nowhere'} does not exist: give a run directory or a checkpoint directory"
    assert one_line(result.stderr) == expected
    assert result.stdout == "" and not out.exists() and not (tmp_path / "export.tmp").exists()


def test_truncated_checkpoint_fails_verification_subprocess(gpt2_run: Path, tmp_path: Path) -> None:
    checkpoint = shutil.copytree(step_dir(gpt2_run), tmp_path / "step_00000003")
    meta = checkpoint / "meta.json"
    meta.write_text(meta.read_text()[:-5])
    out = tmp_path / "export"
    result = export_cli(str(checkpoint), "--out", str(out))
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert line.startswith(f"error: checkpoint {checkpoint} fails verification: {meta} is ")
    assert "truncated" in line
    assert not out.exists() and not (tmp_path / "export.tmp").exists()


def test_existing_out_is_refused_unless_force(gpt2_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(gpt2_run), "--out", str(out)]) == 2
    assert "is not empty: choose another directory or pass --force" in one_line(capsys.readouterr().err)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main([str(gpt2_run), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_run_dir_without_checkpoints(tmp_path: Path, capsys) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 2
    assert "holds no checkpoint that passes verification" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "export").exists()


def test_unknown_strategy(gpt2_run: Path, tmp_path: Path, capsys) -> None:
    checkpoint = shutil.copytree(step_dir(gpt2_run), tmp_path / "step_00000003")
    info = json.loads((checkpoint / "model" / "info.json").read_text())
    (checkpoint / "model" / "info.json").write_text(json.dumps({**info, "strategy": "pipeline"}))
    write_manifest(checkpoint)  # a checkpoint that verifies, from a strategy export does not know
    assert main([str(checkpoint), "--out", str(tmp_path / "export")]) == 2
    assert "unknown strategy 'pipeline'" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "export").exists()


# -- sharded checkpoints of 2 ranks ------------------------------------------------------------------


@pytest.mark.heavy
@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("zero2", marks=pytest.mark.slow)])  # zero2: 13 s
def test_two_rank_checkpoint_exports_whole(strategy: str, tmp_path: Path) -> None:
    """fsdp: DCP reshards 2 ranks' shards into one process; zero2: zero_to_fp32 joins partitions."""
    run_dir = tmp_path / "run"
    overrides = [*COMMON, f"data.cache_dir={tmp_path / 'cache'}", f"parallel={strategy}", f"hydra.run.dir={run_dir}"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer"]
    result = run(*torchrun, *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "export"
    result = export_cli(str(run_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"parallel={strategy} on 2 rank(s)" in one_line(result.stdout)
    cfg, final = model_config(run_dir), load_file(run_dir / "checkpoints" / "final" / "model.safetensors")
    assert_equal_weights(exported_weights(out, cfg), final)
