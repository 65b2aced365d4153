"""The project's own ops, each with tiny inputs for `gradcheck`: attention backends (with GQA, packed
documents and a KV cache), the full / chunked head + cross-entropy with a padded vocabulary, the
norms, RoPE, LoRA and DoRA layers, whole GPTs, and the loss-scaled backward.

An op that cannot run here (flash kernels need CUDA and half precision, which a finite difference
cannot resolve) is skipped with the project's own reason. `check_op` returns one row of the
`python -m trainer.diagnose gradcheck` table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.config import ConfigError, ModelConfig, PrecisionConfig
from trainer.diagnostics.gradient_check import Backward, gradcheck
from trainer.lora.layer import LoRALinear
from trainer.model.attention import check_attention_backend, document_mask
from trainer.model.gpt import GPT, apply_rope, causal_attention, head_loss, make_norm, rope_at
from trainer.model.loss import IGNORE_INDEX, cross_entropy_sum


@dataclass
class Case:
    """What gradcheck runs: fn_or_module on inputs, and optionally its own backward."""

    fn: Callable[..., Any] | nn.Module
    inputs: Sequence[Any] | Mapping[str, Any]
    backward: Backward | None = None
    max_entries_per_tensor: int = 64


@dataclass(frozen=True)
class CustomOp:
    """One op: a name for --only, what it covers, how to build its case at a dtype, and why it
    cannot run here (None when it can)."""

    name: str
    about: str
    build: Callable[[torch.dtype], Case]
    unavailable: Callable[[torch.dtype], str | None] = lambda dtype: None


def _randn(*shape: int, dtype: torch.dtype, generator: torch.Generator, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(grad)


# ---------------------------------------------------------------------------------------------
# Attention (trainer/model/attention.py)

DOC_POSITIONS = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])  # (B, T): packed rows, restarts at 0


def attention(backend: str, n_kv: int = 4, documents: bool = False, cached: bool = False) -> Callable[..., Case]:
    """causal_attention on q (B, 4, T, 4) against k, v (B, n_kv, S, 4): S = T = 5, or T = 2 queries
    after 3 cached keys; documents: the mask of DOC_POSITIONS (causal within each document)."""

    def build(dtype: torch.dtype) -> Case:
        g = torch.Generator().manual_seed(0)
        T, S = (2, 5) if cached else (5, 5)
        q = _randn(2, 4, T, 4, dtype=dtype, generator=g)
        k, v = (_randn(2, n_kv, S, 4, dtype=dtype, generator=g) for _ in range(2))
        mask = document_mask(DOC_POSITIONS) if documents else None  # (B, 1, T, T)
        return Case(lambda q, k, v: causal_attention(q, k, v, backend, 0.0, mask), {"q": q, "k": k, "v": v})

    return build


def _backend_unavailable(backend: str) -> Callable[[torch.dtype], str | None]:
    def reason(dtype: torch.dtype) -> str | None:
        try:
            check_attention_backend(backend, torch.device("cpu"), dtype)
        except ConfigError as error:
            return str(error).split(":")[0].removeprefix(f"model.attention_backend={backend} ")
        return None

    return reason


# ---------------------------------------------------------------------------------------------
# Loss (trainer/model/loss.py, head_loss in trainer/model/gpt.py)

TARGETS = torch.tensor([[1, IGNORE_INDEX, 5, 0], [IGNORE_INDEX, 3, 3, 2]])  # (B, T), vocab 6


def cross_entropy(dtype: torch.dtype) -> Case:
    """cross_entropy_sum on logits (2, 4, 6), ignored targets included."""
    logits = _randn(2, 4, 6, dtype=dtype, generator=torch.Generator().manual_seed(0))
    return Case(lambda logits: cross_entropy_sum(logits, TARGETS), {"logits": logits})


def head_and_loss(chunk: int) -> Callable[[torch.dtype], Case]:
    """head_loss on hidden states (2, 4, 5) and a head (8, 5) whose rows 6, 7 pad the vocabulary of 6
    (zero, as GPT initialises them); chunk > 0: the fused, chunked path (a custom autograd.Function)."""

    def build(dtype: torch.dtype) -> Case:
        g = torch.Generator().manual_seed(0)
        x = _randn(2, 4, 5, dtype=dtype, generator=g)
        weight = _randn(8, 5, dtype=dtype, generator=g, grad=False)
        weight[6:] = 0
        weight.requires_grad_(True)
        return Case(lambda x, weight: head_loss(x, weight, TARGETS, chunk, 6), {"x": x, "weight": weight})

    return build


# ---------------------------------------------------------------------------------------------
# Norms and RoPE (trainer/model/gpt.py)


def norm(kind: str) -> Callable[[torch.dtype], Case]:
    """make_norm's LayerNorm / RMSNorm over 6 features, with random weight (and bias) so none is 1 or 0."""

    def build(dtype: torch.dtype) -> Case:
        g = torch.Generator().manual_seed(0)
        module = make_norm(ModelConfig(norm=kind, n_embd=6, n_head=1)).to(dtype)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        return Case(module, [_randn(3, 4, 6, dtype=dtype, generator=g)])

    return build


