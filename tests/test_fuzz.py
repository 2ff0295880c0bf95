"""Property-based fuzzing of checkpoints and steps, both engines, every class, every state precision, fused on and off.

Each case builds an optimizer, steps it once, mutates its state dict (dtypes, shapes, missing and extra keys,
non-finite and negative values, 8-bit code and scale corruption, step counters, group structure, hyperparameter
types), loads it and takes a step with a gradient that may hold inf or nan. The invariant:

* either a clear exception (``ValueError``, ``TypeError``, ``FloatingPointError``, ``RuntimeError`` with our
  words, never an internal message), with params and state bit-for-bit unchanged;
* or a step equal to torch.optim's on the same input: torch.optim loads the state the optimizer holds after the
  load, both step on the same gradient, and params and states agree within float32 rounding (states: within
  their storage's rounding).

Run: ``pytest tests/test_fuzz.py`` (bounded, a fixed seed) or ``pytest tests/test_fuzz.py --fuzz-long`` (about
21,000 cases, random seeds; ``-s`` prints the counts). ``ADAMKIT_FUZZ_EXAMPLES=n`` sets the cases per engine and
precision.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import adamkit.numpy as akn
import adamkit.torch as akt
from adamkit import checkpoints, states

from conftest import GRID

CLASSES = list(GRID)
BIG = states.MIN_QUANTIZED + 37  # stored in low precision (a partial last block too)
COUNTS = {"cases": 0, "refused": 0, "stepped": 0, "violations": 0}
VIOLATIONS: list[str] = []
INTERNAL = re.compile(r"broadcast|Boolean value of Tensor|has no attribute|unsupported operand|not subscriptable|"
                      r"index .* out of bounds|unhashable|object is not iterable|cannot convert|only integer")


def _examples(config: pytest.Config) -> int:
    """Cases per engine and precision: 40 (CI), 3500 with ``--fuzz-long``, or ``ADAMKIT_FUZZ_EXAMPLES``."""
    default = 3500 if config.getoption("--fuzz-long") else 40
    return int(os.environ.get("ADAMKIT_FUZZ_EXAMPLES", default))


# -- helpers: engines ----------------------------------------------------------------------------------------

def _values(engine, x):
    return x.detach().clone() if engine == "torch" else x.copy()


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _equal(a, b) -> bool:
    """Bit-for-bit equality of two state dicts (tensors, arrays and plain values)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.view(torch.uint8) if a.numel() and a.dim() else a, b.view(torch.uint8) if b.numel()
                        and b.dim() else b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return a == b or (a != a and b != b)


