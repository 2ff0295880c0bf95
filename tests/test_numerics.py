"""Numerics findings: low-precision centered RMSprop, overflow order, NaN in maximum, 8-bit blocks and bad values,
complex NumPy parameters, boolean options, and minimize's bad inputs."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import adamkit
import adamkit.numpy as akn
import adamkit.torch as akt
from adamkit import checkpoints, rules, states

N = 8192  # ≥ MIN_QUANTIZED: states really are bf16 / 8-bit


def _grads(steps: int, n: int = N, seed: int = 0):
    """Finite, well-conditioned gradients: mean 1 and 1 % noise (the centered variance is tiny)."""
    gen = torch.Generator().manual_seed(seed)
    return [1.0 + 0.01 * torch.randn(n, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("fused", [None, False])
def test_centered_rmsprop_with_low_precision_states_stays_finite_torch(precision, fused):
    p = torch.nn.Parameter(torch.zeros(N))
    opt = akt.RMSprop([p], lr=1e-3, centered=True, state_precision=precision, fused=fused)
    for g in _grads(300):
        p.grad = g
        opt.step()
    assert torch.isfinite(p).all()
    copy.deepcopy(opt.state_dict())  # its own state dict is well-formed (finite scales)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_centered_rmsprop_with_low_precision_states_stays_finite_numpy(precision):
    w = np.zeros(N, dtype=np.float32)
    opt = akn.RMSprop([w], lr=1e-3, centered=True, state_precision=precision)
    for g in _grads(300):
        opt.step([g.numpy()])
    assert np.isfinite(w).all()
    akn.RMSprop([w.copy()], centered=True, state_precision=precision).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("fused", [None, False])
def test_centered_rmsprop_overflowing_average_follows_torch(fused):
    """square_avg overflows to inf; ḡ² overflows too. torch's fused multiply-add gives inf − ḡ² = inf (update 0),
    squaring first gave inf − inf = NaN."""
    ref, p, w = (torch.nn.Parameter(torch.ones(4)) for _ in range(3))
    w = np.ones(4, dtype=np.float32)
    torch_opt = torch.optim.RMSprop([ref], centered=True)
    opt = akt.RMSprop([p], centered=True, fused=fused)
    np_opt = akn.RMSprop([w], centered=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy reports the overflow
        for _ in range(3):
            ref.grad, p.grad = torch.full((4,), 2e21), torch.full((4,), 2e21)
            torch_opt.step()
            opt.step()
            np_opt.step([np.full(4, 2e21, dtype=np.float32)])
    assert torch.equal(ref, torch.ones(4))
    assert torch.equal(p, ref) and np.array_equal(w, ref.detach().numpy())


def test_scalar_variance_follows_the_fused_multiply_add():
    """v − a² as torch's addcmul, without a clamp (torch.optim has none; low-precision states store the variance
    itself, see the tests below)."""
    f = rules.SCALAR_OPS["variance"]
    assert f(float("inf"), 5.9e19) == float("inf")
    assert f(1.0, 1.5) == -1.25 and f(2.0, 1.0) == 1.0
    assert np.isnan(f(float("nan"), 1.0)) and np.isnan(f(float("inf"), float("inf")))
    with np.errstate(over="ignore", invalid="ignore"):
        computed = rules.variance(np.array([np.inf, 1.0, np.nan]), np.array([1e200, 1.5, 0.0]))
    assert np.array_equal(computed, np.array([np.inf, -1.25, np.nan]), equal_nan=True)
    t = torch.tensor([1.0, 2.0, float("inf")])
    assert torch.equal(rules.variance(t, torch.tensor([1.5, 1.0, 2e20])), torch.tensor([-1.25, 1.0, float("inf")]))


def _centered_run(engine, precision, steps, fused=None):
    """Centered RMSprop with momentum on gradients of mean 1 and 1 % noise: v ≈ ḡ² ≈ 1 and the variance v − ḡ² is
    1e-4 of v. Returns the final parameters and the optimizer."""
    gen = torch.Generator().manual_seed(0)
    grads = [1.0 + 0.01 * torch.randn(N, generator=gen) for _ in range(steps)]
    options = dict(lr=1e-3, centered=True, momentum=0.5, state_precision=precision)
    if engine == "numpy":
        w = np.zeros(N, np.float32)
        opt = akn.RMSprop([w], **options)
        for g in grads:
            opt.step([g.numpy()])
        return torch.from_numpy(w), opt
    p = torch.nn.Parameter(torch.zeros(N))
    opt = akt.RMSprop([p], fused=fused, **options)
    for g in grads:
        p.grad = g
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("engine, fused", [("torch", None), ("torch", False), ("numpy", None)])
def test_centered_rmsprop_with_low_precision_states_trains_like_float32(engine, fused, precision):
    """v and ḡ rounded separately to bf16 or 8 bits kept nothing of v − ḡ²: the parameters ran away (relative
    drift from float32 4e5 with bf16, 3e6 with int8, after 300 steps). Storing the variance itself: 1.1 % and
    3.3 %. The rest is ḡ's own rounding (2^-9 of ḡ ≈ 1 in bf16), which is not small against the gradient's
    spread of 0.01 and enters c through (g − ḡ)²."""
    reference, _ = _centered_run(engine, None, 300, fused=fused)
    low, opt = _centered_run(engine, precision, 300, fused=fused)
    assert torch.isfinite(low).all()
    drift = float((low.double() - reference.double()).norm() / reference.double().norm())
    assert drift < (0.02 if precision == "bf16" else 0.05), drift


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_centered_rmsprop_checkpoints_hold_torch_square_avg(engine, precision):
    """The stored variance c is exported as torch's v = c + ḡ²; torch.optim resumes from it like the low-precision
    optimizer; a torch checkpoint (v) loads as c = v − ḡ²; and a low-precision checkpoint resumes bit for bit."""
    _, opt = _centered_run(engine, precision, 20)
    state = opt.state[0] if engine == "numpy" else next(iter(opt.state.values()))
    exported = opt.torch_state_dict()["state"][0]
    full = checkpoints.full_precision(opt.state_dict(), opt.rule)["state"][0]  # the stored forms
    c, g_avg, v = (torch.as_tensor(np.asarray(x)) for x in (full["square_avg"], full["grad_avg"],
                                                             exported["square_avg"]))
    assert (c >= 0).all() and (c < v).all()  # the variance, not v
    assert torch.allclose(v, c + g_avg * g_avg, rtol=1e-6)
    cls = akn.RMSprop if engine == "numpy" else akt.RMSprop
    params = [np.zeros(N, np.float32)] if engine == "numpy" else [torch.nn.Parameter(torch.zeros(N))]
    again = cls(params, lr=1e-3, centered=True, momentum=0.5, state_precision=precision)
    again.load_state_dict(opt.torch_state_dict())  # torch's v in, the variance stored
    back = checkpoints.full_precision(again.state_dict(), again.rule)["state"][0]["square_avg"]
    assert torch.allclose(torch.as_tensor(np.asarray(back)), c, rtol=0.07 if precision == "int8" else 2 ** -7,
                          atol=1e-3 * float(c.max()))
    same = cls(params, lr=1e-3, centered=True, momentum=0.5, state_precision=precision)
    same.load_state_dict(copy.deepcopy(opt.state_dict()))
    for a, b in zip(_stored_arrays(same), _stored_arrays(opt)):
        assert np.array_equal(a, b)


def _stored_arrays(opt):
    entry = next(iter(opt.state_dict()["state"].values()))
    return [np.asarray(v.view(torch.int16) if torch.is_tensor(v) and v.dtype == torch.bfloat16 else v)
            for k, v in sorted(entry.items()) if k in ("square_avg", "grad_avg", "square_avg.absmax")]


@pytest.mark.parametrize("name, options, key", [("Adam", dict(amsgrad=True), "max_exp_avg_sq"),
                                                ("Adamax", {}, "exp_inf")])
@pytest.mark.parametrize("fused", [None, False])
def test_maximum_propagates_nan_like_torch(name, options, key, fused):
    """With check_finite=False, a NaN gradient reaches the running maximum: torch.maximum keeps the NaN in
    either argument; the compiled path's Python ``max`` dropped it from its second."""
    ref, p = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    torch_opt = getattr(torch.optim, name)([ref], **options)
    opt = getattr(akt, name)([p], fused=fused, check_finite=False, **options)
    for g in (torch.ones(4), torch.tensor([1.0, float("nan"), 1.0, 1.0])):
        ref.grad, p.grad = g.clone(), g.clone()
        torch_opt.step()
        opt.step()
    assert torch.equal(opt.state[p][key].isnan(), torch_opt.state[ref][key].isnan())
    assert torch.allclose(opt.state[p][key], torch_opt.state[ref][key], rtol=0, atol=0, equal_nan=True)
    maximum = rules.SCALAR_OPS["maximum"]
    assert np.isnan(maximum(1.0, float("nan"))) and np.isnan(maximum(float("nan"), 1.0)) and maximum(1.0, 2.0) == 2.0


