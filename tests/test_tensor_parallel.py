"""Tensor + sequence parallelism (`parallel.tensor=T`, trainer/parallel/tensor.py) on gloo, against one process.

Default tier: the grouped row order of fused projections, and the refusals (one line each, before any
process group). Slow tier (real processes, torchrun):
- tests/tp_worker.py at 2 ranks, five model layouts (GPT-2; Llama with GQA; Qwen3 with per-head q / k norms
  and its own head size; Gemma with sandwich norms, GeGLU fused [gate | up], soft-capping and sliding
  layers; post-norm with q / k / v biases): the split model's loss, every gradient, logits and target
  log-probabilities equal the whole model's, and generation (KV cache, no cache, left-padded batches)
  gives the same tokens; and with LoRA on every linear (GPT-2's one c_attn adapter, Llama's q / k / v
  slices, Phi-3's fused qkv_proj and gate_up_proj), every adapter's gradient too;
- the trainer at 4 ranks, fp32: TP 2 alone and FSDP 2 x TP 2 equal one process per step (loss, gradient
  norm, every per-layer gradient and parameter norm) and in the final weights; a checkpoint saved under HSDP
  2 x 2 resumes under TP 2 and under FSDP 4 with the uninterrupted run's later steps; one saved under
  FSDP 2 x TP 2 resumes in one process; LoRA adapters (split like their base) train as in one process; with
  train.compile and full activation checkpointing (each split block compiled inside its eager checkpoint),
  TP 2 equals a compiled single process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import QUICK, read_metrics, run_trainer, torchrun
from safetensors.torch import load_file
from test_hsdp import assert_rows_close

from trainer.__main__ import compose_config
from trainer.config import ConfigError, ModelConfig
from trainer.parallel.tensor import grouped_rows, to_canonical, to_grouped
from trainer.preflight import check_run

REPO = Path(__file__).resolve().parent.parent

# -- the grouped row order -------------------------------------------------------------------------


def test_grouped_rows_give_each_rank_its_own_heads() -> None:
    """c_attn's rows [q | k | v] (4 q heads, 2 kv heads, head size 3) over 2 ranks: rank r's contiguous half
    of the grouped tensor is its q heads 2r, 2r + 1, then kv head r's k, then its v."""
    cfg = ModelConfig(vocab_size=64, n_head=4, n_kv_head=2, n_embd=12, head_dim=3)
    rows = torch.arange((4 + 2 + 2) * 3)[:, None].float()  # the row's canonical index
    grouped = to_grouped("blocks.0.attn.c_attn.weight", rows, cfg, 2)[:, 0].long().tolist()
    q, k, v = list(range(12)), list(range(12, 18)), list(range(18, 24))
    assert grouped == q[:6] + k[:3] + v[:3] + q[6:] + k[3:] + v[3:]
    assert torch.equal(to_canonical("blocks.0.attn.c_attn.weight", to_grouped("x.attn.c_attn.weight", rows, cfg, 2),
                                    cfg, 2), rows)  # fmt: skip
    gate_up = to_grouped("blocks.1.mlp.w_gate_up.bias", torch.arange(8.0), ModelConfig(intermediate_size=4), 2)
    assert gate_up.tolist() == [0, 1, 4, 5, 2, 3, 6, 7]  # [gate_0 up_0 | gate_1 up_1]
    assert torch.equal(to_grouped("blocks.0.mlp.c_fc.weight", rows, cfg, 2), rows)  # not fused: as it is
    assert grouped_rows("qkv", (4, 2, 3), 1).tolist() == list(range(24))  # one rank: the canonical order


# -- refusals ------------------------------------------------------------------------------------------


def refusal(overrides: list[str], world_size: int) -> str:
    with pytest.raises(ConfigError) as info:  # the config's own checks, or check_run's
        check_run(compose_config(overrides)[0], world_size)
    assert "\n" not in str(info.value)
    return str(info.value)


