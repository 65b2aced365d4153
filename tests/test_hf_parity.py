"""Parity with transformers: tiny random GPT-2 / Llama / Mistral / Qwen2 checkpoints imported into GPT
give the same logits and the same gradient for every parameter (also for packed documents, each
against transformers on that document alone); export_hf round-trips through transformers as the
same architecture; sliding windows shorter than the context are computed."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import hf_gpt2, hf_llama, hf_mistral, hf_qwen2  # noqa: E402

from trainer.config import ModelConfig  # noqa: E402
from trainer.model import GPT, export_hf, load_hf_config, load_pretrained  # noqa: E402
from trainer.model.gpt import rope_inv_freq  # noqa: E402
from trainer.model.hf_import import (  # noqa: E402
    VOCAB_ROWS,
    hf_to_trainer,
    pad_vocab,
    pretrained_weights,
    read_hf_tensors,
    trim_vocab,
)
from trainer.model.loss import IGNORE_INDEX, cross_entropy_sum  # noqa: E402

VOCAB, T = 101, 12


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 40,  # at head size 16 and theta 5e5: one band each of high, medium, low
}

CASES = {
    "gpt2": lambda: hf_gpt2(),
    "gpt2-n_inner": lambda: hf_gpt2(n_inner=80),
    "gpt2-erf-gelu": lambda: hf_gpt2(activation_function="gelu"),  # model.mlp=gelu_exact
    "llama-gqa-untied": lambda: hf_llama(tie=False),
    "llama-gqa-tied": lambda: hf_llama(tie=True),
    "llama3-rope-scaling": lambda: hf_llama(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING)),
    "llama-bias": lambda: hf_llama(attention_bias=True, mlp_bias=True),
    "mistral": lambda: hf_mistral(sliding_window=None),
    "mistral-window-covers-context": lambda: hf_mistral(sliding_window=32),  # = max_position_embeddings
    "qwen2": lambda: hf_qwen2(),
    "qwen2-tied-llama3": lambda: hf_qwen2(tie=True, rope_scaling=dict(LLAMA3_SCALING)),
    "qwen2-window-in-no-layer": lambda: hf_qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=2),
}


def save_random(model, path, **save_kwargs):
    """Random weights well away from init (norm scales, biases) so every parameter matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, **save_kwargs)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (3, T), generator=g)
    targets = torch.randint(0, VOCAB, (3, T), generator=g)
    targets[0, :4] = IGNORE_INDEX
    return idx, targets


def load_reference(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def assert_parity(ours: GPT, theirs, cfg: ModelConfig, reference_grads=None) -> None:
    """Logits within 1e-5 and every parameter's gradient within 1e-5 of its scale. reference_grads:
    (transformers' model, cfg) -> its gradients under GPT's names (default: hf_to_trainer of the
    in-memory names, which equal the saved ones except for fused experts: see test_families)."""
    ours.eval()
    idx, targets = batch()
    logits = ours(idx)
    ref = theirs(idx).logits
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
    cross_entropy_sum(logits, targets).backward()
    cross_entropy_sum(ref, targets).backward()
    if reference_grads is None:
        ref_grads = hf_to_trainer({n: p.grad for n, p in theirs.named_parameters()}, cfg)
    else:
        ref_grads = reference_grads(theirs, cfg)
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert set(ours_grads) == set(ref_grads)
    for name, grad in ours_grads.items():
        scale = ref_grads[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-5 * max(1.0, scale), msg=name)


@pytest.mark.parametrize("case", CASES)
def test_logits_and_gradients_match_transformers(case, tmp_path):
    save_random(CASES[case](), tmp_path)
    cfg = load_hf_config(tmp_path)
    reference = load_reference(tmp_path)
    assert cfg.hf_model_type == reference.config.model_type
    assert_parity(load_pretrained(tmp_path), reference, cfg)


def test_llama3_scaling_changes_the_tiny_model():
    """The llama3 cases test all of it: at head size 16 the scaling keeps the highest frequency,
    blends the next and slows the rest by `factor`."""
    plain = rope_inv_freq(16, 500000.0, None)
    scaled = rope_inv_freq(16, 500000.0, LLAMA3_SCALING)
    ratio = (plain / scaled).tolist()
    assert ratio[0] == 1.0 and 1.5 < ratio[1] < 7.5 and ratio[2:] == pytest.approx([8.0] * 6)


def test_llama3_scaling_changes_transformers_logits(tmp_path):
    """Without it the reference's logits move far beyond the parity tolerance."""
    save_random(hf_llama(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING)), tmp_path / "scaled")
    save_random(hf_llama(rope_theta=500000.0), tmp_path / "plain")
    idx, _ = batch()
    with torch.no_grad():
        gap = load_reference(tmp_path / "scaled")(idx).logits - load_reference(tmp_path / "plain")(idx).logits
    assert gap.abs().max() > 1e-3


