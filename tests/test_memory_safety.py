"""Changing things under the optimizer never crashes the process: every case of ``safety_cases.py`` runs in a
child process, and gives either torch.optim's result or a clean exception with nothing changed.

The cases run in as few children as possible (importing torch and loading kernels dominates); when a child dies,
the case it was running fails with the signal, and the cases after it run in a fresh child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import safety_cases

HERE = Path(__file__).parent
TIMEOUT = 300  # seconds for one child; every case takes well under a second once kernels are loaded


def _run_all(names: list[str]) -> dict[str, dict]:
    results: dict[str, dict] = {}
    pending = list(names)
    while pending:
        proc = subprocess.run([sys.executable, str(HERE / "safety_cases.py"), *pending], capture_output=True,
                              text=True, timeout=TIMEOUT, cwd=HERE, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                record = json.loads(line[len("RESULT "):])
                results[record["name"]] = record["result"]
        done = [n for n in pending if n in results]
        rest = [n for n in pending if n not in results]
        if rest and proc.returncode != 0:  # the child died in rest[0]
            results[rest[0]] = {"outcome": "crashed", "returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
            rest = rest[1:]
        if not done and rest == pending:
            raise RuntimeError(f"child made no progress: {proc.stderr[-2000:]}")
        pending = rest
    return results


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return _run_all(list(safety_cases.CASES))


def _leaves(result: dict, where: str = ""):
    """The (place, outcome) leaves of a case's result (cases report per path, per dtype, ...)."""
    if "outcome" in result:
        yield where, result
    else:
        for k, v in result.items():
            yield from _leaves(v, f"{where}/{k}")


# Cases whose every outcome must be torch.optim's step (torch steps too, and so must we).
MUST_STEP = {"state_tensor_replaced", "state_cleared", "state_recreated", "state_entry_replaced_by_copy",
             "step_fill_zero", "step_as_plain_number", "param_data_new_memory", "param_data_transposed",
             "params_swapped_in_group", "zero_redundancy_reload", "grad_expanded", "int8_state_model_double",
             "int8_state_replaced_by_quantized_state", "int8_state_replaced_by_full_precision",
             "int8_state_edited_in_place", "int8_codes_replaced", "int8_codes_data_repointed",
             "state_tensor_data_repointed_same_layout"}
# Cases where torch.optim raises (or would compute garbage) and a clean refusal, nothing changed, is required.
MUST_REFUSE = {"state_tensor_replaced_wrong_dtype", "state_tensor_replaced_wrong_size", "step_counters_unusable", "model_double", "model_bfloat16",
               "model_float16", "float16_model_float", "param_data_smaller", "grad_data_smaller",
               "float16_grad_data_float32", "float16_param_viewed_as_bfloat16", "grad_storage_freed_compiled_path",
               "int8_codes_replaced_wrong_size", "int8_codes_replaced_wrong_dtype", "int8_absmax_wrong_shape",
               "int8_codes_data_reassigned", "int8_state_replaced_by_codes", "int8_state_replaced_by_part_of_one",
               "int8_codes_storage_freed", "grad_data_viewed_as_int32",
               "state_storage_freed_compiled_path", "step_counter_storage_freed_compiled_path",
               "state_tensor_data_reassigned", "state_tensor_set_empty", "state_tensor_resized_in_place",
               "state_entry_deleted", "step_counter_edited_in_place", "param_data_reshaped_same_size",
               "param_storage_freed", "int8_scale_edited_in_place", "int8_state_assigned_values_it_cannot_hold"}


@pytest.mark.parametrize("name", list(safety_cases.CASES))
def test_changing_things_under_the_optimizer(results, name):
    result = results[name]
    assert result.get("outcome") != "crashed", f"{name} crashed the process: {result}"
    assert result.get("outcome") != "case failed", result.get("error")
    for where, leaf in _leaves(result):
        if leaf["outcome"] == "stepped":
            assert name not in MUST_REFUSE, f"{name}{where}: stepped where a clean error was required: {leaf}"
            # float32 parity with torch.optim, as in the parity grid
            assert leaf["difference"] <= 2e-6, f"{name}{where}: differs from torch.optim: {leaf}"
        else:
            assert leaf["outcome"] == "refused", leaf
            assert name not in MUST_STEP, f"{name}{where}: refused what torch.optim steps: {leaf}"
            assert leaf["unchanged"], f"{name}{where}: refused, but changed parameters or state: {leaf}"
            assert leaf.get("steps_on", True), f"{name}{where}: no step after a refused change: {leaf}"
            assert "Error" in leaf["error"].split(":")[0], leaf


def test_every_case_is_classified():
    assert set(safety_cases.CASES) == MUST_STEP | MUST_REFUSE | {"step_counters_of_every_dtype"}


def test_the_gradients_metadata_guard_sees_every_change_but_the_address():
    """The per-step check of the gradients (``_tensors.MetadataGuard``): equal metadata in new tensors matches;
    any other dtype, size, stride, type, autograd flag or count does not (then everything is validated again)."""
    import torch
    from adamkit._tensors import MetadataGuard
    grads = [torch.randn(1024) for _ in range(3)]
    guard = MetadataGuard(grads)
    assert guard.matches([torch.randn(1024) for _ in range(3)])
    changed = {"dtype": torch.randn(1024).view(torch.int32), "size": torch.randn(1000),
               "stride": torch.randn(2048)[::2], "expanded": torch.ones(1).expand(1024),
               "subclass": torch.nn.Parameter(torch.randn(1024)), "requires_grad": torch.randn(1024, requires_grad=True),
               "not a tensor": 1.0, "meta": torch.empty(1024, device="meta")}
    for what, g in changed.items():
        assert not guard.matches([grads[0], g, grads[2]]), what
    assert not guard.matches(grads[:2]) and not guard.matches(grads + grads[:1])
    assert not MetadataGuard([]).matches([])  # an empty guard validates nothing
