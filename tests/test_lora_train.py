"""LoRA in real runs, from tiny random Hugging Face checkpoints (GPT-2 and Llama layouts) with their
own tokenizers: the adapters PEFT loads score the validation examples as the run itself did, resume
is bitwise, 2-rank fsdp / zero3 adapters equal one process's, the merge keeps the adapter model's
logits, and bad settings stop in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import lora_run_args as args
from helpers import read_metrics, run_cli, torchrun
from safetensors.torch import load_file

from trainer.__main__ import compose_config
from trainer.data import build_data
from trainer.loop import train
from trainer.model.loss import IGNORE_INDEX


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "final" / "adapter" / "adapter_model.safetensors")


def peft_val_loss(root: Path, model: str, adapter_dir: Path, cfg) -> float:
    """transformers' model with PEFT's adapter, on the run's validation rows (one example per row,
    padded at the end, so plain causal attention sees each example alone)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(root / model), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    val = build_data(cfg.data, cfg.train.seq_len, 0, pretrained=cfg.model.pretrained).val
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val), 2):
            x, y = val.get_batch(torch.arange(start, min(start + 2, len(val))).numpy())[:2]
            logits = peft(x).logits.double()
            kept = y != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[kept], y[kept], reduction="sum").item()
            count += int(kept.sum())
    return total / count


@pytest.mark.heavy
@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_peft_loads_the_adapter_and_resume_is_bitwise(finetune_dir: Path, model: str, tmp_path: Path) -> None:
    cfg, _ = compose_config(args(finetune_dir, model, "train.max_steps=4", "checkpoint.interval=2"))
    whole = tmp_path / "whole"
    train(cfg, whole)
    rows = read_metrics(whole)
    # the final adapter, loaded by PEFT onto transformers' base, scores the validation set as the run did
    assert peft_val_loss(finetune_dir, model, whole / "checkpoints" / "final" / "adapter", cfg) == pytest.approx(
        rows[-1]["val_loss"], rel=1e-5
    )
    weights = adapter(whole)
    assert all(t.abs().max() > 0 for k, t in weights.items() if "lora_B" in k)  # every B learned
    assert all(t.dtype == torch.float32 for t in weights.values())
    # the checkpoints hold the adapters and their optimizer state, never the frozen base
    meta = json.loads((whole / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["parts"]["lora"]["base"]["sha256"] and "adapter" in {
        p.name for p in (whole / "checkpoints" / "step_00000004").iterdir()
    }

    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    cfg, _ = compose_config(
        args(finetune_dir, model, "train.max_steps=4", "checkpoint.interval=2", "train.resume=auto")
    )
    train(cfg, resumed)
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in rows]  # bitwise
    assert all(torch.equal(adapter(resumed)[k], v) for k, v in weights.items())


@pytest.mark.slow  # 15 s; Llama's adapters under zero3 run by default (the matrix's covering lora x zero3)
@pytest.mark.parametrize(
    "model,strategy",
    [("gpt2", "zero3")],  # Llama's adapters under every strategy: tests/matrix.py's lora and dora rows
)
def test_two_rank_adapters_equal_one_process(finetune_dir: Path, model: str, strategy: str, tmp_path: Path) -> None:
    """Same global batch (2 sequences): 2 ranks x 1 under fsdp / zero3 against 1 process x 2. The
    saved adapter is whole (every tensor its full shape, never empty, never one rank's shard)."""
    single = tmp_path / "single"
    cfg, _ = compose_config(args(finetune_dir, model, "train.max_steps=3"))
    train(cfg, single)
    ranks = tmp_path / strategy
    done = torchrun("-m", "trainer", *args(finetune_dir, model, "train.max_steps=3", f"parallel={strategy}",
                    "train.micro_batch_size=1", f"hydra.run.dir={ranks}"), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = adapter(ranks), adapter(single)
    adapters = {"llama": 7, "gpt2": 4}[model]  # q k v o gate up down; c_attn, attn c_proj, c_fc, mlp c_proj
    assert ours.keys() == theirs.keys() and len(ours) == 2 * adapters * 2  # A and B, in 2 layers
    for name, tensor in theirs.items():
        assert ours[name].shape == tensor.shape and ours[name].numel() > 0
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-5)
    assert all(t.abs().max() > 0 for k, t in ours.items() if "lora_B" in k)


@pytest.mark.heavy
@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_merge_keeps_the_adapter_models_logits(finetune_dir: Path, model: str, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.export import find_checkpoint, load_model, main

    run_dir = tmp_path / "run"
    padding = "model.vocab_multiple=256"  # the 384 tokens in 512 rows: the merged export drops 128
    cfg, _ = compose_config(args(finetune_dir, model, "train.max_steps=2", "lora.dora=true", padding))
    train(cfg, run_dir)
    out = tmp_path / "merged"
    assert main([str(run_dir), "--out", str(out), "--merge"]) == 0
    report = capsys.readouterr().out
    assert "top-1 agreement 100.00%" in report and "stored as float32" in report, report
    ours, _ = load_model(find_checkpoint(run_dir))  # the base with the adapters, as PEFT would run it
    assert (ours.cfg.vocab_size, ours.embed.wte.weight.shape[0]) == (384, 512)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert merged.get_output_embeddings().weight.shape[0] == merged.config.vocab_size == 384
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours.eval()(ids), rtol=1e-4, atol=1e-4)
    assert main([str(run_dir), "--out", str(tmp_path / "adapter")]) == 0  # without --merge: the PEFT adapter
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }


