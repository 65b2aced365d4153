"""GPT: one decoder-only transformer class covering the GPT-2 and Llama (Mistral, Qwen2) layouts.

Pre-norm blocks, `x = x + attn(norm_1(x)); x = x + mlp(norm_2(x))`. ModelConfig picks
LayerNorm or RMSNorm, GELU or SwiGLU, learned positions or RoPE, multi-head or grouped-query
attention, q / k / v biases, a tied or untied head. forward takes optional per-token positions
(packed documents attend only within themselves); generate keeps a KV cache. Parameter names
group by layer (see `param_group`), and `GPT.blocks` is exposed so strategies can shard and
checkpoint one block at a time. Nothing here knows about ranks, precision policy or logging.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.model.attention import KVCache, LayerCache, causal_attention, document_mask
from trainer.model.loss import cross_entropy_sum, linear_cross_entropy_sum

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
        kind = {"attn": "attn", "mlp": "mlp", "norm_1": "norm", "norm_2": "norm"}.get(parts[2])
        if kind is not None:
            return f"block.{parts[1]}.{kind}"
    raise ValueError(f"param_group: {name!r} is not a GPT parameter name")


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (HF Llama's rotate_half layout, so Llama weights import unpermuted)

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin tables, each (T, head_dim) or (B, 1, T, head_dim), fp32


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in fp32, with Llama 3 ('llama3') scaling if given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"model.rope_scaling: rope_type {kind!r} is not supported (only 'llama3')")
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


def rope_at(cfg: ModelConfig, positions: torch.Tensor) -> Rope:
    """cos, sin tables in fp32 for positions (T,) -> (T, hd), or per row (B, T) -> (B, 1, T, hd),
    which broadcasts over heads. Recomputed per forward: a few tiny kernels, and no buffers to
    lose when a model is built on the meta device."""
    inv_freq = rope_inv_freq(cfg.n_embd // cfg.n_head, cfg.rope_theta, cfg.rope_scaling, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (..., T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd)
    if positions.dim() == 2:
        emb = emb[:, None]  # (B, 1, T, hd)
    return emb.cos(), emb.sin()


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight; statistics in (at least) fp32, as HF Llama."""
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def has_qkv_bias(cfg: ModelConfig) -> bool:
    """Whether the q / k / v projection has biases: model.qkv_bias, or model.bias when that is null."""
    return cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias


