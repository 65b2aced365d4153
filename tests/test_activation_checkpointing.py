"""Activation checkpointing changes memory and time, never the numbers or the names.

In fp32 and with dropout on, every mode gives the loss and every gradient of the model without
checkpointing (checkpoint restores the RNG state for the recompute), really recomputes the
modules it should (forward pre-hooks count the runs), keeps fewer tensors for backward, and
leaves parameter names and state-dict keys as they were. Under torchrun, every strategy (DDP,
FSDP2, ZeRO-1/2/3) takes the same clipped step with and without it (tests/ac_worker.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import ac_worker
import pytest
import torch

from trainer.config import ConfigError, ModelConfig
from trainer.model import GPT, param_group
from trainer.model.checkpointing import (
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpointed_blocks,
)
from trainer.model.gpt import bare_name

REPO = Path(__file__).resolve().parent.parent
GPT2 = ModelConfig(vocab_size=64, block_size=32, n_layer=4, n_head=2, n_embd=32, dropout=0.1)
LLAMA = dataclasses.replace(
    GPT2,
    norm="rmsnorm",
    mlp="swiglu",
    position="rope",
    n_kv_head=1,
    bias=False,
    tie_embeddings=False,
)
# (mode, every k, modules wrapped in a 4-block model)
CASES = [
    ("full", 1, 4),
    ("full", 2, 2),
    ("full", 3, 2),
    ("attention", 1, 4),
    ("mlp", 1, 4),
    ("mlp", 2, 2),
]


def with_ac(cfg: ModelConfig, mode: str, every: int = 1) -> ModelConfig:
    return dataclasses.replace(cfg, activation_checkpointing=mode, activation_checkpointing_every=every)


def expected_forwards(cfg: ModelConfig, micro_batches: int) -> dict[str, int]:
    """Runs of each block's attention / MLP: once per micro-batch, twice where recomputed."""
    parts = {"full": ("attn", "mlp"), "attention": ("attn",), "mlp": ("mlp",)}.get(cfg.activation_checkpointing, ())
    recomputed = set(checkpointed_blocks(cfg))
    return {
        f"{i}.{part}": micro_batches * (2 if i in recomputed and part in parts else 1)
        for i in range(cfg.n_layer)
        for part in ("attn", "mlp")
    }


def count_forwards(model: GPT) -> dict[str, int]:
    """Pre-hooks (before wrapping) on every attention and MLP; a recompute stops early, once the
    last saved tensor is rebuilt, so post-hooks would miss it."""
    counts = {f"{i}.{part}": 0 for i in range(len(model.blocks)) for part in ("attn", "mlp")}
    for name in counts:
        i, part = name.split(".")
        model.blocks[int(i)].get_submodule(part).register_forward_pre_hook(
            lambda *_, name=name: counts.__setitem__(name, counts[name] + 1)
        )
    return counts


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (3, 24), generator=g), torch.randint(0, 64, (3, 24), generator=g)


def loss_and_grads(cfg: ModelConfig) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg)
    forwards = count_forwards(model)
    wrapped = apply_activation_checkpointing(model, cfg)
    x, y = batch()
    torch.manual_seed(2)  # the dropout masks
    loss = model(x, targets=y)
    loss.backward()
    grads = {bare_name(n): p.grad for n, p in model.named_parameters()}
    return {
        "loss": loss.detach(),
        "grads": grads,
        "wrapped": wrapped,
        "forwards": forwards,
        "model": model,
    }


@pytest.mark.parametrize("layout", [GPT2, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize(("mode", "every", "wrapped"), CASES, ids=[f"{m}-k{k}" for m, k, _ in CASES])
def test_same_loss_and_gradients_with_dropout(layout: ModelConfig, mode: str, every: int, wrapped: int) -> None:
    want = loss_and_grads(layout)
    got = loss_and_grads(with_ac(layout, mode, every))
    assert want["wrapped"] == 0 and got["wrapped"] == wrapped
    assert got["forwards"] == expected_forwards(with_ac(layout, mode, every), micro_batches=1)
    # Bitwise equal in practice (same kernels, same RNG state); a tight tolerance all the same.
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=1e-7)
    assert list(got["grads"]) == list(want["grads"])
    for name, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-6, atol=1e-8, msg=name)


