"""The scale planner: every strategy and mesh of a config on N GPUs, on paper.

    python -m trainer.estimate model=llama3-8b parallel=fsdp precision=bf16 train.seq_len=8192 --gpus 1024

For each mesh (trainer.estimate.mesh: replicate R x shard S x tensor T) and strategy:

  memory    per GPU: the estimate's model states under the strategy's sharding over S (HSDP:
            S, not R S, as parallel.fsdp_shard_size shards) and the peak over them, divided by T
            (Megatron / torchtitan shard every weight matrix, its gradient and AdamW state along
            the tensor dimension, the vocabulary of the embedding and head too; sequence
            parallelism shards the norms' and the residual stream's activations, q / k / v and the
            MLP's hidden are split by head and by column). What TP leaves whole: the all-gathered
            inputs of q | k | v and of gate / up, which the column-parallel matmuls keep (two
            (B, T, C) tensors a block kept without checkpointing, one under per-op checkpointing:
            down's unreduced output), and the norm weights (replicated, < 0.01% of a model).
            It fits when the peak and 1 GiB (CUDA context, allocator) stay within --gpu-memory.
  compute   per GPU: FLOPs (trainer.estimate.comm) at the datasheet peak x an achieved efficiency
            (trainer.estimate.mesh.EFFICIENCY: eager, compiled, and float8's linears against the
            FP8 peak), 1 / T of the micro-batch's under TP, recompute included.
  comm      per step: every collective (trainer.estimate.comm), priced by the ring model
            (trainer.estimate.mesh), bytes sent and seconds not overlapped.
  overlap   FSDP / ZeRO-3 prefetch one block (FSDP2's default): in forward block i + 1's all-gather
            runs under block i's compute, in backward block i - 1's all-gather and block i + 1's
            reduce-scatter (+ HSDP all-reduce) under block i's; what a block's collectives take
            beyond its compute is exposed: exposed = first gathers + sum over blocks of max(0,
            comm - compute) + the last block's and the root's reductions. DDP / ZeRO-1/2 reduce in
            buckets during backward: exposed = max(last bucket, reduction - backward). ZeRO-1/2's
            all-gather after the step is exposed. TP's collectives are on the critical path,
            unless --async-tp (each hidden behind its matmul, comm.tensor_parallel). The link is
            assumed free for compute: no slowdown of the matmuls by NCCL's kernels.
  step      micro-batches x (compute + exposed comm) + the AdamW step (32 bytes a parameter of
            the GPU's optimizer shard read or written at the HBM bandwidth).
  reported  tokens/s per GPU (the step's tokens / step time / N) and MFU (GPT.flops_per_token, as
            trainer.monitor counts it, without recompute, over the bf16 datasheet peak).

The plan is the fastest (tokens/s per GPU) mesh that fits. Not modelled: pipeline parallelism,
context parallelism, expert parallelism's all-to-all, CPU offload, float8 FSDP all-gathers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from statistics import fmean
from typing import Any

from trainer.config import Config, ConfigError, ModelConfig
from trainer.estimate.activations import activation_bytes, forward_spec
from trainer.estimate.comm import Ledger, data_parallel, layer_flops, tensor_parallel
from trainer.estimate.memory import kept_states, model_shape, model_states, peak_phases
from trainer.estimate.mesh import GIB, STRATEGIES, Hardware, Mesh, enumerate_meshes, mesh_refusal
from trainer.estimate.parameters import BYTES, Parameters, count_parameters

CONTEXT = 1 * GIB  # CUDA context and allocator slack above the allocated peak
ADAMW_BYTES = 32  # a parameter's fp32 weight, gradient, exp_avg, exp_avg_sq read, three written, the norm's read


@dataclass(frozen=True)
class Options:
    """The planner's inputs beyond the config."""

    float8: bool = False  # block linears in float8 (torchao tensorwise, as torchtitan's float8 converter)
    async_tp: bool = False  # torchtitan's async TP: each TP collective overlapped with its matmul
    # "op": torchtitan's per-op selective checkpointing of every block, instead of model.activation_checkpointing
    sac: str | None = None


def checkpointing(m: ModelConfig, options: Options) -> tuple[str, float]:
    """The checkpointing mode in force and the share of blocks it wraps."""
    if options.sac == "op":
        return "op", 1.0
    mode = m.activation_checkpointing
    if mode == "none":
        return "none", 0.0
    return mode, len(range(0, m.n_layer, m.activation_checkpointing_every)) / m.n_layer


