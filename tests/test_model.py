"""GPT: shapes, parameter groups, init, limits, tying, generation, presets and their sizes."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import GPT2_LIKE, LLAMA_LIKE
from omegaconf import OmegaConf

from trainer.config import ConfigError, ModelConfig
from trainer.model import GPT, check_attention_backend, param_group
from trainer.model.checkpointing import apply_activation_checkpointing

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


def make(**kwargs) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**kwargs))


@pytest.mark.parametrize("kwargs", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_forward_shape_and_finite(kwargs):
    model = make(**kwargs)
    idx = torch.randint(0, 97, (3, 11))
    logits = model(idx)
    assert logits.shape == (3, 11, 97)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kwargs", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_causal_prefix_invariance(kwargs):
    """Logits at position t depend only on tokens <= t."""
    model = make(**kwargs).eval()
    idx = torch.randint(0, 97, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 97
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_param_groups_partition(kwargs):
    model = make(**kwargs)
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        groups[param_group(name)] = groups.get(param_group(name), 0) + p.numel()
    blocks = {f"block.{i}.{kind}" for i in range(2) for kind in ("attn", "mlp", "norm")}
    expected = {"embed", "head"} | blocks
    assert set(groups) == expected
    assert sum(groups.values()) == model.num_params()  # every parameter counted exactly once


def test_param_group_names():
    assert param_group("embed.wte.weight") == "embed"
    assert param_group("embed.wpe.weight") == "embed"
    assert param_group("blocks.3.attn.c_attn.weight") == "block.3.attn"
    assert param_group("blocks.11.mlp.w_gate.weight") == "block.11.mlp"
    assert param_group("blocks.0.norm_2.bias") == "block.0.norm"
    assert param_group("norm_f.weight") == "head"
    assert param_group("head.weight") == "head"
    # wrapper prefixes from DDP, torch.compile, FSDP1, activation checkpointing, peft
    assert param_group("module._orig_mod.blocks.2.attn.c_proj.weight") == "block.2.attn"
    assert param_group("_fsdp_wrapped_module.blocks.1._fsdp_wrapped_module.mlp.c_fc.bias") == "block.1.mlp"
    assert param_group("blocks.5._checkpoint_wrapped_module.norm_1.weight") == "block.5.norm"
    assert param_group("base_model.model.blocks.0.attn.c_attn.lora_A.weight") == "block.0.attn"
    with pytest.raises(ValueError, match="not a GPT parameter"):
        param_group("blocks.0.unknown.weight")


# Wide enough that each weight's sample std is within a few percent of the true one.
WIDE = {
    "gpt2": dict(vocab_size=64, block_size=8, n_layer=8, n_head=4, n_embd=256),
    "llama": {**LLAMA_LIKE, "n_layer": 8, "n_embd": 256, "intermediate_size": 512},
}


def meta_model(**kwargs) -> GPT:
    with torch.device("meta"):
        return GPT(ModelConfig(**kwargs))


def assert_follows_init_rules(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Norm scales one, biases zero, residual projections (c_proj) N(0, std / sqrt(2 n_layer)),
    every other weight N(0, std); the vocabulary's padding rows zero."""
    residual = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    kinds = set()
    for name, t in tensors.items():
        if name in ("embed.wte.weight", "head.weight"):
            assert t.size(0) == cfg.padded_vocab_size and torch.all(t[cfg.vocab_size :] == 0), name
            t = t[: cfg.vocab_size]
        if name.endswith("bias"):
            kinds.add("bias")
            assert torch.all(t == 0), name
        elif "norm" in name:
            kinds.add("norm")
            assert torch.all(t == 1), name
        else:
            kinds.add("c_proj" if name.endswith("c_proj.weight") else "weight")
            std = residual if name.endswith("c_proj.weight") else cfg.init_std
            # sample std and mean of n normal draws: within 5 standard errors
            se = 1 / math.sqrt(t.numel())
            assert t.std().item() == pytest.approx(std, rel=5 * se / math.sqrt(2)), name
            assert abs(t.mean().item()) < 5 * std * se, name
    assert kinds >= {"norm", "c_proj", "weight"} | ({"bias"} if cfg.bias else set())


@pytest.mark.parametrize("layout", WIDE)
@pytest.mark.parametrize("source", ["init_weights", "initial_weights"])
def test_init_rules(source, layout):
    kwargs = {**WIDE[layout], "init_std": 0.03}
    if source == "init_weights":
        tensors = dict(make(**kwargs).named_parameters())
    else:
        tensors = dict(meta_model(**kwargs).initial_weights(seed=0))
    assert_follows_init_rules(tensors, ModelConfig(**kwargs))


