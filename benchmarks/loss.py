"""Peak memory and time of the head + cross-entropy: plain logits vs chunked (model.loss_chunk_size).

    python -m benchmarks.loss                                  # V=128256, C=2048, N=1024, fp32
    python -m benchmarks.loss --tokens 4096 --dim 512 --chunks 256 1024  # more tokens, narrower

One forward + backward of the loss head on N tokens, hidden (N, C) and weight (V, C) both
requiring gradients (Llama 3's 128k vocabulary and a 2048-wide model by default):
  plain      cross_entropy_sum(F.linear(h, W), y)       up to three (N, V) fp32 tensors at once
                                                         (in backward: the saved log-softmax, its
                                                         gradient and the logits' gradient)
  fused-K    linear_cross_entropy_sum(h, W, y, K)        K tokens' logits at a time

Each variant runs in a fresh process. Peak memory is the growth of the high-water mark over
creating the inputs: on CPU the process's peak resident set (getrusage ru_maxrss) after one
forward + backward minus the same after the inputs are made (every input is written in
place, so making them has no transient above what they hold); on CUDA
torch.cuda.max_memory_allocated minus the memory allocated after the inputs. Both include the
gradients that any method must return: W.grad (V, C) and h.grad (N, C), shown as `grads`.
A pass on a tiny shape runs before the baseline, so kernels' code pages and workspaces, which
the resident set would count, are not charged to the variant.
Time per forward + backward, wall-clock and process CPU time (all threads; less disturbed by
other processes on a shared machine): the median of --repeats passes, the first included.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import write_report
from trainer.model.loss import IGNORE_INDEX, cross_entropy_sum, linear_cross_entropy_sum

MB = 1e6  # the table's MB are 10^6 bytes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256, help="V (Llama 3: 128256)")
    parser.add_argument("--dim", type=int, default=2048, help="C, the model width")
    parser.add_argument("--tokens", type=int, default=1024, help="N = micro-batch x sequence")
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 1024], help="fused chunk sizes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="of hidden and W")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1, help="forward + backward passes timed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loss.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # plain | fused-K: measure one variant
    return parser.parse_args(argv)


def peak_bytes(device: torch.device) -> int:
    """High-water mark so far: allocated bytes on CUDA, resident set (ru_maxrss, KiB) on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(args: argparse.Namespace) -> dict:
    """In a fresh process: peak memory growth and time of `args.child`'s forward + backward."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    n, c, v = args.tokens, args.dim, args.vocab
    g = torch.Generator(device).manual_seed(0)
    # Made in place (no temporaries), so the high-water mark after this is what they hold.
    hidden = torch.empty(n, c, device=device, dtype=dtype).normal_(generator=g).requires_grad_()
    weight = torch.empty(v, c, device=device, dtype=dtype).normal_(0, 0.02, generator=g)
    weight.requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    targets[::8] = IGNORE_INDEX  # some masked positions, as in SFT or padded batches
    if args.child == "plain":
        loss_fn = lambda h, w, y: cross_entropy_sum(F.linear(h, w), y)  # noqa: E731
    else:
        chunk = int(args.child.removeprefix("fused-"))
        loss_fn = lambda h, w, y: linear_cross_entropy_sum(h, w, y, chunk)  # noqa: E731
    # Warm up on a tiny shape: the kernels' code pages and workspaces, which would otherwise
    # count in the resident set, are then in place before the baseline.
    tiny = [t[: min(64, n)].detach().requires_grad_(t.is_floating_point()) for t in (hidden, weight)]
    loss_fn(*tiny, targets[: min(64, n)] % 64).backward()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_bytes(device)
    seconds, cpu_seconds, losses = [], [], []
    for i in range(args.repeats):
        hidden.grad = weight.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = loss_fn(hidden, weight, targets)
        loss.backward()
        losses.append(loss.item())  # host sync: the time includes all the work
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)  # all threads: robust to neighbours
        if i == 0:
            growth = peak_bytes(device) - base  # the first pass; later ones repeat it
    return {
        "variant": args.child,
        "peak_growth_bytes": growth,
        "seconds": statistics.median(seconds),
        "cpu_seconds": statistics.median(cpu_seconds),
        "loss": losses[0],
    }


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Run measure() for one variant in a fresh Python process and return its result."""
    argv = [sys.executable, "-m", "benchmarks.loss", "--child", variant, "--vocab", str(args.vocab)]
    argv += ["--dim", str(args.dim), "--tokens", str(args.tokens), "--dtype", args.dtype]
    argv += ["--device", args.device, "--repeats", str(args.repeats)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(results: list[dict], grads_bytes: int) -> str:
    """Markdown table: peak growth, the same less the gradients, and time per pass."""
    plain = next((r for r in results if r["variant"] == "plain"), None)
    lines = [
        "| variant | peak growth (MB) | peak - grads (MB) | vs plain | wall s / fwd+bwd | CPU s / fwd+bwd | loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r['peak_growth_bytes'] / plain['peak_growth_bytes']:.2f}x" if plain else "-"
        lines.append(
            f"| {r['variant']} | {r['peak_growth_bytes'] / MB:,.0f} | "
            f"{(r['peak_growth_bytes'] - grads_bytes) / MB:,.0f} | {ratio} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['loss']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return
    n, c, v = args.tokens, args.dim, args.vocab
    element = DTYPES[args.dtype].itemsize
    logits_bytes = n * v * 4  # the fp32 logits the plain path materialises
    grads_bytes = (v * c + n * c) * element  # W.grad and h.grad: returned by every variant
    print(f"N={n} tokens, V={v}, C={c}, {args.dtype} on {args.device}; torch {torch.__version__}")
    print(f"fp32 logits N x V x 4 = {logits_bytes / MB:,.0f} MB; grads (V + N) x C = {grads_bytes / MB:,.0f} MB")
    results = [run_variant(name, args) for name in ["plain", *(f"fused-{k}" for k in args.chunks)]]
    print(table(results, grads_bytes))
    record = {
        "shape": {"tokens": n, "vocab": v, "dim": c, "dtype": args.dtype, "device": args.device},
        "torch": torch.__version__,
        "method": "cuda max_memory_allocated" if args.device.startswith("cuda") else "ru_maxrss growth, fresh process",
        "logits_fp32_bytes": logits_bytes,
        "grads_bytes": grads_bytes,
        "repeats": args.repeats,
        "results": results,
    }
    write_report(args.out, record)


if __name__ == "__main__":
    main()
