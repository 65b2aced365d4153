"""The later families (Qwen3, Gemma 3, Gemma 2, Phi-3, OLMo 2, Mixtral, Qwen3-MoE) against
transformers' own models: tiny random checkpoints built here import into GPT with the same logits
and the same gradient for every parameter (fp32, 1e-5; MoE with the load-balancing loss in the
training loss), export back as the same architecture, and generate greedily as transformers does.
The registry holds one module per model_type."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import test_hf_parity as hf_parity  # noqa: E402
from helpers import hf_family  # noqa: E402
from test_hf_parity import batch, load_reference, save_random  # noqa: E402

from trainer.config import MODEL_TYPES, ModelConfig  # noqa: E402
from trainer.model import GPT, export_hf, load_hf_config, load_pretrained  # noqa: E402
from trainer.model.families import FAMILIES, family  # noqa: E402
from trainer.model.hf_import import hf_to_trainer, model_family  # noqa: E402
from trainer.model.loss import IGNORE_INDEX  # noqa: E402


def unfuse_experts(named: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """transformers 5 holds a sparse MLP's experts fused in memory (experts.gate_up_proj (E, 2I, H),
    experts.down_proj (E, H, I)) and saves one tensor per expert: the in-memory tensors (here the
    gradients) under the saved names, which hf_to_trainer reads."""
    block, names = (
        ("block_sparse_moe", ("w1", "w3", "w2"))
        if model_type == "mixtral"
        else ("mlp", ("gate_proj", "up_proj", "down_proj"))
    )
    out = {}
    for key, t in named.items():
        layer = key.split(".mlp.")[0]
        if key.endswith("mlp.experts.gate_up_proj"):
            for e, (gate, up) in enumerate(zip(*t.chunk(2, dim=1), strict=True)):
                out[f"{layer}.{block}.experts.{e}.{names[0]}.weight"] = gate
                out[f"{layer}.{block}.experts.{e}.{names[1]}.weight"] = up
        elif key.endswith("mlp.experts.down_proj"):
            for e, down in enumerate(t):
                out[f"{layer}.{block}.experts.{e}.{names[2]}.weight"] = down
        elif key.endswith("mlp.gate.weight"):
            out[f"{layer}.{block}.gate.weight"] = t
        else:
            out[key] = t
    return out


def reference_grads(theirs, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    grads = unfuse_experts({k: p.grad for k, p in theirs.named_parameters()}, cfg.hf_model_type)
    if cfg.hf_model_type == "gemma3":  # transformers 5 holds model.language_model.*, saves language_model.model.*
        grads = {k.replace("model.language_model.", "language_model.model."): g for k, g in grads.items()}
        grads = {k: g for k, g in grads.items() if k.startswith("language_model.")}
    return hf_to_trainer(grads, cfg)


CASES = {
    "qwen3": lambda: hf_family("qwen3"),
    "qwen3-window": lambda: hf_family("qwen3", use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "gemma3": lambda: hf_family("gemma3_text"),
    "gemma2": lambda: hf_family("gemma2"),
    "phi3": lambda: hf_family("phi3"),
    "phi3-window": lambda: hf_family("phi3", sliding_window=5),
    # LongRoPE: the short factors within the original 16 positions; batch() runs 12
    "phi3-longrope": lambda: hf_family(
        "phi3",
        original_max_position_embeddings=16,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 1e4,
            "short_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0],
            "long_factor": [2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0],
        },
    ),  # fmt: skip
    "olmo2": lambda: hf_family("olmo2"),
    "mixtral": lambda: hf_family("mixtral"),
    "mixtral-window": lambda: hf_family("mixtral", sliding_window=5),
    "qwen3_moe": lambda: hf_family("qwen3_moe"),
    "qwen3_moe-dense-layer-unnormalised": lambda: hf_family("qwen3_moe", mlp_only_layers=[0], norm_topk_prob=False),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_and_gradients_match_transformers(case, tmp_path):
    save_random(CASES[case](), tmp_path)
    cfg = load_hf_config(tmp_path)
    reference = load_reference(tmp_path)
    assert cfg.hf_model_type == reference.config.model_type
    assert_parity(load_pretrained(tmp_path), reference, cfg)


def assert_parity(ours: GPT, theirs, cfg: ModelConfig) -> None:
    """test_hf_parity's check, with transformers' fused in-memory experts read under their saved names."""
    hf_parity.assert_parity(ours, theirs, cfg, reference_grads)


def test_longrope_switches_to_the_long_factors_past_the_original_context(tmp_path):
    """At 24 positions (> the original 16) both models use the long factors; the logits differ from
    the short factors' far beyond the tolerance, and still match transformers'."""
    save_random(CASES["phi3-longrope"](), tmp_path)
    ours, theirs = load_pretrained(tmp_path).eval(), load_reference(tmp_path)
    idx = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, rtol=0, atol=1e-5)
        short = ours(idx[:, :16])
    assert (ours(idx)[:, :16] - short).abs().max() > 1e-3


MOE_CASES = ["mixtral", "qwen3_moe", "qwen3_moe-dense-layer-unnormalised"]


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_training_loss_is_transformers_loss_with_the_aux_loss(case, tmp_path):
    """In training mode GPT's summed loss over the batch's targets is transformers' loss with
    output_router_logits: the mean cross-entropy plus router_aux_loss_coef times the load-balancing
    loss, and so are the gradients (the router's included)."""
    save_random(CASES[case](), tmp_path)
    cfg = load_hf_config(tmp_path)
    ours, theirs = load_pretrained(tmp_path).train(), load_reference(tmp_path).train()
    assert cfg.router_aux_loss_coef == 0.02
    idx, targets = batch()
    targets[:, -1] = IGNORE_INDEX  # transformers drops the last position: it has no label after it
    loss = ours(idx, targets) / (targets != IGNORE_INDEX).sum()
    labels = torch.cat([torch.full((3, 1), IGNORE_INDEX), targets[:, :-1]], dim=1)  # shifted back by one
    out = theirs(idx, labels=labels, output_router_logits=True)
    torch.testing.assert_close(loss, out.loss, rtol=0, atol=1e-5)
    assert out.aux_loss > 0 and ours.moe_aux_loss == pytest.approx(out.aux_loss.item(), abs=1e-6)
    loss.backward()
    out.loss.backward()
    ref = reference_grads(theirs, cfg)
    for name, p in ours.named_parameters():
        scale = max(1.0, ref[name].abs().max().item())
        torch.testing.assert_close(p.grad, ref[name], rtol=0, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_a_checkpoint_exports_back_to_its_own_architecture(case, tmp_path):
    """transformers checkpoint -> GPT -> export_hf -> transformers: the same class and config, the
    same logits; and GPT's greedy generation equals transformers' generate on the export."""
    original = save_random(CASES[case](), tmp_path / "in").eval()
    model = load_pretrained(tmp_path / "in").eval()
    export_hf(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    back = load_reference(tmp_path / "out")
    assert type(back) is type(original) and written["architectures"] == [type(original).__name__]
    assert written["model_type"] == original.config.model_type
    idx, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, original(idx).logits, rtol=0, atol=1e-5)
    prompt = idx[:1, :4]
    theirs = back.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = model.generate(prompt, max_new_tokens=16, temperature=0.0)
    assert torch.equal(ours, theirs)


def test_the_registry_holds_one_module_per_model_type():
    for model_type in MODEL_TYPES:
        assert family(model_type).model_type == model_type
    assert set(FAMILIES) == set(MODEL_TYPES)
    with pytest.raises(ValueError, match="model_type 'bert' unsupported; expected one of gpt2, llama"):
        family("bert")


def test_a_family_refuses_a_switch_it_does_not_have():
    cfg = ModelConfig(vocab_size=101, n_embd=64, n_head=4, norm="rmsnorm", mlp="swiglu", position="rope",
                      bias=False, qk_norm="full", hf_model_type="qwen3")  # fmt: skip
    with pytest.raises(
        ValueError, match=r"cannot be written as hf_model_type=qwen3: qwen3 has no model.qk_norm='full'"
    ):
        model_family(cfg)
    with pytest.raises(ValueError, match=r"matches no Hugging Face family: .* olmo2 has no model.norm_placement='pre'"):
        model_family(ModelConfig(**{**cfg.__dict__, "hf_model_type": None}))
    olmo2 = ModelConfig(**{**cfg.__dict__, "hf_model_type": None, "norm_placement": "post"})
    assert model_family(olmo2).model_type == "olmo2"  # the first family whose switches fit


def test_gemma3_windows_of_1024_at_4096_tokens_match_transformers(tmp_path):
    """Gemma 3's 1024-token windows at a 4096-token context (a sliding and a full layer, tiny width):
    the logits equal transformers' (its SDPA path), and in the sliding layer a token 1024 or more
    positions back does not reach the output (zero gradient)."""
    config = dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  sliding_window=1024, max_position_embeddings=8192)  # fmt: skip
    save_random(hf_family("gemma3_text", **config), tmp_path)
    ours = load_pretrained(tmp_path).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    idx = torch.randint(0, 101, (1, 4096), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[:, -64:], theirs(idx).logits[:, -64:], rtol=0, atol=1e-5)  # measured 0
    x = torch.randn(1, 4096, 32, requires_grad=True)
    sliding = ours.blocks[0].attn
    assert sliding.window == 1024 and ours.blocks[1].attn.window is None
    sliding(x, None)[0, -1].sum().backward()
    reach = x.grad[0].abs().sum(-1)  # (T,) how much each input position moves the last output
    assert reach[: 4096 - 1024].max() == 0 and reach[4096 - 1024 :].min() > 0


def test_a_multimodal_gemma3_trains_its_text_model_and_exports_whole(tmp_path):
    """Gemma 3's multimodal checkpoint (model_type gemma3): its text model imports with the same text
    logits and gradients as transformers' Gemma3ForConditionalGeneration, and the export is that
    class again, the vision tower copied unchanged and the logits equal."""
    text = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20, sliding_window=6,
                max_position_embeddings=32, rms_norm_eps=1e-5)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    original = save_random(transformers.Gemma3ForConditionalGeneration(config), tmp_path / "in").eval()
    cfg = load_hf_config(tmp_path / "in")
    assert (cfg.hf_model_type, cfg.vocab_size, cfg.qk_norm, cfg.norm_placement) == ("gemma3", 101, "head", "sandwich")
    ours = load_pretrained(tmp_path / "in")
    assert_parity(ours, load_reference(tmp_path / "in"), cfg)
    export_hf(ours, tmp_path / "out")
    back = load_reference(tmp_path / "out")
    assert type(back).__name__ == "Gemma3ForConditionalGeneration"
    idx, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, original(idx).logits, rtol=0, atol=1e-5)
    theirs = dict(back.named_parameters())
    for name, p in original.named_parameters():
        if "vision_tower" in name or "multi_modal_projector" in name:
            assert torch.equal(theirs[name], p), name


