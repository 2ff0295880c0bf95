"""adamkit.torch as a drop-in: checkpoints both ways, resume bit for bit, torch.optim machinery, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import adamkit.torch as akt
from conftest import gradient, make_problem, stepped_once

CONFIGS = {"SGD": dict(lr=0.05, momentum=0.9, nesterov=True), "Adagrad": dict(lr=0.05, lr_decay=0.01),
           "RMSprop": dict(momentum=0.5, centered=True), "Adam": dict(amsgrad=True, weight_decay=0.1),
           "AdamW": dict(lr=1e-2), "Adamax": dict(), "NAdam": dict(decoupled_weight_decay=True, weight_decay=0.1),
           "RAdam": dict(lr=1e-2)}


def train(opt, params, targets, start, stop):
    for t in range(start, stop):
        for i, p in enumerate(params):
            p.grad = gradient(p, targets[i], t, i)
        opt.step()


def save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("fused", [False, None], ids=["reference", "default"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("direction", ["torch->adamkit", "adamkit->torch"])
def test_checkpoint_moves_both_ways_and_training_continues_exactly(name, direction, fused):
    init, targets = make_problem(torch.float64)
    torch_cls, ak_cls = getattr(torch.optim, name), akt.OPTIMIZERS[name]
    first, second = (torch_cls, ak_cls) if direction == "torch->adamkit" else (ak_cls, torch_cls)
    kw_first = dict(fused=fused) if first is ak_cls else {}
    kw_second = dict(fused=fused) if second is ak_cls else {}
    # uninterrupted run with the second optimizer class's numbers as the reference: run both for 40 steps
    a = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = first(a, **CONFIGS[name], **kw_first)
    train(opt_a, a, targets, 0, 20)
    sd = save_load(opt_a.state_dict())
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    opt_b = second(b, **CONFIGS[name], **kw_second)
    opt_b.load_state_dict(sd)
    train(opt_a, a, targets, 20, 40)
    train(opt_b, b, targets, 20, 40)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-12, atol=0)
    assert sorted(opt_a.state_dict()["state"][0]) == sorted(opt_b.state_dict()["state"][0])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resumed_run_equals_uninterrupted_bit_for_bit(name):
    init, targets = make_problem(torch.float32)
    a = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = akt.OPTIMIZERS[name](a, **CONFIGS[name])
    train(opt_a, a, targets, 0, 15)
    sd = save_load(opt_a.state_dict())
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    opt_b = akt.OPTIMIZERS[name](b, **CONFIGS[name])
    opt_b.load_state_dict(sd)
    train(opt_a, a, targets, 15, 30)
    train(opt_b, b, targets, 15, 30)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_state_dict_layout_equals_torch():
    for name in CONFIGS:
        init, targets = make_problem(torch.float32)
        a = [torch.nn.Parameter(x.clone()) for x in init]
        b = [torch.nn.Parameter(x.clone()) for x in init]
        oa, ob = akt.OPTIMIZERS[name](a, **CONFIGS[name]), getattr(torch.optim, name)(b, **CONFIGS[name])
        train(oa, a, targets, 0, 2)
        train(ob, b, targets, 0, 2)
        sa, sb = oa.state_dict(), ob.state_dict()
        # the same group keys: torch.distributed.checkpoint loads only when the checkpoint has every key
        assert set(sa["param_groups"][0]) == set(sb["param_groups"][0]), name
        for i in sb["state"]:
            assert {k: (v.dtype, v.shape) for k, v in sa["state"][i].items()} == \
                   {k: (v.dtype, v.shape) for k, v in sb["state"][i].items()}


def test_mismatched_state_dicts_raise_and_leave_optimizer_unchanged():
    init, targets = make_problem(torch.float32)
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    opt = akt.Adam(ps, lr=1e-2)
    train(opt, ps, targets, 0, 3)
    good = copy.deepcopy(opt.state_dict())

    def broken(edit):
        sd = copy.deepcopy(good)
        edit(sd)
        return sd

    cases = [
        (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "parameter groups"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), "parameters in the state dict"),
        (lambda sd: sd["state"][0].pop("exp_avg_sq"), "missing"),
        (lambda sd: sd["state"][1].__setitem__("exp_avg", torch.zeros(5)), "shape"),
        (lambda sd: sd["state"][0].__setitem__("momentum", torch.zeros(1)), "unknown"),
        (lambda sd: sd["param_groups"][0].__setitem__("lr", -3.0), "learning rate"),
        (lambda sd: sd.pop("state"), "'state'"),
    ]
    for edit, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(broken(edit))
        now = opt.state_dict()
        assert now["param_groups"] == good["param_groups"]
        for i in good["state"]:
            for k in good["state"][i]:
                assert torch.equal(now["state"][i][k], good["state"][i][k])


def test_bad_gradients_raise_and_leave_params_and_state_untouched():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))
    opt = akt.AdamW([a, b], lr=0.1, check_finite=True)
    a.grad, b.grad = torch.ones(4), torch.ones(3)
    opt.step()
    snapshot = copy.deepcopy((a.detach(), b.detach(), opt.state_dict()))
    a.grad, b.grad = torch.ones(4), torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    b.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    meta = torch.nn.Parameter(torch.ones(3, device="meta"))
    meta.grad = torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match="meta device"):
        akt.AdamW([meta]).step()
    assert torch.equal(a, snapshot[0]) and torch.equal(b, snapshot[1])
    assert float(opt.state[a]["step"]) == 1.0 and torch.equal(opt.state[a]["exp_avg"],
                                                              snapshot[2]["state"][0]["exp_avg"])
    # opting out of the check gives torch.optim's behaviour (nan propagates)
    opt2 = akt.Adam([b], check_finite=False)
    b.grad = torch.tensor([float("nan"), 0.0, 0.0])
    opt2.step()
    assert torch.isnan(b[0])


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("precision", [None, "int8"])
def test_a_gradient_of_another_dtype_raises_before_anything_changes(fused, precision):
    """torch lets a gradient differ from its parameter's dtype only after ``p.grad_dtype = None``; the kernels
    would read its memory as the parameter's dtype, so adamkit refuses it (torch.optim errors too)."""
    a, b = torch.nn.Parameter(torch.randn(8192)), torch.nn.Parameter(torch.randn(100))
    opt = akt.AdamW([a, b], state_precision=precision, fused=fused)
    a.grad, b.grad = torch.randn(8192), torch.randn(100)
    opt.step()
    snapshot = copy.deepcopy((a.detach(), b.detach(), opt.state_dict()))
    b.grad_dtype = None
    a.grad, b.grad = torch.randn(8192), torch.randn(100, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"shape \(100,\) has dtype torch.float64, the parameter torch.float32"):
        opt.step()
    assert torch.equal(a, snapshot[0]) and torch.equal(b, snapshot[1])
    now = opt.state_dict()
    assert all(torch.equal(now["state"][i][k], v) for i in now["state"] for k, v in snapshot[2]["state"][i].items())