PACKED_CASES = ["gpt2", "llama3-rope-scaling", "qwen2"]


@pytest.mark.parametrize("case", PACKED_CASES)
def test_packed_documents_match_transformers_on_each_document(case, tmp_path):
    """Three documents in one row with positions reset at each: logits equal transformers' on
    each document alone, and the packed loss's gradients the sum of the documents'."""
    save_random(CASES[case](), tmp_path)
    cfg, ours, theirs = load_hf_config(tmp_path), load_pretrained(tmp_path).eval(), load_reference(tmp_path)
    idx, targets = batch()
    lengths = [5, 4, 3]  # = T
    positions = torch.cat([torch.arange(n) for n in lengths])[None].expand(3, T)  # (3, T)
    packed = ours(idx, positions=positions)
    cross_entropy_sum(packed, targets).backward()
    for doc_idx, doc_targets, start in zip(idx.split(lengths, 1), targets.split(lengths, 1), (0, 5, 9), strict=True):
        alone = theirs(doc_idx).logits
        torch.testing.assert_close(packed[:, start : start + doc_idx.size(1)], alone, rtol=0, atol=1e-5)
        cross_entropy_sum(alone, doc_targets).backward()  # accumulates over the documents
    ref_grads = hf_to_trainer({n: p.grad for n, p in theirs.named_parameters()}, cfg)
    for name, p in ours.named_parameters():
        scale = max(1.0, ref_grads[name].abs().max().item())
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=0, atol=1e-5 * scale, msg=name)


