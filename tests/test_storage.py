"""adamkit.storage: one format decision, one store/load, and one stochastic rounding that gives the same bits on
the NumPy engine, the torch reference path and the compiled kernels."""

import copy

import numba
import numpy as np
import pytest
import torch

import adamkit.numpy as akn
import adamkit.torch as akt
from adamkit import storage
from adamkit._torch_states import OPS as TORCH_OPS
from adamkit.kernels import random32

N = 6000  # above states.MIN_QUANTIZED, so that bf16 states are bf16; not a multiple of the kernels' chunk
STATEFUL = ["Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SGD"]
OPTIONS = {"RMSprop": {"centered": True, "momentum": 0.9}, "SGD": {"momentum": 0.9}, "Adam": {"amsgrad": True}}


@numba.njit
def _kernel_hash(key, n):
    out = np.empty(n, dtype=np.uint32)
    for i in range(n):
        out[i] = random32(key, 0, i)
    return out


@pytest.mark.parametrize("key", [0, 1, 0xDEADBEEF, 0xFFFFFFFF])
def test_random32_is_one_function_on_every_engine(key):
    index = np.arange(100_000, dtype=np.int64)
    on_numpy = storage.random32(key, index)
    on_torch = storage.random32(key, torch.from_numpy(index)).numpy()
    compiled = _kernel_hash(np.uint32(key), index.size).astype(np.int64)
    assert np.array_equal(on_numpy, compiled) and np.array_equal(on_torch, compiled)
    assert 0 <= on_numpy.min() and on_numpy.max() < 2 ** 32
    # a bijection of the index: no repeats; and each half-word is uniform (every 16-bit value 0..65535 equally
    # likely: 100,000 draws into 16 buckets of 4096 values, each within 5 standard deviations of 6,250)
    assert np.unique(on_numpy).size == index.size
    for half in (on_numpy & 0xFFFF, on_numpy >> 16):
        counts = np.bincount(half >> 12, minlength=16)
        assert np.abs(counts - 6250).max() < 5 * np.sqrt(6250)


