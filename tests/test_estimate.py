"""trainer.estimate: parameter counts against the built model, activations and peaks against
measurement on the CPU (benchmarks/estimate_check.py), sharding, and the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.estimate_check import CASES, GEMMA, MOE, SMALL, build, measure
from trainer.__main__ import compose_config
from trainer.config import ConfigError
from trainer.estimate import count_parameters, estimate, model_shape, nf4_bytes

REPO = Path(__file__).resolve().parent.parent
GPT2_LIKE = ["model.n_layer=3", "model.n_embd=96", "model.n_head=4", "model.vocab_size=300"]
LLAMA_LIKE = [
    "model.n_layer=3", "model.n_embd=96", "model.n_head=6", "model.n_kv_head=2", "model.intermediate_size=160",
    "model.vocab_size=300", "model.norm=rmsnorm", "model.mlp=swiglu", "model.position=rope", "model.bias=false",
    "model.tie_embeddings=false",
]  # fmt: skip
GEMMA_LIKE, MOE_LIKE = [*GEMMA, "model.vocab_size=300"], [*MOE, "model.vocab_size=300"]
RECIPE = [
    "model=llama3-8b", "lora.enabled=true", "lora.r=16", "lora.alpha=32",
    "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", "train.micro_batch_size=2",
    "train.seq_len=4096", "precision=bf16", "model.activation_checkpointing=full", "model.loss_chunk_size=1024",
]  # fmt: skip


def config(*overrides: str):
    cfg, _ = compose_config([*SMALL, *overrides])
    return cfg


def independent_adapter_count(shape: list[str], lora: list[str]) -> int:
    """Adapter parameters written out by hand from the shape, per target, without trainer.estimate."""
    values = dict(o.split("=", 1) for o in shape + lora)
    L, C, nh = int(values["model.n_layer"]), int(values["model.n_embd"]), int(values["model.n_head"])
    nkv, r = int(values.get("model.n_kv_head", nh)), int(values.get("lora.r", 16))
    hidden, hd = int(values.get("model.intermediate_size", 4 * C)), C // nh
    per_target = {
        "q_proj": r * (C + nh * hd), "k_proj": r * (C + nkv * hd), "v_proj": r * (C + nkv * hd),
        "o_proj": r * (C + C), "gate_proj": r * (C + hidden), "up_proj": r * (C + hidden),
        "down_proj": r * (hidden + C), "c_attn": r * (C + 3 * C), "c_fc": r * (C + hidden),
        "c_proj": r * (C + C) + r * (hidden + C),
    }  # fmt: skip
    targets = values.get("lora.target_modules", "[all-linear]").strip("[]").split(",")
    if targets == ["all-linear"]:
        swiglu = values.get("model.mlp") == "swiglu"
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if swiglu else [
            "c_attn", "c_proj", "c_fc"
        ]  # fmt: skip
    return L * sum(per_target[t] for t in targets)


@pytest.mark.parametrize(
    "shape", [GPT2_LIKE, LLAMA_LIKE, GEMMA_LIKE, MOE_LIKE], ids=["gpt2", "llama-gqa", "gemma", "moe"]
)
def test_parameter_count_is_the_built_models(shape: list[str]) -> None:
    """Total, active (GPT.active_params), the experts' tensors and the FLOPs a token
    (GPT.flops_per_token) are the built model's; the experts' written out by hand too."""
    from trainer.model import GPT

    cfg = config(*shape, "train.seq_len=64")
    est = estimate(cfg)
    params = est["parameters"]
    model = GPT(model_shape(cfg))
    assert params["total"] == params["trainable"] == sum(p.numel() for p in model.parameters())
    assert params["adapters"] == params["frozen"] == 0
    assert params["active"] == model.active_params() and est["run"]["flops_per_token"] == model.flops_per_token(64)
    experts = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 3)
    assert params["experts"] == params["experts_trainable"] == experts
    if shape is MOE_LIKE:  # blocks 1 and 2 sparse: 8 experts' gate, up (48 x 64) and down (64 x 48); a token uses 2
        assert experts == 2 * 8 * 3 * 48 * 64 and params["total"] - params["active"] == experts * 6 // 8
        assert est["run"]["experts"] == {
            "n_experts": 8, "per_token": 2, "intermediate_size": 48, "sparse_layers": 2, "expert_parallel": 1,
        }  # fmt: skip
    else:
        assert params["active"] == params["total"] and est["experts"] is None and est["run"]["experts"] is None


def test_experts_memory_is_apart() -> None:
    """The experts' tensors' weights, gradients and AdamW state, per rank: full training in fp32,
    frozen in bf16 under LoRA (attention adapters only), 1/2 of them on a rank with expert
    parallelism over 2 ranks (parallel=ddp parallel.expert=2), and their share of every state."""
    experts = 2 * 8 * 3 * 48 * 64
    full = estimate(config(*MOE_LIKE))
    assert full["experts"] == {
        "weights_frozen": 0, "weights_trainable": 4 * experts, "master": 0, "gradients": 4 * experts,
        "optimizer": 8 * experts,
    }  # fmt: skip
    lora = estimate(config(*MOE_LIKE, "precision=bf16", "lora.enabled=true", "lora.target_modules=[q_proj,v_proj]"))
    assert lora["parameters"]["experts_trainable"] == 0
    assert lora["experts"]["weights_frozen"] == 2 * experts and lora["experts"]["gradients"] == 0
    ddp = estimate(config(*MOE_LIKE, "parallel=ddp", "parallel.expert=2"), world_size=2)
    assert ddp["run"]["experts"]["expert_parallel"] == 2
    assert ddp["experts"]["weights_trainable"] == 4 * experts / 2 and ddp["experts"]["optimizer"] == 8 * experts / 2
    others = full["parameters"]["total"] - experts
    assert (
        ddp["bytes"]["weights_trainable"]
        == 4 * (others + experts / 2)
        == full["bytes"]["weights_trainable"] - 2 * experts
    )
    assert ddp["bytes"]["buffers"] == 4 * others  # DDP's buckets leave the sharded experts out


@pytest.mark.parametrize(
    "shape, lora",
    [
        (GPT2_LIKE, []),
        (GPT2_LIKE, ["lora.target_modules=[c_attn,c_proj]", "lora.r=4"]),
        (GPT2_LIKE, ["lora.target_modules=[c_fc]", "lora.train_modules=[norm]"]),
        (LLAMA_LIKE, []),
        (LLAMA_LIKE, ["lora.target_modules=[q_proj,k_proj,v_proj]", "lora.r=8"]),
        (LLAMA_LIKE, ["lora.target_modules=[o_proj,down_proj]", "lora.train_modules=[lm_head,norm]"]),
    ],
    ids=["gpt2-all", "gpt2-attn", "gpt2-fc-norm", "llama-all", "llama-qkv-gqa", "llama-o-down-head-norm"],
)
def test_lora_counts(shape: list[str], lora: list[str]) -> None:
    """Adapters: the estimate, a hand count, and the built model's adapters agree."""
    cfg = config(*shape, "lora.enabled=true", *lora)
    params = estimate(cfg)["parameters"]
    model = build(cfg)
    real = {name: p for name, p in model.named_parameters()}
    adapters_real = sum(p.numel() for name, p in real.items() if "lora_" in name)
    assert params["adapters"] == adapters_real == independent_adapter_count(shape, ["lora.enabled=true", *lora])
    assert params["trainable"] == sum(p.numel() for p in real.values() if p.requires_grad)
    assert params["total"] == sum(p.numel() for p in real.values())
    extra = params["trainable"] - params["adapters"]
    norms = (2 * 3 + 1) * 96 * (2 if shape is GPT2_LIKE else 1)  # 2 per block + the final one (LayerNorm: + bias)
    head = 320 * 96 if "lm_head" in " ".join(lora) else 0  # the untied head: 300 tokens in 320 rows
    assert extra == (norms if "norm" in " ".join(lora) else 0) + head