def _build(engine, name, cfg, precision, fused, check_finite, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = (BIG, 3) if precision else (257, 3)
    values = [torch.randn(n, generator=gen) for n in sizes]
    if engine == "torch":
        params = [torch.nn.Parameter(v) for v in values]
        opt = getattr(akt, name)(params, **cfg, fused=fused, check_finite=check_finite, state_precision=precision)
    else:
        params = [v.numpy() for v in values]
        opt = getattr(akn, name)(params, **cfg, check_finite=check_finite, state_precision=precision)
    _step(engine, opt, params, [torch.randn(n, generator=gen) for n in sizes])
    return opt, params


def _step(engine, opt, params, grads):
    if engine == "torch":
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    else:
        opt.step([g.numpy().copy() for g in grads])


def _torch_params(engine, params):
    return [torch.nn.Parameter(torch.as_tensor(_values(engine, p)).clone()) for p in params]


# -- strategies: mutations -----------------------------------------------------------------------------------

ODD_VALUES = [-1.0, 0.0, 0.5, 2.0, float("nan"), float("inf"), "x", None, True, False, (0.9,), [0.9, 0.999],
              (0.9, 1.0), (0.5, 0.9), 1e30, -0.0, 3]
STEP_VALUES = [-1.0, float("nan"), float("inf"), 0.0, 1e9, 2.5, "3", None, True, 7]
POKES = [float("nan"), float("inf"), -float("inf"), -1.0, 1e38, 0.0, 3.0]
CASTS = ["float64", "float16", "int8", "uint8", "int32", "complex64", "bool", "bfloat16", "uint16"]


def _cast(v, dtype):
    if torch.is_tensor(v):
        return v.to(getattr(torch, dtype))
    return np.asarray(v).astype(dtype if dtype != "bfloat16" else "float32")


def _array_keys(entry):
    return sorted(k for k, v in entry.items() if hasattr(v, "shape") and getattr(v, "ndim", 0) >= 1)


@dataclass(frozen=True)
class Draw:
    """The random choices of one mutation: an index to pick with, and a value of each kind."""

    pick: int
    value: Any
    poke: float
    dtype: str

    def of(self, items):
        return items[self.pick % len(items)]


def _mutate_entry(kind, sd, r):
    """Mutations of one parameter's state."""
    entries = sd["state"]
    entry = entries[r.of(sorted(entries, key=str))] if entries else {}
    keys, arrays = sorted(entry, key=str), _array_keys(entry)
    if kind == "drop_key" and keys:
        entry.pop(r.of(keys))
    elif kind == "add_key":
        template = entry[arrays[0]] if arrays else np.zeros(3, np.float32)
        entry[r.of(["foo", "momentum", "exp_avg.bf16", "exp_avg.absmax", "sum", "grad_avg", "max_exp_avg_sq",
                    "mu_product", "momentum_buffer", "exp_inf"])] = r.of([1.0, template * 0 + 1, template[:2], True])
    elif kind == "cast" and arrays:
        k = r.of(arrays)
        entry[k] = _cast(entry[k], r.dtype)
    elif kind == "reshape" and arrays:
        k = r.of(arrays)
        entry[k] = r.of([entry[k].reshape(1, -1), entry[k][:-1], entry[k].reshape(-1, 1), entry[k][::2]])
    elif kind == "poke" and arrays:
        v = entry[r.of(arrays)]
        if v.dtype not in (torch.int8, torch.uint8, np.int8, np.uint8, np.uint16):
            v[r.pick % v.shape[0]] = r.poke
    elif kind == "step" and "step" in entry:
        entry["step"] = r.of(STEP_VALUES)
    elif kind == "tensor_step" and "step" in entry:
        entry["step"] = r.of([torch.tensor(3), torch.tensor([1.0, 2.0]), torch.tensor(-2.0),
                              torch.tensor(1.0, requires_grad=True), np.float32(4.0)])
    else:
        _mutate_codes(kind, entry, keys, r)


def _mutate_codes(kind, entry, keys, r):
    """Mutations of 8-bit codes and their scales."""
    scales = [k for k in keys if k.endswith(".absmax")]
    if not scales:
        return
    k = r.of(scales)
    if kind == "absmax":
        v = entry[k]
        entry[k] = r.of([v.reshape(-1, 1), v[:-1], _cast(v, "int32"), v * 0 + r.poke, v * -1])
    elif kind == "codes":
        v = entry[k[:-len(".absmax")]]
        signed = v.dtype in (torch.int8, np.int8)
        v[r.pick % v.shape[0]] = r.of([127, -128, 121, -121]) if signed else r.of([255, 249])


def _mutate_groups(kind, sd, r):
    """Mutations of the groups and of the dict's structure; may return a new dict."""
    group, entries = sd["param_groups"][0], sd["state"]
    if kind == "group_value":
        k = r.of(sorted(group, key=str))
        if k != "params":
            group[k] = r.value
    elif kind == "drop_group_key":
        group.pop(r.of(sorted(group, key=str)))
    elif kind == "group_params":
        ids = group["params"]
        group["params"] = r.of([ids[:-1], ids + [99], ids[::-1], [ids[0], ids[0]], "ab", [str(i) for i in ids],
                                [float(i) for i in ids]])
    elif kind == "extra_group":
        sd["param_groups"].append(dict(group, params=[]))
    elif kind == "drop_entry" and entries:
        entries.pop(r.of(sorted(entries, key=str)))
    elif kind == "entry_type" and entries:
        entries[r.of(sorted(entries, key=str))] = r.of([None, [], 3, "x"])
    elif kind == "top_level":
        return r.of([None, [], {"state": entries}, {"param_groups": sd["param_groups"]}, {**sd, "state": [1]},
                     {**sd, "param_groups": group}])
    elif kind == "engine_option":
        group[r.of(["fused", "capturable", "differentiable", "state_precision", "foreach"])] = \
            [True, False, None, "yes", "int8", "bf16", 1][r.pick // 5 % 7]
    return sd


GROUP_KINDS = ["group_value", "drop_group_key", "group_params", "extra_group", "drop_entry", "entry_type",
               "top_level", "engine_option"]
ENTRY_KINDS = ["drop_key", "add_key", "cast", "reshape", "poke", "step", "tensor_step", "absmax", "codes"]
mutation_kinds = st.sampled_from(["none", *ENTRY_KINDS, *GROUP_KINDS])
draws = st.builds(Draw, st.integers(0, 10 ** 6), st.sampled_from(ODD_VALUES), st.sampled_from(POKES),
                  st.sampled_from(CASTS))


def mutate(kind, sd, r):
    """The state dict ``sd`` (a deep copy) mutated by ``kind`` with the choices ``r``."""
    if kind in GROUP_KINDS:
        return _mutate_groups(kind, sd, r)
    if kind in ENTRY_KINDS:
        _mutate_entry(kind, sd, r)
    return sd


@dataclass(frozen=True)
class Gradients:
    """A gradient per parameter: Gaussian times ``scale``, one element set to ``bad`` (if any)."""

    seed: int
    scale: float
    bad: float | None
    where: int

    def make(self, sizes):
        gen = torch.Generator().manual_seed(self.seed)
        grads = [torch.randn(n, generator=gen) * self.scale for n in sizes]
        if self.bad is not None:
            i = self.where % len(sizes)
            grads[i][self.where % sizes[i]] = self.bad
        return grads


gradients = st.builds(Gradients, st.integers(0, 2 ** 31), st.sampled_from([1.0, 1.0, 1e-30, 1e20, 0.0]),
                      st.sampled_from([None, None, float("nan"), float("inf"), -float("inf")]),
                      st.integers(0, 10 ** 6))


# -- the invariant -------------------------------------------------------------------------------------------

def _refused(e: BaseException, opt, before, params, params_before, engine):
    COUNTS["refused"] += 1
    assert isinstance(e, (ValueError, TypeError, FloatingPointError, RuntimeError)), repr(e)
    assert not INTERNAL.search(str(e)), f"internal message: {e!r}"
    assert _equal(opt.state_dict(), before), f"state changed by a refused call: {e!r}"
    for p, q in zip(params, params_before):
        assert _equal(_values(engine, p), q), f"params changed by a refused call: {e!r}"


def _reference(name, cfg, engine, params, exported):
    ref_params = _torch_params(engine, params)
    ref = getattr(torch.optim, name)(ref_params, **cfg)
    exported = copy.deepcopy(exported)  # torch.optim keeps the tensors it loads: they must not be ours
    if engine == "numpy":
        exported = {"param_groups": exported["param_groups"],
                    "state": {i: {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else torch.tensor(v)
                                  for k, v in s.items()} for i, s in exported["state"].items()}}
    ref.load_state_dict(exported)
    return ref, ref_params


BF16_MAX = 3.3895313892515355e38


def _close(ours, theirs, tol, what):
    """Within ``tol`` of torch's scale where torch's value is finite and fits every storage with its tolerance
    (bf16 rounds values above its largest, 3.39e38, to inf; 8-bit codes contain a non-finite value by saturating;
    a value within ``tol · scale`` of that edge may be stored, or exported as c + ḡ², above it: inf)."""
    ours, theirs = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    finite = torch.isfinite(theirs) & (theirs.abs() < BF16_MAX)
    assert torch.equal(torch.isnan(ours) & finite, torch.zeros_like(finite)), f"{what}: nan where torch is finite"
    scale = float(theirs[finite].abs().max()) if finite.any() else 0.0
    finite &= theirs.abs() < BF16_MAX - tol * scale
    err = float((ours[finite] - theirs[finite]).abs().max()) if finite.any() else 0.0
    assert err <= tol * scale + 1e-30, f"{what}: error {err:.3g} for scale {scale:.3g} (tolerance {tol})"


STATE_TOL = {None: 2e-5, "bf16": 2 ** -7, "int8": 0.07}


# A state the step creates (its entry was not loaded) starts from its initial value rounded to bf16 (Adagrad's
# initial_accumulator_value: relative error up to 2^-9), where torch.optim starts from float32: the update, which
# depends on the state through its square root or less, then differs by up to that fraction of its size.
CREATED_TOL = {None: 0.0, "bf16": 2 ** -9, "int8": 0.0}  # 8-bit: a constant is its block's absmax, exact


def _rounded_to_negative_variance(opt, ref, p, precision, ours, theirs):
    """Where torch.optim's centered RMSprop took the root of a variance v − ḡ² that rounding made negative (it is
    ≥ 0 exactly; with alpha = 0 it is exactly 0, and addcmul leaves the sign of g²'s rounding), torch's parameter
    is NaN. States stored in bf16 or 8 bits keep the variance itself, which cannot go negative, so adamkit's is
    finite there: those elements are not compared."""
    if opt.rule.stored_variance is None or precision is None or not opt.param_groups[0].get("centered"):
        return torch.zeros_like(ours, dtype=torch.bool)
    v, a = (ref.state[p][k] for k in opt.rule.stored_variance)
    return torch.isnan(theirs) & ~torch.isnan(ours) & (v.addcmul(a, a, value=-1) <= 0)


def _reconstructed(opt, i, k, precision):
    """How many roundings of its own size a state exported in torch's form carries: 1; a centered RMSprop's
    square_avg stored in bf16 as its variance c is exported as v = c + ḡ², with c's rounding and ḡ's twice over
    (ḡ² doubles ḡ's relative error), at most 2 × 2^-7 of v since c, ḡ² ≥ 0 sum to v."""
    group = opt.param_groups[0]
    variance = opt.rule.stored_variance is not None and k == opt.rule.stored_variance[0] and group.get("centered")
    return 2 if variance and precision == "bf16" else 1


def _compare(engine, opt, ref, params, ref_params, before_params, precision, grads, check_finite, created):
    for i, (p, r, b, g) in enumerate(zip(params, ref_params, before_params, grads)):
        ours, theirs = torch.as_tensor(_values(engine, p)), r.detach()
        delta = (theirs - torch.as_tensor(b)).abs()
        relative = 1e-4 + (CREATED_TOL[precision] if i in created else 0.0)
        tol = relative * float(delta[torch.isfinite(delta)].max()) if torch.isfinite(delta).any() else 0.0
        tol += 4e-7 * float(torch.as_tensor(b).abs().max())
        keep = torch.ones_like(ours, dtype=torch.bool)
        if not check_finite and any(k.endswith(".absmax") for k in opt.state_dict()["state"].get(i, {})):
            bad = torch.repeat_interleave(torch.as_tensor(states.nonfinite_blocks(g.numpy())), states.BLOCK)
            keep = ~bad[:ours.shape[0]]
            assert torch.equal(ours[~keep], torch.as_tensor(b)[~keep]), "a guarded 8-bit block changed"
        keep &= ~_rounded_to_negative_variance(opt, ref, r, precision, ours, theirs)
        assert torch.equal(torch.isnan(ours[keep]), torch.isnan(theirs[keep])), f"param {i}: nan pattern"
        fin = keep & torch.isfinite(theirs)
        err = float((ours[fin] - theirs[fin]).abs().max()) if fin.any() else 0.0
        assert err <= tol, f"param {i}: error {err:.3g} > {tol:.3g}"
    full = opt.torch_state_dict()  # torch's format: a stored variance is given as torch's square_avg
    ref_state = ref.state_dict()["state"]
    for i, entry in full["state"].items():
        for k, v in entry.items():
            if k in opt.rule.update_states and k in ref_state.get(i, {}) and (check_finite or precision != "int8"):
                _close(v, ref_state[i][k], STATE_TOL[precision] * _reconstructed(opt, i, k, precision),
                       f"state {i} {k}")


def run_case(engine, precision, data, seen=None):
    """One case; ``seen`` collects what was drawn (to name a violation)."""
    COUNTS["cases"] += 1
    if COUNTS["cases"] % 500 == 0:
        print(f"fuzz progress: {COUNTS}", flush=True)  # shown with -s
    seen = {} if seen is None else seen
    name = seen["class"] = data.draw(st.sampled_from(CLASSES), label="class")
    cfg = data.draw(st.sampled_from(GRID[name]), label="hyperparameters")
    fused = seen["fused"] = data.draw(st.sampled_from([None, False]), label="fused") if engine == "torch" else None
    check_finite = data.draw(st.booleans(), label="check_finite")
    opt, params = _build(engine, name, cfg, precision, fused, check_finite, data.draw(st.integers(0, 999)))
    kind, choices = data.draw(mutation_kinds, label="mutation"), data.draw(draws, label="choices")
    seen.update(mutation=kind, choices=choices, hyperparameters=cfg, check_finite=check_finite)
    mutated = mutate(kind, _snapshot(opt), choices)
    before, params_before = _snapshot(opt), [_values(engine, p) for p in params]
    try:
        opt.load_state_dict(mutated)
    except Exception as e:  # noqa: BLE001 - the invariant decides
        _refused(e, opt, before, params, params_before, engine)
        return
    ref, ref_params = _reference(name, cfg, engine, params, opt.torch_state_dict())
    created = {i for i in range(len(params)) if i not in opt.state_dict()["state"]}
    spec = seen["gradients"] = data.draw(gradients, label="gradients")
    grads = spec.make([p.shape[0] for p in params])
    before, params_before = _snapshot(opt), [_values(engine, p) for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            _step(engine, opt, params, grads)
        except Exception as e:  # noqa: BLE001
            _refused(e, opt, before, params, params_before, engine)
            assert not all(torch.isfinite(g).all() for g in grads), f"finite gradients refused: {e!r}"
            return
        assert check_finite is False or all(torch.isfinite(g).all() for g in grads), "non-finite step taken"
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        ref.step()
    COUNTS["stepped"] += 1
    _compare(engine, opt, ref, params, ref_params, params_before, precision, grads, check_finite, created)


@pytest.mark.parametrize("precision", [None, "bf16", "int8"])
@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_fuzz_checkpoints_and_steps(engine, precision, pytestconfig):
    long = pytestconfig.getoption("--fuzz-long")

    @settings(max_examples=_examples(pytestconfig), deadline=None, derandomize=not long, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def case(data):
        if not long:
            return run_case(engine, precision, data)  # the first violation fails, shrunk
        seen = {}
        try:  # the long run counts every violation and names the first few
            run_case(engine, precision, data, seen)
        except AssertionError as e:
            COUNTS["violations"] = COUNTS.get("violations", 0) + 1
            if len(VIOLATIONS) < 20:
                VIOLATIONS.append(f"{engine} {precision} {seen}: {str(e).splitlines()[0]}")

    first = len(VIOLATIONS)
    case()
    print(f"\nfuzz {engine} {precision}: {COUNTS}")
    print("\n".join(VIOLATIONS[first:]))
    assert len(VIOLATIONS) == first, f"{COUNTS['violations']} violations so far; the first ones are shown"