TP = ["train.micro_batch_size=2", "train.global_batch_size=8"]


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["parallel=fsdp", "parallel.tensor=2", "parallel.replicate=3"], 4,
         "parallel.replicate=3 does not divide the data-parallel ranks (world size 4 / parallel.tensor 2 = 2)"),
        (["parallel=fsdp", "parallel.tensor=3"], 4, "parallel.tensor=3 does not divide the world size 4"),
        (["parallel=none", "parallel.tensor=2"], 4, "parallel=none with 4 processes would train 4 independent copies"),
        (["parallel=zero2", "parallel.tensor=2"], 4, "parallel.tensor=2 composes with parallel=fsdp"),
        (["parallel=ddp", "parallel.tensor=2"], 4, "parallel.tensor=2 composes with parallel=fsdp"),
        (["parallel=fsdp", "parallel.tensor=4", "model.n_head=4", "model.n_kv_head=2"], 4,
         "parallel.tensor=4 does not divide the key / value heads (model.n_kv_head; GQA"),
        (["parallel=fsdp", "parallel.tensor=2", "model.n_head=3", "model.n_embd=48"], 4,
         "parallel.tensor=2 does not divide the attention heads (model.n_head), 3"),
        (["parallel=fsdp", "parallel.tensor=2", "model.vocab_size=1001", "model.vocab_multiple=1"], 4,
         "parallel.tensor=2 does not divide the padded vocabulary"),
        (["parallel=fsdp", "parallel.tensor=2", "train.seq_len=33"], 4,
         "parallel.tensor=2 does not divide the sequence length (train.seq_len; sequence parallel splits it), 33"),
        (["parallel=fsdp", "parallel.tensor=2", "model.qk_norm=full"], 4, "does not run model.qk_norm=full"),
        (["parallel=fsdp", "parallel.tensor=2", "lora=default", "lora.dora=true"], 4, "does not run with DoRA"),
        (["parallel=fsdp", "parallel.tensor=2", "lora=default", "lora.dropout=0.1"], 4,
         "does not run with lora.dropout"),
    ],
)  # fmt: skip
def test_tensor_parallel_refusals(overrides: list[str], world: int, message: str) -> None:
    assert message in refusal([*TP, *overrides], world)


def test_a_tensor_parallel_mesh_passes_the_checks() -> None:
    check_run(compose_config([*TP, "parallel=fsdp", "parallel.tensor=2", "parallel.replicate=2"])[0], 8)
    check_run(compose_config([*TP, "parallel=none", "parallel.tensor=2", "train.micro_batch_size=8"])[0], 2)


# -- the split model at 2 ranks -------------------------------------------------------------------------


@pytest.mark.slow
def test_the_split_model_equals_the_whole_one(tmp_path: Path) -> None:
    out = tmp_path / "tp.pt"
    done = torchrun(str(REPO / "tests" / "tp_worker.py"), str(out), cwd=REPO, nproc=2)
    assert done.returncode == 0, done.stderr[-4000:]
    results = torch.load(out)
    assert set(results) == {"gpt2", "llama", "qwen3", "gemma", "olmo_post_qkv_bias", "gpt2_lora", "llama_lora",
                            "phi3_lora"}  # fmt: skip
    for name, gaps in results.items():
        for key in ("loss", "grad", "packed"):
            assert gaps[key] <= 1e-5, (name, key, gaps[key])
        for key in ("logits", "logps"):
            assert gaps[key] <= 1e-5, (name, key, gaps[key])
        for key in ("generate", "generate_no_cache", "generate_batched"):
            assert gaps[key] == 1.0, (name, key)


# -- the trainer at 4 ranks ---------------------------------------------------------------------------------

# A Llama-style model with what the split has to get right: GQA (2 kv heads of 4), a fused [gate | up], per-head
# q / k norms, an untied head, and a vocabulary (32) padded to 64, so that rank 1's half of the head is padding.
MODEL = ["model.norm=rmsnorm", "model.mlp=swiglu", "model.fused_gate_up=true", "model.position=rope",
         "model.n_head=4", "model.n_kv_head=2", "model.qk_norm=head", "model.tie_embeddings=false"]  # fmt: skip