def run_config(cfg: Config, mesh: Mesh) -> Config:
    """cfg under the mesh's strategy, HSDP's shard groups as parallel.fsdp_shard_size."""
    shard = mesh.shard if mesh.strategy == "fsdp" and mesh.replicate > 1 else 0
    return replace(cfg, parallel=replace(cfg.parallel, strategy=mesh.strategy, fsdp_shard_size=shard))


def activations(run: Config, m: ModelConfig, params: Parameters, mode: str) -> dict[str, Any]:
    """activation_bytes, or for torchtitan's per-op policy (mode "op") the full-checkpointing one
    with each block keeping what the policy saves: its input (N C, the stream's dtype), the
    outputs of the first, third, fifth and seventh matmul (q, v, gate, down; GELU: q, v, c_fc),
    SDPA's output and log-sum-exp; rebuilt for backward, a block holds what it keeps unchecked."""
    if mode != "op":
        return activation_bytes(run, m, params)
    shape = replace(m, activation_checkpointing="full", activation_checkpointing_every=1)
    full = activation_bytes(run, shape, params)
    none = activation_bytes(run, replace(m, activation_checkpointing="none"), params)
    f = forward_spec(run, m, params)
    Q, K = m.n_head * m.attn_head_dim, (m.n_kv_head or m.n_head) * m.attn_head_dim
    H, C, gated = m.intermediate_size or 4 * m.n_embd, m.n_embd, m.mlp in ("swiglu", "geglu")
    block = f.N * (C * f.s + f.a * (2 * Q + K + H + (C if gated else 0)) + 4 * m.n_head)
    kept = [block] * m.n_layer
    return full | dict(kept=kept, in_backward=none["in_backward"], own=none["own"], checkpointed=m.n_layer,
                       total=sum(kept) + full["front"] + full["back"])  # fmt: skip


def tensor_whole_bytes(cfg: Config, m: ModelConfig, mesh: Mesh, mode: str, fraction: float) -> float:
    """Activation bytes TP leaves whole on each GPU, beyond 1 / T of the estimate's (the scale
    docstring): the gathered (B, T, C) inputs the column-parallel matmuls keep."""
    if mesh.tensor == 1:
        return 0.0
    whole = cfg.train.micro_batch_size * cfg.train.seq_len * m.n_embd * BYTES[cfg.precision.dtype]
    L = m.n_layer
    per_block = {"none": 2 * L, "full": 2 * L * (1 - fraction) + 2, "op": L + 2}.get(mode, 2 * L - L * fraction)
    return per_block * whole * (1 - 1 / mesh.tensor)


def peak_memory(
    cfg: Config, m: ModelConfig, params: Parameters, mesh: Mesh, accumulation: int, options: Options,
    cache: dict[str, dict[str, Any]],
) -> float:  # fmt: skip
    """Bytes a GPU allocates at its peak on this mesh (the module docstring)."""
    run = run_config(cfg, mesh)
    mode, fraction = checkpointing(m, options)
    key = "autocast" if mesh.strategy in ("none", "ddp") else "half weights"  # FSDP / DeepSpeed's activations differ
    if key not in cache:
        cache[key] = activations(run, m, params, mode)
    act = cache[key]
    states = model_states(run, m, params, 1 if mesh.strategy == "none" else mesh.data_parallel)
    phases = peak_phases(run, m, params, act, states, accumulation)
    peak = kept_states(states, accumulation) + max(phases.values())
    return peak / mesh.tensor + tensor_whole_bytes(cfg, m, mesh, mode, fraction)


