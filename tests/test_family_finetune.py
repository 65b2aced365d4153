"""A short chat fine-tune of each later family, end to end: a tiny random transformers checkpoint
(Qwen3, Qwen3-MoE, Gemma 3, Gemma 2, Phi-3, OLMo 2, Mixtral) with a tiny tokenizer carrying the
family's real chat template, trained from `model.pretrained` on chat records for a few steps,
exported with `trainer.export`, and read back by transformers: the exported config names the
family's class, and the harness's greedy continuation equals transformers' `generate` on the
export, token for token (about 2.5 s a family here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import hf_family, read_metrics  # noqa: E402
from test_chat_families import conversation, save_family_tokenizer  # noqa: E402

from trainer.__main__ import compose_config  # noqa: E402
from trainer.export import find_checkpoint, load_model, main  # noqa: E402
from trainer.loop import train  # noqa: E402

FAMILIES = ["qwen3", "qwen3_moe", "gemma3_text", "gemma2", "phi3", "olmo2", "mixtral"]


def checkpoint(root: Path, model_type: str) -> Path:
    """The family's tokenizer and a random model of its vocabulary, saved together."""
    directory = save_family_tokenizer(root / model_type, model_type)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = hf_family(model_type, vocab_size=len(tokenizer), max_position_embeddings=128, **ids)
    model.save_pretrained(str(directory))
    return directory


@pytest.mark.heavy
@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_chat_fine_tune_exports_and_generates_as_transformers(model_type: str, tmp_path: Path) -> None:
    directory = checkpoint(tmp_path, model_type)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": conversation(i)}) + "\n" for i in range(24)))
    overrides = [
        "data=chat", f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}", f"model.pretrained={directory}",
        "train.seq_len=96", "train.micro_batch_size=2", "train.max_steps=3", "train.log_interval=1",
        "train.eval_interval=3", "train.eval_batches=1", "train.sample_tokens=0", "data.val_fraction=0.2",
        "optim.lr=3e-3", "optim.warmup_steps=0", "logger.wandb=false", "logger.progress_bar=false",
    ]  # fmt: skip
    cfg, _ = compose_config(overrides)
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    losses = [row["loss"] for row in read_metrics(run_dir) if "loss" in row]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # lr 3e-3 on 24 repeated conversations: it learns

    out = tmp_path / "export"
    assert main([str(run_dir), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert config["model_type"] == model_type and type(reference).__name__ == config["architectures"][0]

    ours, _ = load_model(find_checkpoint(run_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    prompt = tokenizer.apply_chat_template(conversation(0)[:1], add_generation_prompt=True, tokenize=False)
    idx = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        theirs = reference.generate(idx, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        mine = ours.eval().generate(idx, max_new_tokens=12, temperature=0.0)
    assert torch.equal(mine, theirs)
