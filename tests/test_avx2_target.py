"""The kernels as an AVX2 machine compiles them, checked in a child process.

numba's target is set to Haswell's features and torch to its AVX2 kernels, as ``adamkit bench --isa avx2`` does.
On an AVX-512 host the rest of the suite never compiles AVX2 code, and there the low-precision kernels' loops
are vectorized differently (:func:`adamkit.kernels.widens_loops`). So the parity tests of those kernels run once
more under the AVX2 target: compiled against the reference path, bit for bit where the tests say so.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
from adamkit import bench, kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARITY_TESTS = [
    "tests/test_states.py::test_fused_int8_kernel_equals_the_slow_reference_of_the_same_algorithm",
    "tests/test_storage.py::test_bf16_states_have_the_same_bits_on_the_reference_and_compiled_paths",
    "tests/test_storage.py::test_random32_is_one_function_on_every_engine",
    "tests/test_kernels.py::test_16_bit_params_math_in_float32_rounded_to_nearest",
    "tests/test_kernels.py::test_bfloat16_stochastic_rounding_keeps_tiny_updates",
    "tests/test_kernels.py::test_rounding_noise_is_uniform_and_values_independent",
    # the explicit-vector passes against the AVX2 loops: two and three 8-bit states, every flag kind (the main
    # process checks every rule, with the host's loops)
    *(f"tests/test_vectors.py::test_explicit_vector_blocks_step_bit_for_bit_like_the_compiled_loops[{case}]"
      for case in ("AdamW-0", "Adam-2", "RMSprop-3")),
]


FLOAT32_ONLY = "not dtype1"  # the bf16-state test's float64 half: float64 kernels are never widened


@pytest.mark.skipif("avx2" not in kernels.target_features(), reason="this host cannot run AVX2 code")
def test_avx2_kernels_pass_the_parity_tests():
    env = {**os.environ, **bench.AVX2_ENVIRONMENT}
    widened = subprocess.run(
        [sys.executable, "-c", "from adamkit import kernels; print(kernels.widens_loops('float32', ('int8',)))"],
        env=env, capture_output=True, text=True, timeout=120)
    assert widened.stdout.strip() == "True", widened.stderr  # the loops the child compiles are the AVX2 ones
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", FLOAT32_ONLY, *PARITY_TESTS],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed, \d+ deselected(, \d+ warnings?)? in .*", summary), summary  # none failed
