"""Activations: what autograd keeps from forward to backward for one micro-batch, in bytes.

N = B T tokens, C = n_embd, H = the MLP width, Q = n_head hd, K = n_kv_head hd, V = padded vocab; a, s and
o are the bytes of the compute dtype, of the residual stream and of a norm's output. Under autocast
(none / ddp in bf16 / fp16) the stream has the embedding's dtype and RMSNorm's output is fp32 (its
fp32 weight promotes it; LoRA leaves norms fp32), LayerNorm's on CUDA too, so the linears after a
norm read fp32 x.

  norm          RMSNorm: x in fp32 (N C 4), 1/rms (N 4), x normalised (N C s) when its weight
                trains. LayerNorm: its input (N C 4 under CUDA's autocast, which runs layer_norm in
                fp32; the CPU's runs it in x's dtype: N C s), mean and rstd.
  linear input  a linear keeps its input only when its weight trains: x itself (N in a), once
                however many read it; when autocast casts an fp32 x, each reader's own half copy.
  attention     q|k|v (N (Q + 2K) a), kept whole by v's view; with RoPE the rotated q (N Q a) and
                k (N K a), cos / sin copies; k and v repeated to n_head (2 N Q a, not the fused
                output) when the kernel takes no GQA; SDPA's output (N Q a, also c_proj's input)
                and its log-sum-exp (B n_head T 4): no T x T matrix (flash / efficient / CPU kernels).
  MLP           GELU: c_fc's output (N H a), gelu's (N H a) when c_proj or its adapter reads it.
                SwiGLU: gate, silu(gate) and up (3 N H a), their product (N H a) likewise.
  adapter       (trainer.lora.LoRALinear) A's output (N r a) and A's input. LoRALinear casts x to
                the adapters' dtype only outside autocast, so A reads x itself (shared with the
                base) unless autocast casts an fp32 x: then its own half copy (N in a); a bf16 x
                (c_proj's, down's) is read as it is. lora.dropout: the dropped input (N in a) and,
                when x needs a gradient, its mask (N in, bool; the CPU keeps it in x's dtype). DoRA:
                the base and adapter outputs (2 N out a), fp32 row norm, factor and factor - 1
                (3 out 4), the copy of the weight rows it reads (out in: 2 under autocast, 4 when a
                half base meets fp32 adapters).
  weight copies under autocast, the half copy of each fp32 weight a linear reads (2 bytes a
                weight: adapters, an fp32 base); a half base is read as it is (LoRALinear leaves
                the cast to autocast). Without autocast, a
                half base under fp32 adapters: its fp32 copy (4 bytes a weight). An NF4 base
                (trainer.lora.qlora.linear_nf4) is kept only in NF4 and dequantised again in
                backward: no copy of it (DoRA's rows as for a base in lora.base_dtype).
A checkpointed block keeps only its input (N C s); a checkpointed attention / MLP its input
(N C o) instead of its tensors. Outside the blocks: token ids (N 8) when the embedding trains,
RoPE's fp32 tables, the final norm, a packed batch's (B, T, T) mask; the plain head keeps its
input when it trains, the half copy of an fp32 head weight under autocast, the fp32 log-softmax
(N V 4) and the targets (N 8); the chunked head (model.loss_chunk_size > 0) the fp32 gradients
it computes in forward: the hidden's (N C 4) and, when the head trains, the head weight's
(V C 4). LoRA with a frozen embedding: block 0's first norm keeps nothing (its input needs no
gradient), and each part keeps nothing until a trained weight reaches it. Not modelled:
model.dropout > 0 (its masks), attention_backend=math on a GPU (it keeps the T x T probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.config import Config, ModelConfig
from trainer.estimate.parameters import BYTES, Adapter, Parameters


@dataclass(frozen=True)
class Forward:
    """What one micro-batch's forward keeps depends on: shapes, dtypes (bytes), who trains."""

    m: ModelConfig
    B: int
    T: int
    a: int  # compute dtype
    s: int  # residual stream: the embedding's dtype under autocast, else the compute dtype
    o: int  # a norm's output, the block linears' input before autocast casts it
    autocast: bool  # torch.autocast over stored weights (none / ddp in bf16 / fp16); adapters stay fp32
    base_trains: bool  # the block linears train (no LoRA)
    base_bytes: int  # an adapted (or, full training, any) block linear's weight as read (NF4: dequantised to)
    plain_bytes: int  # a block linear without adapters, its weight as read
    nf4: bool  # the adapted linears' weights are NF4: no copy of them is kept
    head_bytes: int  # the head's weight as read
    norms_train: bool
    native_gqa: bool  # SDPA reads n_kv_head keys itself (no repeat to n_head)
    positions: bool  # packed examples: per-row RoPE tables and a (B, 1, T, T) mask
    cpu: bool  # dropout keeps its mask in x's dtype (CUDA: bool); autocast leaves layer_norm in x's dtype
    adapters: tuple[Adapter, ...] = ()
    r: int = 0
    lora_dropout: bool = False

    @property
    def N(self) -> int:
        return self.B * self.T


