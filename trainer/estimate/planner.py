"""Activation-checkpointing planner: the setting that fits a memory budget at the least recompute.

    python -m trainer.estimate --memory-budget 70GiB model=llama3-8b lora=default
    python -m trainer.estimate --memory-budget 1GiB --measure train.device=cpu model.vocab_size=512

Candidates: none, and each of full / attention / mlp with model.activation_checkpointing_every = k,
k = 1 .. n_layer (blocks 0, k, 2k, ...: c = ceil(L / k) of them checkpointed). For each:

  peak       the estimate's peak per rank with the setting applied: trainer.estimate's own
             activation_bytes and peak_phases over the kept states of `estimate` (the tests check
             every candidate against estimate() itself).
  recompute  what backward rebuilds, as a fraction of the step without it: c x the forward of a
             block (full), its attention or its MLP, over forward + backward. Analytic: FLOPs per
             token counted as GPT.flops_per_token (trainer.monitor's MFU) counts them, PaLM's
             appendix B: a matmul with P weights 2 P forward and 4 P backward (input and weight
             gradients; 2 P when the weight is frozen, as LoRA's base), attention's scores and mix
             4 T C forward and 8 T C backward; so full training's step is 6 N + 12 L C T (N the
             matmul weights a token uses: a sparse MLP's router and k of its E experts; norms,
             biases, DoRA's extras left out). Measured (--measure): the
             seconds of one block's forward and backward, and of its attention's and MLP's forward,
             timed on this machine at the config's micro-batch shape.
  plan       the candidate that fits the budget with the least recompute (ties: the smaller peak).
             Recompute depends only on (mode, c), so the table keeps for each the k of least peak.
  5e         the least peak x (1 + recompute): exercise 5e's memory x compute criterion.

--measure also replaces the analytic per-block bytes by the ones autograd saves for one block, its
attention and its MLP (saved_tensors_hooks): each block's kept bytes move by the difference.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import weakref
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from trainer.config import Config, ModelConfig
from trainer.estimate.activations import activation_bytes, forward_spec
from trainer.estimate.memory import estimate, model_shape, model_states, peak_phases
from trainer.estimate.parameters import Parameters, count_parameters

GIB = 2**30
UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MODES = ("full", "attention", "mlp")
CPU_TIMED_FLOPS = 2e10  # --measure on the CPU: a block forward over this is timed on one sequence


def parse_bytes(text: str) -> int:
    """'70GiB', '80 GB', '512MiB', '1e9' (bytes) -> bytes. GiB = 2^30, GB = 10^9; case is ignored."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and (match.group(2).lower() or "b")
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--memory-budget {text!r}: give a positive size in GiB, GB, MiB, MB or bytes, e.g. 70GiB")
    return int(float(match.group(1)) * UNITS[unit])


@dataclass(frozen=True)
class Costs:
    """Forward cost of one block's parts and of the whole step (no recompute), in one unit."""

    attention: float
    mlp: float
    block: float  # the whole block's forward (full recompute)
    step: float  # forward + backward of the model
    source: str  # how they were obtained, for the printout

    def recompute(self, mode: str, checkpointed: int) -> float:
        """Extra compute of `checkpointed` recomputed blocks / parts, as a fraction of the step."""
        return 0.0 if mode == "none" else checkpointed * getattr(self, "block" if mode == "full" else mode) / self.step


