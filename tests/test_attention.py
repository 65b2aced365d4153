"""Sliding-window attention, soft-capped scores and a custom score scale (trainer/model/attention.py)
against transformers' own masks and eager Gemma 2 attention, with packed documents and a KV cache."""

from __future__ import annotations

from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma2Config
from transformers.masking_utils import (
    causal_mask_function,
    create_sliding_window_causal_mask,
    sdpa_mask,
    sliding_window_causal_mask_function,
)
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, eager_attention_forward

from trainer.config import ConfigError
from trainer.model import attention
from trainer.model.attention import LayerCache, causal_attention, document_mask

B, NH, NKV, HD = 2, 4, 2, 8  # two query heads per kv head (GQA)
TOLERANCE = 1e-6  # fp32, relative to each tensor's largest value (see relative_difference)
PACKED = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1]])  # (B, T) positions


def qkv(T: int, S: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, NH, T, HD) and k, v (B, NKV, S, HD), fp32 with gradients; scaled so a soft-cap of 2 bites."""
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    q, k, v = (torch.randn(B, n, L, HD, generator=g) * 2 for n, L in ((NH, T), (NKV, S), (NKV, S)))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def hf_mask(T: int, S: int, window: int | None) -> torch.Tensor:
    """transformers' causal (sliding-window) mask (B, 1, T, S) for the last T of S positions."""
    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    return sdpa_mask(
        batch_size=B, q_length=T, kv_length=S, q_offset=S - T, mask_function=fn, allow_is_causal_skip=False
    )


def hf_attention(q, k, v, mask: torch.Tensor, scale: float | None, softcap: float | None) -> torch.Tensor:
    """transformers' eager Gemma 2 attention (B, NH, T, HD) with a bool mask (B, 1, T, S)."""
    module = SimpleNamespace(head_dim=HD, num_key_value_groups=NH // NKV, training=False)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    y, _ = eager_attention_forward(module, q, k, v, additive, dropout=0.0, scaling=scale, softcap=softcap)
    return y.transpose(1, 2)  # eager returns (B, T, NH, HD)


def outputs_and_grads(fn, q, k, v, seed: int = 1) -> list[torch.Tensor]:
    """fn(q, k, v) and the gradients of a fixed random projection of it with respect to q, k, v."""
    y = fn(q, k, v)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    return [y.detach(), *torch.autograd.grad((y * weight).sum(), (q, k, v))]


def relative_difference(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest |ours - reference| of each pair over that reference's largest magnitude (fp32's
    rounding grows with the values: SDPA's kernels differ from eager by a few units in the last place)."""
    assert all(a.shape == b.shape for a, b in zip(ours, reference, strict=True))
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, reference, strict=True))


CASES = {  # name: (T, S, window, scale, softcap); S > T: queries after cached keys
    "window": (9, 9, 3, None, None),
    "window-scale": (9, 9, 4, 0.25, None),
    "softcap": (9, 9, None, None, 2.0),
    "window-softcap-scale": (9, 9, 3, 0.25, 2.0),
    "cached-window": (3, 9, 4, None, None),
    "cached-window-softcap": (3, 9, 4, 0.25, 2.0),
    "decode-window-softcap": (1, 9, 4, None, 2.0),
}


@pytest.mark.parametrize("backend", ["auto", "math"])
@pytest.mark.parametrize("case", CASES)
def test_matches_transformers_eager_attention(case: str, backend: str) -> None:
    T, S, window, scale, softcap = CASES[case]
    q, k, v = qkv(T, S)
    ours = outputs_and_grads(
        lambda q, k, v: causal_attention(q, k, v, backend, window=window, scale=scale, softcap=softcap), q, k, v
    )
    reference = outputs_and_grads(lambda q, k, v: hf_attention(q, k, v, hf_mask(T, S, window), scale, softcap), q, k, v)
    assert relative_difference(ours, reference) < TOLERANCE
    if window is not None and S > window:  # the window changes the result: the comparison can fail
        full = hf_attention(q, k, v, hf_mask(T, S, None), scale, softcap)
        assert (full - ours[0]).abs().max() > 1e-2


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][4] is not None])
def test_flex_path_matches_transformers(case: str) -> None:
    """The CUDA soft-cap path (flex_attention's score_mod and block mask), run eager on the CPU:
    outputs only (flex_attention has no backward on the CPU), with a band and with packed documents."""
    T, S, window, scale, softcap = CASES[case]
    q, k, v = (x.detach() for x in qkv(T, S))
    window = None if window is not None and window >= S else window
    ours = attention._flex_attention(q, k, v, None, window, scale, softcap)
    assert relative_difference([ours], [hf_attention(q, k, v, hf_mask(T, S, window), scale, softcap)]) < TOLERANCE
    if T == S:
        mask = document_mask(PACKED[:, :T], window)  # (B, 1, T, T)
        ours = attention._flex_attention(q, k, v, mask, None, scale, softcap)
        assert relative_difference([ours], [hf_attention(q, k, v, mask, scale, softcap)]) < TOLERANCE