def test_numpy_int8_first_step_keeps_blocks_with_non_finite_gradients():
    """check_finite=False, int8: on the first step the states did not exist yet, so no block was guarded."""
    w = np.ones(N, dtype=np.float32)
    opt = akn.Adam([w], lr=0.1, check_finite=False, state_precision="int8")
    g = np.ones(N, dtype=np.float32)
    g[3] = np.nan
    with pytest.warns(RuntimeWarning, match="1 block"):
        opt.step([g])
    assert np.array_equal(w[:256], np.ones(256, dtype=np.float32))  # the bad block: unchanged
    assert np.all(w[256:] < 1)
    opt.step([np.ones(N, dtype=np.float32)])
    assert np.isfinite(w).all()
    assert np.isfinite(opt.state_dict()["state"][0]["exp_avg.absmax"]).all()


def test_quantize_contains_non_finite_values():
    """One inf or nan does not set its block's scale: the other 255 values keep their codes."""
    x = np.linspace(-1, 1, 512, dtype=np.float32)
    bad = x.copy()
    bad[5], bad[300] = np.inf, np.nan
    codes, absmax = states.quantize(bad, True)
    good_codes, good_absmax = states.quantize(x, True)
    assert np.isfinite(absmax).all() and np.array_equal(absmax, good_absmax)
    keep = np.ones(512, bool)
    keep[[5, 300]] = False
    assert np.array_equal(codes[keep], good_codes[keep])
    assert codes[5] == 120 and codes[300] == 0  # +inf saturates; nan reads as 0
    t_codes, t_absmax = states.quantize(torch.from_numpy(bad), True)
    assert np.array_equal(t_codes.numpy(), codes) and np.array_equal(t_absmax.numpy(), absmax)


