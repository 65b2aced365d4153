"""The text of `python -m trainer --help`, generated from the schema and configs/.

Each key's description is its comment in trainer/config/schema.py: the comment on the field's line(s),
after the comment lines just above it; each section's header is its dataclass's docstring. The config
groups are the folders of configs/, their options the YAML files in them, described by each file's
comment lines after its command.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import re
import textwrap
import tokenize
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import OmegaConf

from trainer.config import schema
from trainer.config.schema import Config

WIDTH = 110  # columns of the help text
PRAGMAS = ("noqa", "type:", "fmt:", "pragma")  # comments meant for tools, not for readers


class Key(NamedTuple):
    """One config key as the help shows it."""

    name: str  # dotted: model.n_layer
    type: str  # the annotation as written in the schema: int | None
    value: Any  # this command's value (the default, with the command line's overrides)
    description: str  # "" when the field has no comment


class Section(NamedTuple):
    """The keys of one dataclass: `model.*`, `monitor.spike.*`, ..."""

    prefix: str
    header: str  # the class docstring's first paragraph, as one line
    keys: list[Key]


def schema_comments(source: str | None = None) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """({class: {field: description}}, {class: docstring's first paragraph}) read from schema.py's source.

    A description is the comment lines just above a field followed by the comments on its own lines
    (an annotation or a default may span several), joined into one line.
    """
    source = source if source is not None else Path(schema.__file__).read_text()
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        text = token.string.lstrip("#").strip()
        if token.type == tokenize.COMMENT and not text.startswith(PRAGMAS):
            comments[token.start[0]] = (text, token.line.lstrip().startswith("#"))  # (text, whole line?)
    fields: dict[str, dict[str, str]] = {}
    docs: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        docs[node.name] = " ".join((ast.get_docstring(node) or "").split("\n\n")[0].split())
        fields[node.name] = {}
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1
            while line in comments and comments[line][1]:
                above.insert(0, comments[line][0])
                line -= 1
            inline = [comments[n][0] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
            if above or inline:
                fields[node.name][stmt.target.id] = " ".join(above + inline)
    return fields, docs


def sections(cfg: Config | None = None) -> list[Section]:
    """Every key of the schema, grouped by dataclass, with the values of cfg (default: the schema's)."""
    descriptions, docs = schema_comments()
    out: list[Section] = []

    def walk(obj: Any, prefix: str) -> None:
        name = type(obj).__name__
        keys, nested = [], []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((value, f"{prefix}{f.name}."))
            else:
                keys.append(Key(prefix + f.name, str(f.type), value, descriptions.get(name, {}).get(f.name, "")))
        if keys:
            out.append(Section(prefix + "*", docs.get(name, ""), keys))
        for value, sub in nested:
            walk(value, sub)

    walk(cfg if cfg is not None else Config(), "")
    return out


def group_options(config_dir: Path) -> dict[str, list[str]]:
    """{group: [option, ...]}: configs/<group>/<option>.yaml, groups in the order config.yaml lists them."""
    order = list(default_choices(config_dir))
    rank = {name: i for i, name in enumerate(order)}
    groups = sorted(
        (p for p in config_dir.iterdir() if p.is_dir()), key=lambda p: (rank.get(p.name, len(rank)), p.name)
    )
    return {p.name: sorted(y.stem for y in p.glob("*.yaml")) for p in groups}


def default_choices(config_dir: Path) -> dict[str, str | None]:
    """{group: option} of config.yaml's defaults list (None: no option unless one is chosen)."""
    defaults = OmegaConf.to_container(OmegaConf.load(config_dir / "config.yaml")).get("defaults", [])
    return {k: v for entry in defaults if isinstance(entry, dict) for k, v in entry.items()}


def option_summary(path: Path) -> str:
    """The first sentence of a YAML's comment lines after its command line ("" when there are none)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith(("@package", "python -m", "torchrun")):
            lines.append(text)
    text = ""
    for line in lines:  # a word hyphenated across two comment lines is joined back: all-\nlinear
        text += line if re.search(r"\w-$", text) else f" {line}"
    text = text.strip()
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return match.group(1) if match else text


def show(value: Any) -> str:
    """A value as it is written on the command line / in YAML."""
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value).replace('"', "'") if value is not None else "null"
    if isinstance(value, str) and (value == "" or value != value.strip()):
        return repr(value)
    return str(value)


def _columns(left: str, text: str, indent: int) -> list[str]:
    """`left` then `text` wrapped into the column at `indent` (on the next line when left is too wide)."""
    wrapped = textwrap.wrap(text, WIDTH - indent, break_on_hyphens=False) or [""]
    if len(left) + 2 > indent:
        return [left] + [" " * indent + line for line in wrapped if line]
    return [(left.ljust(indent) + wrapped[0]).rstrip()] + [" " * indent + line for line in wrapped[1:]]


def help_text(config_dir: Path, cfg: Config | None = None, choices: dict[str, str | None] | None = None) -> str:
    """The harness's help: usage, config groups (options, this command's choice) and every key."""
    choices = choices if choices is not None else default_choices(config_dir)
    lines = [
        "usage: python -m trainer [group=option ...] [key=value ...] [--cfg job] [-m]",
        "       torchrun --nproc_per_node N -m trainer parallel=ddp|fsdp|zero1|zero2|zero3 [...]",
        "",
        *textwrap.wrap(
            "Trains a GPT-style model on the config composed from configs/ and the command line. Every key is "
            "checked before anything runs: a misspelled key or a value that cannot work stops the command with "
            "one line naming it (exit code 2), also under --cfg job, which prints the composed config.",
            WIDTH,
        ),
        "",
        "Config groups (group=option; * marks this command's choice):",
    ]
    for group, options in group_options(config_dir).items():
        chosen = choices.get(group)
        lines.append(f"  {group}" + ("" if chosen else "  (none unless chosen)"))
        for option in options:
            left = f"    {option}{'*' if option == chosen else ''}"
            summary = textwrap.shorten(
                option_summary(config_dir / group / f"{option}.yaml"),
                WIDTH - 24,
                placeholder=" ...",
                break_on_hyphens=False,
            )
            lines += _columns(left, summary, 24)
    lines += ["", "Keys (key=value; each shown with its type and the value this command would run with):"]
    for section in sections(cfg):
        lines += [""] + _columns(section.prefix, section.header, 24)
        width = min(54, 4 + max(len(f"{k.name}  {k.type} = {show(k.value)}") for k in section.keys))
        for key in section.keys:
            lines += _columns(f"  {key.name}  {key.type} = {show(key.value)}", key.description, width)
    return "\n".join(lines) + "\n"


def undescribed(cfg: Config | None = None) -> list[str]:
    """Keys whose schema field has no comment (their help shows type and value only)."""
    return [key.name for section in sections(cfg) for key in section.keys if not key.description]