def test_gemma2_attention_module_with_packed_documents() -> None:
    """A whole Gemma2Attention layer (sliding window 3, soft-cap 2, query_pre_attn_scalar 16), its
    mask built by transformers from packed position ids, against the same weights through ours."""
    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=16, hidden_size=32, num_attention_heads=NH, num_key_value_heads=NKV, head_dim=HD,
        query_pre_attn_scalar=16, attn_logit_softcapping=2.0, sliding_window=3, num_hidden_layers=1,
        layer_types=["sliding_attention"], attention_dropout=0.0,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    layer = Gemma2Attention(cfg, layer_idx=0).eval()
    T = PACKED.size(1)
    x = (torch.randn(B, T, cfg.hidden_size) * 4).requires_grad_()
    identity_rope = (torch.ones(B, T, HD), torch.zeros(B, T, HD))  # cos 1, sin 0: rope is not under test
    hf_mask_ = create_sliding_window_causal_mask(cfg, x, attention_mask=None, cache=None, position_ids=PACKED)
    y_ref, _ = layer(x, identity_rope, attention_mask=hf_mask_)

    def ours(x: torch.Tensor) -> torch.Tensor:
        q = layer.q_proj(x).view(B, T, NH, HD).transpose(1, 2)  # (B, nh, T, hd)
        k = layer.k_proj(x).view(B, T, NKV, HD).transpose(1, 2)  # (B, nkv, T, hd)
        v = layer.v_proj(x).view(B, T, NKV, HD).transpose(1, 2)
        mask = document_mask(PACKED, cfg.sliding_window)  # (B, 1, T, T)
        y = causal_attention(
            q, k, v, mask=mask, scale=cfg.query_pre_attn_scalar**-0.5, softcap=cfg.attn_logit_softcapping
        )
        return layer.o_proj(y.transpose(1, 2).reshape(B, T, NH * HD))

    y = ours(x)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad(y.square().sum(), params)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), params)
    assert relative_difference([y.detach(), *grads], [y_ref.detach(), *grads_ref]) < TOLERANCE