@pytest.mark.parametrize("shape", [(), (3, 4)])
def test_numpy_complex_parameters_of_any_layout_step_like_torch(shape):
    """A 0-d complex parameter and a complex view whose last axis is not contiguous (NumPy refused to view
    either as float after the preceding parameters were already updated)."""
    rng = np.random.default_rng(0)
    base = (rng.normal(size=(3, 8)) + 1j * rng.normal(size=(3, 8))).astype(np.complex64)
    first = np.ones(2, dtype=np.float32)
    w = base[..., ::2].copy() if shape else np.array(1 + 2j, dtype=np.complex64)
    param = base[..., ::2] if shape else w  # a strided view (last axis step 2) or a 0-d array
    refs = [torch.nn.Parameter(torch.from_numpy(first.copy())), torch.nn.Parameter(torch.from_numpy(np.array(w)))]
    torch_opt = torch.optim.Adam(refs, lr=0.1)
    opt = akn.Adam([first, param], lr=0.1)
    for _ in range(3):
        g = np.asarray(rng.normal(size=param.shape) + 1j * rng.normal(size=param.shape), dtype=np.complex64)
        refs[0].grad, refs[1].grad = torch.ones(2), torch.from_numpy(g.copy())
        torch_opt.step()
        opt.step([np.ones(2, dtype=np.float32), g])
    assert np.allclose(param, refs[1].detach().numpy(), rtol=1e-6, atol=1e-7)
    assert np.allclose(first, refs[0].detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("value", [None, "no", 1, 0.0])
def test_boolean_options_are_validated_not_converted(value):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid check_finite"):
        akt.Adam([p], check_finite=value)
    with pytest.raises(ValueError, match="Invalid stochastic_rounding"):
        akt.Adam([p], stochastic_rounding=value)
    with pytest.raises(ValueError, match="Invalid check_finite"):
        akn.Adam([np.zeros(3)], check_finite=value)
    with pytest.raises(ValueError, match="Invalid check_finite"):
        adamkit.minimize(lambda x: float(x @ x), np.ones(2), jac=lambda x: 2 * x, options={"check_finite": value})
    akt.Adam([p], check_finite=np.bool_(False))  # a NumPy bool is a bool


def _quadratic(x):
    return float(x @ x), 2 * x


@pytest.mark.parametrize("kwargs, match", [
    (dict(method=None), "unknown method None"),
    (dict(method=3), "unknown method 3"),
    (dict(options={"maxiter": float("nan")}), "maxiter must be a whole number"),
    (dict(options={"maxiter": 2.5}), "maxiter must be a whole number"),
    (dict(options={"maxiter": True}), "maxiter must be a whole number"),
    (dict(options={"gtol": float("nan")}), "gtol must be a finite number"),
    (dict(options={"ftol": float("nan")}), "ftol must be a finite number"),
    (dict(options={"ftol": "1e-3"}), "ftol must be a finite number"),
    (dict(jac="garbage"), "jac must be a callable"),
    (dict(bounds=[(0, float("nan")), (None, None)]), "bounds must not hold nan"),
    (dict(bounds=[(float("nan"), 1), (None, None)]), "bounds must not hold nan"),
])
def test_minimize_bad_inputs_are_clear_errors(kwargs, match):
    kwargs = {"jac": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        adamkit.minimize(_quadratic, np.ones(2), **kwargs)


def test_minimize_takes_what_scipy_takes():
    """``fun`` returning shape (1,), ``jac='2-point'`` and an integral float maxiter, as SciPy accepts them."""
    res = adamkit.minimize(lambda x: np.array([x @ x]), np.ones(2), jac="2-point",
                           options={"lr": 0.1, "maxiter": 2000.0, "gtol": 1e-5})
    assert res.success and np.allclose(res.x, 0, atol=1e-4)
    with pytest.raises(ValueError, match="fun must return a real scalar"):
        adamkit.minimize(lambda x: x, np.ones(2))


@pytest.mark.parametrize("fused", [False, None])
def test_an_overflowing_8bit_state_keeps_its_block_scale_finite(fused):
    """Finite gradients of 1e20: Adagrad's sum overflows float32. The block's scale must stay finite, so the
    optimizer takes its own state dict back."""
    p = torch.nn.Parameter(torch.randn(N))
    opt = akt.Adagrad([p], state_precision="int8", fused=fused)
    p.grad = torch.randn(N) * 1e20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    assert torch.isfinite(opt.state[p]["sum"].absmax).all() and torch.isfinite(opt.state[p]["sum"]).any()
    akt.Adagrad([torch.nn.Parameter(p.detach().clone())], state_precision="int8").load_state_dict(
        copy.deepcopy(opt.state_dict()))


@pytest.mark.parametrize("name,options,key", [("Adagrad", {}, "sum"), ("SGD", {"momentum": 0.9}, "momentum_buffer")])
def test_compiled_8bit_states_contain_overflow_like_the_reference(name, options, key):
    """Some elements of each block overflow (Adagrad's sum to +inf; SGD's momentum to +inf and −inf), the others
    stay small: the compiled kernels and the reference path store the same codes and the same scales, taken over
    the finite values (the overflowed ones take ±the top code), and every parameter takes the same step."""
    gen = torch.Generator().manual_seed(3)
    sign = torch.where(torch.rand(N, generator=gen) < 0.5, -1.0, 1.0)
    big = torch.rand(N, generator=gen) < 0.05
    grads = [torch.where(big, 3e38 * sign, torch.randn(N, generator=gen)) for _ in range(2)]
    params, opts = [], []
    for fused in (None, False):
        p = torch.nn.Parameter(torch.ones(N))
        params.append(p)
        opts.append(getattr(akt, name)([p], lr=1e-3, state_precision="int8", fused=fused, check_finite=False, **options))
    for g in grads:
        for p, opt in zip(params, opts):
            p.grad = g.clone()
            opt.step()
    (fast, ref), (o_fast, o_ref) = params, opts
    codes, fast_codes = (o.state[q][key].codes.to(torch.int16) for o, q in ((o_ref, ref), (o_fast, fast)))
    top = 120 if key == "momentum_buffer" else 248
    saturated = codes.abs() == top
    assert saturated.sum() >= big.sum() // 2  # the overflowed elements (about half of those with big gradients)
    assert torch.equal(fast_codes[saturated], codes[saturated])
    assert (fast_codes - codes).abs().max() <= 1 and (fast_codes != codes).float().mean() < 1e-3  # FMA rounding
    scales = o_fast.state[fast][key].absmax
    assert torch.isfinite(scales).all() and scales.max() < 1e3  # over the finite (small) values only
    assert torch.allclose(scales, o_ref.state[ref][key].absmax, rtol=1e-6, atol=0)
    assert torch.allclose(fast, ref, rtol=1e-6, atol=0, equal_nan=True)


def test_compiled_quantizers_contain_non_finite_values_like_the_reference():
    """The element functions as the kernels compile them and as the reference runs them on arrays give the same
    codes for non-finite, zero, tiny and saturating inputs, in a block with a scale and in an all-zero one."""
    from adamkit import kernels
    _, _, q_signed, q_unsigned, inverse = kernels.scalar_state_functions()
    specials = np.array([np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, 1e-45, -1e-45, 3e-5, 0.5, -0.5, 2.0, -2.0],
                        np.float32)
    for absmax in (np.float32(1.0), np.float32(0.0)):
        inv = np.float32(inverse(absmax))
        assert inv == np.float32(states.inverse_scale(np.float32(absmax)))
        for compiled, signed in ((q_signed, True), (q_unsigned, False)):
            reference = states._bound("quantize_signed" if signed else "quantize_unsigned", specials)(specials, inv)
            assert [int(compiled(x, inv)) for x in specials] == reference.tolist()
    top = states.quantize_signed(np.float32([np.inf, -np.inf, np.nan]), np.float32(1.0)).tolist()
    assert top == [120, -120, 0]
    assert states.quantize_unsigned(np.float32([np.inf, -np.inf, np.nan]), np.float32(1.0)).tolist() == [248, 0, 0]


@pytest.mark.parametrize("fused", [False, None])
def test_sgd_momentum_of_a_parameter_that_starts_later_matches_torch(fused):
    """Parameter 1 has no gradient at step 1, so at step 2 only its momentum buffer is new: b = g for it alone.
    (Found by the fuzz suite: a state dict without one parameter's momentum buffer gives the same situation.)"""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(257, generator=gen), torch.randn(3, generator=gen)]
    grads = [[torch.randn(257, generator=gen), None], [torch.randn(257, generator=gen), torch.randn(3, generator=gen)]]
    ours, theirs = ([torch.nn.Parameter(x.clone()) for x in init] for _ in range(2))
    opt = akt.SGD(ours, lr=0.05, momentum=0.9, fused=fused)
    ref = torch.optim.SGD(theirs, lr=0.05, momentum=0.9)
    for gs in grads:
        for p, q, g in zip(ours, theirs, gs):
            p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)


