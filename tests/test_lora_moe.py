"""LoRA on mixture-of-experts models (trainer/lora/experts.py) against PEFT 0.21 on transformers 5's
Mixtral and Qwen3-MoE: the fused experts adapted as PEFT's ParamWrapper adapts them (per expert
W_e + scale B_e A_e, gate and up sharing A_e; the checkpoint's expert names giving gate_up_proj rank
2r), routers and attention as linears; logits and gradients both ways, the merge, the refusals, and
a real fine-tune whose adapter PEFT loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from helpers import hf_family, instruct_records, randomize_adapters, save_tiny_tokenizer  # noqa: E402
from helpers import lora_run_args as args  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from trainer.config import ConfigError, LoraConfig  # noqa: E402
from trainer.lora import apply_lora, load_adapter, peft_state_dict, save_adapter, with_adapter_init  # noqa: E402
from trainer.lora.experts import LoRAExperts  # noqa: E402
from trainer.lora.export import merged  # noqa: E402
from trainer.model import GPT, load_hf_config, load_pretrained, pretrained_weights  # noqa: E402
from trainer.model.loss import cross_entropy_sum  # noqa: E402
from trainer.model.moe import sort_by_expert  # noqa: E402
from trainer.parallel.base import materialize  # noqa: E402

VOCAB, T = 101, 12
EXPERT_NAMES = {"mixtral": ["w1", "w3", "w2"], "qwen3_moe": ["gate_proj", "up_proj", "down_proj"]}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    """Tiny random Mixtral and Qwen3-MoE checkpoints (2 layers, 4 experts, top-2), saved by transformers 5
    (one tensor per expert), weights moved away from init."""
    root = tmp_path_factory.mktemp("moe_bases")
    torch.manual_seed(0)
    for family in EXPERT_NAMES:
        model = hf_family(family)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(root / family)
    return {family: str(root / family) for family in EXPERT_NAMES}


def tokens(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, T), generator=g), torch.randint(0, VOCAB, (2, T), generator=g)


def lora(**overrides) -> LoraConfig:
    return LoraConfig(**{"enabled": True, "r": 4, "alpha": 8.0, "target_modules": ["all-linear"], **overrides})


def hf_model(path: str):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)


def lora_model(path: str, cfg: LoraConfig) -> GPT:
    model = load_pretrained(path)
    apply_lora(model, cfg, seed=0)
    return model.eval()


def close(ours: torch.Tensor, theirs: torch.Tensor, msg: str = "") -> None:
    """Equal to fp32 rounding: 1e-5 of the tensor's own size (at least 1e-5)."""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * max(1.0, theirs.abs().max().item()), msg=msg)


# -- the reference: what PEFT does to transformers 5's fused experts ------------------------------------


@pytest.mark.parametrize("family", EXPERT_NAMES)
def test_peft_adapts_each_expert_with_its_own_low_rank_delta(bases, family):
    """Pins the math the rest relies on: PEFT's ParamWrapper on experts.gate_up_proj (E, 2I, H) and
    experts.down_proj (E, H, I) gives the logits of the base with W_e + (alpha / R) B_e A_e folded into
    each expert, A_e = lora_A.view(E, R, in)[e], B_e = lora_B.view(out, R, E)[..., e]; named by the
    checkpoint's names, gate_up_proj gets rank 2r and alpha 2 alpha."""
    for options, gate_up_rank in ((dict(target_parameters=["gate_up_proj", "down_proj"]), 4),
                                  (dict(target_modules=EXPERT_NAMES[family]), 8)):  # fmt: skip
        theirs = peft.get_peft_model(hf_model(bases[family]), peft.LoraConfig(r=4, lora_alpha=6, **options)).eval()
        randomize_adapters(theirs)
        reference = hf_model(bases[family]).eval()
        state = {k.replace(".default", ""): v for k, v in theirs.state_dict().items() if ".lora_" in k}
        with torch.no_grad():
            for i, layer in enumerate(reference.model.layers):
                experts, E = layer.mlp.experts, layer.mlp.experts.gate_up_proj.shape[0]
                for param, module in (("gate_up_proj", "experts.base_layer"), ("down_proj", "experts")):
                    A = state[f"base_model.model.model.layers.{i}.mlp.{module}.lora_A.weight"]
                    B = state[f"base_model.model.model.layers.{i}.mlp.{module}.lora_B.weight"]
                    rank = A.shape[0] // E
                    assert rank == (gate_up_rank if param == "gate_up_proj" else 4)
                    scale = 6 / 4  # alpha_pattern doubles alpha with the rank: alpha / r either way
                    A, B = A.view(E, rank, -1), B.view(B.shape[0], rank, E).permute(2, 0, 1)
                    getattr(experts, param).add_(scale * B @ A)
        x, _ = tokens()
        with torch.no_grad():
            close(theirs(x).logits, reference(x).logits)


