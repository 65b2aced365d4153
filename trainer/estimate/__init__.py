"""Memory per rank for a config, predicted without building it: `python -m trainer.estimate [overrides]`.

    python -m trainer.estimate model=llama3-8b lora=default train.micro_batch_size=2 train.seq_len=4096
    python -m trainer.estimate model=gpt2 parallel=fsdp precision=bf16 --world-size 8 --json
    python -m trainer.estimate model=llama3-8b precision=bf16 train.seq_len=8192 --gpus 1024

The config is composed as `python -m trainer` composes it, without the run checks (an estimate
may describe a run the harness refuses, e.g. lora.quantize_base=nf4 with parallel=fsdp). Parameters are
counted on GPT built on the meta device, with trainer.lora's adapters applied there as a run
applies them (so the frozen base has the dtypes add_adapters gives it): total and, for a mixture of
experts, active (a token's k of E experts), the experts' (E, I, H) tensors with their weights,
gradients and AdamW state apart, and the FLOPs a token (GPT.flops_per_token). Everything else is
arithmetic on the shape, in bytes, per rank, following every GPT switch (head size, q / k norms,
norm placement and offset, GeGLU, fused gate / up, sliding windows, sparse MLPs among dense ones).

| module      | what                                                                              |
|-------------|-----------------------------------------------------------------------------------|
| parameters  | count_parameters (by what trains and how it is stored; total, active, experts)    |
| activations | what one micro-batch's forward keeps for backward, part by part                   |
| memory      | weights, gradients, AdamW state under each sharding (the experts' apart); estimate |
| planner     | --memory-budget: the checkpointing setting that fits at least recompute; --measure |
| mesh        | the (replicate, shard, tensor) mesh, its refusals, the GPUs, a ring collective's time |
| comm        | a step's FLOPs and collectives per strategy and mesh (FSDP, HSDP, ZeRO, DDP, TP + SP) |
| scale       | --gpus N: every strategy and mesh's memory, step time, tokens/s, MFU; the fastest that fits |
| cli         | the table, --json, --memory-budget, --gpus, main                                  |

benchmarks/estimate_check.py measures activations and peaks of real CPU steps against these;
benchmarks/planner_check.py sets the scale planner against torchtitan's published H100 throughput.
"""

from trainer.estimate.activations import activation_bytes
from trainer.estimate.memory import estimate, model_shape, model_states, peak_phases
from trainer.estimate.parameters import Parameters, count_parameters, nf4_bytes

__all__ = [
    "Parameters",
    "activation_bytes",
    "count_parameters",
    "estimate",
    "model_shape",
    "model_states",
    "nf4_bytes",
    "peak_phases",
]
