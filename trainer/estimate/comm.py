"""The scale planner's FLOPs and collectives: what one GPU computes and sends in a training step.

FLOPs, a token, forward (PaLM's appendix B, as GPT.flops_per_token and trainer.monitor's MFU count
them): a matmul with P weights 2 P; a block's q | k | v 2 C (Q + 2K), o 2 Q C, the MLP's gate and
up 4 C H (GELU: 2 C H), down 2 H C (a sparse MLP: the router 2 E C and k experts' 6 C I), the
attention scores and mix 4 S Q (S the keys a query reads: the sequence, or a shorter window); the
head 2 V C. Backward is 2 x forward (1 x for a frozen weight: no weight gradient). Recompute is the
forward that backward redoes: full, the block; attention / mlp, that part; "op" (torchtitan's
per-op selective checkpointing: every second matmul of a block recomputed, in the order q, k, v, o,
gate, up, down), k, o and up (GELU: k, o, down). Under tensor parallelism a GPU does 1 / T of it all.

Collectives (trainer.estimate.mesh prices each one):

  FSDP         each block and the root (embedding, head, final norm) all-gathered in the compute
               dtype, 1 / T of it under TP: blocks in forward and again in backward (parallel.
               fsdp_reshard_after_forward), the root once (it stays gathered); gradients reduce-
               scattered in fp32 (MixedPrecisionPolicy's reduce_dtype) on the last micro-batch
               only (set_requires_gradient_sync); HSDP then all-reduces each shard across the R
               replicas. Over the whole model: 2 x 2 P + 4 P bytes in, ZeRO-3's 3 Psi.
  ZeRO-3       the same gathers in the half dtype, the gradients reduce-scattered in it every
               micro-batch (DeepSpeed partitions gradients as they are made).
  ZeRO-1 / 2   gradients reduce-scattered in the half dtype (ZeRO-2 every micro-batch, ZeRO-1 on
               the last), the updated half weights all-gathered after the step: the ZeRO paper's 2 Psi.
  DDP          gradients all-reduced in fp32 on the last micro-batch: 2 Psi, in 25 MiB buckets.
  TP + SP      (Megatron-LM's sequence parallelism, torchtitan's plan) per block in forward: all-
               gather the normed input before q | k | v and before gate / up, reduce-scatter after o
               and after down: 4 collectives of the whole (B, T, C) activation; in backward the 4
               conjugates (reduce-scatter for each all-gather and back); recompute repeats the
               forward's (full), or the two all-gathers (op: torchtitan's policy saves reduce-
               scatters, not all-gathers). The root: reduce-scatter the vocabulary-parallel
               embedding's output and all-gather the final norm's output for the head, and their
               conjugates in backward. Under float8 the forward all-gathers carry float8 (torchao's
               Float8ColwiseParallel casts before gathering): 1 byte an element.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from trainer.config import ModelConfig
from trainer.estimate.mesh import Hardware, Mesh, collective_seconds, group, sent_bytes

TP_NAMES = (
    "all-gather before q|k|v",
    "reduce-scatter after o",
    "all-gather before the MLP",
    "reduce-scatter after down",
)


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs a token of one block (the mean over blocks), by matmul, and the head's."""

    qkv: float
    o: float
    up: float  # gate and up (GELU: c_fc); a sparse MLP's router, gates and ups
    down: float
    scores: float  # attention scores and mix: 4 S Q
    k: float  # k's share of qkv (torchtitan's op policy recomputes k alone)
    up_only: float  # up's share of `up` (the gated MLP's second matmul)
    head: float

    @property
    def matmuls(self) -> float:
        return self.qkv + self.o + self.up + self.down

    @property
    def forward(self) -> float:
        return self.matmuls + self.scores

    def recompute(self, mode: str) -> tuple[float, float]:
        """(matmul, scores) FLOPs a token that backward redoes in a block checkpointed in `mode`."""
        return {
            "none": (0.0, 0.0),
            "full": (self.matmuls, self.scores),
            "attention": (self.qkv + self.o, self.scores),
            "mlp": (self.up + self.down, 0.0),
            "op": (self.k + self.o + (self.up_only or self.down), 0.0),
        }[mode]