# -- ours in PEFT, PEFT's in ours, gradients ----------------------------------------------------------------

CASES = {
    "mixtral-attention": ("mixtral", lora(target_modules=ATTENTION)),
    "qwen3_moe-attention": ("qwen3_moe", lora(target_modules=ATTENTION)),
    "mixtral-expert-names": ("mixtral", lora(target_modules=["q_proj", *EXPERT_NAMES["mixtral"]])),
    "qwen3_moe-expert-names": ("qwen3_moe", lora(target_modules=EXPERT_NAMES["qwen3_moe"])),
    "mixtral-all-linear-rslora": ("mixtral", lora(rslora=True)),
    "qwen3_moe-all-linear": ("qwen3_moe", lora()),
    "mixtral-target-parameters": ("mixtral", lora(target_modules=[], target_parameters=["mlp.experts.gate_up_proj"])),
    "qwen3_moe-router-down": ("qwen3_moe", lora(target_modules=["v_proj", "gate"], target_parameters=["down_proj"])),
}


@pytest.mark.parametrize("case", CASES)
def test_saved_adapter_gives_our_logits_in_peft(bases, case, tmp_path):
    """save_adapter, then PeftModel.from_pretrained on transformers 5's model: our logits; and
    load_adapter of the same files gives back every adapter tensor and a config selecting the same."""
    family, cfg = CASES[case]
    model = lora_model(bases[family], cfg)
    randomize_adapters(model)
    save_adapter(tmp_path, model.state_dict(), model.cfg, cfg, bases[family])
    theirs = peft.PeftModel.from_pretrained(hf_model(bases[family]), tmp_path).eval()
    x, _ = tokens()
    with torch.no_grad():
        close(model(x), theirs(x).logits)
    tensors, loaded = load_adapter(tmp_path, model.cfg)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert set(tensors) == set(trained) and all(torch.equal(tensors[n], p) for n, p in trained.items())
    assert apply_lora(load_pretrained(bases[family]), loaded) == apply_lora(load_pretrained(bases[family]), cfg)
    if "expert-names" in case or "all-linear" in case:  # PEFT's own way of writing the doubled rank
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert config["rank_pattern"] == {r".*\.gate_up_proj": 8} and config["alpha_pattern"] == {
            r".*\.gate_up_proj": 16
        }


PEFT_MADE = {
    "mixtral-expert-names-q": ("mixtral", dict(target_modules=["q_proj", "w1", "w2", "w3"])),
    "qwen3_moe-target-parameters": ("qwen3_moe", dict(target_modules=["o_proj"],
                                                      target_parameters=["down_proj", "gate_up_proj"])),
    "qwen3_moe-all-linear-rslora": ("qwen3_moe", dict(target_modules="all-linear", use_rslora=True)),
    "mixtral-gate-up-only": ("mixtral", dict(target_modules=[], target_parameters=["mlp.experts.gate_up_proj"])),
}  # fmt: skip


@pytest.mark.parametrize("case", PEFT_MADE)
def test_load_adapter_made_by_peft_gives_peft_logits(bases, case, tmp_path):
    """An adapter PEFT made on transformers 5's MoE (random weights, save_pretrained) loads into ours
    with PEFT's logits, and the LoraConfig read with it builds exactly those adapters."""
    family, options = PEFT_MADE[case]
    theirs = peft.get_peft_model(hf_model(bases[family]), peft.LoraConfig(r=4, lora_alpha=6, **options))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    tensors, lora_cfg = load_adapter(tmp_path, load_hf_config(bases[family]))
    model = lora_model(bases[family], lora_cfg)
    assert set(tensors) == {n for n, p in model.named_parameters() if p.requires_grad}
    model.load_state_dict(tensors, strict=False)
    x, _ = tokens()
    with torch.no_grad():
        close(model(x), theirs.eval()(x).logits)


