"""The kernels the later families bring, on the GPU: sliding-window and soft-capped attention, and
the mixture-of-experts' grouped matmul, each against the plain reference on the same device.

    python -m benchmarks.families_gpu                  # on the GPU machine (benchmarks/gpu_check.sh)
    python -m benchmarks.families_gpu --smoke          # tiny shapes on the CPU: tests this script

Rows:
  attention window   Gemma 3's sliding layer: T tokens, window W, causal_attention(auto) (flex /
                     FA / SDPA with a band mask, whatever `auto` picks there) vs the explicit math
                     path (backend=math), bf16: forward + backward time and the largest
                     difference of the output and the q gradient, relative to their largest value
  attention softcap  Gemma 2's soft-capped scores the same way
  moe grouped        one Qwen3-30B-A3B-shaped sparse MLP (E experts, top-k, H, I) over N tokens,
                     bf16: model.moe_impl=grouped (torch._grouped_mm) vs loop, forward + backward
Times are medians of --repeats passes after one warm-up, synchronised.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from benchmarks import write_report
from trainer.config import ModelConfig
from trainer.model.attention import causal_attention
from trainer.model.moe import SparseMLP, grouped_mm_supported

FULL = dict(tokens=8192, window=1024, heads=8, kv_heads=4, head_dim=256, experts=128, topk=8, hidden=2048,
            expert_width=768, moe_tokens=8192, repeats=5)  # fmt: skip
SMOKE = dict(tokens=64, window=16, heads=2, kv_heads=1, head_dim=16, experts=4, topk=2, hidden=32,
             expert_width=16, moe_tokens=64, repeats=1)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/families_gpu.json"))
    return parser.parse_args(argv)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    """Median seconds of fn() over repeats passes after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def attention_row(name: str, s: dict, device: torch.device, dtype: torch.dtype, **kwargs) -> dict:
    g = torch.Generator(device).manual_seed(0)
    shape = lambda h: (1, h, s["tokens"], s["head_dim"])  # noqa: E731
    q = torch.randn(shape(s["heads"]), generator=g, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(shape(s["kv_heads"]), generator=g, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(shape(s["kv_heads"]), generator=g, device=device, dtype=dtype, requires_grad=True)

    def step(backend: str):
        q.grad = None
        y = causal_attention(q, k, v, backend, **kwargs)
        y.float().square().mean().backward()
        return y.detach(), q.grad.detach()

    fast_s, (fast_y, fast_dq) = timed(lambda: step("auto"), s["repeats"], device)
    math_s, (math_y, math_dq) = timed(lambda: step("math"), s["repeats"], device)
    return dict(row=name, tokens=s["tokens"], auto_ms=1e3 * fast_s, math_ms=1e3 * math_s,
                out_rel=relative(fast_y, math_y), dq_rel=relative(fast_dq, math_dq), **kwargs)  # fmt: skip


def moe_row(s: dict, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = ModelConfig(n_embd=s["hidden"], n_head=1, mlp="swiglu", n_experts=s["experts"],
                      n_experts_per_token=s["topk"], moe_intermediate_size=s["expert_width"])  # fmt: skip
    torch.manual_seed(0)
    loop = SparseMLP(cfg).to(device=device, dtype=dtype)
    for p in loop.parameters():
        torch.nn.init.normal_(p, std=0.02)
    grouped = SparseMLP(dataclasses.replace(cfg, moe_impl="grouped")).to(device=device, dtype=dtype)
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(1, s["moe_tokens"], s["hidden"], device=device, dtype=dtype, requires_grad=True)

    def step(mlp: SparseMLP):
        x.grad = None
        mlp.zero_grad(set_to_none=True)
        y = mlp(x)
        y.float().square().mean().backward()
        return y.detach(), mlp.w_down.grad.detach()

    row = dict(row="moe grouped", tokens=s["moe_tokens"], experts=s["experts"], topk=s["topk"])
    loop_s, (loop_y, loop_dw) = timed(lambda: step(loop), s["repeats"], device)
    row["loop_ms"] = 1e3 * loop_s
    if not grouped_mm_supported(x):
        return row | {"grouped_ms": None, "note": "torch._grouped_mm unsupported here: auto runs the loop"}
    grouped_s, (grouped_y, grouped_dw) = timed(lambda: step(grouped), s["repeats"], device)
    return row | dict(grouped_ms=1e3 * grouped_s, out_rel=relative(grouped_y, loop_y),
                      dw_down_rel=relative(grouped_dw, loop_dw))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    s, dtype = (SMOKE, torch.float32) if args.smoke else (FULL, torch.bfloat16)
    rows = [
        attention_row("attention window", s, device, dtype, window=s["window"]),
        attention_row("attention softcap", s, device, dtype, softcap=50.0, window=s["window"]),
        moe_row(s, device, dtype),
    ]
    print(f"{'row':<18} {'tokens':>6} {'fast ms':>9} {'ref ms':>9} {'out rel':>9} {'grad rel':>9}")
    for r in rows:
        fast, ref = r.get("auto_ms", r.get("grouped_ms")), r.get("math_ms", r.get("loop_ms"))
        cells = [f"{x:9.2f}" if x is not None else f"{'-':>9}" for x in (fast, ref)]
        diffs = [
            f"{x:9.1e}" if x is not None else f"{'-':>9}"
            for x in (r.get("out_rel"), r.get("dq_rel", r.get("dw_down_rel")))
        ]
        print(f"{r['row']:<18} {r['tokens']:>6} {' '.join(cells)} {' '.join(diffs)}")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    write_report(args.out, {"device": device_name, "dtype": str(dtype), "shapes": s, "rows": rows})


if __name__ == "__main__":
    main()
