"""Every feature under every strategy (tests/matrix.py declares the table): each cell equals one
process, or is refused in one line.

A cell that runs is compared with the one-process reference of its row: the loss (and the
validation loss) at every logged step, the global and every per-layer grad_norm / param_norm /
update_ratio, the spike and skip counts, the final trainable weights (consolidated weights, or the
PEFT adapter), every tensor of the `trainer.export` output, and a resume from the mid-run
checkpoint, which must reproduce the uninterrupted run's later steps and final weights bit for bit.

The default suite runs the covering subset (every feature once, every strategy at least once);
`pytest -m matrix` runs the whole sweep. Each cell's outcome and largest gaps go to
<pytest's base temp>/matrix.jsonl, which `python tests/matrix.py TABLE_JSONL` turns into the README's table.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import env, read_metrics
from matrix import BY_NAME, MID, cells, covering, overrides
from matrix_worker import machine_overrides
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
COVERING = covering()
SWEEP = [cell for cell in cells() if cell not in COVERING]
COMPARED = ("loss", "val_loss", "grad_norm", "grad_norm/", "param_norm/", "update_ratio/", "eval/")
TIMES = ("eval/time_s",)  # wall-clock: present in both, never compared
EXACT = ("step", "skipped_steps", "spike/count", "tokens", "target_tokens")
PRESENT = ("noise_scale/", "sharpness/")  # estimators whose small batch differs by strategy: only present


class Runs:
    """Launches one worker per column, lazily, for the cells this session selected."""

    def __init__(self, session: pytest.Session, root: Path, finetune: Path) -> None:
        self.root, self.finetune, self.done = root, finetune, set()
        self.wanted: dict[str, list[str]] = {}
        for item in session.items:
            params = getattr(item, "callspec", None) and item.callspec.params
            if params and "feature" in params and item.module.__name__ == __name__:
                feature, strategy = params["feature"], params["strategy"]
                if strategy in BY_NAME[feature].runs:
                    self.wanted.setdefault(strategy, []).append(feature)
                    self.wanted.setdefault("reference", []).append(feature)

    def column(self, column: str) -> Path:
        if column not in self.done:
            self.done.add(column)
            features = list(dict.fromkeys(self.wanted[column]))
            launcher = [sys.executable] if column in ("reference", "none") else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]  # fmt: skip
            command = [*launcher, str(REPO / "tests" / "matrix_worker.py"), str(self.root), str(self.finetune),
                       column, *features]  # fmt: skip
            done = subprocess.run(command, cwd=self.root, env=env(), capture_output=True, text=True, timeout=1800)
            (self.root / f"{column}.log").write_text(done.stdout + done.stderr)
            assert done.returncode == 0, done.stderr[-4000:]
        return self.root / column


@pytest.fixture(scope="session")
def runs(request: pytest.FixtureRequest, finetune_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(request.session, tmp_path_factory.mktemp("matrix"), finetune_dir)


def gap(got: float, want: float) -> float:
    """Relative difference (an exact zero on both sides is no gap)."""
    return abs(got - want) / max(abs(want), 1e-12) if got != want else 0.0


def tensor_gaps(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor: |got - want| / |want| (norms, in fp32), the same names on both sides."""
    assert sorted(got) == sorted(want)
    out = {}
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and got[name].numel() > 0, name
        diff = (got[name].float() - tensor.float()).norm()
        out[name] = 0.0 if diff == 0 else (diff / tensor.float().norm().clamp(min=1e-12)).item()
    return out


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "checkpoints" / "final"
    path = final / "adapter" / "adapter_model.safetensors"
    return load_file(str(path if path.exists() else final / "model.safetensors"))


