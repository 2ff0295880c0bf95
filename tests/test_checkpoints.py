"""adamkit.checkpoints: one validation and one export for both engines, with one set of messages."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import adamkit.numpy as akn
import adamkit.torch as akt

from conftest import stepped_once

N = 8192


def _torch_opt(name="AdamW", precision=None, **options):
    p, opt = stepped_once(getattr(akt, name), N, state_precision=precision, **options)
    return p, opt


def _numpy_opt(name="AdamW", precision=None, **options):
    w = np.random.default_rng(0).normal(size=N).astype(np.float32)
    opt = getattr(akn, name)([w], state_precision=precision, **options)
    opt.step([np.ones(N, dtype=np.float32)])
    return w, opt


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _same(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for k, v in a["state"][i].items():
            w = b["state"][i][k]
            assert (torch.equal(v, w) if torch.is_tensor(v) else np.array_equal(v, w)), k


MALFORMED = [
    (lambda sd: [], "must be a mapping with 'state' and 'param_groups'"),
    (lambda sd: {**sd, "state": [1]}, "'state' must be a mapping"),
    (lambda sd: {**sd, "param_groups": {"a": 1}}, "'param_groups' must be a list"),
    (lambda sd: {**sd, "param_groups": [{k: v for k, v in sd["param_groups"][0].items() if k != "params"}]},
     "group 0 of the state dict must be a mapping with a 'params' list"),
    (lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "params": [0.5]}]}, "parameter id 0.5"),
    (lambda sd: {**sd, "param_groups": sd["param_groups"] * 2},
     "loaded state dict has a different number of parameter groups: the state dict has 2"),
    (lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "params": [0, 1]}]},
     "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"),
    (lambda sd: {**sd, "state": {0: [1, 2]}}, "state of parameter 0 .group 0. must be a mapping"),
    (lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "amsgrad": torch.tensor([True, False])}]},
     "group 0 of the state dict: Invalid amsgrad"),
    (lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "betas": (0.9,)}]}, "Invalid betas"),
    (lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "capturable": "yes"}]},
     "Invalid capturable: 'yes'"),
    (lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "differentiable": None}]},
     "Invalid differentiable: None"),
    (lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "fused": "yes"}]}, "Invalid fused: 'yes'"),
    (lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "state_precision": "fp8"}]},
     "Invalid state_precision"),
]


@pytest.mark.parametrize("case", range(len(MALFORMED)))
@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_malformed_state_dicts_get_the_same_clear_message_in_both_engines(engine, case):
    edit, match = MALFORMED[case]
    _, opt = _torch_opt() if engine == "torch" else _numpy_opt()
    before = _snapshot(opt)
    sd = _snapshot(opt)
    if engine == "torch":
        sd["param_groups"][0]["fused"] = None
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(edit(sd))
    _same(opt.state_dict(), before)


@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_absmax_of_shape_blocks_by_one_is_refused(engine):
    """One scale per block, exactly shape (n_blocks,): a (n_blocks, 1) absmax would broadcast block 0's scale."""
    _, opt = _torch_opt(precision="int8") if engine == "torch" else _numpy_opt(precision="int8")
    before = _snapshot(opt)
    sd = _snapshot(opt)
    sd["state"][0]["exp_avg.absmax"] = sd["state"][0]["exp_avg.absmax"].reshape(-1, 1)
    with pytest.raises(ValueError, match=r"shape \(32,\); it holds 32, shape \(32, 1\)"):
        opt.load_state_dict(sd)
    _same(opt.state_dict(), before)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_non_finite_full_precision_state_into_int8_is_refused(engine, value):
    """One inf or nan would set its block's scale: all 256 parameters of the block became nan at the next step."""
    source = _torch_opt()[1] if engine == "torch" else _numpy_opt()[1]
    sd = _snapshot(source)
    sd["state"][0]["exp_avg"][7] = value
    _, target = _torch_opt(precision="int8") if engine == "torch" else _numpy_opt(precision="int8")
    before = _snapshot(target)
    with pytest.raises(ValueError, match="holds inf or nan, which this optimizer's 8-bit states cannot hold"):
        target.load_state_dict(sd)
    _same(target.state_dict(), before)
    # full precision takes it, as torch.optim does
    (_torch_opt() if engine == "torch" else _numpy_opt())[1].load_state_dict(sd)


