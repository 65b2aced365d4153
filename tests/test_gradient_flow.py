"""`python -m trainer.diagnose gradient-flow`: the toy study of the lesson's exercise 4 reproduces
its result with the numbers the README quotes, its norms equal a hand-written backward pass, and a
GPT's per-block norms (from overrides, and from a real run's checkpoint) equal a direct backward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import QUICK
from omegaconf import OmegaConf, open_dict

from trainer.__main__ import compose_config
from trainer.diagnose import main
from trainer.diagnostics.gradient_flow import CASES, toy_batch, toy_study, toy_weights
from trainer.diagnostics.gradient_flow_models import initial_model, random_batch
from trainer.export import load_model
from trainer.loop import train
from trainer.model.gpt import head_loss

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["model=tiny", "model.n_layer=3", "model.n_embd=32", "model.n_head=2", "model.vocab_size=64"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: a second intra-op thread only adds waiting (much of it on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def study() -> dict:
    return {case["case"]: case for case in toy_study()["cases"]}


def test_toy_study_reproduces_exercise_4(study: dict) -> None:
    """Sigmoid vanishes by ~16 orders of magnitude at layer 1; Xavier gains ~4 of them back but still
    vanishes (sigma'(0) = 1/4, not tanh's 1); ReLU (He), residual sigmoid and tanh (Xavier) flow."""
    sigmoid, xavier = study["sigmoid"], study["sigmoid_xavier"]
    assert sigmoid["ratio_input"] == pytest.approx(7.19e-17, rel=1e-2)
    assert sigmoid["ratio_weight"] == pytest.approx(2.60e-17, rel=1e-2)
    assert xavier["ratio_input"] == pytest.approx(9.13e-13, rel=1e-2)
    assert xavier["ratio_input"] > 1e3 * sigmoid["ratio_input"]
    # the per-layer factor near sigma's linear region: sqrt(n) std sigma'(0) = 1/(4 sqrt 3) and 1/4
    assert sigmoid["ratio_input"] ** (1 / 19) == pytest.approx(1 / (4 * math.sqrt(3)), abs=0.01)
    assert xavier["ratio_input"] ** (1 / 19) == pytest.approx(0.25, abs=0.02)
    for name in ("relu", "sigmoid_residual", "tanh_xavier"):
        assert 0.1 < study[name]["ratio_input"] < 10, name
        assert study[name]["verdict"].startswith("flows"), name
    assert study["relu"]["ratio_weight"] == pytest.approx(0.845, rel=1e-2)
    # residual: the signal is carried whole, but later layers see inputs ~10x larger (each adds sigma ~ 0.5)
    assert study["sigmoid_residual"]["ratio_input"] == pytest.approx(1.17, rel=1e-2)
    assert study["sigmoid_residual"]["ratio_weight"] == pytest.approx(0.0231, rel=1e-2)
    assert sigmoid["verdict"].startswith("vanishes") and xavier["verdict"].startswith("vanishes")
    # Xavier with sigmoid's gain 4: a factor ~1 at 0, but pre-activations of std ~2 saturate: still vanishes
    gain4 = study["sigmoid_xavier_x4"]
    assert gain4["ratio_input"] == pytest.approx(6.95e-5, rel=1e-2) and gain4["verdict"].startswith("vanishes")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_toy_norms_equal_a_hand_written_backward(case, study: dict) -> None:
    """Backprop by its recurrence, no autograd: d_l = g_l * f'(z_l), dL/dW_l = d_l^T h_{l-1},
    g_{l-1} = d_l W_l (+ g_l with the skip)."""
    weights, (x, y) = toy_weights(case), toy_batch()
    derivative = {
        "sigmoid": lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
        "relu": lambda z: (z > 0).double(),
        "tanh": lambda z: 1 - torch.tanh(z) ** 2,
    }[case.activation]
    f = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}[case.activation]
    h, inputs, pre = x, [], []
    for w in weights:
        inputs.append(h)
        pre.append(h @ w.T)
        h = h + f(pre[-1]) if case.residual else f(pre[-1])
    g = (h - y) / x.size(0)  # dL/dh_L of mean 0.5 |h_L - y|^2
    weight_grad, input_grad = [0.0] * len(weights), [0.0] * len(weights)
    for layer in reversed(range(len(weights))):
        d = g * derivative(pre[layer])
        weight_grad[layer] = (d.T @ inputs[layer]).norm().item()
        g = d @ weights[layer] + (g if case.residual else 0)
        input_grad[layer] = g.norm().item()
    measured = study[case.name]
    assert measured["weight_grad"] == pytest.approx(weight_grad, rel=1e-9)
    assert measured["input_grad"] == pytest.approx(input_grad, rel=1e-9)


def test_cli_writes_the_table_a_png_and_json(tmp_path: Path, capsys, study: dict) -> None:
    png, out = tmp_path / "flow.png", tmp_path / "flow.json"
    assert main(["gradient-flow", "--png", str(png), "--out", str(out)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    written = json.loads(out.read_text())
    assert [c["case"] for c in written["cases"]] == [c.name for c in CASES]
    assert written["cases"][0]["weight_grad"] == pytest.approx(study["sigmoid"]["weight_grad"], rel=1e-12)
    assert written["setup"] == {"width": 64, "depth": 20, "batch": 128, "seed": 0, "dtype": "float64"}
    printed = capsys.readouterr().out
    assert "| sigmoid | U(-1/sqrt(n), 1/sqrt(n)) (PyTorch default) | 1.04e-16 |" in printed
    assert "sigmoid_xavier: vanishes" in printed


def direct_norms(model, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Per block: |grad| of attn and mlp parameters, and |dL/dx| of the stream entering it, from a
    forward written out here (embed -> blocks -> norm_f -> head loss) and one backward."""
    model.eval()
    h, stream = model.embed(x), []
    for block in model.blocks:
        stream.append(h)
        h = block(h)
    loss = head_loss(model.norm_f(h), model.embed.wte.weight, y, 0, model.cfg.vocab_size) / y.numel()
    assert loss.item() == pytest.approx(model(x, targets=y).item() / y.numel(), rel=1e-6)  # the same model
    params = [p for block in model.blocks for part in (block.attn, block.mlp) for p in part.parameters()]
    grads = iter(torch.autograd.grad(loss, [*params, *stream]))
    sizes = [(len(list(b.attn.parameters())), len(list(b.mlp.parameters()))) for b in model.blocks]
    rows = [{"attn": [next(grads) for _ in range(a)], "mlp": [next(grads) for _ in range(m)]} for a, m in sizes]
    for row in rows:
        for key in ("attn", "mlp"):
            row[key] = math.sqrt(sum(g.double().pow(2).sum().item() for g in row[key]))
    for row in rows:
        row["stream"] = next(grads).norm().item()
    return rows