def rope(documents: bool) -> Callable[[torch.dtype], Case]:
    """apply_rope on x (2, 2, 5, 8) at positions 0..4, or per row at DOC_POSITIONS under Llama 3 scaling."""

    def build(dtype: torch.dtype) -> Case:
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8}  # fmt: skip
        cfg = ModelConfig(n_embd=16, n_head=2, position="rope", rope_scaling=scaling if documents else None)
        tables = rope_at(cfg, DOC_POSITIONS if documents else torch.arange(5))
        x = _randn(2, 2, 5, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
        return Case(lambda x: apply_rope(x, *tables), {"x": x})

    return build


# ---------------------------------------------------------------------------------------------
# LoRA and DoRA (trainer/lora/layer.py)


def lora(dtype: torch.dtype) -> Case:
    """LoRALinear over a Linear(6, 12) with adapters on rows 0..3 and 8..11 (rows 4..7 unadapted)."""
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 12), {"q": (0, 4), "v": (8, 12)}, r=2, scale=2.0, dropout=0.0, dora=False)
    layer.to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return Case(layer, {"x": _randn(3, 6, dtype=dtype, generator=g)})


def dora(dtype: torch.dtype, stationary: bool = True) -> Case:
    """A DoRA LoRALinear over a Linear(6, 8) adapting rows 2..5 (r = 2, scale s = 1: at s = 2 the
    curvature in B is beyond what float32's step resolves, 1.3e-3 at the 1e-3 threshold).

    DoRA's backward holds the row norm n = ||W + s B A|| constant (Liu et al. 2024, sec. 4.3: it is
    detached), so in A and B it is the forward's derivative only where n is stationary. Row i's
    norm is stationary in A[j, k] when (W + s B A)[i, k] = 0, and in B[i, j] when A's row j is
    orthogonal to that row. stationary=True builds such a point: W + s B A is zero on input columns
    0..2, where A lives (columns 3..5 of A are held at zero), so the check covers x, A's columns
    0..2, all of B, the magnitude and the bias (the base weight is frozen, as in training).
    stationary=False: the layer at a random point, where A and B fail the check by that design."""
    g = torch.Generator().manual_seed(0)
    scale = 1.0
    layer = LoRALinear(nn.Linear(6, 8), {"q": (2, 6)}, r=2, scale=scale, dropout=0.0, dora=True).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        layer.lora_magnitude["q"].abs_()
        A, B = layer.lora_A["q"], layer.lora_B["q"]
        if stationary:
            A[:, 3:] = 0
            layer.weight[2:6, :3] = -scale * B @ A[:, :3]  # W + s B A: zero on columns 0..2
    layer.weight.requires_grad_(False)
    x = _randn(3, 6, dtype=dtype, generator=g)
    if not stationary:
        return Case(layer, {"x": x})
    zeros = torch.zeros(2, 3, dtype=dtype)

    def forward(x, A, B, magnitude, bias):  # A: columns 0..2 of lora_A
        params = {"lora_A.q": torch.cat((A, zeros), dim=1), "lora_B.q": B, "lora_magnitude.q": magnitude, "bias": bias}
        return torch.func.functional_call(layer, params, (x,))

    leaves = (A[:, :3], B, layer.lora_magnitude["q"], layer.bias)
    A, B, magnitude, bias = (t.detach().clone().requires_grad_(True) for t in leaves)
    return Case(forward, {"x": x, "A": A, "B": B, "magnitude": magnitude, "bias": bias})


# ---------------------------------------------------------------------------------------------
# Whole models and the loss-scaled backward (trainer/parallel/base.py, trainer/precision.py)

GPT2_TINY = dict(vocab_size=11, vocab_multiple=8, block_size=8, n_layer=1, n_head=2, n_embd=8, init_std=0.3)
LLAMA_TINY = dict(GPT2_TINY, norm="rmsnorm", mlp="swiglu", position="rope", n_head=4, n_kv_head=2,
                  tie_embeddings=False, bias=False, loss_chunk_size=3)  # fmt: skip


