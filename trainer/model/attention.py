"""Causal self-attention kernels, the packed-document mask, and the KV cache generation fills.

`causal_attention` runs SDPA (or Dao's flash-attn) on q (B, nh, T, hd) against k, v (B, nkv, S, hd)
with S >= T: the queries are the last T of the S positions (S > T when a KV cache holds the
earlier ones). An optional boolean mask (B, 1, T, S), True where a query may attend, replaces
the causal rule: `document_mask` builds causal-and-same-document from per-token positions.
"""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from functools import cache

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


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """Causal and same-document mask (B, 1, T, T), True where query t may read key s, from
    positions (B, T): each token's position in its own document, 0 where a document starts.
    A row that starts mid-document counts its first tokens as one document."""
    T = positions.size(1)
    doc = (positions == 0).cumsum(dim=1)  # (B, T) document index within the row
    same_doc = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()  # (T, T)
    return (same_doc & causal)[:, None]  # (B, 1, T, T)


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    flash_attn_func = _flash_attn_func()  # optional dependency, checked by the caller
    # Dao's kernel takes (B, T, nh, hd), handles nkv < nh itself and aligns causal to the bottom
    # right when S > T (cached keys). FA3 has no dropout argument and some of its versions also
    # return the log-sum-exp.
    fa2 = flash_attn_func.__module__.startswith("flash_attn.")
    if not fa2 and dropout_p > 0:
        raise ConfigError("model.attention_backend=flash_attn runs FA3 here, which has no dropout: set model.dropout=0")
    extra = {"dropout_p": dropout_p} if fa2 else {}
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


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    dropout_p: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + causal mask) v.

    q: (B, nh, T, hd); k, v: (B, nkv, S, hd), S >= T, with nkv dividing nh (query head h reads kv
    head h // (nh / nkv), the Llama / repeat_interleave convention). Query t sits at position
    S - T + t. mask: optional bool (B, 1, T, S), True where attention is allowed, used instead of
    the causal rule (packed documents). Returns (B, nh, T, hd).
    """
    if mask is not None and backend in ("flash", "cudnn", "flash_attn"):  # kernels run here without a mask
        raise ConfigError(
            f"model.attention_backend={backend} cannot keep packed documents apart (positions given): "
            "use model.attention_backend=auto or efficient"
        )
    if backend != "auto" and not torch.compiler.is_compiling():  # checked at build time too; not traced
        check_attention_backend(backend, q.device, q.dtype)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, dropout_p)
    T, S = q.size(2), k.size(2)
    if mask is None and T not in (1, S):  # queries after cached keys: causal aligned to the bottom right
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    gqa = k.size(1) != q.size(1)
    if gqa and not _native_gqa(backend, q, mask):
        repeat = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        gqa = False
    causal = mask is None and T == S and T > 1  # T == 1: the last position reads every key
    kernel = nullcontext() if backend == "auto" else sdpa_kernel(_SDPA_BACKENDS[backend])
    with kernel:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, enable_gqa=gqa
        )


class KVCache:
    """Keys and values of the tokens seen so far, for generation: per layer, (B, nkv, capacity, hd)
    buffers filled from the left, allocated on first use in the keys' dtype and device."""

    def __init__(self, n_layer: int, capacity: int):
        self.capacity = capacity
        self.layers = [LayerCache(capacity) for _ in range(n_layer)]

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
