"""Benchmarks: scripts run as `python -m benchmarks.<name>` that print a table and write JSON.

They measure; they are not tests (no assertions on speed). See benchmarks/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(path: Path | str, record: Any, note: str = "") -> None:
    """A benchmark's JSON record at path (its folder made if missing), then `wrote PATH NOTE`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {path}{f' {note}' if note else ''}")