class Attention(nn.Module):
    """Causal self-attention with a fused [q | k | v] projection and optional GQA / RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.backend = cfg.attention_backend
        self.dropout = cfg.dropout
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, qkv_dim, bias=has_qkv_bias(cfg))
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
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
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nkv, S, hd): the cached tokens', then these
        dropout_p = self.dropout if self.training else 0.0
        y = causal_attention(q, k, v, self.backend, dropout_p, mask)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU MLP (tanh approximation: GPT-2's gelu_new; gelu_exact: erf, several times cheaper on a
    CPU in bf16) or SwiGLU: down(silu(gate(x)) * up(x)) as Llama."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.intermediate_size or 4 * cfg.n_embd
        self.swiglu = cfg.mlp == "swiglu"
        self.approximate = "none" if cfg.mlp == "gelu_exact" else "tanh"
        if self.swiglu:
            self.w_gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
            self.w_up = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        else:
            self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.w_gate(x)) * self.w_up(x)  # (B, T, hidden)
        else:
            h = F.gelu(self.c_fc(x), approximate=self.approximate)  # (B, T, hidden)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None = None,
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), rope, mask, cache)
        x = x + self.mlp(self.norm_2(x))
        return x


class Embedding(nn.Module):
    """Token embedding, plus learned positions when the model does not use RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)  # rows past vocab_size: padding, zero
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> (B, T, C); positions: (T,) or (B, T), default 0 .. T - 1."""
        x = self.wte(idx)  # (B, T, C)
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
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        # Tied: the logits reuse embed.wte.weight, so there is no separate head parameter.
        self.head = None
        if not cfg.tie_embeddings:
            self.head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if self.embed.wte.weight.device.type != "meta":  # on meta: shapes only, nothing to fill
            self.init_weights()

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill `tensor` in place with parameter `name`'s GPT-2 init: N(0, init_std) weights,
        zero biases, norms at one, and residual output projections (c_proj) at
        init_std / sqrt(2 n_layer) so the residual stream's variance does not grow with depth.
        Wrapper components in `name` (activation checkpointing, DDP, ...) do not matter."""
        name, std = bare_name(name), self.cfg.init_std
        if name.endswith("c_proj.weight"):
            nn.init.normal_(tensor, 0.0, std / math.sqrt(2 * self.cfg.n_layer), generator=generator)
        elif name.endswith("bias"):
            nn.init.zeros_(tensor)
        elif "norm" in name:
            nn.init.ones_(tensor)
        else:
            nn.init.normal_(tensor, 0.0, std, generator=generator)
        if name in ("embed.wte.weight", "head.weight"):
            tensor[self.cfg.vocab_size :] = 0  # padding rows: no token; zero gradient keeps them zero

    def init_weights(self) -> None:
        """Initialise every parameter in place from the global torch RNG (see init_parameter).
        Callable again after building on the meta device and `to_empty`."""
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    def initial_weights(self, seed: int, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """(name, new full fp32 tensor on `device`) for each parameter, in named_parameters order,
        drawn from one torch.Generator(device) seeded with `seed`. Reads only names and shapes,
        so it serves a meta-built or sharded model: the values depend on seed and device type
        alone, the same on every rank. Names are the unwrapped model's (see bare_name)."""
        generator = torch.Generator(device).manual_seed(seed)
        for name, p in self.named_parameters():
            tensor = torch.empty(p.shape, dtype=torch.float32, device=device)
            self.init_parameter(name, tensor, generator)
            yield bare_name(name), tensor

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab), or with targets (B, T) the summed token loss.

        positions: optional int64 (B, T), each token's position in its own document, 0 where
        one starts (packed rows): RoPE / learned positions read them, and attention stays causal
        within each document. cache: generation's KVCache; idx continues the tokens it holds.
        """
        positions, mask = self._positions_and_mask(idx, positions, cache)
        x = self.embed(idx, positions)  # (B, T, C)
        rope = rope_at(self.cfg, positions) if self.cfg.position == "rope" else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, None if cache is None else cache.layers[i])  # (B, T, C)
        x = self.norm_f(x)
        # The head's weight is read here, inside GPT.forward, where FSDP2 (root group) and ZeRO-3
        # (external parameter, found by DeepSpeed's parameter getter) have gathered it.
        weight = self.embed.wte.weight if self.head is None else self.head.weight  # (padded vocab, C)
        if targets is None:  # the real rows only (a contiguous slice): logits exactly the unpadded model's
            return F.linear(x, weight[: self.cfg.vocab_size])  # (B, T, vocab)
        loss = self._compiled_loss or head_loss
        return loss(x, weight, targets, self.cfg.loss_chunk, self.cfg.vocab_size)

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
    ) -> torch.Tensor:
        """Append up to max_new_tokens tokens to idx (B, T), each drawn from softmax(logits /
        temperature) over the top_k likeliest (temperature 0: greedy).

        eos_id: a token id (or ids) that ends a row; a finished row repeats its eos, and
        generation stops once every row has one (one row: the ids end with its eos).
        use_cache: keep every layer's keys and values (KVCache), so a step runs one token; once
        the context fills block_size, each step reruns the cropped context, as without the cache.
        Every step goes through forward, where sharding wrappers gather the weights. Decoding runs
        eager even where the blocks are compiled (train.compile): its shapes change every token, and
        the blocks were compiled with fullgraph for training's fixed shapes.
        """
        with torch.compiler.set_stance("force_eager"):
            return self._generate(idx, max_new_tokens, temperature, top_k, generator, eos_id, use_cache)

    def _generate(self, idx, max_new_tokens, temperature, top_k, generator, eos_id, use_cache) -> torch.Tensor:
        stop = None  # (n_eos,) the ids that end a row
        if eos_id is not None:
            ids = sorted(eos_id) if isinstance(eos_id, set | frozenset) else eos_id  # int, sequence or tensor
            stop = torch.as_tensor(ids, device=idx.device).flatten()
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # (B,) rows that produced an eos
        cache = KVCache(len(self.blocks), self.cfg.block_size) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) > self.cfg.block_size:
                cache = None  # full: from here on, the cropped context
            if cache is not None:  # the prompt first, then one new token a step
                logits = self(idx[:, cache.length :], cache=cache)[:, -1]  # (B, vocab)
            else:
                logits = self(idx[:, -self.cfg.block_size :])[:, -1]  # (B, vocab)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision sampled in fp32
            next_token = sample_token(logits, temperature, top_k, generator)  # (B, 1)
            if stop is not None:
                next_token = torch.where(done[:, None], idx[:, -1:], next_token)  # finished rows repeat their eos
                done |= torch.isin(next_token[:, 0], stop)
            idx = torch.cat((idx, next_token), dim=1)
            if stop is not None and bool(done.all()):  # host sync: once a step, only with eos_id
                break
        return idx

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

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B:
        6 N (matmuls with the weights) + 12 n_layer n_embd seq_len (attention scores and mix)."""
        n = self.num_params(exclude_embeddings=True)
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.n_embd * seq_len


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
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token (B, 1) from logits (B, vocab): argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)  # (B, 1)