def analytic_costs(m: ModelConfig, params: Parameters, seq_len: int) -> Costs:
    """FLOPs per token (see the module docstring): full training's step is 6 N + 12 L C T, N the
    matmul weights a token uses (a sparse MLP's router and its k of E experts: GPT.active_params).
    Blocks differ where dense MLPs sit among sparse ones, and a sliding layer's scores span its window
    (GPT.flops_per_token): a block's attention and MLP are their means."""
    C, L, V = m.n_embd, m.n_layer, m.padded_vocab_size
    H, Q = m.intermediate_size or 4 * C, m.n_head * m.attn_head_dim
    K = (m.n_kv_head or m.n_head) * m.attn_head_dim
    attention_weights = C * (Q + 2 * K) + Q * C  # c_attn (q | k | v), c_proj

    def mlp_weights(layer: int) -> int:  # those a token multiplies by
        if m.is_moe(layer):  # the router, and k experts' gate, up and down
            return m.n_experts * C + m.n_experts_per_token * 3 * C * (m.moe_intermediate_size or H)
        return C * H * (3 if m.mlp in ("swiglu", "geglu") else 2)

    attention = mlp = weights = 0
    for layer in range(L):
        adapters = {"attn": 0, "mlp": 0}
        for ad in params.layer_adapters[layer] if params.layer_adapters else params.block_adapters:
            adapters[ad.module.split(".")[0]] += params.lora.r * (ad.in_features + ad.out_features)  # A and B
        span = min(seq_len, m.sliding_window) if m.is_sliding(layer) else seq_len  # the keys a query reads
        attention += 2 * (attention_weights + adapters["attn"]) + 4 * span * Q  # + scores and mix
        mlp += 2 * (mlp_weights(layer) + adapters["mlp"])
        weights += attention_weights + mlp_weights(layer)
    forward = attention + mlp + 2 * V * C  # + the head
    frozen = 0 if "block_linears" in params.trains else weights
    frozen += 0 if "head" in params.trains else V * C
    step = 3 * forward - 2 * frozen  # backward = 2 forwards, less the frozen weights' gradients
    return Costs(attention / L, mlp / L, (attention + mlp) / L, step, "analytic FLOPs (6N + 12LCT counting)")


@dataclass(frozen=True)
class Candidate:
    """One setting: its overrides' values, checkpointed blocks, predicted peak and recompute."""

    mode: str
    every: int
    checkpointed: int
    peak: float  # bytes per rank
    recompute: float  # fraction of the step
    fits: bool
    dominated: bool = False  # another setting recomputes no more and keeps less

    @property
    def overrides(self) -> str:
        """The setting as overrides to paste."""
        if self.mode == "none":
            return "model.activation_checkpointing=none"
        return f"model.activation_checkpointing={self.mode} model.activation_checkpointing_every={self.every}"

    def as_dict(self) -> dict[str, Any]:
        """The fields, the overrides and the setting's name (what --json prints)."""
        name = "none" if self.mode == "none" else f"{self.mode}, every {self.every}"
        return {**asdict(self), "setting": name, "overrides": self.overrides}


def candidates(
    cfg: Config, m: ModelConfig, params: Parameters, est: dict[str, Any], world_size: int, costs: Costs,
    budget: float, measured: dict[str, float] | None = None,
) -> list[Candidate]:  # fmt: skip
    """Every setting's peak and recompute; per (mode, checkpointed count) the k of least peak, the
    list ordered by recompute then peak (so the plan is the first that fits). `measured`: the
    bytes a block, its attention and its MLP save, against the analytic ones (the keys' suffix)."""
    states = model_states(cfg, m, params, world_size)
    accumulation, kept_states = est["run"]["accumulation"], est["peak"]["kept_states"]
    settings = [("none", 1)] + [(mode, k) for mode in MODES for k in range(1, m.n_layer + 1)]
    best: dict[tuple[str, int], Candidate] = {}
    for mode, every in settings:
        shape = replace(m, activation_checkpointing=mode, activation_checkpointing_every=every)
        act = activation_bytes(cfg, shape, params)
        phases = peak_phases(cfg, shape, params, act, states, accumulation)
        c = act["checkpointed"]
        if measured:  # each block's kept bytes move by measured - analytic (a wrapped part keeps its input)
            delta = {k: measured[k] - measured[f"analytic_{k}"] for k in ("block", "attention", "mlp")}
            wrapped = {"attention": delta["block"] - delta["attention"], "mlp": delta["block"] - delta["mlp"]}
            shift = (m.n_layer - c) * delta["block"] + c * wrapped.get(mode, 0)  # full: keeps its input only
            phases = {k: v + (shift if k != "optimizer_step" else 0) for k, v in phases.items()}
        peak = kept_states + max(phases.values())
        row = Candidate(mode, every, c, peak, costs.recompute(mode, c), peak <= budget)
        if (mode, c) not in best or peak < best[(mode, c)].peak:
            best[(mode, c)] = row
    rows, least = sorted(best.values(), key=lambda r: (r.recompute, r.peak)), math.inf
    for i, row in enumerate(rows):
        rows[i], least = replace(row, dominated=row.peak >= least), min(least, row.peak)
    return rows