def test_nearest_rounding_is_torchs():
    x = torch.cat([torch.randn(10_000) * 10.0 ** torch.randint(-40, 38, (10_000,)),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45, 2.0 ** -130])])
    for ops, values in ((storage.NUMPY, x.numpy()), (TORCH_OPS, x)):
        bits = np.asarray(storage.bf16_bits(ops, values, None))
        assert np.array_equal(bits, x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    nan = torch.tensor([float("nan"), -float("nan")])
    assert storage.bf16_bits(TORCH_OPS, nan, None).tolist() == [0x7FC0, 0x7FC0]


def test_stochastic_rounding_is_unbiased_and_brackets_the_value():
    x = torch.full((200_000,), 1.0 + 2.0 ** -10)  # 1/128 of the way from 1 to the next bfloat16, 1 + 2^-7
    noise = storage.noise(TORCH_OPS, storage.stream_keys(7, [0])[0], 0, x)
    rounded = TORCH_OPS.from_bf16_bits(storage.bf16_bits(TORCH_OPS, x, noise), x).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    # mean within 5 standard errors of the value (each draw is a Bernoulli(1/8) step of 2^-7)
    sigma = 2.0 ** -7 * np.sqrt(0.125 * 0.875 / x.numel())
    assert abs(rounded.double().mean().item() - (1.0 + 2.0 ** -10)) < 5 * sigma


def _steps(make, params, grads_per_step):
    opt = make(params)
    opt.param_groups[0][storage.ROUNDING] = [12345, 0]
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return opt


def _bits(opt, params):
    return [{k: v.view(torch.int16).clone() for k, v in opt.state[p].items() if v.dtype == torch.bfloat16}
            for p in params]



def _assert_same_bits(a, b, exact, what):
    """bfloat16 bits (int16 views) equal; or, where the float32 values rounded may differ by an ulp of round-off
    (not ``exact``), equal except for rare elements one bfloat16 ulp apart (a rounding boundary between the two
    float32 values: about 2^-16 of the elements per ulp of difference)."""
    differ = a != b
    if exact:
        assert not differ.any(), f"{what}: {differ.sum()} of {a.numel()} differ"
    else:
        assert (a.int() - b.int()).abs().max() <= 1 and differ.sum() <= a.numel() // 1000, what


def _well_conditioned(p: torch.Tensor, before: dict, after: dict, momentum: float) -> torch.Tensor:
    """Elements whose step amplifies round-off by at most 2^6: all, except for centered RMSprop with momentum
    where the variance v − grad_avg² cancelled more than 6 of v's bits, or the momentum buffer μ·b + g/√(…)
    more than 6 of μ·b's (there an ulp of float32 round-off moves the buffer and the parameter by more than a
    bfloat16 ulp)."""
    if "grad_avg" not in after:
        return torch.ones(p.shape, dtype=torch.bool)
    v, g_avg = after["square_avg"].double(), after["grad_avg"].double()
    well = v - g_avg * g_avg >= v * 2.0 ** -6
    if "momentum_buffer" in before:
        well &= after["momentum_buffer"].double().abs() >= momentum * before["momentum_buffer"].double().abs() / 64
    return well


@pytest.mark.parametrize("name", STATEFUL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bf16_states_have_the_same_bits_on_the_reference_and_compiled_paths(name, dtype):
    """Same seed, same gradients, same starting params and states: each step's bf16 states bit for bit (float32
    math within an ulp: the same bits but where its round-off crosses a rounding boundary) and params at
    round-off, over several steps and tensors. Before each step the compiled path is given the reference path's
    params and state dict, so that a rare one-ulp difference does not carry into the next step."""
    torch.manual_seed(0)
    start = [torch.randn(N, dtype=dtype), torch.randn(64, 80, dtype=dtype), torch.randn(10, dtype=dtype)]
    params = {fused: [torch.nn.Parameter(p.clone()) for p in start] for fused in (False, None)}
    opts = {fused: _steps(lambda ps: getattr(akt, name)(ps, lr=1e-3, state_precision="bf16", fused=fused,
                                                        **OPTIONS.get(name, {})), params[fused], [])
            for fused in (False, None)}
    for _ in range(3):
        grads = [torch.randn_like(p) for p in start]
        before = [{k: v.clone() for k, v in opts[False].state[p].items()} for p in params[False]]
        for fused, opt in opts.items():
            for p, g in zip(params[fused], grads):
                p.grad = g.clone()
            opt.step()
        reference, compiled = (_bits(opts[f], params[f]) for f in (False, None))
        assert any(reference), "no bf16 state to compare"
        for p, q, a, b, pre in zip(params[False], params[None], reference, compiled, before):
            well = _well_conditioned(p, pre, opts[False].state[p], OPTIONS.get(name, {}).get("momentum", 0.0))
            assert a.keys() == b.keys() and well.float().mean() > 0.9  # the mask hides few
            for k in a:
                _assert_same_bits(a[k][well], b[k][well], dtype == torch.float64, f"{name} {k}")
            torch.testing.assert_close(p[well], q[well], rtol=1e-5, atol=1e-6)  # float math, at round-off
        with torch.no_grad():
            for p, q in zip(params[False], params[None]):
                q.copy_(p)
        opts[None].load_state_dict(copy.deepcopy(opts[False].state_dict()))


@pytest.mark.parametrize("name", ["Adam", "RMSprop", "Adagrad"])
def test_numpy_engine_rounds_to_the_same_bits(name):
    """NumPy and torch compute the same sums and products; a moving average in lerp form (Adam's exp_avg) is one
    fused multiply-add in torch's vector loop and two roundings in NumPy, so it may differ by an ulp."""
    rng = np.random.default_rng(1)
    start = [rng.standard_normal(N).astype(np.float32), rng.standard_normal((70, 90)).astype(np.float32)]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in start] for _ in range(3)]
    arrays = [p.copy() for p in start]
    opt = getattr(akn, name)(arrays, lr=1e-3, state_precision="bf16", check_finite=False)
    opt.param_groups[0][storage.ROUNDING] = [12345, 0]
    for gs in grads:
        opt.step(gs)
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in start]
    ref = _steps(lambda ps: getattr(akt, name)(ps, lr=1e-3, state_precision="bf16", fused=False), params,
                 [[torch.from_numpy(g) for g in gs] for gs in grads[:-1]])
    before = [{k: v.double() for k, v in ref.state[p].items()} for p in params]
    for p, g in zip(params, grads[-1]):
        p.grad = torch.from_numpy(g)
    ref.step()
    for index, p in enumerate(params):
        for k, v in ref.state[p].items():
            if k != "step":
                mine = torch.from_numpy(opt.state[index][k].view(np.int16))
                assert opt.state[index][k].dtype == np.uint16
                # where the moving average cancelled more than 6 of β·m's bits, an ulp of float32 round-off is more
                # than a bfloat16 ulp of the result: compare the rest
                well = v.double().abs() >= 0.9 * before[index][k].abs() / 64 if k == "exp_avg" else mine == mine
                assert well.float().mean() > 0.99  # about 0.5 % of the elements cancel that much
                _assert_same_bits(mine[well], v.view(torch.int16)[well], k != "exp_avg", k)