def forward_spec(cfg: Config, m: ModelConfig, params: Parameters) -> Forward:
    """The Forward of cfg's run. FSDP2 (param_dtype) and DeepSpeed compute on half-precision
    weights, so their stream is half too; none / ddp autocast over the weights as stored."""
    a = BYTES[cfg.precision.dtype]
    half_weights = a == 2 and cfg.parallel.strategy not in ("none", "ddp")
    autocast = a == 2 and not half_weights
    read = {k: 2 if half_weights else v for k, v in params.stored.items()}
    s, on_cpu = read["embedding"], cfg.train.device == "cpu"
    if m.norm == "rmsnorm":
        o = max(read["norms"], s)  # weight * x.to(x's dtype) promotes
    else:
        o = 4 if autocast and not on_cpu else s  # CUDA's autocast runs layer_norm in fp32, the CPU's does not
    backend = m.attention_backend
    positions = cfg.data.format != "text" and cfg.data.document_mask
    native = backend in ("flash", "math") or (backend == "auto" and (on_cpu or (a == 2 and not positions)))
    lora = params.lora
    return Forward(
        m=m, B=cfg.train.micro_batch_size, T=cfg.train.seq_len, a=a, s=s, o=o, autocast=autocast,
        base_trains="block_linears" in params.trains, base_bytes=read["adapted"], plain_bytes=read["plain"],
        nf4=params.nf4, head_bytes=read["head"], norms_train="norms" in params.trains, native_gqa=native,
        positions=positions,
        cpu=on_cpu, adapters=params.block_adapters, r=lora.r if lora else 0,
        lora_dropout=bool(lora and lora.dropout > 0),
    )  # fmt: skip


def norm_bytes(f: Forward) -> int:
    """Bytes one norm keeps for its input's gradient (and its weight's, when that trains)."""
    N, C = f.N, f.m.n_embd
    if f.m.norm == "rmsnorm":
        return N * C * 4 + N * 4 + (N * C * f.s if f.norms_train else 0)
    return N * C * (4 if f.autocast and not f.cpu else f.s) + 2 * N * 4


def _linears(
    f: Forward, modules: dict[str, int], features: int, x_bytes: int, input_kept: bool = False, x_grad: bool = True
) -> int:
    """Bytes kept for the linears `modules` (name -> weight numel) reading one (N, features) tensor
    x of x_bytes, their adapters and weight copies. input_kept: x is kept anyway. x_grad: x needs
    a gradient (else no weight is kept for it, nor a dropout mask)."""
    N, a = f.N, f.a
    base_readers = len(modules) if f.base_trains else 0
    own = [ad for ad in f.adapters if ad.module in modules]
    adapted = {ad.module for ad in own}
    cast = f.autocast and x_bytes != a  # autocast casts x for each linear that reads it
    if cast:
        kept = base_readers * N * features * a  # each trained base its own copy (adapters: below)
    else:
        readers = base_readers + (len(own) if not f.lora_dropout else 0)  # adapters read x itself
        kept = 0 if input_kept else min(readers, 1) * N * features * a
    for ad in own:
        kept += N * f.r * a  # A's output, B's input
        if f.lora_dropout or cast:
            kept += N * ad.in_features * a  # the dropped input, or autocast's copy of x for A
        if f.lora_dropout and x_grad:
            kept += N * ad.in_features * (x_bytes if f.cpu else 1)  # the mask
        if ad.dora:  # base and adapter outputs, fp32 row norm, factor and factor - 1 (for the base output)
            kept += 2 * N * ad.out_features * a + (3 if x_grad else 2) * ad.out_features * 4
        if ad.dora and x_grad:  # the weight slice it reads
            kept += ad.out_features * ad.in_features * (2 if f.autocast else 4 if f.base_bytes < a else 0)
    if f.autocast:  # half copies: of B (A's output needs its gradient), of weights read with x
        kept += 2 * f.r * sum(ad.out_features for ad in own)
    if f.autocast and x_grad:  # of A, of fp32 weights, of a half base read in fp32
        kept += 2 * f.r * sum(ad.in_features for ad in own)
        for name, numel in modules.items():
            if name in adapted and f.nf4:
                continue  # linear_nf4 keeps only the NF4 weight
            stored = f.base_bytes if name in adapted else f.plain_bytes
            kept += 2 * numel if stored == 4 else 0  # autocast's half copy of an fp32 weight (a half base: none)
    elif not f.autocast and x_grad and f.base_bytes < a and not f.nf4:  # LoRALinear's fp32 copy of a half base
        kept += a * sum(modules[name] for name in adapted)
    return kept


