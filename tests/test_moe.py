"""trainer.model.moe: the sparse MLP equals a per-token reference and transformers' Mixtral and
Qwen3-MoE blocks (outputs and gradients), its load-balancing loss equals transformers', its load
statistics are what hand-computed routings give, it makes no token x expert tensor, and expert
parallelism on 2 real gloo ranks equals one process. Differences are moe_worker.relative_difference:
max |a - b| / max(1, max |b|), gradients here reaching ~20."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import torchrun
from moe_worker import relative_difference
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import MixtralConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from trainer.config import ModelConfig
from trainer.model.moe import SparseMLP, expert_load, grouped_mm_supported, load_balancing_loss, load_max

REPO = Path(__file__).resolve().parent.parent
H, I, E = 16, 24, 8  # noqa: E741  hidden, expert width, experts
WEIGHTS = ("router.weight", "w_gate", "w_up", "w_down")


def moe_config(**overrides) -> ModelConfig:
    fields = dict(n_embd=H, n_head=2, n_experts=E, n_experts_per_token=2, moe_intermediate_size=I, mlp="swiglu")
    return ModelConfig(**{**fields, "bias": False, "moe_impl": "loop", **overrides})


def random_moe(cfg: ModelConfig, seed: int = 0) -> SparseMLP:
    """A SparseMLP with N(0, 0.25) weights: decisive routing, outputs of order one."""
    torch.manual_seed(seed)
    moe = SparseMLP(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.25)
    return moe


def reference(moe: SparseMLP, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Token by token: softmax over all experts, the top k, renormalised if asked, and the weighted
    sum of those experts' down(act(gate x) * up x)."""
    act = F.silu if cfg.mlp == "swiglu" else (lambda v: F.gelu(v, approximate="tanh"))
    rows = []
    for token in x.reshape(-1, x.shape[-1]):
        probs = torch.softmax(moe.router.weight @ token, dim=-1)
        top = torch.topk(probs, cfg.n_experts_per_token)
        weights = top.values / top.values.sum() if cfg.moe_norm_topk else top.values
        out = torch.zeros_like(token)
        for weight, e in zip(weights, top.indices.tolist(), strict=True):
            out = out + weight * (moe.w_down[e] @ (act(moe.w_gate[e] @ token) * (moe.w_up[e] @ token)))
        rows.append(out)
    return torch.stack(rows).view_as(x)


def output_and_grads(module: torch.nn.Module, x: torch.Tensor, names, upstream: torch.Tensor, forward=None):
    """The output, and the gradients of (output * upstream).sum() for x and the named parameters."""
    x = x.clone().requires_grad_()
    y = (forward or module)(x)
    params = dict(module.named_parameters())
    grads = torch.autograd.grad((y * upstream).sum(), [x, *(params[n] for n in names)])
    return y.detach(), grads


def test_parameters_are_named_and_shaped_for_import_and_build_on_meta() -> None:
    with torch.device("meta"):
        moe = SparseMLP(moe_config(moe_intermediate_size=None, intermediate_size=40))
    shapes = {name: tuple(p.shape) for name, p in moe.named_parameters()}
    assert shapes == {"router.weight": (E, H), "w_gate": (E, 40, H), "w_up": (E, 40, H), "w_down": (E, H, 40)}
    assert all(p.device.type == "meta" for p in moe.parameters())


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_experts_per_token": 1, "moe_norm_topk": False}, {"n_experts_per_token": 3, "mlp": "geglu"}],
    ids=["top2-swiglu", "top1-unnormalised", "top3-geglu"],
)
def test_loop_equals_a_per_token_reference(overrides: dict) -> None:
    cfg = moe_config(**overrides)
    moe = random_moe(cfg)
    x, upstream = torch.randn(3, 7, H), torch.randn(3, 7, H)
    y, grads = output_and_grads(moe, x, WEIGHTS, upstream)
    logits, topk = moe.router_logits, moe.last_topk
    want_y, want_grads = output_and_grads(moe, x, WEIGHTS, upstream, lambda x: reference(moe, x, cfg))
    assert relative_difference(y, want_y) < 1e-6
    for name, got, want in zip(("x", *WEIGHTS), grads, want_grads, strict=True):
        assert relative_difference(got, want) < 1e-6, name
    assert logits.dtype == torch.float32 and logits.requires_grad
    assert relative_difference(logits.detach(), x.view(-1, H) @ moe.router.weight.detach().T) < 1e-6
    want_topk = torch.topk(torch.softmax(logits.detach(), dim=-1), cfg.n_experts_per_token).indices
    assert torch.equal(topk, want_topk) and not topk.requires_grad


