"""tools/bench_samplers.py: one small run writes its tables, standard JSON and a figure per problem."""

from __future__ import annotations

import json

import bench_samplers


def test_a_small_run_writes_tables_json_and_figures(tmp_path):
    bench_samplers.main(["--problems", "mixture16", "gmm", "--n", "200", "--nfes", "1,4", "--out", str(tmp_path)])
    raw = json.loads((tmp_path / "bench_samplers.json").read_text())
    assert [p["name"] for p in raw["problems"]] == ["mixture16", "gmm"]
    rows = {(r["problem"], r["solver"], r["nfe_budget"]): r for p in raw["problems"] for r in p["rows"]}
    assert rows[("mixture16", "seeds2(weights=phi1)", 4)]["nfe"] == 3  # one 2-stage step and the final one
    assert all(r["nfe"] <= r["nfe_budget"] for r in rows.values()) and "mode_tv" in rows[("gmm", "euler", 4)]
    text = (tmp_path / "bench_samplers.md").read_text()
    assert "## mixture16:" in text and "| solver | 1 | 4 |" in text and "*noise floor*" in text
    assert all((tmp_path / "images" / f"bench_samplers_{name}.png").stat().st_size > 0 for name in ("mixture16", "gmm"))