def plan(
    cfg: Config, budget: float, world_size: int = 1, vocab: int | None = None, measure: bool = False,
    est: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The planner's answer as a dict (what --json adds under "plan"): the candidates, the chosen
    one (None when nothing fits, then `advice`), the 5e minimiser, and where the costs came from.
    `est`: estimate(cfg, world_size, vocab) when the caller has it."""
    m = model_shape(cfg, vocab)
    params = count_parameters(cfg, m)
    est = est or estimate(cfg, world_size, vocab)
    costs, measured = analytic_costs(m, params, cfg.train.seq_len), None
    if measure:  # exercise 5d: the measured overhead of recomputing every block against the FLOP count
        measured = measure_block(cfg, m, params)
        theory, costs = costs, measured.pop("costs")
        measured["full_recompute"], measured["full_recompute_theory"] = (
            c.recompute("full", m.n_layer) for c in (costs, theory)
        )
    rows = candidates(cfg, m, params, est, world_size, costs, budget, measured)
    chosen = next((r for r in rows if r.fits), None)
    none = next(r for r in rows if r.mode == "none")
    product = min(rows, key=lambda r: (r.peak * (1 + r.recompute), r.recompute))
    return {
        "budget": budget,
        "source": costs.source,
        "measured": measured,
        "n_layer": m.n_layer,
        "candidates": [r.as_dict() for r in rows],
        "chosen": None if chosen is None else chosen.as_dict(),
        "least_memory_x_compute": {**product.as_dict(), "vs_none": product.peak * (1 + product.recompute) / none.peak},
        "advice": None if chosen else advice(cfg, m, world_size, min(rows, key=lambda r: r.peak), budget, est),
    }


def advice(cfg: Config, m: ModelConfig, world_size: int, least: Candidate, budget: float, est: dict) -> str:
    """The one line for a budget nothing fits: the least peak, and what else lowers memory."""
    why = ""
    if least.mode == "none":  # the peak is where activations are gone (the optimizer step)
        why = f", at the {est['peak']['at'].replace('_', ' ')}, which checkpointing does not lower"
    tries = []
    if not cfg.lora.enabled:
        tries.append("LoRA (lora.enabled=true)")
    elif not cfg.lora.quantize_base:
        tries.append("an NF4 base (lora.quantize_base=nf4)")
    if cfg.parallel.strategy in ("none", "ddp", "zero1", "zero2"):
        tries.append("sharding (parallel=fsdp or parallel=zero3 with --world-size N)")
    elif world_size > 1:
        tries.append(f"more ranks (--world-size {2 * world_size})")
    if cfg.train.micro_batch_size > 1:
        tries.append(f"a smaller micro-batch (train.micro_batch_size={cfg.train.micro_batch_size // 2})")
    if m.loss_chunk == 0:
        tries.append("a chunked loss (model.loss_chunk_size=1024)")
    if cfg.precision.dtype == "fp32":
        tries.append("precision=bf16")
    return f"the least peak is {_size(least.peak, budget)} ({least.overrides}){why}; try " + ", ".join(tries)


def _unit(budget: float) -> tuple[int, str]:
    """GiB, or MiB for a budget under 1 GiB."""
    return (GIB, "GiB") if budget >= GIB else (2**20, "MiB")


def _size(n: float, budget: float) -> str:
    unit, name = _unit(budget)
    return f"{n / unit:.4g} {name}"


def table(p: dict[str, Any]) -> str:
    """The planner's table, the plan line (overrides to paste) and the 5e line; in GiB (MiB for
    a budget under 1 GiB)."""
    budget, L = p["budget"], p["n_layer"]
    unit, unit_name = _unit(budget)
    lines = [
        f"Activation checkpointing for {_size(budget, budget)} per rank; recompute from {p['source']}",
        "",
        f"| setting | checkpointed blocks | peak {unit_name} | recompute % of step | peak x compute vs none | fits? |",
        "|---|---:|---:|---:|---:|---|",
    ]
    none = next(r for r in p["candidates"] if r["mode"] == "none")
    for r in (r for r in p["candidates"] if not r["dominated"]):
        lines.append(
            f"| {r['setting']} | {r['checkpointed']} of {L} | {r['peak'] / unit:.2f} | {100 * r['recompute']:.1f} | "
            f"{r['peak'] * (1 + r['recompute']) / none['peak']:.3f} | {'yes' if r['fits'] else 'no'} |"
        )
    dominated = sum(r["dominated"] for r in p["candidates"])
    lines.append(f"\n({dominated} settings left out: another keeps less at no more recompute.)" if dominated else "")
    chosen, best = p["chosen"], p["least_memory_x_compute"]
    if chosen:
        lines.append(
            f"plan: {chosen['overrides']} (peak {_size(chosen['peak'], budget)} <= {_size(budget, budget)}, "
            f"+{100 * chosen['recompute']:.1f}% compute)"
        )
    else:
        lines.append(f"plan: nothing fits {_size(budget, budget)}: {p['advice']}")
    lines.append(
        f"least peak x compute (exercise 5e): {best['overrides']} (peak {_size(best['peak'], budget)}, "
        f"+{100 * best['recompute']:.1f}% compute: {best['vs_none']:.3f} of none's)"
    )
    if p["measured"] and p["measured"]["backward_s"] < p["measured"]["forward_s"]:
        lines.append("note: the backward timed shorter than the forward: the machine was busy; run --measure again")
    if p["measured"]:
        ms, mib = p["measured"], 2**20
        batch = ms["extrapolated_to"]
        scaled = f" timed; bytes at 1 and 2 sequences, extrapolated to {batch}" if batch else ""
        threads = ", 1 thread" if ms["threads"] else ""
        lines.append(
            f"measured on {ms['device']}{threads} ({ms['tokens']} tokens{scaled}): a block saves "
            f"{ms['block'] / mib:.1f} MiB (analytic {ms['analytic_block'] / mib:.1f}), its attention {ms['attention'] / mib:.1f} "
            f"({ms['analytic_attention'] / mib:.1f}), its MLP {ms['mlp'] / mib:.1f} ({ms['analytic_mlp'] / mib:.1f}); "
            f"forward {1e3 * ms['forward_s']:.1f} ms (attention {1e3 * ms['attention_s']:.1f}, MLP "
            f"{1e3 * ms['mlp_s']:.1f}), backward {1e3 * ms['backward_s']:.1f} ms"
            + (f"; forward + backward peak {ms['cuda_peak'] / mib:.1f} MiB" if "cuda_peak" in ms else "")
        )
        lines.append(
            f"recomputing every block (full, every 1): +{100 * ms['full_recompute']:.1f}% of the step as timed, "
            f"+{100 * ms['full_recompute_theory']:.1f}% by the FLOP count (exercise 5d)"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --measure: one block of the run's shape, timed and its saved bytes counted on this machine


def saved_bytes(module: nn.Module, *inputs: Any, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages autograd still holds after `module(*inputs)` (parameters and
    `exclude` left out): what its forward keeps for backward, each storage once and whole."""
    skip = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *exclude) if _plain(t)}
    holders: list[weakref.ref] = []

    class Saved:  # alive as long as the graph node that saved it
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor: torch.Tensor) -> None:
            self.tensor = tensor

    def pack(t: torch.Tensor) -> Saved:
        saved = Saved(t)
        holders.append(weakref.ref(saved))
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        out = module(*inputs)
    live = [s.tensor.untyped_storage() for ref in holders if (s := ref()) is not None and _plain(s.tensor)]
    storages = {s.data_ptr(): s.nbytes() for s in live if s.data_ptr() not in skip}
    del out, live
    return sum(storages.values())


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)  # NF4 weights (a subclass) are parameters anyway