def step_time(
    cfg: Config, m: ModelConfig, params: Parameters, mesh: Mesh, hw: Hardware, options: Options, accumulation: int
) -> dict[str, Any]:
    """One optimizer step's time on each GPU, its parts, and the collectives (the module docstring)."""
    T, L, a = mesh.tensor, m.n_layer, BYTES[cfg.precision.dtype]
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len  # a micro-batch of one data-parallel rank
    f = layer_flops(m, cfg.train.seq_len)
    mode, fraction = checkpointing(m, options)
    weight_grads = 2 if "block_linears" in params.trains else 1  # backward: input and weight gradients
    head_grads = 2 if "head" in params.trains else 1

    def seconds(matmul: float, other: float = 0.0) -> float:
        """One GPU's time for its 1 / T of `matmul` block-linear FLOPs and `other` FLOPs."""
        bf16 = hw.peak_flops * hw.efficiency
        if options.float8:
            return matmul / T / (2 * hw.peak_flops * hw.fp8_efficiency) + other / T / bf16
        return (matmul + other) / T / bf16

    forward = seconds(f.matmuls * tokens, f.scores * tokens)
    backward = seconds(weight_grads * f.matmuls * tokens, 2 * f.scores * tokens)
    recompute_matmuls, recompute_scores = f.recompute(mode)
    recompute = seconds(recompute_matmuls * tokens, recompute_scores * tokens)
    head_forward, head_backward = seconds(0, f.head * tokens), seconds(0, head_grads * f.head * tokens)
    ledger = Ledger(hw, mesh)
    tp = tensor_parallel(
        ledger, f, tokens, m, a, mode, fraction, accumulation, options.float8, options.async_tp, seconds
    )
    layer_forward = forward + tp.forward
    layer_backward = backward + tp.backward + fraction * (recompute + tp.recompute)
    root_forward, root_backward = head_forward + tp.root_forward, head_backward + tp.root_backward
    compute = L * (forward + backward + fraction * recompute) + head_forward + head_backward
    micro_batch = L * (layer_forward + layer_backward) + root_forward + root_backward

    block, block_trainable = fmean(params.blocks) / T, fmean(params.block_trainables) / T
    root_trainable = (params.trainable - sum(params.block_trainables)) / T
    dp = data_parallel(
        ledger, L, block, block_trainable, params.root / T, root_trainable, params.trainable / T, a, accumulation,
        cfg.parallel.fsdp_reshard_after_forward,
    )  # fmt: skip
    exposed_forward = dp.root_gather + dp.gather + (L - 1) * max(0.0, dp.gather - layer_forward) if dp.gather else 0.0

    def exposed_backward(sync: bool) -> float:
        regather = dp.gather if dp.regather else 0.0
        out = (L - 1) * max(0.0, regather + sync * dp.reduce - layer_backward) + max(0.0, regather - root_backward)
        out += sync * (dp.reduce + dp.root_reduce)  # block 0's and the root's, after the last backward
        if dp.whole_reduce and sync:  # DDP / ZeRO-1/2: buckets reduced while backward runs
            out += max(dp.bucket, dp.whole_reduce - (L * layer_backward + root_backward))
        return out

    syncs = [dp.reduce_every_micro_batch or i == accumulation - 1 for i in range(accumulation)]
    data_exposed = accumulation * exposed_forward + sum(exposed_backward(s) for s in syncs) + dp.after_step
    optimizer_shard = {"fsdp": mesh.shard, "ddp": 1, "none": 1}.get(mesh.strategy, mesh.data_parallel)
    optimizer = params.trainable / T / optimizer_shard * ADAMW_BYTES / hw.hbm
    step = accumulation * micro_batch + data_exposed + optimizer
    tokens_per_gpu = accumulation * tokens / T  # the step's tokens, per GPU
    comm = ledger.as_dict()
    return {
        "compute_s": accumulation * compute,
        "recompute_s": accumulation * L * fraction * recompute,
        "tp_exposed_s": accumulation * (micro_batch - compute),
        "data_exposed_s": data_exposed,
        "optimizer_s": optimizer,
        "step_s": step,
        "tokens_per_s": tokens_per_gpu / step,
        "mfu": tokens_per_gpu / step * params.flops_per_token / hw.peak_flops,
        "comm": comm,
        "tp_bytes": sum(v["bytes"] for k, v in comm.items() if k.startswith("TP")),
        "data_bytes": sum(v["bytes"] for k, v in comm.items() if not k.startswith("TP")),
        "comm_s": sum(v["seconds"] for v in comm.values()),
    }


