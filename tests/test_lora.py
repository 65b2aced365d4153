"""LoRA / DoRA (trainer/lora.py) against references nobody here wrote: PEFT on transformers' models
(logits, gradients, parameter counts, the adapter files both ways) and float64 central finite
differences; plus the seed lesson's exercise 7 (gradients at init, parameter counts, a frozen base)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from helpers import hf_gpt2, hf_llama, hf_qwen2, randomize_adapters  # noqa: E402

from trainer.config import ConfigError, LoraConfig  # noqa: E402
from trainer.lora import (  # noqa: E402
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_lora,
    peft_state_dict,
    save_adapter,
    trainable_summary,
    with_adapter_init,
)
from trainer.model import GPT, load_hf_config, load_pretrained, pretrained_weights  # noqa: E402
from trainer.model.hf_import import VOCAB_ROWS  # noqa: E402
from trainer.model.loss import cross_entropy_sum  # noqa: E402
from trainer.parallel.base import materialize  # noqa: E402

VOCAB, T = 101, 12
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    """Tiny random HF checkpoints (GPT-2 tied, Llama GQA untied, Qwen2 with q / k / v biases), their
    weights moved well away from init so norms and biases matter."""
    root = tmp_path_factory.mktemp("lora_bases")
    torch.manual_seed(0)
    paths = {}
    for name, model in {"gpt2": hf_gpt2(), "llama": hf_llama(), "qwen2": hf_qwen2()}.items():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def tokens(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, T), generator=g), torch.randint(0, VOCAB, (2, T), generator=g)


def lora(**overrides) -> LoraConfig:
    return LoraConfig(**{"enabled": True, "r": 4, "alpha": 8.0, "target_modules": ["all-linear"], **overrides})


def hf_model(path: str, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype).eval()


def peft_config(cfg: LoraConfig):
    """PEFT's LoraConfig for the same adapters."""
    targets = "all-linear" if cfg.target_modules == ["all-linear"] else cfg.target_modules
    return peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, target_modules=targets, use_dora=cfg.dora,
        use_rslora=cfg.rslora, task_type="CAUSAL_LM",
    )  # fmt: skip


def lora_model(path: str, cfg: LoraConfig, dtype=torch.float32) -> GPT:
    model = load_pretrained(path, dtype)
    apply_lora(model, cfg, seed=0)
    return model.eval()


# -- exercise 7: gradients at init, finite differences, parameter counts ------------------------------


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_at_init_the_output_is_the_base_and_only_B_gets_gradient(bases, layout, dora):
    """B = 0: the first forward equals the base model exactly, dL/dA = 0 exactly, dL/dB != 0 (and
    DoRA's magnitude gets a gradient); the frozen base gets no .grad at all."""
    x, y = tokens()
    base = load_pretrained(bases[layout]).eval()
    model = lora_model(bases[layout], lora(dora=dora))
    assert torch.equal(model(x), base(x))
    cross_entropy_sum(model(x), y).backward()
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            assert p.grad is not None and torch.all(p.grad == 0), name
        elif ".lora_B." in name or ".lora_magnitude." in name:
            assert p.grad.abs().max() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def central_differences(loss_fn, param: torch.Tensor, entries: list[tuple[int, ...]], eps: float = 1e-6) -> list:
    out = []
    with torch.no_grad():
        for i in entries:
            old = param[i].item()
            param[i] = old + eps
            plus = loss_fn().item()
            param[i] = old - eps
            minus = loss_fn().item()
            param[i] = old
            out.append((plus - minus) / (2 * eps))
    return out


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gradients_match_float64_finite_differences(bases, layout, dora):
    """Autograd's dL/dA, dL/dB (LoRA) and dL/dm (DoRA's magnitude) equal central differences in
    float64. DoRA's A and B are not checked here: PEFT detaches the row norm, so their gradient is
    not the function's derivative by design (test_gradients_match_peft checks them)."""
    model = lora_model(bases[layout], lora(dora=dora, rslora=True)).double()
    randomize_adapters(model)
    x, y = tokens()
    loss_fn = lambda: cross_entropy_sum(model(x), y)  # noqa: E731
    loss_fn().backward()
    kinds = ("lora_magnitude",) if dora else ("lora_A", "lora_B")
    g = torch.Generator().manual_seed(3)
    checked = 0
    for name, p in model.named_parameters():
        if not any(f".{kind}." in name for kind in kinds):
            continue
        entries = [tuple(int(torch.randint(0, n, (1,), generator=g)) for n in p.shape) for _ in range(2)]
        numeric = torch.tensor(central_differences(loss_fn, p.data, entries), dtype=torch.float64)
        analytic = torch.stack([p.grad[i] for i in entries])
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8, msg=name)
        checked += 1
    assert checked >= 8


