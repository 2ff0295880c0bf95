"""Low-precision optimizer states: quantization properties, fused kernel vs reference, checkpoints, memory, quality."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import adamkit.torch as akt
from adamkit import states as S
from adamkit._quantized import QuantizedState
from conftest import stepped_once


def _check_nearest(x: np.ndarray, signed: bool) -> None:
    codes, absmax = S.quantize(x.astype(np.float32), signed)
    blocks = S._blocks(x.astype(np.float32).astype(np.float64))
    for b, row in enumerate(blocks):
        n = min(S.BLOCK, x.size - b * S.BLOCK)
        got = codes.reshape(-1)[b * S.BLOCK: b * S.BLOCK + n].astype(np.int64)
        values = np.nan_to_num(S.code_values(signed) * absmax[b], nan=np.inf)  # unused codes: never nearest
        offset = 127 if signed else 0
        dist_got = np.abs(row[:n] - values[got + offset])
        dist_best = np.abs(row[:n, None] - values[None, :]).min(axis=1)
        never_zero = (~np.asarray(signed)) & (row[:n] > 0) & (got == 1)  # positive v is never stored as 0
        # the chosen code is the nearest one, up to float32 rounding of the companded value at exact ties
        assert np.all((dist_got <= dist_best + 1e-6 * absmax[b]) | never_zero)


floats = st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False, width=64).map(lambda v: float(np.float32(v)))


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float64, st.integers(1, 1100), elements=floats))
def test_signed_quantization_picks_the_nearest_code(x):
    _check_nearest(x, True)


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float64, st.integers(1, 1100), elements=st.floats(0, 1e30, width=64).map(lambda v: float(np.float32(v)))))
def test_unsigned_quantization_picks_the_nearest_code_and_never_zero(x):
    _check_nearest(x, False)
    codes, _ = S.quantize(x.astype(np.float32), False)
    assert np.all(codes[x.astype(np.float32) > 0] > 0)


@pytest.mark.parametrize("signed", [True, False])
def test_edge_cases_zeros_outliers_denormals_ragged_blocks(signed):
    n = 3 * S.BLOCK + 17  # not a multiple of the block size
    x = np.zeros(n, dtype=np.float32)
    codes, absmax = S.quantize(x, signed)
    assert np.all(codes == 0) and np.all(absmax == 0) and np.all(S.dequantize(codes, absmax, signed, np.float32) == 0)
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal(n)).astype(np.float32) * (1 if not signed else rng.choice([-1, 1], n))
    x[5] = 1e30  # a huge outlier takes its own block's scale, not the others'
    x[S.BLOCK + 3] = 1e-42  # a denormal
    codes, absmax = S.quantize(x.astype(np.float32), signed)
    back = S.dequantize(codes, absmax, signed, np.float64)
    assert absmax[0] == np.float32(1e30) and abs(back[5] - 1e30) <= 1e-6 * 1e30
    for b in range(1, S.n_blocks(n)):  # other blocks keep their precision: half a code step of the top binade
        sl = slice(b * S.BLOCK, min(n, (b + 1) * S.BLOCK))
        assert np.max(np.abs(back[sl] - x[sl])) <= 0.0313 * absmax[b]
    if not signed:
        assert codes[S.BLOCK + 3] == 1  # a tiny positive value is kept non-zero


def test_round_trip_keeps_every_code():
    rng = np.random.default_rng(1)
    for signed in (True, False):
        x = rng.standard_normal(5000).astype(np.float32)
        x = x if signed else x * x
        codes, absmax = S.quantize(x, signed)
        again = S.quantize(S.dequantize(codes, absmax, signed, np.float32), signed)
        # same codes; the scales move by at most an ulp (the top code's value is 1 up to float32 rounding)
        assert np.array_equal(again[0], codes) and np.allclose(again[1], absmax, rtol=1e-6, atol=0)
        t_codes, t_absmax = S.quantize(torch.from_numpy(x), signed)  # the torch form is the same function
        assert (t_codes.numpy() == codes).mean() > 0.999 and np.allclose(t_absmax.numpy(), absmax)


def _pair(precision, name="AdamW", n=20000, steps=5, **cfg):
    torch.manual_seed(0)
    start = torch.randn(n)
    fast = torch.nn.Parameter(start.clone())
    ref = torch.nn.Parameter(start.clone())
    o_fast = akt.OPTIMIZERS[name]([fast], lr=1e-2, state_precision=precision, **cfg)
    o_ref = akt.OPTIMIZERS[name]([ref], lr=1e-2, state_precision=precision, fused=False, **cfg)
    return fast, ref, o_fast, o_ref


@pytest.mark.parametrize("name,cfg", [("AdamW", {}), ("Adam", {"amsgrad": True}), ("RMSprop", {"centered": True,
                                      "momentum": 0.9}), ("Adagrad", {}), ("SGD", {"momentum": 0.9}),
                                      ("NAdam", {}), ("RAdam", {}), ("Adamax", {})])
def test_fused_int8_kernel_equals_the_slow_reference_of_the_same_algorithm(name, cfg):
    fast, ref, o_fast, o_ref = _pair("int8", name, **cfg)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        g = torch.randn(fast.shape, generator=gen)
        fast.grad, ref.grad = g.clone(), g.clone()
        o_fast.step()
        o_ref.load_state_dict(copy.deepcopy(o_fast.state_dict()))  # same quantized state before each step
        ref.data.copy_(fast.data)
        fast_before = fast.detach().clone()
        o_fast.step()
        o_ref.step()
        stored = o_fast.state_dict()["state"][0]  # 8-bit states as their codes and scales
        for k, v in o_ref.state_dict()["state"][0].items():
            w = stored[k]
            assert v.dtype == w.dtype, k
            if v.dtype in (torch.int8, torch.uint8):
                diff = (v.to(torch.int16) - w.to(torch.int16)).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, k  # ties under float32 rounding
            elif k != "step":
                assert torch.allclose(v, w, rtol=1e-5, atol=0), k
        update = (fast.detach() - fast_before).abs().max()
        assert (fast.detach() - ref.detach()).abs().max() <= 1e-3 * update + 1e-7


@pytest.mark.parametrize("precision,limit", [("int8", 2.1), ("bf16", 4.1), (None, 8.0)])
def test_state_memory_per_parameter(precision, limit):
    p = torch.nn.Parameter(torch.randn(1_000_000))
    small = torch.nn.Parameter(torch.randn(100))  # under 4096 elements: stays in full precision
    opt = akt.AdamW([p, small], state_precision=precision)
    p.grad, small.grad = torch.randn_like(p), torch.randn_like(small)
    opt.step()
    held = opt.state_dict()["state"][0]  # the tensors opt.state holds: an 8-bit state's codes and scales
    nbytes = sum(v.numel() * v.element_size() for k, v in held.items() if k != "step")
    assert nbytes / p.numel() <= limit
    if precision == "int8":
        assert all(type(opt.state[p][k]) is QuantizedState and opt.state[p][k].codes is held[k]
                   and opt.state[p][k].absmax is held[f"{k}.absmax"] for k in ("exp_avg", "exp_avg_sq"))
    assert all(v.dtype == torch.float32 for k, v in opt.state[small].items())


def test_checkpoints_int8_native_and_torch_format_both_ways():
    torch.manual_seed(0)
    p0 = torch.randn(10000)
    a = torch.nn.Parameter(p0.clone())
    torch_opt = torch.optim.AdamW([a], lr=1e-2)
    for _ in range(3):
        a.grad = torch.randn_like(a)
        torch_opt.step()
    # a torch.optim.AdamW checkpoint into an int8 AdamW
    b = torch.nn.Parameter(a.detach().clone())
    q = akt.AdamW([b], lr=1e-2, state_precision="int8")
    q.load_state_dict(torch_opt.state_dict())
    assert q.state[b]["exp_avg"].codes.dtype == torch.int8 and "exp_avg_sq.absmax" in q.state_dict()["state"][0]
    exported = q.torch_state_dict()
    for k in ("exp_avg", "exp_avg_sq"):
        exact = torch_opt.state[a][k]
        assert (exported["state"][0][k] - exact).abs().max() <= 0.0313 * exact.abs().max()
    # native int8 checkpoint survives torch.save / weights_only load and continues identically
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    native = torch.load(buf, weights_only=True)
    c = torch.nn.Parameter(b.detach().clone())
    q2 = akt.AdamW([c], lr=1e-2, state_precision="int8")
    q2.load_state_dict(native)
    g = torch.randn_like(b)
    b.grad, c.grad = g.clone(), g.clone()
    q.step()
    q2.step()
    assert torch.equal(b, c) and torch.equal(q.state[b]["exp_avg"].codes, q2.state[c]["exp_avg"].codes)
    # the export loads into torch.optim
    t2 = torch.optim.AdamW([torch.nn.Parameter(b.detach().clone())], lr=1e-2)
    t2.load_state_dict(q.torch_state_dict())
    # an int8 checkpoint into a full-precision adamkit optimizer dequantizes
    full = akt.AdamW([torch.nn.Parameter(b.detach().clone())], lr=1e-2)
    full.load_state_dict(q.state_dict())
    st = next(iter(full.state.values()))
    assert st["exp_avg"].dtype == torch.float32 and "exp_avg.absmax" not in st


def test_nonfinite_gradients_never_reach_quantized_blocks():
    p, opt = stepped_once(akt.Adam, 8192, state_precision="int8", check_finite=True)
    before = copy.deepcopy(opt.state_dict())
    p.grad[100] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], before["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="state_precision"):
        akt.Adam([p], state_precision="fp8")


BAD_BLOCKS = (1, 5)  # of 40 blocks (10,000 elements: the last block is ragged)


def _poisoned(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    g.view(-1)[256 * BAD_BLOCKS[0] + 7] = float("nan")
    g.view(-1)[256 * BAD_BLOCKS[1] + 255] = float("-inf")
    return g


# float16 on the kernels only: fused=False steps float16 parameters with float16 torch ops, as torch.optim's
# for-loop does, where eps=1e-8 underflows to 0, so a second moment dequantized to 0 gives a non-finite step
# in the clean run too
@pytest.mark.parametrize("fused,dtype", [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16),
                                         (False, torch.bfloat16), (True, torch.float16)])
def test_without_check_finite_int8_skips_exactly_the_nonfinite_blocks(fused, dtype):
    """check_finite=False with int8 states: a block of 256 whose gradient holds inf/nan keeps its params, codes
    and absmax; every other block gets exactly the step it would get with a finite gradient there."""
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(100, 100, generator=gen).to(dtype)
    grads = [torch.randn(100, 100, generator=gen).to(dtype) for _ in range(3)]
    ps = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    opts = [akt.AdamW([p], lr=1e-2, state_precision="int8", check_finite=False, fused=fused) for p in ps]
    for g in grads[:2]:  # two clean steps
        for p, opt in zip(ps, opts):
            p.grad = g.clone()
            opt.step()
    before = {k: v.clone() for k, v in opts[0].state_dict()["state"][0].items()}  # codes and scales
    before_param = ps[0].detach().clone()
    ps[0].grad = _poisoned(grads[2])
    ps[1].grad = grads[2].clone()
    with pytest.warns(RuntimeWarning, match="2 block"):
        opts[0].step()
    opts[1].step()
    bad = torch.zeros(40, dtype=torch.bool)
    bad[list(BAD_BLOCKS)] = True
    elements = bad.repeat_interleave(256)[:10000].view(100, 100)
    state, clean = opts[0].state_dict()["state"][0], opts[1].state_dict()["state"][0]
    assert torch.equal(ps[0].detach()[elements], before_param[elements])
    assert torch.equal(ps[0].detach()[~elements], ps[1].detach()[~elements])
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[k][elements], before[k][elements])
        assert torch.equal(state[k][~elements], clean[k][~elements])
        assert torch.equal(state[f"{k}.absmax"][bad], before[f"{k}.absmax"][bad])
        assert torch.equal(state[f"{k}.absmax"][~bad], clean[f"{k}.absmax"][~bad])
    assert torch.isfinite(ps[0].detach().float()).all()


def test_without_check_finite_numpy_int8_skips_the_nonfinite_blocks():
    import adamkit.numpy as anp
    rng = np.random.default_rng(0)
    start, g = rng.standard_normal(10000), rng.standard_normal(10000)
    bad_g = _poisoned(torch.from_numpy(g)).numpy()
    a, b = start.copy(), start.copy()
    oa = anp.Adam([a], lr=1e-2, state_precision="int8", check_finite=False)
    ob = anp.Adam([b], lr=1e-2, state_precision="int8", check_finite=False)
    oa.step([g]), ob.step([g])
    before, before_a = {k: np.copy(v) for k, v in oa.state[0].items()}, a.copy()
    with pytest.warns(RuntimeWarning, match="2 block"):
        oa.step([bad_g])
    ob.step([g])
    bad = np.zeros(40, dtype=bool)
    bad[list(BAD_BLOCKS)] = True
    elements = np.repeat(bad, 256)[:10000]
    np.testing.assert_array_equal(a[elements], before_a[elements])
    np.testing.assert_array_equal(a[~elements], b[~elements])
    for k in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(oa.state[0][k][elements], before[k][elements])
        np.testing.assert_array_equal(oa.state[0][k][~elements], ob.state[0][k][~elements])
        np.testing.assert_array_equal(oa.state[0][f"{k}.absmax"][bad], before[f"{k}.absmax"][bad])


def test_quality_on_digits_int8_and_bf16_match_fp32():
    """A small MLP on scikit-learn's digits: final loss within 2 % and accuracy within 0.5 point of fp32."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    results = {}
    for precision in (None, "bf16", "int8"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        opt = akt.AdamW(model.parameters(), lr=1e-3, state_precision=precision)
        gen = torch.Generator().manual_seed(1)
        for epoch in range(15):
            order = train[torch.randperm(len(train), generator=gen)]
            for i in range(0, len(order), 32):
                idx = order[i:i + 32]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        with torch.no_grad():
            loss = float(torch.nn.functional.cross_entropy(model(x[train]), y[train]))
            acc = float((model(x[test]).argmax(1) == y[test]).float().mean())
        results[precision] = (loss, acc)
        if precision == "int8":
            assert opt.state[model[0].weight]["exp_avg"].codes.dtype == torch.int8  # 64*256 ≥ 4096: quantized
    base_loss, base_acc = results[None]
    print("digits MLP (train loss, test accuracy):", results)
    for precision in ("bf16", "int8"):
        loss, acc = results[precision]
        assert abs(loss - base_loss) <= 0.02 * base_loss, (precision, results)
        assert acc >= base_acc - 0.005, (precision, results)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_numpy_engine_low_precision_states_fit_least_squares_and_checkpoint(precision):
    import adamkit.numpy as akn
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6000))
    y = X @ (0.1 * rng.normal(size=6000))
    losses = {}
    for prec in (None, precision):
        w = np.zeros(6000)
        opt = akn.Adam([w], lr=1e-2, state_precision=prec)
        for _ in range(200):
            opt.step([X.T @ (X @ w - y) / len(y)])
        losses[prec] = float(np.mean((X @ w - y) ** 2))
    assert losses[precision] <= 2 * losses[None] + 1e-9, losses
    sd = opt.state_dict()
    stored = sd["state"][0]["exp_avg"]
    assert stored.dtype == (np.int8 if precision == "int8" else np.uint16)
    w2 = w.copy()
    opt2 = akn.Adam([w2], lr=1e-2, state_precision=precision)
    opt2.load_state_dict(sd)
    g = X.T @ (X @ w - y) / len(y)
    if precision == "int8":  # deterministic rounding: the resumed run is identical
        opt.step([g])
        opt2.step([g])
        assert np.array_equal(w, w2)
    full = akn.Adam([w.copy()], lr=1e-2)
    full.load_state_dict(sd)  # low precision into full precision dequantizes
    assert full.state_dict()["state"][0]["exp_avg"].dtype == np.float64


