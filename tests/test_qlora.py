"""QLoRA (trainer/lora/qlora.py: the adapted linears' frozen base in torchao's NF4) against references
that do not share its code path: torchao's own quantise / dequantise of the same tensor and a bound
from the NF4 table; the same model with the dequantised base in plain fp32 (output and gradients);
transformers' model with the NF4-rounded weights (the run's first loss, the merged export); the NF4
tensors' bytes against the format's size; and the settings it refuses, in one line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import GPT2_LIKE, LLAMA_LIKE, env, lora_run_args, randomize_adapters, read_metrics, run_cli
from safetensors.torch import load_file

from trainer.config import ConfigError, LoraConfig, ModelConfig
from trainer.lora import LoRALinear, apply_lora, with_adapter_init
from trainer.lora.export import merged
from trainer.lora.names import layout
from trainer.lora.qlora import dequantize, quantize, scaler_block_size
from trainer.lora.run import base_place, cast_frozen_base, check_quantizable
from trainer.model import load_hf_config
from trainer.model.build import build_model
from trainer.model.loss import IGNORE_INDEX, cross_entropy_sum
from trainer.parallel.base import materialize, whole
from trainer.preflight import qlora_problem

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
CPU = torch.device("cpu")
NF4_LEVELS = torch.tensor(  # QLoRA's table, as torchao stores it (4 decimals)
    [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626,
     0.7230, 1.0]
)  # fmt: skip


def nf4_tensor_class() -> type:
    from torchao.quantization import NF4Tensor

    return NF4Tensor


def qlora_settings(**overrides) -> LoraConfig:
    return LoraConfig(
        **{"enabled": True, "r": 4, "alpha": 8.0, "target_modules": ["all-linear"], "quantize_base": "nf4", **overrides}
    )


def qlora_model(cfg: ModelConfig, settings: LoraConfig, after_each=None):
    """A meta-built GPT with QLoRA layers, filled as a run fills it: the adapted weights cast to bf16,
    then each quantised as it arrives (after_each(model): called after each tensor is placed)."""
    model, weights = build_model(cfg, seed=0)
    apply_lora(model, settings)
    cast_frozen_base(model, torch.bfloat16, autocast=False)
    place = base_place(model, CPU)

    def checked(param: torch.nn.Parameter, full: torch.Tensor) -> None:
        place(param, full)
        if after_each is not None:
            after_each(model)

    materialize(model, with_adapter_init(weights, model, seed=0), CPU, checked)
    return model


def dense_reference(model: torch.nn.Module, cfg: ModelConfig, settings: LoraConfig):
    """The same model, every tensor copied, with LoRA on a plain fp32 base: the NF4 weights dequantised
    by torchao (get_original_weight), no quantisation anywhere."""
    NF4Tensor = nf4_tensor_class()
    state = {
        k: (v.get_original_weight() if isinstance(v, NF4Tensor) else v).detach().float().clone()
        for k, v in model.state_dict().items()
    }
    reference, _ = build_model(cfg, seed=0)
    apply_lora(reference, dataclasses.replace(settings, quantize_base=None))
    materialize(reference, lambda device: iter(state.items()), CPU)
    return reference


def tokens(cfg: ModelConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, cfg.vocab_size, (2, 12), generator=g) for _ in range(2))


# -- the format ------------------------------------------------------------------------------------------


@needs_torchao
@pytest.mark.parametrize("shape", [(256, 128), (48, 32)], ids=["256-absmax-blocks", "tiny"])
def test_nf4_round_trip_is_torchaos_and_within_the_table_bound(shape):
    """quantize -> dequantize equals torchao's own round trip of the same tensor (to_nf4, then its
    dequantising .to()), in blocks of 64 weights and 256 absmaxes (a tiny weight: all its blocks);
    every weight is within half the widest NF4 gap of its block's absmax, plus the error of that
    absmax's int8 double quantisation."""
    from torchao.quantization import to_nf4

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q = quantize(w)
    blocks = w.numel() // 64
    scaler_block = 256 if blocks % 256 == 0 else blocks
    assert (q.block_size, q.scaler_block_size) == (64, scaler_block) and q.dtype == torch.float32
    ours = dequantize(q)
    assert torch.equal(ours, to_nf4(w, 64, scaler_block).to(torch.float32))
    absmax = w.reshape(-1, 64).abs().amax(dim=1)  # (blocks,)
    centred = (absmax - absmax.mean()).reshape(-1, scaler_block)
    absmax_error = (centred.abs().amax(dim=1, keepdim=True) / 256).expand_as(centred).reshape(-1)  # half an int8 step
    half_gap = (NF4_LEVELS.diff().max() / 2).item()
    bound = (half_gap * absmax + absmax_error * 1.001 + 1e-6)[:, None]  # (blocks, 1)
    error = (w - ours).reshape(-1, 64).abs()
    assert torch.all(error <= bound), (error - bound).max()
    assert 0.05 < (w - ours).pow(2).mean().sqrt() / w.std() < 0.15  # NF4 on normal weights: ~10% rms error