def _trains(f: Forward, *modules: str) -> bool:
    """Whether a weight of these block linears trains: the base's, or an adapter's."""
    return f.base_trains or any(ad.module in modules for ad in f.adapters)


def attention_bytes(f: Forward, x_grad: bool = True) -> int:
    """Bytes one attention keeps: its linears and adapters, q / k / v, RoPE, SDPA's output and lse."""
    m, N, a, C = f.m, f.N, f.a, f.m.n_embd
    nh, nkv, hd = m.n_head, m.n_kv_head or m.n_head, C // m.n_head
    Q, K = nh * hd, nkv * hd
    if not x_grad and not _trains(f, "attn.c_attn"):  # q, k, v need no gradient: only o's adapters keep
        return _linears(f, {"attn.c_proj": Q * C}, Q, a, x_grad=False)
    expand = nkv != nh and not f.native_gqa
    kept = _linears(f, {"attn.c_attn": C * (Q + 2 * K)}, C, f.o, x_grad=x_grad)
    kept += _linears(f, {"attn.c_proj": Q * C}, Q, a, True)
    if m.position == "rope":
        kept += N * Q * a + (2 * N * Q * a if expand else N * K * a + N * (Q + 2 * K) * a)
        kept += 4 * (f.B if f.positions else 1) * f.T * hd * a if a != 4 else 0  # cos, sin cast for q and k
    else:
        kept += N * (Q + 2 * K) * a + (2 * N * Q * a if expand else 0)
    return kept + N * Q * a + f.B * nh * f.T * 4  # SDPA's output (c_proj's input) and log-sum-exp


def mlp_bytes(f: Forward, x_grad: bool = True) -> int:
    """Bytes one MLP keeps: its linears and adapters, and the hidden activations."""
    m, N, a, C = f.m, f.N, f.a, f.m.n_embd
    H = m.intermediate_size or 4 * C
    if m.mlp == "swiglu":
        inputs = {"mlp.w_gate": C * H, "mlp.w_up": C * H}
        # silu keeps gate and the product keeps up when gate's side needs a gradient; the product
        # keeps silu(gate) when up's does (all three when x does)
        gate, up = x_grad or _trains(f, "mlp.w_gate"), x_grad or _trains(f, "mlp.w_up")
        hidden = (2 * gate + up) * N * H * a
    else:
        inputs, hidden = {"mlp.c_fc": C * H}, (x_grad or _trains(f, "mlp.c_fc")) * N * H * a
    if not hidden:  # the hidden needs no gradient: only down's adapters keep it
        return _linears(f, {"mlp.c_proj": H * C}, H, a, x_grad=False)
    adapted = any(ad.module == "mlp.c_proj" for ad in f.adapters)
    down = f.base_trains or (adapted and not f.lora_dropout)  # down or its adapter keeps the (half) hidden
    kept = _linears(f, inputs, C, f.o, x_grad=x_grad) + _linears(f, {"mlp.c_proj": H * C}, H, a, True)
    return kept + hidden + (N * H * a if down else 0)


