"""`adamkit bench` end to end on a tiny model: it runs, and what it writes is consistent (timings are not tested)."""

import json

import pytest

pytest.importorskip("torch")
from adamkit import bench  # noqa: E402


def test_bench_writes_a_consistent_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--params", "3e5", "--steps", "2", "--only", "Adam,NAdam", "--state-precision", "bf16,int8",
                       "--no-libraries", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {r["config"]: r for suite in results["suites"].values() for r in suite["rows"]}
    assert {"Adam", "NAdam"} <= set(rows)
    adam = rows["Adam"]
    assert adam["bytes_per_param"] == 28 and adam["torch_best_path"] == "torch fused"
    assert adam["floor_ms"] > 0 and adam["speedup_vs_torch_best"] == pytest.approx(
        adam["torch_best_ms"] / adam["ms"]["adamkit"])
    assert set(adam["ms"]) == {"adamkit", "adamkit (check_finite)", "torch single", "torch foreach", "torch fused"}
    assert "torch fused" not in rows["NAdam"]["ms"]  # torch has no fused NAdam
    sp = {r["optimizer"]: r for r in results["state_precision"]["rows"]}
    assert set(sp) == {"torch fused fp32", "adamkit fp32", "adamkit bf16", "adamkit int8",
                       "adamkit int8, check_finite=True"}
    assert sp["torch fused fp32"]["state_bytes_per_param"] == pytest.approx(8.0)
    # on this tiny model the biases and norms (< 4,096 elements) keep fp32 states: a little over 2 and 4 B/param
    assert 2.0 < sp["adamkit int8"]["state_bytes_per_param"] <= 2.2
    assert 4.0 <= sp["adamkit bf16"]["state_bytes_per_param"] <= 4.1
    printed = capsys.readouterr().out
    assert "| AdamW | ms/step | state B/param | × vs torch fused fp32 |" in printed