RUN = [*QUICK, *MODEL, "train.max_steps=4", "train.log_interval=1", "train.eval_interval=4",
       "train.global_batch_size=8", "train.micro_batch_size=2", "optim.warmup_steps=0", "optim.eps=1e-6",
       "checkpoint.interval=2", "checkpoint.keep=4"]  # fmt: skip
ONE = ["parallel=none", "train.micro_batch_size=8"]
# LoRA on a Phi-3 layout (no q / k norms): one adapter over the fused [q | k | v] (qkv_proj), one over the fused
# [gate | up] (gate_up_proj), whose lora_B rows move to the grouped order and back (checkpoints, the PEFT export)
LORA = ["model.qk_norm=none", "model.hf_model_type=phi3", "lora=default", "lora.r=4", "lora.base_dtype=fp32"]


def run(root: Path, name: str, *extra: str, nproc: int = 4) -> Path:
    return run_trainer(root, name, *RUN, *extra, nproc=nproc)


def step2(run_dir: Path) -> str:
    return f"train.resume={run_dir / 'checkpoints' / 'step_00000002'}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    out = {
        "one": run(root, "one", *ONE, nproc=1),
        "tp2": run(root, "tp2", *ONE, "parallel.tensor=2", nproc=2),
        "fsdp2xtp2": run(root, "fsdp2xtp2", "parallel=fsdp", "parallel.tensor=2"),
        "hsdp": run(root, "hsdp", "parallel=fsdp", "parallel.replicate=2"),
    }
    out["hsdp_to_tp2"] = run(root, "hsdp_to_tp2", *ONE, "parallel.tensor=2", step2(out["hsdp"]), nproc=2)
    out["hsdp_to_fsdp4"] = run(root, "hsdp_to_fsdp4", "parallel=fsdp", step2(out["hsdp"]))
    out["fsdp2xtp2_to_one"] = run(root, "fsdp2xtp2_to_one", *ONE, step2(out["fsdp2xtp2"]), nproc=1)
    out["compiled_one"] = run(root, "compiled_one", *ONE, "train.compile=true", "train.max_steps=2", nproc=1)
    out["compiled_tp2"] = run(
        root, "compiled_tp2", *ONE, "parallel.tensor=2", "train.compile=true", "train.max_steps=2",
        "model.activation_checkpointing=full", nproc=2,
    )  # fmt: skip
    out["lora_one"] = run(root, "lora_one", *LORA, *ONE, nproc=1)
    out["lora_tp2"] = run(root, "lora_tp2", *LORA, *ONE, "parallel.tensor=2", nproc=2)
    out["lora_tp2_to_one"] = run(root, "lora_tp2_to_one", *LORA, *ONE, step2(out["lora_tp2"]), nproc=1)
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "final" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "fsdp2xtp2"])
def test_tensor_parallel_equals_one_process(runs: dict[str, Path], layout: str) -> None:
    assert_rows_close(read_metrics(runs[layout]), read_metrics(runs["one"]))
    got, want = final_weights(runs[layout]), final_weights(runs["one"])
    assert got.keys() == want.keys()
    for name, tensor in want.items():  # the fused q / k / v and [gate | up] back in their canonical rows
        assert (got[name] - tensor).norm() / tensor.norm().clamp(min=1e-12) <= 1e-5, name


@pytest.mark.slow
@pytest.mark.parametrize(
    "resumed,original", [("hsdp_to_tp2", "hsdp"), ("hsdp_to_fsdp4", "hsdp"), ("fsdp2xtp2_to_one", "fsdp2xtp2")]
)
def test_checkpoints_reshard_between_tensor_parallel_and_other_layouts(
    runs: dict[str, Path], resumed: str, original: str
) -> None:
    later = [r for r in read_metrics(runs[original]) if r["step"] > 2]
    assert_rows_close(read_metrics(runs[resumed]), later)


