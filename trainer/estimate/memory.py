"""Per rank: model states (weights, master, gradients, AdamW state, gathered unit, buffers) under
each strategy's sharding, the peak, and `estimate`, which puts the parts together.

  weights     trainable parameters in fp32 (full training, adapters, lora.train_modules); the
              frozen LoRA base as add_adapters stores it (its matrices in lora.base_dtype: all of
              them under bf16 / fp16, the adapted linears' under fp32; norms fp32); with
              lora.quantize_base=nf4 the adapted linears' weights in NF4 as trainer.lora.qlora
              stores them (4-bit codes, an int8 absmax per 64 weights, a scale per 256 absmaxes:
              4.126 bits a weight). DeepSpeed holds working weights in the compute dtype and an
              fp32 master copy of the trainable ones.
  gradients   trainable parameters only, fp32 (DeepSpeed: the compute dtype).
  optimizer   AdamW: exp_avg and exp_avg_sq, 8 bytes a trainable parameter.
  sharding    none / ddp keep all; zero1 shards the optimizer state (and the master copy), zero2
              also the gradients, zero3 and fsdp also the weights (fsdp over
              parallel.fsdp_shard_size ranks when set). fsdp and zero3 add the gathered unit (one
              block and the root: embedding, head, final norm, whole, in the compute dtype); ddp
              its gradient buckets (a second copy of the gradients), DeepSpeed its reduce bucket.
  activations what one micro-batch's forward keeps for backward: trainer.estimate.activations.
  peak        the kept states plus the largest of three moments: see `peak_phases`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from trainer.config import Config, ConfigError, ModelConfig
from trainer.estimate.activations import activation_bytes, forward_spec
from trainer.estimate.parameters import BYTES, Parameters, count_parameters
from trainer.preflight import resolve_model_config


def model_shape(cfg: Config, vocab: int | None = None) -> ModelConfig:
    """The model the run builds: model.pretrained's architecture, the vocabulary fixed."""
    m = cfg.model
    if m.pretrained:
        return resolve_model_config(m, vocab or 0)
    if m.vocab_size is None and vocab is None:
        raise ConfigError("model.vocab_size is null (the tokenizer's): set model.vocab_size=N or pass --vocab N")
    return replace(m, vocab_size=m.vocab_size or vocab)


def model_states(cfg: Config, m: ModelConfig, params: Parameters, world_size: int) -> dict[str, Any]:
    """Bytes per rank of weights, master, gradients, optimizer, gathered unit and buffers, and
    which of them live in host memory (offload). With expert parallelism (parallel.expert = N, under
    ddp) a rank holds 1/N of the experts' tensors, and DDP's buckets leave them out."""
    par, a = cfg.parallel, BYTES[cfg.precision.dtype]
    deepspeed = par.strategy.startswith("zero")
    away = 1 - 1 / expert_degree(cfg)  # the share of the experts on other ranks
    expert_frozen = params.experts - params.experts_trainable
    frozen = params.frozen * 2 + params.nf4_bytes if deepspeed and a == 2 else params.frozen_bytes
    frozen -= (expert_frozen * 2 if deepspeed and a == 2 else params.experts_bytes) * away
    trainable = params.trainable - params.experts_trainable * away
    states = _sharded(cfg, world_size, trainable, frozen) | {"gathered": 0, "buffers": 0}
    if par.strategy in ("fsdp", "zero3"):  # one block and the root, whole, in the compute dtype
        shard = (par.fsdp_shard_size or world_size) if par.strategy == "fsdp" else world_size
        states["gathered"] = (params.block + params.root) * a * (1 - 1 / shard)
    if par.strategy == "ddp":  # gradient buckets, a second copy of the gradients (not the sharded experts')
        states["buffers"] = 4 * (params.trainable - (params.experts_trainable if away else 0))
    elif deepspeed:
        states["buffers"] = _reduce_bucket(cfg, world_size) * a  # in the working (half) dtype
    host = set()
    if par.fsdp_cpu_offload and par.strategy == "fsdp":
        host |= {"weights_frozen", "weights_trainable", "gradients", "optimizer"}
    if par.zero_offload_optimizer:
        host |= {"master", "optimizer"}
    if par.zero_offload_params:
        host |= {"weights_frozen", "weights_trainable"}
    states["host"] = sorted(host)
    return states


