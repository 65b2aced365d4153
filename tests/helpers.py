"""Helpers for tests that run the trainer for real: one process or torchrun, and their outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

QUICK = [  # a synthetic run that takes seconds on 2 CPU cores
    "experiment=synthetic",
    "logger.wandb=false",
    "train.sample_tokens=0",
    "model.n_layer=2",
    "model.n_embd=64",
    "train.seq_len=32",
    "model.bias=false",
]


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS` in a subprocess."""
    command = [sys.executable, "-m", "trainer", *args]
    return subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def torchrun(*args: str, cwd: Path, nproc: int = 2, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node NPROC [EXTRA] ARGS` in a subprocess."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *extra,
        *args,
    ]
    return subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)


LORA_RUN = [  # a LoRA fine-tuning run of a few seconds on a finetune_dir checkpoint
    "logger.wandb=false", "logger.progress_bar=false", "train.sample_tokens=0", "train.seq_len=96",
    "data.val_fraction=0.2", "train.eval_batches=4", "optim.lr=1e-2", "optim.warmup_steps=0", "train.log_interval=1",
    "data.packing=false", "train.micro_batch_size=2", "lora=default", "lora.r=4", "lora.base_dtype=fp32",
]  # fmt: skip


def lora_run_args(root: Path, model: str, *extra: str) -> list[str]:
    """Overrides for LORA_RUN on root/<model> (a finetune_dir checkpoint) with root/instruct.jsonl."""
    return [*LORA_RUN, "data=instruct", f"data.path={root / 'instruct.jsonl'}", f"model.pretrained={root / model}",
            f"data.cache_dir={root / 'cache'}", *extra]  # fmt: skip


def run_trainer(root: Path, name: str, *args: str, nproc: int = 1) -> Path:
    """`python -m trainer ARGS` with its run dir root/name, under torchrun when nproc > 1; fails the test
    (with the run's last stderr) unless it succeeded. Returns the run dir."""
    out = root / name
    args = (*args, f"hydra.run.dir={out}")
    done = torchrun("-m", "trainer", *args, cwd=root, nproc=nproc) if nproc > 1 else run_cli(*args, cwd=root)
    assert done.returncode == 0, (name, done.stderr[-4000:])
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- how far two fp32 computations of the same quantity may differ --------------------------------

FP32_UNIT_ROUNDOFF = 2.0**-24  # u: the largest relative error of one fp32 rounding


def fp32_rtol(terms: int, depth: int) -> float:
    """The relative difference, in norm, to allow between two fp32 results that add the same `terms`
    products in different orders (ranks, micro-batches, loss chunks), through `depth` such sums one
    after another: depth * sqrt(terms) * u.

    A sum of n products rounded in any order errs by about sqrt(n) * u relative to its scale (the
    probabilistic bound of Higham and Mary, SIAM J. Sci. Comput. 2019, with its constant 1; the
    worst case, n * u, needs every rounding to go the same way); the errors of sums fed one into the
    next add. Valid only for quantities that are smooth in their inputs: gradients, or weights after
    an update linear in the gradient, not weights after Adam's g / sqrt(v) step, which turns the
    rounding noise of a near-zero gradient into a full-size step."""
    return depth * terms**0.5 * FP32_UNIT_ROUNDOFF


# -- one optimizer step through the real strategy code (tests and their torchrun workers) ------------


def masked_global_batch(keep: tuple[int, ...] = (1, 3, 2, 5, 16, 16, 12, 16), vocab: int = 64, seed: int = 0):
    """8 sequences of 16 tokens; row i keeps its first keep[i] targets, the rest are masked, so
    micro-batches and ranks hold very different numbers of target tokens (as prompt masking does)."""
    import torch

    from trainer.model.loss import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (len(keep), 16), generator=g)
    y = torch.randint(0, vocab, (len(keep), 16), generator=g)
    for row, kept in enumerate(keep):
        y[row, kept:] = IGNORE_INDEX
    return x, y


def build(cfg, seed: int = 0, before_parallelize=None):
    """The strategy cfg names, holding GPT(cfg.model) initialised from `seed` (the loop's path:
    built on the meta device, materialised by the strategy). before_parallelize(model) may
    register hooks on the model before it is wrapped."""
    from trainer.model.build import build_model
    from trainer.parallel import build_strategy, parallelize

    strategy = build_strategy(cfg)
    model, weights = build_model(cfg.model, seed, cfg.quant)
    if before_parallelize is not None:
        before_parallelize(model)
    parallelize(model, weights, cfg, strategy)
    return strategy


def step_once(strategy, x, y, micro_batch_size: int, clip: float, stats: bool = True) -> dict:
    """One clipped train_step on this rank's share of the global batch (x, y); rank 0 gets the
    per-group statistics as floats and the whole model's weights after the step."""
    import torch

    from trainer.data import shard_for_rank
    from trainer.step import train_step

    rows = torch.from_numpy(shard_for_rank(torch.arange(len(x)).numpy(), strategy.rank, strategy.world_size))
    result = train_step(strategy, x[rows], y[rows], len(rows) // micro_batch_size, clip, stats=stats)
    as_floats = lambda sums: {k: v.item() for k, v in sums.items()}  # noqa: E731
    return {
        "sums": as_floats(result.grad_sumsq), "norm": result.grad_norm, "params": as_floats(result.param_sumsq),
        "updates": as_floats(result.update_sumsq), "weights": strategy.full_state_dict(),
    }  # fmt: skip


# -- tiny models: trainer ModelConfig fields, and random Hugging Face models built locally ---------


def randomize_adapters(model, seed: int = 2) -> None:
    """LoRA adapters away from init (B = 0 would hide A), DoRA magnitudes off the row norms."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_magnitude." in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


GPT2_LIKE = dict(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32)
LLAMA_LIKE = dict(
    GPT2_LIKE, n_kv_head=2, intermediate_size=48, norm="rmsnorm", mlp="swiglu", position="rope", bias=False,
    tie_embeddings=False,
)  # fmt: skip
HF_SPECIAL = dict(bos_token_id=0, eos_token_id=0)  # token ids inside the tiny vocabularies
HF_CONTEXT = 64  # n_positions / max_position_embeddings of the checkpoints conftest's hf_checkpoints builds


def hf_gpt2(**config):
    """A random transformers GPT2LMHeadModel (no hub: built here); config overrides the tiny defaults."""
    import transformers

    defaults = dict(vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, **HF_SPECIAL)  # fmt: skip
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**defaults, **config}))


def hf_llama(tie: bool = False, cls=None, **config):
    """A random Llama-family transformers model with GQA (cls: (config class, model class), e.g.
    Mistral's); config overrides the tiny defaults."""
    import transformers

    config_cls, model_cls = cls or (transformers.LlamaConfig, transformers.LlamaForCausalLM)
    defaults = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, **HF_SPECIAL)  # fmt: skip
    return model_cls(config_cls(**{**defaults, **config}, tie_word_embeddings=tie))


def hf_qwen2(tie: bool = False, **config):
    """A random transformers Qwen2ForCausalLM (GQA, q / k / v biases); config overrides the tiny defaults."""
    import transformers

    return hf_llama(tie, (transformers.Qwen2Config, transformers.Qwen2ForCausalLM), **config)


def hf_mistral(tie: bool = False, **config):
    """A random transformers MistralForCausalLM (GQA; sliding_window 4096 unless overridden, which
    covers the tiny context); config overrides the tiny defaults."""
    import transformers

    return hf_llama(tie, (transformers.MistralConfig, transformers.MistralForCausalLM), **config)


def hf_family(model_type: str, **config):
    """A random transformers model of a later family (qwen3, gemma3_text, gemma2, phi3, olmo2,
    mixtral, qwen3_moe), tiny: 2 layers, GQA 4 / 2 heads, head size 16 (Qwen3 and Gemma: 24, unlike
    hidden / heads), MoE 4 experts top-2; config overrides these defaults."""
    import transformers

    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, **HF_SPECIAL)  # fmt: skip
    own_head = dict(head_dim=24)
    moe = dict(num_experts_per_tok=2, router_aux_loss_coef=0.02)
    families = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, own_head),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                        dict(own_head, query_pre_attn_scalar=20, sliding_window=6, layer_types=["sliding_attention",
                             "full_attention"], rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                             "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                   dict(own_head, query_pre_attn_scalar=20, sliding_window=6, attn_logit_softcapping=5.0,
                        final_logit_softcapping=3.0)),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(pad_token_id=0)),
        "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, {}),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(moe, num_local_experts=4)),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                      dict(moe, **own_head, num_experts=4, moe_intermediate_size=40, norm_topk_prob=True)),
    }  # fmt: skip
    config_cls, model_cls, defaults = families[model_type]
    return model_cls(config_cls(**{**common, **defaults, **config}))


# -- tiny Hugging Face tokenizers, built locally (no hub) --------------------------------------------

TINY_TOKENIZER_TEXT = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus two is four.
You are a helpful assistant. Answer the question briefly and politely. Thank you for asking!
Hello, how are you today? I am fine, thank you. Could you tell me a story about a dragon and a knight?
Once upon a time there was a small village near the mountains, where people grew apples and wheat.
def add(x, y):
    return x + y
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Lists, tuples and dictionaries hold values in Python.
The weather is sunny with a light breeze; tomorrow it may rain, so bring an umbrella.
Please summarise the following text in one sentence. Translate this sentence into French.
"""
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_TEMPLATE = (  # ChatML with Qwen2's default system turn
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def save_tiny_tokenizer(directory, style: str) -> int:
    """A small fast byte-level BPE tokenizer with a chat template, saved with save_pretrained into
    `directory`; returns len(tokenizer) (a model's vocab_size must be at least this). Styles:
    gpt2   <|endoftext|> is bos = eos, no pad, a ChatML template (<|im_start|> / <|im_end|>)
    llama3 <|begin_of_text|> added by the post-processor, eos <|eot_id|>, pad <|finetune_right_pad_id|>,
           a Llama 3 template that starts with {{ bos_token }}
    qwen2  ChatML with a default system turn, eos <|im_end|>, pad <|endoftext|>, no bos"""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {
        "gpt2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|finetune_right_pad_id|>"],
        "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    }[style]  # fmt: skip
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator([TINY_TOKENIZER_TEXT], trainer=trainer)
    if style == "gpt2":
        tokens = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
        template = CHATML_TEMPLATE
    elif style == "llama3":
        bos = "<|begin_of_text|>"
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
        tokens = dict(bos_token=bos, eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
        template = LLAMA3_TEMPLATE
    else:
        tokens = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
        template = QWEN2_TEMPLATE
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **tokens)
    tokenizer.save_pretrained(str(directory))
    return len(tokenizer)


# -- fine-tuning: tiny HF models with their own tokenizers, and instruction / chat records ----------

WORDS = "the quick brown fox jumps over lazy dog capital of France is Paris two plus four hello story".split()
EXAMPLES = 10  # records per file; at data.val_fraction=0.2 the last 2 are validation, the first 8 train
FINETUNE_STYLES = {
    "gpt2": "gpt2",
    "llama": "llama3",
    "qwen2": "qwen2",
    "qwen3_moe": "qwen2",
}  # model -> tokenizer style


def phrase(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def instruct_records() -> list[dict]:
    return [{"prompt": f"Q{i}: {phrase(i, 3)}?", "response": phrase(i + 1, 2 + i % 4)} for i in range(EXAMPLES)]


def preference_records() -> list[dict]:
    """instruct_records' prompts, the response chosen over another record's (a different length)."""
    return [
        {"prompt": f"Q{i}: {phrase(i, 3)}?", "chosen": phrase(i + 1, 2 + i % 4), "rejected": phrase(i + 5, 1 + i % 3)}
        for i in range(EXAMPLES)
    ]


def chat_records() -> list[dict]:
    records = []
    for i in range(EXAMPLES):
        messages = [{"role": "user", "content": phrase(i, 2)}, {"role": "assistant", "content": phrase(i + 2, 3)}]
        if i % 2:
            messages = [{"role": "system", "content": "be brief"}, *messages]
            messages += [{"role": "user", "content": phrase(i + 5, 1)}, {"role": "assistant", "content": phrase(i, 2)}]
        records.append({"messages": messages})
    return records


def build_finetune_dir(root):
    """Per model (gpt2, llama, qwen2, qwen3_moe): a tiny random HF checkpoint with its tokenizer in root/<model>;
    and root/instruct.jsonl, root/chat.jsonl, root/preference.jsonl. Returns root."""
    import json

    import torch

    builders = {
        "gpt2": lambda v: hf_gpt2(vocab_size=v, n_positions=128, n_embd=32, n_head=2),
        "llama": lambda v: hf_llama(vocab_size=v, hidden_size=32, intermediate_size=48, max_position_embeddings=128),
        "qwen2": lambda v: hf_qwen2(vocab_size=v, hidden_size=32, intermediate_size=48, max_position_embeddings=128),
        "qwen3_moe": lambda v: hf_family("qwen3_moe", vocab_size=v, hidden_size=32, intermediate_size=48, head_dim=8,
                                         moe_intermediate_size=24, max_position_embeddings=128),
    }  # fmt: skip
    for name, build in builders.items():
        vocab = save_tiny_tokenizer(root / name, FINETUNE_STYLES[name])
        torch.manual_seed(0)
        build(vocab).save_pretrained(root / name)
    records_of = {"instruct": instruct_records(), "chat": chat_records(), "preference": preference_records()}
    for kind, records in records_of.items():
        (root / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root