@pytest.mark.parametrize("engine", ["torch", "numpy"])
@pytest.mark.parametrize("key, value, match", [
    ("exp_avg_sq", -1.0, "holds negative values"),
    ("step", -1.0, "'step' .* must be a finite real number >= 0"),
    ("step", float("nan"), "'step' .* must be a finite real number"),
    ("step", "3", "'step' .* must be a finite real number"),
])
def test_bad_state_values_are_refused(engine, key, value, match):
    _, opt = _torch_opt() if engine == "torch" else _numpy_opt()
    before = _snapshot(opt)
    sd = _snapshot(opt)
    if key == "step":
        sd["state"][0]["step"] = torch.tensor(value) if engine == "torch" and not isinstance(value, str) else value
    else:
        sd["state"][0][key][3] = value
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _same(opt.state_dict(), before)


def test_numpy_adamw_keeps_decoupled_decay_on_load():
    """torch.optim.AdamW forces decoupled decay on load; adamkit.numpy.AdamW took False (Adam with L2 decay)."""
    for value in (False, 0, "no"):
        w, opt = _numpy_opt("AdamW")
        sd = opt.state_dict()
        sd["param_groups"][0]["decoupled_weight_decay"] = value
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["decoupled_weight_decay"] is True


@pytest.mark.parametrize("own", [False, None])
def test_engine_options_on_load_stay_the_optimizers_own(own):
    ref = torch.nn.Parameter(torch.randn(N))
    torch_opt = torch.optim.Adam([ref], fused=True)
    ref.grad = torch.randn(N)
    torch_opt.step()
    p = torch.nn.Parameter(ref.detach().clone())
    opt = akt.Adam([p], fused=own, state_precision="bf16")
    opt.load_state_dict(torch_opt.state_dict())
    assert opt.param_groups[0]["fused"] is own and opt.param_groups[0]["state_precision"] == "bf16"
    half = torch.nn.Parameter(torch.randn(N, dtype=torch.float16))  # fused=True takes float16, as torch
    opt2 = akt.Adam([half], fused=own)
    sd = opt2.state_dict()
    sd["param_groups"][0]["fused"] = True
    opt2.load_state_dict(sd)
    half.grad = torch.randn(N, dtype=torch.float16)
    opt2.step()


def test_missing_group_keys_come_from_the_class_defaults_like_torch():
    from adamkit import checkpoints

    p, opt = _torch_opt("Adam", amsgrad=True)
    ref = torch.nn.Parameter(p.detach().clone())
    torch_opt = torch.optim.Adam([ref], amsgrad=True)
    sd = _snapshot(opt)
    del sd["param_groups"][0]["amsgrad"]
    opt.load_state_dict(copy.deepcopy(sd))
    torch_opt.load_state_dict(checkpoints.full_precision(sd, opt.rule, drop_engine_keys=True))
    assert opt.param_groups[0]["amsgrad"] is False is torch_opt.param_groups[0]["amsgrad"]
    w, nopt = _numpy_opt("Adam", amsgrad=True)
    nsd = nopt.state_dict()
    del nsd["param_groups"][0]["amsgrad"]
    nopt.load_state_dict(nsd)
    assert nopt.param_groups[0]["amsgrad"] is False


@pytest.mark.parametrize("precision", [None, "bf16", "int8"])
def test_loaded_states_are_detached(precision):
    p, opt = _torch_opt("Adam", precision=None)
    sd = _snapshot(opt)
    for k in ("exp_avg", "exp_avg_sq"):
        sd["state"][0][k] = sd["state"][0][k].clone().requires_grad_(True) * 1.0  # with autograd history
    _, target = _torch_opt("Adam", precision=precision)
    target.load_state_dict(sd)
    assert not any(v.requires_grad for v in target.state_dict()["state"][0].values() if torch.is_tensor(v))
    copy.deepcopy(target.state_dict())