def test_parameter_counts_follow_r_times_in_plus_out(bases):
    """Full fine-tuning trains every parameter; LoRA r (in + out) per adapter (+ out with DoRA): on
    the fused c_attn, q / k / v each count their own rows, as PEFT's separate modules do."""
    cfg = load_hf_config(bases["llama"])
    C, H, r = cfg.n_embd, cfg.intermediate_size, 4
    q, kv = C, cfg.n_kv_head * C // cfg.n_head
    per_layer = [(C, q), (C, kv), (C, kv), (C, C), (C, H), (C, H), (H, C)]  # q k v o gate up down: (in, out)
    for dora in (False, True):
        model = lora_model(bases["llama"], lora(dora=dora))
        lora_count = cfg.n_layer * sum(r * (i + o) + (o if dora else 0) for i, o in per_layer)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == lora_count
        assert sum(p.numel() for p in model.parameters()) == load_pretrained(bases["llama"]).num_params() + lora_count
        reference = peft.get_peft_model(hf_model(bases["llama"]), peft_config(lora(dora=dora)))
        assert reference.get_nb_trainable_parameters()[0] == lora_count
        assert f"{lora_count:,} of" in trainable_summary(model)


def test_train_modules_choose_what_else_trains(bases):
    """apply_lora freezes everything but the adapters and train_modules: norm (every norm, norm_f
    too) and lm_head (the tied embedding on GPT-2)."""
    for layout, head in (("llama", "head.weight"), ("gpt2", "embed.wte.weight")):
        model = lora_model(bases[layout], lora(target_modules=["c_attn" if layout == "gpt2" else "q_proj"],
                                               train_modules=["norm", "lm_head"]))  # fmt: skip
        trained = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
        norms = {n for n, _ in model.named_parameters() if "norm" in n}
        assert trained == norms | {head} and len(norms) >= 5


def test_a_target_that_matches_nothing_is_one_config_error_line(bases):
    model = load_pretrained(bases["gpt2"])
    with pytest.raises(ConfigError, match=r"'q_proj' matches no module; the model has \['c_attn', 'c_fc', 'c_proj'\]"):
        apply_lora(model, lora(target_modules=["c_attn", "q_proj"]))
    with pytest.raises(ConfigError) as error:
        apply_lora(load_pretrained(bases["llama"]), lora(target_modules=["c_attn"]))
    assert "\n" not in str(error.value) and "'c_attn'" in str(error.value) and "'down_proj'" in str(error.value)


# -- the layer: a bf16 base under fp32 inputs and adapters --------------------------------------------


def test_bf16_base_weight_is_cast_to_the_input_dtype(bases):
    """A frozen base stored in bf16 (the default) gives fp32 outputs: the bf16 weight's exact values
    used in an fp32 matmul, plus the fp32 adapters; the model's logits equal a plain fp32 GPT holding
    the bf16-rounded weights, plus the adapters."""
    model = lora_model(bases["llama"], lora(dora=True))
    randomize_adapters(model)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    expected = lora_model(bases["llama"], lora(dora=True))
    expected.load_state_dict({k: v.bfloat16().float() if k in linear else v for k, v in model.state_dict().items()})
    for name in linear:
        module = model.get_submodule(name.removesuffix(".weight"))
        module.weight.data = module.weight.data.bfloat16()
    x, _ = tokens()
    logits = model(x)
    assert logits.dtype == torch.float32 and model.blocks[0].attn.c_attn.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected(x), rtol=0, atol=1e-5)


# -- PEFT: our adapters in PEFT, PEFT's adapters in ours, gradients -----------------------------------


CASES = {
    "gpt2": ("gpt2", lora()),
    "gpt2-dora-norm-head": (
        "gpt2",
        lora(target_modules=["c_attn", "c_proj"], dora=True, train_modules=["norm", "lm_head"]),
    ),
    "llama": ("llama", lora()),
    "llama-qv-rslora": ("llama", lora(target_modules=["q_proj", "v_proj"], rslora=True)),
    "llama-dora-norm-head": ("llama", lora(dora=True, train_modules=["norm", "lm_head"])),
    "llama-one-layer-k": ("llama", lora(target_modules=["model.layers.1.self_attn.k_proj", "down_proj"])),
    "qwen2-dora-rslora": ("qwen2", lora(dora=True, rslora=True, train_modules=["embed_tokens"])),
}


