"""Export a checkpoint of any strategy as consolidated weights, on one CPU process.

    python -m trainer.export SOURCE --out DIR [--hf | --no-hf] [--force]

SOURCE is a run directory (the checkpoint `checkpoints/latest` names; if it fails verification,
the newest one before it that passes) or one checkpoint directory (`checkpoints/step_XXXXXXXX`).
The checkpoint is verified against its manifest, GPT is rebuilt from the model part's info.json and
the weights are read without a process group: torch.distributed.checkpoint reshards a none /
ddp / fsdp checkpoint of any world size into this one process; DeepSpeed's zero_to_fp32
assembles the fp32 master weights of a zero1-3 checkpoint. DIR gets model.safetensors plus,
with --hf (the default) and a Hugging Face family (trainer.model.families), a config.json
for transformers' from_pretrained (tensors under Hugging Face names) with the tokenizer's real
bos / eos / pad ids, the tokenizer files the run saved (the checkpoint's `tokenizer` part names
them; a byte run saved none and gets ByteTokenizer.hf()'s) and generation_config.json, so
`transformers.pipeline("text-generation", model=DIR)` runs as it is (the vocabulary's padding
rows, model.vocab_multiple, are dropped: transformers gets the checkpoint's shapes); otherwise the tensors keep GPT's names and shapes and trainer_config.json
holds the ModelConfig. DIR is written as DIR.tmp, then renamed; an existing non-empty DIR is
refused unless --force. Errors: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint import CheckpointException

from trainer.checkpoint import PREFIX, CheckpointStore, verify
from trainer.config import ModelConfig
from trainer.model.gpt import GPT, WRAPPER_NAMES
from trainer.model.hf_import import export_hf, hf_config_dict

DCP_STRATEGIES = ("none", "ddp", "fsdp")
ZERO_STRATEGIES = ("zero1", "zero2", "zero3")


class ExportError(Exception):
    """Export cannot go on (its message is one line for the user)."""


def find_checkpoint(source: Path, warn=lambda m: print(f"warning: {m}", file=sys.stderr)) -> Path:
    """The verified checkpoint directory that SOURCE (a run or a checkpoint directory) names."""
    if not source.exists():
        raise ExportError(f"{source} does not exist: give a run directory or a checkpoint directory")
    if (source / "meta.json").exists() or source.name.startswith(PREFIX):
        problem = verify(source)
        if problem:
            raise ExportError(f"checkpoint {source} fails verification: {problem}")
        return source
    if not (source / "checkpoints").is_dir():
        raise ExportError(f"{source} is neither a run directory (no checkpoints/) nor a checkpoint directory")
    found = CheckpointStore(source).find("auto", warn=warn)
    if found is None:
        raise ExportError(f"{source / 'checkpoints'} holds no checkpoint that passes verification")
    return found


def tokenizer_dir(checkpoint: Path) -> Path | None:
    """The directory of the tokenizer the checkpoint's run saved (its `tokenizer` part), or None."""
    ref = json.loads((checkpoint / "meta.json").read_text())["parts"].get("tokenizer") or {}
    if not ref.get("directory"):
        return None
    directory = checkpoint.parent.parent / ref["directory"]  # run_dir/checkpoints/step_N -> run_dir
    if not directory.is_dir():
        raise ExportError(f"{directory} is missing: the tokenizer {checkpoint} was trained with is not in its run dir")
    return directory


def special_ids(tokenizer: Path | None, fingerprint: str | None) -> dict[str, int | None]:
    """bos / eos / pad ids for config.json and generation_config.json, from the run's tokenizer.
    Written even when unknown (null): transformers' GPT-2 defaults (50256) are wrong elsewhere."""
    if tokenizer is None:
        eos = 256 if fingerprint == "byte" else None  # the byte tokenizer ends documents with 256
        return {"bos_token_id": None, "eos_token_id": eos, "pad_token_id": None}
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    return {
        "bos_token_id": loaded.bos_token_id,
        "eos_token_id": loaded.eos_token_id,
        "pad_token_id": loaded.pad_token_id,
    }


