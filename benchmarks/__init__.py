"""Benchmarks: scripts run as `python -m benchmarks.<name>` that print a table and write JSON.

They measure; they are not tests (no assertions on speed). See benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def write_report(path: Path | str, record: Any, note: str = "") -> None:
    """A benchmark's JSON record at path (its folder made if missing), then `wrote PATH NOTE`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {path}{f' {note}' if note else ''}")


def run_trainer(overrides: list[str], run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`python -m trainer OVERRIDES` (its run dir: run_dir) in a subprocess, wandb offline: ({"wall_s"}, or
    with "error" (its last stderr line), "stderr_tail" and "steps" when it failed or logged nothing; the
    rows of its metrics.jsonl). Its stderr is kept in run_dir/stderr.log."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "trainer", *overrides], capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline"})  # fmt: skip
    record: dict[str, Any] = {"wall_s": time.perf_counter() - started}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "stderr.log").write_text(done.stderr)
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if done.returncode != 0 or not rows:
        tail = done.stderr.strip().splitlines()[-20:] or ["?"]
        record |= {"error": tail[-1], "stderr_tail": tail, "steps": len(rows)}
    return record, rows