@pytest.mark.parametrize("group, match", [
    ({"state_precision": "fp8"}, "Invalid state_precision: 'fp8'"),
    ({"state_precision": 8}, "Invalid state_precision: 8"),
    ({"fused": "yes"}, "Invalid fused: 'yes'"),
])
def test_engine_options_are_validated_per_group(group, match):
    p, q = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=match):
        akt.AdamW([{"params": [p], **group}])
    opt = akt.AdamW([p])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [q], **group})
    assert len(opt.param_groups) == 1


def test_corrupt_int8_checkpoints_raise_and_leave_optimizer_unchanged():
    p, opt = stepped_once(akt.AdamW, 10000, state_precision="int8")
    good = copy.deepcopy(opt.state_dict())

    def broken(edit):
        sd = copy.deepcopy(good)
        edit(sd["state"][0])
        return sd

    cases = [
        (lambda st: st["exp_avg.absmax"].__setitem__(3, float("nan")), "'exp_avg.absmax' must be finite"),
        (lambda st: st["exp_avg_sq.absmax"].__setitem__(0, float("inf")), "'exp_avg_sq.absmax' must be finite"),
        (lambda st: st["exp_avg.absmax"].__setitem__(1, -1.0), "non-negative"),
        (lambda st: st.__setitem__("exp_avg.absmax", st["exp_avg.absmax"][:-1]), r"one scale per block .* holds 39"),
        (lambda st: st.__setitem__("exp_avg", st["exp_avg"].to(torch.int16)), "must hold int8 codes"),
        (lambda st: st.__setitem__("exp_avg_sq", st["exp_avg_sq"].to(torch.int8)), "must hold uint8 codes"),
        (lambda st: st["exp_avg_sq"].__setitem__(0, 255), r"outside its map \(\|code\| ≤ 248\)"),
        (lambda st: st["exp_avg"].__setitem__(0, -128), r"outside its map \(\|code\| ≤ 120\)"),
        (lambda st: st.pop("exp_avg.absmax"), "no 'exp_avg.absmax'"),
        (lambda st: st.pop("exp_avg"), "missing"),
    ]
    for edit, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(broken(edit))
        now = opt.state_dict()
        assert all(torch.equal(now["state"][0][k], v) for k, v in good["state"][0].items())
    # the same corruptions are refused by a fresh optimizer of another precision (nothing is half-loaded)
    fresh = akt.AdamW([torch.nn.Parameter(p.detach().clone())])
    with pytest.raises(ValueError, match="must be finite"):
        fresh.load_state_dict(broken(cases[0][0]))
    assert not fresh.state