def export_weights(run_export: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(run_export.glob("*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in load_file(str(path)).items()})
    assert tensors, f"nothing exported to {run_export}"
    return tensors


def model_line(run: Path) -> str:
    """The start line's model size: 'model: NAME 0.12M params (0.10M without embeddings)'."""
    found = re.search(
        r"model: \S+ [\d.]+M params \([\d.]+M without embeddings\)", (run / "logs" / "rank0.log").read_text()
    )
    assert found, f"no model line in {run}/logs/rank0.log"
    return found.group(0)


def metric_gaps(got_rows: list[dict], want_rows: list[dict]) -> dict[str, float]:
    """The largest relative gap of each compared metric over the steps; exact ones must be equal."""
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows]
    worst: dict[str, float] = {}
    for got, want in zip(got_rows, want_rows, strict=True):
        keys = lambda row: {k for k in row if k.startswith(COMPARED) and k not in TIMES}  # noqa: E731
        assert keys(got) == keys(want), sorted(keys(got) ^ keys(want))
        for key in keys(want):
            worst[key] = max(worst.get(key, 0.0), gap(got[key], want[key]))
        for key in EXACT:
            assert got.get(key) == want.get(key), (got["step"], key, got.get(key), want.get(key))
        for prefix in PRESENT:
            assert {k for k in got if k.startswith(prefix)} == {k for k in want if k.startswith(prefix)}, prefix
    return worst


def check_cell(feature: str, strategy: str, runs: Runs, finetune: Path, tmp_path: Path) -> dict:
    row = BY_NAME[feature]
    if strategy in row.refused:
        return check_refusal(feature, strategy, row.refused[strategy], finetune, tmp_path)
    got, want = runs.column(strategy) / feature, runs.column("reference") / feature
    for where in (got, want):
        errors = sorted(where.glob("error.rank*.txt"))
        assert not errors, f"{where}: {errors[0].read_text()[-3000:]}"
        assert (where / "done").exists(), f"{where}: the worker did not finish this cell"
    assert model_line(got / "full") == model_line(want / "full")  # the parameter counts (zero3's are partitioned)
    if row.spikes:
        assert any(r["spike/count"] for r in read_metrics(want / "full")), "the reference flagged no spike"
    if any(o.startswith("eval.tasks=") for o in row.overrides):  # the eval rows exist (and are compared below)
        evaluated = {r["step"]: r for r in read_metrics(want / "full") if "eval/time_s" in r}
        assert sorted(evaluated) == [MID, MID * 2], sorted(evaluated)
        for r in evaluated.values():
            assert {"eval/tiny_mc/acc", "eval/tiny_gen/exact_match_strip", "eval/tiny_rolling/word_perplexity",
                    "eval/ppl/chat"} <= set(r), sorted(r)  # fmt: skip
    gaps = metric_gaps(read_metrics(got / "full"), read_metrics(want / "full"))
    gaps |= {
        f"weights:{k}": v for k, v in tensor_gaps(final_weights(got / "full"), final_weights(want / "full")).items()
    }
    gaps |= {
        f"export:{k}": v
        for k, v in tensor_gaps(export_weights(got / "export"), export_weights(want / "export")).items()
    }
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] <= row.tolerance, (
        f"{feature} x {strategy}: {worst} differs by {gaps[worst]:.2e} > {row.tolerance}"
    )
    # the resume from the mid-run checkpoint: the same later steps and weights, bit for bit
    full, resumed = read_metrics(got / "full"), read_metrics(got / "resumed")
    later = [r for r in full if r["step"] > MID]
    assert [r["step"] for r in resumed] == [r["step"] for r in later]
    for a, b in zip(resumed, later, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a["step"], a["loss"], b["loss"])
    assert max(tensor_gaps(final_weights(got / "resumed"), final_weights(got / "full")).values()) == 0.0
    if row.generate:
        assert (got / "generate.txt").read_text().strip(), "trainer.generate printed nothing"
    return {"outcome": "equal", "worst": worst, "gap": gaps[worst], "tolerance": row.tolerance}


def check_refusal(feature: str, strategy: str, pattern: str, finetune: Path, tmp_path: Path) -> dict:
    """Refused before anything is built: the preflight's one line."""
    from trainer.config import ConfigError
    from trainer.config.load import compose_config
    from trainer.preflight import check_run

    cfg, _ = compose_config([*overrides(feature, strategy), *machine_overrides(finetune, feature, tmp_path)])
    with pytest.raises(ConfigError) as refused:
        check_run(cfg, world_size=1 if strategy == "none" else 2)
    message = str(refused.value)
    assert "\n" not in message and re.search(pattern, message), message
    return {"outcome": "refused", "message": message}


def record(tmp_path_factory: pytest.TempPathFactory, feature: str, strategy: str, result: dict) -> None:
    with open(tmp_path_factory.getbasetemp() / "matrix.jsonl", "a") as out:
        out.write(json.dumps({"feature": feature, "strategy": strategy, **result}) + "\n")


@pytest.mark.heavy
@pytest.mark.parametrize("feature,strategy", COVERING)
def test_cell(feature: str, strategy: str, runs: Runs, finetune_dir: Path, tmp_path: Path, tmp_path_factory) -> None:
    record(tmp_path_factory, feature, strategy, check_cell(feature, strategy, runs, finetune_dir, tmp_path))


@pytest.mark.matrix
@pytest.mark.parametrize("feature,strategy", SWEEP)
def test_sweep_cell(
    feature: str, strategy: str, runs: Runs, finetune_dir: Path, tmp_path: Path, tmp_path_factory
) -> None:
    record(tmp_path_factory, feature, strategy, check_cell(feature, strategy, runs, finetune_dir, tmp_path))


def test_the_covering_subset_has_every_feature_and_every_strategy() -> None:
    assert sorted({f for f, _ in COVERING}) == sorted(BY_NAME)
    assert sorted({s for _, s in COVERING}) == sorted({s for _, s in cells()})
    assert all(s in BY_NAME[f].runs for f, s in COVERING)  # each feature once where it runs
    assert len(COVERING) + len(SWEEP) == len(cells()) == len(set(cells()))
