"""`python -m trainer --help` describes every key from the schema; `--cfg job` refuses what a run refuses."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trainer.__main__ import CONFIG_DIR, app_help, main, preflight
from trainer.config import Config, ConfigError
from trainer.config.help import schema_comments, undescribed
from trainer.config.schema import __file__ as SCHEMA_FILE


def schema_keys(obj: object = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, dataclass name, field name) of every leaf field, walking nested dataclasses."""
    obj = obj if obj is not None else Config()
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += schema_keys(value, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, type(obj).__name__, f.name))
    return out


def entry(text: str, key: str) -> str:
    """A key's line in the help and its description's continuation lines, whitespace collapsed."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {key}  "))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("    "):  # continuation lines sit in the description column
            break
        block.append(line)
    return " ".join(" ".join(block).split())


@pytest.fixture(scope="module")
def default_help() -> str:
    return app_help([])


def test_every_schema_key_is_listed_with_its_description(default_help: str) -> None:
    descriptions, _ = schema_comments()
    keys = schema_keys()
    assert len(keys) > 100
    for key, cls, name in keys:
        shown = entry(default_help, key)
        description = descriptions[cls].get(name, "")
        assert " ".join(description.split()) in shown, key
    for key in undescribed():  # no comment: the type and the value, nothing else
        assert re.fullmatch(rf"{re.escape(key)} [\w\[\], |]+ = \S.*", entry(default_help, key)), key
        assert "  " not in default_help.split(f"\n  {key}  ")[1].split("\n")[0].split(" = ")[1], key
    # a description spread over comment lines above the field, and one inside a multi-line default
    assert "embedding / head rows: vocab_size rounded up to a multiple of this" in entry(
        default_help, "model.vocab_multiple"
    )
    assert "1: no padding" in entry(default_help, "model.vocab_multiple")
    assert ">0: head + cross-entropy fused over chunks of N tokens" in entry(default_help, "model.loss_chunk_size")


def test_every_trailing_comment_in_the_schema_is_a_description() -> None:
    """Cross-check the tokenizer-based reader with a plain scan of `    name: type = value  # comment` lines."""
    descriptions, docs = schema_comments()
    cls, found = None, 0
    for line in Path(SCHEMA_FILE).read_text().splitlines():
        if match := re.match(r"class (\w+)", line):
            cls = match.group(1)
        elif cls and (match := re.match(r" {4}(\w+): [^#]*#\s*(.+)$", line)):
            assert match.group(2).strip() in descriptions[cls][match.group(1)], line
            found += 1
    assert found > 80
    assert docs["ModelConfig"].startswith("A GPT-style decoder.")


def test_the_comment_reader_on_each_shape() -> None:
    source = '''
@dataclass
class Example:
    """First paragraph,
    on two lines.

    Second paragraph: not in the header."""

    plain: int = 1
    inline: int = 2  # on its line
    # above the field,
    # over two lines
    above: str = "x"  # and its own
    spanning: int | None = (
        None  # inside a default that spans lines
    )
    pragma: int = 3  # noqa: E501

    # a comment after a blank line belongs to no field

    last: bool = True
'''
    fields, docs = schema_comments(source)
    assert fields["Example"] == {
        "inline": "on its line",
        "above": "above the field, over two lines and its own",
        "spanning": "inside a default that spans lines",
    }
    assert docs["Example"] == "First paragraph, on two lines."


def listed_groups(text: str) -> dict[str, list[str]]:
    """{group: [option, ...]} as the help lists them (the chosen option keeps its `*`)."""
    block = text.split("Config groups")[1].split("\nKeys")[0]
    groups: dict[str, list[str]] = {}
    for line in block.splitlines()[1:]:
        if re.match(r"  \S", line):
            groups[line.split()[0]] = []
        elif re.match(r" {4}\S", line):
            groups[list(groups)[-1]].append(line.split()[0])
    return groups


def test_config_groups_list_their_yaml_options(default_help: str) -> None:
    groups = listed_groups(default_help)
    expected = ["model", "data", "optim", "parallel", "precision", "lora", "logger", "objective", "experiment"]
    assert list(groups) == expected
    chosen = {"model": "tiny", "data": "stdlib", "optim": "adamw", "parallel": "none", "precision": "fp32"}
    chosen |= {"lora": "none", "logger": "default", "objective": "sft"}
    for group, options in groups.items():
        shipped = sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))
        assert [option.rstrip("*") for option in options] == shipped, group
        assert [option for option in options if option.endswith("*")] == (
            [f"{chosen[group]}*"] if group in chosen else []
        )
    assert "  experiment  (none unless chosen)" in default_help
    assert "    gpt2                GPT-2 small (124M).\n" in default_help  # the yaml's own words


def test_help_shows_this_commands_values() -> None:
    text = app_help(["model=gpt2", "train.max_steps=7"])
    assert "    gpt2*" in text and "    tiny*" not in text
    assert entry(text, "model.name").startswith("model.name str = gpt2")
    assert entry(text, "model.vocab_size").startswith("model.vocab_size int | None = 50257")
    assert entry(text, "train.max_steps").startswith("train.max_steps int = 7 optimizer steps of the run")


def test_cli_help_comes_before_hydras_and_exits_0(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: python -m trainer")
    assert out.index("Config groups") < out.index("  model.n_layer  int = 4") < out.index("Hydra's flags")
    assert out.index("Hydra's flags") < out.index("--hydra-help : Hydra's help")
    assert "powered by Hydra" not in out  # Hydra's banner and config dump give way to ours
    assert entry(out, "train.max_steps").startswith("train.max_steps int = 600 optimizer")  # config.yaml's value
    assert not list(tmp_path.iterdir())  # no run dir


def run_main(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["trainer", *argv])
    code = 0
    try:
        main()
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.n_layr=2", "error: unknown config key 'model.n_layr'"),
        ("train.max_steps=-1", "error: train.max_steps must be >= 0, got -1"),
        ("lora.r=8", "error: lora.r is set but LoRA is off"),  # a cross-section rule (check_run)
    ],
)
def test_cfg_job_refuses_what_a_run_refuses(
    override: str,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    run = run_main([override], monkeypatch, capsys)  # a real run, refused before Hydra starts
    shown = run_main(["--cfg", "job", override], monkeypatch, capsys)
    assert run[0] == shown[0] == 2
    assert shown[1] == ""  # nothing printed as if it would run
    assert shown[2] == run[2] and shown[2].startswith(expected) and shown[2].count("\n") == 1
    with pytest.raises(ConfigError):
        preflight(["--info", "config", override])
    assert not list(tmp_path.iterdir())


def test_cli_cfg_job_with_a_misspelled_key_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--cfg", "job", "model.n_layr=2"],
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: unknown config key 'model.n_layr': check its spelling (`python -m trainer --cfg job` prints every key)"
    ]


def test_cfg_job_prints_the_composed_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["--cfg", "job", "model=gpt2", "model.n_layer=2"], monkeypatch, capsys)
    assert code == 0, err
    printed = OmegaConf.create(out)
    assert printed.model.name == "gpt2" and printed.model.n_layer == 2 and printed.model.vocab_size == 50257
    assert printed.train.max_steps == 600 and "hydra" not in printed
    assert not list(tmp_path.iterdir())  # --cfg runs nothing


def test_cfg_job_leaves_an_existing_run_dir_alone(tmp_path: Path) -> None:
    """Printing a config claims no run dir: --cfg job on a directory that holds a run is not refused."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    argv = ["--cfg", "job", f"hydra.run.dir={tmp_path}"]
    assert preflight(argv) == argv
    with pytest.raises(ConfigError, match="already holds a run"):
        preflight([f"hydra.run.dir={tmp_path}"])


def test_flags_hydra_answers_itself_pass_through() -> None:
    for argv in (["--hydra-help"], ["--version"], ["--no-such-flag"], ["-cn", "other", "x.y=1"]):
        assert preflight(argv) == argv