def test_drift_check_measures_low_precision_against_float32():
    import doctest

    from adamkit import drift
    assert doctest.testmod(drift).failed == 0
    row = drift.run("Adam", "ill", "int8", steps=30, size=4096, every=10)
    assert row["finite"] and 0 < row["drift"] < 0.05 and row["steps"] == 30


LERP_CASES = [("Adam", dict(betas=(0.5, 0.9)), "exp_avg"), ("Adam", dict(betas=(0.9, 0.99)), "exp_avg"),
              ("Adamax", dict(betas=(0.3, 0.8)), "exp_avg"), ("NAdam", dict(betas=(0.4, 0.9)), "exp_avg"),
              ("RAdam", dict(betas=(0.5, 0.9)), "exp_avg"), ("RMSprop", dict(centered=True, alpha=0.4), "grad_avg")]


def _poked_run(make, params, grads, key, poke):
    """Step, set element 0 of state ``key`` to ``poke``, step again (``make(params)``: an optimizer)."""
    opt = make(params)
    for t, g in enumerate(grads):
        if isinstance(opt, akn.Optimizer):
            opt.step([g.numpy().copy()])
            if t == 0:
                opt.state[0][key][0] = poke
        else:
            params[0].grad = g.clone()
            opt.step()
            if t == 0:
                opt.state[params[0]][key][0] = poke
    return opt