@pytest.mark.slow
def test_the_start_line_names_the_3d_mesh(runs: dict[str, Path]) -> None:
    line = next(ln for ln in (runs["fsdp2xtp2"] / "logs" / "rank0.log").read_text().splitlines() if "model:" in ln)
    assert "parallel=fsdp on 4 rank(s), mesh shard 2 x tensor 2 (tensor + sequence parallel over 2 ranks; " in line
    assert "= 2 micro x 2 accum x 2 data-parallel ranks = 256 tokens/step" in line


@pytest.mark.slow
def test_lora_adapters_follow_their_base_under_tensor_parallelism(runs: dict[str, Path]) -> None:
    """Column-wise bases (qkv_proj, gate_up_proj): lora_B sharded with the base's rows, lora_A whole; row-wise
    (o_proj, down_proj): lora_A sharded with the base's columns, lora_B whole. Per step as one process; the final
    PEFT adapters too; a TP 2 checkpoint resumes in one process."""
    assert_rows_close(read_metrics(runs["lora_tp2"]), read_metrics(runs["lora_one"]))
    later = [r for r in read_metrics(runs["lora_tp2"]) if r["step"] > 2]
    assert_rows_close(read_metrics(runs["lora_tp2_to_one"]), later)
    adapter = "checkpoints/final/adapter/adapter_model.safetensors"
    got, want = load_file(str(runs["lora_tp2"] / adapter)), load_file(str(runs["lora_one"] / adapter))
    assert got.keys() == want.keys() and any("qkv_proj.lora_B" in k for k in want)
    for name, tensor in want.items():
        assert (got[name] - tensor).norm() / tensor.norm() <= 1e-5, name


def worst_gap(got: list[dict], want: list[dict]) -> float:
    """The largest relative gap over every compared figure of every row (rows matched by step)."""
    by_step = {r["step"]: r for r in want}
    return max(
        abs(a[k] - by_step[a["step"]][k]) / max(abs(by_step[a["step"]][k]), 1e-12)
        for a in got
        for k in a
        if k.startswith(("loss", "grad_norm", "param_norm"))
    )


@pytest.mark.slow
def test_the_gaps_measured(runs: dict[str, Path]) -> None:
    """The figures the README quotes (printed with -s), each within the tests' 1e-5."""
    m = {name: read_metrics(path) for name, path in runs.items()}
    later = lambda name: [r for r in m[name] if r["step"] > 2]  # noqa: E731

    def weights(a: str, b: str) -> float:
        got, want = final_weights(runs[a]), final_weights(runs[b])
        return max(((got[k] - want[k]).norm() / want[k].norm().clamp(min=1e-12)).item() for k in want)

    gaps = {
        "tp2_vs_one": worst_gap(m["tp2"], m["one"]),
        "fsdp2xtp2_vs_one": worst_gap(m["fsdp2xtp2"], m["one"]),
        "tp2_weights": weights("tp2", "one"),
        "fsdp2xtp2_weights": weights("fsdp2xtp2", "one"),
        "hsdp_to_tp2": worst_gap(m["hsdp_to_tp2"], later("hsdp")),
        "hsdp_to_fsdp4": worst_gap(m["hsdp_to_fsdp4"], later("hsdp")),
        "fsdp2xtp2_to_one": worst_gap(m["fsdp2xtp2_to_one"], later("fsdp2xtp2")),
        "lora_tp2_vs_one": worst_gap(m["lora_tp2"], m["lora_one"]),
        "compiled_tp2_vs_one": worst_gap(m["compiled_tp2"], m["compiled_one"]),
        "lora_tp2_to_one": worst_gap(m["lora_tp2_to_one"], later("lora_tp2")),
    }
    print(json.dumps({k: float(f"{v:.2g}") for k, v in gaps.items()}))
    assert all(v <= 1e-5 for v in gaps.values()), gaps