def assert_blocks_match(measured: list[dict], expected: list[dict]) -> None:
    assert len(measured) == len(expected)
    for i, (got, want) in enumerate(zip(measured, expected, strict=True)):
        assert got["block"] == i
        for key in ("attn", "mlp", "stream"):
            assert math.isfinite(got[key]) and got[key] > 0, (i, key)
            assert got[key] == pytest.approx(want[key], rel=1e-4), (i, key)


def test_gpt_from_overrides_matches_a_direct_backward(tmp_path: Path, capsys) -> None:
    out, png = tmp_path / "gpt.json", tmp_path / "gpt.png"
    assert main(["gradient-flow", *TINY, "--seq-len", "16", "--out", str(out), "--png", str(png)]) == 0
    written = json.loads(out.read_text())
    assert png.read_bytes()[:8] == PNG_MAGIC
    (state,) = written["states"]
    assert state["state"] == "init" and written["batch"] == {
        "source": "random tokens (seed 0)", "batch_size": 4, "seq_len": 16,
    }  # fmt: skip
    cfg, _ = compose_config(TINY)
    model = initial_model(cfg.model, cfg.train.seed, torch.device("cpu"))  # the init a run would draw
    assert_blocks_match(state["blocks"], direct_norms(model, *random_batch(64, 4, 16, seed=0)))
    assert state["loss"] == pytest.approx(math.log(64), abs=0.05)  # an untrained model: near uniform
    assert "| 2 |" in capsys.readouterr().out  # one row a block


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 3-step run (helpers.QUICK), its config saved where `python -m trainer` leaves it."""
    tmp = tmp_path_factory.mktemp("gradient_flow_run")
    overrides = [*QUICK, "train.max_steps=3", "logger.progress_bar=false", f"data.cache_dir={tmp / 'cache'}"]
    cfg, composed = compose_config(overrides)
    train(cfg, tmp / "run")
    with open_dict(composed):
        del composed["hydra"]
    (tmp / "run" / ".hydra").mkdir()
    OmegaConf.save(composed, tmp / "run" / ".hydra" / "config.yaml")  # as Hydra saves the job's config
    return tmp / "run"


def test_run_dir_at_init_and_at_its_checkpoint(run_dir: Path, capsys) -> None:
    out = run_dir / "flow.json"
    assert main(["gradient-flow", "--run", str(run_dir), "--seed", "1", "--out", str(out)]) == 0
    assert (run_dir / "gradient_flow.png").read_bytes()[:8] == PNG_MAGIC  # the default: in the run dir
    printed = capsys.readouterr().out
    assert "attn (init) | mlp (init) | stream (init) | attn (step 3) |" in printed
    assert printed.count("flows") == 6  # attn, mlp, stream at both states: a 2-block model at init flows
    written = json.loads(out.read_text())
    init, trained = written["states"]
    assert (init["state"], init["step"], init["seed"], trained["step"]) == ("init", 0, 1337, 3)
    model, _ = load_model(run_dir / "checkpoints" / "step_00000003")
    batch = random_batch(model.cfg.vocab_size, 4, 32, seed=1)
    assert_blocks_match(trained["blocks"], direct_norms(model, *batch))
    assert_blocks_match(init["blocks"], direct_norms(initial_model(model.cfg, 1337, torch.device("cpu")), *batch))
    assert init["blocks"][0]["attn"] != trained["blocks"][0]["attn"]  # three steps moved the weights


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, run_dir: Path, capsys) -> None:
    cases = [
        (["model=tiny", "model.n_layr=3"], "unknown config key 'model.n_layr'"),
        (["--run", str(tmp_path / "missing")], "does not exist: give a run directory"),
        (["--run", str(tmp_path)], "neither a run directory (no checkpoints/)"),
        (["--run", str(run_dir), "model.n_layer=2"], "either --run RUN_DIR or overrides"),
        ([*TINY, "--seq-len", "999"], "exceeds model.block_size=256"),
    ]
    for args, expected in cases:
        png, out = tmp_path / "never.png", tmp_path / "never.json"
        assert main(["gradient-flow", *args, "--png", str(png), "--out", str(out)]) == 2, args
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err
        assert captured.out == "" and not png.exists() and not out.exists()