@pytest.mark.parametrize("window", [1, 2, 3, 5, 12, 20])
def test_document_mask_matches_transformers(window: int) -> None:
    """Causal, same-document and within the window, as transformers builds it from packed position ids."""
    cfg = Gemma2Config(sliding_window=window, layer_types=["sliding_attention"], num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    x = torch.zeros(B, PACKED.size(1), 1)
    reference = create_sliding_window_causal_mask(cfg, x, attention_mask=None, cache=None, position_ids=PACKED)
    assert torch.equal(document_mask(PACKED, window), reference)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_window_with_packed_documents_equals_each_document_alone(softcap: float | None) -> None:
    window, T = 3, PACKED.size(1)
    q, k, v = qkv(T)
    packed = causal_attention(q, k, v, mask=document_mask(PACKED, window), softcap=softcap)  # (B, nh, T, hd)
    for row in range(B):
        starts = [*torch.nonzero(PACKED[row] == 0).flatten().tolist(), T]
        for a, b in pairwise(starts):
            doc = slice(a, b)
            alone = causal_attention(
                q[row : row + 1, :, doc],
                k[row : row + 1, :, doc],
                v[row : row + 1, :, doc],
                window=window,
                softcap=softcap,
            )
            assert relative_difference([packed[row : row + 1, :, doc]], [alone]) < TOLERANCE


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("prompt", [1, 5])
def test_kv_cache_decode_equals_full_sequence(prompt: int, softcap: float | None) -> None:
    """A prompt of `prompt` tokens, then one token a step through a LayerCache, with window 4."""
    window, T = 4, 11
    q, k, v = qkv(T)
    full = causal_attention(q, k, v, window=window, softcap=softcap)  # (B, nh, T, hd)
    cache, steps = LayerCache(capacity=T), [slice(0, prompt), *(slice(t, t + 1) for t in range(prompt, T))]
    with torch.no_grad():
        decoded = [
            causal_attention(q[:, :, s], *cache.update(k[:, :, s], v[:, :, s]), window=window, softcap=softcap)
            for s in steps
        ]
    assert relative_difference([torch.cat(decoded, dim=2)], [full]) < TOLERANCE


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_window_reaching_every_key_is_plain_causal(softcap: float | None) -> None:
    T = 9
    q, k, v = qkv(T)
    plain = causal_attention(q, k, v, softcap=softcap)
    for window in (T, T + 3):
        assert relative_difference([causal_attention(q, k, v, window=window, softcap=softcap)], [plain]) < TOLERANCE
        assert torch.equal(document_mask(PACKED, window + 3), document_mask(PACKED))  # PACKED: T = 12
    assert (causal_attention(q, k, v, window=T - 1, softcap=softcap) - plain).abs().max() > 1e-2


def test_flash_attn_gets_window_scale_and_softcap(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend=flash_attn (GPU only): a stand-in for FA2's flash_attn_func that computes what its
    docstring states (query i reads keys i + S - T - left .. i + S - T + right) checks the window's
    translation to window_size, against transformers' sliding-window attention."""
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
        calls.append(dict(causal=causal, window_size=window_size, softmax_scale=softmax_scale, softcap=softcap))
        T, S = q.size(1), k.size(1)
        i, j = torch.arange(T)[:, None] + S - T, torch.arange(S)[None]  # query and key positions
        left, right = window_size
        allowed = (j >= i - left if left >= 0 else True) & (j <= i + (0 if causal else right))
        mask = allowed.expand(q.size(0), 1, T, S)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        return hf_attention(q, k, v, mask, softmax_scale, softcap or None).transpose(1, 2)

    flash_attn_func.__module__ = "flash_attn.flash_attn_interface"
    monkeypatch.setattr(attention, "_flash_attn_func", lambda: flash_attn_func)
    monkeypatch.setattr(attention, "check_attention_backend", lambda *args: None)  # no CUDA here
    T, S, window, scale, softcap = CASES["cached-window-softcap"]
    q, k, v = qkv(T, S)
    y = causal_attention(q, k, v, "flash_attn", window=window, scale=scale, softcap=softcap)
    assert calls == [dict(causal=True, window_size=(window - 1, 0), softmax_scale=scale, softcap=softcap)]
    assert relative_difference([y], [hf_attention(q, k, v, hf_mask(T, S, window), scale, softcap)]) < TOLERANCE


@pytest.mark.parametrize(
    ("backend", "kwargs", "words"),
    [
        ("flash", dict(window=4), "cannot apply a sliding window"),
        ("cudnn", dict(window=4), "cannot apply a sliding window"),
        ("flash", dict(softcap=2.0), "cannot soft-cap"),
        ("efficient", dict(softcap=2.0), "cannot soft-cap"),
        ("cudnn", dict(softcap=2.0), "cannot soft-cap"),
    ],
)
def test_impossible_combinations_are_refused_in_one_line(backend: str, kwargs: dict, words: str) -> None:
    q, k, v = qkv(9)
    with pytest.raises(ConfigError, match=words) as error:
        causal_attention(q, k, v, backend, **kwargs)
    assert "\n" not in str(error.value) and "model.attention_backend=auto" in str(error.value)


def test_bf16_softcap_keeps_fp32_statistics() -> None:
    """The explicit path in bf16: softmax statistics in fp32, output in bf16, near the fp32 result."""
    q, k, v = qkv(9)
    y = causal_attention(*(x.detach().bfloat16() for x in (q, k, v)), window=3, softcap=2.0)
    reference = hf_attention(q, k, v, hf_mask(9, 9, 3), None, 2.0)
    assert y.dtype == torch.bfloat16
    assert (y.float() - reference).abs().max() < 5e-2


def test_invalid_window_or_softcap() -> None:
    q, k, v = qkv(4)
    with pytest.raises(ValueError, match="window"):
        causal_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="softcap"):
        causal_attention(q, k, v, softcap=0.0)
