"""Causal self-attention kernels, the packed-document mask, and the KV cache generation fills.

`causal_attention` runs SDPA (or Dao's flash-attn) on q (B, nh, T, hd) against k, v (B, nkv, S, hd)
with S >= T: the queries are the last T of the S positions (S > T when a KV cache holds the
earlier ones). An optional boolean mask (B, 1, T, S), True where a query may attend, replaces
the causal rule: `document_mask` builds causal-and-same-document from per-token positions.

Three per-layer switches serve Mistral / Gemma 2 style checkpoints: `window` (sliding-window
attention: a query reads itself and the window - 1 keys before it, transformers'
`q_idx - kv_idx < sliding_window`), `scale` (the scores' multiplier, Gemma's
query_pre_attn_scalar ** -0.5) and `softcap` (scores -> softcap * tanh(scores / softcap), Gemma 2's
attn_logit_softcapping). SDPA has no hook for the soft-cap: it runs as flex_attention's score_mod
on CUDA, else as explicit matmul-softmax-matmul in fp32 statistics (transformers' eager order).
A window is a boolean band mask for SDPA: (T, S) bools, 16 MiB at T = S = 4096, beside the
(B, nh, T, S) scores the explicit path materialises (fp32: 512 MiB per 8 heads at T = 4096).
"""

from __future__ import annotations

import importlib.util
import warnings
from contextlib import nullcontext
from functools import cache, lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.config import ConfigError


@cache
def _flash_attn_available() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("flash_attn_interface", "flash_attn"))


@cache
def _flash_attn_func():
    """Dao's kernel: FA3 (flash_attn_interface, Hopper) when installed and on a Hopper GPU, else FA2."""
    if importlib.util.find_spec("flash_attn_interface") is not None and torch.cuda.get_device_capability()[0] >= 9:
        from flash_attn_interface import flash_attn_func

        return flash_attn_func
    from flash_attn import flash_attn_func

    return flash_attn_func


def check_attention_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ConfigError (one line) when `model.attention_backend` cannot run on device/dtype."""
    device = torch.device(device)
    half = dtype in (torch.float16, torch.bfloat16)
    if backend in ("flash", "efficient", "cudnn", "flash_attn") and device.type != "cuda":
        raise ConfigError(
            f"model.attention_backend={backend} needs a CUDA device, got {device.type}: "
            "use model.attention_backend=auto or math"
        )
    if backend in ("flash", "cudnn", "flash_attn") and not half:
        raise ConfigError(
            f"model.attention_backend={backend} needs fp16 or bf16, got {dtype}: "
            "use precision bf16/fp16 or model.attention_backend=auto / efficient / math"
        )
    if backend == "flash_attn" and not _flash_attn_available():
        raise ConfigError(
            "model.attention_backend=flash_attn needs the flash-attn package (pip install flash-attn): "
            "or use model.attention_backend=flash"
        )


def resolve_attention_backend(
    backend: str, device: torch.device, dtype: torch.dtype, masked: bool, dropout: float = 0.0
) -> str:
    """What `auto` runs, decided once at build time (so nothing in forward queries the machine and
    compiled blocks know their kernel): Dao's FA3 (flash_attn_interface) on a Hopper GPU in fp16 /
    bf16 when it is installed, no batch carries a document mask and there is no dropout (FA3 takes
    neither); else SDPA, which picks its own fastest kernel per call. An explicit backend stays."""
    half = dtype in (torch.float16, torch.bfloat16)
    if backend != "auto" or masked or dropout > 0 or torch.device(device).type != "cuda" or not half:
        return backend
    hopper = torch.cuda.get_device_capability(device)[0] == 9
    fa3 = importlib.util.find_spec("flash_attn_interface") is not None
    return "flash_attn" if hopper and fa3 else "auto"


_SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,  # cuDNN's fused attention (Hopper: its fastest SDPA kernel)
    "math": SDPBackend.MATH,
}


def band_mask(T: int, S: int, window: int | None, device: torch.device | None = None) -> torch.Tensor:
    """Causal mask (T, S), True where query t (at position S - T + t) may read key s: s <= S - T + t
    and, with a window, S - T + t - s < window (the query itself and the window - 1 keys before it)."""
    allowed = torch.ones(T, S, dtype=torch.bool, device=device)
    causal = allowed.tril(S - T)
    return causal if window is None else causal & allowed.triu(S - T - window + 1)


def document_mask(positions: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Causal and same-document mask (B, 1, T, T), True where query t may read key s, from
    positions (B, T): each token's position in its own document, 0 where a document starts.
    A row that starts mid-document counts its first tokens as one document. window: also keep
    t - s < window (sliding-window attention within each document); None: no window."""
    T = positions.size(1)
    doc = (positions == 0).cumsum(dim=1)  # (B, T) document index within the row
    same_doc = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
    causal = band_mask(T, T, window, positions.device)  # (T, T)
    return (same_doc & causal)[:, None]  # (B, 1, T, T)