def test_torch_machinery_hooks_schedulers_closure_deepcopy_repr():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = akt.Adam([p], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd") or sd)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss) == 5.0 and calls == ["pre", "post"]
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    opt.state_dict()
    assert calls[-1] == "sd"
    clone = copy.deepcopy(opt)
    q = clone.param_groups[0]["params"][0]
    assert torch.equal(clone.state[q]["exp_avg"], opt.state[p]["exp_avg"])
    q.grad = p.grad.clone()
    clone.step()  # the copy steps on its own tensors; the original is untouched
    assert not torch.equal(q, p) and float(clone.state[q]["step"]) == 2.0 and float(opt.state[p]["step"]) == 1.0
    assert "Adam (" in repr(opt) and "amsgrad: False" in repr(opt)
    opt.zero_grad()
    assert p.grad is None


def test_lr_as_tensor_and_model_training():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 4)
    y = x.sum(1, keepdim=True)
    opt = akt.AdamW(model.parameters(), lr=torch.tensor(1e-2))
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss)
    assert float(loss) < 0.02 * first


def test_compiled_plan_follows_changes_between_steps():
    """The compiled path caches its plan; every change torch.optim allows between steps is followed exactly:
    a new lr (and a rejected invalid one), a parameter whose memory moved (``p.data = ...``), a parameter
    replaced in its group's list, a missing gradient, and a non-contiguous gradient."""
    torch.manual_seed(0)
    shapes = [(64, 80), (5000,), (33,)]
    ours = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, oracle = akt.Adam(ours, lr=1e-2), torch.optim.Adam(theirs, lr=1e-2, foreach=False)

    def both(change=lambda ps, o: None, grads=None):
        for ps, o in ((ours, opt), (theirs, oracle)):
            change(ps, o)
            for i, p in enumerate(o.param_groups[0]["params"]):
                p.grad = None if grads is not None and grads[i] is None else \
                    (grads[i] if grads is not None else torch.sin(p.detach() * (i + 1))).clone()
            o.step()
        for a, b in zip(opt.param_groups[0]["params"], oracle.param_groups[0]["params"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)

    both()
    both(lambda ps, o: o.param_groups[0].__setitem__("lr", 3e-3))
    # as torch.optim: values written into a group between steps (a scheduler's) are taken, not validated
    both(lambda ps, o: o.param_groups[0].__setitem__("lr", -1e-3))
    both(lambda ps, o: o.param_groups[0].__setitem__("lr", 3e-3))
    both(lambda ps, o: setattr(o.param_groups[0]["params"][1], "data", o.param_groups[0]["params"][1].data.clone()))
    fresh = [torch.nn.Parameter(torch.randn(7, dtype=torch.float64))]
    fresh.append(torch.nn.Parameter(fresh[0].detach().clone()))
    both(lambda ps, o: o.param_groups[0]["params"].__setitem__(2, fresh[0] if o is opt else fresh[1]))
    both(grads=[torch.ones(64, 80, dtype=torch.float64), None, torch.ones(7, dtype=torch.float64)])
    both(grads=[torch.ones(80, 64, dtype=torch.float64).t(), torch.full((5000,), 0.5, dtype=torch.float64),
                torch.ones(7, dtype=torch.float64)])
    both()


def test_group_values_no_step_can_use_are_refused_before_anything_changes():
    a, b = torch.nn.Parameter(torch.ones(5000)), torch.nn.Parameter(torch.ones(5000))
    opt = akt.Adam([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-3}])
    for _ in range(2):
        a.grad, b.grad = torch.ones(5000), torch.ones(5000)
        opt.step()
    snapshot = copy.deepcopy((a.detach(), b.detach(), opt.state_dict()))

    def unchanged():
        return (torch.equal(a, snapshot[0]) and torch.equal(b, snapshot[1])
                and all(torch.equal(opt.state_dict()["state"][i][k], v)
                        for i, s in snapshot[2]["state"].items() for k, v in s.items()))
    opt.param_groups[1]["betas"] = (0.9, 1.5)  # 1 - β2^t < 0: no bias correction exists (torch fails mid-step)
    with pytest.raises(ValueError, match="group 1 cannot make a step"):
        opt.step()
    assert unchanged()
    opt.param_groups[1]["betas"] = (0.9, 0.999)
    opt.param_groups[0]["lr"] = torch.tensor([1e-2, 1e-3])
    with pytest.raises(ValueError, match="group 0 cannot make a step"):
        opt.step()
    assert unchanged()
    opt.param_groups[0]["lr"] = torch.tensor(-1.0)  # as torch.optim: a scheduler's value is taken at step time
    opt.step()
    assert bool((a > 1).all())


