"""The explicit-vector passes of 8-bit blocks (adamkit.vectors) against the compiled loops they replace."""

from __future__ import annotations

import inspect
import sys
import warnings

import numpy as np

import pytest
import torch
from llvmlite import ir

import adamkit.kernels as kernels
import adamkit.torch as akt
from adamkit import rules, vectors

AVX2 = "avx2" in kernels.target_features()
CASES = [("AdamW", {}), ("AdamW", {"betas": (0.4, 0.999)}),  # lerp's two forms
         ("Adam", {"amsgrad": True, "weight_decay": 0.1, "maximize": True}),
         ("RMSprop", {"centered": True, "momentum": 0.5}), ("Adagrad", {"weight_decay": 0.1}),
         ("SGD", {"momentum": 0.9, "nesterov": True}), ("NAdam", {"decoupled_weight_decay": True, "weight_decay": 0.1}),
         ("RAdam", {}), ("Adamax", {})]


def _int8_run(name: str, cfg: dict, n: int) -> tuple[list[torch.Tensor], bool]:
    """Six steps with 8-bit states; step 3 has an inf gradient (its block is skipped), step 4 one of 1e30 (a square
    that overflows: the absmax is taken again over the finite values). Returns the parameter and every state tensor,
    and whether a loop with explicit-vector passes ran."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n))
    opt = akt.OPTIMIZERS[name]([p], lr=1e-2, state_precision="int8", **cfg)
    for step in range(6):
        g = torch.randn(n)
        g[7] = float("inf") if step == 3 else g[7]
        g[3000] = 1e30 if step == 4 else g[3000]
        p.grad = g
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped block's warning
            opt.step()
    loops = [fn for kern in kernels._kernels.values() for fn in kern.loops.values()]
    explicit = any(hasattr(sys.modules[fn.__module__], "BLOCK_UPDATE") for fn in loops)
    tensors = [p.detach()] + [v for v in opt.state_dict()["state"][0].values() if torch.is_tensor(v)]
    return [t.clone() for t in tensors], explicit


@pytest.mark.skipif(not AVX2, reason="the explicit passes are AVX2 code, which this target cannot run")
@pytest.mark.parametrize("name,cfg", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_explicit_vector_blocks_step_bit_for_bit_like_the_compiled_loops(monkeypatch, name, cfg):
    """The explicit passes run the same rule and code maps, operation for operation, so every bit of the
    parameter, the codes and the scales equals the compiled loops' after six steps: every rule with 8-bit states,
    a skipped block, a rescanned absmax, and a partial last block (which takes the loops). Forced on, so that an
    AVX-512 target checks them too."""
    monkeypatch.setattr(kernels, "SPECIALISE_AFTER", 0)  # the loops with flags as constants, from the first step
    results = []
    for explicit in (False, True):
        monkeypatch.setattr(kernels, "explicit_vectors",
                            lambda fmt, kinds, on=explicit: on and fmt == "float32" and set(kinds) == {"int8"})
        monkeypatch.setattr(kernels, "_kernels", {})
        tensors, used = _int8_run(name, cfg, 2 * kernels.CHUNK + 1003)
        assert used == explicit
        results.append(tensors)
    for a, b in zip(*results):
        bits = {torch.float32: torch.int32, torch.float64: torch.int64}.get(a.dtype, a.dtype)
        assert torch.equal(a.view(bits), b.view(bits))


def test_explicit_vectors_are_for_float32_params_with_8_bit_states_on_256_bit_targets(monkeypatch):
    monkeypatch.setattr(kernels, "target_features", lambda: {"avx", "avx2", "fma"})
    assert kernels.explicit_vectors("float32", ["int8", "int8"])
    assert not kernels.explicit_vectors("float32", ["int8", "bf16"])
    assert not kernels.explicit_vectors("bfloat16", ["int8", "int8"])
    assert not kernels.explicit_vectors("float32", [])
    monkeypatch.setattr(kernels, "target_features", lambda: {"avx", "avx2", "fma", "avx512f"})
    assert not kernels.explicit_vectors("float32", ["int8", "int8"])  # LLVM's 16-lane loops are faster there
    source = kernels._generate(rules.RULES["AdamW"], (True, True, False), "float32", False,
                               ("int8", "int8", "plain"), (False, True, False, False))
    assert "BLOCK_UPDATE" not in source


def _builder() -> tuple[ir.IRBuilder, ir.Value, ir.Value]:
    module = ir.Module()
    floats, ints = ir.VectorType(ir.FloatType(), 8), ir.VectorType(ir.IntType(32), 8)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [floats, ints]), "f")
    return ir.IRBuilder(fn.append_basic_block()), fn.args[0], fn.args[1]


def test_lanes_emit_one_instruction_per_operation_and_refuse_branches_on_values():
    builder, x, c = _builder()
    a, k = vectors.Lanes(builder, x), vectors.Lanes(builder, c)
    y = a * 2.0 + a
    assert [i.opname for i in builder.block.instructions] == ["fmul", "fadd"]
    assert all(set(i.flags) == set(vectors.FLAGS) for i in builder.block.instructions)
    assert (k >> 20).value.opname == "ashr" and (k << 3).value.opname == "shl"  # int32 >> is arithmetic
    assert (y != y).value.op == "une" and (y < y).value.op == "olt"  # != is true for nan, as in Python
    with pytest.raises(TypeError, match="use where"):
        if a > 0:
            pass


def test_the_rules_and_code_maps_trace_without_value_branches():
    """Every rule and every 8-bit element function runs on Lanes with any flags: nothing in them branches on a
    value (a rule that did would raise here, not compute the wrong thing)."""
    from adamkit import states
    for name, rule in rules.RULES.items():
        builder, x, _ = _builder()
        lanes = vectors.Lanes(builder, x)
        floats, bools = kernels.coefficient_names(rule)
        for flags in ([False] * len(bools), [True] * len(bools)):
            values = {**{f: lanes for f in floats}, **dict(zip(bools, flags))}
            names = list(inspect.signature(rule.update).parameters)[2 + len(rule.update_states):]
            result = vectors.traced("rule", name)(lanes, lanes, *[lanes] * len(rule.update_states),
                                                  *[values[n] for n in names])
            assert len(result) == 1 + len(rule.update_states)
    builder, x, c = _builder()
    for fn in ("dequantize_signed", "dequantize_unsigned"):
        assert vectors.traced("state", fn)(vectors.Lanes(builder, c), vectors.Lanes(builder, x)).kind == "float"
    for fn in ("quantize_signed", "quantize_unsigned"):
        assert vectors.traced("state", fn)(vectors.Lanes(builder, x), vectors.Lanes(builder, x)).kind == "int"
    assert "llvm.x86.avx2.psign.d" in str(builder.module)  # unless_zero / with_sign_of: one instruction each


def _psign(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """What ``vpsignd`` computes: ``x`` where ``c > 0``, ``−x`` where ``c < 0``, 0 where ``c = 0``."""
    return np.where(c > 0, x, np.where(c < 0, -x, 0)).astype(np.int32)


def test_the_sign_primitives_are_vpsignd_wherever_the_code_maps_use_them():
    """``unless_zero`` and ``with_sign_of`` as the other engines compute them (with ``where``) equal ``vpsignd``
    under the conditions the code maps call them in: a non-negative code magnitude, a code that is 0 for ±0 and
    nan."""
    from adamkit import states
    bits = np.arange(-5, 300, dtype=np.int32) << 20
    magnitude = np.abs(np.arange(-5, 300, dtype=np.int32)) % 128
    assert np.array_equal(states.unless_zero(bits, magnitude), _psign(bits, magnitude))
    x = np.array([-1.5, 1.5, -0.0, 0.0, np.nan, -np.nan, -np.inf, np.inf, -1e-30], dtype=np.float32)
    codes = states.quantize_signed(x, np.float32(1.0)).astype(np.int32)
    magnitudes = np.abs(codes)
    assert np.array_equal(states.with_sign_of(magnitudes, x), _psign(magnitudes, x.view(np.int32)))
    assert list(codes) == [-120, 120, 0, 0, 0, 0, -120, 120, 0]
