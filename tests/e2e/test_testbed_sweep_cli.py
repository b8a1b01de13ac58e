"""``vlmfix sweep`` end to end on the shipped testbed, CPU, a tiny grid."""

from __future__ import annotations

import json

import pytest

from vlmfix.cli import main

pytestmark = pytest.mark.slow


def test_sweep_writes_frontier_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main([
        "sweep", "--method", "pai", "--grid", "alpha=3", "--model", "testbed:caption_noise", "--n", "4",
        "--max-new-tokens", "10", "--out", str(out), "--bootstrap-resamples", "50", "--device", "cpu",
        "--dtype", "float32",
    ])  # fmt: skip
    assert rc == 0
    rec = json.loads((out / "sweep.json").read_text())
    assert [r["kind"] for r in rec["rows"]] == ["baseline", "default", "grid"]
    assert rec["rows"][2]["overrides"] == {"alpha": 3}
    assert rec["rows"][1]["methods"][0]["alpha"] == rec["paper_default"]["alpha"]
    assert rec["rows"][0]["methods"] == []
    for r in rec["rows"]:
        for key in ("chair_i", "recall", "pope_adv_f1"):
            lo, hi = r["ci"][key]
            assert lo - 1e-9 <= r[key] <= hi + 1e-9, (key, r)
    assert any(r["pareto"] for r in rec["rows"])
    # caption_noise names absent partners on the adversarial split: something to reduce
    assert rec["rows"][0]["chair_i"] > 0.1
    md = (out / "sweep.md").read_text()
    assert "default *" in md and md.count("\n| ") == 4
    assert (out / "sweep.png").stat().st_size > 10_000
    assert (out / "points" / "02" / "chair" / "samples.jsonl").is_file()
    assert "wrote" in capsys.readouterr().out


def test_sweep_needs_data_for_non_testbed_models(tmp_path):
    from vlmfix.errors import ConfigError
    from vlmfix.testbed.sweep import run_sweep

    with pytest.raises(ConfigError, match="--instances"):
        run_sweep("some/model", "pai", [], tmp_path, n=2)
    with pytest.raises(ConfigError, match="both"):
        run_sweep("testbed", "pai", [], tmp_path, n=2, images=tmp_path)