def write_tokenizer(out: Path, tokenizer: Path | None, fingerprint: str | None) -> str:
    """Tokenizer files, the special ids in config.json, and generation_config.json; returns what, in words.
    A byte run saved no tokenizer (bytes need no files to train): its files are ByteTokenizer.hf()'s."""
    ids = special_ids(tokenizer, fingerprint)
    if tokenizer is not None:
        for file in tokenizer.iterdir():
            if file.is_file() and file.name != "fingerprint.txt":
                shutil.copy2(file, out / file.name)
    elif fingerprint == "byte":
        from trainer.data.tokenizer import ByteTokenizer

        ByteTokenizer().hf().save_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | ids, indent=2) + "\n")
    generation = {k: v for k, v in ids.items() if v is not None}
    if generation.get("pad_token_id") is None and "eos_token_id" in generation:
        generation["pad_token_id"] = generation["eos_token_id"]  # generation only: padding of finished rows
    saved = tokenizer / "generation_config.json" if tokenizer is not None else None
    if saved is not None and saved.is_file():  # the run's stop ids: eos and the family's end-of-turn tokens
        stops = json.loads(saved.read_text()).get("eos_token_id")
        generation["eos_token_id"] = stops if stops is not None else generation.get("eos_token_id")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return " + tokenizer" if tokenizer is not None or fingerprint == "byte" else ""


def load_model(checkpoint: Path) -> tuple[GPT, dict]:
    """GPT as the checkpoint's model part describes it, holding its weights (fp32, CPU); and the
    part's info (strategy, world size, model config) with the checkpoint's step."""
    state_dir = checkpoint / "model"
    info_path = state_dir / "info.json"
    if not info_path.is_file():
        raise ExportError(f"{info_path} is missing (a checkpoint written by an older trainer?)")
    info = json.loads(info_path.read_text())
    info["step"] = json.loads((checkpoint / "meta.json").read_text())["step"]
    strategy = info.get("strategy")
    if strategy not in DCP_STRATEGIES + ZERO_STRATEGIES:
        raise ExportError(f"{checkpoint} was written by unknown strategy {strategy!r}")
    if strategy in ZERO_STRATEGIES and importlib.util.find_spec("deepspeed") is None:
        raise ExportError(
            f'{checkpoint} was written by parallel={strategy}: reading it needs DeepSpeed: pip install -e ".[deepspeed]"'
        )
    try:  # written before vocab_multiple existed: the embedding held vocab_size rows, no padding
        cfg = ModelConfig(**{"vocab_multiple": 1, **info["model_config"]})
    except (TypeError, ValueError) as error:  # a field this version lacks, or a value it rejects
        raise ExportError(f"{info_path}: `model_config` does not fit ModelConfig ({error})") from error
    lora = json.loads((checkpoint / "meta.json").read_text())["parts"].get("lora")
    if lora is not None:  # adapters only: the base comes from its source
        from trainer.config import ConfigError
        from trainer.lora.export import load_lora_model

        try:
            return load_lora_model(checkpoint, cfg, lora), info | {"lora": lora}
        except (ConfigError, ValueError, OSError) as error:
            raise ExportError(f"cannot rebuild the LoRA model of {checkpoint}: {error}") from error
    with torch.device("meta"):  # no random init: every parameter is overwritten below
        model = GPT(cfg)
    model.to_empty(device="cpu")
    try:
        with warnings.catch_warnings():  # DCP warns that it runs without a process group
            warnings.simplefilter("ignore")
            state = _read_dcp(model, state_dir) if strategy in DCP_STRATEGIES else _read_zero(state_dir)
        model.load_state_dict(state, strict=True)
    except (Exception, CheckpointException) as error:  # DCP's is a BaseException
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"cannot load the weights in {state_dir}: {first}") from error
    return model, info


def _read_dcp(model: GPT, state_dir: Path) -> dict[str, torch.Tensor]:
    """dcp.save wrote {"model": {parameter name: tensor}, "optim": ...}; read the model part."""
    import torch.distributed.checkpoint as dcp

    state = model.state_dict()  # same names as get_state_dict gave at save time
    dcp.load({"model": state}, checkpoint_id=str(state_dir), no_dist=True)  # fills state in place
    return state