def test_dora_adds_one_magnitude_per_output_row() -> None:
    lora = ["lora.enabled=true", "lora.target_modules=[q_proj,k_proj,v_proj]", "lora.r=4"]
    plain = estimate(config(*LLAMA_LIKE, *lora))["parameters"]["adapters"]
    dora = estimate(config(*LLAMA_LIKE, *lora, "lora.dora=true"))["parameters"]["adapters"]
    assert dora - plain == 3 * (96 + 2 * 32)  # n_layer x (q rows + k rows + v rows)


def test_target_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="gate_proj"):
        estimate(config(*GPT2_LIKE, "lora.enabled=true", "lora.target_modules=[gate_proj]"))
    with pytest.raises(ConfigError, match="c_attn"):
        estimate(config(*LLAMA_LIKE, "lora.enabled=true", "lora.target_modules=[c_attn]"))
    with pytest.raises(ConfigError, match="train_modules"):
        estimate(config(*LLAMA_LIKE, "lora.enabled=true", "lora.train_modules=[bogus]"))


def test_all_linear_follows_the_layout() -> None:
    """Llama-family: q, k, v as slices of the fused c_attn, o, gate, up, down; GPT-2: its four linears."""
    cfg = config(*LLAMA_LIKE, "lora.enabled=true")
    adapters = count_parameters(cfg, model_shape(cfg)).block_adapters
    assert [(a.name, a.module, a.out_features) for a in adapters] == [
        ("q_proj", "attn.c_attn", 96), ("k_proj", "attn.c_attn", 32), ("v_proj", "attn.c_attn", 32),
        ("o_proj", "attn.c_proj", 96), ("gate_proj", "mlp.w_gate", 160), ("up_proj", "mlp.w_up", 160),
        ("down_proj", "mlp.c_proj", 96),
    ]  # fmt: skip
    cfg = config(*GPT2_LIKE, "lora.enabled=true")
    modules = [a.module for a in count_parameters(cfg, model_shape(cfg)).block_adapters]
    assert sorted(modules) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def test_nf4_bytes_are_torchao_double_quantisation() -> None:
    """4-bit codes + an int8 absmax per 64 + a bf16 scale per 256 absmaxes, their mean and the 16-value
    table (torchao's NF4Tensor, which trainer.lora.qlora uses): 4.126 bits a bf16 weight."""
    n = 4096 * 14336
    assert nf4_bytes(n) == n // 2 + n // 64 + 2 * (n // 64 // 256) + 2 + 2 * 16
    assert nf4_bytes(n, 4) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 + 4 * 16
    assert 8 * nf4_bytes(n) / n == pytest.approx(4 + 8 / 64 + 16 / (64 * 256), abs=1e-4)