def one_block(cfg: Config, m: ModelConfig, params: Parameters, device: torch.device) -> nn.Module:
    """Block 0 of the run's model, materialised alone on `device`: adapters and dtypes as the run
    gives them (trainer.lora.add_adapters, NF4 quantised as it fills); half weights under FSDP /
    DeepSpeed in bf16 / fp16. The embedding and head stay on the meta device."""
    from trainer.lora.run import add_adapters, base_place
    from trainer.model import GPT
    from trainer.parallel.base import materialize
    from trainer.precision import DTYPES

    shape = replace(
        m, n_layer=1, activation_checkpointing="none", activation_checkpointing_every=1,
        layer_types=m.layer_types[:1] if m.layer_types else None,
        moe_layers=None if m.moe_layers is None else [0] if m.is_moe(0) else [],
    )  # fmt: skip
    with torch.device("meta"):
        model = GPT(shape)
    prefix = "blocks.0."

    def weights(dev: torch.device):  # the block's initial values only
        generator = torch.Generator(dev).manual_seed(0)
        for name, p in model.named_parameters():
            if name.startswith(prefix):
                tensor = torch.empty(p.shape, dtype=torch.float32, device=dev)
                model.init_parameter(name, tensor, generator)
                yield name, tensor

    if cfg.lora.enabled:
        weights = add_adapters(model, weights, cfg, shape)[0]
    block = model.blocks[0]
    place = base_place(block, device) if cfg.lora.enabled else None
    materialize(block, lambda dev: ((n.removeprefix(prefix), t) for n, t in weights(dev)), device, place)
    f = forward_spec(cfg, m, params)
    if f.a == 2 and not f.autocast:  # FSDP2's param_dtype / DeepSpeed: compute on half weights
        for p in block.parameters():
            if _plain(p) and p.dtype == torch.float32:
                p.data = p.data.to(DTYPES[cfg.precision.dtype])
    return block


