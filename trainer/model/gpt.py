"""GPT: one decoder-only transformer class covering every family trainer.model.families imports.

Blocks are `x = x + attn(norm_1(x)); x = x + mlp(norm_2(x))` (pre-norm, GPT-2 / Llama), with
the norms after the sublayers instead (model.norm_placement=post, OLMo 2) or on both sides
(sandwich: norm_1_post / norm_2_post after, Gemma). ModelConfig picks small composable switches,
never a family: LayerNorm or RMSNorm (with Gemma's 1 + weight offset), GELU, SwiGLU or GeGLU
(gate and up fused or apart), learned positions or RoPE (Llama 3, linear and LongRoPE scaling; a
second base for sliding layers), multi-head or grouped-query attention with its own head size,
q / k norms per head or over the projection, q / k / v biases, sliding-window layers, attention
and final-logit soft-capping, a custom score scale, scaled embeddings, a tied or untied head, and
sparse mixture-of-experts MLPs (trainer.model.moe) with their load-balancing loss.

forward takes optional per-token positions (packed documents attend only within themselves);
generate keeps a KV cache. Parameter names group by layer (see `param_group`), and `GPT.blocks`
is exposed so strategies can shard and checkpoint one block at a time. Nothing here knows about
ranks, precision policy or logging.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Iterator
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.model.attention import KVCache, LayerCache, causal_attention, document_mask
from trainer.model.loss import IGNORE_INDEX, cross_entropy_sum, linear_cross_entropy_sum, target_logps

# Module names that wrappers (DDP, torch.compile, FSDP1, activation checkpointing, peft) insert
# into parameter names; `param_group` drops them.
WRAPPER_NAMES = frozenset("module _orig_mod _fsdp_wrapped_module _checkpoint_wrapped_module base_model model".split())


def bare_name(name: str) -> str:
    """A parameter name without wrapper components: the name the unwrapped GPT gives it."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_NAMES)