@pytest.mark.parametrize("case", CASES)
def test_saved_adapter_gives_our_logits_in_peft(bases, case, tmp_path):
    """save_adapter, then PeftModel.from_pretrained on transformers' base model: our logits (1e-5)."""
    layout, cfg = CASES[case]
    model = lora_model(bases[layout], cfg)
    randomize_adapters(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora_" not in name:  # train_modules: changed, so they must be saved
                p.mul_(1.5)
    save_adapter(tmp_path, model.state_dict(), model.cfg, cfg, bases[layout])
    theirs = peft.PeftModel.from_pretrained(hf_model(bases[layout]), tmp_path).eval()
    x, _ = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x).logits, rtol=0, atol=1e-5)
    # and back: load_adapter of our own file restores every trained tensor
    tensors, loaded_cfg = load_adapter(tmp_path, model.cfg)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(tensors) == set(trained)
    assert all(torch.equal(tensors[n], p.detach()) for n, p in trained.items())  # padding rows: zero both
    # a trained embedding / head is stored in the real vocabulary's shape; GPT holds it padded (101 -> 128)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    vocab_keys = [k for k in stored if k.endswith(("lm_head.weight", "embed_tokens.weight", "wte.weight"))]
    assert bool(vocab_keys) == any(n in VOCAB_ROWS for n in trained)
    assert all(stored[k].shape[0] == VOCAB < model.cfg.padded_vocab_size for k in vocab_keys)
    assert (loaded_cfg.r, loaded_cfg.alpha, loaded_cfg.dora, loaded_cfg.rslora) == (
        cfg.r,
        cfg.alpha,
        cfg.dora,
        cfg.rslora,
    )