@pytest.mark.parametrize("kwargs", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_initial_weights_fill_a_meta_built_model(kwargs):
    def filled(seed: int) -> dict[str, torch.Tensor]:
        model = meta_model(**kwargs)
        model.to_empty(device="cpu")  # what a strategy does after sharding
        stream = model.initial_weights(seed)
        with torch.no_grad():
            for (name, p), (streamed, tensor) in zip(model.named_parameters(), stream, strict=True):
                assert streamed == name and tensor.dtype == torch.float32
                p.copy_(tensor)
        return model.state_dict()

    first, again, other = filled(0), filled(0), filled(1)
    assert first.keys() == again.keys() == other.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, again[name]), name
        constant = bool(torch.all(tensor == tensor.flatten()[0]))  # norms, biases
        assert torch.equal(tensor, other[name]) == constant, name
    # the seed alone decides: a model built on CPU (after other draws) streams the same values
    torch.manual_seed(123)
    for name, tensor in GPT(ModelConfig(**kwargs)).initial_weights(0):
        assert torch.equal(tensor, first[name]), name


def test_init_rule_ignores_wrapper_names():
    cfg = ModelConfig(**GPT2_LIKE, activation_checkpointing="full")
    model = meta_model(**GPT2_LIKE)
    expected = list(model.initial_weights(seed=0))
    assert apply_activation_checkpointing(model, cfg) == 2
    names = [name for name, _ in model.named_parameters()]
    assert "blocks.0._checkpoint_wrapped_module.attn.c_proj.weight" in names
    wrapped = list(model.initial_weights(seed=0))  # unwrapped names, same values
    assert [name for name, _ in wrapped] == [name for name, _ in expected]
    for (name, tensor), (_, value) in zip(wrapped, expected, strict=True):
        assert torch.equal(tensor, value), name
    residual = torch.empty(512, 512)
    model.init_parameter("module.blocks.0._checkpoint_wrapped_module.attn.c_proj.weight", residual)
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.03)


def test_meta_build_initialises_nothing(monkeypatch):
    """Building on meta reads shapes only: no init rule runs, even for a 10B-parameter model."""
    filled = []
    monkeypatch.setattr(GPT, "init_parameter", lambda self, name, *args: filled.append(name))
    big = dict(vocab_size=50304, block_size=2048, n_layer=48, n_head=32, n_embd=4096)
    model = meta_model(**big)
    assert filled == []
    assert all(p.is_meta for p in model.parameters()) and model.num_params() > 9e9
    small = make(**GPT2_LIKE)  # on CPU the rules do run, one call per parameter
    assert filled == [name for name, _ in small.named_parameters()]