def _read_zero(state_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 master weights from every rank's ZeRO partitions, named as GPT's named_parameters."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag="zero")
    # named_parameters() under activation checkpointing says blocks.0._checkpoint_wrapped_module...
    return {".".join(p for p in k.split(".") if p not in WRAPPER_NAMES): v for k, v in state.items()}


def write_export(model: GPT, out: Path, hf: bool, checkpoint: Path | None = None) -> str:
    """Write out/ via out.tmp/ (then renamed); return what was written, in words. checkpoint: where
    the run's tokenizer is found (its `tokenizer` part), for a Hugging Face export."""
    out = out.resolve()
    cfg, state = model.cfg, {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        architecture = hf_config_dict(cfg)["architectures"][0] if hf else None
    except ValueError:  # neither a GPT-2 nor a Llama layout
        architecture = None
    try:
        if architecture:
            export_hf(state, tmp, cfg)
            what = f"model.safetensors + config.json ({architecture})"
            if checkpoint is not None:
                fingerprint = json.loads((checkpoint / "meta.json").read_text())["parts"].get("tokenizer", {})
                what += write_tokenizer(tmp, tokenizer_dir(checkpoint), fingerprint.get("fingerprint"))
                what += " + generation_config.json"
        else:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "trainer_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
            what = "model.safetensors + trainer_config.json" + (" (no Hugging Face layout fits)" if hf else "")
        if out.exists():  # empty, or --force
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return what


def write_adapter_export(checkpoint: Path, out: Path) -> str:
    """A LoRA checkpoint's adapter in PEFT's format, with the run's tokenizer beside it."""
    out = out.resolve()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint / "adapter", tmp)
    tokenizer = tokenizer_dir(checkpoint)
    for file in tokenizer.iterdir() if tokenizer is not None else ():
        if file.is_file() and file.name != "fingerprint.txt":
            shutil.copy2(file, tmp / file.name)
    if out.exists():  # empty, or --force
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    return "PEFT adapter (adapter_config.json + adapter_model.safetensors)" + (" + tokenizer" if tokenizer else "")


def merge_with_report(model: GPT, lora: dict) -> GPT:
    """The adapters merged into the base in fp32, cast to the base checkpoint's dtype; prints how
    far the merged model's logits are from the adapter model's on a held batch."""
    from trainer.config import LoraConfig
    from trainer.lora.export import base_dtype, fidelity, merged

    dtype = base_dtype(model.cfg)
    plain = merged(model, LoraConfig(**lora["config"]), dtype)
    report = fidelity(model, plain)
    print(
        f"merged in fp32, stored as {str(dtype).removeprefix('torch.')}: max |logit difference| "
        f"{report['max_logit_diff']:.3g} vs the adapter model, top-1 agreement {report['top1_agreement']:.2%} "
        f"on a held batch of {report['tokens']} tokens"
    )
    return plain


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m trainer.export`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a run directory or a checkpoint directory (step_...)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument(
        "--hf",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Hugging Face names + config.json for GPT-2 / Llama layouts (default: on)",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--merge", action="store_true", help="LoRA runs: merge the adapters into the base (default: the PEFT adapter)"
    )
    args = parser.parse_args(argv)
    try:
        occupied = args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir()))
        if occupied and not args.force:
            raise ExportError(f"--out {args.out} exists and is not empty: choose another directory or pass --force")
        checkpoint = find_checkpoint(args.source)
        model, meta = load_model(checkpoint)
        if "lora" in meta and not args.merge:
            what = write_adapter_export(checkpoint, args.out)
        else:
            if "lora" in meta:
                model = merge_with_report(model, meta["lora"])
            elif args.merge:
                raise ExportError(f"{checkpoint} is not from a LoRA run: there is nothing to merge (drop --merge)")
            what = write_export(model, args.out, args.hf, checkpoint)
    except (ExportError, OSError) as error:  # OSError: --out cannot be written
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.out}: {what}, {n_params / 1e6:.2f}M params from {checkpoint} "
        f"(step {meta['step']}, parallel={meta['strategy']} on {meta['world_size']} rank(s))"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