def test_auto_is_the_loop_on_a_cpu_and_grouped_is_refused_there() -> None:
    x = torch.randn(2, 5, H)
    loop = random_moe(moe_config(moe_impl="loop"))(x)
    assert not grouped_mm_supported(x)
    assert torch.equal(random_moe(moe_config(moe_impl="auto"))(x), loop)
    with pytest.raises(ValueError, match=r"model.moe_impl=grouped needs .* not cpu torch.float32: use model.moe_impl"):
        random_moe(moe_config(moe_impl="grouped"))(x)


def test_under_autocast_the_output_keeps_the_input_dtype() -> None:
    moe, x = random_moe(moe_config(moe_impl="auto")), torch.randn(2, 5, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.float32 and moe.router_logits.dtype == torch.float32
    assert relative_difference(y, moe(x)) < 5e-2  # bf16 matmuls


def test_grouped_layout_equals_the_loop_in_a_cpu_forward() -> None:
    """torch._grouped_mm runs forward on a CPU (its backward there fails on stride checks, hence the
    refusal above): enough to check the grouped path's weight transposes and offsets, expert 2 idle."""
    moe = random_moe(moe_config())
    xs = torch.randn(11, H)
    ends = torch.tensor([3, 4, 4, 8, 8, 9, 10, 11], dtype=torch.int32)
    with torch.no_grad():
        assert relative_difference(moe.experts_grouped(xs, ends), moe.experts_loop(xs, ends)) < 1e-6


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10), reason="needs sm90 / sm100"
)
def test_grouped_equals_the_loop_on_a_gpu_in_bf16() -> None:
    moe = random_moe(moe_config(moe_impl="auto")).cuda().bfloat16()
    x, upstream = torch.randn(4, 32, H, device="cuda", dtype=torch.bfloat16), torch.randn(4, 32, H, device="cuda")
    assert grouped_mm_supported(x)
    y, grads = output_and_grads(moe, x, WEIGHTS, upstream.bfloat16())
    moe.impl = "loop"
    want_y, want_grads = output_and_grads(moe, x, WEIGHTS, upstream.bfloat16())
    for got, want in zip((y, *grads), (want_y, *want_grads), strict=True):
        assert relative_difference(got.float(), want.float()) < 2e-2


# ---------------------------------------------------------------------------------------------
# Parity with transformers


def hf_block(kind: str, norm_topk: bool):
    """A tiny fp32 MixtralSparseMoeBlock or Qwen3MoeSparseMoeBlock with random weights."""
    if kind == "mixtral":
        config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
        block_class = MixtralSparseMoeBlock
    else:
        config = Qwen3MoeConfig(
            hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2, norm_topk_prob=norm_topk
        )
        block_class = Qwen3MoeSparseMoeBlock
    config._experts_implementation = "eager"  # the per-expert loop the modeling file writes out
    torch.manual_seed(1)
    block = block_class(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, 0.0, 0.25)
    return block


@pytest.mark.parametrize(
    "kind, norm_topk",
    [("mixtral", True), ("qwen3_moe", True), ("qwen3_moe", False)],
    ids=["mixtral", "qwen3", "qwen3-unnormalised"],
)
def test_equals_transformers_sparse_moe_block(kind: str, norm_topk: bool) -> None:
    block = hf_block(kind, norm_topk)
    moe = SparseMLP(moe_config(moe_norm_topk=norm_topk))
    with torch.no_grad():  # experts.gate_up_proj (E, 2I, H) = [gate | up] along dim 1
        moe.router.weight.copy_(block.gate.weight)
        moe.w_gate.copy_(block.experts.gate_up_proj[:, :I])
        moe.w_up.copy_(block.experts.gate_up_proj[:, I:])
        moe.w_down.copy_(block.experts.down_proj)
    x, upstream = torch.randn(2, 9, H), torch.randn(2, 9, H)
    y, (gx, g_router, g_gate, g_up, g_down) = output_and_grads(moe, x, WEIGHTS, upstream)
    hf_names = ("gate.weight", "experts.gate_up_proj", "experts.down_proj")
    want_y, (want_gx, want_router, want_gate_up, want_down) = output_and_grads(block, x, hf_names, upstream)
    assert relative_difference(y, want_y) < 1e-5
    assert relative_difference(gx, want_gx) < 1e-5
    assert relative_difference(g_router, want_router) < 1e-5
    assert relative_difference(torch.cat([g_gate, g_up], dim=1), want_gate_up) < 1e-5
    assert relative_difference(g_down, want_down) < 1e-5