def expert_degree(cfg: Config) -> int:
    """Ranks the experts are split over: parallel.expert under ddp (trainer.parallel.expert), else 1."""
    return cfg.parallel.expert if cfg.parallel.strategy == "ddp" else 1


def _sharded(cfg: Config, world_size: int, trainable: float, frozen: float) -> dict[str, float]:
    """Bytes per rank of `trainable` parameters (weights, master, gradients, AdamW state) and of
    `frozen` bytes of frozen ones, under the strategy's sharding."""
    par, a = cfg.parallel, BYTES[cfg.precision.dtype]
    n = 1 if par.strategy == "none" else world_size
    deepspeed = par.strategy.startswith("zero")
    working = a if deepspeed else 4  # DeepSpeed trains half-precision working weights
    fsdp_n = par.fsdp_shard_size or n
    shard_weights = fsdp_n if par.strategy == "fsdp" else n if par.strategy == "zero3" else 1
    shard_grads = fsdp_n if par.strategy == "fsdp" else n if par.strategy in ("zero2", "zero3") else 1
    shard_optim = fsdp_n if par.strategy == "fsdp" else n if deepspeed else 1
    return {
        "weights_frozen": frozen / shard_weights,
        "weights_trainable": trainable * working / shard_weights,
        "master": 4 * trainable / shard_optim if deepspeed else 0,
        "gradients": trainable * working / shard_grads,
        "optimizer": 8 * trainable / shard_optim,
    }


def expert_states(cfg: Config, params: Parameters, world_size: int) -> dict[str, float] | None:
    """The sparse MLPs' expert tensors' part of the model states per rank (weights frozen and
    trainable, master, gradients, AdamW state); None for a dense model."""
    if not params.experts:
        return None
    half = cfg.parallel.strategy.startswith("zero") and BYTES[cfg.precision.dtype] == 2
    share = 1 / expert_degree(cfg)
    frozen = ((params.experts - params.experts_trainable) * 2 if half else params.experts_bytes) * share
    return _sharded(cfg, world_size, params.experts_trainable * share, frozen)


def _reduce_bucket(cfg: Config, world_size: int) -> int:
    """DeepSpeed's reduce bucket in elements: the JSON's reduce_bucket_size, else its 5e8 default."""
    from trainer.parallel.zero import merged_deepspeed_config

    ds = merged_deepspeed_config(cfg, world_size)
    return int(float(ds.get("zero_optimization", {}).get("reduce_bucket_size", 5e8)))