@pytest.mark.parametrize("family", EXPERT_NAMES)
def test_a_per_expert_adapter_from_transformers_4_loads_as_peft_converts_it(bases, family, tmp_path):
    """An adapter in transformers 4's layout (one lora_A / lora_B per expert and name, e.g.
    model.layers.0.block_sparse_moe.experts.3.w1.lora_A.weight; made here by hand) loads into ours with
    the logits PEFT 0.21 gives after its own conversion (gate and up fused block-diagonally)."""
    model_cfg = load_hf_config(bases[family])
    names, r = EXPERT_NAMES[family], 4
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    inter = model_cfg.moe_intermediate_size or model_cfg.intermediate_size
    shapes = {
        names[0]: (inter, model_cfg.n_embd),
        names[1]: (inter, model_cfg.n_embd),
        names[2]: (model_cfg.n_embd, inter),
    }
    g = torch.Generator().manual_seed(6)
    tensors = {}
    for layer in range(model_cfg.n_layer):
        for expert in range(model_cfg.n_experts):
            for name, (out, inp) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{block}.experts.{expert}.{name}"
                tensors[f"{key}.lora_A.weight"] = 0.3 * torch.randn(r, inp, generator=g)
                tensors[f"{key}.lora_B.weight"] = 0.3 * torch.randn(out, r, generator=g)
    peft.LoraConfig(r=r, lora_alpha=6, target_modules=names, task_type="CAUSAL_LM").save_pretrained(tmp_path)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    theirs = peft.PeftModel.from_pretrained(hf_model(bases[family]), tmp_path).eval()
    loaded, lora_cfg = load_adapter(tmp_path, model_cfg)
    assert lora_cfg.target_modules == sorted(names[:2]) and lora_cfg.target_parameters == ["down_proj"]
    model = lora_model(bases[family], lora_cfg)
    assert set(loaded) == {n for n, p in model.named_parameters() if p.requires_grad}
    model.load_state_dict(loaded, strict=False)
    x, _ = tokens()
    with torch.no_grad():
        close(model(x), theirs(x).logits)
        assert (model(x) - load_pretrained(bases[family]).eval()(x)).abs().max() > 0.1  # the adapters count