def frozen_bytes_of(model) -> int:
    """The frozen parameters' bytes of a built model, as they are stored."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize(
    "precision, lora",
    [
        ("bf16", []),
        ("fp32", []),
        ("fp32", ["lora.target_modules=[q_proj,down_proj]"]),
        ("bf16", ["lora.target_modules=[q_proj,down_proj]", "lora.base_dtype=fp32"]),
    ],
    ids=["bf16-all", "fp32-all", "fp32-q-down", "bf16-q-down-fp32base"],
)
def test_frozen_bytes_follow_the_base_casts(precision: str, lora: list[str]) -> None:
    """The frozen base as add_adapters stores it, written out by hand and read off the built model:
    norms fp32; the matrices in lora.base_dtype, all of them under bf16 (autocast), only the adapted
    linears' under fp32. With lora.quantize_base=nf4 the adapted linears' weights are NF4 instead."""
    cfg = config(*LLAMA_LIKE, f"precision={precision}", "lora.enabled=true", *lora)
    base = 4 if "lora.base_dtype=fp32" in lora else 2
    qkv, o, mlp = 96 * (96 + 2 * 32), 96 * 96, 96 * 160  # c_attn, c_proj, each of gate / up / down
    linears = {"qkv": qkv, "o": o, "gate": mlp, "up": mlp, "down": mlp}
    adapted = {"qkv": qkv, "down": mlp} if lora else linears  # q_proj is a slice of c_attn: all of it is cast
    plain = sum(linears.values()) - sum(adapted.values())
    norms, embedding_and_head = 7 * 96, 2 * 320 * 96  # 300 tokens in 320 rows (model.vocab_multiple)
    others = base if precision == "bf16" else 4  # plain linears, embedding, head
    expected = 3 * (base * sum(adapted.values()) + others * plain) + others * embedding_and_head + 4 * norms
    assert estimate(cfg)["bytes"]["weights_frozen"] == expected == frozen_bytes_of(build(cfg))
    nf4 = estimate(config(*LLAMA_LIKE, f"precision={precision}", "lora.enabled=true", "lora.quantize_base=nf4", *lora))
    quantised = 3 * sum(nf4_bytes(n, base) for n in adapted.values())
    assert nf4["bytes"]["weights_frozen"] == quantised + expected - 3 * base * sum(adapted.values())
    assert nf4["parameters"]["frozen_nf4"] == 3 * sum(adapted.values())


def test_neither_a_bf16_nor_an_nf4_base_keeps_a_copy_of_itself() -> None:
    """Under bf16 autocast LoRALinear leaves the cast to autocast, so a bf16 base is read as stored
    (no copy kept for x's gradient), and linear_nf4 keeps only the NF4 weight: the same activations.
    (The bf16 case is checked against measurement in test_activations_and_peak_match_measurement.)"""
    shape = [*LLAMA_LIKE, "precision=bf16", "train.micro_batch_size=2", "train.seq_len=64", "lora.enabled=true"]
    bf16 = estimate(config(*shape))["activations"]["total"]
    nf4 = estimate(config(*shape, "lora.quantize_base=nf4"))["activations"]["total"]
    assert bf16 == nf4


@pytest.mark.parametrize("case", list(CASES))
def test_activations_and_peak_match_measurement(case: str) -> None:
    """Within 1% of the bytes autograd keeps and 5% of the step's measured peak (CPU, one process)."""
    row = measure(CASES[case])
    assert (row["parameters"], row["trainable"]) == (row["predicted_parameters"], row["predicted_trainable"])
    assert row["predicted_saved"] == pytest.approx(row["saved"], rel=0.01)
    assert row["predicted_peak"] == pytest.approx(row["peak"], rel=0.05)
    assert row["predicted_kept_states"] == pytest.approx(row["kept_states"], rel=0.01)


def test_activation_terms_move_as_they_should() -> None:
    """Checkpointing keeps one (N, C) input per block (and no longer RoPE's fp32 tables); chunking
    replaces the (N, V) log-softmax by the fp32 gradients; tokens scale a block linearly."""
    base = [*LLAMA_LIKE, "train.micro_batch_size=2", "train.seq_len=64"]
    plain = estimate(config(*base))["activations"]
    full = estimate(config(*base, "model.activation_checkpointing=full"))["activations"]
    assert full["block_checkpointed"] == 2 * 64 * 96 * 4 and full["checkpointed"] == 3
    assert full["total"] == plain["total"] - 3 * plain["block"] + 3 * full["block_checkpointed"] - 2 * 64 * 16 * 4
    chunked = estimate(config(*base, "model.loss_chunk_size=32"))["activations"]
    # V = 320: the 300 tokens' logits and the padding's (model.vocab_multiple)
    assert plain["loss"] == 2 * 64 * 320 * 4 + 2 * 64 * 8  # log-softmax in fp32 and the targets
    assert chunked["loss"] == 2 * 64 * 96 * 4 + 320 * 96 * 4  # hidden's and head's gradients in fp32
    doubled = estimate(config(*LLAMA_LIKE, "train.micro_batch_size=4", "train.seq_len=64"))["activations"]
    assert doubled["block"] == pytest.approx(2 * plain["block"], rel=0.01)


def test_sparse_block_backward_terms() -> None:
    """A sparse block's backward over what it keeps (N = 128 tokens, C = 64, E = 8 experts, k = 2,
    S = 256 slots; bf16, LoRA on the attention, so the router and experts are frozen). Block 1 reads
    block 0's bf16 stream, block 2 block 1's fp32 one (the sparse MLP returns its fp32 input's dtype);
    the MLP's input x (norm_2's output) is fp32. At the weighting's backward: the stream's gradient,
    the weighted outputs' fp32 gradient, the mul's two products and the routing weights' gradient.
    Rebuilt by a full checkpoint, the end of its recompute (y.float()): the stream's and the weighted
    outputs' gradients, and SparseMLP.forward's locals: the logits, order and slice ends, the
    gathered slots xs (fp32), the experts' outputs and their un-sorted copy, x, and the bf16 stream
    after attention (block 1; block 2's is fp32, norm_2's x itself). A checkpointed block also holds
    its input (a bf16 one beside norm_1's fp32 copy); the module keeps its top-k indices, which the
    checkpointed block no longer saves; the load-balancing loss's logit gradients wait for their blocks."""
    shape = [*MOE_LIKE, "train.micro_batch_size=2", "train.seq_len=64", "precision=bf16", "lora.enabled=true",
             "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"]  # fmt: skip
    N, C, E, k, S, a = 128, 64, 8, 2, 256, 2
    plain = estimate(config(*shape))["activations"]
    full = estimate(config(*shape, "model.activation_checkpointing=full"))["activations"]
    for i, h in ((1, 2), (2, 4)):
        assert plain["own"][i] == N * C * h + 3 * S * C * 4 + S * 4
        rebuilt = N * E * a + S * 8 + E * 4 + S * C * 4 + 2 * S * C * a + N * C * 4 + (N * C * h if h != 4 else 0)
        assert full["own"][i] == N * C * h + S * C * 4 + rebuilt
    assert full["in_backward"][1:] == [plain["kept"][1] + N * C * 2, plain["kept"][2]]
    assert plain["held"] == 2 * N * E * 4 and full["held"] == plain["held"] + 2 * N * k * 8
    assert plain["waiting"] == full["waiting"] == [0, N * E * 4, 2 * N * E * 4]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_sharding_divides_what_it_should(strategy: str) -> None:
    shape = [*LLAMA_LIKE, "precision=bf16"]
    one = estimate(config(*shape))["bytes"]
    four = estimate(config(*shape, f"parallel={strategy}"), world_size=4)["bytes"]
    deepspeed = strategy.startswith("zero")
    weights = one["weights_trainable"] / (2 if deepspeed else 1)  # DeepSpeed's working weights are bf16
    grads = one["gradients"] / (2 if deepspeed else 1)
    assert four["weights_trainable"] == weights / (4 if strategy in ("fsdp", "zero3") else 1)
    assert four["gradients"] == grads / (4 if strategy in ("fsdp", "zero2", "zero3") else 1)
    assert four["optimizer"] == one["optimizer"] / (1 if strategy == "ddp" else 4)
    assert four["master"] == (one["weights_trainable"] / 4 if deepspeed else 0)
    assert (four["gathered"] > 0) == (strategy in ("fsdp", "zero3"))
    assert four["buffers"] == (one["gradients"] if strategy == "ddp" else 5e8 * 2 if deepspeed else 0)
    assert four["activations"] > 0


def test_world_size_one_process_ignores_ranks() -> None:
    cfg = config(*LLAMA_LIKE)
    assert estimate(cfg, world_size=8) == estimate(cfg, world_size=1)


def test_pretrained_shape_comes_from_the_checkpoint(hf_checkpoints: dict[str, str]) -> None:
    from trainer.model import load_hf_config

    cfg = config(f"model.pretrained={hf_checkpoints['llama']}", "train.seq_len=32")
    est = estimate(cfg)
    checkpoint = load_hf_config(hf_checkpoints["llama"])
    assert (est["run"]["n_layer"], est["run"]["n_embd"], est["run"]["vocab_size"]) == (
        checkpoint.n_layer, checkpoint.n_embd, checkpoint.vocab_size,
    )  # fmt: skip
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_checkpoints["llama"])
    padding = 2 * (128 - 96) * 32  # the embedding's and the untied head's 96 rows padded to 128
    assert est["parameters"]["total"] == sum(p.numel() for p in hf.parameters()) + padding