def peak_phases(
    cfg: Config, m: ModelConfig, params: Parameters, act: dict, states: dict, accumulation: int
) -> dict[str, float]:
    """Bytes above the kept states at the three moments one of which is the peak.

    loss: every activation and the loss's transients: plain, the fp32 gradients of log-softmax
    and of the logits (2 N V 4) and the head's gradient; chunked, one chunk's fp32 logits and
    their half copy, the half copy of an fp32 head weight, the half product summed into its
    gradient. backward: the largest moment of the blocks' backward, last block to first: the
    front activations, the blocks' before this one, this block's (rebuilt when checkpointed,
    with its input), the gradients of the head and of the blocks after it, the backward's own
    tensors (activations.backward_own: the MLP's hidden gradients, the residual stream's; a
    sparse MLP's at its weighting's backward or, checkpointed, at the end of its recompute) and,
    under NF4, the largest adapted linear dequantised; what the sparse MLPs hold throughout, and
    the load-balancing loss's router-logit gradients still waiting for their blocks.
    optimizer_step: every gradient, an fp32 square of the largest (the norm), and AdamW's
    temporaries: sqrt(v) for the whole partition under DeepSpeed (foreach), a few of the
    largest tensor on the CPU (single-tensor), none for the fused CUDA AdamW.
    """
    a, N, C = BYTES[cfg.precision.dtype], cfg.train.micro_batch_size * cfg.train.seq_len, m.n_embd
    V = m.padded_vocab_size  # the head's logits: padded columns too
    H, L = m.intermediate_size or 4 * C, m.n_layer
    f = forward_spec(cfg, m, params)
    head_trains = "head" in params.trains
    # Gradients in host memory, or kept between micro-steps (then in the kept states), add nothing here.
    grads_here = accumulation == 1 and "gradients" not in states["host"]
    head_grad = V * C * 4 if head_trains and grads_here else 0
    if m.loss_chunk > 0:
        n = min(m.loss_chunk, N)
        loss = n * V * (4 + (a if a == 2 else 0))
        loss += V * C * a if f.autocast and f.head_bytes == 4 else 0  # the fp32 head weight's half copy
        loss += V * C * a if a == 2 and head_trains else 0
    else:
        loss = 2 * N * V * 4 + head_grad
    per_parameter = states["gradients"] / params.trainable if grads_here and params.trainable else 0
    after = [sum(params.block_trainables[i + 1 :]) * per_parameter for i in range(L)]  # the blocks' after i
    nf4 = 0
    if params.nf4:  # one adapted linear's weight dequantised for its input gradient
        hd, nkv = m.attn_head_dim, m.n_kv_head or m.n_head
        numel = {"attn.c_attn": C * (m.n_head + 2 * nkv) * hd, "attn.c_proj": m.n_head * hd * C,
                 "mlp.w_gate_up": 2 * C * H, "mlp.router": m.n_experts * C}  # fmt: skip
        adapters = [ad for layer in params.layer_adapters or (params.block_adapters,) for ad in layer]
        nf4 = max((numel.get(ad.module, C * H) for ad in adapters), default=0) * a  # the MLP's others: C H each
    kept, during, own, waiting = act["kept"], act["in_backward"], act["own"], act["waiting"]
    always = act["front"] + act["held"] + head_grad + nf4
    backward = max(always + sum(kept[:i]) + during[i] + after[i] + own[i] + waiting[i] for i in range(L))
    strategy = cfg.parallel.strategy
    if strategy.startswith("zero"):
        optimizer_temp = states["optimizer"] / 2 if "optimizer" not in states["host"] else 0
    else:
        optimizer_temp = 3 * 4 * params.largest if cfg.train.device == "cpu" else 0
    return {
        "loss": act["total"] + act["held"] + loss,
        "backward": backward,
        "optimizer_step": (states["gradients"] if grads_here else 0) + optimizer_temp + 4 * params.largest,
    }


def kept_states(states: dict[str, Any], accumulation: int) -> float:
    """The model states on the device through the step, below every moment of peak_phases: all but
    what lives in host memory, and the gradients only when accumulating (they exist from backward
    to the step otherwise: zero_grad(set_to_none), and peak_phases counts them there)."""
    on_device = {k: v for k, v in states.items() if k != "host" and k not in states["host"]}
    return sum(v for k, v in on_device.items() if k != "gradients" or accumulation > 1)


