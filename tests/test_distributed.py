"""FSDP2 on 2 CPU processes (gloo): every class steps DTensor shards through the compiled kernels, matches
torch.optim, and resumes from a DCP checkpoint. The two ranks run in a child process with a time limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    directory = tmp_path_factory.mktemp("fsdp")
    out = directory / "results.json"
    _child(str(out), str(directory))
    results = json.loads(out.read_text())
    # the int8 checkpoint saved by 2 ranks, loaded by 1 (which saves again), loaded by 2
    _child("--reshard", "1", str(directory / "ckpt-int8"), str(directory / "ckpt-1"), str(directory / "to1.json"))
    _child("--reshard", "2", str(directory / "ckpt-1"), "", str(directory / "to2.json"))
    results["reshard"] = [json.loads((directory / f).read_text()) for f in ("to1.json", "to2.json")]
    return results


def _child(*args: str) -> None:
    proc = subprocess.run([sys.executable, str(HERE / "fsdp_cases.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=HERE)
    assert proc.returncode == 0, f"the FSDP2 ranks failed (return code {proc.returncode}): {proc.stderr[-3000:]}"


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-6), ("float64", 1e-12)])
def test_fsdp2_every_class_matches_torch_on_the_compiled_path(results, dtype, tolerance):
    for name, r in results[dtype].items():
        assert r["compiled_tensors"] == 4 and r["reference_tensors"] == 0, (name, r)
        # The kernels' rounding differs from torch's by an ulp in some elements at each step, and 20 training
        # steps amplify that: torch.optim with a quarter of its elements moved by one ulp once drifts from itself
        # by ``torch_one_ulp`` (centered RMSprop: 1.3e-5, above the target; adamkit's difference measured 0 to
        # 0.97 times it in float32, 0 to 1.5 times in float64). A formula difference exceeds it by far.
        limit = max(tolerance, 1.5 * r.get("torch_one_ulp", 0.0))
        assert r["difference"] <= limit, (name, r)


def test_fsdp2_dcp_resume_is_bit_for_bit_with_fp32_states(results):
    assert results["dcp_fp32"]["bit_for_bit"], results["dcp_fp32"]


def test_fsdp2_dcp_resume_is_bit_for_bit_with_bf16_states(results):
    # the stochastic-rounding stream (its key and draw count) is part of the checkpoint
    assert results["dcp_bf16"]["bit_for_bit"], results["dcp_bf16"]


def test_fsdp2_dcp_resume_is_bit_for_bit_with_int8_states(results):
    assert results["dcp_int8"]["bit_for_bit"], results["dcp_int8"]


def test_fsdp2_int8_states_take_about_2_bytes_per_parameter_and_train_like_fp32(results):
    r = results["int8"]
    assert r["bytes_per_param"] <= 2.1, r  # 2 codes of 1 byte + 2 float32 scales per 256 elements = 2.03
    assert abs(r["losses"]["int8"] - r["losses"]["None"]) <= 0.02 * r["losses"]["None"], r


def test_fsdp2_int8_states_read_as_their_values_on_every_rank(results):
    reads = results["int8"]["reads"]
    # the norm of 2 ranks' shards (square roots of partial sums) against one tensor's: float32 round-off
    assert reads["quantized"] and reads["values"] and reads["ema"] and reads["norm"] <= 1e-6, reads


def test_fsdp2_check_finite_decides_the_same_on_every_rank(results):
    assert results["nonfinite"] == {"refused_on_every_rank": True, "unchanged": True}


def test_fsdp2_mixed_precision_policy_and_gradient_clipping_match_torch(results):
    assert results["mixed_precision"]["difference"] <= 2e-6, results["mixed_precision"]


def test_fsdp2_int8_checkpoint_moves_from_2_ranks_to_1_and_back(results):
    for r in results["reshard"]:
        # blocks of 256 regroup when the sharding changes, so states are requantized: each value within half a
        # code step of its own magnitude (6.25 %), hence within 6.25 % of its tensor's largest value
        assert r["keys"] > 0 and r["relative_error"] <= 0.0625, r
    assert [r["world_size"] for r in results["reshard"]] == [1, 2]


def test_fsdp2_cpu_offload_steps_on_the_kernels_like_torch(tmp_path):
    """``CPUOffloadPolicy(pin_memory=False)`` on a CPU-only machine: all 4 shards through the compiled kernels,
    within float32 round-off of torch.optim without offload (5 steps; 2e-6 as the mixed-precision case)."""
    out = tmp_path / "offload.json"
    _child("--offload", str(out))
    r = json.loads(out.read_text())
    assert r["compiled_tensors"] == 4 and r["difference"] <= 2e-6, r


def test_fsdp2_dcp_checkpoint_moves_between_adamkit_and_torch_both_ways(results):
    # the loader's next 4 steps against the saver's own: the two implementations' float32 round-off (the parity
    # grid's 2e-6; measured 1.4e-7). DCP loads only when the checkpoint has every key of the loader's state dict.
    assert len(results["across_libraries"]) == 2
    for direction, difference in results["across_libraries"].items():
        assert difference <= 2e-6, (direction, difference)


def test_tensor_parallel_placements_step_every_class_on_the_kernels(results):
    cases = results["tensor_parallel"]
    assert len(cases) == 2 * (8 + 4)  # Replicate and Shard(1); every class, bf16 and int8 for AdamW and RMSprop
    for key, r in cases.items():
        assert r["compiled_tensors"] == 2 and r["states_placed"] and r["replicas_equal"], (key, r)
        if r["difference"] is not None:  # float32 states against torch.optim on the full tensors, 10 steps
            assert r["difference"] <= 2e-6, (key, r)
        else:  # low-bit states against the same local shard stepped as a plain tensor
            assert r["bit_for_bit"], (key, r)


def test_ddp_replicas_with_stochastic_rounding_stay_equal_on_every_rank(results):
    assert results["ddp_replicas"] == {"bf16 states": True, "bf16 params, stochastic rounding": True}
