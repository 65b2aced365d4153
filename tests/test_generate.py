"""GPT.generate: the KV cache gives the cache-free path's tokens (also past block_size), greedy
decoding equals transformers' generate on the same weights, eos ends rows, sampling repeats."""

from __future__ import annotations

import pytest
import torch
from helpers import GPT2_LIKE, LLAMA_LIKE, hf_gpt2, hf_llama, hf_qwen2

from trainer.config import ModelConfig
from trainer.model import GPT, load_pretrained
from trainer.model.attention import KVCache

LAYOUTS = {"gpt2": GPT2_LIKE, "llama": LLAMA_LIKE}


def varied(model: torch.nn.Module) -> torch.nn.Module:
    """Weights large enough that greedy decoding wanders over many tokens instead of repeating one."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wpe" not in name:
                p.normal_(0.0, 4.0 / p.size(-1) ** 0.5)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make(layout: str) -> GPT:
    torch.manual_seed(0)
    return varied(GPT(ModelConfig(**LAYOUTS[layout]))).eval()


def prompt(batch: int = 2, length: int = 5, vocab: int = 97) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cache_gives_the_cache_free_tokens_past_block_size(layout):
    model = make(layout)
    lengths = []  # tokens each forward runs
    model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].size(1)))
    ids = prompt()
    cached = model.generate(ids, 20, temperature=0)
    # the prompt, then one token a step until the context holds block_size=16; then the cropped context
    assert lengths == [5] + [1] * 11 + [16] * 8
    lengths.clear()
    plain = model.generate(ids, 20, temperature=0, use_cache=False)
    assert lengths == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16] + [16] * 8
    assert cached.shape == (2, 25) and torch.equal(cached, plain)
    assert len(set(cached[:, 5:].flatten().tolist())) > 8  # a real test: many different tokens


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cache_fed_in_pieces_gives_the_full_forward(layout):
    """Queries after cached keys (a piece of 4 after 5, then 1 after 9) see exactly the causal past."""
    model = make(layout).double()  # float64: the pieces' sums differ from the full forward's by rounding only
    ids = prompt(length=10)
    cache = KVCache(len(model.blocks), model.cfg.block_size)
    with torch.no_grad():
        pieces = [model(ids[:, a:b], cache=cache) for a, b in ((0, 5), (5, 9), (9, 10))]
        full = model(ids)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-10)
    assert cache.length == 10
    with pytest.raises(ValueError, match="sequence length 17 exceeds model.block_size=16"):
        model(prompt(length=7), cache=cache)


def hf_checkpoint(name: str, path) -> torch.nn.Module:
    """A tiny transformers model with varied weights saved to path, reloaded in float64."""
    import transformers

    model = {"gpt2": hf_gpt2, "llama": hf_llama, "qwen2": hf_qwen2}[name]()
    varied(model).save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_greedy_equals_transformers_generate(name, tmp_path):
    """float64 on both sides, so no near-tie between two logits can flip an argmax."""
    theirs = hf_checkpoint(name, tmp_path)
    ours = load_pretrained(tmp_path, dtype=torch.float64).eval()
    ids = prompt(length=4, vocab=101)

    def hf_generate(eos: int) -> torch.Tensor:  # pad = eos: a finished row repeats its eos, as ours does
        return theirs.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, eos_token_id=eos,
            pad_token_id=eos,
        )  # fmt: skip

    out = ours.generate(ids, 24, temperature=0)
    assert out.shape == (2, 28) and len(set(out[:, 4:].flatten().tolist())) > 8
    unused = next(t for t in range(101) if t not in out)  # an eos that never comes: all 24 tokens
    assert torch.equal(out, hf_generate(unused))
    # an eos that row 0 produces at its 7th new token (and row 1 maybe later, maybe never)
    eos = int(out[0, 4 + 6])
    stopped = ours.generate(ids, 24, temperature=0, eos_id=eos)
    assert torch.equal(stopped, hf_generate(eos))


def test_eos_ends_rows():
    model = make("llama")
    ids = prompt(batch=1)
    full = model.generate(ids, 10, temperature=0)
    first = int(full[0, 5 + 3])  # the 4th new token (its first occurrence ends the row)
    at = 5 + full[0, 5:].tolist().index(first)
    one = model.generate(ids, 10, temperature=0, eos_id=first)
    assert torch.equal(one, full[:, : at + 1])  # the ids up to and including the eos, nothing after
    assert torch.equal(model.generate(ids, 10, temperature=0, eos_id={first, 96}), one)  # a set of ids
    # two rows: the first to finish repeats its eos until the other one finishes
    both = torch.cat([ids, prompt(batch=1, length=5)[:, [1, 0, 3, 2, 4]]])
    rows = model.generate(both, 10, temperature=0)
    ends = [int(rows[0, 5 + 1]), int(rows[1, 5 + 4])]
    out = model.generate(both, 10, temperature=0, eos_id=ends)
    stops = [5 + next(i for i, t in enumerate(row[5:].tolist()) if t in ends) for row in rows]
    assert out.size(1) == max(stops) + 1
    for row, stop in enumerate(stops):
        assert torch.equal(out[row, : stop + 1], rows[row, : stop + 1])
        assert (out[row, stop + 1 :] == out[row, stop]).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sampling_with_a_seeded_generator_repeats(layout):
    model = make(layout).double()  # float64: cached and cache-free probabilities agree to ~1e-15
    ids = prompt()

    def sample(seed: int, **kwargs) -> torch.Tensor:
        return model.generate(
            ids, 20, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(seed), **kwargs
        )

    first = sample(0)
    assert torch.equal(first, sample(0))
    assert torch.equal(first, sample(0, use_cache=False))
    assert not torch.equal(first, sample(1))
    assert not torch.equal(first, model.generate(ids, 20, temperature=0))  # sampled, not greedy


def test_left_padded_batches_generate_with_sliding_and_full_layers() -> None:
    """Gemma-style layers of two kinds: each kind's padding mask starts where the cache stood before this
    forward (the first layer's cache grows during it; reading it late made the second kind's mask too short)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(
        vocab_size=250, n_layer=2, n_head=4, n_embd=32, block_size=64, norm="rmsnorm", mlp="geglu", position="rope",
        sliding_window=4, layer_types=["sliding_attention", "full_attention"], attn_softcap=50.0,
    )).eval()  # fmt: skip
    prompts = [[5, 17, 33], [44, 3, 9, 12, 7]]
    idx = torch.tensor([[0, 0, *prompts[0]], prompts[1]])
    out = model.generate(idx, 7, temperature=0, prompt_lengths=torch.tensor([3, 5]))
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), 7, temperature=0)[0, len(prompt) :]
        assert out[row, 5:].tolist() == alone.tolist(), row