def param_group(name: str) -> str:
    """Map a parameter name to its group: embed, block.{i}.attn|mlp|norm, or head (incl. norm_f)."""
    parts = bare_name(name).split(".")
    if parts and parts[0] == "embed":
        return "embed"
    if parts and parts[0] in ("head", "norm_f"):
        return "head"
    if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit():
        kind = {"attn": "attn", "mlp": "mlp", "norm_1": "norm", "norm_2": "norm", "norm_1_post": "norm",
                "norm_2_post": "norm"}.get(parts[2])  # fmt: skip
        if kind is not None:
            return f"block.{parts[1]}.{kind}"
    raise ValueError(f"param_group: {name!r} is not a GPT parameter name")


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (HF Llama's rotate_half layout, so Llama weights import unpermuted)

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin tables, each (T, head_dim) or (B, 1, T, head_dim), fp32


ROPE_TYPES = ("default", "llama3", "linear", "longrope")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in fp32, with 'llama3' or 'linear' scaling if given
    (LongRoPE's depend on the sequence: see rope_at)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":  # positions slowed by `factor` (Gemma 3's global layers)
        return inv_freq / scaling["factor"]
    if kind == "longrope":  # the short factors; rope_at switches to the long ones past the original context
        return 1.0 / (torch.tensor(scaling["short_factor"], device=device) * theta**exponents)
    if kind != "llama3":
        raise ValueError(f"model.rope_scaling: rope_type {kind!r} is not supported (use one of {ROPE_TYPES})")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (beyond the original context) are slowed by `factor`, short ones kept,
    # and the band in between interpolated smoothly (HF _compute_llama3_parameters).
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


def rope_at(cfg: ModelConfig, positions: torch.Tensor, local: bool = False) -> Rope:
    """cos, sin tables in fp32 for positions (T,) -> (T, hd), or per row (B, T) -> (B, 1, T, hd),
    which broadcasts over heads. local: the sliding layers' tables where model.rope_local_theta
    gives them their own base (Gemma 3: unscaled). Recomputed per forward: a few tiny kernels,
    and no buffers to lose when a model is built on the meta device."""
    hd, theta, scaling = cfg.attn_head_dim, cfg.rope_theta, cfg.rope_scaling
    if local and cfg.rope_local_theta is not None:
        theta, scaling = cfg.rope_local_theta, None
    inv_freq = rope_inv_freq(hd, theta, scaling, positions.device)  # (hd/2,)
    attention_factor = 1.0
    if scaling and scaling.get("rope_type") == "longrope":
        # LongRoPE (Phi-3): the long factors once the sequence (the largest position + 1, as
        # transformers' dynamic update) passes the original context; cos and sin scaled by its
        # attention factor. Chosen on the device: no host sync.
        exponents = torch.arange(0, hd, 2, dtype=torch.int64, device=positions.device).float() / hd
        long_freq = 1.0 / (torch.tensor(scaling["long_factor"], device=positions.device) * theta**exponents)
        is_long = positions.max() + 1 > scaling["original_max_position_embeddings"]
        inv_freq = torch.where(is_long, long_freq, inv_freq)
        attention_factor = longrope_attention_factor(scaling)
    freqs = positions.float()[..., None] * inv_freq  # (..., T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd)
    if positions.dim() == 2:
        emb = emb[:, None]  # (B, 1, T, hd)
    if attention_factor != 1.0:
        return emb.cos() * attention_factor, emb.sin() * attention_factor
    return emb.cos(), emb.sin()


def longrope_attention_factor(scaling: dict) -> float:
    """LongRoPE's cos / sin scale: attention_factor, else sqrt(1 + ln(factor) / ln(original context))."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_cos_sin(cfg: ModelConfig, seq_len: int, device: torch.device) -> Rope:
    """cos, sin tables (T, hd) for positions 0 .. seq_len - 1."""
    return rope_at(cfg, torch.arange(seq_len, device=device))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, h, T, hd) by the position tables (T, hd) or (B, 1, T, hd): x cos + rotate_half(x) sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Layers


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight; statistics in (at least) fp32, as HF Llama. With an
    offset (Gemma: 1) the scale is offset + weight, applied in fp32 before the cast, as Gemma."""
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (x * (offset + weight.to(x.dtype))).to(dtype)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The model's norm over `dim` features (default n_embd)."""
    dim = dim or cfg.n_embd
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps=cfg.norm_eps, offset=cfg.norm_offset)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def has_qkv_bias(cfg: ModelConfig) -> bool:
    """Whether the q / k / v projection has biases: model.qkv_bias, or model.bias when that is null."""
    return cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias


class Attention(nn.Module):
    """Causal self-attention with a fused [q | k | v] projection and optional GQA / RoPE, q / k
    norms (per head or over the projection), a sliding window, a score scale and soft-cap."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = hd = cfg.attn_head_dim
        self.backend = cfg.attention_backend
        self.dropout = cfg.dropout
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
        self.softcap = cfg.attn_softcap
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * hd
        self.c_attn = nn.Linear(cfg.n_embd, qkv_dim, bias=has_qkv_bias(cfg))
        self.c_proj = nn.Linear(self.n_head * hd, cfg.n_embd, bias=cfg.bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":  # head: over each head's hd features; full: over the whole projection
            self.q_norm = make_norm(cfg, hd if cfg.qk_norm == "head" else self.n_head * hd)
            self.k_norm = make_norm(cfg, hd if cfg.qk_norm == "head" else self.n_kv_head * hd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None,
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). mask: (B, 1, T, T) packed documents (see document_mask);
        cache: this layer's keys and values of earlier tokens, extended with these."""
        B, T, C = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nkv, S, hd): the cached tokens', then these
        dropout_p = self.dropout if self.training else 0.0
        y = causal_attention(
            q, k, v, self.backend, dropout_p, mask, window=self.window, scale=self.scale, softcap=self.softcap
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


def gate_activation(cfg: ModelConfig):
    """A gated MLP's activation: SiLU (swiglu) or tanh GELU (geglu, Gemma's gelu_pytorch_tanh)."""
    return F.silu if cfg.mlp == "swiglu" else partial(F.gelu, approximate="tanh")


class MLP(nn.Module):
    """GELU MLP (tanh approximation: GPT-2's gelu_new; gelu_exact: erf, several times cheaper on a
    CPU in bf16) or gated: down(act(gate(x)) * up(x)) with SiLU (SwiGLU, Llama) or tanh GELU
    (GeGLU, Gemma); model.fused_gate_up keeps gate and up in one linear [gate | up] (Phi-3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.intermediate_size or 4 * cfg.n_embd
        self.gated = cfg.mlp in ("swiglu", "geglu")
        self.fused = cfg.fused_gate_up
        self.approximate = "none" if cfg.mlp == "gelu_exact" else "tanh"
        if self.gated:
            self.act = gate_activation(cfg)
            if self.fused:
                self.w_gate_up = nn.Linear(cfg.n_embd, 2 * hidden, bias=cfg.bias)
            else:
                self.w_gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
                self.w_up = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        else:
            self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.w_gate_up(x).chunk(2, dim=-1) if self.fused else (self.w_gate(x), self.w_up(x))
            h = self.act(gate) * up  # (B, T, hidden)
        else:
            h = F.gelu(self.c_fc(x), approximate=self.approximate)  # (B, T, hidden)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """One layer. norm_placement pre: x + f(norm(x)); post: x + norm(f(x)) (the same names,
    norm_1 / norm_2, after the sublayers); sandwich: x + norm_post(f(norm(x)))."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.placement = cfg.norm_placement
        self.norm_1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.norm_2 = make_norm(cfg)
        if cfg.is_moe(layer):
            from trainer.model.moe import SparseMLP  # the experts' module, on first use

            self.mlp = SparseMLP(cfg)
        else:
            self.mlp = MLP(cfg)
        if self.placement == "sandwich":
            self.norm_1_post = make_norm(cfg)
            self.norm_2_post = make_norm(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None = None,
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        if self.placement == "pre":
            x = x + self.attn(self.norm_1(x), rope, mask, cache)
            return x + self.mlp(self.norm_2(x))
        if self.placement == "post":
            x = x + self.norm_1(self.attn(x, rope, mask, cache))
            return x + self.norm_2(self.mlp(x))
        x = x + self.norm_1_post(self.attn(self.norm_1(x), rope, mask, cache))
        return x + self.norm_2_post(self.mlp(self.norm_2(x)))


class Embedding(nn.Module):
    """Token embedding, plus learned positions when the model does not use RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)  # rows past vocab_size: padding, zero
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        self.scale = math.sqrt(cfg.n_embd) if cfg.embed_scale else None  # Gemma: times sqrt(n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> (B, T, C); positions: (T,) or (B, T), default 0 .. T - 1."""
        x = self.wte(idx)  # (B, T, C)
        if self.scale is not None:  # the factor rounded to the weights' dtype, as Gemma
            x = x * torch.tensor(self.scale, dtype=x.dtype)
        if self.wpe is not None:
            if positions is None:
                positions = torch.arange(idx.size(1), device=idx.device)  # (T,)
            x = x + self.wpe(positions)  # (T, C) broadcast over B, or (B, T, C)
        return self.dropout(x)


# ---------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    """Decoder-only transformer. forward(idx (B, T)) -> logits (B, T, vocab);
    forward(idx, targets (B, T)) -> the summed token loss (the caller normalises it).

    The embedding and head hold cfg.padded_vocab_size rows (vocab_size rounded up to
    model.vocab_multiple) so the head's matmuls run at aligned sizes; the padding rows start at
    zero, their logits are -inf in the loss (zero gradient) and absent from forward's logits.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("GPT needs model.vocab_size: resolve it from the tokenizer first")
        cfg.check_gated()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        # Tied: the logits reuse embed.wte.weight, so there is no separate head parameter.
        self.head = None
        if not cfg.tie_embeddings:
            self.head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if self.embed.wte.weight.device.type != "meta":  # on meta: shapes only, nothing to fill
            self.init_weights()

    @torch.no_grad()
    def init_parameter(
        self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None, first_row: int = 0
    ) -> None:
        """Fill `tensor` in place with parameter `name`'s GPT-2 init: N(0, init_std) weights,
        zero biases, norms at one, and residual output projections (c_proj) at
        init_std / sqrt(2 n_layer) so the residual stream's variance does not grow with depth.
        Wrapper components in `name` (activation checkpointing, DDP, ...) do not matter. first_row:
        `tensor` holds the parameter's rows from this one on (a block of them: InitTensor)."""
        name, std = bare_name(name), self.cfg.init_std
        if name.endswith(("c_proj.weight", "mlp.w_down")):
            nn.init.normal_(tensor, 0.0, std / math.sqrt(2 * self.cfg.n_layer), generator=generator)
        elif name.endswith("bias"):
            nn.init.zeros_(tensor)
        elif "norm" in name:  # a norm's scale is offset + weight: one either way
            nn.init.constant_(tensor, 1.0 - self.cfg.norm_offset if self.cfg.norm == "rmsnorm" else 1.0)
        else:
            nn.init.normal_(tensor, 0.0, std, generator=generator)
        if name in ("embed.wte.weight", "head.weight"):  # padding rows: no token; zero gradient keeps them zero
            tensor[max(self.cfg.vocab_size - first_row, 0) :] = 0

    def init_weights(self) -> None:
        """Initialise every parameter in place from the global torch RNG (see init_parameter).
        Callable again after building on the meta device and `to_empty`."""
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    def initial_weights(
        self, seed: int, device: torch.device | str = "cpu", lazy: bool = False
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, new full fp32 tensor on `device`) for each parameter, in named_parameters order. Reads
        only names and shapes, so it serves a meta-built or sharded model: the values depend on the
        seed and device type alone, the same on every rank and in any order. Each block of INIT_ROWS
        rows is drawn from its own torch.Generator(device), seeded by (seed, name, block), so a rank
        that holds some rows draws only the blocks they overlap: lazy=True yields InitTensors (rows /
        full, as a pretrained checkpoint's CheckpointTensor) for the strategy to draw its part of.
        Names are the unwrapped model's (see bare_name)."""
        # Every shape read before the first tensor is drawn: ZeRO-3 partitions a parameter as soon as it is
        # filled (its shape becomes (0,)).
        shapes = [(bare_name(name), tuple(getattr(p, "ds_shape", p.shape))) for name, p in self.named_parameters()]
        for name, shape in shapes:
            tensor = InitTensor(self, name, shape, seed, torch.device(device))
            yield name, tensor if lazy else tensor.full()

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        token_logps: bool = False,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab), or with targets (B, T) the summed token loss.
        token_logps: with targets, each target's log-probability instead, (B, T) fp32, 0 where the
        target is IGNORE_INDEX (preference and RL objectives; no load-balancing loss is added).
        logits_to_keep: without targets, the logits of the last this many positions only (generation
        needs the last: a long prompt's (B, T, vocab) logits are never built); 0: all.

        positions: optional int64 (B, T), each token's position in its own document, 0 where
        one starts (packed rows): RoPE / learned positions read them, and attention stays causal
        within each document. cache: generation's KVCache; idx continues the tokens it holds.
        """
        cfg = self.cfg
        T = idx.size(1)
        # A split model (sequence parallelism: trainer.parallel.tensor) needs a multiple of
        # sequence_multiple tokens: a length it does not divide (generation, evaluation) runs with
        # `extra` tokens appended, after the real ones, changing none of them (causal attention); they
        # are cut before the head.
        extra = (-T) % self.sequence_multiple
        padded = cache is not None and cache.pad is not None  # left-padded rows of batched generation
        if padded:
            start = cache.length  # read once: the first layer's cache grows during this forward
            positions, mask = padded_positions(cache.pad, start, T + extra).clamp(max=cfg.block_size - 1), None
        else:
            positions, mask = self._positions_and_mask(idx, positions, cache)
            if extra:  # the appended tokens repeat the last position (a valid one for learned positions)
                positions = torch.cat((positions, positions[..., -1:].expand(*positions.shape[:-1], extra)), dim=-1)
                mask = None if mask is None else document_mask(positions)
        if extra:
            idx = F.pad(idx, (0, extra))
        x = self.embed(idx, positions)  # (B, T, C)
        ropes, masks = {}, {}  # per kind of layer (full / sliding): RoPE tables and packed-document masks
        for i, block in enumerate(self.blocks):
            local = cfg.is_sliding(i)
            if local not in ropes:
                ropes[local] = rope_at(cfg, positions, local) if cfg.position == "rope" else None
                if padded:
                    masks[local] = padded_mask(cache.pad, start, idx.size(1), cfg.sliding_window if local else None)
                else:
                    masks[local] = document_mask(positions, cfg.sliding_window) if local and mask is not None else mask
            x = block(x, ropes[local], masks[local], None if cache is None else cache.layers[i])  # (B, T, C)
        x = self.norm_f(x)
        if extra and cache is not None:  # the appended tokens' keys and values leave the cache
            for layer in cache.layers:
                layer.length -= extra
        if self.split_head is not None:  # a split model's head (x: a DTensor sharded over the sequence)
            return self.split_head(self, x, T, targets, token_logps, logits_to_keep)
        x = x[:, :T] if extra else x
        # The head's weight is read here, inside GPT.forward, where FSDP2 (root group) and ZeRO-3
        # (external parameter, found by DeepSpeed's parameter getter) have gathered it.
        weight = self.embed.wte.weight if self.head is None else self.head.weight  # (padded vocab, C)
        if targets is None:  # the real rows only (a contiguous slice): logits exactly the unpadded model's
            x = x[:, -logits_to_keep:] if logits_to_keep else x
            return softcap(F.linear(x, weight[: cfg.vocab_size]), cfg.final_softcap)  # (B, T, vocab)
        if token_logps:
            return target_logps(x, weight, targets, cfg.loss_chunk, cfg.vocab_size, cfg.final_softcap)
        if cfg.final_softcap:  # capped logits, then the loss: the full-logits path
            loss = cross_entropy_sum(softcap(F.linear(x, weight), cfg.final_softcap), targets, cfg.vocab_size)
        else:
            loss = (self._compiled_loss or head_loss)(x, weight, targets, cfg.loss_chunk, cfg.vocab_size)
        return loss + self._moe_aux_loss(targets)

    def _moe_aux_loss(self, targets: torch.Tensor) -> torch.Tensor | float:
        """In training, router_aux_loss_coef times the load-balancing loss of this forward's
        sparse MLPs (transformers' load_balancing_loss_func over all of them), times the
        micro-batch's target count: the caller's division by the batch's targets then weighs it
        like the token loss, so one micro-batch gives transformers' loss + coef * aux."""
        if not self.cfg.n_experts or not self.training:  # a dense model pays nothing here
            return 0.0
        sparse = [m for m in self.modules() if hasattr(m, "router_logits")]  # whatever wraps the blocks
        from trainer.model.moe import load_balancing_loss

        aux = load_balancing_loss([m.router_logits for m in sparse], self.cfg.n_experts, self.cfg.n_experts_per_token)
        self.moe_aux_loss = aux.detach()  # (), for the logs
        if not self.cfg.router_aux_loss_coef:
            return 0.0
        return self.cfg.router_aux_loss_coef * aux * (targets != IGNORE_INDEX).sum()

    moe_aux_loss: torch.Tensor | None = None  # the last training forward's load-balancing loss
    # Set by trainer.parallel.tensor on a split model: the token count a forward needs a multiple of, and
    # the head + loss (vocabulary-parallel) that replaces the one below; the defaults: the whole model's.
    sequence_multiple = 1
    split_head = None

    _compiled_loss = None  # set by compile_loss

    def compile_loss(self) -> None:
        """Run the head and the loss (the step's largest activations) as one compiled function
        (train.compile; trainer/model/compile.py)."""
        self._compiled_loss = torch.compile(head_loss)

    def _positions_and_mask(
        self, idx: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The positions the embeddings read, and the attention mask: (T,) after the cached tokens
        and None (plain causal) without `positions`; else positions (B, T) and causal-within-each-
        document (B, 1, T, T)."""
        T = idx.size(1)
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence length {start + T} exceeds model.block_size={self.cfg.block_size}")
        if positions is None:
            return torch.arange(start, start + T, device=idx.device), None  # (T,), the same for every row
        if positions.shape != idx.shape or cache is not None:
            raise ValueError(f"positions {tuple(positions.shape)} must match idx {tuple(idx.shape)}, without a cache")
        return positions, document_mask(positions)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        eos_id: int | Collection[int] | None = None,
        use_cache: bool = True,
        *,
        top_p: float = 1.0,
        prompt_lengths: torch.Tensor | None = None,
        all_done: Callable[[torch.Tensor], bool] | None = None,
        stopped: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Append up to max_new_tokens tokens to idx (B, T), each drawn from softmax(logits /
        temperature) over the top_k likeliest (temperature 0: greedy).

        eos_id: a token id (or ids) that ends a row; a finished row repeats its eos, and
        generation stops once every row has one (one row: the ids end with its eos).
        use_cache: keep every layer's keys and values (KVCache), so a step runs one token; once
        the context fills block_size, each step reruns the cropped context, as without the cache.
        top_p: nucleus sampling, the smallest set of likeliest tokens holding top_p of the probability.
        prompt_lengths (B,): the rows of idx are prompts of these lengths, left-padded to idx's width
        (batched generation): each row's positions start at 0 at its first real token and no query
        reads a padding key (needs the cache and the whole sequence within block_size).
        all_done(done) -> bool: whether generation stops, given the rows that produced an eos
        (default: all of them); sharded models pass one that agrees across ranks (every rank must
        run the same number of forwards).
        stopped(idx, done) -> (B,) bool: the rows that hit a stop sequence by now (lm_eval's `until`
        strings, checked on the decoded text); such a row ends as an eos row does.
        Every step goes through forward, where sharding wrappers gather the weights. Decoding runs
        eager even where the blocks are compiled (train.compile): its shapes change every token, and
        the blocks were compiled with fullgraph for training's fixed shapes.
        """
        with torch.compiler.set_stance("force_eager"):
            return self._generate(
                idx, max_new_tokens, temperature, top_k, generator, eos_id, use_cache, top_p, prompt_lengths, all_done,
                stopped,
            )  # fmt: skip

    def _generate(
        self, idx, max_new_tokens, temperature, top_k, generator, eos_id, use_cache, top_p, prompt_lengths, all_done,
        stopped,
    ) -> torch.Tensor:  # fmt: skip
        stop = None  # (n_eos,) the ids that end a row
        if eos_id is not None:
            ids = sorted(eos_id) if isinstance(eos_id, set | frozenset) else eos_id  # int, sequence or tensor
            stop = torch.as_tensor(ids, device=idx.device).flatten()
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # (B,) rows that produced an eos
        # The cache holds what this call can reach (the prompt and the new tokens), not block_size: a
        # 40k-token model sampling 1k tokens after a short prompt keeps 1k-odd positions per row.
        capacity = min(self.cfg.block_size, idx.size(1) + max_new_tokens)
        capacity += self.sequence_multiple - 1  # room for the tokens a split model's forward appends
        cache = KVCache(len(self.blocks), capacity) if use_cache else None
        if prompt_lengths is not None:
            if cache is None or idx.size(1) + max_new_tokens > self.cfg.block_size:
                raise ValueError("left-padded prompts need the KV cache and prompt + new tokens within block_size")
            cache.pad = idx.size(1) - prompt_lengths.to(idx.device)  # (B,) padding ids before each prompt
        all_done = all_done or (lambda finished: bool(finished.all()))  # host sync
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) > self.cfg.block_size:
                cache = None  # full: from here on, the cropped context
            if cache is not None and self._rope_switches(cache.length, idx.size(1)):
                cache = KVCache(len(self.blocks), capacity)  # every key re-rotated, as transformers
            if cache is not None:  # the prompt first, then one new token a step
                logits = self(idx[:, cache.length :], cache=cache, logits_to_keep=1)[:, -1]  # (B, vocab)
            else:
                logits = self(idx[:, -self.cfg.block_size :], logits_to_keep=1)[:, -1]  # (B, vocab)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision sampled in fp32
            next_token = sample_token(logits, temperature, top_k, generator, top_p)  # (B, 1)
            ends = stop is not None or stopped is not None
            if ends:
                next_token = torch.where(done[:, None], idx[:, -1:], next_token)  # finished rows repeat their end
            if stop is not None:
                done |= torch.isin(next_token[:, 0], stop)
            idx = torch.cat((idx, next_token), dim=1)
            if stopped is not None:
                done |= stopped(idx, done).to(done.device)
            if ends and all_done(done):  # host sync (a collective where sharded): once a step
                break
        return idx

    def _rope_switches(self, cached: int, length: int) -> bool:
        """Whether LongRoPE moves to its long factors between the cached keys and a sequence of
        `length`: the cached keys, rotated with the short ones, must be computed again."""
        scaling = self.cfg.rope_scaling or {}
        if scaling.get("rope_type") != "longrope":
            return False
        return cached <= scaling["original_max_position_embeddings"] < length

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, the vocabulary's padding rows included (they are stored, and the
        head's matmul runs over them). exclude_embeddings drops the lookup tables: wpe, and wte
        when the head is untied (a tied wte is also the head's matmul, so it stays counted)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if self.embed.wpe is not None:
                n -= self.embed.wpe.weight.numel()
            if self.head is not None:
                n -= self.embed.wte.weight.numel()
        return n

    def active_params(self, exclude_embeddings: bool = False) -> int:
        """num_params with each sparse MLP counting only the experts a token uses (k of E)."""
        n = self.num_params(exclude_embeddings)
        cfg = self.cfg
        for module in self.modules():
            if hasattr(module, "router_logits"):  # a sparse MLP: its experts' weights are (E, ...) tensors
                experts = sum(getattr(module, w).numel() for w in ("w_gate", "w_up", "w_down"))
                n -= experts - experts * cfg.n_experts_per_token // cfg.n_experts
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B:
        6 N (matmuls with the weights a token uses: the active parameters of a mixture of
        experts) + 12 (n_head head_dim) S per layer (attention scores and mix), S = seq_len, or the
        window in a sliding layer when it is shorter."""
        cfg = self.cfg
        spans = [min(seq_len, cfg.sliding_window) if cfg.is_sliding(i) else seq_len for i in range(cfg.n_layer)]
        return 6 * self.active_params(exclude_embeddings=True) + 12 * cfg.n_head * cfg.attn_head_dim * sum(spans)


INIT_ROWS = 64  # rows of a parameter drawn from one generator (a shard draws the blocks its rows overlap)
INIT_DRAWN = 0  # elements this process has drawn for initial weights (InitTensor), a figure for tests


class InitTensor:
    """One parameter's seeded random init, drawn on demand: `rows(start, stop)` draws only the blocks of
    INIT_ROWS rows that the range overlaps, each from its own generator seeded by (seed, name, block);
    `full()` all of them. So an FSDP2 shard draws its own rows, not the whole tensor (see
    trainer.parallel.base.shard_of), and every rank agrees on every value."""

    def __init__(self, model: GPT, name: str, shape: tuple[int, ...], seed: int, device: torch.device) -> None:
        self.model, self.name, self.shape, self.seed, self.device = model, name, shape, seed, device
        self.dtype = torch.float32

    def full(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        global INIT_DRAWN
        stop = min(stop, self.shape[0])
        out = torch.empty((max(stop - start, 0), *self.shape[1:]), dtype=torch.float32, device=self.device)
        for block in range(start // INIT_ROWS, -(-stop // INIT_ROWS)):
            lo, hi = block * INIT_ROWS, min((block + 1) * INIT_ROWS, self.shape[0])
            digest = hashlib.sha256(f"{self.seed}:{self.name}:{block}".encode()).digest()
            generator = torch.Generator(self.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            piece = torch.empty((hi - lo, *self.shape[1:]), dtype=torch.float32, device=self.device)
            self.model.init_parameter(self.name, piece, generator, first_row=lo)
            INIT_DRAWN += piece.numel()
            a, b = max(lo, start), min(hi, stop)
            out[a - start : b - start] = piece[a - lo : b - lo]
        return out


def padded_positions(pad: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """Positions (B, T) of tokens start .. start + T - 1 of left-padded rows: each row counts from 0 at
    its first real token (pad (B,) padding tokens before it); padding positions are 0."""
    steps = torch.arange(start, start + T, device=pad.device)  # (T,)
    return (steps[None, :] - pad[:, None]).clamp(min=0)


def padded_mask(pad: torch.Tensor, start: int, T: int, window: int | None = None) -> torch.Tensor:
    """Attention mask (B, 1, T, S), S = start + T, of queries start .. S - 1 over keys 0 .. S - 1 of
    left-padded rows: causal (within `window` keys), never a padding key, and a padding query reads
    itself alone (no empty row: no NaN in SDPA)."""
    S = start + T
    query = torch.arange(start, S, device=pad.device)[:, None]  # (T, 1)
    key = torch.arange(S, device=pad.device)[None, :]  # (1, S)
    allowed = (key <= query) & (key >= pad[:, None, None])  # (B, T, S)
    if window is not None:
        allowed &= query - key < window
    return (allowed | (key == query)).unsqueeze(1)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma 2's logit soft-capping); x itself without a cap."""
    return x if not cap else torch.tanh(x / cap) * cap


def head_loss(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, vocab: int
) -> torch.Tensor:
    """The summed token loss of the final hidden states x (B, T, C) under the head's weight
    (padded vocab, C): logits and cross-entropy, or with chunk_size > 0 both fused over chunks
    of tokens (no (B, T, vocab) logits). Rows vocab.. of weight are padding, masked."""
    if chunk_size > 0:
        return linear_cross_entropy_sum(x, weight, targets, chunk_size, vocab)
    logits = F.linear(x, weight)  # (B, T, padded vocab): the aligned matmul
    return cross_entropy_sum(logits, targets, vocab)


def sample_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
    top_p: float = 1.0,
) -> torch.Tensor:
    """The next token (B, 1) from logits (B, vocab): argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest, then to the smallest set of
    likeliest tokens whose probability reaches top_p (nucleus sampling; the likeliest always stays)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, vocab)
        before = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1) - F.softmax(sorted_logits, dim=-1)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)  # mass before >= p
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)  # (B, 1)