def test_dropout_is_really_on_in_the_parity_test() -> None:
    """Otherwise the RNG replay during recompute would go untested."""
    model, (x, y) = GPT(GPT2), batch()
    with torch.no_grad():
        torch.manual_seed(2)
        train_loss = model(x, targets=y)
        model.eval()
        assert not torch.equal(model(x, targets=y), train_loss)


def saved_for_backward_bytes(model: GPT) -> int:
    """Bytes of the distinct tensors autograd keeps (outside checkpoints) after one forward."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            kept[s.data_ptr()] = s.nbytes()
        return t

    x, y = batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, targets=y)
    return sum(kept.values())


def test_checkpointing_keeps_fewer_tensors_for_backward() -> None:
    kept = {}
    for mode, every in [("none", 1), ("full", 1), ("full", 2), ("attention", 1), ("mlp", 1)]:
        cfg = with_ac(GPT2, mode, every)
        torch.manual_seed(0)
        model = GPT(cfg)
        apply_activation_checkpointing(model, cfg)
        kept[(mode, every)] = saved_for_backward_bytes(model)
    none = kept[("none", 1)]
    assert kept[("full", 1)] < kept[("full", 2)] < none
    assert kept[("full", 1)] < 0.3 * none  # only block inputs, embeddings and the head remain
    assert kept[("attention", 1)] < none and kept[("mlp", 1)] < none


@pytest.mark.parametrize(("mode", "every"), [("full", 1), ("full", 3), ("attention", 2), ("mlp", 1)])
def test_names_and_state_dict_keys_are_unchanged_and_interchangeable(mode: str, every: int) -> None:
    cfg = with_ac(GPT2, mode, every)
    torch.manual_seed(0)
    plain = GPT(GPT2)
    torch.manual_seed(1)  # different weights, so loading is visible
    wrapped = GPT(cfg)
    apply_activation_checkpointing(wrapped, cfg)
    assert any(isinstance(m, CheckpointWrapper) for m in wrapped.modules())
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # same keys, same order
    names = [n for n, _ in wrapped.named_parameters()]
    assert [bare_name(n) for n in names] == [n for n, _ in plain.named_parameters()]
    assert [param_group(n) for n in names] == [param_group(n) for n, _ in plain.named_parameters()]
    # Checkpoints load across: plain -> wrapped, and wrapped -> plain, both strict.
    wrapped.load_state_dict(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(wrapped.state_dict()[key], value), key
    plain.load_state_dict(wrapped.state_dict())


def test_applying_twice_wraps_nothing_more() -> None:
    cfg = with_ac(GPT2, "full", 2)
    model = GPT(cfg)
    assert apply_activation_checkpointing(model, cfg) == 2
    assert apply_activation_checkpointing(model, cfg) == 0
    assert sum(isinstance(m, CheckpointWrapper) for m in model.modules()) == 2
    assert apply_activation_checkpointing(GPT(GPT2), GPT2) == 0  # mode none


def test_no_grad_runs_once_and_matches_the_plain_model() -> None:
    cfg = with_ac(GPT2, "full")
    torch.manual_seed(0)
    plain = GPT(GPT2).eval()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    forwards = count_forwards(model)
    apply_activation_checkpointing(model, cfg)
    prompt = batch()[0][:1, :4]
    with torch.no_grad():
        torch.testing.assert_close(model(prompt), plain(prompt), rtol=0, atol=0)
    assert set(forwards.values()) == {1}
    assert torch.equal(model.generate(prompt, 5, temperature=0), plain.generate(prompt, 5, temperature=0))


def test_a_training_run_is_the_same_with_checkpointing(tmp_path: Path) -> None:
    """Through the loop's own build: same losses, grad norms and final checkpoint."""
    from safetensors.torch import load_file

    from trainer import loop
    from trainer.__main__ import compose_config

    wrapped = []

    class CountWrapped:  # a loop callback: what the run trains, after its first step
        def on_step_end(self, run, result, metrics) -> None:
            if run.state.step == 1:
                wrapped.append(sum(isinstance(m, CheckpointWrapper) for m in run.strategy.unwrapped().modules()))

    runs = {}
    for mode in ("none", "full"):
        cfg, _ = compose_config([
            "experiment=synthetic", "logger.wandb=false", "logger.progress_bar=false",
            f"data.cache_dir={tmp_path / 'cache'}", "model.n_layer=3", "model.n_embd=32", "model.dropout=0.1",
            f"model.activation_checkpointing={mode}", "model.activation_checkpointing_every=2",
            "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.seq_len=32", "train.max_steps=3",
            "train.log_interval=1", "train.sample_tokens=0",
        ])  # fmt: skip
        loop.train(cfg, tmp_path / mode, callbacks=(CountWrapped(),))
        metrics = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        runs[mode] = [json.loads(line) for line in metrics]
    assert wrapped == [0, 2]  # blocks 0 and 2 of 3
    assert [r["step"] for r in runs["full"]] == [1, 2, 3]
    for got, want in zip(runs["full"], runs["none"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6)
    weights = {mode: load_file(str(tmp_path / mode / "checkpoints" / "final" / "model.safetensors")) for mode in runs}
    assert list(weights["full"]) == list(weights["none"])
    for name, tensor in weights["none"].items():
        torch.testing.assert_close(weights["full"][name], tensor, rtol=1e-6, atol=1e-7, msg=name)


# -- bad input: one line, naming the override ---------------------------------------------------


def test_interval_larger_than_the_depth_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.activation_checkpointing_every=5 .*model\.n_layer=4"):
        with_ac(GPT2, "full", 5)
    with pytest.raises(ConfigError, match=r"model\.activation_checkpointing_every=0 "):
        with_ac(GPT2, "full", 0)
    with pytest.raises(ConfigError, match=r"model\.activation_checkpointing='sometimes': use none, full"):
        with_ac(GPT2, "sometimes")


def test_interval_larger_than_the_depth_is_refused_on_the_command_line() -> None:
    from trainer.__main__ import preflight

    with pytest.raises(ConfigError) as info:
        preflight(["model.activation_checkpointing=full", "model.activation_checkpointing_every=99"])
    message = str(info.value)
    assert message.startswith("model.activation_checkpointing_every=99 must be between 1 and the depth")
    assert "\n" not in message


# -- every strategy on two real CPU ranks -------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank_steps(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ac") / "results.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "tests" / "ac_worker.py"), str(out), *ac_worker.MODES,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out, weights_only=True)


RUNS = [f"{strategy}/{mode}" for strategy, modes in ac_worker.MODES.items() for mode in modes]


@pytest.mark.heavy
@pytest.mark.parametrize("run", RUNS)
def test_every_strategy_takes_the_same_step_with_checkpointing(run: str, two_rank_steps: dict) -> None:
    strategy, mode = run.split("/")
    got, want = two_rank_steps[run], two_rank_steps[f"{strategy}/none"]
    cfg = ac_worker.config(strategy, mode).model
    assert got["wrapped"] == len(checkpointed_blocks(cfg)) > 0
    assert got["forwards"] == expected_forwards(cfg, micro_batches=ac_worker.ACCUM)  # recomputed here
    assert want["forwards"] == expected_forwards(ac_worker.config(strategy, "none").model, ac_worker.ACCUM)
    assert want["norm"] > ac_worker.CLIP  # the step was clipped, so the norm steers the update
    assert got["norm"] == pytest.approx(want["norm"], rel=1e-6)
    assert got["sums"].keys() == want["sums"].keys()
    for group, value in want["sums"].items():
        assert got["sums"][group] == pytest.approx(value, rel=1e-6), group
    assert list(got["weights"]) == list(want["weights"])  # the strategy's full state dict: same keys
    for name, tensor in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, rtol=1e-6, atol=1e-7, msg=name)


# -- the benchmark runs and its memory figures are sane ----------------------------------------------


@pytest.mark.heavy
def test_benchmark_writes_its_table_and_json(tmp_path: Path) -> None:
    from benchmarks import checkpointing as bench

    out = tmp_path / "ac.json"
    bench.main(["--n-layer", "3", "--n-embd", "32", "--seq-len", "32", "--batch", "2", "--repeats", "1",
                "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    rows = {(r["mode"], r["k"]): r for r in result["rows"]}
    assert set(rows) == {("none", 1), ("full", 1), ("full", 2), ("full", 3), ("attention", 1), ("mlp", 1),
                         ("segment", 2), ("segment", 3)}  # fmt: skip
    mb = {key: r["peak_activation_mb"] for key, r in rows.items()}
    assert mb[("full", 1)] < mb[("full", 2)] < mb[("none", 1)]  # allocator-level peaks, deterministic
    assert rows[("full", 3)]["checkpointed_blocks"] == 1
    assert result["best"]["mode"] in ("none", "full", "attention", "mlp")
