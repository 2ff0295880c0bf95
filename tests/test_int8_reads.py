"""What code reads from ``opt.state[p]`` with ``state_precision="int8"``: the values (a QuantizedState over the
8-bit codes and their block scales), never the codes. What a logger, an EMA tool or a checkpoint does with them
gives true numbers; what code writes into them reaches the next step; ``state_dict()`` keeps its format.

Tolerances come from the 8-bit format (:mod:`adamkit.states`): codes have 3 fraction bits, so two neighbouring
codes differ by at most 1/8 of the smaller one, and a stored value is within |x|/16 of the value x it stores; below
the smallest nonzero code s·absmax (s = 3.4e-5 signed, 5.2e-10 unsigned), within s·absmax (a positive second
moment takes the smallest code rather than 0). :func:`_code_step` is that bound, plus float32 round-off.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

import adamkit.torch as akt
from adamkit import states
from adamkit._quantized import QuantizedState

SHAPES = ((64, 80), (5000,), (100,))  # 20 blocks of 256; a ragged last block; under 4096 elements: float32 states
KEYS = ("exp_avg", "exp_avg_sq")
PATHS = pytest.mark.parametrize("fused", [None, False], ids=["compiled", "reference"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                                 ids=["float32", "bfloat16", "float16"])


def _params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _set_grads(params: list[torch.Tensor], t: int) -> None:
    """Gradients that depend on the parameters (a quadratic's pull) plus noise, in the parameters' dtype."""
    gen = torch.Generator().manual_seed(100 + t)
    for p in params:
        p.grad = (0.5 * p.detach().float() + torch.randn(p.shape, generator=gen)).to(p.dtype)


def _train(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for t in steps:
        _set_grads(params, t)
        opt.step()


def _adamw(params: list[torch.Tensor], fused: bool | None, **kw) -> akt.AdamW:
    return akt.AdamW(params, lr=1e-2, weight_decay=0.1, state_precision="int8", fused=fused, **kw)


def _trained(dtype: torch.dtype, fused: bool | None, steps: int = 3,
             count: int | None = None) -> tuple[list[torch.nn.Parameter], akt.AdamW]:
    """The first ``count`` parameters (all: None) and their int8 AdamW after ``steps`` steps."""
    params = _params(dtype)[:count]
    opt = _adamw(params, fused)
    _train(opt, params, range(steps))
    return params, opt


def _stored_values(entry: dict, k: str) -> torch.Tensor:
    """The values a state dict's codes and scales stand for (the format's own definition)."""
    return states.dequantize(entry[k], entry[f"{k}.absmax"], k in states.SIGNED_STATES, torch.float32)


def _smallest_code(signed: bool) -> float:
    values = states.code_values(signed)
    return float(values[values > 0].min())


def _code_step(x: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """The most the 8-bit state storing ``x`` (block scales ``absmax``) may differ from it, element-wise: |x|/16,
    or the smallest code below it; plus float32 round-off of computing x (2^-20 of |x| and of the block)."""
    scale = absmax.repeat_interleave(states.BLOCK)[:x.numel()].reshape(x.shape)
    return x.abs() / 16 + _smallest_code(signed) * scale + 2.0 ** -20 * (x.abs() + scale)


# -- reading -------------------------------------------------------------------------------------------------------

@PATHS
@DTYPES
def test_a_logger_reads_the_values_not_the_codes(fused, dtype):
    params, opt = _trained(dtype, fused)
    sd = opt.state_dict()["state"]
    for i, p in enumerate(params[:2]):
        for k in KEYS:
            s, true = opt.state[p][k], _stored_values(sd[i], k)
            assert type(s) is QuantizedState and s.dtype == torch.float32 and s.shape == p.shape
            assert torch.equal(s, true) and torch.equal(s.codes, sd[i][k])  # the codes state_dict() saves
            assert float(s.float().norm()) == float(true.norm()) and float(s.mean()) == float(true.mean())
            assert float(s.abs().max()) == float(true.abs().max()) and s.max().item() == true.max().item()
            assert float(sd[i][k].float().norm()) > 100 * float(true.norm())  # what reading the codes gave
            assert repr(true) in repr(s) and str(s) == repr(s)  # printing shows the values
            assert np.array_equal(np.asarray(s), true.numpy()) and s.tolist() == true.tolist()
        logged = {k: v.float().norm().item() for k, v in opt.state[p].items()}  # a logger's loop over a state
        assert logged == {"step": 3.0, **{k: float(_stored_values(sd[i], k).norm()) for k in KEYS}}
    small = opt.state[params[2]]  # under 4096 elements: full precision, as torch.optim
    assert all(type(small[k]) is torch.Tensor and small[k].dtype == dtype for k in KEYS)


@PATHS
@DTYPES
def test_each_step_stores_torch_optims_update_of_the_values_read(fused, dtype):
    """Six steps; before each, torch.optim.AdamW (float32, on float32 copies) is given the parameters and the
    states read from ``opt.state``. Its new states must be what adamkit stores, within half a code step; its new
    parameters adamkit's, within rounding (16-bit: one unit in the last place of the parameter's dtype)."""
    params = _params(dtype)[:2]
    opt = _adamw(params, fused)
    mirror = [torch.nn.Parameter(p.detach().float()) for p in params]
    ref = torch.optim.AdamW(mirror, lr=1e-2, weight_decay=0.1)
    for t in range(6):
        _set_grads(params, t)
        for p, m in zip(params, mirror):
            m.grad = p.grad.float()
            if t:  # what a user reads from opt.state is what torch.optim continues from
                m.data.copy_(p.detach().float())
                for k in KEYS:
                    ref.state[m][k].copy_(opt.state[p][k])
        opt.step()
        ref.step()
        sd = opt.state_dict()["state"]
        for i, (p, m) in enumerate(zip(params, mirror)):
            expected = m.detach().to(dtype).float()
            ulp = torch.finfo(dtype).eps * expected.abs() if dtype != torch.float32 else 0.0
            # float32: the kernels and torch's foreach AdamW round θ − lr·(m̂/(√v̂ + ε) + λθ) each their own way
            float32_ulps = 4 * torch.finfo(torch.float32).eps * (m.detach().abs() + 1e-2)
            assert ((p.detach().float() - expected).abs() <= ulp + float32_ulps).all(), (t, i)
            for k in KEYS:
                bound = _code_step(ref.state[m][k], sd[i][f"{k}.absmax"], k in states.SIGNED_STATES)
                assert ((opt.state[p][k] - ref.state[m][k]).abs() <= bound).all(), (t, i, k)


@PATHS
def test_free_running_moments_stay_within_8bit_rounding_of_torch_optims(fused):
    """Adam's moments do not depend on the parameters: with the same gradients, adamkit's 8-bit m̂, v̂ and
    torch.optim's float32 m, v differ only by rounding to codes. Each rounding leaves an element within half a code
    step, |x|/16 at most: an error spread over ±|x|/16 at worst, of RMS |x|/(16·√3). A step keeps β of the earlier
    error and adds a new rounding, independent of it, so after 12 steps the error's RMS is at most
    |x|/(16·√3)·√(Σ_k<12 β^2k): 8.3 % of m (β1 = 0.9), 12.4 % of v (β2 = 0.999: about √12 roundings)."""
    params = _params()[:2]
    mirror = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = akt.Adam(params, lr=1e-2, state_precision="int8", fused=fused)
    ref = torch.optim.Adam(mirror, lr=1e-2)
    for t in range(12):
        gen = torch.Generator().manual_seed(t)
        for p, m in zip(params, mirror):
            p.grad = torch.randn(p.shape, generator=gen)
            m.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, m in zip(params, mirror):
        for k, beta in zip(KEYS, (0.9, 0.999)):
            read, true = opt.state[p][k], ref.state[m][k]
            limit = sum(beta ** (2 * k) for k in range(12)) ** 0.5 / (16 * 3 ** 0.5)
            assert float((read - true).norm()) <= limit * float(true.norm()), k
            assert abs(float(read.float().norm()) - float(true.norm())) <= limit * float(true.norm()), k


# -- what tools do with them ---------------------------------------------------------------------------------------

@PATHS
def test_an_ema_tool_keeps_independent_8bit_copies_that_track_the_values(fused):
    params, opt = _trained(torch.float32, fused, steps=2, count=2)
    p = params[0]
    ema = {k: v.detach().clone() for k, v in opt.state[p].items()}  # a typical EMA tool's copy
    for k in KEYS:
        assert type(ema[k]) is QuantizedState and torch.equal(ema[k], opt.state[p][k])
        assert ema[k].codes.data_ptr() != opt.state[p][k].codes.data_ptr()
    for t in range(2, 6):
        before = {k: v.dequantize() if isinstance(v, QuantizedState) else v.clone() for k, v in ema.items()}
        scales = {k: ema[k].absmax.clone() for k in KEYS}
        _train(opt, params, range(t, t + 1))
        for k, v in opt.state[p].items():
            ema[k].mul_(0.9).add_(v, alpha=0.1)
        assert torch.equal(ema["step"], before["step"].mul_(0.9).add_(torch.tensor(t + 1.0), alpha=0.1))
        for k in KEYS:
            signed, exact = k in states.SIGNED_STATES, 0.9 * before[k] + 0.1 * opt.state[p][k]
            # two writes, each stored in 8 bits: mul_ (a code step of 0.9·before, whose scales are 0.9·scales),
            # then add_ (a code step of the sum, which is within that first step of the exact sum)
            first = _code_step(0.9 * before[k], 0.9 * scales[k], signed)
            assert ((ema[k] - exact).abs() <= first + _code_step(exact.abs() + first, ema[k].absmax, signed)).all()
    state_codes = opt.state[p]["exp_avg"].codes.clone()
    ema["exp_avg"].zero_()
    assert torch.equal(opt.state[p]["exp_avg"].codes, state_codes)  # the copy's edits stay in the copy


@PATHS
@DTYPES
def test_state_dict_round_trips_through_deepcopy_and_torch_save_and_resumes_bit_for_bit(fused, dtype):
    params, opt = _trained(dtype, fused)
    saved = copy.deepcopy(opt.state_dict())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    for sd in (saved, loaded):  # the checkpoint format: codes beside their scales, plain tensors
        entry = sd["state"][1]
        assert sorted(entry) == ["exp_avg", "exp_avg.absmax", "exp_avg_sq", "exp_avg_sq.absmax", "step"]
        assert [type(v) for v in entry.values()] == [torch.Tensor] * 5
        assert (entry["exp_avg"].dtype, entry["exp_avg_sq"].dtype, entry["exp_avg.absmax"].dtype) == (
            torch.int8, torch.uint8, torch.float32)
        assert sorted(sd["state"][2]) == ["exp_avg", "exp_avg_sq", "step"]
    copies = []
    for sd in (saved, loaded):
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        copies.append((twins, _adamw(twins, fused)))
        copies[-1][1].load_state_dict(sd)
        assert all(torch.equal(copies[-1][1].state[q][k], opt.state[p][k]) for p, q in zip(params, twins) for k in KEYS)
    _train(opt, params, range(3, 6))
    for twins, other in copies:
        _train(other, twins, range(3, 6))
        for p, q in zip(params, twins):
            assert torch.equal(p, q)
            for k in KEYS:
                assert type(other.state[q][k]) is type(opt.state[p][k])
                assert torch.equal(other.state[q][k], opt.state[p][k])
                if type(opt.state[p][k]) is QuantizedState:
                    assert torch.equal(other.state[q][k].codes, opt.state[p][k].codes)


def test_a_pickled_optimizer_keeps_its_8bit_states():
    """``torch.save(opt)`` pickles 8-bit states as codes and scales (a QuantizedState alone pickles as values)."""
    params = _params()
    opt = _adamw(params, None)
    _train(opt, params, range(2))
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    for p, q in zip(params, (p for g in again.param_groups for p in g["params"])):
        for k in KEYS:
            a, b = opt.state[p][k], again.state[q][k]
            assert type(a) is type(b) and torch.equal(a, b)
            if type(a) is QuantizedState:
                assert torch.equal(a.codes, b.codes) and torch.equal(a.absmax, b.absmax) and set(again.state[q]) == {
                    "step", *KEYS}


# -- writing -------------------------------------------------------------------------------------------------------

EDITS = {  # edits 8 bits hold exactly, so both optimizers continue from the same values
    "zero_": lambda st, p: st["exp_avg"].zero_(),
    "mul_(0.5)": lambda st, p: st["exp_avg_sq"].mul_(0.5),  # codes kept, scales halved
    "indexed": lambda st, p: st["exp_avg"].view(-1)[:256].fill_(0.25),  # a whole block: one constant
    "assigned": lambda st, p: st.__setitem__("exp_avg", torch.full_like(p, 0.01)),  # quantized at the step
}


@PATHS
@pytest.mark.parametrize("edit", list(EDITS))
def test_edits_of_a_state_act_like_the_same_edits_of_torch_optims_float32_state(fused, edit):
    params, opt = _trained(torch.float32, fused, steps=3, count=2)
    mirror = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.AdamW(mirror, lr=1e-2, weight_decay=0.1)
    _train(ref, mirror, range(1))  # makes torch.optim's states
    for p, m in zip(params, mirror):  # torch.optim continues from the parameters and what opt.state reads
        m.data.copy_(p.detach())
        for k in KEYS:
            ref.state[m][k].copy_(opt.state[p][k])
        ref.state[m]["step"].fill_(3)
        EDITS[edit](opt.state[p], p)
        EDITS[edit](ref.state[m], m)
        assert all(torch.equal(opt.state[p][k], ref.state[m][k]) for k in KEYS)  # exact in 8 bits
    _set_grads(params, 3)
    _set_grads(mirror, 3)
    opt.step()
    ref.step()
    sd = opt.state_dict()["state"]
    for i, (p, m) in enumerate(zip(params, mirror)):
        assert type(opt.state[p]["exp_avg"]) is QuantizedState and "exp_avg.absmax" not in opt.state[p]
        assert ((p - m).abs() <= 4 * torch.finfo(torch.float32).eps * (m.abs() + 1e-2)).all()
        for k in KEYS:
            bound = _code_step(ref.state[m][k], sd[i][f"{k}.absmax"], k in states.SIGNED_STATES)
            assert ((opt.state[p][k] - ref.state[m][k]).abs() <= bound).all(), k


@PATHS
def test_a_tensor_the_state_cannot_take_is_refused_before_anything_changes(fused):
    params, opt = _trained(torch.float32, fused, steps=2, count=2)
    p = params[1]
    before = copy.deepcopy(opt.state_dict())
    cases = [(torch.zeros(5000, dtype=torch.float64), "expected dtype torch.float32 for state 'exp_avg'"),
             (torch.zeros(4999), r"has shape \(4999,\)"),
             (opt.state[p]["exp_avg"].codes.clone(), "holds int8 codes without their block scales"),
             (opt.state[p]["exp_avg"][10:20], "a view of part of an 8-bit state")]
    state, start = opt.state[p]["exp_avg"], [q.detach().clone() for q in params]
    for value, message in cases:
        opt.state[p]["exp_avg"] = value
        _set_grads(params, 2)
        with pytest.raises(RuntimeError, match=message):
            opt.step()
        now = opt.state_dict()["state"]
        assert all(torch.equal(now[0][k], v) for k, v in before["state"][0].items())
        assert all(torch.equal(now[1][k], v) for k, v in before["state"][1].items()
                   if k not in ("exp_avg", "exp_avg.absmax"))
        assert opt.state[p]["exp_avg"] is value and all(torch.equal(q, r) for q, r in zip(params, start))
        opt.state[p]["exp_avg"] = state
    opt.step()  # the state put back steps


@DTYPES
@pytest.mark.parametrize("assigned", ["like the parameter", "bfloat16"])
def test_a_tensor_of_values_assigned_to_an_8bit_state_is_stored_in_8_bits_at_the_step(dtype, assigned):
    params, opt = _trained(dtype, None, steps=1, count=2)
    p = params[0]
    opt.state[p]["exp_avg"] = torch.full_like(p, 0.5, dtype=dtype if assigned != "bfloat16" else torch.bfloat16)
    v = opt.state[p]["exp_avg_sq"].dequantize()
    _set_grads(params, 1)
    g = p.grad.float()
    opt.step()
    m, exact = opt.state[p]["exp_avg"], 0.9 * 0.5 + 0.1 * g  # 0.5 in every dtype, a constant block in 8 bits
    assert type(m) is QuantizedState and ((m - exact).abs() <= _code_step(exact, m.absmax, True)).all()
    v, exact = opt.state[p]["exp_avg_sq"], 0.999 * v + 0.001 * g * g
    assert ((v - exact).abs() <= _code_step(exact, v.absmax, False)).all()


def test_differentiable_steps_8bit_states_like_the_reference_path():
    """differentiable=True runs the reference path inside autograd: its steps equal fused=False's, and gradients
    reach where the parameters started (8-bit states hold codes: none flows through them)."""
    start = [w.detach().requires_grad_() for w in _params()[:2]]
    live = [w.clone() for w in start]  # not leaves: the step updates them in place inside the graph
    plain = [torch.nn.Parameter(w.detach().clone()) for w in start]
    opt = akt.AdamW(live, lr=1e-2, state_precision="int8", differentiable=True)
    ref = akt.AdamW(plain, lr=1e-2, state_precision="int8", fused=False)
    for t in range(3):
        _set_grads(plain, t)
        for a, b in zip(live, plain):
            a.grad = b.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(live, plain):
        assert torch.equal(a.detach(), b.detach())
        assert all(torch.equal(opt.state[a][k].codes, ref.state[b][k].codes) for k in KEYS)
    sum(a.sum() for a in live).backward()
    assert all(w.grad is not None and bool(torch.isfinite(w.grad).all()) and float(w.grad.abs().min()) > 0.5
               for w in start)


def test_dtensor_states_read_their_values(world_of_one):
    """A DTensor parameter's 8-bit state is a DTensor whose local shard is a QuantizedState; ops on it read values,
    and it steps exactly as the plain parameter's (one rank: the shard is the whole tensor)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    plain = _params()[:2]
    sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), world_of_one, [Shard(0)])) for p in plain]
    opts = [_adamw(plain, None), _adamw(sharded, None)]
    for t in range(3):
        _set_grads(plain, t)
        for p, d in zip(plain, sharded):
            d.grad = distribute_tensor(p.grad.clone(), world_of_one, [Shard(0)])
        for opt in opts:
            opt.step()
    sd = opts[1].state_dict()["state"]
    for i, (p, d) in enumerate(zip(plain, sharded)):
        assert torch.equal(d.full_tensor(), p)
        for k in KEYS:
            s = opts[1].state[d][k]
            assert isinstance(s, DTensor) and type(s._local_tensor) is QuantizedState
            assert torch.equal(s.full_tensor(), opts[0].state[p][k]) and torch.equal(sd[i][k].full_tensor(), s.full_tensor())
            assert float(s.float().norm().full_tensor()) == float(opts[0].state[p][k].norm())
            ema = s.detach().clone()
            ema.mul_(0.5)  # scales halve: exact
            assert torch.equal(ema.full_tensor(), 0.5 * s.full_tensor())