def plan_scale(
    cfg: Config, gpus: int, hw: Hardware, options: Options = Options(), vocab: int | None = None,
    strategies: tuple[str, ...] = STRATEGIES, mesh: Mesh | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Every mesh of `strategies` on `gpus` GPUs (or the one `mesh`), its memory and step time,
    and the plan: the fastest that fits (None when none does). A mesh the model or the batch
    refuses is one line in "refused"; a `mesh` given and refused raises ValueError with it."""
    if options.float8 and not hw.fp8:
        raise ValueError(f"--float8: the {hw.gpu} has no FP8 tensor cores")
    m = model_shape(cfg, vocab)
    params = count_parameters(cfg, m)
    if mesh is not None:
        reason = mesh_refusal(m, mesh, gpus, hw.gpus_per_node)
        if reason:
            raise ValueError(reason)
        meshes, refused = [mesh], []
    else:
        meshes, refused = enumerate_meshes(m, gpus, hw.gpus_per_node, strategies)
    rows, cache = [], {}
    for candidate in meshes:
        try:
            accumulation = cfg.train.accumulation_steps(candidate.data_parallel)
            peak = peak_memory(cfg, m, params, candidate, accumulation, options, cache)
        except ConfigError as error:
            refused.append(f"{candidate.overrides} (mesh {candidate.label}): {error}")
            continue
        time = step_time(cfg, m, params, candidate, hw, options, accumulation)
        sequences = cfg.train.micro_batch_size * accumulation * candidate.data_parallel
        rows.append({
            **asdict(candidate), "label": candidate.label, "overrides": candidate.overrides,
            "accumulation": accumulation, "global_batch": sequences, "peak": peak,
            "fits": peak + CONTEXT <= hw.memory, **time,
        })  # fmt: skip
    if mesh is not None and not rows:
        raise ValueError(refused[-1])
    rows.sort(key=lambda r: (-r["tokens_per_s"], r["peak"]))
    chosen = next((r for r in rows if r["fits"]), None)
    return {
        "gpus": gpus, "hardware": asdict(hw), "options": asdict(options), "model": m.name,
        "flops_per_token": params.flops_per_token, "micro_batch": [cfg.train.micro_batch_size, cfg.train.seq_len],
        "checkpointing": checkpointing(m, options)[0], "rows": rows, "refused": refused,
        "chosen": chosen, "least_peak": min(rows, key=lambda r: r["peak"]) if rows else None,
    }  # fmt: skip


def table(p: dict[str, Any], limit: int = 0) -> str:
    """The scale plan as heading lines, a markdown table (fastest first; `limit` rows, 0: all), the
    plan line and the refusals."""
    hw, gb = p["hardware"], 1e9
    options = [k for k in ("float8", "async_tp") if p["options"][k]]
    lines = [
        f"Scale plan: {p['gpus']} x {hw['gpu']} ({hw['gpus_per_node']} a node; {hw['intra_bw'] / gb:.0f} GB/s in a node, "
        f"{hw['inter_bw'] / gb:.0f} GB/s a GPU between nodes; {hw['peak_flops'] / 1e12:.0f} TFLOP/s bf16 x "
        f"{hw['efficiency']:.3f} achieved{', float8 linears x ' + format(hw['fp8_efficiency'], '.3f') if p['options']['float8'] else ''}), "
        f"micro-batch {p['micro_batch'][0]} x {p['micro_batch'][1]} a data-parallel rank, checkpointing "
        f"{p['checkpointing']}{'; ' + ', '.join(options) if options else ''}",
        "",
        "| strategy | mesh R x S x T | batch | accum | peak GiB | fits | DP GB | TP GB | comm s | exposed s | step s | "
        "tokens/s/GPU | MFU |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = p["rows"][:limit] if limit else p["rows"]
    for r in rows:
        exposed = r["tp_exposed_s"] + r["data_exposed_s"]
        lines.append(
            f"| {r['strategy']} | {r['label']} | {r['global_batch']} | {r['accumulation']} | {r['peak'] / GIB:.1f} | "
            f"{'yes' if r['fits'] else 'no'} | {r['data_bytes'] / gb:.1f} | {r['tp_bytes'] / gb:.1f} | "
            f"{r['comm_s']:.3f} | {exposed:.3f} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% |"
        )
    if limit and len(p["rows"]) > limit:
        lines.append(f"\n({len(p['rows']) - limit} slower meshes left out: --json lists them all.)")
    chosen, memory = p["chosen"], hw["memory"] / GIB
    if chosen:
        lines.append(
            f"\nplan: {chosen['overrides']} (mesh {chosen['label']}: {chosen['tokens_per_s']:,.0f} tokens/s a GPU, "
            f"MFU {100 * chosen['mfu']:.1f}%, peak {chosen['peak'] / GIB:.1f} GiB of {memory:.0f})"
        )
        close = [
            r for r in p["rows"] if r is not chosen and r["fits"] and r["tokens_per_s"] >= 0.99 * chosen["tokens_per_s"]
        ]
        if close:  # the time model's error is larger than 1%: say which others are as good
            lines.append(
                f"within 1% of it (below the model's resolution): {len(close)} more, e.g. "
                + "; ".join(f"{r['overrides']} (mesh {r['label']}, peak {r['peak'] / GIB:.1f} GiB)" for r in close[:2])
            )
    elif p["least_peak"]:
        least = p["least_peak"]
        lines.append(
            f"\nplan: no mesh fits {memory:.0f} GiB a GPU: the least peak is {least['peak'] / GIB:.1f} GiB "
            f"({least['overrides']}, mesh {least['label']}); try checkpointing, a smaller micro-batch or more GPUs"
        )
    lines += [f"refused: {line}" for line in p["refused"]]
    return "\n".join(lines)