def test_sliding_windows_shorter_than_the_context_are_computed(tmp_path):
    """Mistral's window (every layer) and Qwen2's (the layers from max_window_layers on, with
    use_sliding_window) shorter than the 12 tokens: the same logits and gradients as transformers;
    without use_sliding_window Qwen2 attends to everything."""
    save_random(hf_qwen2(use_sliding_window=False, sliding_window=16), tmp_path / "qwen2-off")
    assert load_hf_config(tmp_path / "qwen2-off").sliding_window is None
    for name, model in [
        ("mistral", hf_mistral(sliding_window=5)),
        ("qwen2", hf_qwen2(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    ]:
        save_random(model, tmp_path / name)
        cfg = load_hf_config(tmp_path / name)
        assert cfg.sliding_window == 5 and [cfg.is_sliding(i) for i in range(2)] == [name == "mistral", True]
        assert cfg.layer_types == (None if name == "mistral" else ["full_attention", "sliding_attention"])
        assert_parity(load_pretrained(tmp_path / name), load_reference(tmp_path / name), cfg)


def test_config_fields(tmp_path):
    llama = hf_llama(tie=True, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING))
    save_random(llama, tmp_path / "llama")
    expected = ModelConfig(
        name="llama",
        vocab_size=VOCAB,
        block_size=32,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        intermediate_size=96,
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp="swiglu",
        position="rope",
        rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING,
        tie_embeddings=True,
        bias=False,
        pretrained=str(tmp_path / "llama"),
        hf_model_type="llama",
    )
    assert load_hf_config(tmp_path / "llama") == expected
    # transformers<5 wrote rope_theta and rope_scaling (older: "type") at the top level
    hf = json.loads((tmp_path / "llama" / "config.json").read_text())
    scaling = hf.pop("rope_parameters")
    hf["rope_theta"] = scaling.pop("rope_theta")
    scaling["type"] = scaling.pop("rope_type")
    hf["rope_scaling"] = scaling
    (tmp_path / "llama" / "config.json").write_text(json.dumps(hf))
    assert load_hf_config(tmp_path / "llama") == expected

    save_random(hf_gpt2(layer_norm_epsilon=1e-6), tmp_path / "gpt2")
    assert load_hf_config(tmp_path / "gpt2") == ModelConfig(
        name="gpt2",
        vocab_size=VOCAB,
        block_size=32,
        n_layer=2,
        n_head=4,
        n_embd=64,
        intermediate_size=256,
        norm_eps=1e-6,
        pretrained=str(tmp_path / "gpt2"),
        hf_model_type="gpt2",
    )  # the defaults are GPT-2's layout: layernorm, gelu, learned positions, biases, tied

    # Qwen2 and Mistral: Llama's fields (as `expected`), plus what sets them apart
    save_random(hf_qwen2(tie=True, rope_theta=1e6), tmp_path / "qwen2")
    assert load_hf_config(tmp_path / "qwen2") == dataclasses.replace(
        expected, name="qwen2", pretrained=str(tmp_path / "qwen2"), hf_model_type="qwen2", rope_theta=1e6,
        rope_scaling=None, qkv_bias=True,  # q / k / v biases, no other
    )  # fmt: skip
    save_random(hf_mistral(), tmp_path / "mistral")
    assert load_hf_config(tmp_path / "mistral") == dataclasses.replace(
        expected, name="mistral", pretrained=str(tmp_path / "mistral"), hf_model_type="mistral", rope_theta=10000.0,
        rope_scaling=None, tie_embeddings=False, sliding_window=4096,  # MistralConfig's default window
    )  # fmt: skip


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    reference = save_random(hf_llama(), tmp_path / "full")
    expected = load_pretrained(tmp_path / "full").state_dict()
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    torch.save(reference.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for variant in ("sharded", "bin"):
        state = load_pretrained(tmp_path / variant).state_dict()
        assert state.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(state[name], tensor), (variant, name)


def save_sharded(model, path, max_shard_size: str) -> dict[str, str]:
    """save_random in >= 3 safetensors shards; returns the index's weight_map (HF name -> file)."""
    save_random(model, path, max_shard_size=max_shard_size)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 3
    return weight_map


def to_pytorch_bin(path) -> None:
    """Rewrite a sharded safetensors checkpoint as pytorch_model-*.bin shards and their index."""
    from safetensors.torch import load_file

    index = json.loads((path / "model.safetensors.index.json").read_text())
    renamed = {}
    for shard in set(index["weight_map"].values()):
        renamed[shard] = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(load_file(path / shard), path / renamed[shard])
        (path / shard).unlink()
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (path / "model.safetensors.index.json").unlink()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("case", ["gpt2", "llama-gqa-untied", "qwen2"])
def test_pretrained_weights_stream_what_hf_to_trainer_builds(case, fmt, tmp_path):
    weight_map = save_sharded(CASES[case](), tmp_path, "30KB")
    if fmt == "bin":
        to_pytorch_bin(tmp_path)
    cfg = load_hf_config(tmp_path)
    if case != "gpt2":  # 30KB puts q, k of a layer in one shard and v in the next (Qwen2: their biases too)
        kinds = ("weight", "bias") if case == "qwen2" else ("weight",)
        shards_of_qkv = [
            {weight_map[f"model.layers.{i}.self_attn.{x}_proj.{k}"] for x in "qkv" for k in kinds}
            for i in range(cfg.n_layer)
        ]
        assert any(len(shards) > 1 for shards in shards_of_qkv)
    else:  # GPT-2 keys carry transformer., the tied head is not stored
        assert all(k.startswith("transformer.") for k in weight_map)
    expected = hf_to_trainer(read_hf_tensors(tmp_path), cfg)
    streamed = list(pretrained_weights(tmp_path, cfg))
    assert sorted(name for name, _ in streamed) == sorted(expected)  # each name exactly once
    for name, tensor in streamed:
        assert torch.equal(tensor, expected[name]), name


def test_pretrained_weights_check_names_before_reading_any_tensor(tmp_path):
    weight_map = save_sharded(hf_llama(), tmp_path, "30KB")
    cfg = load_hf_config(tmp_path)
    for shard in set(weight_map.values()):  # the check must need the index alone
        (tmp_path / shard).unlink()
    index = tmp_path / "model.safetensors.index.json"
    v_proj = "model.layers.1.self_attn.v_proj.weight"
    lacking = {k: v for k, v in weight_map.items() if k != v_proj}
    index.write_text(json.dumps({"weight_map": lacking}))
    with pytest.raises(ValueError, match=rf"lacks 1 tensors its config.json implies, e.g. \['{v_proj}'\]"):
        pretrained_weights(tmp_path, cfg)
    extra = "model.layers.0.self_attn.extra.weight"
    index.write_text(json.dumps({"weight_map": weight_map | {extra: weight_map[v_proj]}}))
    with pytest.raises(ValueError, match=rf"has 1 tensors its config.json does not account for, e.g. \['{extra}'\]"):
        pretrained_weights(tmp_path, cfg)
    # complete again: the names pass, and the shapes are read next from the shards' headers (still
    # before any tensor): the missing shard is named on the call
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-000"):
        pretrained_weights(tmp_path, cfg)


def test_pretrained_weights_read_shards_as_the_stream_goes(tmp_path):
    weight_map = save_sharded(hf_llama().to(torch.bfloat16), tmp_path, "15KB")
    cfg = load_hf_config(tmp_path)
    last = tmp_path / max(weight_map.values())
    assert [k for k, v in weight_map.items() if v == last.name] == ["lm_head.weight"]
    expected = hf_to_trainer(read_hf_tensors(tmp_path), cfg)
    stream = pretrained_weights(tmp_path, cfg)
    streamed = [next(stream)]
    last.rename(tmp_path / "moved-away")
    with pytest.raises(FileNotFoundError, match=re.escape(last.name)):
        for item in stream:
            streamed.append(item)
    # everything but the head (the last shard's only tensor) came, in the stored dtype
    assert sorted(name for name, _ in streamed) == sorted(set(expected) - {"head.weight"})
    for name, tensor in streamed:
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[name]), name


def test_overrides_and_dtype(tmp_path):
    save_random(hf_gpt2(), tmp_path)
    full = load_pretrained(tmp_path).eval()
    cropped = load_pretrained(tmp_path, block_size=16, dropout=0.1, dtype=torch.bfloat16)
    assert cropped.cfg.block_size == 16 and cropped.cfg.dropout == 0.1
    wpe = cropped.embed.wpe.weight
    assert wpe.shape == (16, 64) and wpe.dtype == torch.bfloat16
    cropped = load_pretrained(tmp_path, block_size=16).eval()
    idx, _ = batch()
    torch.testing.assert_close(cropped(idx), full(idx), rtol=0, atol=0)
    assert all(p.requires_grad for p in cropped.parameters())
    with pytest.raises(ValueError, match="exceeds the checkpoint's 32 positions"):
        load_pretrained(tmp_path, block_size=64)
    with pytest.raises(ValueError, match=r"cannot override \['n_layer'\]"):
        load_pretrained(tmp_path, n_layer=3)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: not a directory"):
        load_hf_config(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(
        ValueError,
        match="model_type 'bert' unsupported; expected one of gpt2, llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gemma3, phi3, olmo2, mixtral, qwen3_moe",
    ):
        load_hf_config(tmp_path)
    hf_llama().config.to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights; expected model.safetensors"):
        load_pretrained(tmp_path)


GPT2_EXPORT = dict(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=64)
LLAMA_EXPORT = dict(GPT2_EXPORT, intermediate_size=96, norm="rmsnorm", mlp="swiglu", position="rope", bias=False)
EXPORT_CASES = {
    "gpt2": GPT2_EXPORT,
    "gpt2-untied": dict(GPT2_EXPORT, tie_embeddings=False),
    "gpt2-erf-gelu": dict(GPT2_EXPORT, mlp="gelu_exact"),
    "llama3-tied": dict(
        LLAMA_EXPORT, n_kv_head=2, tie_embeddings=True, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING)
    ),
    "llama-untied": dict(LLAMA_EXPORT, n_kv_head=1, tie_embeddings=False),
    "qwen2": dict(LLAMA_EXPORT, n_kv_head=2, qkv_bias=True, hf_model_type="qwen2"),
    "qwen2-inferred": dict(LLAMA_EXPORT, n_kv_head=2, qkv_bias=True, tie_embeddings=False),
    "mistral": dict(LLAMA_EXPORT, n_kv_head=2, tie_embeddings=False, hf_model_type="mistral"),
}
EXPORT_CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "gpt2-untied": "GPT2LMHeadModel",
    "gpt2-erf-gelu": "GPT2LMHeadModel",
    "llama3-tied": "LlamaForCausalLM",
    "llama-untied": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2-inferred": "Qwen2ForCausalLM",  # no hf_model_type: the layout (q / k / v biases only) decides
    "mistral": "MistralForCausalLM",
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_round_trip(case, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(**EXPORT_CASES[case])
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    export_hf(model, tmp_path)
    reference = load_reference(tmp_path)
    assert type(reference).__name__ == EXPORT_CLASSES[case]
    assert_parity(model, reference, cfg)  # transformers reads what we wrote
    back = load_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():  # the vocabulary's padding rows come back zero
        assert torch.equal(back.state_dict()[name], pad_vocab(name, trim_vocab(name, tensor, cfg), cfg)), name


@pytest.mark.parametrize("case", ["qwen2-tied-llama3", "mistral-window-covers-context", "llama-gqa-tied"])
def test_a_checkpoint_exports_back_to_its_own_architecture(case, tmp_path):
    """transformers checkpoint -> GPT -> export_hf -> transformers: the same class, the same logits."""
    original = save_random(CASES[case](), tmp_path / "in").eval()
    export_hf(load_pretrained(tmp_path / "in"), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    back = load_reference(tmp_path / "out")
    assert type(back) is type(original) and written["architectures"] == [type(original).__name__]
    assert written.get("sliding_window") == getattr(original.config, "sliding_window", None)
    idx, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, original(idx).logits, rtol=0, atol=1e-5)


def test_export_rejects_layouts_without_hf_equivalent(tmp_path):
    model = GPT(ModelConfig(vocab_size=VOCAB, position="rope", norm="layernorm"))
    with pytest.raises(ValueError, match="matches no Hugging Face family: gpt2 has no model.position='rope'"):
        export_hf(model, tmp_path)
    for kwargs, model_type in [
        (GPT2_EXPORT, "qwen2"),
        (LLAMA_EXPORT, "gpt2"),
        (dict(LLAMA_EXPORT, bias=True), "mistral"),
    ]:
        model = GPT(ModelConfig(**kwargs, hf_model_type=model_type))
        with pytest.raises(ValueError, match=f"cannot be written as hf_model_type={model_type}: {model_type} has"):
            export_hf(model, tmp_path)


# -- an odd vocabulary: padded to model.vocab_multiple on import, trimmed on export ------------------

ODD_VOCAB = 1001  # padded to 1024 rows
ODD_CASES = {
    "gpt2-tied": lambda: hf_gpt2(vocab_size=ODD_VOCAB),
    "llama-untied": lambda: hf_llama(tie=False, vocab_size=ODD_VOCAB),
}


@pytest.mark.parametrize("chunk", [0, 7], ids=["logits", "chunked"])
@pytest.mark.parametrize("case", ODD_CASES)
def test_an_odd_vocabulary_is_padded_and_matches_transformers(case, chunk, tmp_path):
    """A sharded checkpoint of 1001 tokens streams in with 23 zero rows; forward's logits, the loss
    of either loss path (ids up to the last real token) and every gradient equal transformers'."""
    save_random(ODD_CASES[case](), tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) >= 3
    theirs = load_reference(tmp_path)
    ours = load_pretrained(tmp_path, loss_chunk_size=chunk).eval()
    cfg = ours.cfg
    assert (cfg.vocab_size, cfg.padded_vocab_size) == (ODD_VOCAB, 1024)
    for name, p in ours.named_parameters():
        if name in VOCAB_ROWS:
            assert p.shape[0] == 1024 and torch.all(p[ODD_VOCAB:] == 0), name
    g = torch.Generator().manual_seed(1)
    idx, targets = (torch.randint(0, ODD_VOCAB, (3, T), generator=g) for _ in range(2))
    targets[0, :4], targets[1, :3] = IGNORE_INDEX, ODD_VOCAB - 1
    logits, ref = ours(idx), theirs(idx).logits
    assert logits.shape == ref.shape == (3, T, ODD_VOCAB)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
    loss, ref_loss = ours(idx, targets), cross_entropy_sum(ref, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    loss.backward()
    ref_loss.backward()
    ref_grads = hf_to_trainer({n: p.grad for n, p in theirs.named_parameters()}, cfg)  # zero padding rows
    for name, p in ours.named_parameters():
        if name in VOCAB_ROWS:
            assert torch.all(p.grad[ODD_VOCAB:] == 0), name
        scale = max(1.0, ref_grads[name].abs().max().item())
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=0, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("case", ODD_CASES)
def test_an_odd_vocabulary_exports_in_the_checkpoints_own_shapes(case, tmp_path):
    """checkpoint -> padded GPT -> export_hf: the same tensors, shapes and config vocab_size as the
    checkpoint, whatever the padding rows hold; transformers gives the original's logits."""
    original = save_random(ODD_CASES[case](), tmp_path / "in").eval()
    model = load_pretrained(tmp_path / "in")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in VOCAB_ROWS:
                p[ODD_VOCAB:] = 1.0  # not zero: the export must drop the padding, not find it empty
    export_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == ODD_VOCAB
    written, stored = read_hf_tensors(tmp_path / "out"), read_hf_tensors(tmp_path / "in")
    assert written.keys() == stored.keys()
    for name, tensor in stored.items():
        assert torch.equal(written[name], tensor), name
    back = load_reference(tmp_path / "out")
    assert back.get_output_embeddings().weight.shape == (ODD_VOCAB, back.config.hidden_size)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, ODD_VOCAB, (2, T), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, original(idx).logits, rtol=0, atol=1e-5)