def test_a_tensor_whose_shape_config_json_does_not_imply_is_refused_before_reading(tmp_path):
    """config.json and the weights disagree on a shape (an expert's width, q_norm's size): one line
    naming the tensor and both shapes, from the safetensors header, before any tensor is read."""
    save_random(CASES["qwen3_moe"](), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"moe_intermediate_size": 48}))
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    with pytest.raises(ValueError, match=rf"^checkpoint tensor {name} has shape \(40, 64\), but config.json implies "
                       r"\(48, 64\) for it: config.json and the weights disagree$"):  # fmt: skip
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"head_dim": 16}))
    with pytest.raises(ValueError, match=r"self_attn.q_proj.weight has shape \(96, 64\), but config.json implies a 3"):
        load_pretrained(tmp_path)


def test_the_run_refuses_disagreeing_weights_before_any_work(tmp_path):
    """check_run (the preflight, before data or model are built) names the tensor."""
    from trainer.__main__ import compose_config
    from trainer.config import ConfigError
    from trainer.preflight import check_run

    save_random(CASES["olmo2"](), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"intermediate_size": 80}))
    cfg, _ = compose_config([f"model.pretrained={tmp_path}", "train.seq_len=16"])
    with pytest.raises(ConfigError, match=rf"^model.pretrained={tmp_path}: checkpoint tensor "
                       r"model.layers.0.mlp.gate_proj.weight has shape \(96, 64\), but config.json implies \(80, 64\)"):  # fmt: skip
        check_run(cfg)


def test_flops_count_a_token_s_experts_and_a_sliding_layer_s_window():
    """6 x the weights a token uses (k of E experts) + 12 x (n_head head_dim) x the keys each layer
    reads (its window when shorter than the sequence)."""
    cfg = ModelConfig(vocab_size=64, vocab_multiple=1, n_layer=2, n_head=2, n_embd=16, head_dim=8, mlp="swiglu",
                      norm="rmsnorm", position="rope", bias=False, n_experts=4, n_experts_per_token=1,
                      moe_intermediate_size=12, sliding_window=5, layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    with torch.device("meta"):
        model = GPT(cfg)
    experts = 2 * 3 * 4 * 12 * 16  # 2 layers x (gate, up, down) x E x I x H
    assert model.active_params() == model.num_params() - experts * 3 // 4
    non_embedding = model.active_params(exclude_embeddings=True)
    assert model.flops_per_token(32) == 6 * non_embedding + 12 * 2 * 8 * (5 + 32)
