"""docker/Dockerfile, checked without a docker engine: what it copies exists and is what the package
needs, it installs the extras the README installs, and it runs the README's command."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, f"unterminated continuation: {current!r}"
    return out


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def args_of(steps: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in steps if kw == keyword]


def copies(steps: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not --from a stage)."""
    out = []
    for args in args_of(steps, "COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in shlex.split(args)), "no multi-stage copies expected"
        out.append((words[:-1], words[-1]))
    return out


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_base_image_is_cuda_pytorch(steps):
    (from_args,) = args_of(steps, "FROM")
    image = from_args.split()[0]
    if image.startswith("${"):  # FROM ${BASE_IMAGE}: the ARG's default
        name = image.strip("${}")
        defaults = dict(a.split("=", 1) for a in args_of(steps, "ARG") if "=" in a)
        image = defaults[name]
    repository, _, tag = image.partition(":")
    assert repository in ("pytorch/pytorch", "nvcr.io/nvidia/pytorch"), image
    assert tag and tag != "latest", f"pin the base image's tag: {image}"
    if repository == "pytorch/pytorch":
        assert re.match(r"\d+\.\d+(\.\d+)?-cuda1\d\.\d+-cudnn\d+-(devel|runtime)$", tag), tag


def test_every_copy_source_exists(steps):
    sources = [src for srcs, _ in copies(steps) for src in srcs]
    assert sources, "the Dockerfile copies nothing"
    missing = [src for src in sources if not (REPO / src).exists()]
    assert not missing, f"COPY sources not in the repository: {missing}"


def test_copies_package_and_configs_side_by_side(steps):
    """trainer/ finds configs/ as its sibling (trainer/__main__.py: CONFIG_DIR = package/../configs)."""
    destinations = {src.rstrip("/"): dest.rstrip("/") for srcs, dest in copies(steps) for src in srcs}
    assert destinations.get("trainer") == "trainer"
    assert destinations.get("configs") == "configs"
    assert {"pyproject.toml", "README.md"} <= destinations.keys()  # pip install -e reads both


def test_every_package_directory_is_copied(steps):
    """Each package (a directory with __init__.py) pyproject's discovery includes is in the image."""
    patterns = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {src.rstrip("/") for srcs, _ in copies(steps) for src in srcs}
    packages = [
        d.name
        for d in REPO.iterdir()
        if d.is_dir() and any(fnmatch.fnmatch(d.name, p) for p in patterns) and (d / "__init__.py").is_file()
    ]
    assert "trainer" in packages
    assert set(packages) <= copied, f"package directories not copied: {set(packages) - copied}"
    # The dependency layer installs placeholders of the same packages before the code is copied.
    (install,) = [r for r in args_of(steps, "RUN") if "pip install -e" in r]
    placeholders = set(re.findall(r"([\w.-]+)/__init__\.py", install))
    assert placeholders == set(packages), f"placeholders {placeholders} != packages {set(packages)}"


def test_dockerignore_keeps_copy_sources(steps):
    ignore = REPO / ".dockerignore"
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ".git" in patterns
    sources = [src.rstrip("/") for srcs, _ in copies(steps) for src in srcs]
    hidden = [src for src in sources for pattern in patterns if fnmatch.fnmatch(src, pattern.rstrip("/"))]
    assert not hidden, f".dockerignore hides COPY sources: {hidden}"


def extras_in(text: str) -> list[set[str]]:
    """The extras of each `pip install -e ".[a,b]"` in text."""
    return [
        {e.strip() for e in extras.split(",")}
        for extras in re.findall(r"""pip install (?:-e|--editable) ["']?\.\[([^\]]*)\]""", text)
    ]


def test_installs_the_readmes_extras(steps):
    runs = " ".join(args_of(steps, "RUN"))
    docker_extras = extras_in(runs)
    readme_extras = extras_in((REPO / "README.md").read_text())
    assert len(docker_extras) == 1, f"expected one editable install of the project, found {docker_extras}"
    assert readme_extras, "the README shows no `pip install -e .[...]`"
    assert docker_extras[0] == readme_extras[0]
    assert docker_extras[0] <= set(pyproject()["project"]["optional-dependencies"])


def test_flash_attn_is_an_off_by_default_build_arg(steps):
    args = dict(a.split("=", 1) for a in args_of(steps, "ARG") if "=" in a)
    assert args.get("FLASH_ATTN") == "0"
    (flash_run,) = [r for r in args_of(steps, "RUN") if "flash-attn" in r]
    assert re.search(r'if \[ "\$\{?FLASH_ATTN\}?" = "1" \]', flash_run), flash_run


def test_default_command_is_the_readmes(steps):
    assert not args_of(steps, "ENTRYPOINT"), "an ENTRYPOINT would prefix `docker run IMAGE torchrun ...`"
    (cmd,) = args_of(steps, "CMD")
    assert json.loads(cmd) == ["python", "-m", "trainer"]  # exec form: signals reach python
    assert "python -m trainer" in (REPO / "README.md").read_text()


def test_instruction_parser():
    text = '# c\nFROM a:b\nRUN x \\\n    # inner\n    && y\nCMD ["p"]\n'
    assert instructions(text) == [("FROM", "a:b"), ("RUN", "x  && y"), ("CMD", '["p"]')]