def test_llama3_8b_recipe() -> None:
    """The single-GPU recipe: Llama 3 8B's 8.03B weights, PEFT's 41,943,040 adapters for r=16 on the
    seven projections; the base in bf16 but its 65 norms in fp32, about 15 GiB; NF4 blocks about a
    third of it; fits an 80 GB H100."""
    cfg = config(*RECIPE)
    est = estimate(cfg)
    assert est["parameters"]["total"] - est["parameters"]["adapters"] == 8_030_261_248
    assert est["parameters"]["adapters"] == est["parameters"]["trainable"] == 41_943_040
    norms = (2 * 32 + 1) * 4096
    assert est["bytes"]["weights_frozen"] == 2 * (8_030_261_248 - norms) + 4 * norms
    nf4 = estimate(config(*RECIPE, "lora.quantize_base=nf4"))
    layer = [4096 * 4096, 4096 * 1024 + 4096 * 1024, 4096 * 4096, 3 * 4096 * 14336]  # q|k|v fused, o, MLP
    blocks = 32 * sum(layer)
    layer_nf4 = nf4_bytes(layer[0] + layer[1]) + nf4_bytes(layer[2]) + 3 * nf4_bytes(4096 * 14336)
    assert nf4["parameters"]["frozen_nf4"] == blocks
    assert nf4["bytes"]["weights_frozen"] == 32 * layer_nf4 + 2 * (8_030_261_248 - norms - blocks) + 4 * norms
    assert nf4["bytes"]["weights_frozen"] < 0.36 * est["bytes"]["weights_frozen"]
    none = estimate(config(*RECIPE[:-2], "model.loss_chunk_size=1024"))
    assert est["peak"]["bytes"] < 25 * 2**30 < none["peak"]["bytes"] < 80 * 2**30
    assert none["activations"]["total"] > 10 * est["activations"]["total"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.estimate", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_table_and_json() -> None:
    table = run(*RECIPE)
    assert table.returncode == 0, table.stderr
    assert "| **peak** |" in table.stdout and "41,943,040" in table.stdout
    assert "| weights, frozen | 14.96 | 8,029,995,008 in bf16, 266,240 in fp32 |" in table.stdout
    as_json = run(*RECIPE, "--json")
    assert as_json.returncode == 0, as_json.stderr
    est = json.loads(as_json.stdout)
    assert est["parameters"]["adapters"] == 41_943_040
    assert est["peak"]["bytes"] == estimate(config(*RECIPE))["peak"]["bytes"]
    assert set(est["bytes"]) >= {"weights_frozen", "weights_trainable", "gradients", "optimizer", "activations"}


def test_cli_errors_are_one_line() -> None:
    missing_vocab = run()  # the default model takes the tokenizer's vocabulary
    assert missing_vocab.returncode == 2 and "--vocab" in missing_vocab.stderr
    assert run("--vocab", "300").returncode == 0
    typo = run("model.n_layr=3", "model.vocab_size=300")
    assert typo.returncode == 2 and "n_layr" in typo.stderr and len(typo.stderr.strip().splitlines()) == 1