def test_meta_build_then_init_weights():
    model = meta_model(**LLAMA_LIKE)
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.all(model.norm_f.weight == 1)
    assert model.blocks[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.isfinite(model(torch.randint(0, 97, (1, 5)))).all()


def test_too_long_sequence_raises():
    model = make(**GPT2_LIKE)
    with pytest.raises(ValueError, match="exceeds model.block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_missing_vocab_raises():
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(ModelConfig(vocab_size=None))


def test_tied_head_shares_embedding():
    model = make(**GPT2_LIKE)
    names = dict(model.named_parameters())
    assert model.head is None
    assert "head.weight" not in names and "head.weight" not in model.state_dict()
    hidden = {}
    model.norm_f.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
    logits = model(torch.randint(0, 97, (2, 5)))
    expected = F.linear(hidden["h"], model.embed.wte.weight[:97])  # the padding rows (97 -> 128) cut
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    untied = make(**{**GPT2_LIKE, "tie_embeddings": False})
    assert untied.head.weight.data_ptr() != untied.embed.wte.weight.data_ptr()
    assert untied.num_params() - model.num_params() == 128 * 32  # the head's rows, padding included


def test_num_params_and_flops():
    model = make(**LLAMA_LIKE)
    # untied: wte is only a lookup, so it drops (its 97 rows padded to 128)
    assert model.num_params(exclude_embeddings=True) == model.num_params() - 128 * 32
    # tied: wte is also the head's matmul, so only wpe drops
    gpt2 = make(**GPT2_LIKE)
    assert gpt2.num_params(exclude_embeddings=True) == gpt2.num_params() - 16 * 32
    n = model.num_params(exclude_embeddings=True)
    assert model.flops_per_token(16) == 6 * n + 12 * 2 * 32 * 16


def test_generate_length_and_determinism():
    model = make(**GPT2_LIKE).eval()
    prompt = torch.randint(0, 97, (2, 6))
    out = model.generate(prompt, 20, generator=torch.Generator().manual_seed(1), top_k=5)
    assert out.shape == (2, 26)  # ran past block_size=16 by cropping the context
    assert torch.equal(out[:, :6], prompt)
    again = model.generate(prompt, 20, generator=torch.Generator().manual_seed(1), top_k=5)
    assert torch.equal(out, again)
    greedy = model.generate(prompt, 1, temperature=0)
    assert torch.equal(greedy[:, -1], model(prompt)[:, -1].argmax(-1))


# -- packed documents: positions restart at 0 where a document starts ---------------------------

LENGTHS = (6, 3, 5)  # three documents packed into one row of 14 tokens


def packed_row(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx, targets (2, 14) and positions (2, 14): row 0 packs LENGTHS, row 1 is one document."""
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, 97, (2, 14), generator=g), torch.randint(0, 97, (2, 14), generator=g)
    positions = torch.stack([torch.cat([torch.arange(n) for n in LENGTHS]), torch.arange(14)])
    return idx, targets, positions


def grads(model: GPT) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out


@pytest.mark.parametrize("kwargs", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_packed_documents_equal_each_document_alone(kwargs):
    """Logits, token losses and gradients of a packed row are those of its documents run alone."""
    model = make(**kwargs).eval()
    idx, targets, positions = packed_row()
    packed = model(idx, positions=positions)  # (2, 14, vocab)
    token_losses = F.cross_entropy(packed[0], targets[0], reduction="none")  # (14,)
    model(idx[:1], targets[:1], positions=positions[:1]).backward()
    packed_grads = grads(model)
    start = 0
    for n in LENGTHS:
        doc, doc_targets = idx[:1, start : start + n], targets[:1, start : start + n]
        alone = model(doc)  # (1, n, vocab), positions 0 .. n - 1
        torch.testing.assert_close(packed[:1, start : start + n], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            token_losses[start : start + n], F.cross_entropy(alone[0], doc_targets[0], reduction="none")
        )
        model(doc, doc_targets).backward()  # accumulates over the documents
        start += n
    for name, grad in grads(model).items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # the one-document row equals running without positions; and documents do see each other without them
    torch.testing.assert_close(packed[1:], model(idx[1:]), rtol=0, atol=1e-5)
    assert (model(idx[:1])[0, LENGTHS[0] :] - packed[0, LENGTHS[0] :]).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_positions_with_chunked_loss_and_attention_backends(kwargs):
    idx, targets, positions = packed_row(seed=1)
    plain = make(**kwargs)
    loss = plain(idx, targets, positions=positions)
    loss.backward()
    chunked = make(**kwargs, loss_chunk_size=5)
    chunked_loss = chunked(idx, targets, positions=positions)
    chunked_loss.backward()
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=1e-5)
    for (name, p), q in zip(chunked.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    math_ = make(**kwargs, attention_backend="math")
    torch.testing.assert_close(math_(idx, positions=positions), plain(idx, positions=positions), rtol=1e-5, atol=1e-6)
    for backend in ("flash", "flash_attn"):  # neither takes a mask: refused in one line, naming the fix
        with pytest.raises(ConfigError, match=f"attention_backend={backend} cannot keep packed documents apart.*auto"):
            make(**kwargs, attention_backend=backend)(idx, positions=positions)
    with pytest.raises(ValueError, match="positions .* must match idx"):
        plain(idx, positions=positions[:, :5])


def test_dropout_only_in_training():
    model = make(**{**GPT2_LIKE, "dropout": 0.5})
    idx = torch.randint(0, 97, (2, 8))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx), rtol=0, atol=0)
    model.train()
    assert (model(idx) - model(idx)).abs().max() > 1e-4


@pytest.mark.parametrize("kwargs", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_attention_backends_agree_on_cpu(kwargs):
    auto = make(**kwargs).eval()
    math_ = make(**kwargs, attention_backend="math").eval()
    idx = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(auto(idx), math_(idx), rtol=1e-5, atol=1e-6)


def test_check_attention_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for backend in ("auto", "math"):
        check_attention_backend(backend, cpu, torch.float32)  # runs everywhere
    check_attention_backend("efficient", cuda, torch.float32)
    check_attention_backend("flash", cuda, torch.bfloat16)
    check_attention_backend("cudnn", cuda, torch.bfloat16)
    for backend in ("flash", "efficient", "cudnn", "flash_attn"):
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            check_attention_backend(backend, cpu, torch.bfloat16)
    for backend in ("flash", "cudnn", "flash_attn"):
        with pytest.raises(ConfigError, match="needs fp16 or bf16"):
            check_attention_backend(backend, cuda, torch.float32)
    model = make(**{**GPT2_LIKE, "attention_backend": "flash"})
    with pytest.raises(ValueError, match="attention_backend=flash needs a CUDA device"):
        model(torch.zeros(1, 4, dtype=torch.long))


def load_preset(path: Path) -> ModelConfig:
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def test_every_preset_loads_and_starts_with_its_command():
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {f.stem for f in files} >= {"tiny", "gpt2", "gpt2-medium", "llama-1b", "llama3-8b"}
    for f in files:
        cfg = load_preset(f)
        assert cfg.name == f.stem
        assert f.read_text().startswith(f"# python -m trainer model={f.stem}")


# Reference sizes: GPT-2 124M / 355M as released, Llama 3.2 1B and Llama 3.1 8B as released.
@pytest.mark.parametrize(
    "preset,params",
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("llama-1b", 1_235_814_400),
        ("llama3-8b", 8_030_261_248),
    ],
)
def test_preset_parameter_counts(preset, params):
    cfg = load_preset(CONFIG_DIR / f"{preset}.yaml")
    with torch.device("meta"):  # shapes only, nothing allocated
        model = GPT(cfg)
        released = GPT(dataclasses.replace(cfg, vocab_multiple=1))
    assert released.num_params() == params
    # the vocabulary padded to a multiple of 64 (GPT-2's 50257 to 50304; Llama's 128256 is one)
    padding_rows = {"gpt2": 47, "gpt2-medium": 47}.get(preset, 0) * (1 if cfg.tie_embeddings else 2)
    assert model.num_params() == params + padding_rows * cfg.n_embd


def test_tiny_preset_is_small():
    cfg = load_preset(CONFIG_DIR / "tiny.yaml")
    cfg.vocab_size = 256
    model = GPT(cfg)
    assert model.num_params() < 2_000_000
    assert model(torch.randint(0, 256, (1, cfg.block_size))).shape == (1, cfg.block_size, 256)


def test_auto_attention_is_resolved_once_at_build_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto -> FA3 only on a Hopper GPU with flash_attn_interface installed, in half precision, with
    no document mask and no dropout. No GPU here: capability and package are stood in for."""
    import importlib.util

    from trainer.model import resolve_attention_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_attention_backend("auto", cpu, torch.bfloat16, masked=False) == "auto"
    assert resolve_attention_backend("math", cpu, torch.float32, masked=True) == "math"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn_interface" else real(n, *a)
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_attention_backend("auto", cuda, torch.bfloat16, masked=False) == "flash_attn"
    assert resolve_attention_backend("cudnn", cuda, torch.bfloat16, masked=False) == "cudnn"  # explicit: kept
    for dtype, masked, dropout in (
        (torch.bfloat16, True, 0.0),
        (torch.float32, False, 0.0),
        (torch.bfloat16, False, 0.1),
    ):
        assert resolve_attention_backend("auto", cuda, dtype, masked=masked, dropout=dropout) == "auto"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100: SDPA decides
    assert resolve_attention_backend("auto", cuda, torch.bfloat16, masked=False) == "auto"


def test_a_lazy_init_draws_any_rows_as_the_whole_tensor_has_them():
    """InitTensor.rows (what an FSDP2 shard draws) equals the same rows of full(), across block boundaries;
    the padded vocabulary's rows are zero whichever block holds them."""
    from trainer.model.gpt import INIT_ROWS

    model = meta_model(**{**GPT2_LIKE, "vocab_size": 3 * INIT_ROWS - 5, "vocab_multiple": INIT_ROWS})
    for name, lazy in model.initial_weights(seed=3, lazy=True):
        whole = lazy.full()
        n = whole.shape[0]
        for start, stop in ((0, 1), (INIT_ROWS - 1, INIT_ROWS + 2), (n // 3, n), (n - 1, n)):
            assert torch.equal(lazy.rows(start, stop), whole[start:stop]), (name, start, stop)
        if name == "embed.wte.weight":
            assert n == 3 * INIT_ROWS and torch.all(whole[3 * INIT_ROWS - 5 :] == 0) and whole[: n - 5].std() > 0