def layer_flops(m: ModelConfig, seq_len: int) -> LayerFlops:
    """The FLOPs of the module docstring, averaged over the blocks (sparse and sliding ones differ)."""
    C, L = m.n_embd, m.n_layer
    Q, K = m.n_head * m.attn_head_dim, (m.n_kv_head or m.n_head) * m.attn_head_dim
    H = m.intermediate_size or 4 * C
    gated = m.mlp in ("swiglu", "geglu")
    up = down = scores = up_only = 0.0
    for layer in range(L):
        if m.is_moe(layer):
            I, k = m.moe_intermediate_size or H, m.n_experts_per_token  # noqa: E741
            up += 2 * (m.n_experts * C + k * 2 * C * I)
            down += 2 * k * I * C
            up_only += 2 * k * C * I
        else:
            up += 2 * C * H * (2 if gated else 1)
            down += 2 * H * C
            up_only += 2 * C * H if gated else 0
        span = min(seq_len, m.sliding_window) if m.is_sliding(layer) else seq_len
        scores += 4 * span * Q
    return LayerFlops(
        qkv=2 * C * (Q + 2 * K), o=2 * Q * C, up=up / L, down=down / L, scores=scores / L, k=2 * C * K,
        up_only=up_only / L, head=2 * m.padded_vocab_size * C,
    )  # fmt: skip


@dataclass
class Ledger:
    """The collectives of one step on one GPU: per name, bytes sent and seconds (not overlapped)."""

    hw: Hardware
    mesh: Mesh
    rows: dict[str, list[float]] = field(default_factory=dict)

    def price(self, kind: str, size: float, dimension: str) -> float:
        """One call's seconds: `kind` of a `size`-byte tensor over the mesh's `dimension` group
        ("data": ddp / zero's N ranks, laid out as the shard dimension)."""
        members, per_node = group(self.mesh, "shard" if dimension == "data" else dimension, self.hw.gpus_per_node)
        return collective_seconds(kind, size, members, per_node, self.hw)

    def add(self, name: str, kind: str, size: float, dimension: str, calls: float = 1) -> float:
        """Record `calls` calls (per step) of one collective; returns one call's seconds."""
        members = group(self.mesh, "shard" if dimension == "data" else dimension, self.hw.gpus_per_node)[0]
        seconds = self.price(kind, size, dimension)
        row = self.rows.setdefault(name, [0.0, 0.0])
        row[0] += calls * sent_bytes(kind, size, members)
        row[1] += calls * seconds
        return seconds

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {name: {"bytes": b, "seconds": s} for name, (b, s) in self.rows.items() if b}


@dataclass(frozen=True)
class TensorParallel:
    """One micro-batch's TP collectives on one GPU, exposed: a block's forward, backward and
    recompute, the root's forward and backward (seconds)."""

    forward: float = 0.0
    backward: float = 0.0
    recompute: float = 0.0
    root_forward: float = 0.0
    root_backward: float = 0.0


def tensor_parallel(
    ledger: Ledger, f: LayerFlops, tokens: int, m: ModelConfig, a: int, mode: str, fraction: float, calls: float,
    float8: bool, async_tp: bool, matmul_seconds: Callable[[float], float],
) -> TensorParallel:  # fmt: skip
    """TP's collectives of one micro-batch of `tokens` (module docstring), recorded `calls` times
    (micro-batches a step) in the ledger; exposed on the critical path unless async_tp, which
    overlaps each with its matmul (q | k | v, o, gate / up, down and their input gradients):
    exposed = max(0, collective - matmul). `fraction`: the share of blocks checkpointed in `mode`;
    matmul_seconds(flops) prices one GPU's share of a matmul."""
    if ledger.mesh.tensor == 1:
        return TensorParallel()
    L, whole = m.n_layer, tokens * m.n_embd
    gathered = whole * (1 if float8 else a)
    pairs = list(zip(TP_NAMES, (f.qkv, f.o, f.up, f.down), strict=True))

    def run(names: tuple[str, ...], kinds: tuple[str, ...], sizes: tuple[float, ...], n: float, label: str) -> float:
        exposed = 0.0
        for (name, flops), kind, size in zip(pairs, kinds, sizes, strict=True):
            if name not in names:
                continue
            seconds = ledger.add(f"TP {label}", kind, size, "tensor", calls * n)
            overlap = matmul_seconds(flops * tokens) if async_tp else 0.0
            exposed += max(0.0, seconds - overlap)
        return exposed

    forward_kinds = ("all_gather", "reduce_scatter", "all_gather", "reduce_scatter")
    backward_kinds = ("reduce_scatter", "all_gather", "reduce_scatter", "all_gather")
    recomputed = {"none": (), "full": TP_NAMES, "attention": TP_NAMES[:2], "mlp": TP_NAMES[2:],
                  "op": (TP_NAMES[0], TP_NAMES[2])}[mode]  # fmt: skip
    forward = run(TP_NAMES, forward_kinds, (gathered, whole * a) * 2, L, "forward")
    backward = run(TP_NAMES, backward_kinds, (whole * a,) * 4, L, "backward")
    recompute = run(recomputed, forward_kinds, (gathered, whole * a) * 2, L * fraction, "recompute")
    # The root: the embedding's reduce-scatter, the head's all-gather; their conjugates in backward.
    embedding = ledger.add("TP forward", "reduce_scatter", whole * a, "tensor", calls)
    head = ledger.add("TP forward", "all_gather", whole * a, "tensor", calls)
    ledger.add("TP backward", "all_gather", whole * a, "tensor", calls)
    ledger.add("TP backward", "reduce_scatter", whole * a, "tensor", calls)
    overlap = matmul_seconds(f.head * tokens) if async_tp else 0.0
    root = embedding + max(0.0, head - overlap)  # the same pair, conjugated, in backward
    return TensorParallel(forward, backward, recompute, root, root)


