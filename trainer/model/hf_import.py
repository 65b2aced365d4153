"""Import and export local Hugging Face checkpoints for GPT, for every family in trainer.model.families.

A checkpoint directory holds config.json plus model.safetensors, sharded safetensors with
model.safetensors.index.json, or (fallback) pytorch_model.bin. Nothing is downloaded. The
checkpoint's model_type names its family module, which translates config.json (`fields`, `config`)
and names each of GPT's tensors (`rows`): GPT-2's Conv1D weights are transposed, separate q / k / v
projections concatenated into the fused c_attn ([q | k | v]) and split on export, one tensor per
expert stacked into (E, ...) tensors. Export writes the family the checkpoint came from
(ModelConfig.hf_model_type), else the first one whose switches fit. The embedding and an untied
head are padded with zero rows to ModelConfig.padded_vocab_size on import, one tensor at a time,
and trimmed back to the checkpoint's vocab_size on export (`pad_vocab`, `trim_vocab`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from trainer.config import PRETRAINED_OVERRIDABLE, ModelConfig
from trainer.model.families import FAMILIES, Family, Row, family
from trainer.model.families._common import qkv_sizes
from trainer.model.gpt import GPT, bare_name

# HF tensors that are buffers or duplicates, not weights GPT needs.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
# GPT's tensors with one row per token: padded to ModelConfig.padded_vocab_size rows.
VOCAB_ROWS = ("embed.wte.weight", "head.weight")


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _read_config_json(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory; expected a local Hugging Face checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; expected a Hugging Face checkpoint with config.json")
    return json.loads(config_file.read_text())


def load_hf_config(path: str | Path) -> ModelConfig:
    """Read a checkpoint's config.json into a ModelConfig, through its family's module."""
    hf = _read_config_json(path)
    fam = family(hf.get("model_type"), f"{path}/config.json")
    fields = fam.fields(hf, str(path))
    vocab_size = fields.pop("vocab_size", None) or hf["vocab_size"]  # a multimodal one's: its text_config's
    name = Path(path).name or "pretrained"
    return ModelConfig(name=name, vocab_size=vocab_size, pretrained=str(path), hf_model_type=fam.model_type, **fields)


def model_family(cfg: ModelConfig) -> Family:
    """The family export writes: model.hf_model_type (the checkpoint's) when it can hold cfg, else
    the first registered family that can (a model trained from scratch)."""
    if cfg.hf_model_type is not None:
        fam = family(cfg.hf_model_type)
        reason = fam.fits(cfg)
        if reason is not None:
            raise ValueError(f"model {cfg.name!r} cannot be written as hf_model_type={cfg.hf_model_type}: {reason}")
        return fam
    family("gpt2")  # loads the registry
    reasons = {}
    for fam in FAMILIES.values():
        reasons[fam.model_type] = fam.fits(cfg)
        if reasons[fam.model_type] is None:
            return fam
    raise ValueError(
        f"model {cfg.name!r} matches no Hugging Face family: "
        + "; ".join(f"{reason}" for reason in reasons.values() if reason)
    )


def _arch(cfg: ModelConfig) -> str:
    """The model_type export writes (see model_family)."""
    return model_family(cfg).model_type


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF model_type export writes: model.hf_model_type (the checkpoint's), else the layout's."""
    return model_family(cfg).model_type


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The config.json transformers needs to rebuild cfg as the architecture it came from."""
    fam = model_family(cfg)
    head = {"architectures": [fam.hf_class], "model_type": fam.model_type, "vocab_size": cfg.vocab_size}
    config = head | _special_token_ids(cfg) | fam.config(cfg)
    if "text_config" in config:  # a multimodal checkpoint: the vocabulary and the ids are its text model's
        for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
            config.pop(key, None)
    return config


def _special_token_ids(cfg: ModelConfig) -> dict:
    """bos / eos / pad ids: the source checkpoint's (generation reads eos_token_id), else no pad id
    (some families' config classes default to one past a small vocabulary)."""
    ids = {"pad_token_id": None}
    if cfg.pretrained and (Path(cfg.pretrained).expanduser() / "config.json").is_file():
        source = _read_config_json(cfg.pretrained)
        ids |= {k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source}
    return ids


# ---------------------------------------------------------------------------------------------
# Tensor names: one Row per GPT tensor (trainer.model.families.Row)


def _name_map(cfg: ModelConfig) -> list[Row]:
    rows = model_family(cfg).rows(cfg)
    if not cfg.tie_embeddings:
        rows.append(Row("head.weight", ("lm_head.weight",)))
    return rows


def _check_names(names: list[str], rows: list[Row], cfg: ModelConfig) -> None:
    """Raise (one line) when the HF names (prefix removed) lack a tensor GPT needs or hold one
    GPT would drop: the checkpoint's config and weights disagree."""
    present = set(names)
    missing = [h for row in rows for h in row.theirs if h not in present]
    if missing:
        raise ValueError(
            f"checkpoint lacks {len(missing)} tensors its config.json implies, e.g. {missing[:3]}: "
            "config.json and the weights disagree"
        )
    used = {h for row in rows for h in row.theirs} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    carried = model_family(cfg).carried
    unused = [k for k in names if k not in used and not k.endswith(_IGNORED_SUFFIXES) and not k.startswith(carried)]
    if unused:
        raise ValueError(
            f"checkpoint has {len(unused)} tensors its config.json does not account for, e.g. {unused[:3]}: "
            "config.json and the weights disagree"
        )


def _assemble(pieces: list[torch.Tensor], how: str) -> torch.Tensor:
    """One GPT tensor from its HF pieces (see Row.how)."""
    if how == "cat":
        t = torch.cat(pieces, dim=0)
    elif how == "stack":
        t = torch.stack(pieces, dim=0)
    else:
        (t,) = pieces
        t = t.t() if how == "conv1d" else t
    return t.contiguous()


def _disassemble(t: torch.Tensor, row: Row, cfg: ModelConfig) -> list[torch.Tensor]:
    """Inverse of _assemble: the HF pieces of GPT's tensor t, in row.theirs order."""
    if row.how == "cat":  # q, k, v
        return list(t.split(list(qkv_sizes(cfg)), dim=0))
    if row.how == "stack":
        return list(t.unbind(0))
    return [t.t() if row.how == "conv1d" else t]


def pad_vocab(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """GPT's tensor `name` with zero rows appended up to cfg.padded_vocab_size when it has one row
    per token (VOCAB_ROWS; it must hold cfg.vocab_size rows); any other tensor as it is."""
    if name not in VOCAB_ROWS:
        return tensor
    if tensor.size(0) != cfg.vocab_size:
        raise ValueError(f"{name} has {tensor.size(0)} rows, but the vocabulary (vocab_size) is {cfg.vocab_size}")
    padding = tensor.new_zeros(cfg.padded_vocab_size - cfg.vocab_size, *tensor.shape[1:])
    return torch.cat([tensor, padding]) if padding.numel() else tensor


def trim_vocab(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """GPT's tensor `name` without its padding rows (the real vocabulary's cfg.vocab_size rows
    when it has one row per token); any other tensor as it is."""
    return tensor[: cfg.vocab_size] if name in VOCAB_ROWS else tensor


def hf_to_trainer(hf_tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and fuse / stack / transpose, pad the vocabulary of) HF tensors into GPT's state
    dict. Also maps gradients (the padding rows' are zero)."""
    tensors = {k.removeprefix("transformer."): v for k, v in hf_tensors.items()}
    rows = _name_map(cfg)
    _check_names(list(tensors), rows, cfg)
    return {row.ours: pad_vocab(row.ours, _assemble([tensors[h] for h in row.theirs], row.how), cfg) for row in rows}


def trainer_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of hf_to_trainer: GPT's state dict in HF names (the family's prefix added: GPT-2's
    transformer.), the vocabulary's padding rows dropped."""
    state = {bare_name(k): v for k, v in state.items()}
    prefix = model_family(cfg).prefix
    out = {}
    for row in _name_map(cfg):
        t = trim_vocab(row.ours, state[row.ours].detach(), cfg)
        for name, part in zip(row.theirs, _disassemble(t, row, cfg), strict=True):
            key = name if name.startswith(("model.", "lm_head")) else prefix + name
            out[key] = part.contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Files


def _weight_files(path: Path) -> list[tuple[Path, list[str]]]:
    """The checkpoint's weight files in reading order, each with the tensor names it stores,
    taken from the index or the file's header: no tensor is read."""
    from safetensors import safe_open

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            by_file: dict[str, list[str]] = {}
            for name, file in json.loads(index.read_text())["weight_map"].items():
                by_file.setdefault(file, []).append(name)
            return [(path / file, by_file[file]) for file in sorted(by_file)]
    if (path / "model.safetensors").is_file():
        with safe_open(path / "model.safetensors", framework="pt") as f:
            return [(path / "model.safetensors", list(f.keys()))]
    if (path / "pytorch_model.bin").is_file():  # on meta: the names, no data
        names = torch.load(path / "pytorch_model.bin", map_location="meta", weights_only=True)
        return [(path / "pytorch_model.bin", list(names))]
    raise FileNotFoundError(
        f"{path}: no weights; expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _read_file(file: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for `names` of one weight file: one tensor at a time from safetensors, the
    whole file at once from a pickled pytorch_model*.bin (which has no per-tensor reader)."""
    from safetensors import safe_open

    if file.suffix == ".safetensors":
        with safe_open(file, framework="pt") as f:
            for name in names:
                yield name, f.get_tensor(name)
    else:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
        for name in names:
            yield name, tensors.pop(name)


def read_hf_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory under their HF names (on CPU, stored dtype)."""
    files = _weight_files(Path(path).expanduser())
    return {name: t for file, names in files for name, t in _read_file(file, names)}


def pretrained_weights(
    path: str | Path, cfg: ModelConfig, lazy: bool = False
) -> Iterator[tuple[str, torch.Tensor | CheckpointTensor]]:
    """GPT's tensors (our names; CPU; the checkpoint's dtype) streamed from a local HF checkpoint,
    each yielded once its HF pieces are read, file by file, so the whole model is never held: only
    pieces waiting for a partner in the next file (q, k, v of a layer split across shards).
    GPT-2's learned positions are cropped to cfg.block_size; the embedding and an untied head get
    zero rows up to cfg.padded_vocab_size. Missing or unused tensors, and (safetensors) a tensor
    whose shape config.json does not imply, are reported (ValueError) on the call, from the files'
    names and headers, before any tensor is read. lazy (safetensors files only): each tensor a
    CheckpointTensor, read when and as far as its consumer asks (a shard reads its rows only)."""
    path = Path(path).expanduser()
    files = _weight_files(path)
    rows = _name_map(cfg)
    _check_names([n.removeprefix("transformer.") for _, names in files for n in names], rows, cfg)
    _check_shapes(files, rows, cfg)
    if lazy and all(file.suffix == ".safetensors" for file, _ in files):
        return _lazy_rows(files, rows, cfg)
    return _stream(files, rows, cfg)


def check_weights(path: str | Path, cfg: ModelConfig) -> None:
    """Raise (one line) when the checkpoint's tensors (names from the index or the files' headers,
    shapes from the safetensors headers) are not the ones cfg (its config.json) implies. Reads no tensor."""
    files = _weight_files(Path(path).expanduser())
    rows = _name_map(cfg)
    _check_names([n.removeprefix("transformer.") for _, names in files for n in names], rows, cfg)
    _check_shapes(files, rows, cfg)


def _check_shapes(files: list[tuple[Path, list[str]]], rows: list[Row], cfg: ModelConfig) -> None:
    """Raise (one line) when a safetensors tensor's shape (read from the file's header) is not the
    one GPT's tensor built from config.json implies: config.json and the weights disagree."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file, names in files:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                shapes |= {n.removeprefix("transformer."): tuple(f.get_slice(n).get_shape()) for n in names}
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in GPT(cfg).named_parameters()}
    for row in rows:
        pieces = [shapes.get(h) for h in row.theirs]
        if None in pieces:
            continue  # not a safetensors file: torch.load reads it whole; load_state_dict checks it
        want = list(expected[row.ours])
        if row.ours in VOCAB_ROWS:
            want[0] = cfg.vocab_size
        elif row.ours == "embed.wpe.weight":
            want[0] = pieces[0][0]  # learned positions are cropped to block_size (checked there)
        got = _assembled_shape(pieces, row.how)
        if got != tuple(want):
            raise ValueError(
                f"checkpoint tensor {row.theirs[0]} has shape {pieces[0]}, but config.json implies "
                f"{_piece_shape(tuple(want), row, len(pieces))} for it: config.json and the weights disagree"
            )


def _assembled_shape(pieces: list[tuple[int, ...]], how: str) -> tuple[int, ...]:
    if how == "cat":
        return (sum(p[0] for p in pieces), *pieces[0][1:]) if all(p[1:] == pieces[0][1:] for p in pieces) else ()
    if how == "stack":
        return (len(pieces), *pieces[0]) if all(p == pieces[0] for p in pieces) else ()
    return tuple(reversed(pieces[0])) if how == "conv1d" else pieces[0]


def _piece_shape(ours: tuple[int, ...], row: Row, n: int) -> str:
    """What one HF piece of GPT's tensor should be, for the message (q / k / v: their concatenation)."""
    if row.how == "stack":
        return str(ours[1:])
    if row.how == "conv1d":
        return str(tuple(reversed(ours)))
    if row.how == "cat":
        return f"a {n}-way split of {ours}"
    return str(ours)


class CheckpointTensor:
    """One of GPT's tensors as a safetensors checkpoint holds it, read on demand: `rows(start, stop)`
    reads only those rows of GPT's tensor through safetensors slices of its pieces (a Conv1D weight's
    columns, the q / k / v pieces the range overlaps, the experts in it), `full()` all of it. Rows past
    the vocabulary (padding) are zeros; learned positions past block_size are never read. A strategy that
    holds a shard of the tensor reads only its shard (trainer.parallel.base.shard_of); `BYTES_READ` counts
    the bytes this process has read through it."""

    def __init__(self, ours: str, pieces: list[tuple[Path, str]], how: str, shape: tuple[int, ...],
                 dtype: torch.dtype, cfg: ModelConfig) -> None:  # fmt: skip
        self.ours, self.pieces, self.how, self.dtype = ours, pieces, how, dtype
        self.real = cfg.vocab_size if ours in VOCAB_ROWS else shape[0]  # rows the checkpoint holds (unpadded)
        self.shape = (cfg.padded_vocab_size, *shape[1:]) if ours in VOCAB_ROWS else shape

    def full(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        from safetensors import safe_open

        global BYTES_READ
        stop = min(stop, self.shape[0])
        real_stop = max(min(stop, self.real), start)
        parts = []
        if real_stop > start:
            if self.how == "stack":  # one piece per row (expert)
                for file, name in self.pieces[start:real_stop]:
                    with safe_open(file, framework="pt") as f:
                        parts.append(f.get_tensor(name)[None])
            elif self.how == "cat":  # the pieces' row ranges, end to end
                offset = 0
                for file, name in self.pieces:
                    with safe_open(file, framework="pt") as f:
                        piece = f.get_slice(name)
                        n = piece.get_shape()[0]
                        lo, hi = max(start - offset, 0), min(real_stop - offset, n)
                        if lo < hi:
                            parts.append(piece[lo:hi])
                        offset += n
            else:
                ((file, name),) = self.pieces
                with safe_open(file, framework="pt") as f:
                    piece = f.get_slice(name)
                    parts.append(piece[:, start:real_stop].t() if self.how == "conv1d" else piece[start:real_stop])
        tensor = torch.cat(parts) if parts else torch.empty(0, *self.shape[1:], dtype=self.dtype)
        BYTES_READ += tensor.numel() * tensor.element_size()
        if stop > real_stop:  # the vocabulary's padding rows
            tensor = torch.cat([tensor, tensor.new_zeros(stop - real_stop, *self.shape[1:])])
        return tensor.contiguous()


BYTES_READ = 0  # bytes read through CheckpointTensor in this process


def as_tensor(tensor: torch.Tensor | CheckpointTensor) -> torch.Tensor:
    """A weight source's tensor, read whole when it is still a CheckpointTensor."""
    return tensor.full() if isinstance(tensor, CheckpointTensor) else tensor


def _lazy_rows(
    files: list[tuple[Path, list[str]]], rows: list[Row], cfg: ModelConfig
) -> Iterator[tuple[str, CheckpointTensor]]:
    """pretrained_weights for safetensors checkpoints: each GPT tensor as a CheckpointTensor (nothing read)."""
    from safetensors import safe_open

    where: dict[str, tuple[Path, str, tuple[int, ...], torch.dtype]] = {}
    for file, stored in files:
        with safe_open(file, framework="pt") as f:
            for name in stored:
                piece = f.get_slice(name)
                dtype = getattr(torch, DTYPE_NAMES.get(piece.get_dtype(), "float32"))
                where[name.removeprefix("transformer.")] = (file, name, tuple(piece.get_shape()), dtype)
    for row in rows:
        pieces = [where[h] for h in row.theirs]
        shape = _assembled_shape([p[2] for p in pieces], row.how)
        if row.ours == "embed.wpe.weight":
            if cfg.block_size > shape[0]:
                raise ValueError(f"block_size={cfg.block_size} exceeds the checkpoint's {shape[0]} positions")
            shape = (cfg.block_size, *shape[1:])
        yield row.ours, CheckpointTensor(row.ours, [(p[0], p[1]) for p in pieces], row.how, shape, pieces[0][3], cfg)


DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
               "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip


def _stream(
    files: list[tuple[Path, list[str]]], rows: list[Row], cfg: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    row_of = {h: row for row in rows for h in row.theirs}
    waiting: dict[str, torch.Tensor] = {}  # pieces read whose row still lacks one
    for file, stored in files:
        # stored name -> HF name without GPT-2's prefix, for GPT's tensors only (no buffers, no
        # tied head)
        wanted = {n: n.removeprefix("transformer.") for n in stored}
        wanted = {n: h for n, h in wanted.items() if h in row_of}
        for name, tensor in _read_file(file, list(wanted)):
            waiting[wanted[name]] = tensor
            row = row_of[wanted[name]]
            if all(h in waiting for h in row.theirs):
                tensor = _assemble([waiting.pop(h) for h in row.theirs], row.how)
                if row.ours == "embed.wpe.weight":
                    tensor = _crop_positions(tensor, cfg.block_size)
                yield row.ours, pad_vocab(row.ours, tensor, cfg)


def _crop_positions(wpe: torch.Tensor, block_size: int) -> torch.Tensor:
    if block_size > wpe.size(0):
        raise ValueError(f"block_size={block_size} exceeds the checkpoint's {wpe.size(0)} positions")
    return wpe[:block_size].contiguous()


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, **overrides) -> GPT:
    """Build GPT from a local HF checkpoint. overrides: any of config.PRETRAINED_OVERRIDABLE (a smaller block_size
    crops GPT-2's learned positions). Built on the meta device, so nothing is randomly initialised."""
    bad = sorted(set(overrides) - set(PRETRAINED_OVERRIDABLE))
    if bad:
        raise ValueError(
            f"load_pretrained: cannot override {bad}; the checkpoint fixes them (allowed: {PRETRAINED_OVERRIDABLE})"
        )
    cfg = dataclasses.replace(load_hf_config(path), **overrides)
    with torch.device("meta"):
        model = GPT(cfg)
    state = {name: tensor.to(dtype) for name, tensor in pretrained_weights(path, cfg)}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def export_hf(model: GPT | Mapping[str, torch.Tensor], out_dir: str | Path, cfg: ModelConfig | None = None) -> None:
    """Write config.json + model.safetensors that transformers' from_pretrained loads.
    model: a GPT, or a full (unsharded) state dict with cfg given."""
    from safetensors.torch import save_file

    if cfg is None:
        if not isinstance(model, GPT):
            raise ValueError("export_hf: pass cfg when exporting a state dict")
        cfg = model.cfg
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    tensors = {k: v.cpu() for k, v in trainer_to_hf(state, cfg).items()}
    tensors |= _carried_tensors(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(tensors.values())).dtype
    config = hf_config_dict(cfg) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})


def _carried_tensors(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The source checkpoint's tensors GPT does not hold (Family.carried: a multimodal checkpoint's
    vision tower), read from model.pretrained for the export."""
    carried = model_family(cfg).carried
    if not carried:
        return {}
    if not cfg.pretrained or not Path(cfg.pretrained).expanduser().is_dir():
        raise ValueError(
            f"exporting {cfg.hf_model_type} copies its {', '.join(carried)} tensors from the source checkpoint, "
            f"but model.pretrained={cfg.pretrained} is not a directory here: put the checkpoint there"
        )
    files = _weight_files(Path(cfg.pretrained).expanduser())
    return {
        name: tensor
        for file, names in files
        for name, tensor in _read_file(file, [n for n in names if n.startswith(carried)])
    }