def _flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    flash_attn_func = _flash_attn_func()  # optional dependency, checked by the caller
    # Dao's kernel takes (B, T, nh, hd), handles nkv < nh itself and aligns causal to the bottom
    # right when S > T (cached keys). FA3 has no dropout argument and some of its versions also
    # return the log-sum-exp. FA2 (>= 2.6) and FA3 both take softmax_scale, window_size and softcap
    # by keyword; query i reads keys [i + S - T - left, i + S - T + right], so a window of w is
    # (w - 1, 0). Only the arguments in use are passed: older FA2 versions lack softcap.
    fa2 = flash_attn_func.__module__.startswith("flash_attn.")
    if not fa2 and dropout_p > 0:
        raise ConfigError("model.attention_backend=flash_attn runs FA3 here, which has no dropout: set model.dropout=0")
    extra = {"dropout_p": dropout_p} if fa2 else {}
    if window is not None:
        extra["window_size"] = (window - 1, 0)
    if scale is not None:
        extra["softmax_scale"] = scale
    if softcap is not None:
        extra["softcap"] = softcap
    y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, **extra)
    y = y[0] if isinstance(y, tuple) else y
    return y.transpose(1, 2)


def _native_gqa(backend: str, q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether SDPA may take nkv < nh itself (enable_gqa): its flash and math kernels can."""
    if backend in ("flash", "math"):
        return True
    if backend in ("efficient", "cudnn"):
        return False
    # auto: on the CPU SDPA picks kernels that all take it; on CUDA flash serves half precision
    # without a mask, and a mask or fp32 would leave enable_gqa to the slow math kernel.
    return q.device.type == "cpu" or (mask is None and q.dtype in (torch.float16, torch.bfloat16))


def _refuse_combination(backend: str, masked: bool, window: int | None, softcap: float | None) -> None:
    """ConfigError (one line) for what the chosen kernel cannot compute."""
    if masked and backend in ("flash", "cudnn", "flash_attn"):  # kernels run here without a mask
        raise ConfigError(
            f"model.attention_backend={backend} cannot keep packed documents apart (positions given): "
            "use model.attention_backend=auto or efficient"
        )
    if window is not None and backend in ("flash", "cudnn"):
        raise ConfigError(
            f"model.attention_backend={backend} cannot apply a sliding window (SDPA's {backend} kernel takes "
            "no mask): use model.attention_backend=auto, efficient or flash_attn"
        )
    if softcap is not None and backend in ("flash", "efficient", "cudnn"):
        raise ConfigError(
            f"model.attention_backend={backend} cannot soft-cap attention scores (SDPA has no score hook): "
            "use model.attention_backend=auto, math or flash_attn"
        )


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    dropout_p: float = 0.0,
    mask: torch.Tensor | None = None,
    *,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(mask(softcap(scale * q k^T))) v, causal.

    q: (B, nh, T, hd); k, v: (B, nkv, S, hd), S >= T, with nkv dividing nh (query head h reads kv
    head h // (nh / nkv), the Llama / repeat_interleave convention). Query t sits at position
    S - T + t. mask: optional bool (B, 1, T, S), True where attention is allowed, used instead of
    the causal rule (packed documents); it carries any window itself (document_mask(positions,
    window)). window: sliding window without a mask: query t reads keys S - T + t - window + 1 ..
    S - T + t; None, or >= S: every earlier key. scale: the scores' multiplier, default
    1 / sqrt(hd). softcap: scores -> softcap * tanh(scores / softcap) before mask and softmax.
    Returns (B, nh, T, hd).
    """
    T, S = q.size(2), k.size(2)
    if (window is not None and window < 1) or (softcap is not None and softcap <= 0):
        raise ValueError(f"attention window must be >= 1 and softcap > 0, got window={window}, softcap={softcap}")
    if mask is not None or (window is not None and window >= S):
        window = None  # the mask holds the window already; or the window reaches every key
    _refuse_combination(backend, mask is not None, window, softcap)
    if backend != "auto" and not torch.compiler.is_compiling():  # checked at build time too; not traced
        check_attention_backend(backend, q.device, q.dtype)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, dropout_p, window, scale, softcap)
    if softcap is not None:
        if backend == "auto" and q.device.type == "cuda" and dropout_p == 0 and _flex_available():
            return _flex_attention(q, k, v, mask, window, scale, softcap)
        if mask is None:
            mask = band_mask(T, S, window, q.device)  # (T, S)
        return _explicit_attention(q, k, v, mask, dropout_p, scale, softcap)
    if mask is None and (window is not None or T not in (1, S)):  # a band, or queries after cached keys
        mask = band_mask(T, S, window, q.device)  # (T, S), aligned to the bottom right
    gqa = k.size(1) != q.size(1)
    if gqa and not _native_gqa(backend, q, mask):
        repeat = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        gqa = False
    causal = mask is None and T == S and T > 1  # T == 1: the last position reads every key
    kernel = nullcontext() if backend == "auto" else sdpa_kernel(_SDPA_BACKENDS[backend])
    with kernel:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=gqa
        )