@dataclass(frozen=True)
class DataParallel:
    """One step's data-parallel collectives on one GPU: a block's and the root's one-call seconds."""

    gather: float = 0.0  # a block's all-gather (FSDP / ZeRO-3)
    root_gather: float = 0.0
    reduce: float = 0.0  # a block's gradient reduction (reduce-scatter + HSDP's all-reduce)
    root_reduce: float = 0.0
    whole_reduce: float = 0.0  # DDP / ZeRO-1/2: all gradients' reduction
    bucket: float = 0.0  # its last bucket, after backward ends
    after_step: float = 0.0  # ZeRO-1/2: the updated weights' all-gather
    reduce_every_micro_batch: bool = False
    regather: bool = True  # blocks all-gathered again in backward


def data_parallel(
    ledger: Ledger, n_layer: int, block: float, block_trainable: float, root: float, root_trainable: float,
    trainable: float, a: int, accumulation: int, reshard: bool,
) -> DataParallel:  # fmt: skip
    """The data-parallel collectives of the module docstring, recorded per step in the ledger. block /
    root: parameters of a block (the mean) and of the root on one tensor rank (already / T);
    trainable: all trainable parameters there."""
    mesh, L, n = ledger.mesh, n_layer, accumulation
    if mesh.strategy == "fsdp":
        gather = ledger.add("FSDP all-gather", "all_gather", block * a, "shard", n * L * (2 if reshard else 1))
        root_gather = ledger.add("FSDP all-gather", "all_gather", root * a, "shard", n)
        reduce = ledger.add("FSDP reduce-scatter", "reduce_scatter", block_trainable * 4, "shard", L)
        root_reduce = ledger.add("FSDP reduce-scatter", "reduce_scatter", root_trainable * 4, "shard")
        S = mesh.shard  # HSDP: each shard's gradient all-reduced across the replicas
        reduce += ledger.add("HSDP all-reduce", "all_reduce", block_trainable * 4 / S, "replicate", L)
        root_reduce += ledger.add("HSDP all-reduce", "all_reduce", root_trainable * 4 / S, "replicate")
        return DataParallel(gather, root_gather, reduce, root_reduce, regather=reshard)
    if mesh.strategy == "zero3":
        gather = ledger.add("ZeRO-3 all-gather", "all_gather", block * a, "data", 2 * n * L)
        root_gather = ledger.add("ZeRO-3 all-gather", "all_gather", root * a, "data", 2 * n)
        reduce = ledger.add("ZeRO-3 reduce-scatter", "reduce_scatter", block_trainable * a, "data", n * L)
        root_reduce = ledger.add("ZeRO-3 reduce-scatter", "reduce_scatter", root_trainable * a, "data", n)
        return DataParallel(gather, root_gather, reduce, root_reduce, reduce_every_micro_batch=True)
    if mesh.strategy == "ddp":
        whole = ledger.add("DDP all-reduce", "all_reduce", trainable * 4, "data")
        bucket = ledger.price("all_reduce", min(25 * 2**20, trainable * 4), "data")  # DDP's 25 MiB buckets
        return DataParallel(whole_reduce=whole, bucket=bucket)
    if mesh.strategy in ("zero1", "zero2"):
        every = mesh.strategy == "zero2"
        name = mesh.strategy.replace("zero", "ZeRO-")
        whole = ledger.add(f"{name} reduce-scatter", "reduce_scatter", trainable * a, "data", n if every else 1)
        bucket = ledger.price("reduce_scatter", min(5e8 * a, trainable * a), "data")  # DeepSpeed's reduce bucket
        after = ledger.add(f"{name} all-gather", "all_gather", trainable * a, "data")
        return DataParallel(whole_reduce=whole, bucket=bucket, after_step=after, reduce_every_micro_batch=every)
    return DataParallel()
