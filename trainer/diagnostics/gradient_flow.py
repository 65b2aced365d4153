"""Gradient norm against depth: the lesson's exercise 4 (toy networks), or any configured GPT.

    python -m trainer.diagnose gradient-flow                      # exercise 4: the toy study
    python -m trainer.diagnose gradient-flow model=gpt2 model.n_layer=48   # a GPT at initialisation
    python -m trainer.diagnose gradient-flow --run RUN_DIR        # a run's GPT: at init and at its checkpoint

The toy study (seed Exercise 4): 20 square layers of width 64 without biases, h_l = f(W_l h_{l-1})
(residual: h_l = h_{l-1} + f(W_l h_{l-1})), 128 inputs x ~ N(0, 1), loss = mean over the batch of
0.5 |h_20 - y|^2 with targets y ~ N(0, 1), float64, seed 0. The cases (CASES) and their inits:
  sigmoid            W ~ U(-1/sqrt(n), 1/sqrt(n)), PyTorch's nn.Linear default (std 1/sqrt(3n))
  relu               He (Kaiming) normal N(0, 2/n), the standard init for ReLU: with the default
                     init every gradient is ~1e-7 (the signal shrinks both ways), with N(0, 1) ~1e31
                     (inf in float32)
  sigmoid_xavier     Xavier (Glorot) normal N(0, 2/(n_in + n_out)) = N(0, 1/n)
  sigmoid_xavier_x4  the same x 4, the gain that undoes sigmoid'(0) = 1/4 near 0 (Glorot & Bengio's
                     linear-regime argument; the Theano tutorials' "4 x" bound for sigmoid)
  sigmoid_residual   the sigmoid network's init, with skip connections
  tanh_xavier        reference: Xavier on the activation its derivation assumes (f'(0) = 1)
Per layer l (layer 1 takes the input) it reports |dL/dW_l| (Frobenius: what the optimizer gets)
and |dL/dh_{l-1}| (the gradient reaching the layer's input: the product of Jacobians that the
vanishing-gradient analysis is about); the verdict reads the second's ratio layer 1 / layer 20.
Near sigmoid's linear region each layer scales that gradient by about sqrt(n) std sigma'(0) =
std sqrt(n) / 4: 1 / (4 sqrt 3) = 0.14 with the default init, 1/4 with Xavier, whose derivation
assumes f'(0) = 1, so Xavier alone does not rescue a deep sigmoid network. Gain 4 restores a
factor ~1 at 0, but its wider pre-activations (std ~ 2) leave the linear region: sigmoid' averages
well under 1/4 there, and the network still vanishes, by fewer orders. In the residual network
the gradient is carried whole, but |dL/dW_l| = |d_l h_{l-1}^T| also grows with the layer's input,
and the stream grows (each layer adds sigma(.) ~ 0.5 to every unit).

For a GPT (Hydra overrides composed as `python -m trainer` composes them, or --run RUN_DIR: the
newest verified checkpoint and the run's own seed for the init): one forward and backward of the
mean token loss on one batch (random tokens, or --data: the config's validation split), the
gradient norm of each block's attn and mlp parameters and of the residual stream at each block's
input. Writes a PNG (--png) and, with --out, JSON; prints one markdown table and a verdict a state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from trainer.model.gpt import GPT, param_group
from trainer.model.loss import IGNORE_INDEX


@dataclass(frozen=True)
class ToyCase:
    """One network of the toy study: activation, init of every weight, skip connections."""

    name: str
    activation: str  # sigmoid | relu | tanh
    init: str  # default | he | xavier | xavier_x4 (see INITS)
    residual: bool = False


CASES = (
    ToyCase("sigmoid", "sigmoid", "default"),
    ToyCase("relu", "relu", "he"),
    ToyCase("sigmoid_xavier", "sigmoid", "xavier"),
    ToyCase("sigmoid_xavier_x4", "sigmoid", "xavier_x4"),
    ToyCase("sigmoid_residual", "sigmoid", "default", residual=True),
    ToyCase("tanh_xavier", "tanh", "xavier"),
)
# The init of a (n_out, n_in) weight, in words (the table prints these).
INITS = {
    "default": "U(-1/sqrt(n), 1/sqrt(n)) (PyTorch default)",
    "he": "He normal N(0, 2/n)",
    "xavier": "Xavier normal N(0, 2/(n_in+n_out))",
    "xavier_x4": "4 x Xavier normal (sigmoid's gain)",
}
ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}
SHOWN_LAYERS = (1, 5, 10, 20)  # the exercise's layers
ORDER_OF_MAGNITUDE = 10.0  # a first/last ratio beyond this factor either way: vanishing / exploding


def toy_weights(case: ToyCase, width: int = 64, depth: int = 20, seed: int = 0) -> list[torch.Tensor]:
    """The case's `depth` weights, each (width, width) float64, drawn from torch.Generator(seed)."""
    generator = torch.Generator().manual_seed(seed)
    weights = []
    for _ in range(depth):
        if case.init == "default":  # nn.Linear's kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(width)
            w = (torch.rand(width, width, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        else:
            std = math.sqrt(2.0 / width) if case.init == "he" else math.sqrt(2.0 / (width + width))
            std *= 4.0 if case.init == "xavier_x4" else 1.0
            w = torch.randn(width, width, generator=generator, dtype=torch.float64) * std
        weights.append(w)
    return weights


def toy_batch(width: int = 64, batch: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y, both (batch, width) float64 ~ N(0, 1), from their own generator."""
    generator = torch.Generator().manual_seed(seed + 1)  # not the weights' stream
    x = torch.randn(batch, width, generator=generator, dtype=torch.float64)
    return x, torch.randn(batch, width, generator=generator, dtype=torch.float64)


def toy_loss(
    case: ToyCase, weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss and the input of every layer, [h_0 = x, ..., h_{L-1}], each (batch, width)."""
    f = ACTIVATIONS[case.activation]
    h, inputs = x, []
    for w in weights:
        inputs.append(h)
        out = f(h @ w.T)  # (batch, width)
        h = h + out if case.residual else out
    return 0.5 * (h - y).pow(2).sum(dim=1).mean(), inputs


def toy_gradient_flow(case: ToyCase, width: int = 64, depth: int = 20, batch: int = 128, seed: int = 0) -> dict:
    """Per-layer |dL/dW_l| and |dL/dh_{l-1}| (index l-1 holds layer l), their layer-1 / layer-L
    ratios and the verdict, for one case of the toy study."""
    weights = [w.requires_grad_() for w in toy_weights(case, width, depth, seed)]
    x, y = toy_batch(width, batch, seed)
    x.requires_grad_()
    loss, inputs = toy_loss(case, weights, x, y)
    grads = torch.autograd.grad(loss, [*weights, *inputs])
    weight_grad = [g.norm().item() for g in grads[:depth]]
    input_grad = [g.norm().item() for g in grads[depth:]]
    ratio_weight, ratio_input = _ratio(weight_grad[0], weight_grad[-1]), _ratio(input_grad[0], input_grad[-1])
    return {
        "case": case.name, "activation": case.activation, "init": INITS[case.init], "residual": case.residual,
        "loss": loss.item(), "weight_grad": weight_grad, "input_grad": input_grad,
        "ratio_weight": ratio_weight, "ratio_input": ratio_input,
        "verdict": verdict(ratio_input, f"|dL/dh| layer 1 / layer {depth}", depth - 1),
    }  # fmt: skip


def toy_study(width: int = 64, depth: int = 20, batch: int = 128, seed: int = 0) -> dict:
    """Every case of CASES on the same setup, with the setup."""
    setup = {"width": width, "depth": depth, "batch": batch, "seed": seed, "dtype": "float64"}
    return {"study": "toy", "setup": setup, "cases": [toy_gradient_flow(c, width, depth, batch, seed) for c in CASES]}


def _ratio(first: float, last: float) -> float:
    return first / last if last > 0 and math.isfinite(first) and math.isfinite(last) else math.nan


def verdict(ratio: float, what: str, steps: int) -> str:
    """One phrase for a first/last gradient-norm ratio over `steps` layers: vanishes, explodes or
    flows, with the mean factor a layer (the geometric mean of the per-layer gains)."""
    if not math.isfinite(ratio) or ratio <= 0:
        return f"non-finite or zero gradients ({what} = {ratio}): an overflow, or nothing reaches the last layer"
    orders = abs(math.log10(ratio))
    per_layer = f", a geometric mean of x{ratio ** (1 / steps):.2g} a layer" if steps > 0 else ""
    if ratio < 1 / ORDER_OF_MAGNITUDE:
        return f"vanishes: {what} = {ratio:.1e} ({orders:.1f} orders of magnitude{per_layer})"
    if ratio > ORDER_OF_MAGNITUDE:
        return f"explodes: {what} = {ratio:.1e} ({orders:.1f} orders of magnitude{per_layer})"
    return f"flows: {what} = {ratio:.2g} (within an order of magnitude)"


# -- a GPT ----------------------------------------------------------------------------------------


def model_gradient_flow(
    model: GPT, x: torch.Tensor, y: torch.Tensor, positions: torch.Tensor | None = None
) -> dict[str, Any]:
    """One forward and backward of the mean token loss of model on x, y (B, T): the gradient norm
    of each block's attn, mlp and norm parameters (param_group's groups), of embed and head, and
    `stream`: |dL/dx| of the residual stream x (B, T, C) entering each block. Runs in eval mode
    (no dropout); leaves the model's .grad cleared."""
    model.eval()
    model.zero_grad(set_to_none=True)
    stream: list[torch.Tensor] = []

    def keep_input(module: torch.nn.Module, args: tuple) -> None:
        args[0].retain_grad()  # a non-leaf tensor: its .grad is kept only when asked
        stream.append(args[0])

    handles = [block.register_forward_pre_hook(keep_input) for block in model.blocks]
    try:
        total = model(x, targets=y, **({"positions": positions} if positions is not None else {}))
        count = int((y != IGNORE_INDEX).sum())  # host sync
        loss = total / max(count, 1)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    sumsq: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            group = param_group(name)
            sumsq[group] = sumsq.get(group, 0.0) + p.grad.double().pow(2).sum().item()  # host sync
    model.zero_grad(set_to_none=True)
    norm = lambda group: math.sqrt(sumsq[group]) if group in sumsq else None  # noqa: E731
    blocks = [
        {"block": i, "attn": norm(f"block.{i}.attn"), "mlp": norm(f"block.{i}.mlp"),
         "norm": norm(f"block.{i}.norm"), "stream": s.grad.norm().item()}
        for i, s in enumerate(stream)
    ]  # fmt: skip
    result = {"loss": loss.item(), "embed": norm("embed"), "head": norm("head"), "blocks": blocks}
    result["total"] = math.sqrt(sum(sumsq.values()))
    result["verdicts"] = model_verdicts(blocks)
    return result


def model_verdicts(blocks: list[dict]) -> dict[str, str]:
    """attn, mlp and stream: a verdict each on the first block's norm over the last one's."""
    last = len(blocks) - 1
    out = {}
    for key in ("attn", "mlp", "stream"):
        first, end = blocks[0][key], blocks[-1][key]
        if first is not None and end is not None:
            out[key] = verdict(_ratio(first, end), f"block 0 / block {last}", last)
    return out