def test_quality_autoencoder_on_digits_int8_and_bf16_match_fp32():
    """A small autoencoder (64→128→16→128→64) on the digits images: final reconstruction loss within 2 % of fp32."""
    from sklearn.datasets import load_digits
    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    losses = {}
    for precision in (None, "bf16", "int8"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16),
                                    torch.nn.ReLU(), torch.nn.Linear(16, 128), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 64))
        opt = akt.Adam(model.parameters(), lr=2e-3, state_precision=precision)
        gen = torch.Generator().manual_seed(1)
        for epoch in range(20):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(order), 64):
                batch = x[order[i:i + 64]]
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(batch), batch).backward()
                opt.step()
        with torch.no_grad():
            losses[precision] = float(torch.nn.functional.mse_loss(model(x), x))
        if precision == "int8":
            assert opt.state[model[0].weight]["exp_avg_sq"].codes.dtype == torch.uint8
    print("digits autoencoder MSE:", losses)
    for precision in ("bf16", "int8"):
        assert abs(losses[precision] - losses[None]) <= 0.02 * losses[None], losses


@pytest.mark.parametrize("fused", [None, False], ids=["kernel", "reference"])
def test_bf16_states_round_stochastically_so_small_decays_survive(fused):
    """v ← β2·v with β2 = 0.999 changes v by 0.1 %, below half a bf16 ulp: nearest rounding would freeze v."""
    p = torch.nn.Parameter(torch.zeros(8192))
    opt = akt.Adam([p], lr=1e-3, state_precision="bf16", fused=fused)
    p.grad = torch.ones_like(p)
    opt.step()  # v = (1 - β2) · 1 = 1e-3
    for _ in range(200):
        p.grad = torch.zeros_like(p)
        opt.step()
    v = opt.state[p]["exp_avg_sq"].float().mean().item()
    expected = 1e-3 * 0.999 ** 200  # 8.19e-4; nearest rounding would leave 1e-3
    assert opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    assert abs(v - expected) < 0.01 * expected, (v, expected)