# -- the layer: forward, gradients, merge ------------------------------------------------------------------


@needs_torchao
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gradients_through_the_nf4_base_match_a_dequantised_fp32_reference(dora):
    """The QLoRA model and one with its base dequantised into plain fp32 weights: the same logits
    and the same dL/dA, dL/dB (dL/dm) on the whole model, the same dL/dx through a fused c_attn (q / k / v
    adapters); the NF4 base is frozen and gets no .grad. DoRA's magnitude starts at the row norms of
    the dequantised weight, so at init the model is the dequantised base model."""
    cfg = ModelConfig(**LLAMA_LIKE)
    settings = qlora_settings(dora=dora)
    model = qlora_model(cfg, settings)
    NF4Tensor = nf4_tensor_class()
    x, y = tokens(cfg)
    if dora:
        for module in (m for m in model.modules() if isinstance(m, LoRALinear)):
            dense = module.weight.get_original_weight().float()
            for leaf, (start, stop) in module.slices.items():
                assert torch.equal(module.lora_magnitude[leaf], torch.linalg.norm(dense[start:stop], dim=1))
        with torch.no_grad():
            torch.testing.assert_close(model(x), dense_reference(model, cfg, settings)(x), rtol=0, atol=1e-5)
    randomize_adapters(model)
    reference = dense_reference(model, cfg, settings)

    ours, theirs = model(x), reference(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    cross_entropy_sum(ours, y).backward()
    cross_entropy_sum(theirs, y).backward()
    reference_params = dict(reference.named_parameters())
    quantized = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, reference_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert p.grad is None, name
        if isinstance(p, NF4Tensor):
            assert not p.requires_grad and p.dtype == torch.bfloat16
            quantized += 1
    assert quantized == len({x.module for x in layout(cfg).linears}) == 5 * cfg.n_layer  # every adapted linear

    layer, dense_layer = model.blocks[0].attn.c_attn, reference.blocks[0].attn.c_attn
    assert isinstance(layer.weight, NF4Tensor) and len(layer.slices) == 3
    inputs = torch.randn(2, 5, cfg.n_embd, generator=torch.Generator().manual_seed(4), requires_grad=True)
    dense_inputs = inputs.detach().clone().requires_grad_()
    upstream = torch.randn(2, 5, layer.out_features, generator=torch.Generator().manual_seed(5))
    (layer(inputs) * upstream).sum().backward()
    (dense_layer(dense_inputs) * upstream).sum().backward()
    torch.testing.assert_close(inputs.grad, dense_inputs.grad, rtol=1e-6, atol=1e-6)
    assert layer.weight.grad is None


@needs_torchao
def test_apply_lora_on_a_real_model_quantises_as_the_streamed_fill():
    """apply_lora(quantize_base=nf4) on a real fp32 model and the meta-built model filled from the same
    tensors (no cast: fp32 NF4): the same NF4 weights, DoRA magnitudes and adapters."""
    cfg, settings = ModelConfig(**LLAMA_LIKE), qlora_settings(dora=True)
    model, weights = build_model(cfg, seed=0)
    base = [(name, whole(t)) for name, t in weights(CPU)]  # the base tensors alone (before the model has adapters)
    apply_lora(model, settings)
    materialize(model, with_adapter_init(lambda device: iter(base), model, seed=0), CPU, base_place(model, CPU))
    real, _ = build_model(cfg, seed=0)
    materialize(real, lambda device: iter(base), CPU)
    apply_lora(real, settings, seed=0)
    NF4Tensor = nf4_tensor_class()
    theirs = real.state_dict()
    for name, ours in model.state_dict().items():
        if isinstance(ours, NF4Tensor):
            assert isinstance(theirs[name], NF4Tensor) and ours.dtype == theirs[name].dtype == torch.float32
            assert torch.equal(ours.get_original_weight(), theirs[name].get_original_weight()), name
        else:
            assert torch.equal(ours, theirs[name]), name


@needs_torchao
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_the_nf4_layer_computes_as_the_dense_one(dtype):
    """Under CPU autocast (bf16, fp16) a QLoRA DoRA layer runs its matmuls in autocast's dtype as the
    dense layer's F.linear does: the same output and dL/dx (the dequantised weights are exact in both)."""
    cfg = ModelConfig(**LLAMA_LIKE)
    settings = qlora_settings(dora=True)
    model = qlora_model(cfg, settings)
    randomize_adapters(model)
    reference = dense_reference(model, cfg, settings)
    layer, dense_layer = model.blocks[0].mlp.c_proj, reference.blocks[0].mlp.c_proj
    inputs = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(4), requires_grad=True)
    dense_inputs = inputs.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        ours, theirs = layer(inputs), dense_layer(dense_inputs)
        assert ours.dtype == theirs.dtype
        ours.float().square().sum().backward()
        theirs.float().square().sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(inputs.grad, dense_inputs.grad, rtol=1e-3, atol=1e-3)
    assert inputs.grad.abs().max() > 0.1 and layer.weight.grad is None


