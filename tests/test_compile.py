"""train.compile: compiled blocks (and head + loss) give eager's numbers, with no graph break."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import QUICK, read_metrics, run_cli

from trainer.__main__ import compose_config
from trainer.config import ConfigError, ModelConfig, check_run
from trainer.model.checkpointing import apply_activation_checkpointing
from trainer.model.compile import apply_compile, compiled_blocks
from trainer.model.gpt import GPT, bare_name

# Llama-shaped (RMSNorm, SwiGLU, RoPE, grouped-query attention): every op the blocks have.
LLAMA = ModelConfig(
    name="tiny-llama", vocab_size=96, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
    norm="rmsnorm", mlp="swiglu", position="rope", tie_embeddings=False, bias=False,
)  # fmt: skip


def loss_and_grads(model: GPT, x: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(x, targets=x, **({} if positions is None else {"positions": positions}))
    loss.backward()
    return loss.item(), {bare_name(name): p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.heavy
def test_compiled_blocks_give_eager_loss_and_gradients() -> None:
    """fullgraph=True: a graph break anywhere in a block fails here. Activation checkpointing
    comes first, so the recompute is compiled too. Packed documents (positions) run the masked
    path through the same compiled blocks; the head + loss compile too."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(LLAMA)  # shared by both models: the loss path is switched below
    eager = GPT(cfg)
    compiled = GPT(cfg)
    compiled.load_state_dict(eager.state_dict())
    apply_activation_checkpointing(compiled, dataclasses.replace(cfg, activation_checkpointing="full"))
    assert apply_compile(compiled) == 2 and compiled_blocks(compiled) == 2 and compiled_blocks(eager) == 0
    assert compiled._compiled_loss is not None and eager._compiled_loss is None
    assert [bare_name(n) for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    x = torch.randint(cfg.vocab_size, (2, 32))
    positions = torch.cat([torch.arange(20), torch.arange(12)]).expand(2, 32)
    # full logits (96 of 128 padded rows real: the mask compiled too) and packed documents; the
    # chunked loss compiles with graph breaks inside its autograd Function (not repeated here: CI time)
    for chunk, extra in ((0, None), (0, positions)):
        cfg.loss_chunk_size = chunk
        want_loss, want_grads = loss_and_grads(eager, x, extra)
        got_loss, got_grads = loss_and_grads(compiled, x, extra)
        assert got_loss == pytest.approx(want_loss, rel=1e-5)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.heavy
def test_compiled_run_matches_eager_in_bf16(tmp_path: Path) -> None:
    """The CLI with train.compile=true: logs the compile time, and the losses of a bf16 run stay
    within bf16 rounding of eager's (inductor fuses casts and reductions differently)."""
    common = [*QUICK, "train.max_steps=4", "train.log_interval=1", "train.eval_interval=4", "precision=bf16",
              f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["train.compile=true"])):
        result = run_cli(*common, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = read_metrics(tmp_path / name)
    assert "torch.compile: the first step took" in (tmp_path / "compiled" / "logs" / "rank0.log").read_text()
    for got, want in zip(runs["compiled"], runs["eager"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-2)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=5e-2)
    assert runs["compiled"][-1]["val_loss"] == pytest.approx(runs["eager"][-1]["val_loss"], rel=1e-2)


def test_compile_with_deepspeed_or_qlora_is_one_line() -> None:
    cfg, _ = compose_config(["parallel=zero2", "train.compile=true"])
    with pytest.raises(ConfigError, match=r"^train.compile=true with parallel=zero2 is not supported"):
        check_run(cfg, world_size=2)
    check_run(compose_config(["parallel=fsdp", "train.compile=true"])[0], world_size=2)