def test_load_balancing_loss_equals_transformers() -> None:
    torch.manual_seed(2)
    logits = [(2 * torch.randn(12, E)).requires_grad_() for _ in range(3)]  # 3 layers' router logits
    loss = load_balancing_loss(logits, E, 2)
    want = load_balancing_loss_func(tuple(logits), E, 2)
    assert abs(loss.item() - want.item()) < 1e-6 and 1.0 < want.item() < 4.0  # k = 2 when balanced
    grads = torch.autograd.grad(loss, logits)
    want_grads = torch.autograd.grad(want, logits)
    for got, expected in zip(grads, want_grads, strict=True):
        assert relative_difference(got, expected) < 1e-7 and expected.abs().max() > 1e-3


def test_load_balancing_loss_of_a_model_s_router_logits() -> None:
    """The module's kept logits feed the loss and carry its gradient to the router."""
    moe = random_moe(moe_config())
    moe(torch.randn(2, 5, H))
    loss = load_balancing_loss([moe.router_logits], E, 2)
    assert abs(loss.item() - load_balancing_loss_func((moe.router_logits,), E, 2).item()) < 1e-6
    (grad,) = torch.autograd.grad(loss, moe.router.weight)
    assert grad.abs().max() > 0


def test_expert_load_and_load_max_of_hand_computed_routings() -> None:
    skewed = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3]])  # 8 slots: expert 0 has 4, 1 has 2, 2 and 3 one each
    assert expert_load(skewed, 4).tolist() == [0.5, 0.25, 0.125, 0.125]
    assert load_max(skewed, 4) == 2.0  # 0.5 over the mean share 0.25
    balanced = torch.tensor([[0, 1], [2, 3], [3, 2], [1, 0]])
    assert expert_load(balanced, 4).tolist() == [0.25] * 4 and load_max(balanced, 4) == 1.0
    collapsed = torch.tensor([[2, 5]] * 6)  # every token to the same 2 of 8 experts
    assert expert_load(collapsed, 8).tolist() == [0, 0, 0.5, 0, 0, 0.5, 0, 0] and load_max(collapsed, 8) == 4.0


class TensorSizes(TorchDispatchMode):
    """Records (op, numel) of every tensor any op returns, in forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [(str(func), t.numel()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_memory_is_linear_in_tokens_and_each_weight_gradient_is_made_once() -> None:
    """Forward and backward make no (N, E, H) or (N, E, I) tensor: the largest is an expert weight's
    gradient (E, I, H), made once per weight (indexing w[e] per expert would make E of them, each
    zeros but one expert's rows), and the slot tensors (N k, H) are seen on the way."""
    moe = random_moe(moe_config())
    x = torch.randn(4, 16, H, requires_grad=True)
    N, k = 64, 2
    with TensorSizes() as sizes:
        moe(x).square().sum().backward()
    largest = max(numel for _, numel in sizes.made)
    assert N * k * H <= largest == E * I * H < N * E * min(H, I)
    full_size = [op for op, numel in sizes.made if numel == E * I * H and "detach" not in op]
    assert len(full_size) == 3, full_size  # one stack per expert weight


def test_expert_parallel_on_two_gloo_ranks_equals_one_process(tmp_path: Path) -> None:
    """Each rank routes its own batch; the sharded forward and backward must equal one process on
    both ranks' batches concatenated, with loss sum_r (Y_r * G_r).sum():
    - outputs and input gradients: rank r's rows of the single-process ones (tokens do not
      interact: dropless routing, no capacity);
    - router: replicated, each rank's gradient is its own tokens' part, so their sum (all_reduce)
      equals the single-process gradient;
    - experts: the backward all-to-all brings every rank's tokens' gradients to the owner, so rank
      r's shard gradient is already whole: the single-process gradient's rows [r E/2, (r+1) E/2).
    Differences are relative to max(1, the reference's largest entry); the router's sum over ranks
    is added in another order, the rest run the same matmuls on the same rows in the same order.
    Cases: top-2, top-1 GEGLU, top-3 of 4 experts, and rank 1 receiving no token at all."""
    result = torchrun(str(REPO / "tests" / "moe_worker.py"), str(tmp_path), cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, cases in enumerate(ranks):
        assert cases.pop("refusal") == "expert parallelism: 3 experts do not split evenly over 2 ranks"
        assert cases.keys() == {"top2", "top1-geglu", "top3-4-experts", "rank-1-idle"}
        for name, diffs in cases.items():
            slots = diffs.pop("local_slots")
            assert slots == 0 if (name, rank) == ("rank-1-idle", 1) else slots > 0, (name, rank)
            assert diffs.keys() == {"y", "x_grad", "router_grad", "w_gate", "w_up", "w_down"}
            assert max(diffs.values()) < 1e-6, (name, rank, diffs)