@pytest.mark.parametrize("sharded", [True, False], ids=["fsdp2", "plain"])
def test_dcp_flattened_optimizer_state_dicts(world_of_one, sharded):
    """torch.distributed.checkpoint's ``flatten_optimizer_state_dict=True`` rebuilds each entry from the keys of
    ``opt.state[p]``. FSDP2 (DTensor) states export as float32 values under those keys: they load, bit for bit.
    A plain parameter's state dict holds ``exp_avg.absmax`` beside the codes, a key ``opt.state[p]`` does not
    have, so the rebuilt entry lacks its scales: the load is refused, and the optimizer is left as it was."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 64))
        if sharded:
            fully_shard(model)
        return model, _adamw(list(model.parameters()), None)

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model, opt = build()
    model(torch.randn(4, 128)).square().sum().backward()
    opt.step()
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    other, other_opt = build()
    other(torch.randn(4, 128)).square().sum().backward()
    other_opt.step()
    before = full(other_opt.state[other[0].weight]["exp_avg"]).clone()
    if not sharded:
        with pytest.raises(ValueError, match="integer codes cannot be read without their scales"):
            set_state_dict(other, other_opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
        assert torch.equal(full(other_opt.state[other[0].weight]["exp_avg"]), before)
        return
    set_state_dict(other, other_opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    for k in KEYS:
        assert torch.equal(full(other_opt.state[other[0].weight][k]), full(opt.state[model[0].weight][k]))