@pytest.mark.parametrize("fused", [None, False])
def test_sgd_without_momentum_keeps_no_state_entries(fused):
    ps = [torch.nn.Parameter(torch.ones(5000)), torch.nn.Parameter(torch.ones(3))]
    opt = akt.SGD(ps, lr=0.1, fused=fused)
    for _ in range(2):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    assert opt.state_dict()["state"] == {} and len(opt.state) == 0


@pytest.mark.parametrize("fused", [None, False])
def test_complex_adagrad_initial_accumulator_steps_like_its_real_view(fused):
    z = torch.nn.Parameter(torch.randn(4096, dtype=torch.complex64))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    opts = [akt.Adagrad([z], lr=0.1, initial_accumulator_value=0.3, fused=fused),
            torch.optim.Adagrad([r], lr=0.1, initial_accumulator_value=0.3)]
    for t in range(3):
        g = torch.randn(4096, 2, generator=torch.Generator().manual_seed(t))
        z.grad, r.grad = torch.view_as_complex(g.clone()), g.clone()
        for o in opts:
            o.step()
    assert torch.allclose(torch.view_as_real(z.detach()), r.detach(), rtol=2e-6, atol=1e-7)
    # torch starts a complex accumulator at complex(v, v): the real view's both halves start at v
    assert torch.allclose(torch.view_as_real(opts[0].state[z]["sum"]), opts[1].state[r]["sum"], rtol=2e-6)


def test_the_reference_path_needs_no_numba():
    code = ("import sys, torch, adamkit.torch as ak\n"
            "p = torch.nn.Parameter(torch.ones(5000)); p.grad = torch.ones(5000)\n"
            "for cls in ak.OPTIMIZERS.values():\n"
            "    o = cls([p], fused=False, check_finite=True); o.step(); o.load_state_dict(o.state_dict())\n"
            "o = ak.AdamW([p], fused=False, state_precision='int8'); o.step(); o.step()\n"
            "assert 'numba' not in sys.modules, 'numba was imported'\n")
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