def block_bytes(f: Forward, x_grad: bool = True) -> dict[str, int]:
    """One block's kept bytes by part. x_grad False: its input needs no gradient (block 0 reading a
    frozen embedding), so a part keeps nothing until a trained weight (or a gradient) reaches it."""
    norm = norm_bytes(f)
    # A norm whose input needs no gradient keeps what its trained weight needs: RMSNorm x normalised,
    # LayerNorm its input and statistics (as for x's gradient).
    frozen_input = 0 if not f.norms_train else f.N * f.m.n_embd * f.s if f.m.norm == "rmsnorm" else norm
    attention_input = x_grad or f.norms_train
    mlp_input = attention_input or _trains(f, "attn.c_attn", "attn.c_proj")  # the stream after attention
    return {
        "norm_1": norm if x_grad else frozen_input,
        "attention": attention_bytes(f, attention_input),
        "norm_2": norm if mlp_input else frozen_input,
        "mlp": mlp_bytes(f, mlp_input or f.norms_train),
    }


def activation_bytes(cfg: Config, m: ModelConfig, params: Parameters) -> dict[str, Any]:
    """Bytes kept after one micro-batch's forward (see the module's docstring), by part.

    norm / attention / mlp / block: one of each without checkpointing; block_checkpointed: a
    checkpointed block; kept: each block's bytes, as checkpointed; in_backward: each block's
    while its backward runs (a checkpointed one rebuilt); front: the embedding's, RoPE tables,
    the mask; back: the final norm's, the head's and the loss's; loss: the part of back freed
    at the start of backward; total.
    """
    f = forward_spec(cfg, m, params)
    N, C, V, T, a = f.N, m.n_embd, m.padded_vocab_size, f.T, f.a  # the head's logits: padded columns too
    head_trains, embedding_trains = "head" in params.trains, "embedding" in params.trains
    mode = m.activation_checkpointing
    wrapped = set(range(0, m.n_layer, m.activation_checkpointing_every)) if mode != "none" else set()

    def as_kept(p: dict[str, int], checkpointed: bool) -> tuple[int, int]:
        """A block's bytes kept after forward, and while its backward runs (a checkpointed one rebuilt)."""
        whole = sum(p.values())
        if not checkpointed:
            return whole, whole
        kept = {
            "full": N * C * f.s,
            "attention": whole - p["attention"] + N * C * f.o,
            "mlp": whole - p["mlp"] + N * C * f.o,
        }[mode]
        return kept, kept + {"full": whole - N * C * f.s, "attention": p["attention"], "mlp": p["mlp"]}[mode]

    parts = block_bytes(f)
    # Block 0 reads the embedding: under LoRA a frozen one, so its first parts need no gradient.
    # Other blocks' inputs always do (every block carries the same adapters).
    first = block_bytes(f, x_grad=embedding_trains)
    pairs = [as_kept(first if i == 0 else parts, i in wrapped) for i in range(m.n_layer)]
    kept, in_backward = [k for k, _ in pairs], [b for _, b in pairs]
    norm, block = parts["norm_1"], sum(parts.values())
    if m.loss_chunk > 0:
        loss, head = N * C * 4 + (V * C * 4 if head_trains else 0), 0
    else:
        loss = N * V * 4 + N * 8
        head = (N * C * a if head_trains else 0) + (2 * V * C if f.autocast and f.head_bytes == 4 else 0)
    front = N * 8 if embedding_trains else 0  # token ids for the embedding's gradient
    if m.position == "rope" and a == 4 and (mode not in ("full", "attention") or len(wrapped) < m.n_layer):
        front += 2 * (f.B if f.positions else 1) * T * (C // m.n_head) * 4  # cos, sin in fp32
    front += f.B * T * T if f.positions else 0  # the packed batch's mask, shared by every block
    back = norm + head + loss
    return dict(
        norm=norm, attention=parts["attention"], mlp=parts["mlp"], block=block,
        block_checkpointed=as_kept(parts, True)[0] if mode != "none" else block,
        checkpointed=len(wrapped), kept=kept, in_backward=in_backward, front=front, back=back, loss=loss,
        total=sum(kept) + front + back,
    )  # fmt: skip