def measure_block(cfg: Config, m: ModelConfig, params: Parameters, repeats: int = 10) -> dict[str, Any]:
    """One block's saved bytes (whole, attention, MLP) and its forward / backward seconds on this
    machine (CUDA when the run is not on the CPU and one is here), at the config's micro-batch
    shape; on the CPU one sequence is timed when the micro-batch's forward is over ~20 GFLOP (its
    bytes then extrapolated from 1 and 2 sequences). Returns them with this device's analytic
    bytes and the measured Costs."""
    from trainer.model.gpt import rope_cos_sin
    from trainer.precision import DTYPES, autocast

    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # The analytic bytes to set against the measured ones are this device's (the estimate's are
    # CUDA's unless train.device=cpu), so the difference is only what the analytic count misses.
    cfg = cfg if cuda else replace(cfg, train=replace(cfg.train, device="cpu"))
    f = forward_spec(cfg, m, params)
    flops = analytic_costs(m, params, f.T)
    B = f.B if cuda or f.N * flops.block < CPU_TIMED_FLOPS else 1
    block = one_block(cfg, m, params, device)
    stream = {4: torch.float32, 2: DTYPES.get(cfg.precision.dtype, torch.bfloat16)}[f.s]
    rope = rope_cos_sin(m, f.T, device) if m.position == "rope" else None
    tables = rope or ()
    context = autocast(cfg.precision, device) if f.autocast else contextlib.nullcontext()

    def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's input (B, T, C) and, as the block makes them, its attention's and MLP's:
        not leaves, for autocast caches its casts of leaves (as of the weights)."""
        x = torch.randn(batch, f.T, m.n_embd, device=device, dtype=stream, requires_grad=True)
        with context:
            return x, block.norm_1(x), block.norm_2(x)

    def saved_at(batch: int) -> dict[str, int]:
        x, h1, h2 = inputs(batch)
        with context:
            return {
                "block": saved_bytes(block, x, rope, exclude=tables),
                "attention": saved_bytes(block.attn, h1, rope, exclude=tables),
                "mlp": saved_bytes(block.mlp, h2),
            }

    if B == f.B:
        saved = saved_at(B)
    else:  # bytes are affine in the batch (activations, plus weight-sized copies): two points fix them
        one, two = saved_at(1), saved_at(2)
        saved = {k: one[k] + (f.B - 1) * (two[k] - one[k]) for k in one}
    act = activation_bytes(cfg, m, params)
    result: dict[str, Any] = {
        **saved, **{f"analytic_{k}": act[k] for k in saved}, "device": str(device), "tokens": B * f.T,
        "threads": None if cuda else 1, "extrapolated_to": None if B == f.B else f.B,
    }  # fmt: skip
    x, h1, h2 = inputs(B)
    grad = torch.randn_like(x)

    def forward() -> torch.Tensor:
        with context:
            return block(x, rope)

    def step() -> None:
        forward().backward(grad)

    def attention() -> None:
        with context:
            block.attn(h1, rope)

    def mlp() -> None:
        with context:
            block.mlp(h2)

    seconds = _seconds({"forward": forward, "step": step, "attention": attention, "mlp": mlp}, device, repeats)
    if cuda:  # after the warm-up calls: the allocator's and cuBLAS's first-call buffers exist
        result["cuda_peak"] = _cuda_peak(step)
    result |= {f"{name}_s": seconds[name] for name in ("forward", "attention", "mlp")}
    result["backward_s"] = seconds["step"] - seconds["forward"]
    # The head and the loss are not timed: their share of the step is taken from the FLOPs.
    step_s = m.n_layer * seconds["step"] / (1 - _head_share(m, params, flops))
    result["costs"] = Costs(
        seconds["attention"], seconds["mlp"], seconds["forward"], step_s,
        f"block timings measured on {device} (head and loss: their FLOP share)",
    )  # fmt: skip
    return result


def _head_share(m: ModelConfig, params: Parameters, flops: Costs) -> float:
    """The head's share of the step's FLOPs (2 V C forward, 4 V C backward, 2 V C when frozen)."""
    head = m.padded_vocab_size * m.n_embd
    return 2 * head * (3 if "head" in params.trains else 2) / flops.step


def _seconds(fns: dict[str, Any], device: torch.device, repeats: int) -> dict[str, float]:
    """Each function's least wall time over `repeats` calls after two warm-up calls (the least is
    the steadiest figure when other work shares the machine: timeit's advice); on the CPU with one
    thread, steadier when other work shares the cores."""
    times, threads = {}, torch.get_num_threads()
    torch.set_num_threads(threads if device.type == "cuda" else 1)
    try:
        for name, fn in fns.items():
            fn(), fn()
            best = math.inf
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()  # host sync
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()  # host sync: the kernels are done
                best = min(best, time.perf_counter() - start)
            times[name] = best
    finally:
        torch.set_num_threads(threads)
    return times


def _cuda_peak(fn: Any) -> int:
    """Bytes fn allocates at its peak above what was allocated before it (host syncs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


__all__ = ["Candidate", "Costs", "analytic_costs", "candidates", "measure_block", "parse_bytes", "plan", "table"]
