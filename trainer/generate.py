"""Generate text from a run or a checkpoint, on one process.

    python -m trainer.generate SOURCE --prompt TEXT [--max-new-tokens 64] [--temperature 0]
                               [--top-k K] [--raw] [--seed 0] [--device cpu]

SOURCE is a run directory (its latest verified checkpoint) or one checkpoint directory, of any
strategy (see trainer.export). The tokenizer is the one the run saved (the checkpoint's
`tokenizer` part), or for byte-level runs the byte tokenizer as a transformers one. A tokenizer
with a chat template (a chat or instruct model) gets the prompt as one user turn with the
generation prompt, unless --raw. Generation stops after --max-new-tokens, or at a stop id: the
tokenizer's end-of-sequence token, its family's end-of-turn tokens (trainer.model.families:
Gemma's <end_of_turn>, Phi-3's <|end|>) and the eos_token_id list of a generation_config.json
the run saved with its tokenizer. Temperature 0 is greedy. Errors: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from trainer.data.tokenizer import ByteTokenizer, chat_quirks, generation_eos_ids, stop_ids, to_hf
from trainer.export import ExportError, find_checkpoint, load_model, tokenizer_dir


def load_tokenizer(checkpoint: Path) -> Any:
    """The tokenizer the checkpoint's run trained with, as transformers' fast tokenizer (a byte run
    saved none: ByteTokenizer.hf(), the same ids)."""
    directory = tokenizer_dir(checkpoint)
    if directory is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    ref = json.loads((checkpoint / "meta.json").read_text())["parts"].get("tokenizer") or {}
    if ref.get("fingerprint") == "byte":
        return to_hf(ByteTokenizer())
    if str(ref.get("fingerprint")).startswith("identity-"):
        raise ExportError(
            f"{checkpoint} trained on synthetic data, which has no text tokenizer: text generation and downstream "
            "tasks need a run with data=... and a text tokenizer"
        )
    raise ExportError(f"{checkpoint} names no saved tokenizer (a run from an older trainer, or synthetic data)")


def stop_ids_of(checkpoint: Path, tokenizer: Any, model_type: str | None) -> tuple[int, ...]:
    """The ids that end generation: the tokenizer's eos, the end-of-turn tokens of model_type's
    family, and generation_config.json's eos_token_id in the run's tokenizer or the checkpoint
    directory."""
    extra = generation_eos_ids(tokenizer_dir(checkpoint)) + generation_eos_ids(checkpoint)
    return stop_ids(tokenizer.eos_token_id, tokenizer.get_vocab().get, chat_quirks(model_type), extra)


def prompt_ids(tokenizer: Any, prompt: str, raw: bool) -> list[int]:
    """The prompt's ids: one user turn through the chat template when the tokenizer has one, else
    the text with the tokenizer's own special tokens (a Llama BOS), as transformers' pipeline does."""
    if not raw and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    raw: bool = False,
    *,
    stop: Collection[int] | None = None,
) -> str:
    """The continuation of `prompt` (new text only), stopping at an id of `stop` (None: the
    tokenizer's eos); the stop id itself is left out of the text."""
    device = next(model.parameters()).device
    if stop is None:
        stop = (tokenizer.eos_token_id if hasattr(tokenizer, "eos_token_id") else tokenizer.eot_id,)  # HF or ours
    stop = [i for i in stop if i is not None]
    ids = prompt_ids(tokenizer, prompt, raw)
    if not ids:
        raise ExportError("the prompt encodes to no tokens: give a non-empty --prompt")
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_k=top_k,
        generator=generator, eos_id=stop or None,
    )  # fmt: skip
    new = out[0, len(ids) :].tolist()
    if new and new[-1] in stop:
        new = new[:-1]
    return tokenizer.decode(new)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m trainer.generate`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a run directory or a checkpoint directory (step_...)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="no chat template, even when the tokenizer has one")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens <= 0 or args.temperature < 0:
            raise ExportError("--max-new-tokens must be positive and --temperature at least 0")
        checkpoint = find_checkpoint(args.source)
        tokenizer = load_tokenizer(checkpoint)
        model, info = load_model(checkpoint)
        model.to(args.device).eval()
        stop = stop_ids_of(checkpoint, tokenizer, info["model_config"].get("hf_model_type"))
        text = generate(
            model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, args.raw,
            stop=stop,
        )  # fmt: skip
    except (ExportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
