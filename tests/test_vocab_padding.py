"""Vocabulary padding (model.vocab_multiple): the embedding and head hold the vocabulary rounded up,
and the padding's logits are masked, so the loss, every gradient and forward's logits are those of
the unpadded model, on both loss paths, at no extra pass over the logits. Checkpoints: parity with
transformers at an odd vocabulary and the export's shapes are in test_hf_parity.py; a run's export
in test_export.py; PEFT adapters with a trained head / embedding in test_lora.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainer.__main__ import compose_config
from trainer.config import ConfigError, ModelConfig
from trainer.model import GPT
from trainer.model.hf_import import VOCAB_ROWS
from trainer.model.loss import IGNORE_INDEX
from trainer.preflight import resolve_model_config

# 200 tokens, 256 rows: no other tensor of the model has B T 256 or B T 200 elements (the MLP's 128).
VOCAB, PADDED, B, T = 200, 256, 3, 8
MODEL = dict(vocab_size=VOCAB, block_size=T, n_layer=2, n_head=4, n_embd=32)


def test_the_vocabulary_is_rounded_up_to_vocab_multiple():
    # from scratch: the tokenizer's vocabulary is the real one, the rows are rounded up
    resolved = resolve_model_config(ModelConfig(), tokenizer_vocab=257)
    assert (resolved.vocab_size, resolved.padded_vocab_size) == (257, 320)
    assert resolve_model_config(ModelConfig(vocab_multiple=128), tokenizer_vocab=257).padded_vocab_size == 384
    assert resolve_model_config(ModelConfig(vocab_multiple=1), tokenizer_vocab=257).padded_vocab_size == 257
    assert ModelConfig(vocab_size=320).padded_vocab_size == 320  # a multiple already: no padding
    # an explicit vocabulary is the real one too: GPT-2's 50257 tokens in 50304 rows
    gpt2 = compose_config(["model=gpt2"])[0].model
    assert (gpt2.vocab_size, gpt2.padded_vocab_size) == (50257, 50304)
    model = GPT(resolved)
    assert model.embed.wte.weight.shape == (320, 128) and torch.all(model.embed.wte.weight[257:] == 0)
    assert model(torch.randint(0, 257, (1, 5))).shape == (1, 5, 257)
    with pytest.raises(ConfigError, match=r"^model.vocab_multiple must be positive \(1 turns vocabulary padding off\)"):
        ModelConfig(vocab_multiple=0)


def padded_and_plain(tie: bool, chunk: int) -> tuple[GPT, GPT]:
    """GPT with 200 tokens in 256 rows, its padding rows filled with large values (only the mask
    can hide them), and GPT with the same 200 rows unpadded (vocab_multiple=1)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**MODEL, tie_embeddings=tie, loss_chunk_size=chunk)
    padded = GPT(cfg)
    plain = GPT(dataclasses.replace(cfg, vocab_multiple=1))
    with torch.no_grad():
        for name, p in padded.named_parameters():
            if name in VOCAB_ROWS:
                assert p.shape[0] == PADDED and torch.all(p[VOCAB:] == 0)  # the init leaves padding at zero
                p[VOCAB:] = 5 * torch.randn(PADDED - VOCAB, p.shape[1])
    plain.load_state_dict({k: v[:VOCAB] if k in VOCAB_ROWS else v for k, v in padded.state_dict().items()})
    return padded, plain


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (B, T), generator=g)
    targets = torch.randint(0, VOCAB, (B, T), generator=g)
    targets[0, :3] = IGNORE_INDEX
    targets[1, :2] = VOCAB - 1  # the last real token, beside the padding
    return idx, targets


@pytest.mark.parametrize("chunk", [0, 5], ids=["logits", "chunked"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_padded_loss_gradients_and_logits_equal_the_unpadded_models(tie, chunk):
    padded, plain = padded_and_plain(tie, chunk)
    idx, targets = batch()
    torch.testing.assert_close(padded(idx), plain(idx), rtol=0, atol=0)  # the real rows' matmul, alone
    with torch.no_grad():  # evaluation: the chunked path without gradients
        torch.testing.assert_close(padded(idx, targets), plain(idx, targets), rtol=1e-6, atol=1e-5)
    loss, want = padded(idx, targets), plain(idx, targets)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-5)
    loss.backward()
    want.backward()
    plain_grads = dict(plain.named_parameters())
    for name, p in padded.named_parameters():
        grad = p.grad
        if name in VOCAB_ROWS:
            assert torch.all(grad[VOCAB:] == 0), name  # the padding takes no gradient: it stays as it is
            grad = grad[:VOCAB]
        assert plain_grads[name].grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, plain_grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)


class LogitSized(TorchDispatchMode):
    """Names every op whose output has `numel` elements (the logits' size), in order."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.numel() == self.numel for t in tree_leaves(out)):
            self.ops.append(str(func.overloadpacket))
        return out


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_the_mask_adds_no_pass_over_the_logits(tie):
    """Forward and backward run the same logits-sized ops with padding as without: the mask writes
    only the padding columns, and backward gets no copy of the logits' gradient for it."""
    padded, plain = padded_and_plain(tie, chunk=0)
    idx, targets = batch()
    recorded = {}
    for model, vocab in ((padded, PADDED), (plain, VOCAB)):
        with LogitSized(B * T * vocab) as mode:
            model(idx, targets).backward()
        recorded[vocab] = mode.ops
    assert {"aten.mm", "aten._log_softmax", "aten._log_softmax_backward_data"} <= set(recorded[VOCAB])
    assert recorded[PADDED] == recorded[VOCAB]
