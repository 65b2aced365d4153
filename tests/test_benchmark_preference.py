"""benchmarks/preference.py: the reward function by hand, the byte-level tokenizer against the byte
ids, and the --quick mode end to end in a subprocess (structure and finite figures; no learning or
timings asserted: a few steps learn nothing)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import env

from benchmarks.preference import EVAL, case_share, save_byte_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_case_share_counts_the_letters_in_the_asked_case() -> None:
    completions = [" ABC", " abc", " AbCd", " 12 !", "", " aBC"]
    case = ["upper", "upper", "lower", "lower", "upper", "lower"]
    assert case_share([""] * 6, completions, [[]] * 6, case=case) == [1.0, 0.0, 0.5, 0.0, 0.0, pytest.approx(1 / 3)]


def test_the_byte_level_tokenizer_has_the_byte_tokenizers_ids(tmp_path: Path) -> None:
    from trainer.data.tokenizer import ByteTokenizer, load_pretrained_tokenizer

    save_byte_tokenizer(tmp_path)
    hf, byte = load_pretrained_tokenizer(str(tmp_path)), ByteTokenizer()
    text = "lower kqmz > KQMZ\n\tévé"
    assert hf.encode(text) == byte.encode(text) == list(text.encode())
    assert hf.eot_id == byte.eot_id == 256
    assert hf.decode(list(text.encode())) == text


def finite(value: object, where: str) -> None:
    """Every number under value is finite (None allowed only where the JSON means 'not reached')."""
    if isinstance(value, dict):
        for key, item in value.items():
            finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            finite(item, f"{where}[{index}]")
    elif isinstance(value, float):
        assert math.isfinite(value), where
    elif value is None:
        assert where.endswith("_0.9_at_step"), where


@pytest.mark.slow  # 12-16 s: the benchmark itself runs in the second tier
def test_quick_mode_writes_finite_curves_summaries_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "preference.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.preference", "--quick", "--out", str(out)],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DPO held-out accuracy" in done.stdout and "GRPO mean reward" in done.stdout
    record = json.loads(out.read_text())
    dpo, grpo = record["dpo"], record["grpo"]
    assert record["quick"] and dpo["steps"] == grpo["steps"] == EVAL

    assert [t["step"] for t in dpo["train"]] == list(range(1, EVAL + 1))
    assert dpo["train"][0]["accuracy"] == 0.0 and dpo["train"][0]["margin"] == 0.0  # zero adapters: all ties
    assert [h["step"] for h in dpo["held_out"]] == [EVAL]
    assert set(dpo["held_out"][0]) == {"step", "loss", "accuracy", "margin"}
    assert 0.0 <= dpo["summary"]["held_out_accuracy_end"] <= 1.0

    assert [s["step"] for s in grpo["train"]] == list(range(1, EVAL + 1))
    for s in grpo["train"]:
        assert 0.0 <= s["reward"] <= 1.0 and 0.0 < s["generation_s"] < s["step_s"]
        assert s["generation_s"] + s["rollout_rest_s"] + s["train_s"] + s["other_s"] == pytest.approx(s["step_s"])
    assert [h["step"] for h in grpo["held_out"]] == [EVAL]
    assert 0.0 < grpo["summary"]["generation_share_median"] < 1.0
    assert "objective.rewards=[benchmarks.preference:case_share]" in grpo["overrides"]

    finite({k: record[k] for k in ("base", "dpo", "grpo")}, "record")
    for plot in record["plots"]:
        assert Path(plot).read_bytes().startswith(b"\x89PNG")