# -- in-loop evaluation under TP ----------------------------------------------------------------------------


@pytest.mark.slow
def test_in_loop_evaluation_under_tensor_parallelism_equals_one_process(finetune_dir: Path, tmp_path: Path) -> None:
    """Fine-tuning a Llama checkpoint (GQA) with lm_eval's three request types and a file's perplexity in the
    loop: TP 2 scores the same documents on both peers and logs one process's figures (and FSDP 2 x TP 2 at 4
    ranks, whose two data-parallel groups each take half the documents, the same)."""
    pytest.importorskip("lm_eval")
    common = [
        "logger.wandb=false", "logger.progress_bar=false", "train.sample_tokens=4", "train.seq_len=48",
        "data=instruct", "data.packing=false", "data.val_fraction=0.2", f"data.path={finetune_dir / 'instruct.jsonl'}",
        f"model.pretrained={finetune_dir / 'llama'}", f"data.cache_dir={tmp_path / 'cache'}",
        "train.global_batch_size=4", "train.max_steps=2", "train.log_interval=1", "train.eval_interval=2",
        "train.eval_batches=2", "optim.lr=3e-3", "optim.warmup_steps=0", "eval.tasks=[tiny_mc,tiny_gen,tiny_rolling]",
        "eval.limit=6", "eval.batch_size=3", f"eval.files=[{finetune_dir / 'chat.jsonl'}]",
    ]  # fmt: skip
    rows = {}
    for name, extra, nproc in [
        ("one", ["parallel=none", "train.micro_batch_size=4"], 1),
        ("tp2", ["parallel=none", "parallel.tensor=2", "train.micro_batch_size=4"], 2),
        ("fsdp2xtp2", ["parallel=fsdp", "parallel.tensor=2", "train.micro_batch_size=2"], 4),
    ]:
        out = run_trainer(tmp_path, name, *common, *extra, nproc=nproc)
        rows[name] = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in read_metrics(out)]
        rows[name] = [r for r in rows[name] if r]
    want = rows["one"]
    assert len(want) == 1 and any(k.startswith("eval/tiny_gen/") for k in want[0]) and "eval/ppl/chat" in want[0]
    for name in ("tp2", "fsdp2xtp2"):
        got = rows[name]
        assert len(got) == 1 and got[0].keys() == want[0].keys(), name
        for key, value in want[0].items():
            if key != "eval/time_s":
                assert abs(got[0][key] - value) <= 1e-5 * max(abs(value), 1.0), (name, key, got[0][key], value)


@pytest.mark.slow
def test_full_fine_tuning_dpo_with_a_split_reference_equals_one_process(finetune_dir: Path, tmp_path: Path) -> None:
    """objective=dpo without LoRA: the reference is a frozen copy, split over the tensor group like the policy.
    TP 2 logs one process's losses and DPO figures (DPO's and GRPO's step numerics under TP, with LoRA, are in
    tests/test_objective_ranks.py)."""
    common = [
        "objective=dpo", "data=preference", f"data.path={finetune_dir / 'preference.jsonl'}",
        f"model.pretrained={finetune_dir / 'llama'}", "train.seq_len=32", "train.micro_batch_size=4",
        "train.max_steps=3", "train.log_interval=1", "train.eval_interval=3", "optim.lr=5e-3", "optim.warmup_steps=0",
        "optim.eps=1e-6", "logger.wandb=false", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.2",
        "train.sample_tokens=0", "parallel=none",
    ]  # fmt: skip
    one = run_trainer(tmp_path, "one", *common)
    tp2 = run_trainer(tmp_path, "tp2", *common, "parallel.tensor=2", nproc=2)
    want, got = read_metrics(one), read_metrics(tp2)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3]
    assert abs(want[-1]["rewards/margins"]) > 1e-4  # the policy has moved off its reference
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "val_loss"):
            if key in w:
                assert abs(g[key] - w[key]) <= 1e-5 * max(abs(w[key]), 1e-3), (w["step"], key, g[key], w[key])
