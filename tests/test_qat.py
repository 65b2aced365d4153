"""Quantisation-aware training (trainer.quant): torchao's numbers forward, the straight-through
gradient backward, the float model's names, a real run, the config's refusals and the benchmark."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import read_metrics, run_cli
from safetensors.torch import load_file
from torch import nn

from trainer.__main__ import compose_config
from trainer.config import ConfigError, ModelConfig
from trainer.config.schema import QuantConfig
from trainer.model import GPT
from trainer.model.build import build_model
from trainer.parallel.base import whole
from trainer.preflight import check_run, resolve_model_config
from trainer.quant import QATLinear, add_fake_quantization, quantization_error, quantize_dequantize
from trainer.quant.qat import tq  # torchao.quantization, imported with its log lines silenced

BITS = ["int8", "int4"]


def qat_linear(qat: str, in_features: int = 64, out_features: int = 48, seed: int = 0) -> QATLinear:
    """A QATLinear with GPT-like weights (N(0, 0.02)) and a bias."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    nn.init.normal_(linear.weight, 0.0, 0.02)
    model = nn.Module()
    model.blocks = nn.ModuleList([linear])  # add_fake_quantization converts the linears in .blocks
    add_fake_quantization(model, QuantConfig(qat=qat, group_size=32))
    return linear


@pytest.mark.parametrize("qat", BITS)
def test_straight_through_gradient_is_the_plain_linears_at_the_quantised_weight(qat: str) -> None:
    """dL/dW of the fake-quantised layer is exactly dL/dW_q of a plain linear whose weight is W_q:
    the quantiser passes its gradient straight through (no clamp mask, no ulp from / scale * scale).
    The loss is quadratic, so dL/dW_q depends on W_q: a forward at W would give another gradient."""
    layer = qat_linear(qat)
    x = torch.randn(5, 64, requires_grad=True, generator=torch.Generator().manual_seed(1))
    layer(x).square().sum().backward()

    w_q = quantize_dequantize(layer.weight, qat, 32).requires_grad_()
    bias, x_plain = layer.bias.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    F.linear(x_plain, w_q, bias).square().sum().backward()
    assert torch.equal(layer.weight.grad, w_q.grad)
    assert torch.equal(layer.bias.grad, bias.grad) and torch.equal(x.grad, x_plain.grad)

    w = layer.weight.detach().clone().requires_grad_()
    F.linear(x.detach(), w, layer.bias.detach()).square().sum().backward()
    assert not torch.allclose(w.grad, w_q.grad, rtol=0, atol=1e-6)  # the forward did use W_q


def torchao_ptq(qat: str) -> object:
    """torchao's own post-training weight-only config for the same scheme."""
    if qat == "int8":
        return tq.Int8WeightOnlyConfig()
    return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(32))


@pytest.mark.parametrize("qat", BITS)
def test_fake_quantised_forward_is_torchaos_quantise_dequantise(qat: str) -> None:
    """The forward multiplies by the weight torchao's PTQ stores (dequantised) and torchao's QAT
    fake quantiser computes, bit for bit; it is a real grid: <= 256 / 16 levels per scale block."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

    layer = qat_linear(qat)
    plain = nn.Linear(64, 48)
    plain.load_state_dict(layer.state_dict())
    tq.quantize_(plain, torchao_ptq(qat))
    stored = plain.weight.dequantize()  # torchao's int8 / int4 codes times their scales
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, stored, layer.bias))
    granularity = {"int8": {"granularity": "per_channel"}, "int4": {"group_size": 32}}[qat]
    fake = IntxFakeQuantizer(IntxFakeQuantizeConfig(getattr(torch, qat), **granularity))
    assert torch.equal(fake(layer.weight.detach()), stored)

    blocks = stored.reshape(48, -1) if qat == "int8" else stored.reshape(48 * 2, 32)
    levels = max(len(row.unique()) for row in blocks)
    assert levels <= (256 if qat == "int8" else 16) and not torch.equal(stored, layer.weight)
    # relative error ||W - Q(W)|| / ||W|| of N(0, 0.02) weights: ~0.6% (int8 per row), ~9% (int4 per 32)
    error = quantization_error(nn.ModuleDict({"blocks": nn.ModuleList([layer])}), qat, 32)
    assert (0.004 < error < 0.01) if qat == "int8" else (0.06 < error < 0.13)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_names_and_state_dict_keys_stay_the_float_models(mlp: str) -> None:
    """build_model with quant.qat: every block linear becomes a QATLinear, the embedding and tied
    head stay float, and the parameter names / state_dict keys are the plain model's."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=32, block_size=32, mlp=mlp)
    plain, _ = build_model(cfg, seed=0)
    model, weights = build_model(cfg, seed=0, quant=QuantConfig(qat="int4", group_size=32))
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, QATLinear))
    per_block = ["attn.c_attn", "attn.c_proj", "mlp.c_proj"] + (
        ["mlp.w_gate", "mlp.w_up"] if mlp == "swiglu" else ["mlp.c_fc"]
    )
    assert converted == sorted(f"blocks.{i}.{name}" for i in range(2) for name in per_block)
    assert type(model.embed.wte) is nn.Embedding and model.head is None  # float, tied
    # a float checkpoint loads into the QAT model and back, strictly
    model.to_empty(device="cpu")
    model.load_state_dict({name: whole(t) for name, t in weights("cpu")}, strict=True)  # a lazy init, drawn
    GPT(cfg).load_state_dict(model.state_dict(), strict=True)