def test_torch_state_dict_of_both_engines_loads_into_torch_optim():
    from adamkit import checkpoints

    for engine, precision in (("torch", "int8"), ("numpy", "int8"), ("numpy", "bf16")):
        _, opt = _torch_opt("Adam", precision=precision) if engine == "torch" else _numpy_opt("Adam", precision)
        exported = opt.torch_state_dict()
        assert all("." not in k for k in exported["state"][0])
        if engine == "numpy":
            exported["state"][0] = {k: torch.as_tensor(v) for k, v in exported["state"][0].items()}
        ref = torch.optim.Adam([torch.nn.Parameter(torch.zeros(N))])
        ref.load_state_dict(exported)
        full = checkpoints.full_precision(opt.state_dict(), opt.rule)
        assert np.array_equal(np.asarray(ref.state_dict()["state"][0]["exp_avg"]),
                              np.asarray(full["state"][0]["exp_avg"]))


def test_check_state_dict_returns_the_groups_hyperparameters():
    from adamkit import checkpoints

    _, opt = _torch_opt("AdamW")
    sd = _snapshot(opt)
    sd["param_groups"][0]["decoupled_weight_decay"] = False
    del sd["param_groups"][0]["amsgrad"]
    sd["param_groups"][0]["lr"] = 0.5
    (h,) = checkpoints.check_state_dict(sd, opt.rule, [opt.param_groups[0]["params"]], [None], torch.is_tensor)
    assert h["lr"] == 0.5 and h["decoupled_weight_decay"] is True and h["amsgrad"] is False
    assert set(h) == set(opt.rule.hyperparameters())


def test_numpy_arrays_into_the_torch_engine_are_named_as_such():
    _, nopt = _numpy_opt("Adam")
    _, opt = _torch_opt("Adam")
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"state 'exp_avg' of parameter 0 \(group 0\) must be an array like its "
                                         r"parameter .*numpy.ndarray"):
        opt.load_state_dict(nopt.state_dict())
    _same(opt.state_dict(), before)


@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_states_of_ids_no_group_lists_are_refused(engine):
    """torch.optim keeps such states under their old ids, and its next state_dict hands them to other parameters
    (found by the fuzz suite: group ids renamed to strings)."""
    _, opt = _torch_opt("Adamax") if engine == "torch" else _numpy_opt("Adamax")
    before = _snapshot(opt)
    sd = _snapshot(opt)
    sd["param_groups"][0]["params"] = ["a"]
    with pytest.raises(ValueError, match=r"states for parameter ids \['0'\] that no group lists"):
        opt.load_state_dict(sd)
    _same(opt.state_dict(), before)


def test_groups_have_torch_optims_keys_unless_an_adamkit_option_is_set():
    """Left at None, ``state_precision`` (and ``fused`` where torch has no fused path) is no group key, so groups
    and state dicts have torch.optim's keys (DCP loads a checkpoint only if it holds every key of the loader's);
    a checkpoint that has one does not add it to an optimizer that has not."""
    for name in ("Adam", "RMSprop", "NAdam"):
        p = torch.nn.Parameter(torch.randn(N))
        theirs, ours = getattr(torch.optim, name)([p]), getattr(akt, name)([p])
        assert ours.param_groups[0].keys() == theirs.param_groups[0].keys(), name
        assert ours.state_dict()["param_groups"][0].keys() == theirs.state_dict()["param_groups"][0].keys(), name
    p = torch.nn.Parameter(torch.randn(N))
    low = akt.RMSprop([p], state_precision="bf16", fused=False)
    p.grad = torch.randn(N)
    low.step()
    assert low.state_dict()["param_groups"][0]["state_precision"] == "bf16"
    plain = akt.RMSprop([torch.nn.Parameter(p.detach().clone())])
    plain.load_state_dict(low.state_dict())
    assert "state_precision" not in plain.param_groups[0] and "fused" not in plain.param_groups[0]
    assert plain.state[plain.param_groups[0]["params"][0]]["square_avg"].dtype == torch.float32