@pytest.mark.heavy
def test_adapters_learn_under_activation_checkpointing_and_stuck_ones_are_named(
    finetune_dir: Path, tmp_path: Path, caplog
) -> None:
    """Under (non-reentrant) activation checkpointing no block input requires grad (the embedding is
    frozen), yet every adapter learns. An adapter started from a PEFT file whose q_proj A and B are
    zero gets no gradient at all: after the first steps the run names it."""
    from safetensors.torch import save_file

    ac = tmp_path / "ac"
    cfg, _ = compose_config(args(finetune_dir, "llama", "train.max_steps=2", "model.activation_checkpointing=full"))
    train(cfg, ac)
    learned = adapter(ac)
    assert all(t.abs().max() > 0 for k, t in learned.items() if "lora_B" in k)
    broken = tmp_path / "broken"
    shutil.copytree(ac / "checkpoints" / "final" / "adapter", broken)
    dead = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({k: torch.zeros_like(v) if k.startswith(dead) else v for k, v in learned.items()},
              str(broken / "adapter_model.safetensors"))  # fmt: skip
    cfg, _ = compose_config(args(finetune_dir, "llama", "train.max_steps=2", f"lora.init_from={broken}"))
    with caplog.at_level("WARNING", logger="trainer"):
        train(cfg, tmp_path / "stuck")
    assert "lora_B is still exactly zero" in caplog.text and "blocks.0.attn.c_attn.lora_B.q_proj" in caplog.text
    assert "lora_B.k_proj" not in caplog.text  # only the dead one


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["lora.target_modules=[nope_proj]"], "nope_proj"),
        (["lora.r=0"], "lora.r=0 must be positive"),
        (["lora.dropout=1.5"], "lora.dropout=1.5 must be in [0, 1)"),
        (["lora.enabled=false"], "LoRA is off"),
        (["lora.init_from=/nonexistent"], "holds no adapter_config.json"),
    ],
)
def test_bad_lora_settings_stop_in_one_line(
    finetune_dir: Path, tmp_path: Path, extra: list[str], expected: str
) -> None:
    done = run_cli(
        *args(finetune_dir, "llama", "train.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"), *extra, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.heavy
def test_default_bf16_base_starts_as_the_base_model(finetune_dir: Path, tmp_path: Path) -> None:
    """lora=default stores the frozen base in bf16 (under fp32 compute: the adapted linears' weights)
    and B = 0: step 1's loss is the loss of the base model with those weights rounded to bf16
    (transformers' model, computed in fp32)."""
    from transformers import AutoModelForCausalLM

    extra = [a for a in args(finetune_dir, "llama", "train.max_steps=1") if a != "lora.base_dtype=fp32"]
    cfg, _ = compose_config([*extra, "train.micro_batch_size=8"])
    assert cfg.lora.base_dtype == "bf16"
    data = build_data(cfg.data, cfg.train.seq_len, 0, pretrained=cfg.model.pretrained)
    assert len(data.train) == 8  # one global batch holds every training row
    train(cfg, tmp_path / "run")
    hf = AutoModelForCausalLM.from_pretrained(str(finetune_dir / "llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # in fp32 runs only the adapted linears' weights are bf16
            if name.endswith("_proj.weight"):
                p.copy_(p.to(torch.bfloat16).float())
        x, y = data.train.get_batch(torch.arange(8).numpy())[:2]
        logits = hf(x).logits
    kept = y != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[kept], y[kept]).item()
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_global_batch_with_every_label_masked_stops_the_run(tmp_path: Path) -> None:
    """Prompts longer than train.seq_len leave no response token: one line, exit code 3."""
    records = [{"prompt": "word " * 80, "response": "ok"} for _ in range(10)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    done = run_cli("logger.wandb=false", "train.sample_tokens=0", "data=instruct", f"data.path={tmp_path / 'long.jsonl'}",
                   "train.seq_len=32", "data.val_fraction=0.2", "model.n_layer=1", "model.n_embd=32", "train.max_steps=2",
                   f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    assert "every label of the global batch is masked" in done.stderr.strip().splitlines()[-1]


@pytest.mark.heavy
def test_accumulation_fp16_and_per_layer_norms(finetune_dir: Path, tmp_path: Path) -> None:
    """Two micro-batches of one sequence give the adapters of one micro-batch of two; fp16 with loss
    scaling trains the adapters; the per-layer gradient norms are the adapters' (the base has none)."""
    one, two = tmp_path / "one", tmp_path / "two"
    cfg, _ = compose_config(args(finetune_dir, "llama", "train.max_steps=3"))
    train(cfg, one)
    cfg, _ = compose_config(args(finetune_dir, "llama", "train.max_steps=3", "train.micro_batch_size=1",
                                 "train.grad_accum_steps=2"))  # fmt: skip
    train(cfg, two)
    for name, tensor in adapter(one).items():
        torch.testing.assert_close(adapter(two)[name], tensor, rtol=1e-5, atol=1e-5)
    rows = read_metrics(one)
    assert rows[0]["grad_norm/block.0.attn"] > 0 and rows[0]["grad_norm/block.1.mlp"] > 0
    assert rows[0].get("grad_norm/embed", 0.0) == 0.0 and rows[0].get("grad_norm/block.0.norm", 0.0) == 0.0

    fp16 = tmp_path / "fp16"
    cfg, _ = compose_config(args(finetune_dir, "llama", "train.max_steps=3", "precision=fp16"))
    train(cfg, fp16)
    rows = read_metrics(fp16)
    assert "loss_scale" in rows[-1] and all(r["loss"] == r["loss"] for r in rows)  # finite
    assert all(t.abs().max() > 0 for k, t in adapter(fp16).items() if "lora_B" in k)


def test_the_adapted_modules_fit_in_one_line() -> None:
    from trainer.run import adapted_summary

    names = [f"model.layers.{i}.{p}" for i in range(32) for p in ("self_attn.q_proj", "mlp.down_proj")]
    assert (
        adapted_summary(names) == "64 modules: model.layers.{0-31}.self_attn.q_proj, model.layers.{0-31}.mlp.down_proj"
    )
    assert adapted_summary(["transformer.h.0.attn.c_attn", "transformer.h.2.attn.c_attn"]) == (
        "2 modules: transformer.h.{0,2}.attn.c_attn"
    )


@pytest.mark.slow  # 12 s: a run, then its resume refused
def test_resuming_against_another_base_is_refused(finetune_dir: Path, tmp_path: Path) -> None:
    """The checkpoint keeps the base by path and sha256: the same shape with other weights is refused
    in one line, and nothing in the run is changed. (GPT-2 layout, bf16 autocast.)"""
    from helpers import hf_gpt2

    other = tmp_path / "other"
    shutil.copytree(finetune_dir / "gpt2", other)
    torch.manual_seed(123)  # the same architecture with other random weights
    hf_gpt2(vocab_size=384, n_positions=128, n_embd=32, n_head=2).save_pretrained(other)
    run_dir = tmp_path / "run"
    first = args(finetune_dir, "gpt2", "train.max_steps=2", "precision=bf16", f"hydra.run.dir={run_dir}")
    assert run_cli(*first, cwd=tmp_path).returncode == 0
    before = (run_dir / "metrics.jsonl").read_text()
    again = [a.replace(str(finetune_dir / "gpt2"), str(other)) for a in first]
    done = run_cli(*again, "train.max_steps=4", "train.resume=auto", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "trained on another base" in done.stderr.strip().splitlines()[-1]
    assert (run_dir / "metrics.jsonl").read_text() == before