@needs_torchao
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_is_onto_the_dequantised_base(dora):
    """export's merge of a QLoRA model: a plain GPT whose logits are the QLoRA model's, and whose
    adapted weights are the dequantised NF4 ones plus the delta (LoRA: scale B A), not the original
    weights plus it."""
    cfg = ModelConfig(**GPT2_LIKE)
    settings = qlora_settings(dora=dora, target_modules=["c_attn"])
    model = qlora_model(cfg, settings)
    randomize_adapters(model)
    plain = merged(model, settings, torch.float32)
    assert not any(isinstance(p, nf4_tensor_class()) for p in plain.parameters())
    x, _ = tokens(cfg)
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(plain.eval()(x), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    if not dora:
        layer = model.blocks[0].attn.c_attn
        A, B = layer.lora_A["c_attn"].detach(), layer.lora_B["c_attn"].detach()
        delta = layer.scale * B @ A
        merged_weight = plain.blocks[0].attn.c_attn.weight.detach()
        torch.testing.assert_close(merged_weight, layer.weight.get_original_weight().float() + delta, rtol=0, atol=1e-6)
        _, weights = build_model(cfg, seed=0)
        original = whole(dict(weights(CPU))["blocks.0.attn.c_attn.weight"])  # the lazy init, drawn
        assert (merged_weight - (original + delta)).abs().max() > 1e-3


# -- memory ------------------------------------------------------------------------------------------------


@needs_torchao
def test_the_base_is_quantised_one_tensor_at_a_time_at_about_4_bits_per_weight():
    """While materialize fills the model, no adapted weight is ever stored dense (each is meta until
    it arrives, then NF4). Each NF4 weight holds the format's bytes exactly: 4-bit codes, an int8
    absmax per 64 weights, a bf16 scale per 256 absmaxes, their bf16 mean and the 16-entry bf16 table:
    ~4.13 bits per weight, against 16 for the bf16 base."""
    cfg = ModelConfig(**{**LLAMA_LIKE, "n_embd": 256, "intermediate_size": 512, "vocab_size": 128})
    NF4Tensor = nf4_tensor_class()
    dense_counts = []

    def count_dense(model: torch.nn.Module) -> None:
        adapted = [m.weight for m in model.modules() if isinstance(m, LoRALinear)]
        dense_counts.append(sum(not w.is_meta and not isinstance(w, NF4Tensor) for w in adapted))

    model = qlora_model(cfg, qlora_settings(), after_each=count_dense)
    assert len(dense_counts) == len(dict(model.named_parameters())) and max(dense_counts) == 0

    total_bytes = total_weights = 0
    for module in (m for m in model.modules() if isinstance(m, LoRALinear)):
        w = module.weight
        assert isinstance(w, NF4Tensor) and w.dtype == torch.bfloat16
        parts = (w.quantized_data, w.quantized_scalers, w.quantization_factor, w.scaler_mean, w.nf4)
        held = sum(t.untyped_storage().nbytes() for t in parts)
        n = w.numel()
        assert held == n // 2 + n // 64 + 2 * (n // (64 * 256)) + 2 + 16 * 2, tuple(w.shape)
        total_bytes, total_weights = total_bytes + held, total_weights + n
    bits = 8 * total_bytes / total_weights
    assert 4.12 < bits < 4.14, bits


# -- a real run -----------------------------------------------------------------------------------------------


def nf4_rounded_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """transformers' Llama weights (HF names) with each adapted linear rounded as the run stores it: our
    fused module (q / k / v into c_attn, gate / up into c_fc) in bf16, quantised by torchao's to_nf4 and
    dequantised, split back into the HF modules, in fp32."""
    from safetensors.torch import load_file as load
    from torchao.quantization import to_nf4

    hf = load(str(path / "model.safetensors"))
    by_module: dict[str, list] = {}
    for x in layout(load_hf_config(str(path))).linears:
        by_module.setdefault(x.module, []).append(x)
    out = {}
    for parts in by_module.values():
        parts = sorted(parts, key=lambda x: x.start)
        fused = torch.cat([hf[f"{x.hf_name}.weight"] for x in parts]).to(torch.bfloat16)
        rounded = to_nf4(fused, 64, scaler_block_size(fused.numel())).get_original_weight().float()
        out |= {f"{x.hf_name}.weight": rounded[x.start : x.stop] for x in parts}
    return out


@needs_torchao
@pytest.mark.heavy
def test_a_qlora_run_trains_on_the_nf4_base_resumes_bitwise_and_merges_onto_it(finetune_dir: Path, tmp_path: Path):
    """lora.quantize_base=nf4 on a bf16 base, each step on the whole training split: step 1 (B = 0) is
    transformers' loss with the adapted weights NF4-rounded, the loss falls, a resume from step 2 repeats
    the losses and adapters bitwise, and `python -m trainer.export --merge` writes a model that
    transformers loads with the QLoRA model's logits, whose weights are the NF4-rounded ones plus
    scale B A (from the PEFT adapter file), not the original ones plus it."""
    from transformers import AutoModelForCausalLM

    from trainer.__main__ import compose_config
    from trainer.data import build_data
    from trainer.export import find_checkpoint, load_model
    from trainer.loop import train

    model_dir = finetune_dir / "llama"
    overrides = [a for a in lora_run_args(finetune_dir, "llama") if a != "lora.base_dtype=fp32"]
    overrides += ["lora.quantize_base=nf4", "train.micro_batch_size=8", "checkpoint.interval=2", "train.max_steps=4"]
    cfg, _ = compose_config(overrides)
    whole = tmp_path / "whole"
    train(cfg, whole)
    rows = read_metrics(whole)

    rounded = nf4_rounded_hf_weights(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    original = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    data = build_data(cfg.data, cfg.train.seq_len, 0, pretrained=cfg.model.pretrained)
    assert len(data.train) == 8  # one batch: every step sees the whole training split
    with torch.no_grad():
        hf.load_state_dict(rounded, strict=False)
        x, y = data.train.get_batch(torch.arange(8).numpy())[:2]
        logits = hf(x).logits
    kept = y != IGNORE_INDEX
    assert rows[0]["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits[kept], y[kept]).item(), rel=1e-5)
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.05 and all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses

    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    cfg, _ = compose_config([*overrides, "train.resume=auto"])
    train(cfg, resumed)
    assert [r["loss"] for r in read_metrics(resumed)] == losses  # bitwise
    adapter_file = Path("checkpoints") / "final" / "adapter" / "adapter_model.safetensors"
    adapters, again = load_file(whole / adapter_file), load_file(resumed / adapter_file)
    assert adapters.keys() == again.keys() and all(torch.equal(again[k], v) for k, v in adapters.items())

    out = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-m", "trainer.export", str(whole), "--out", str(out), "--merge"],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "top-1 agreement 100.00%" in done.stdout and "Failed to load" not in done.stderr, done.stdout + done.stderr
    ours, _ = load_model(find_checkpoint(whole))  # the QLoRA model, its base quantised again
    assert sum(isinstance(p, nf4_tensor_class()) for p in ours.parameters()) == 5 * ours.cfg.n_layer
    merged_hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged_hf(ids).logits, ours.eval()(ids), rtol=1e-4, atol=1e-4)
    config = json.loads((whole / "checkpoints" / "final" / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    merged_state = merged_hf.state_dict()
    assert len(rounded) == 7 * ours.cfg.n_layer
    for name, base in rounded.items():
        module = name.removesuffix(".weight")
        A = adapters[f"base_model.model.{module}.lora_A.weight"]
        B = adapters[f"base_model.model.{module}.lora_B.weight"]
        torch.testing.assert_close(merged_state[name], base + scale * B @ A, rtol=0, atol=1e-6, msg=name)
        assert (merged_state[name] - (original[name] + scale * B @ A)).abs().max() > 1e-3, name


# -- what it refuses ---------------------------------------------------------------------------------------------


def test_qlora_without_torchao_or_under_a_sharding_strategy_is_one_line():
    """The check's message function, given what the environment lacks: torchao missing names the pip
    command; parallel=ddp / fsdp / zero1-3 are refused, naming parallel=none; DoRA on NF4 is allowed;
    plain LoRA never needs torchao. A weight NF4 cannot cut into blocks of 64 is one ConfigError line."""
    nf4 = qlora_settings()
    missing = qlora_problem(nf4, "none", torchao=False)
    assert "pip install torchao" in missing and "\n" not in missing
    for strategy in ("ddp", "fsdp", "zero1", "zero2", "zero3"):
        line = qlora_problem(nf4, strategy, torchao=True)
        assert f"parallel={strategy}" in line and "parallel=none" in line and "\n" not in line
    assert qlora_problem(nf4, "none", torchao=True) is None
    assert qlora_problem(dataclasses.replace(nf4, dora=True), "none", torchao=True) is None
    assert qlora_problem(qlora_settings(quantize_base=None), "fsdp", torchao=False) is None

    model, _ = build_model(ModelConfig(**{**GPT2_LIKE, "n_embd": 20, "n_head": 2}), seed=0)  # c_attn: 60 x 20
    apply_lora(model, nf4)
    with pytest.raises(ConfigError, match=r"blocks of 64 weights, and blocks\.0\.attn\.c_attn\.weight \(60, 20\)"):
        check_quantizable(model)


@needs_torchao
def test_qlora_under_fsdp_stops_in_one_line(finetune_dir: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    extra = ["train.max_steps=1", "lora.quantize_base=nf4", "parallel=fsdp", f"hydra.run.dir={run_dir}"]
    done = run_cli(*lora_run_args(finetune_dir, "llama", *extra), cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "lora.quantize_base=nf4 (QLoRA) runs with parallel=none only, not parallel=fsdp" in last, done.stderr[-2000:]
    assert not (run_dir / "checkpoints").exists()
