"""Shared fixtures. Plain helpers, which the torchrun worker scripts import too (pytest does not
run those), live in tests/helpers.py; pytest puts tests/ on sys.path, so tests import them as
`from helpers import ...`."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from helpers import HF_CONTEXT, QUICK, build_finetune_dir, hf_gpt2, hf_llama


@pytest.fixture
def quick(tmp_path: Path) -> list[str]:
    """Overrides for a synthetic run that takes seconds on 2 CPU cores, its token cache in tmp_path."""
    return [*QUICK, f"data.cache_dir={tmp_path / 'cache'}"]


@pytest.fixture(scope="session", autouse=True)
def trainer_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """The per-user cache (the CPU's measured MFU peak) in a temp dir for the whole session, never
    the real ~/.cache/trainer; subprocesses (run_cli, torchrun) inherit it through the environment."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("trainer_cache")
        patch.setenv("TRAINER_CACHE_DIR", str(path))
        yield path


LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def launch_environment():
    """Each test sees the launch variables as the session started: a run in this process under
    ddp / fsdp / zero sets RANK, LOCAL_RANK and WORLD_SIZE as torchrun would (DeepSpeed reads them),
    and a later test would otherwise look launched (accelerate, behind transformers' TrainingArguments,
    then starts a process group and wants MASTER_ADDR)."""
    before = {name: os.environ.get(name) for name in LAUNCH_ENV}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny random GPT-2 and Llama (GQA) checkpoints in Hugging Face's layout, built here (no hub)."""
    models = {
        "gpt2": hf_gpt2(vocab_size=96, n_positions=HF_CONTEXT, n_embd=32, n_head=2),
        "llama": hf_llama(vocab_size=96, hidden_size=32, intermediate_size=48, max_position_embeddings=HF_CONTEXT),
    }
    root = tmp_path_factory.mktemp("hf_checkpoints")
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: str(root / name) for name in models}


@pytest.fixture(scope="session")
def finetune_dir(tmp_path_factory: pytest.TempPathFactory):
    """Tiny random GPT-2, Llama and Qwen2 checkpoints with their own tokenizers, and instruct / chat
    records (helpers.build_finetune_dir)."""
    return build_finetune_dir(tmp_path_factory.mktemp("finetune"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """DeepSpeed is an optional extra: without it, its cases (marked `deepspeed`, or parametrized
    with a zero1-3 strategy) are skipped with the install line, not failed."""
    if importlib.util.find_spec("deepspeed") is not None:
        return
    skip = pytest.mark.skip(reason='needs DeepSpeed: pip install -e ".[deepspeed]"')
    for item in items:
        params = item.callspec.params.values() if hasattr(item, "callspec") else ()
        if item.get_closest_marker("deepspeed") or any(str(v).startswith("zero") for v in params):
            item.add_marker(skip)