def test_numpy_rounding_stream_resumes_exactly():
    rng = np.random.default_rng(2)
    grads = [[rng.standard_normal(N).astype(np.float32)] for _ in range(4)]
    w = np.ones(N, dtype=np.float32)
    np.random.seed(3)
    whole = akn.Adam([w], lr=1e-2, state_precision="bf16")
    for g in grads:
        whole.step(g)
    w2 = np.ones(N, dtype=np.float32)
    np.random.seed(3)
    first = akn.Adam([w2], lr=1e-2, state_precision="bf16")
    for g in grads[:2]:
        first.step(g)
    saved = first.state_dict()
    w3 = w2.copy()
    resumed = akn.Adam([w3], lr=1e-2, state_precision="bf16")
    resumed.load_state_dict(saved)
    for g in grads[2:]:
        resumed.step(g)
    assert np.array_equal(w3, w) and np.array_equal(resumed.state[0]["exp_avg"], whole.state[0]["exp_avg"])


@pytest.mark.parametrize("stream", [[1], "ab", [1.5, 0], [-1, 0], [True, 0], [0, 2 ** 64]])
def test_a_corrupt_rounding_stream_is_refused(stream):
    w = np.ones(10)
    opt = akn.Adam([w])
    opt.step([np.ones(10)])
    saved = opt.state_dict()
    saved["param_groups"][0][storage.ROUNDING] = stream
    before = opt.state_dict()
    with pytest.raises(ValueError, match="stochastic_rounding_stream"):
        opt.load_state_dict(saved)
    assert opt.state_dict()["param_groups"] == before["param_groups"]


@pytest.mark.parametrize("precision, numel, dtype, expected", [
    (None, 10 ** 6, "float32", "plain"), ("bf16", 4095, "float32", "plain"), ("bf16", 4096, "float32", "bf16"),
    ("bf16", 10 ** 6, "float64", "bf16"), ("bf16", 10 ** 6, "bfloat16", "plain"), ("bf16", 10 ** 6, "float16", "plain"),
    ("int8", 10 ** 6, "float32", "int8"), ("int8", 10 ** 6, "bfloat16", "int8"), ("int8", 10 ** 6, "complex64", "plain"),
    ("int8", 100, "float32", "plain")])
def test_format_decision(precision, numel, dtype, expected):
    assert storage.format_for(precision, numel, dtype) == expected