@pytest.mark.parametrize("engine", ["numpy", "reference", "compiled"])
@pytest.mark.parametrize("poke", [float("inf"), -float("inf")])
@pytest.mark.parametrize("name, options, key", LERP_CASES)
def test_moving_averages_of_an_infinite_state_follow_torch_lerp(name, options, key, poke, engine):
    """Found by the fuzz suite: torch.optim's ``lerp_`` computes ``g − (g − m)·(1 − w)`` for a weight ``w ≥ ½``
    (β1 ≤ ½), which keeps an infinite moment infinite; ``m + w·(g − m)`` gave inf − inf = NaN. Every engine
    gives torch's NaN pattern, the same states and, where finite, the same parameters."""
    gen = torch.Generator().manual_seed(0)
    init, grads = torch.randn(5, generator=gen), [torch.randn(5, generator=gen) for _ in range(2)]
    ref = [torch.nn.Parameter(init.clone())]
    torch_opt = _poked_run(lambda ps: getattr(torch.optim, name)(ps, lr=0.01, **options), ref, grads, key, poke)
    if engine == "numpy":
        w = init.numpy().copy()
        opt = _poked_run(lambda ps: getattr(akn, name)(ps, lr=0.01, check_finite=False, **options), [w], grads,
                         key, poke)
        ours, state = torch.from_numpy(w), torch.from_numpy(opt.state[0][key])
    else:
        p = [torch.nn.Parameter(init.clone())]
        fused = None if engine == "compiled" else False
        opt = _poked_run(lambda ps: getattr(akt, name)(ps, lr=0.01, fused=fused, check_finite=False, **options), p,
                         grads, key, poke)
        ours, state = p[0].detach(), opt.state[p[0]][key]
    theirs, their_state = ref[0].detach(), torch_opt.state[ref[0]][key]
    assert torch.equal(state.isnan(), their_state.isnan()) and torch.equal(ours.isnan(), theirs.isnan())
    assert torch.allclose(state, their_state, rtol=1e-6, atol=0, equal_nan=True)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("w", [0.1, 0.4999, 0.5, 0.7, 1.0])