def test_a_qat_run_trains_fake_quantised_and_its_checkpoint_and_export_load(quick: list[str], tmp_path: Path) -> None:
    """`python -m trainer quant.qat=int8`: the loss falls; the run's last val_loss is its final
    weights' loss through the fake-quantised forward (not the float one); export loads as GPT."""
    from trainer.data import build_data
    from trainer.export import main as export
    from trainer.step import evaluate

    overrides = [*quick, "quant.qat=int8", "train.max_steps=30", "train.eval_interval=30", "optim.lr=3e-3",
                 "train.log_interval=5", "logger.progress_bar=false"]  # fmt: skip
    run_dir = tmp_path / "run"
    result = run_cli(*overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2  # 3.44 -> 3.05 here

    cfg, _ = compose_config(overrides)
    data = build_data(cfg.data, cfg.train.seq_len, cfg.train.seed)
    model_cfg = resolve_model_config(cfg.model, data.tokenizer.vocab_size)
    final = load_file(run_dir / "checkpoints" / "final" / "model.safetensors")
    model = GPT(model_cfg)
    model.load_state_dict(final, strict=True)
    loss = lambda: evaluate(model, data.val, cfg.train.micro_batch_size, cfg.train.eval_batches, torch.device("cpu"))  # noqa: E731
    float_loss = loss()
    add_fake_quantization(model, cfg.quant)
    # int8 moves this tiny model's loss by ~1.5e-5 nats (3.00992 vs 3.00994): far above the 1e-7
    # relative tolerance that covers another thread count's summation order (here: bit-identical)
    assert loss() == pytest.approx(rows[-1]["val_loss"], rel=1e-7, abs=0)
    assert abs(float_loss - rows[-1]["val_loss"]) > 2e-6, "the run trained in float: does build_run pass cfg.quant?"

    out = tmp_path / "export"
    assert export([str(run_dir), "--out", str(out), "--no-hf"]) == 0
    exported = load_file(out / "model.safetensors")
    GPT(model_cfg).load_state_dict(exported, strict=True)
    assert all(torch.equal(exported[name], tensor) for name, tensor in final.items())


def test_an_unsupported_bit_width_stops_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """`python -m trainer quant.qat=int3` (trainer.__main__.main in this process): exit code 2,
    one line on stderr, before any run dir or data exists."""
    from trainer.__main__ import main

    monkeypatch.setattr(sys, "argv", ["trainer", "quant.qat=int3", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: quant.qat='int3' is not supported: use null, int8 or int4\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["quant.qat=int8", "lora=default"], "quant.qat=int8 with LoRA is not supported"),
        (["quant.qat=int4", "quant.group_size=48"], "which does not divide model.n_embd (128)"),
        (["quant.qat=int4", "quant.group_size=64", "model.intermediate_size=96"], "the MLP's hidden width (96)"),
        (["quant.qat=int8", "quant.group_size=64"], "quant.group_size=64 is used by quant.qat=int4 only"),
    ],
    ids=["lora", "n_embd", "hidden", "group_size-without-int4"],
)
def test_settings_qat_cannot_run_are_refused_in_one_line(overrides: list[str], line: str) -> None:
    cfg, _ = compose_config(overrides)
    with pytest.raises(ConfigError, match=re.escape(line)) as refused:
        check_run(cfg)
    assert "\n" not in str(refused.value)
    check_run(compose_config(["quant.qat=int4", "quant.group_size=64"])[0])  # 64 tiles 128 and 512: runs


def test_benchmark_smoke_writes_its_table_and_json(tmp_path: Path, capsys) -> None:
    """`python -m benchmarks.qat --smoke` (in this process): the markdown table, and JSON whose
    figures are those of real runs (QAT != float, quantised forwards != float ones, int4's error > int8's)."""
    from benchmarks.qat import main

    out = tmp_path / "qat.json"
    main(["--smoke", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    printed = capsys.readouterr().out
    assert "| int8 (per channel) |" in printed and "| int4 (groups of 32) |" in printed
    report = json.loads(out.read_text())
    assert {"machine", "shape", "steps", "seconds", "results"} <= report.keys() and report["steps"] == 3
    float_loss, other_seed = report["results"]["float"]["val_loss"], report["results"]["float"]["val_loss_other_seed"]
    assert 3.0 < float_loss < 3.6 and other_seed != float_loss  # 32 tokens: ln 32 = 3.47 at the start
    for bits, (low, high) in {"int8": (0.003, 0.01), "int4": (0.05, 0.15)}.items():
        r = report["results"][bits]
        keys = {"float_loss", "ptq_loss", "qat_loss", "qat_float_loss", "ptq_weight_error", "qat_weight_error"}
        assert keys <= r.keys() and r["float_loss"] == float_loss
        assert low < r["ptq_weight_error"] < high and low < r["qat_weight_error"] < high
        assert r["ptq_loss"] != float_loss and r["qat_loss"] != r["qat_float_loss"]  # quantised forwards ran
        assert r["qat_loss"] != float_loss  # another run: QAT trained through the quantised forward
        assert abs(r["ptq_loss"] - float_loss) < 0.05 and abs(r["qat_loss"] - float_loss) < 0.05
