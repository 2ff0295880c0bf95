"""`adamkit bench` end to end on a tiny model: it runs, and what it writes is consistent (timings are not tested)."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
from adamkit import bench, kernels  # noqa: E402


def test_bench_writes_a_consistent_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--params", "3e5", "--steps", "2", "--only", "Adam,NAdam", "--state-precision", "bf16,int8",
                       "--bf16-params", "--no-libraries", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {r["config"]: r for suite in results["suites"].values() for r in suite["rows"]}
    assert {"Adam", "NAdam"} <= set(rows)
    adam = rows["Adam"]
    torch_paths = {k: v for k, v in adam["ms"].items() if k.startswith("torch")}
    assert adam["bytes_per_param"] == 28 and adam["torch_best_path"] == min(torch_paths, key=torch_paths.get)
    assert adam["floor_ms"] > 0 and adam["speedup_vs_torch_best"] == pytest.approx(
        adam["torch_best_ms"] / adam["ms"]["adamkit"])
    assert set(adam["ms"]) == {"adamkit", "adamkit (check_finite)", "torch single", "torch foreach", "torch fused"}
    assert "torch fused" not in rows["NAdam"]["ms"]  # torch has no fused NAdam
    sp = {r["optimizer"]: r for r in results["state_precision"]["rows"]}
    assert set(sp) == {"torch fused fp32", "adamkit fp32", "adamkit bf16", "adamkit int8",
                       "adamkit int8, check_finite=True", "torch fused, bf16 params", "adamkit bf16 params",
                       "adamkit bf16 params, stochastic rounding"}
    assert sp["adamkit bf16 params, stochastic rounding"]["floor"] == "bf16 params"
    assert sp["adamkit bf16 params"]["params"] == "bfloat16" and sp["adamkit bf16"]["params"] == "float32"
    assert sp["torch fused fp32"]["state_bytes_per_param"] == pytest.approx(8.0)
    # on this tiny model the biases and norms (< 4,096 elements) keep fp32 states: a little over 2 and 4 B/param
    assert 2.0 < sp["adamkit int8"]["state_bytes_per_param"] <= 2.2
    assert 4.0 <= sp["adamkit bf16"]["state_bytes_per_param"] <= 4.1
    # each row is set against the memory floor of its own storage, measured in the same run
    floors = results["state_precision"]["floors_ms"]
    assert set(floors) == {"fp32", "bf16", "int8", "bf16 params"} and all(v > 0 for v in floors.values())
    assert [sp[k]["floor"] for k in ("adamkit fp32", "adamkit bf16", "adamkit int8")] == ["fp32", "bf16", "int8"]
    assert sp["adamkit int8"]["pct_of_floor"] == pytest.approx(100 * floors["int8"] / sp["adamkit int8"]["ms"])
    printed = capsys.readouterr().out
    assert "| AdamW | ms/step | state B/param | × vs torch fused fp32 | % of its floor |" in printed
    # the ISA both sides ran is printed and kept, as the kernels were compiled for it
    isa = results["machine"]["isa"]
    assert isa == bench.compiled_isa() and isa["adamkit"] in ("AVX-512", "AVX2", "AVX", "SSE2", "scalar")
    assert f"adamkit kernels compiled for {isa['adamkit']}" in printed
    assert "stochastic rounding runs at" in printed


def test_compiled_isa_follows_numba_target_features(monkeypatch):
    """The ISA comes from numba's target features (a CPU name alone keeps the host's), so a table never says AVX2
    for AVX-512 code."""
    import numba
    monkeypatch.setattr(numba.config, "CPU_FEATURES", bench.AVX2_ENVIRONMENT["NUMBA_CPU_FEATURES"])
    assert bench.compiled_isa()["adamkit"] == "AVX2"
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx,+avx2,+avx512f,+fma")
    assert bench.compiled_isa()["adamkit"] == "AVX-512"
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+sse2,-avx2")
    assert bench.compiled_isa()["adamkit"] == "SSE2"


def test_low_precision_loops_are_widened_on_256_bit_targets_only(monkeypatch):
    """Loops that store narrowed values are vectorized for bandwidth on AVX2 targets only (on AVX-512 it made the
    int8 kernel slower), never for float64 math or plain float32 storage; the bench says so."""
    import numba
    monkeypatch.setattr(numba.config, "CPU_FEATURES", bench.AVX2_ENVIRONMENT["NUMBA_CPU_FEATURES"])
    assert kernels.widens_loops("float32", ("int8", "int8"))
    assert kernels.widens_loops("float32", ("bf16", "plain")) and kernels.widens_loops("bfloat16", ("plain",))
    assert not kernels.widens_loops("float32", ("plain", "plain"))
    assert not kernels.widens_loops("float64", ("bf16",))
    assert bench.compiled_isa()["low_precision_loops"] == "widened"
    assert bench._loops(bench.compiled_isa()) == ", low-precision loops widened, 8-bit blocks as explicit vectors"
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx,+avx2,+avx512f,+fma")
    assert not kernels.widens_loops("float32", ("int8",)) and bench._loops(bench.compiled_isa()) == ""
    assert bench.compiled_isa()["int8_blocks"] == "compiled loops"


def test_floor_step_touches_every_stream_once_per_call():
    """The floor loop reads and writes each of its streams: float32 ones scaled and added to, narrow ones counted."""
    step = bench.floor_step([(3000,), (70,)], 1, 2, np.uint16)
    for _ in range(3):
        step()
    g, theta, m, v = step.keep_alive[0]
    assert np.all(g == 1)
    expected = 1.0
    for _ in range(3):
        expected = np.float32(np.float32(expected) * np.float32(0.999) + np.float32(1))
    assert np.all(theta == expected)
    assert m.dtype == np.uint16 and np.all(m == 3) and np.all(v == 3)
    g2, theta2, m2, v2 = step.keep_alive[1]  # a second tensor, smaller than a chunk, is covered too
    assert np.all(theta2 == expected) and np.all(m2 == 3) and np.all(v2 == 3)
    narrow = bench.floor_step([(3000,)], 0, 3, np.uint16)  # bf16 params: the gradient is 16-bit too
    for _ in range(2):
        narrow()
    g, theta, m, v = narrow.keep_alive[0]
    assert g.dtype == np.uint16 and np.all(g == 1) and np.all(theta == 2) and np.all(m == 2) and np.all(v == 2)


@pytest.mark.parametrize("value, message", [
    ("only", "name the precisions to compare too"),
    ("int4", "unknown precision(s) int4"),
    ("bf16,fp8,only", "unknown precision(s) fp8"),
])
def test_state_precision_option_rejects_what_would_silently_do_nothing_or_fail_late(value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--params", "3e5", "--state-precision", value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_distributed_bench_times_adamkit_torch_and_the_shard_floor(tmp_path):
    from adamkit import bench
    out = tmp_path / "d.json"
    assert bench.main(["--distributed", "--params", "3e5", "--steps", "2", "--only", "Adam", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and 0 < r["params_per_rank"] < r["params"]
    row = next(row for row in r["rows"] if row["config"] == "Adam")
    assert {"adamkit", "torch single", "torch foreach"} <= set(row["ms"])
    assert row["speedup_vs_torch_best"] == row["ms"][row["torch_best_path"]] / row["ms"]["adamkit"]


def test_compiled_bench_times_both_compiled_training_steps(tmp_path, capsys):
    """``--compiled``: adamkit's and torch.optim's training steps under torch.compile, both timed, the ratio in
    the table computed from them."""
    from adamkit import bench
    out = tmp_path / "c.json"
    assert bench.main(["--compiled", "--steps", "2", "--only", "AdamW", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["configs"]) == {"AdamW"} and r["params"] == 4 * (1024 * 1024 + 1024)
    t = r["configs"]["AdamW"]
    assert set(t) == {"adamkit", "torch.optim"} and all(v > 0 for v in t.values())
    assert f"| AdamW | {t['adamkit']:.2f} | {t['torch.optim']:.2f} | {t['torch.optim'] / t['adamkit']:.2f}× |" \
        in capsys.readouterr().out