def test_numpy_engine_refuses_corrupt_int8_checkpoints_and_reads_torch_bf16_ones():
    import adamkit.numpy as akn
    rng = np.random.default_rng(0)
    w = rng.normal(size=10000).astype(np.float32)
    opt = akn.AdamW([w], state_precision="int8")
    opt.step([rng.normal(size=10000).astype(np.float32)])
    good = opt.state_dict()
    cases = [
        (lambda st: st["exp_avg.absmax"].__setitem__(2, np.nan), "'exp_avg.absmax' must be finite"),
        (lambda st: st.__setitem__("exp_avg", st["exp_avg"].astype(np.float32)), "must hold int8 codes"),
        (lambda st: st["exp_avg_sq"].__setitem__(0, 250), "outside its map"),
        (lambda st: st.pop("exp_avg_sq.absmax"), "no 'exp_avg_sq.absmax'"),
    ]
    for edit, match in cases:
        sd = copy.deepcopy(good)
        edit(sd["state"][0])
        target = akn.AdamW([w.copy()], state_precision="int8")
        fresh = target.state_dict()
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(sd)
        assert target.state_dict() == fresh  # nothing half-loaded
    with pytest.raises(ValueError, match="per optimizer"):
        akn.AdamW([{"params": [w], "state_precision": "int8"}])
    # a torch engine checkpoint with bfloat16 states (NumPy has no bfloat16) loads into the NumPy engine exactly
    p = torch.nn.Parameter(torch.randn(8192))
    torch_opt = akt.AdamW([p], state_precision="bf16")
    p.grad = torch.randn_like(p)
    torch_opt.step()
    numpy_opt = akn.AdamW([p.detach().numpy().copy()])
    numpy_opt.load_state_dict(torch_opt.state_dict())
    assert np.array_equal(numpy_opt.state_dict()["state"][0]["exp_avg"],
                          torch_opt.state[p]["exp_avg"].float().numpy())