def _explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    dropout_p: float,
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """Attention written out, in the order of transformers' eager Gemma 2 attention: scale,
    soft-cap, mask, softmax, dropout. Scores and softmax in fp32 (whatever q's dtype); the
    probabilities return to q's dtype for the product with v. mask: bool (T, S) or (B, 1, T, S)."""
    repeat = q.size(1) // k.size(1)
    if repeat > 1:  # (B, nkv, S, hd) -> (B, nh, S, hd)
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scale = q.size(-1) ** -0.5 if scale is None else scale
    stats = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for gradcheck
    scores = (q @ k.transpose(-2, -1)).to(stats) * scale  # (B, nh, T, S)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # as transformers: no NaN rows
    probs = torch.softmax(scores, dim=-1).to(q.dtype)  # (B, nh, T, S)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # (B, nh, T, hd)


@cache
def _flex_available() -> bool:
    return (
        importlib.util.find_spec("triton") is not None
        and importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    )


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # eager flex_attention materialises the scores


@lru_cache(maxsize=32)
def _band_block_mask(T: int, S: int, window: int | None, device: str):
    """flex_attention's BlockMask of band_mask(T, S, window), built once per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = S - T  # query t sits at position offset + t

    def band(b, h, q_idx, kv_idx):
        query = q_idx + offset
        keep = kv_idx <= query
        return keep if window is None else keep & (query - kv_idx < window)

    return create_block_mask(band, None, None, T, S, device=device)


def _flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    window: int | None,
    scale: float | None,
    softcap: float,
) -> torch.Tensor:
    """flex_attention with the soft-cap as its score_mod (flex applies scale first, then the
    score_mod, then the block mask: the eager order). mask: bool (B, 1, T, S) or None (band)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, S = q.size(2), k.size(2)
    if mask is None:
        build = _band_block_mask.__wrapped__ if torch.compiler.is_compiling() else _band_block_mask  # dynamo: no cache
        block_mask = build(T, S, window, str(q.device))
    else:  # packed documents: a fresh mask per batch

        def allowed(b, h, q_idx, kv_idx):
            return mask[b, 0, q_idx, kv_idx]

        block_mask = create_block_mask(allowed, mask.size(0), None, T, S, device=q.device)

    def soft_cap(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    args = dict(score_mod=soft_cap, block_mask=block_mask, scale=scale, enable_gqa=k.size(1) != q.size(1))
    if torch.compiler.is_compiling():  # inside a compiled block: traced and fused with it
        return flex_attention(q, k, v, **args)
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, **args)
    with warnings.catch_warnings():  # eager (the CPU tests): unfused, and it warns so
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, **args)


class KVCache:
    """Keys and values of the tokens seen so far, for generation: per layer, (B, nkv, capacity, hd)
    buffers filled from the left, allocated on first use in the keys' dtype and device."""

    def __init__(self, n_layer: int, capacity: int):
        self.capacity = capacity
        self.layers = [LayerCache(capacity) for _ in range(n_layer)]
        self.pad: torch.Tensor | None = None  # (B,) left padding of each row (batched prompts), or None

    @property
    def length(self) -> int:
        """Positions held (the same in every layer between forwards)."""
        return self.layers[0].length


class LayerCache:
    """One layer's keys and values: update(k, v) appends and returns everything held."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k: torch.Tensor | None = None  # (B, nkv, capacity, hd)
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, nkv, T, hd); return the held keys and values (B, nkv, length, hd)."""
        B, nkv, T, hd = k.shape
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {self.length} + {T} do not fit")
        if self.k is None:
            self.k = k.new_empty(B, nkv, self.capacity, hd)
            self.v = v.new_empty(B, nkv, self.capacity, hd)
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]