@pytest.mark.parametrize("family", EXPERT_NAMES)
def test_gradients_match_peft(bases, family):
    """dL/dA and dL/dB of every adapter (attention, router, both fused expert parameters; rsLoRA) equal
    PEFT's, which folds the delta into the weight where ours adds it on the activations. In float64:
    large random adapters amplify fp32 rounding to 1e-5 of the gradients; in float64 the two differ by
    transformers' own float32 steps (its base logits differ from ours by ~5e-7 in float64 too)."""
    cfg = lora(rslora=True)
    model = lora_model(bases[family], cfg).double()
    randomize_adapters(model)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        bases[family], attn_implementation="eager", experts_implementation="eager", dtype=torch.float64
    )
    options = dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True)
    theirs = peft.get_peft_model(base, peft.LoraConfig(**options))
    by_key = {n.replace(".default", ""): p for n, p in theirs.named_parameters() if p.requires_grad}
    ours = peft_state_dict({n: p for n, p in model.named_parameters() if p.requires_grad}, model.cfg)
    assert ours.keys() == by_key.keys()
    with torch.no_grad():
        for key, value in ours.items():
            by_key[key].copy_(value)
    x, y = tokens()
    cross_entropy_sum(model(x), y).backward()
    cross_entropy_sum(theirs(x).logits, y).backward()
    grads = peft_state_dict({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, model.cfg)
    assert any(".experts.base_layer." in k for k in grads) and any(".mlp.gate." in k for k in grads)
    for key, grad in grads.items():
        close(grad, by_key[key].grad, msg=key)


def test_a_dense_layer_of_a_qwen3_moe_keeps_no_mlp_adapters_as_in_peft(tmp_path):
    """PEFT on transformers 5 maps gate_proj / up_proj / down_proj (and all-linear's) onto the experts, so a
    Qwen3-MoE's dense layers (mlp_only_layers) get none on their MLP; nor do ours, and PEFT's logits match."""
    torch.manual_seed(0)
    hf_family("qwen3_moe", mlp_only_layers=[0]).save_pretrained(tmp_path / "base")
    for targets in (["all-linear"], ["q_proj", *EXPERT_NAMES["qwen3_moe"]]):
        cfg = lora(target_modules=targets)
        model = load_pretrained(tmp_path / "base")
        adapted = apply_lora(model, cfg, seed=0)
        assert "model.layers.1.mlp.experts.gate_up_proj" in adapted and not any("layers.0.mlp" in a for a in adapted)
        randomize_adapters(model)
        save_adapter(tmp_path / "adapter", model.state_dict(), model.cfg, cfg)
        theirs = peft.PeftModel.from_pretrained(hf_model(tmp_path / "base"), tmp_path / "adapter").eval()
        x, _ = tokens()
        with torch.no_grad():
            close(model.eval()(x), theirs(x).logits)


# -- init, the streamed init, the merge, the grouped path -------------------------------------------------


def test_at_init_the_output_is_the_base_and_only_B_gets_gradient(bases):
    """B = 0: the base's logits exactly, dL/dA = 0, dL/dB != 0, no gradient for the frozen experts; A
    drawn as PEFT draws lora_A (E R, in): Kaiming-uniform, bound 1 / sqrt(in)."""
    model = lora_model(bases["qwen3_moe"], lora(target_modules=EXPERT_NAMES["qwen3_moe"]))
    x, y = tokens()
    assert torch.equal(model(x), load_pretrained(bases["qwen3_moe"]).eval()(x))
    cross_entropy_sum(model(x), y).backward()
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, LoRAExperts) and mlp.w_gate.grad is None and not mlp.w_gate.requires_grad
    for leaf, A in mlp.lora_A.items():
        assert torch.all(A.grad == 0) and mlp.lora_B[leaf].grad.abs().max() > 0
        bound = 1 / A.shape[-1] ** 0.5
        assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert mlp.lora_A["gate_up_proj"].shape == (4, 8, 64) and mlp.lora_B["gate_up_proj"].shape == (4, 80, 8)
    assert mlp.lora_A["down_proj"].shape == (4, 4, 40) and mlp.lora_B["down_proj"].shape == (4, 64, 4)


def test_streamed_init_fills_a_meta_model_like_apply_lora_on_a_real_one(bases, tmp_path):
    """with_adapter_init + materialize fill a meta-built model's expert adapters as apply_lora does on a
    real one (A per name from the seed, B zero), and a loaded adapter in their place (logits equal)."""
    path, cfg = bases["mixtral"], lora()
    model_cfg = load_hf_config(path)

    def meta(adapter=None):
        with torch.device("meta"):
            model = GPT(model_cfg)
        apply_lora(model, cfg)
        materialize(
            model,
            with_adapter_init(lambda d: pretrained_weights(path, model_cfg), model, 7, adapter),
            torch.device("cpu"),
        )
        return model.eval()

    real = load_pretrained(path)
    apply_lora(real, cfg, seed=7)
    streamed = meta()
    assert streamed.state_dict().keys() == real.state_dict().keys()
    assert all(torch.equal(v, real.state_dict()[k]) for k, v in streamed.state_dict().items())
    randomize_adapters(real)
    save_adapter(tmp_path, real.state_dict(), real.cfg, cfg)
    restored = meta(load_adapter(tmp_path, model_cfg)[0])
    x, _ = tokens()
    with torch.no_grad():
        assert torch.equal(restored(x), real.eval()(x))


@pytest.mark.parametrize("family", EXPERT_NAMES)
def test_merged_export_folds_the_expert_adapters_in(bases, family):
    """export's merged(): a plain GPT (no LoRA modules) whose experts hold W_e + scale B_e A_e gives the
    adapter model's logits (in float64, to 1e-12: the merge is exact; in fp32 it only reorders sums);
    every expert weight moved."""
    cfg = lora(rslora=True)
    model = lora_model(bases[family], cfg).double()
    randomize_adapters(model)
    plain = merged(model, cfg, torch.float64).eval()
    assert not any(isinstance(m, LoRAExperts) for m in plain.modules())
    assert not any(".lora_" in k for k in plain.state_dict())
    base = load_pretrained(bases[family]).state_dict()
    for name in ("w_gate", "w_up", "w_down"):
        moved = (plain.state_dict()[f"blocks.1.mlp.{name}"] - base[f"blocks.1.mlp.{name}"]).flatten(1).abs().amax(1)
        assert torch.all(moved > 1e-3), name  # each expert
    x, _ = tokens()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-12 * expected.abs().max().item())