def test_lerp_primitive_is_torch_lerp_in_every_engine(w):
    """Both of torch.lerp's forms, chosen by the weight, with infinite and finite starts, in float32 (the compiled
    primitive called through numba, the NumPy one on arrays): the same infinities and NaNs, finite values within
    one rounding of the inputs' scale (torch's vector loop fuses the multiply-add, NumPy does not)."""
    import numba

    a = torch.tensor([float("inf"), -float("inf"), 1.5, -3.25, 1e38, 0.0])
    b = torch.tensor([2.0, 2.0, -0.75, 7.0, -1e38, float("inf")])
    expected = torch.lerp(a, b, w)
    numpy_result = rules.lerp(a.numpy(), b.numpy(), w)
    scalar = numba.njit(rules.SCALAR_OPS["lerp"])
    compiled = [scalar(np.float32(x), np.float32(y), np.float32(w)) for x, y in zip(a.numpy(), b.numpy())]
    assert numpy_result.dtype == np.float32
    assert {s.return_type for s in scalar.nopython_signatures} == {numba.float32}  # float32 math, not widened
    finite = expected.isfinite()
    scale = torch.maximum(a.abs(), b.abs())[finite]  # one float32 rounding more or less (an FMA or not)
    for got in (torch.from_numpy(numpy_result), torch.tensor(compiled), rules.lerp(a, b, w)):
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got[expected.isinf()],
                                                                          expected[expected.isinf()])
        assert ((got[finite] - expected[finite]).abs() <= 2 ** -23 * scale).all(), (got, expected)


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_an_option_the_class_lacks_is_ignored_as_torch_does(name):
    """Found by the fuzz suite: torch.optim.SGD and Adagrad have no ``capturable``; a checkpoint's
    ``capturable=True`` made adamkit refuse every CPU step with torch's capturable error. torch.optim ignores it."""
    ours, theirs = torch.nn.Parameter(torch.ones(300)), torch.nn.Parameter(torch.ones(300))
    opt, ref = getattr(akt, name)([ours], lr=0.1), getattr(torch.optim, name)([theirs], lr=0.1)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["capturable"] = True
    opt.load_state_dict(saved)
    ref.load_state_dict(copy.deepcopy(saved))
    for o, q in ((opt, ours), (ref, theirs)):
        q.grad = torch.linspace(-1, 1, 300)
        o.step()
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("key, value", [("fused", [0.9, 0.999]), ("fused", float("nan")), ("foreach", "x"),
                                        ("capturable", None), ("differentiable", 1)])