PEFT_MADE = {
    "gpt2-dora": ("gpt2", dict(target_modules=["c_attn", "c_fc"], use_dora=True, modules_to_save=["ln_f"])),
    "llama-qv": ("llama", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    "llama-all-dora-rslora": ("llama", dict(target_modules="all-linear", use_dora=True, use_rslora=True)),
    "qwen2-k-down": ("qwen2", dict(target_modules=["k_proj", "down_proj"], modules_to_save=["norm"])),
    "gpt2-tied-head": ("gpt2", dict(target_modules=["c_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True)),
}


@pytest.mark.parametrize("case", PEFT_MADE)
def test_load_adapter_made_by_peft_gives_peft_logits(bases, case, tmp_path):
    """An adapter made by PEFT (random weights, saved by save_pretrained) loads into our model with
    PEFT's logits, and the LoraConfig read with it selects the same modules."""
    layout, options = PEFT_MADE[case]
    theirs = peft.get_peft_model(
        hf_model(bases[layout]), peft.LoraConfig(r=4, lora_alpha=6, task_type="CAUSAL_LM", **options)
    )
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path)
    cfg = load_hf_config(bases[layout])
    tensors, lora_cfg = load_adapter(tmp_path, cfg)
    model = lora_model(bases[layout], lora_cfg)
    assert set(tensors) == {n for n, p in model.named_parameters() if p.requires_grad}
    model.load_state_dict(tensors, strict=False)
    x, _ = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs.eval()(x).logits, rtol=0, atol=1e-5)


def test_load_adapter_for_another_model_is_one_config_error_line(bases, tmp_path):
    theirs = peft.get_peft_model(
        hf_model(bases["llama"]), peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    theirs.save_pretrained(tmp_path)
    smaller = dataclasses.replace(load_hf_config(bases["llama"]), n_embd=32)
    with pytest.raises(ConfigError, match=r"q_proj.lora_A.weight has shape \(4, 64\), the model needs \(4, 32\)$"):
        load_adapter(tmp_path, smaller)
    with pytest.raises(ConfigError, match="adapter on model.layers.0.self_attn.q_proj, which model"):
        load_adapter(tmp_path, load_hf_config(bases["gpt2"]))
    # PEFT training GPT-2's tied wte without the head (modules_to_save=[wte]) unties them: refused
    options = dict(target_modules=["c_attn"], modules_to_save=["wte"], task_type="CAUSAL_LM")
    peft.get_peft_model(hf_model(bases["gpt2"]), peft.LoraConfig(r=4, **options)).save_pretrained(tmp_path / "untied")
    with pytest.raises(ConfigError, match="PEFT trained the tied embedding untied"):
        load_adapter(tmp_path / "untied", load_hf_config(bases["gpt2"]))


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_gradients_match_peft(bases, layout):
    """dL/dA, dL/dB and dL/dm of DoRA adapters (rslora, on every linear) equal PEFT's on the same
    transformers model: the detached norm and the per-slice adapters on the fused c_attn."""
    cfg = lora(dora=True, rslora=True)
    model = lora_model(bases[layout], cfg)
    randomize_adapters(model)
    theirs = peft.get_peft_model(hf_model(bases[layout]), peft_config(cfg))
    ours_peft = peft_state_dict({n: p for n, p in model.named_parameters() if p.requires_grad}, model.cfg)
    by_key = {n.replace(".default", ""): p for n, p in theirs.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for key, value in ours_peft.items():
            (by_key[key] if key in by_key else by_key[key + ".weight"]).copy_(value)
    x, y = tokens()
    cross_entropy_sum(model(x), y).backward()
    cross_entropy_sum(theirs(x).logits, y).backward()
    grads = peft_state_dict({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, model.cfg)
    assert len(grads) == len(by_key)
    for key, grad in grads.items():
        ref = (by_key[key] if key in by_key else by_key[key + ".weight"]).grad
        torch.testing.assert_close(grad, ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max().item()), msg=key)


# -- merge for export, and the streamed init -----------------------------------------------------------


@pytest.mark.parametrize("layout", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_weights_in_a_plain_gpt_give_the_adapter_logits(bases, layout, dora):
    """merge_lora (fp32 arithmetic, fp64 for a float64 model) loaded into a plain GPT: the adapter
    model's logits, to fp32 rounding in fp32 and to 1e-12 in float64."""
    cfg = lora(dora=dora, train_modules=["norm"])
    x, _ = tokens()
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        model = lora_model(bases[layout], cfg).to(dtype)
        randomize_adapters(model)
        with torch.no_grad():
            model.norm_f.weight.mul_(1.5)
        merged = merge_lora(model.state_dict(), model.cfg, cfg)
        assert not any(".lora_" in k for k in merged) and {v.dtype for v in merged.values()} == {dtype}
        plain = load_pretrained(bases[layout], dtype).eval()
        plain.load_state_dict(merged)
        with torch.no_grad():
            expected = model(x)
            # merging reorders the fp32 sums (W + s B A, then one matmul): rounding of the logits' size
            torch.testing.assert_close(plain(x), expected, rtol=0, atol=atol * expected.abs().max().item())


def meta_lora_model(path: str, cfg: LoraConfig, seed: int, adapter=None) -> GPT:
    model_cfg = load_hf_config(path)
    with torch.device("meta"):
        model = GPT(model_cfg)
    apply_lora(model, cfg)
    weights = with_adapter_init(lambda device: pretrained_weights(path, model_cfg), model, seed, adapter)
    materialize(model, weights, torch.device("cpu"))  # raises on a missing or unknown name
    return model.eval()


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_streamed_init_fills_a_meta_model_like_apply_lora_on_a_real_one(bases, layout):
    """with_adapter_init + materialize fill every parameter of a meta-built LoRA model: A drawn per
    name from the seed (the same on two builds, and as apply_lora draws it on a real model), B zero,
    DoRA's magnitude the row norms, so the output is the base model's; the freezing survives."""
    cfg = lora(dora=True, train_modules=["norm"])
    first, second = meta_lora_model(bases[layout], cfg, seed=7), meta_lora_model(bases[layout], cfg, seed=7)
    real = load_pretrained(bases[layout])
    apply_lora(real, cfg, seed=7)
    assert first.state_dict().keys() == real.state_dict().keys()
    states = first.state_dict(), second.state_dict(), real.state_dict()
    for name, a in states[0].items():
        assert torch.equal(a, states[1][name]) and torch.equal(a, states[2][name]), name
    other = meta_lora_model(bases[layout], cfg, seed=8)
    A = next(n for n in real.state_dict() if ".lora_A." in n)
    assert not torch.equal(other.state_dict()[A], first.state_dict()[A])
    assert all(torch.all(p == 0) for n, p in first.named_parameters() if ".lora_B." in n)
    assert {n for n, p in first.named_parameters() if p.requires_grad} == {
        n for n, p in real.named_parameters() if p.requires_grad
    }
    x, _ = tokens()
    with torch.no_grad():
        assert torch.equal(first(x), load_pretrained(bases[layout]).eval()(x))


def test_streamed_init_takes_a_loaded_adapter(bases, tmp_path):
    """with_adapter_init(adapter=load_adapter(...)) fills a meta model with the saved adapter and
    train_modules: the same logits as the model that was saved."""
    cfg = lora(dora=True, train_modules=["norm"])
    model = lora_model(bases["llama"], cfg)
    randomize_adapters(model)
    with torch.no_grad():
        model.norm_f.weight.mul_(2.0)
    save_adapter(tmp_path, model.state_dict(), model.cfg, cfg)
    tensors, loaded_cfg = load_adapter(tmp_path, model.cfg)
    restored = meta_lora_model(bases["llama"], loaded_cfg, seed=0, adapter=tensors)
    x, _ = tokens()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