def test_grouped_path_adds_the_same_adapters_as_the_loop(bases):
    """LoRAExperts on the grouped path (torch._grouped_mm; its forward runs on a CPU in fp32) equals the
    loop path, ranks 8 and 4 (zero-padded to 8 for _grouped_mm's alignment)."""
    model = lora_model(bases["qwen3_moe"], lora(target_modules=EXPERT_NAMES["qwen3_moe"]))
    randomize_adapters(model)
    mlp = model.blocks[0].mlp
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(30, model.cfg.n_embd, generator=g)
    order, ends = sort_by_expert(torch.randint(0, 4, (30,), generator=g), 4)
    with torch.no_grad():
        loop = mlp.experts_loop(xs[order], ends)
        close(mlp.experts_grouped(xs[order], ends), loop)
        base = load_pretrained(bases["qwen3_moe"]).blocks[0].mlp.experts_loop(xs[order], ends)
        assert (loop - base).abs().max() > 0.1  # the adapters count


# -- what is refused ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dora=True), r"lora.dora=true: PEFT has no DoRA for transformers 5's experts"),
        (dict(target_modules=["gate"], dora=True), r"PEFT has no DoRA for transformers 5's routers"),
        (dict(dropout=0.1), r"lora.dropout=0.1: PEFT's ParamWrapper.* has no dropout"),
        (dict(quantize_base="nf4"), r"lora.quantize_base=nf4 quantises linears, not stacked experts"),
        (dict(target_modules=["w1", "w2"]), r"'w1' without 'w3': transformers 5 fuses them into gate_up_proj"),
        (
            dict(target_parameters=["experts.up_proj"]),
            r"lora.target_parameters: 'experts.up_proj' matches no parameter",
        ),
        (dict(target_modules=["gate_proj"]), r"'gate_proj' matches no module; the model has \[.*'w1'"),
    ],
)
def test_what_peft_cannot_hold_is_one_config_error_line(bases, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        apply_lora(load_pretrained(bases["mixtral"]), lora(**overrides))
    assert "\n" not in str(error.value)
    apply_lora(load_pretrained(bases["mixtral"]), lora(target_modules=ATTENTION, dora=True, dropout=0.1))  # fine


# -- a real fine-tune ----------------------------------------------------------------------------------------


@pytest.mark.heavy
def test_lora_finetune_of_a_moe_writes_an_adapter_peft_loads(tmp_path: Path) -> None:
    """train() on a tiny Qwen3-MoE checkpoint (its own tokenizer, instruct data) with adapters on the
    attention and the experts, named as on the checkpoint: the loss falls, every B learned, and the final
    adapter, loaded by PEFT onto transformers' model, scores the validation set as the run did."""
    from test_lora_train import peft_val_loss

    from trainer.__main__ import compose_config
    from trainer.loop import train

    vocab = save_tiny_tokenizer(tmp_path / "qwen3_moe", "qwen2")
    torch.manual_seed(0)
    hf_family("qwen3_moe", vocab_size=vocab, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
              max_position_embeddings=128).save_pretrained(tmp_path / "qwen3_moe")  # fmt: skip
    (tmp_path / "instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in instruct_records()))
    targets = "lora.target_modules=[q_proj,v_proj,gate_proj,up_proj,down_proj]"
    cfg, _ = compose_config(args(tmp_path, "qwen3_moe", "train.max_steps=4", targets))
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    adapter_dir = run_dir / "checkpoints" / "final" / "adapter"
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    assert any(".mlp.experts.base_layer.lora_B" in k for k in weights)
    assert all(t.abs().max() > 0 for k, t in weights.items() if "lora_B" in k)
    val_loss = next(r["val_loss"] for r in reversed(rows) if "val_loss" in r)
    assert peft_val_loss(tmp_path, "qwen3_moe", adapter_dir, cfg) == pytest.approx(val_loss, rel=1e-5)
