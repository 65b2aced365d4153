"""Activations: what autograd keeps from forward to backward for one micro-batch, in bytes.

N = B T tokens, C = n_embd, H = the MLP width, hd = the head size (model.head_dim, else C / n_head),
Q = n_head hd, K = n_kv_head hd, V = padded vocab; a is the compute dtype's bytes, and each tensor's
own dtype is followed block by block: the residual stream starts in the embedding's dtype (under
autocast, none / ddp in bf16 / fp16) and takes the widest of what is added to it; a norm's output
is fp32 when its fp32 weight multiplies it (RMSNorm, LayerNorm on CUDA's autocast), x's dtype with
Gemma's 1 + weight (model.norm_offset); the linears' outputs are a.

  norm          RMSNorm: x in fp32 (N C 4; a copy unless x is fp32), 1/rms (N 4), with an offset the
                (C,) 1 + weight, and x normalised when its weight trains (N C: fp32 with an offset,
                else x's dtype). LayerNorm: its input (N C 4 under CUDA's autocast, which runs
                layer_norm in fp32; the CPU's runs it in x's dtype), mean and rstd. Sandwich
                placement adds a norm after each sublayer, over its output.
  linear input  a linear keeps its input only when its weight trains: x itself (N in a), once
                however many read it; when autocast casts an fp32 x, each reader's own half copy.
  attention     q|k|v (N (Q + 2K) a), kept whole by v's view; q / k norms (model.qk_norm, per head
                or over the projection) as norms over q and k, whose fp32 output (fp32 weight)
                autocast casts back for SDPA; with RoPE the rotated q (N Q a) and k (N K a), cos /
                sin copies in q's and k's dtype when not fp32 (the fp32 tables are shared: below);
                k and v repeated to n_head (2 N Q a, not the fused output) when the kernel takes no
                GQA (CUDA with a mask); a mask (a sliding window shorter than T, or packed
                documents) converted by SDPA to q's dtype, per layer ((B,) T T a); SDPA's output
                (N Q a, also c_proj's input) and its log-sum-exp (B n_head T 4): no T x T matrix.
  MLP           GELU: c_fc's output (N H a), gelu's (N H a) when c_proj or its adapter reads it.
                Gated (SwiGLU / GeGLU, fused [gate | up] or apart): gate, act(gate) and up (3 N H
                a), their product (N H a) likewise.
  sparse MLP    (trainer.model.moe, k of E experts of width I; S = N k slots) the router as a
                linear (E C), softmax's fp32 probabilities (N E 4), top-k's indices (S 8), the
                top-k weights (S 4, and their sum N 4 when renormalised) and the renormalised ones
                (S 4), the gather's and the un-sort's indices (2 S 8), the experts as linears over
                the S slots (their input kept once, or each reader's autocast copy; fp32 expert
                tensors' half copies, E I C a each, under autocast), their hidden (3 S I a, the
                product S I a when down trains) and the fp32 weighted outputs (S C 4). On CUDA in
                bf16 (torch._grouped_mm) the slots are cast once for both gate and up. The router's
                logits (N E 4) and top-k indices (N k 8: the ones the block saves, unless it is
                checkpointed) are held by the module until the next forward (`held`), and with
                model.router_aux_loss_coef > 0 the load-balancing loss keeps its own softmax (N E 4);
                its backward runs first, so each layer's logit gradient (N E 4) waits for its block's.
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
A checkpointed block keeps only its input (N C s); a checkpointed attention / MLP its input instead
of its tensors. Rebuilt for its backward, a block holds its input and its tensors again. Outside the
blocks: token ids (N 8) when the embedding trains, RoPE's fp32 tables (per base: Gemma 3's sliding
layers have their own) where an fp32 q reads them, a packed batch's boolean (B, T, T) masks (alive
while forward runs), the final norm; the plain head keeps its input when it trains, the half copy of
an fp32 head weight under autocast, the fp32 log-softmax (N V 4) and the targets (N 8); the chunked
head (model.loss_chunk_size > 0) the fp32 gradients it computes in forward: the hidden's (N C 4)
and, when the head trains, the head weight's (V C 4).
LoRA with a frozen embedding: block 0's first norm keeps nothing (its input needs no gradient),
and each part keeps nothing until a trained weight reaches it. Not modelled: model.dropout > 0 (its
masks), attention_backend=math on a GPU (it keeps the T x T probabilities), soft-capped attention
(Gemma 2: flex_attention on CUDA, explicit scores elsewhere), Dao's flash-attn package (which
`auto` picks on Hopper when installed: no mask, no repeated k / v), RoPE's fp32 tables that only
checkpointed blocks read (their checkpoints hold them, unsaved, until backward is done), and the CPU
RNG state each checkpoint keeps (5 kB, host memory).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    s: int  # residual stream at the first block: the embedding's dtype under autocast, else the compute dtype
    o: int  # block 0's first norm's output, the block linears' input before autocast casts it
    autocast: bool  # torch.autocast over stored weights (none / ddp in bf16 / fp16); adapters stay fp32
    base_trains: bool  # the block linears train (no LoRA)
    base_bytes: int  # an adapted (or, full training, any) block linear's weight as read (NF4: dequantised to)
    plain_bytes: int  # a block linear without adapters, its weight as read
    nf4: bool  # the adapted linears' weights are NF4: no copy of them is kept
    head_bytes: int  # the head's weight as read
    norms_train: bool
    native_gqa: bool  # SDPA reads n_kv_head keys itself (no repeat to n_head) where no mask is given
    positions: bool  # packed examples: per-row RoPE tables and a (B, 1, T, T) mask
    cpu: bool  # dropout keeps its mask in x's dtype (CUDA: bool); autocast leaves layer_norm in x's dtype
    adapters: tuple[Adapter, ...] = ()  # the block's (see at)
    r: int = 0
    lora_dropout: bool = False
    norm_weight: int = 4  # a norm's weight as read
    experts_train: bool = False  # the sparse MLPs' expert tensors train
    expert_bytes: int = 4  # an expert tensor as read
    grouped: bool = False  # sparse MLPs run torch._grouped_mm (CUDA, bf16): the slots cast once
    layer_adapters: tuple[tuple[Adapter, ...], ...] = ()

    @property
    def N(self) -> int:
        return self.B * self.T

    def at(self, layer: int) -> Forward:
        """The Forward of block `layer`: its own adapters (a sparse MLP's router has its own)."""
        if not self.layer_adapters or self.layer_adapters[layer] == self.adapters:
            return self
        return replace(self, adapters=self.layer_adapters[layer])

    def masked(self, layer: int) -> bool:
        """Whether SDPA gets a mask in block `layer`: packed documents, or a window shorter than T."""
        return self.positions or (self.m.is_sliding(layer) and self.m.sliding_window < self.T)


def forward_spec(cfg: Config, m: ModelConfig, params: Parameters) -> Forward:
    """The Forward of cfg's run. FSDP2 (param_dtype) and DeepSpeed compute on half-precision
    weights, so their stream is half too; none / ddp autocast over the weights as stored."""
    a = BYTES[cfg.precision.dtype]
    half_weights = a == 2 and cfg.parallel.strategy not in ("none", "ddp")
    autocast = a == 2 and not half_weights
    read = {k: 2 if half_weights else v for k, v in params.stored.items()}
    s, on_cpu = read["embedding"], cfg.train.device == "cpu"
    backend = m.attention_backend
    positions = cfg.data.format != "text" and cfg.data.document_mask
    native = backend in ("flash", "math") or (backend == "auto" and (on_cpu or (a == 2 and not positions)))
    lora = params.lora
    f = Forward(
        m=m, B=cfg.train.micro_batch_size, T=cfg.train.seq_len, a=a, s=s, o=s, autocast=autocast,
        base_trains="block_linears" in params.trains, base_bytes=read["adapted"], plain_bytes=read["plain"],
        nf4=params.nf4, head_bytes=read["head"], norms_train="norms" in params.trains, native_gqa=native,
        positions=positions, cpu=on_cpu, adapters=params.block_adapters, r=lora.r if lora else 0,
        lora_dropout=bool(lora and lora.dropout > 0), norm_weight=read["norms"],
        experts_train="experts" in params.trains, expert_bytes=read.get("experts", read["plain"]),
        grouped=not on_cpu and a == 2 and m.moe_impl in ("auto", "grouped") and cfg.precision.dtype == "bf16",
        layer_adapters=params.layer_adapters,
    )  # fmt: skip
    return replace(f, o=norm_bytes(f, s)[1])


def norm_bytes(f: Forward, x_bytes: int, x_grad: bool = True, d: int | None = None, rows: int | None = None,
               shared: bool = False) -> tuple[int, int]:  # fmt: skip
    """Bytes one norm over `rows` rows of `d` features (default: N, C) of x_bytes keeps for its input's
    gradient (x_grad) and its weight's (when that trains), and its output's bytes. shared: x is a view
    of a tensor kept anyway (q / k of the q|k|v output), so an fp32 x costs nothing here."""
    d, rows = d or f.m.n_embd, f.N if rows is None else rows
    numel = rows * d
    if f.m.norm == "rmsnorm":
        offset = f.m.norm_offset != 0  # (x * (offset + weight)).to(x's dtype): x normalised in fp32
        kept = numel * (4 if offset else x_bytes) if f.norms_train else 0
        if x_grad:
            kept += (0 if shared and x_bytes == 4 else numel * 4) + rows * 4 + (d * 4 if offset else 0)
        return kept, x_bytes if offset else max(f.norm_weight, x_bytes)  # weight * x: the fp32 weight promotes
    fp32 = f.autocast and not f.cpu  # CUDA's autocast runs layer_norm in fp32, the CPU's does not
    kept = numel * (4 if fp32 else x_bytes) + 2 * rows * 4 if x_grad or f.norms_train else 0
    return kept, 4 if fp32 else x_bytes


def _linears(
    f: Forward, modules: dict[str, int], features: int, x_bytes: int, input_kept: bool = False, x_grad: bool = True,
    rows: int | None = None, trains: bool | None = None, stored: int | None = None, cast_once: bool = False,
) -> int:  # fmt: skip
    """Bytes kept for the linears `modules` (name -> weight numel) reading one (rows, features) tensor
    x of x_bytes (rows: N), their adapters and weight copies. input_kept: x is kept anyway. x_grad: x
    needs a gradient (else no weight is kept for it, nor a dropout mask). trains / stored: whether
    the weights train and their bytes as read, for weights that are not block linears (experts).
    cast_once: autocast's copy of x is made once for all of them (torch._grouped_mm's experts)."""
    N, a = f.N if rows is None else rows, f.a
    base_trains = f.base_trains if trains is None else trains
    base_readers = len(modules) if base_trains else 0
    own = [ad for ad in f.adapters if ad.module in modules]
    adapted = {ad.module for ad in own}
    cast = f.autocast and x_bytes != a  # autocast casts x for each linear that reads it
    if cast:
        kept = min(base_readers, 1 if cast_once else base_readers) * N * features * a  # adapters: below
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
            read = f.base_bytes if name in adapted else f.plain_bytes if stored is None else stored
            kept += 2 * numel if read == 4 else 0  # autocast's half copy of an fp32 weight (a half base: none)
    elif not f.autocast and x_grad and f.base_bytes < a and not f.nf4:  # LoRALinear's fp32 copy of a half base
        kept += a * sum(modules[name] for name in adapted)
    return kept


def _reads_itself(f: Forward, modules: tuple[str, ...], x_bytes: int, trains: bool | None = None) -> bool:
    """Whether the linears `modules` (or their adapters) keep the x of x_bytes they read itself, as
    _linears counts it: a trained weight or an adapter without dropout reads it, and autocast does
    not cast it to a copy of its own."""
    if f.autocast and x_bytes != f.a:
        return False
    base = f.base_trains if trains is None else trains
    return base or (not f.lora_dropout and any(ad.module in modules for ad in f.adapters))


def _norm_keeps_x(f: Forward, x_bytes: int, x_grad: bool) -> bool:
    """Whether a norm over x of x_bytes keeps x itself (not a copy): RMSNorm's fp32 x when x is fp32,
    LayerNorm's input unless CUDA's autocast runs it in fp32 over a half x (see norm_bytes)."""
    if f.m.norm == "rmsnorm":
        return x_grad and x_bytes == 4
    return (x_grad or f.norms_train) and (x_bytes == 4 or not (f.autocast and not f.cpu))


def _trains(f: Forward, *modules: str) -> bool:
    """Whether a weight of these block linears trains: the base's, or an adapter's."""
    return f.base_trains or any(ad.module in modules for ad in f.adapters)


def attention_bytes(f: Forward, x_bytes: int | None = None, x_grad: bool = True, layer: int = 0) -> int:
    """Bytes one attention keeps reading x of x_bytes (default: block 0's norm output): its linears
    and adapters, q / k / v, q / k norms, RoPE, the mask, SDPA's output and lse."""
    m, N, a, C = f.m, f.N, f.a, f.m.n_embd
    x_bytes = f.o if x_bytes is None else x_bytes
    nh, nkv, hd = m.n_head, m.n_kv_head or m.n_head, m.attn_head_dim
    Q, K = nh * hd, nkv * hd
    qk = m.qk_norm != "none"
    qkv_grad = x_grad or _trains(f, "attn.c_attn")
    if not qkv_grad and not (qk and f.norms_train):  # q, k, v need no gradient: only o's adapters keep
        return _linears(f, {"attn.c_proj": Q * C}, Q, a, x_grad=False)
    masked = f.masked(layer)
    native = f.native_gqa and (f.cpu or not masked or m.attention_backend in ("flash", "math"))
    expand = nkv != nh and not native
    kept = _linears(f, {"attn.c_attn": C * (Q + 2 * K)}, C, x_bytes, x_grad=x_grad)
    kept += _linears(f, {"attn.c_proj": Q * C}, Q, a, True)
    qd = kd = a  # q's and k's dtype as RoPE reads them
    qkv_kept = False  # the q|k|v output's storage
    if qk:  # per head: rows of hd; full: rows of the whole projection
        for heads in (nh, nkv):
            per_head = m.qk_norm == "head"
            d, rows = (hd, N * heads) if per_head else (heads * hd, N)
            kept += norm_bytes(f, a, qkv_grad, d, rows, shared=True)[0]
        qd = kd = norm_bytes(f, a)[1]
        qkv_kept = a == 4 and qkv_grad  # the norms' fp32 x is q's and k's view of it
    tables = (f.B if f.positions else 1) * f.T * hd
    if m.position == "rope":
        kept += sum(2 * tables * dtype for dtype in (qd, kd) if dtype != 4)  # cos, sin cast to q's / k's dtype
        kept += N * Q * a + (2 * N * Q * a if expand else N * K * a)  # rotated q; k and v repeated, or rotated k
        qkv_kept |= not expand  # v's view
    else:
        kept += (N * Q * a + (0 if expand else N * K * a) if qk else 0) + (2 * N * Q * a if expand else 0)
        qkv_kept |= not qk or not expand  # q's or v's view
    kept += N * (Q + 2 * K) * a if qkv_kept else 0
    kept += (f.B if f.positions else 1) * f.T * f.T * a if masked else 0  # the mask, in q's dtype
    return kept + N * Q * a + f.B * nh * f.T * 4  # SDPA's output (c_proj's input) and log-sum-exp


def mlp_bytes(f: Forward, x_bytes: int | None = None, x_grad: bool = True) -> int:
    """Bytes one dense MLP keeps reading x of x_bytes: its linears and adapters, and the hidden activations."""
    m, N, a, C = f.m, f.N, f.a, f.m.n_embd
    x_bytes = f.o if x_bytes is None else x_bytes
    H = m.intermediate_size or 4 * C
    if m.mlp in ("swiglu", "geglu"):
        fused = m.fused_gate_up
        inputs = {"mlp.w_gate_up": 2 * C * H} if fused else {"mlp.w_gate": C * H, "mlp.w_up": C * H}
        # act keeps gate and the product keeps up when gate's side needs a gradient; the product
        # keeps act(gate) when up's does (all three when x does). Fused: gate and up are one tensor.
        gate = x_grad or _trains(f, "mlp.w_gate", "mlp.w_gate_up")
        up = x_grad or _trains(f, "mlp.w_up", "mlp.w_gate_up")
        hidden = (2 * gate + up) * N * H * a
    else:
        inputs, hidden = {"mlp.c_fc": C * H}, (x_grad or _trains(f, "mlp.c_fc")) * N * H * a
    if not hidden:  # the hidden needs no gradient: only down's adapters keep it
        return _linears(f, {"mlp.c_proj": H * C}, H, a, x_grad=False)
    adapted = any(ad.module == "mlp.c_proj" for ad in f.adapters)
    down = f.base_trains or (adapted and not f.lora_dropout)  # down or its adapter keeps the (half) hidden
    kept = _linears(f, inputs, C, x_bytes, x_grad=x_grad) + _linears(f, {"mlp.c_proj": H * C}, H, a, True)
    return kept + hidden + (N * H * a if down else 0)


def sparse_mlp_bytes(f: Forward, x_bytes: int | None = None, x_grad: bool = True) -> int:
    """Bytes one sparse MLP (trainer.model.moe.SparseMLP) keeps reading x of x_bytes: see the module docstring."""
    m, N, a, C = f.m, f.N, f.a, f.m.n_embd
    x_bytes = f.o if x_bytes is None else x_bytes
    E, k = m.n_experts, m.n_experts_per_token
    I, S = m.moe_intermediate_size or m.intermediate_size or 4 * C, N * k  # noqa: E741
    router = x_grad or _trains(f, "mlp.router")  # the routing weights need a gradient
    experts = x_grad or f.experts_train  # the experts' outputs do
    kept = router_bytes(f, x_bytes, x_grad)
    if router:  # probabilities, top-k indices, (top-k weights and their sum,) the weighted outputs
        kept += N * E * 4 + S * 8 + (S * 4 + N * 4 if m.moe_norm_topk else 0) + S * C * 4
    if experts:  # the weights the outputs are scaled by, the un-sort's indices
        kept += S * 4 + S * 8
    kept += S * 8 if x_grad else 0  # the gather's indices
    if not experts:
        return kept
    weights = dict(trains=f.experts_train, stored=f.expert_bytes, rows=S)
    kept += _linears(f, {"mlp.experts.w_gate": E * I * C, "mlp.experts.w_up": E * I * C}, C, x_bytes,
                     x_grad=x_grad, cast_once=f.grouped, **weights)  # fmt: skip
    kept += _linears(f, {"mlp.experts.w_down": E * C * I}, I, a, True, **weights)
    return kept + 3 * S * I * a + (S * I * a if f.experts_train else 0)  # gate, act(gate), up; their product


def router_bytes(f: Forward, x_bytes: int, x_grad: bool = True) -> int:
    """Bytes a sparse MLP's router (a linear, E C) keeps reading x of x_bytes."""
    return _linears(f, {"mlp.router": f.m.n_experts * f.m.n_embd}, f.m.n_embd, x_bytes, x_grad=x_grad)


def backward_own(f: Forward, layer: int, parts: dict[str, int], recompute: str | None = None) -> int:
    """Bytes block `layer`'s backward allocates itself at its largest, over what it keeps: the MLP's
    hidden gradients (2 N H a gated, N H a GELU) and the residual stream's (2 N C 4), a sparse MLP's
    (sparse_backward_own; `recompute`: the activation_checkpointing mode that rebuilds it, if any);
    or an RMSNorm's (about 5 fp32 copies of its input, N C 4 each, and the stream's): first, where a
    norm is the block's last op (post / sandwich placement: the block output's gradient alone, N C in
    its dtype), or q's norm (model.qk_norm, over N Q; 2 N C 4) once the MLP and the norms after the
    attention have freed what they keep (`parts`)."""
    m, N, a, C = f.m, f.N, f.a, f.m.n_embd
    if m.is_moe(layer):
        mlp = sparse_backward_own(f.at(layer), parts, recompute)
    else:
        H = m.intermediate_size or 4 * C
        mlp = (2 if m.mlp in ("swiglu", "geglu") else 1) * N * H * a + 2 * N * C * 4
    if m.norm != "rmsnorm":
        return mlp
    # The block's last op (nothing freed yet) holds one stream gradient, the block output's (N C out).
    last = 5 * N * C * 4 + N * C * parts["_out"] if m.norm_placement != "pre" else 0
    q = 5 * N * m.n_head * m.attn_head_dim * 4 + 2 * N * C * 4 if m.qk_norm != "none" else 0
    freed = sum(parts.get(k, 0) for k in ("mlp", "norm_2", "norm_1_post", "norm_2_post"))
    return max(mlp, last, q - freed)


def sparse_backward_own(f: Forward, parts: dict[str, int], recompute: str | None = None) -> int:
    """Bytes a sparse MLP's backward (trainer.model.moe.SparseMLP) allocates at its largest over what
    the block keeps, with S = N k slots, the stream after attention (_h) in h bytes and the MLP's
    input x (_mlp_in) in o bytes. Two moments:

      the weighting's backward  (y.float() * weights, its first node) the stream's gradient on the
                 attention side (N C h), the weighted outputs' fp32 gradient (S C 4: the view's
                 backward copies the (N, k, C) expansion of the sum's), the mul's two products, the
                 expert outputs' gradient and the routing weights' before its sum over C (2 S C 4),
                 and that sum (S 4). The experts' backward after it frees y.float() first.
      the recompute's end       (activation checkpointing, `recompute` full or mlp) torch's
                 non-reentrant checkpoint rebuilds the block up to its last saved tensor, y.float(),
                 while the backward holds the stream's gradient (N C h) and the weighted outputs'
                 (S C 4); SparseMLP.forward's locals are alive then, beyond what the block keeps:
                 the router's logits (N E a), the sort's order (S 8) and slice ends (E 4), the
                 gathered slots xs (S C o) unless the experts keep them as they are, the experts'
                 concatenated outputs (S C a) and their un-sorted copy (S C a, kept itself in fp32),
                 and, rebuilt by a full checkpoint, x (N C o) unless the router keeps it, and the
                 stream after attention (N C h) unless the norm keeps it (_h_local). torch.cat's
                 moment before it (the experts' outputs and their concatenation, the loop's last
                 hidden product) is smaller in bf16 and a few kB larger in fp32.
    """
    m, N, a, C = f.m, f.N, f.a, f.m.n_embd
    E, S = m.n_experts, N * m.n_experts_per_token
    o = parts["_mlp_in"]
    stream = N * C * parts["_h"]
    weighting = stream + 3 * S * C * 4 + S * 4
    if recompute not in ("full", "mlp"):
        return weighting
    experts = ("mlp.experts.w_gate", "mlp.experts.w_up")
    local = N * E * a + S * 8 + E * 4 + S * C * a + (S * C * a if a != 4 else 0)
    local += 0 if _reads_itself(f, experts, o, trains=f.experts_train) else S * C * o
    if recompute == "full":  # an MLP checkpointed alone keeps x as its input
        local += (0 if _reads_itself(f, ("mlp.router",), o) else N * C * o) + parts["_h_local"]
    return max(weighting, stream + S * C * 4 + local)


def block_bytes(f: Forward, layer: int = 0, s_in: int | None = None, x_grad: bool = True) -> dict[str, int]:
    """Block `layer`'s kept bytes by part, its input read in s_in bytes (default: the embedding's),
    and (keys starting with _) the bytes of its attention's and MLP's inputs, of the stream after
    its attention (_h) and of its output; _in_kept: the bytes of its input that a part keeps as it is
    (the first norm's fp32 x when x is fp32), _h_local: those of the stream after attention when
    no part keeps it (a recompute holds it to the block's end). x_grad False: its input needs no
    gradient (block 0 reading a frozen embedding), so a part keeps nothing until a trained weight
    (or a gradient) reaches it."""
    m, f, a = f.m, f.at(layer), f.a
    s = f.s if s_in is None else s_in
    sparse = m.is_moe(layer)
    mlp = sparse_mlp_bytes if sparse else mlp_bytes
    attn_trains = _trains(f, "attn.c_attn", "attn.c_proj") or (m.qk_norm != "none" and f.norms_train)
    parts, io = {}, {}
    if m.norm_placement == "post":  # x + norm_1(attn(x)); x + norm_2(mlp(x))
        parts["attention"], io["_attention_in"] = attention_bytes(f, s, x_grad, layer), s
        io["_in_kept"] = f.N * m.n_embd * s if _reads_itself(f, ("attn.c_attn",), s) else 0
        attn_out = x_grad or attn_trains
        parts["norm_1"], o1 = norm_bytes(f, a, attn_out)
        s1, mlp_in = max(s, o1), attn_out or x_grad or f.norms_train
        parts["mlp"], io["_mlp_in"] = mlp(f, s1, mlp_in), s1
        io["_router"] = router_bytes(f, s1, mlp_in) if sparse else 0
        io["_h"], io["_h_local"] = s1, 0  # the MLP reads the stream after attention itself
        parts["norm_2"], o2 = norm_bytes(f, s1 if sparse else a, True)
        io["_out"] = max(s1, o2)
        return parts | io
    parts["norm_1"], o1 = norm_bytes(f, s, x_grad)
    io["_in_kept"] = f.N * m.n_embd * s if _norm_keeps_x(f, s, x_grad) else 0
    attention_in = x_grad or f.norms_train
    parts["attention"], io["_attention_in"] = attention_bytes(f, o1, attention_in, layer), o1
    attn_out = attention_in or attn_trains
    s1 = max(s, a)
    if m.norm_placement == "sandwich":
        parts["norm_1_post"], p1 = norm_bytes(f, a, attn_out)
        s1 = max(s, p1)
    mlp_in = attn_out or x_grad  # the stream after attention
    parts["norm_2"], o2 = norm_bytes(f, s1, mlp_in)
    io["_h"], io["_h_local"] = s1, 0 if _norm_keeps_x(f, s1, mlp_in) else f.N * m.n_embd * s1
    parts["mlp"], io["_mlp_in"] = mlp(f, o2, mlp_in or f.norms_train), o2
    io["_router"] = router_bytes(f, o2, mlp_in or f.norms_train) if sparse else 0
    out = o2 if sparse else a  # the sparse MLP returns x's dtype; the dense one c_proj's
    if m.norm_placement == "sandwich":
        parts["norm_2_post"], out = norm_bytes(f, out, True)
    io["_out"] = max(s1, out)
    return parts | io


def activation_bytes(cfg: Config, m: ModelConfig, params: Parameters) -> dict[str, Any]:
    """Bytes kept after one micro-batch's forward (see the module's docstring), by part.

    norm / attention / mlp / block: block 0's, its input needing a gradient, without checkpointing;
    block_checkpointed: that block checkpointed; kept: each block's bytes, as checkpointed;
    in_backward: each block's while its backward runs (a checkpointed one rebuilt); own: what each
    block's backward allocates itself (backward_own); front: the embedding's, RoPE tables, the masks;
    back: the final norm's, the head's and the loss's (and the load-balancing loss's); loss: the part
    of back freed at the start of backward; waiting: the load-balancing loss's gradients of the
    router logits still waiting when each block's backward runs; held: what the sparse MLPs hold
    (not saved for backward, alive through the step: their router logits, and the top-k indices of
    a checkpointed one); total (what autograd saves, and front).
    """
    f = forward_spec(cfg, m, params)
    N, C, V, T, a = f.N, m.n_embd, m.padded_vocab_size, f.T, f.a  # the head's logits: padded columns too
    head_trains, embedding_trains = "head" in params.trains, "embedding" in params.trains
    mode = m.activation_checkpointing
    wrapped = set(range(0, m.n_layer, m.activation_checkpointing_every)) if mode != "none" else set()

    def as_kept(p: dict[str, int], checkpointed: bool, s_in: int) -> tuple[int, int]:
        """A block's bytes kept after forward, and while its backward runs (a checkpointed one rebuilt)."""
        whole = sum(v for k, v in p.items() if not k.startswith("_"))
        if not checkpointed:
            return whole, whole
        part = {"attention": "attention", "mlp": "mlp"}.get(mode)
        kept = N * C * s_in if mode == "full" else whole - p[part] + N * C * p[f"_{part}_in"]
        # full: the input, held by the checkpoint, and the rebuilt block (which may keep the input itself)
        return kept, kept + (whole - p["_in_kept"] if mode == "full" else p[part])

    # Block 0 reads the embedding: under LoRA a frozen one, so its first parts need no gradient.
    # Other blocks' inputs always do (every block carries the same adapters).
    pairs, own, s, fp32_rope = [], [], f.s, set()
    for i in range(m.n_layer):
        p = block_bytes(f, i, s, x_grad=embedding_trains or i > 0)
        pairs.append(as_kept(p, i in wrapped, s))
        own.append(backward_own(f, i, p, mode if i in wrapped else None))
        q_fp32 = a == 4 or (m.qk_norm != "none" and norm_bytes(f, a)[1] == 4)
        if m.position == "rope" and q_fp32 and not (i in wrapped and mode in ("full", "attention")):
            fp32_rope.add(m.is_sliding(i) and m.rope_local_theta is not None)  # the tables this layer reads
        s = p["_out"]
    kept, in_backward = [k for k, _ in pairs], [b for _, b in pairs]
    parts = block_bytes(f)
    block = sum(v for k, v in parts.items() if not k.startswith("_"))
    final_norm = norm_bytes(f, s)[0]
    if m.loss_chunk > 0:
        loss, head = N * C * 4 + (V * C * 4 if head_trains else 0), 0
    else:
        loss = N * V * 4 + N * 8
        head = (N * C * a if head_trains else 0) + (2 * V * C if f.autocast and f.head_bytes == 4 else 0)
    sparse = sum(m.is_moe(i) for i in range(m.n_layer))
    aux = sparse * N * m.n_experts * 4 + m.n_experts * 4 if sparse and m.router_aux_loss_coef > 0 else 0
    # The module's router_logits (N E 4) and last_topk (N k 8): the top-k indices are the ones the block
    # saves, unless a checkpoint (full / mlp) drops those; the recompute stores neither.
    rebuilt = sum(m.is_moe(i) for i in wrapped) if mode in ("full", "mlp") else 0
    held = sparse * N * m.n_experts * 4 + rebuilt * N * m.n_experts_per_token * 8
    # The load-balancing loss's backward runs first: each sparse layer's router-logit gradient (N E 4)
    # waits for its block's backward, so block i's runs with those of the sparse layers up to i.
    waiting = [sum(m.is_moe(j) for j in range(i + 1)) * N * m.n_experts * 4 if aux else 0 for i in range(m.n_layer)]
    front = N * 8 if embedding_trains else 0  # token ids for the embedding's gradient
    front += len(fp32_rope) * 2 * (f.B if f.positions else 1) * T * m.attn_head_dim * 4  # cos, sin in fp32
    sliding = any(m.is_sliding(i) for i in range(m.n_layer))
    front += (1 + sliding) * f.B * T * T if f.positions else 0  # the packed batch's masks, shared by the blocks
    back = final_norm + head + loss + aux
    return dict(
        norm=parts["norm_1"], attention=parts["attention"], mlp=parts["mlp"], block=block,
        block_checkpointed=as_kept(parts, True, f.s)[0] if mode != "none" else block,
        checkpointed=len(wrapped), kept=kept, in_backward=in_backward, own=own, front=front, back=back,
        loss=loss, waiting=waiting, held=held, total=sum(kept) + front + back,
    )  # fmt: skip
