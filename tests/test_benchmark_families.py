"""benchmarks.families_gpu on tiny CPU shapes (--smoke): its rows and JSON, and the fast paths it
compares equal to the references here (on a GPU it measures flex / FA / grouped matmul)."""

from __future__ import annotations

import json

from benchmarks.families_gpu import main


def test_smoke_writes_its_rows(tmp_path, capsys):
    out = tmp_path / "families.json"
    main(["--smoke", "--out", str(out)])
    record = json.loads(out.read_text())
    rows = {r["row"]: r for r in record["rows"]}
    assert set(rows) == {"attention window", "attention softcap", "moe grouped"}
    for name in ("attention window", "attention softcap"):
        assert rows[name]["out_rel"] < 1e-5 and rows[name]["dq_rel"] < 1e-5
    assert rows["moe grouped"]["loop_ms"] > 0 and rows["moe grouped"]["grouped_ms"] is None  # no grouped mm on a CPU
    assert "attention window" in capsys.readouterr().out
