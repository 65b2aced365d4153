"""What `python -m trainer.diagnose gradient-flow` prints and writes: markdown tables, a PNG of
gradient norm against depth (matplotlib, no pyplot state), and JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainer.diagnostics.gradient_flow import SHOWN_LAYERS


def _e(value: float | None) -> str:
    return "" if value is None else f"{value:.2e}"


def shown_layers(depth: int) -> list[int]:
    """The exercise's layers 1, 5, 10, 20 that a network of `depth` layers has, and its last."""
    return sorted({layer for layer in SHOWN_LAYERS if layer <= depth} | {depth})


def toy_table(result: dict[str, Any]) -> str:
    """The toy study: setup, |dL/dW_l| at the shown layers with both ratios, a verdict per case."""
    setup = result["setup"]
    depth, layers = setup["depth"], shown_layers(setup["depth"])
    lines = [
        f"Exercise 4: {depth} layers of width {setup['width']} (no biases), {setup['batch']} inputs x ~ N(0, 1), "
        f"loss = mean 0.5 |h_{depth} - y|^2 with y ~ N(0, 1), {setup['dtype']}, seed {setup['seed']}",
        f"|dL/dW_l| at layer l (layer 1 takes the input); ratios layer 1 / layer {depth} of |dL/dW| and of "
        "|dL/dh| (the gradient reaching the layer's input)",
        "",
        "| case | init | " + " | ".join(f"layer {layer}" for layer in layers) + " | ratio dW | ratio dh |",
        "|---|---|" + "---:|" * (len(layers) + 2),
    ]
    for case in result["cases"]:
        norms = " | ".join(_e(case["weight_grad"][layer - 1]) for layer in layers)
        lines.append(
            f"| {case['case']} | {case['init']} | {norms} | {_e(case['ratio_weight'])} | {_e(case['ratio_input'])} |"
        )
    lines.append("")
    lines += [f"{c['case']}: {c['verdict']}; |dL/dW| ratio {c['ratio_weight']:.2g}" for c in result["cases"]]
    return "\n".join(lines)


def _state_name(state: dict[str, Any]) -> str:
    return "init" if state["state"] == "init" else f"step {state['step']}"


def model_table(result: dict[str, Any]) -> str:
    """A GPT: one row per block (attn, mlp, stream for each state); a line a state with the
    loss, the embed and head norms (head: norm_f and an untied head) and the verdicts."""
    m, b, states = result["model"], result["batch"], result["states"]
    columns = [(s, key) for s in states for key in ("attn", "mlp", "stream")]
    lines = [
        f"{m['name']}: {m['n_layer']} blocks, n_embd {m['n_embd']}, n_head {m['n_head']}, vocab {m['vocab_size']} | "
        f"batch {b['batch_size']} x {b['seq_len']} tokens, {b['source']} | mean token loss, fp32 on {result['device']}",
        "attn, mlp: |dL/dtheta| of the block's attention / MLP parameters; stream: |dL/dx| of the residual "
        "stream entering the block",
        "",
        "| block | " + " | ".join(f"{key} ({_state_name(s)})" for s, key in columns) + " |",
        "|---:|" + "---:|" * len(columns),
    ]
    for i in range(m["n_layer"]):
        lines.append(f"| {i} | " + " | ".join(_e(s["blocks"][i][k]) for s, k in columns) + " |")
    lines.append("")
    for s in states:
        verdicts = "; ".join(f"{key} {text}" for key, text in s["verdicts"].items())
        lines.append(
            f"{_state_name(s)} (loss {s['loss']:.3f}; |g| total {s['total']:.3g}, embed {_e(s['embed'])}, "
            f"head {_e(s['head'])}): {verdicts}"
        )
    return "\n".join(lines)


def write_png(result: dict[str, Any], path: Path) -> None:
    """Gradient norm against depth, log scale: parameters' gradients (left), the gradient
    reaching each layer's / block's input (right)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    if result["study"] == "toy":
        for case in result["cases"]:
            layers = range(1, len(case["weight_grad"]) + 1)
            label = f"{case['case']}: {case['init']}"
            left.plot(layers, case["weight_grad"], marker="o", markersize=3, label=label)
            right.plot(layers, case["input_grad"], marker="o", markersize=3, label=label)
        left.set(xlabel="layer (1 = input side)", ylabel="|dL/dW_l|", title="weight gradient")
        right.set(xlabel="layer (1 = input side)", ylabel="|dL/dh_(l-1)|", title="gradient reaching the layer")
        fig.suptitle(f"Gradient flow in {result['setup']['depth']}-layer networks (exercise 4)")
    else:
        for s, style in zip(result["states"], ("-", "--"), strict=False):  # init solid, the checkpoint dashed
            blocks = [row["block"] for row in s["blocks"]]
            for key, color in (("attn", "C0"), ("mlp", "C1")):
                values = [row[key] for row in s["blocks"]]
                left.plot(
                    blocks, values, style, color=color, marker="o", markersize=3, label=f"{key} ({_state_name(s)})"
                )
            stream = [row["stream"] for row in s["blocks"]]
            right.plot(blocks, stream, style, color="C2", marker="o", markersize=3, label=_state_name(s))
        left.set(xlabel="block", ylabel="|dL/dtheta|", title="attn and mlp parameters")
        right.set(xlabel="block", ylabel="|dL/dx|", title="residual stream entering the block")
        fig.suptitle(f"Gradient flow in {result['model']['name']} ({result['model']['n_layer']} blocks)")
    for ax in (left, right):
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="major", alpha=0.3)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def write_json(result: dict[str, Any], path: Path) -> None:
    """The result as JSON; non-finite numbers (an overflow) as the strings "inf", "-inf", "nan"."""
    path.write_text(json.dumps(_finite(result), indent=1, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