class _Loss(nn.Module):
    """GPT's summed token loss over fixed tokens (idx, targets (2, 5)), and positions when packed."""

    def __init__(self, cfg: ModelConfig, positions: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # GPT draws its init from the global RNG: leave the caller's alone
            torch.manual_seed(0)
            self.model = GPT(cfg).to(dtype)
        g = torch.Generator().manual_seed(1)
        self.idx = torch.randint(0, cfg.vocab_size, (2, 5), generator=g)
        self.targets = torch.randint(0, cfg.vocab_size, (2, 5), generator=g)
        self.targets[0, 1] = IGNORE_INDEX
        self.positions = positions

    def forward(self) -> torch.Tensor:
        extra = {} if self.positions is None else {"positions": self.positions}
        return self.model(self.idx, targets=self.targets, **extra)


def gpt(config: dict[str, Any], documents: bool = False) -> Callable[[torch.dtype], Case]:
    """Every parameter of a one-block GPT (init_std 0.3, so gradients are not all tiny), 8 entries each."""
    positions = DOC_POSITIONS if documents else None
    return lambda dtype: Case(_Loss(ModelConfig(**config), positions, dtype), (), max_entries_per_tensor=8)


def loss_scaling(dtype: torch.dtype) -> Case:
    """The fp16 strategy's backward: the loss times the scale 2^16, then unscale_gradients. The
    gradient after unscaling must be the unscaled loss's (checked against its finite difference)."""
    from trainer.parallel.base import SingleDevice  # strategies import the optimizer stack: only here

    module = _Loss(ModelConfig(**GPT2_TINY), None, dtype)
    strategy = SingleDevice(torch.device("cpu"), precision=PrecisionConfig(dtype="fp16"))
    strategy.model = module

    def scaled_backward(f: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
        module.zero_grad(set_to_none=True)
        strategy.backward(f)  # (f * world_size * scale).backward()
        strategy.unscale_gradients()
        return [t.grad for t in tensors]

    return Case(module, (), scaled_backward, max_entries_per_tensor=8)


OPS: list[CustomOp] = [
    CustomOp("attention/math", "causal_attention, SDPA math kernel", attention("math")),
    CustomOp("attention/auto", "causal_attention, SDPA's own pick", attention("auto")),
    CustomOp("attention/math-gqa", "4 query heads on 2 kv heads", attention("math", n_kv=2)),
    CustomOp("attention/auto-mqa", "4 query heads on 1 kv head", attention("auto", n_kv=1)),
    CustomOp("attention/math-documents", "document_mask of packed rows", attention("math", documents=True)),
    CustomOp("attention/auto-documents", "document_mask of packed rows", attention("auto", n_kv=2, documents=True)),
    CustomOp("attention/math-kv-cache", "2 queries after 3 cached keys", attention("math", cached=True)),
    *(
        CustomOp(f"attention/{b}", f"causal_attention, backend {b}", attention(b), _backend_unavailable(b))
        for b in ("efficient", "cudnn", "flash", "flash_attn")
    ),
    CustomOp("loss/cross-entropy", "cross_entropy_sum with ignored targets", cross_entropy),
    CustomOp("loss/head-padded-vocab", "head_loss, full logits, padded vocab", head_and_loss(0)),
    CustomOp("loss/head-chunked", "linear_cross_entropy_sum (autograd.Function)", head_and_loss(3)),
    CustomOp("norm/layernorm", "make_norm: LayerNorm", norm("layernorm")),
    CustomOp("norm/rmsnorm", "make_norm: RMSNorm", norm("rmsnorm")),
    CustomOp("rope/positions", "apply_rope at 0..T-1", rope(False)),
    CustomOp("rope/documents", "apply_rope at packed positions, llama3 scaling", rope(True)),
    CustomOp("lora/linear", "LoRALinear, two adapted slices", lora),
    CustomOp("lora/dora", "DoRA where its detached row norm is stationary", dora),
    CustomOp("gpt/gpt2", "GPT-2 layout: learned positions, LayerNorm, GELU, tied", gpt(GPT2_TINY)),
    CustomOp("gpt/llama-documents", "Llama layout, GQA, chunked loss, packed rows", gpt(LLAMA_TINY, True)),
    CustomOp("loss-scaling", "fp16 scaler: backward x 2^16, unscale_gradients", loss_scaling),
]


def select(ops: list[CustomOp], only: Sequence[str] | None) -> list[CustomOp]:
    """The ops named in `only` (exact names, or prefixes before a '/': `attention`); all without it."""
    if not only:
        return ops
    chosen = [op for op in ops if any(op.name == s or op.name.startswith(s.rstrip("/") + "/") for s in only)]
    unknown = [s for s in only if not any(op.name == s or op.name.startswith(s.rstrip("/") + "/") for op in ops)]
    if unknown:
        raise SystemExit(f"gradcheck --only: no op named {', '.join(unknown)}; ops: {', '.join(o.name for o in ops)}")
    return chosen


def check_op(op: CustomOp, dtype: torch.dtype) -> dict[str, Any]:
    """One table row: {op, about, result: pass | FAIL | skip, reason, report (GradcheckReport.to_dict())}."""
    reason = op.unavailable(dtype)
    if reason is not None:
        return {"op": op.name, "about": op.about, "result": "skip", "reason": reason, "report": None}
    case = op.build(dtype)
    report = gradcheck(
        case.fn, case.inputs, dtype=dtype, backward=case.backward, max_entries_per_tensor=case.max_entries_per_tensor
    )
    result = "pass" if report.passed else "FAIL"
    return {"op": op.name, "about": op.about, "result": result, "reason": None, "report": report.to_dict()}