def estimate(cfg: Config, world_size: int = 1, vocab: int | None = None) -> dict[str, Any]:
    """The estimate as a dict (what --json prints): the run, parameters, bytes per rank, the peak."""
    m = model_shape(cfg, vocab)
    params = count_parameters(cfg, m)
    act = activation_bytes(cfg, m, params)
    states = model_states(cfg, m, params, world_size)
    world = 1 if cfg.parallel.strategy == "none" else world_size
    accumulation = cfg.train.accumulation_steps(world)
    phases = peak_phases(cfg, m, params, act, states, accumulation)
    kept = kept_states(states, accumulation)
    moment = max(phases, key=phases.get)
    lora = params.lora
    return {
        "run": {
            "model": m.name, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head,
            "n_kv_head": m.n_kv_head or m.n_head, "intermediate_size": m.intermediate_size or 4 * m.n_embd,
            "vocab_size": m.vocab_size, "head_dim": m.attn_head_dim,
            "experts": None if not m.n_experts else {
                "n_experts": m.n_experts, "per_token": m.n_experts_per_token,
                "intermediate_size": m.moe_intermediate_size or m.intermediate_size or 4 * m.n_embd,
                "sparse_layers": sum(m.is_moe(i) for i in range(m.n_layer)), "expert_parallel": expert_degree(cfg),
            },
            "flops_per_token": params.flops_per_token, "strategy": cfg.parallel.strategy,
            "world_size": world, "accumulation": accumulation, "precision": cfg.precision.dtype,
            "micro_batch_size": cfg.train.micro_batch_size, "seq_len": cfg.train.seq_len,
            "activation_checkpointing": m.activation_checkpointing,
            "activation_checkpointing_every": m.activation_checkpointing_every,
            "loss_chunk_size": m.loss_chunk, "device": "cpu" if cfg.train.device == "cpu" else "cuda",
            "lora": None if lora is None else {
                "r": lora.r,
                "targets": list(dict.fromkeys(a.name for layer in params.layer_adapters for a in layer))
                + list(params.expert_targets),
                "dora": lora.dora, "base": lora.quantize_base or lora.base_dtype,
                "train_modules": list(lora.train_modules),
            },
        },
        "parameters": {
            **{k: getattr(params, k) for k in ("total", "active", "trainable", "adapters", "frozen", "frozen_nf4")},
            **{k: getattr(params, k) for k in ("experts", "experts_trainable")},
            "frozen_dtypes": dict(params.frozen_dtypes),
        },
        "bytes": {**{k: v for k, v in states.items() if k != "host"}, "activations": act["total"]},
        "experts": expert_states(cfg, params, world_size),
        "host": states["host"],
        "activations": act,
        "phases": phases,
        "peak": {"bytes": kept + phases[moment], "at": moment, "kept_states": kept},
        "notes": notes(cfg, m, params.expert_adapters > 0),
    }  # fmt: skip


def notes(cfg: Config, m: ModelConfig, expert_adapters: bool = False) -> list[str]:
    """What the estimate leaves out or assumes for this config, one line each."""
    out = []
    if m.dropout > 0:
        out.append(f"model.dropout={m.dropout}: its masks (about N C bytes per dropout) are not counted")
    if m.attention_backend == "math" and cfg.train.device != "cpu":
        out.append("attention_backend=math keeps the (B, n_head, T, T) attention probabilities: not counted")
    if expert_adapters:
        out.append(
            "LoRA on the experts (trainer.lora.experts): their adapters' parameters, gradients and AdamW state are "
            "counted, the activations they keep (x A per slot, autocast's copies of A and B) are not"
        )
    if m.n_experts and cfg.lora.enabled and cfg.lora.quantize_base:
        out.append(
            "lora.quantize_base=nf4 quantises the adapted linears only: the experts' tensors stay in lora.base_dtype"
        )
    if m.n_experts and cfg.train.device != "cpu" and m.moe_impl != "loop" and cfg.precision.dtype == "bf16":
        out.append("sparse MLPs as torch._grouped_mm runs them (CUDA compute capability 9.x / 10.x, bf16)")
    if any(m.is_sliding(i) for i in range(m.n_layer)) and m.sliding_window < cfg.train.seq_len:
        out.append(
            "sliding-window layers through SDPA with a band mask (kept per layer in q's dtype; k and v repeated "
            "on CUDA); with Dao's flash-attn installed, `auto` runs it instead on Hopper: less than estimated"
        )
    if m.attn_softcap:
        out.append(
            "model.attn_softcap: soft-capped scores (flex_attention on CUDA, explicit scores elsewhere) not counted"
        )
    if cfg.lora.enabled and cfg.lora.quantize_base:
        out.append(
            "lora.quantize_base=nf4: the adapted linears' weights as torchao's NF4Tensor stores them "
            "(trainer.lora.qlora), dequantised one linear at a time in forward and again in backward"
        )
    return out
