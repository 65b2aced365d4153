"""train.compile: compiled blocks (and head + loss) give eager's numbers, with no graph break."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.__main__ import compose_config
from trainer.config import ConfigError, ModelConfig
from trainer.model.checkpointing import apply_activation_checkpointing
from trainer.model.compile import apply_compile, compiled_blocks
from trainer.model.gpt import GPT, bare_name
from trainer.preflight import check_run

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


@pytest.mark.slow  # 34 s; the matrix's covering cell compile x fsdp compiles a run by default
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


def test_compile_with_deepspeed_or_qlora_is_one_line() -> None:
    cfg, _ = compose_config(["parallel=zero2", "train.compile=true"])
    with pytest.raises(ConfigError, match=r"^train.compile=true with parallel=zero2 is not supported"):
        check_run(cfg, world_size=2)
    check_run(compose_config(["parallel=fsdp", "train.compile=true"])[0], world_size=2)


@pytest.mark.parametrize("mode", ["full", "attention"])
def test_inside_checkpoints_compiles_what_the_wrappers_hold(mode: str) -> None:
    """parallel.tensor's order: the checkpoint runs eagerly around compiled code (AOTAutograd cannot trace the
    checkpoint of a region that builds DTensors). Marking modules compiled is lazy: nothing compiles here."""
    from trainer.model.checkpointing import WRAPPED

    cfg = dataclasses.replace(LLAMA, activation_checkpointing=mode)
    with torch.device("meta"):
        model = GPT(cfg)
    apply_activation_checkpointing(model, cfg)
    assert apply_compile(model, inside_checkpoints=True) == 2 and compiled_blocks(model) == 2
    compiled = lambda m: getattr(m, "_compiled_call_impl", None) is not None  # noqa: E731
    for block in model.blocks:
        if mode == "full":
            assert not compiled(block) and compiled(getattr(block, WRAPPED))
        else:  # the wrapped attention's inside, and the MLP; the block itself (norms, residuals) eager
            assert not compiled(block) and not compiled(block.attn)
            assert compiled(getattr(block.attn, WRAPPED)) and compiled(block.mlp)