def test_an_engine_option_set_in_a_group_later_is_checked_before_the_step(key, value):
    """An engine option written into a group after construction is validated like the constructor's, before
    anything changes (it was read by truth value: a list or nan meant True)."""
    p = torch.nn.Parameter(torch.ones(300))
    opt = akt.Adam([p], lr=0.1)
    p.grad = torch.ones(300)
    opt.step()
    before, state = p.detach().clone(), copy.deepcopy(opt.state_dict())
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        opt.step()
    assert torch.equal(p, before) and torch.equal(opt.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_centered_rmsprop_state_below_its_mean_square_is_refused_for_low_precision(engine, precision):
    """torch's square_avg v below grad_avg² is no real state; kept as the variance v − ḡ² in bf16/int8 storage it
    would be clamped and lost, so the load refuses it and changes nothing (fp32 storage takes it, as torch)."""
    import numpy as np
    import adamkit.numpy as akn
    n = 5000
    saved = {"state": {0: {"step": 3.0, "square_avg": np.full(n, 1.0, np.float32),
                           "grad_avg": np.full(n, 2.0, np.float32), "momentum_buffer": np.zeros(n, np.float32)}},
             "param_groups": [{"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0, "momentum": 0.5,
                               "centered": True, "maximize": False, "params": [0]}]}
    if engine == "torch":
        saved["state"][0] = {k: torch.as_tensor(v) for k, v in saved["state"][0].items()}
        p = torch.nn.Parameter(torch.zeros(n))
        opt = akt.RMSprop([p], lr=0.01, momentum=0.5, centered=True, state_precision=precision)
        plain = akt.RMSprop([torch.nn.Parameter(torch.zeros(n))], lr=0.01, momentum=0.5, centered=True)
    else:
        opt = akn.RMSprop([np.zeros(n, np.float32)], lr=0.01, momentum=0.5, centered=True, state_precision=precision)
        plain = akn.RMSprop([np.zeros(n, np.float32)], lr=0.01, momentum=0.5, centered=True)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="below 'grad_avg'"):
        opt.load_state_dict(saved)
    assert str(opt.state_dict()) == str(before)
    plain.load_state_dict(saved)  # full-precision states take it as torch.optim does


@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_centered_rmsprop_with_alpha_zero_is_refused_for_low_precision(engine, precision):
    """α = 0 makes the centered variance of one sample exactly 0: the stored-variance form divides by ε where
    torch.optim divides by the rounding error of g² − g·g (NaN where negative; with g² overflowing, 0 where the
    stored form gives 0 · inf = NaN). Refused wherever α can arrive: construction, a new group, a loaded group,
    and a group edited before the step, each before anything changes. Full-precision states take α = 0, as torch."""
    n, make = 5000, (lambda: torch.nn.Parameter(torch.ones(n))) if engine == "torch" else (lambda: np.ones(n, np.float32))
    cls = akt.RMSprop if engine == "torch" else akn.RMSprop
    with pytest.raises(ValueError, match="Invalid alpha value: 0.0 with centered=True"):
        cls([make()], alpha=0.0, centered=True, state_precision=precision)
    cls([make()], alpha=0.0, centered=True)  # torch.optim's behaviour with full-precision states
    cls([make()], alpha=0.0, state_precision=precision)  # not centered: no variance estimate
    p = make()
    opt = cls([p], alpha=0.5, centered=True, state_precision=precision)
    grads = [torch.full((n,), 0.25)] if engine == "torch" else [np.full(n, 0.25, np.float32)]
    if engine == "torch":
        p.grad = grads[0]
        opt.step()
    else:
        opt.step(grads)
    with pytest.raises(ValueError, match="Invalid alpha value"):
        opt.add_param_group({"params": [make()], "alpha": 0.0})
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["alpha"] = 0.0
    before, theta = copy.deepcopy(opt.state_dict()), (p.detach().clone() if engine == "torch" else p.copy())
    with pytest.raises(ValueError, match="group 0 of the state dict: Invalid alpha value"):
        opt.load_state_dict(saved)
    opt.param_groups[0]["alpha"] = 0.0
    with pytest.raises(ValueError, match="Invalid alpha value"):
        opt.step() if engine == "torch" else opt.step(grads)
    assert str(opt.state_dict()) == str({**before, "param_groups": [{**before["param_groups"][0], "alpha": 0.0}]})
    assert (torch.equal(p.detach(), theta) if engine == "torch" else np.array_equal(p, theta))
