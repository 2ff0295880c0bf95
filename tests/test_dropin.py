"""Drop-in details where torch.optim's behaviour is the contract: sparse gradients, float16 with fused=True, AMP's
fused protocol, torch's error words, state entries that are not per-parameter dicts, old-format checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

import adamkit.torch as akt

from conftest import rel_error


def _sparse_grad(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n, (n // 4,), generator=g)  # repeated indices: uncoalesced, as an embedding makes
    return torch.sparse_coo_tensor(index[None], torch.randn(n // 4, generator=g, dtype=torch.float64), (n,))


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)),
                                     ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, maximize=True)),
                                     ("Adagrad", dict(lr=0.1)), ("Adagrad", dict(lr=0.1, lr_decay=0.01,
                                                                                  initial_accumulator_value=0.5))])
def test_sparse_gradients_step_like_torch(name, kw):
    ours = torch.nn.Parameter(torch.randn(400, dtype=torch.float64))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt, ref = getattr(akt, name)([ours], **kw), getattr(torch.optim, name)([theirs], **kw)
    for t in range(30):
        ours.grad, theirs.grad = _sparse_grad(400, t), _sparse_grad(400, t)
        opt.step(), ref.step()
    assert rel_error(ours, theirs) <= 1e-12  # float64: the parity grid's bound
    for k, v in ref.state[theirs].items():
        mine = opt.state[ours][k]
        assert rel_error(mine.to_dense() if mine.is_sparse else mine, v.to_dense() if v.is_sparse else v) <= 1e-12


@pytest.mark.parametrize("name", ["RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "RAdam"])
def test_sparse_gradients_elsewhere_raise_torchs_error_first(name):
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.eye(10)[0].to_sparse()
    with pytest.raises(RuntimeError) as ours:
        getattr(akt, name)([p]).step()
    q = torch.nn.Parameter(torch.randn(10))
    q.grad = p.grad
    with pytest.raises(RuntimeError) as theirs:
        getattr(torch.optim, name)([q]).step()
    assert str(ours.value).startswith(str(theirs.value))
    assert torch.equal(p, p)  # nothing was stepped: the error comes before any update


@pytest.mark.parametrize("name", ["Adagrad", "SGD"])
def test_sparse_gradient_with_weight_decay_is_torchs_error(name):
    errors = []
    for module in (torch.optim, akt):
        p = torch.nn.Parameter(torch.randn(10))
        p.grad = torch.eye(10)[0].to_sparse()
        before = p.detach().clone()
        with pytest.raises(RuntimeError) as e:
            getattr(module, name)([p], lr=0.1, weight_decay=0.1).step()
        errors.append(str(e.value))
        assert torch.equal(p, before)
    assert errors[1].startswith(errors[0])


def _float16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance between float16 tensors in units in the last place (the bits as a monotonic integer line)."""
    def line(x: torch.Tensor) -> torch.Tensor:
        bits = x.detach().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -32768 - bits, bits)
    return (line(a) - line(b)).abs()


def _float16_step_by_step(name: str, kw: dict, sizes: list[int], steps: int = 12) -> dict[str, list[int]]:
    """adamkit and torch.optim with fused=True on the same float16 parameters; before each step adamkit's
    parameters and states are set to torch's, so each step is compared on its own. Per tensor name: the largest
    difference in float16 ulps, the number of elements that differ, and the number compared."""
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n, generator=gen).half()) for n in sizes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = getattr(akt, name)(ours, fused=True, **kw)
    ref = getattr(torch.optim, name)(theirs, fused=True, **kw)
    out: dict[str, list[int]] = {}
    for t in range(steps):
        for a, b in zip(ours, theirs):  # gradients of 1e-2 to 1e2: moments span float16's range
            a.grad = (torch.randn(a.shape, generator=gen) * 10.0 ** (t % 5 - 2)).half()
            b.grad = a.grad.clone()
        opt.step(), ref.step()
        pairs = [("param", ours, theirs)] + [(k, [opt.state[a][k] for a in ours], [ref.state[b][k] for b in theirs])
                                             for k in ref.state[theirs[0]] if k != "step"]
        for k, xs, ys in pairs:
            u = _float16_ulps(torch.cat([x.detach() for x in xs]), torch.cat([y.detach() for y in ys]))
            worst = out.setdefault(k, [0, 0, 0])
            worst[:] = [max(worst[0], int(u.max())), worst[1] + int((u > 0).sum()), worst[2] + u.numel()]
            with torch.no_grad():
                torch._foreach_copy_(xs, ys)
    assert opt._kernel_plan.reference == [] and {b.fmt for b in opt._kernel_plan.batches()} == {"float16"}
    return out


FUSED_FLOAT16 = [("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)),
                 ("SGD", dict(lr=1e-2, momentum=0.9, dampening=0.1, maximize=True)),
                 ("Adagrad", dict(lr=1e-2, lr_decay=0.01, weight_decay=0.1)),
                 ("Adam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)), ("AdamW", dict(lr=1e-2, maximize=True))]


@pytest.mark.parametrize("name,kw", FUSED_FLOAT16)
def test_fused_float16_is_torchs_float32_math_step_by_step(name, kw):
    """Tensors of at most 15 elements take torch's scalar loop on every ISA (its vector loops are 16 or 32 float16
    lanes wide), which is torch's float32 math with float32 constants: the kernels give the same bits, up to one
    ulp where a float32 operation order flips a float16 rounding (measured: Adam 1 element in ~500,000).

    Larger SGD and Adagrad tensors are not compared with torch: in torch 2.13 the vector loop of float16 fused SGD
    does not write the parameters back, and that of Adagrad rounds lr, eps and weight_decay to float16 (eps=1e-10
    becomes 0). The kernels keep the float32 math of torch's scalar loop for every element
    (tests/test_kernels.py checks that against a float32 step rounded to float16)."""
    result = _float16_step_by_step(name, kw, [15, 7, 1, 13] * 250)
    for k, (worst, differing, total) in result.items():
        assert worst <= 1 and differing <= max(2, total * 1e-5), (k, result)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_fused_float16_large_tensors_within_one_ulp_of_torch_fused(name):
    """torch's vector loop for float16 Adam/AdamW also keeps float32 constants: at most one float16 ulp, at
    about 1 element in 30,000 (measured: 3.3e-5 of exp_avg_sq, 1.3e-6 of params over 30 steps)."""
    result = _float16_step_by_step(name, dict(lr=1e-2, weight_decay=0.1), [100003, 40000])
    for k, (worst, differing, total) in result.items():
        assert worst <= 1 and differing <= total * 2e-4, (k, result)


def test_fused_true_on_meta_parameters_says_torchs_words_then_recovers():
    model = torch.nn.Linear(3, 2, device="meta")
    opt = akt.Adam(model.parameters(), fused=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="^`fused=True` requires all the params to be floating point Tensors"):
        opt.step()
    opt.zero_grad()
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # to_empty made new parameters; the optimizer's own (without gradients) are left alone


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adam", "AdamW"])
def test_fused_amp_protocol_found_inf_skips_and_grad_scale_unscales(name):
    results = []
    for cls in (getattr(akt, name), getattr(torch.optim, name)):
        p = torch.nn.Parameter(torch.ones(8))
        opt = cls([p], lr=1e-2, fused=True)
        assert opt._step_supports_amp_scaling
        p.grad = torch.full((8,), 4.0)
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.ones(())
        opt.step()
        skipped = p.detach().clone()
        opt.found_inf = torch.zeros(())
        opt.step()
        results.append((skipped, p.detach().clone(), p.grad.clone()))
    (s0, p0, g0), (s1, p1, g1) = results
    assert torch.equal(s0, torch.ones(8)) and torch.equal(s1, torch.ones(8))
    assert torch.allclose(p0, p1, rtol=1e-6) and torch.equal(g0, g1)


def test_state_dict_keeps_entries_that_are_not_per_parameter_states():
    p = torch.nn.Parameter(torch.ones(3))
    opt = akt.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    opt.state["note"] = 1  # a hook may do this; torch.optim keeps it
    assert opt.state_dict()["state"]["note"] == 1
    p.grad = torch.ones(3)
    opt.step()


def test_old_format_checkpoint_with_plain_number_steps_resumes_like_torch():
    ours, theirs = torch.nn.Parameter(torch.ones(5000)), torch.nn.Parameter(torch.ones(5000))
    source = torch.optim.RAdam([torch.nn.Parameter(torch.ones(5000))])
    source.param_groups[0]["params"][0].grad = torch.ones(5000)
    source.step()
    old = source.state_dict()
    old["state"][0]["step"] = float(old["state"][0]["step"])  # the pre-1.12 format
    opt, ref = akt.RAdam([ours]), torch.optim.RAdam([theirs])
    opt.load_state_dict(copy.deepcopy(old)), ref.load_state_dict(copy.deepcopy(old))  # torch keeps the dict's tensors
    for fused in (None, False):
        opt.param_groups[0]["fused"] = fused
        ours.grad, theirs.grad = torch.full((5000,), 0.5), torch.full((5000,), 0.5)
        opt.step(), ref.step()
    assert rel_error(ours, theirs) <= 2e-6 and float(opt.state[ours]["step"]) == 3.0


@pytest.mark.parametrize("fused", [None, False])
def test_bf16_states_and_stochastic_rounding_resume_bit_for_bit(fused):
    def run(resume: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(300).bfloat16())]
        make = lambda: akt.AdamW(ps, lr=1e-2, state_precision="bf16", stochastic_rounding=True, fused=fused)  # noqa
        opt = make()
        for t in range(10):
            if resume and t == 5:  # a fresh optimizer from the checkpoint, as after a restart
                saved = copy.deepcopy(opt.state_dict())
                opt = make()
                opt.load_state_dict(saved)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(t)).to(p.dtype)
            opt.step()
        return [p.detach().clone() for p in ps] + [v for s in opt.state.values() for v in s.values()]
    straight, resumed = run(False), run(True)
    assert len(straight) == len(resumed) and all(torch.equal(a, b) for a, b in zip(straight, resumed))


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "RAdam"])
def test_constructor_errors_are_torchs_words_in_torchs_order(name):
    inputs = [dict(lr=torch.tensor([1e-3, 1e-3]))]
    if name in ("Adam", "AdamW"):
        inputs += [dict(lr=torch.tensor(1e-3), foreach=True), dict(betas=(0.9, torch.tensor(0.99))),
                   dict(betas=(torch.tensor(0.9), 0.99)), dict(betas=(torch.tensor(0.9), torch.tensor(0.99)),
                                                             foreach=True)]
    for kw in inputs:
        with pytest.raises(ValueError) as theirs:
            getattr(torch.optim, name)(None, **kw)
        with pytest.raises(ValueError) as ours:
            getattr(akt, name)(None, **kw)
        assert str(ours.value).startswith(str(theirs.value)), (kw, str(ours.value))


_BAD_VALUES = {  # one bad hyperparameter at a time; torch.optim raises for each
    "SGD": [dict(lr=-1), dict(momentum=-0.5), dict(weight_decay=-1), dict(nesterov=True),
            dict(nesterov=True, momentum=0.9, dampening=0.1), dict(lr="0.1"), dict(lr=None), dict(momentum="0.9")],
    "Adagrad": [dict(lr=-1), dict(lr_decay=-1), dict(weight_decay=-1), dict(initial_accumulator_value=-1),
                dict(eps=-1), dict(eps="x")],
    "RMSprop": [dict(lr=-1), dict(eps=-1), dict(momentum=-1), dict(weight_decay=-1), dict(alpha=-1),
                dict(alpha=None)],
    "Adam": [dict(lr=-1), dict(eps=-1), dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1)), dict(weight_decay=-1),
             dict(betas=(0.9,)), dict(betas=0.9), dict(lr="0.1")],
    "AdamW": [dict(lr=-1e-3), dict(eps=-1), dict(betas=(-0.1, 0.999)), dict(weight_decay=-1), dict(betas=(0.9,))],
    "Adamax": [dict(lr=-1), dict(eps=-1), dict(betas=(0.9, 1.5)), dict(weight_decay=-1)],
    "NAdam": [dict(lr=-1), dict(eps=-1), dict(betas=(2, 0.9)), dict(weight_decay=-1), dict(momentum_decay=-1)],
    "RAdam": [dict(lr=-1), dict(eps=-1), dict(betas=(0.9, 1.0)), dict(weight_decay=-1)],
}


@pytest.mark.parametrize("name", sorted(_BAD_VALUES))
def test_bad_hyperparameters_raise_torchs_type_and_words_first(name):
    """torch's exception type for each bad value; for torch's own ValueErrors, its message starts ours (adamkit
    says more after it). TypeError and IndexError come from Python inside torch, so only the type is torch's."""
    for kw in _BAD_VALUES[name]:
        p = [torch.nn.Parameter(torch.zeros(3))]
        with pytest.raises(Exception) as theirs:
            getattr(torch.optim, name)(p, **kw)
        with pytest.raises(Exception) as ours:
            getattr(akt, name)(p, **kw)
        assert type(ours.value) is type(theirs.value), (kw, theirs.value, ours.value)
        if type(theirs.value) is ValueError:
            assert str(ours.value).startswith(str(theirs.value)), (kw, str(theirs.value), str(ours.value))


def test_flags_take_0_and_1_like_torch_and_refuse_other_values():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert akt.Adam(p, amsgrad=1).param_groups[0]["amsgrad"] == 1
    with pytest.raises(ValueError, match="Invalid amsgrad: 2 "):
        akt.Adam(p, amsgrad=2)


def test_adagrad_starts_every_group_from_the_constructors_accumulator_value_like_torch():
    def run(module):
        ps = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))]
        opt = module.Adagrad([{"params": ps[:1]}, {"params": ps[1:2], "initial_accumulator_value": 0.3}],
                             lr=0.1, initial_accumulator_value=0.1)
        opt.add_param_group({"params": ps[2:], "initial_accumulator_value": 0.7})
        for t in range(3):
            for p in ps:
                p.grad = torch.full((4,), 0.5 + t)
            opt.step()
        return [p.detach().clone() for p in ps] + [opt.state[p]["sum"].clone() for p in ps]
    for theirs, ours in zip(run(torch.optim), run(akt)):
        assert torch.allclose(theirs, ours, rtol=1e-6, atol=0), (theirs, ours)


def _differentiable_run(module, name, lr):
    """Three differentiable steps from w; returns (final parameter, the objective's gradient w.r.t. w)."""
    w = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    p = w.clone()  # not a leaf: the step updates it in place inside the graph
    opt = getattr(module, name)([p], lr=lr, differentiable=True)
    for t in range(3):
        p.grad = torch.randn(6, generator=torch.Generator().manual_seed(t + 1), dtype=torch.float64)
        opt.step()
    objective = (p * torch.arange(6, dtype=torch.float64)).sum()
    objective.backward()
    return p.detach().clone(), w.grad.clone(), float(objective)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "RAdam"])
def test_differentiable_step_is_part_of_the_graph_like_torch(name):
    p0, w0, _ = _differentiable_run(torch.optim, name, 0.1)
    p1, w1, _ = _differentiable_run(akt, name, 0.1)
    # torch's differentiable path computes bias corrections from its float32 step tensor; adamkit's are float64
    assert torch.allclose(p0, p1, rtol=2e-6) and torch.allclose(w0, w1, rtol=2e-6), (p0 - p1, w0 - w1)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "RAdam"])
def test_differentiable_gradient_matches_finite_differences(name):
    """Every class, Adamax included (whose differentiable step torch.optim cannot backpropagate through)."""
    _, grad, _ = _differentiable_run(akt, name, 0.1)
    h = 1e-6
    for i in (0, 3):
        shifted = []
        for d in (h, -h):
            w = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            w[i] += d
            p = w.clone()
            opt = getattr(akt, name)([p], lr=0.1)
            for t in range(3):
                p.grad = torch.randn(6, generator=torch.Generator().manual_seed(t + 1), dtype=torch.float64)
                opt.step()
            shifted.append(float((p * torch.arange(6, dtype=torch.float64)).sum()))
        assert abs(float(grad[i]) - (shifted[0] - shifted[1]) / (2 * h)) <= 1e-5 * max(1.0, abs(float(grad[i])))


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "RAdam"])
def test_differentiable_gradient_reaches_a_tensor_lr(name):
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    _differentiable_run(akt, name, lr)
    h = 1e-6  # central difference of the objective in lr: error O(h²) on a smooth function
    up, down = (_differentiable_run(akt, name, torch.tensor(0.1 + d, dtype=torch.float64))[2] for d in (h, -h))
    assert lr.grad is not None and abs(float(lr.grad) - (up - down) / (2 * h)) <= 1e-6 * max(1.0, abs(float(lr.grad)))


def test_differentiable_and_fused_is_torchs_error():
    with pytest.raises(RuntimeError, match="^`fused` does not support `differentiable`"):
        akt.Adam([torch.nn.Parameter(torch.ones(2))], fused=True, differentiable=True)
    for name in ("SGD", "Adagrad", "Adam", "AdamW"):
        for module in (torch.optim, akt):
            with pytest.raises(RuntimeError, match="^`fused` and `foreach` cannot be `True` together.$"):
                getattr(module, name)([torch.nn.Parameter(torch.ones(2))], fused=True, foreach=True)


def test_capturable_on_cpu_is_accepted_then_refused_at_the_step_with_torchs_words():
    for name, tensors in (("Adam", "params and state_steps"), ("NAdam", "params, mu_products and state_steps")):
        for module in (torch.optim, akt):
            p = torch.nn.Parameter(torch.ones(3))
            opt = getattr(module, name)([p], capturable=True)
            p.grad = torch.ones(3)
            with pytest.raises(AssertionError, match=f"^If capturable=True, {tensors} must be on supported"):
                opt.step()
            assert torch.equal(p, torch.ones(3))


def test_tensor_lr_with_foreach_is_refused_only_where_torch_refuses_it():
    for name in ("SGD", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam"):
        p = torch.nn.Parameter(torch.ones(3))
        getattr(akt, name)([p], lr=torch.tensor(0.01), foreach=True)  # torch.optim takes it too
        getattr(torch.optim, name)([p], lr=torch.tensor(0.01), foreach=True)


def test_float16_params_with_int8_states_step_in_float32_on_the_reference_path():
    """In float16, ε = 1e-8 is 0, and a second moment that dequantizes to 0 would divide by 0: the reference path
    computes 16-bit parameters with 8-bit states in float32, as the kernels do, and both agree."""
    torch.manual_seed(0)
    start = torch.randn(8192).half()
    grads = [(torch.randn(8192) * 10.0 ** -torch.randint(0, 6, (8192,)).float()).half() for _ in range(20)]
    finals = []
    for fused in (False, None):
        p = torch.nn.Parameter(start.clone())
        opt = akt.Adam([p], lr=1e-3, state_precision="int8", fused=fused)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        assert torch.isfinite(p).all()
        finals.append(p.detach().float())
    # the same float32 math on both paths; float16 rounding of the parameter after each step: within 2 ulps
    torch.testing.assert_close(finals[0], finals[1], rtol=2 * 2 ** -10, atol=1e-4)


@pytest.mark.parametrize("fused", [None, False])
def test_a_state_re_pointed_in_place_is_the_one_stepped_like_torch(fused):
    """``.data =`` and ``set_()`` keep a state's tensor object but move its memory: the step must use the new
    memory (the compiled path compares the state tensors' addresses at each step)."""
    def run(module, how, key):
        p = torch.nn.Parameter(torch.ones(300))
        kw = {} if module is torch.optim else {"fused": fused}
        opt = module.SGD([p], lr=0.1, momentum=0.9, **kw) if key == "momentum_buffer" else module.Adam([p], lr=0.1,
                                                                                                        **kw)
        for _ in range(3):
            p.grad = torch.ones(300)
            opt.step()
        new = torch.zeros(()) if key == "step" else torch.zeros(300)
        if how == "set":
            opt.state[p][key].set_(new)
        else:
            opt.state[p][key].data = new
        p.grad = torch.ones(300)
        opt.step()
        return p.detach().clone(), opt.state[p][key].clone()
    for how in ("set", "data"):
        for key in ("momentum_buffer", "exp_avg", "step"):
            theirs, ours = run(torch.optim, how, key), run(akt, how, key)
            assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(theirs, ours)), (how, key)


@pytest.mark.parametrize("fused", [None, False])
def test_a_parameter_reshaped_under_its_state_is_refused_before_anything_changes(fused):
    a, b = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(4, 3))
    opt = akt.Adam([a, b], lr=0.1, fused=fused)
    a.grad, b.grad = torch.ones(5), torch.ones(4, 3)
    opt.step()
    b.data = torch.zeros(12)  # same size, another shape: torch.optim's step fails on the broadcast
    a.grad, b.grad = torch.ones(5), torch.ones(12)
    before = copy.deepcopy(opt.state_dict()), a.detach().clone()
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' has shape \(4, 3\).*the parameter \(12,\)"):
        opt.step()
    assert torch.equal(a, before[1]) and float(opt.state[a]["step"]) == 1.0
    assert torch.equal(opt.state[a]["exp_avg"], before[0]["state"][0]["exp_avg"])


@pytest.mark.parametrize("fused", [None, False])
def test_a_deleted_state_is_torchs_key_error_and_nothing_changes(fused):
    for module in (torch.optim, akt):
        ps = [torch.nn.Parameter(torch.zeros(8)), torch.nn.Parameter(torch.zeros(8))]
        opt = module.Adam(ps, lr=0.1, **({} if module is torch.optim else {"fused": fused}))
        for _ in range(2):
            for p in ps:
                p.grad = torch.ones(8)
            opt.step()
        del opt.state[ps[1]]["exp_avg_sq"]
        before = ps[0].detach().clone()
        with pytest.raises(KeyError, match="exp_avg_sq"):
            opt.step()
        assert torch.equal(ps[0], before) and float(opt.state[ps[0]]["step"]) == 2.0
    ours, theirs = (module.SGD([torch.nn.Parameter(torch.ones(8))], lr=0.1, momentum=0.9)
                    for module in (akt, torch.optim))
    for opt in (ours, theirs):  # SGD's buffer restarts from the gradient in torch.optim: the same here
        p = opt.param_groups[0]["params"][0]
        for t in range(3):
            p.grad = torch.full((8,), 1.0 + t)
            opt.step()
            if t == 0:
                del opt.state[p]["momentum_buffer"]
    assert torch.allclose(ours.param_groups[0]["params"][0], theirs.param_groups[0]["params"][0], rtol=1e-6)


def test_torch_checkpoint_of_bfloat16_centered_rmsprop_resumes_on_float32_parameters_like_torch():
    """torch.optim saves a bfloat16 parameter's states in bfloat16, in its own form (v); loaded into float32
    parameters they are v, not adamkit's stored variance."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, generator=g).bfloat16())
    source = torch.optim.RMSprop([w], lr=0.01, centered=True)
    for _ in range(3):
        w.grad = torch.randn(8, generator=g).bfloat16()
        source.step()
    saved = source.state_dict()
    loaded = []
    for module, kw in ((torch.optim, {}), (akt, {}), (akt, {"state_precision": "bf16"})):
        p = torch.nn.Parameter(w.detach().float().clone())
        opt = module.RMSprop([p], lr=0.01, centered=True, **kw)
        opt.load_state_dict(saved)
        loaded.append(opt.state[p]["square_avg"].float() if not kw else
                      torch.as_tensor(opt.torch_state_dict()["state"][0]["square_avg"]).float())
    assert torch.equal(loaded[0], loaded[1])
    assert torch.allclose(loaded[0], loaded[2], rtol=2 ** -7, atol=0)  # bf16 storage: v − ḡ² and back


def test_torch_sgd_checkpoint_with_a_sparse_momentum_buffer_loads_and_steps_like_torch():
    p = torch.nn.Parameter(torch.randn(20, generator=torch.Generator().manual_seed(0)))
    source = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    for t in range(2):
        p.grad = torch.sparse_coo_tensor(torch.tensor([[t, 5]]), torch.ones(2), (20,))
        source.step()
    saved = source.state_dict()
    assert saved["state"][0]["momentum_buffer"].is_sparse
    runs = []
    for module in (torch.optim, akt):
        q = torch.nn.Parameter(p.detach().clone())
        opt = module.SGD([q], lr=0.1, momentum=0.9)
        opt.load_state_dict(copy.deepcopy(saved))  # torch.optim steps a loaded sparse buffer in place
        for _ in range(2):
            q.grad = torch.sparse_coo_tensor(torch.tensor([[3, 5]]), torch.ones(2), (20,))
            opt.step()
        runs.append(q.detach())
    assert torch.equal(runs[0], runs[1])


def test_parameters_that_are_overlapping_views_step_one_after_another_like_torch():
    """Two parameters sharing memory are stepped in order, as torch.optim steps them (the kernels' threads would
    race on the shared elements): the same result every run, torch's within float32 round-off."""
    def run(module):
        base = torch.randn(20000, generator=torch.Generator().manual_seed(0))
        ps = [torch.nn.Parameter(base[:12000]), torch.nn.Parameter(base[8000:])]
        opt = module.Adam(ps, lr=0.01)
        for t in range(5):
            g = torch.Generator().manual_seed(t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return base
    theirs, first, second = run(torch.optim), run(akt), run(akt)
    assert torch.equal(first, second) and torch.allclose(first, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["Adagrad", "Adam"])
def test_a_dcp_checkpoint_with_rounding_states_resumes_bit_for_bit(name, tmp_path):
    """The rounding stream lives in the first group; DCP loads only the keys a fresh optimizer has, so one whose
    states exist from construction (Adagrad) has it from construction too."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
        return model, getattr(akt, name)(model.parameters(), lr=0.01, state_precision="bf16")
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g)) for _ in range(8)]

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    model, opt = make(0)
    train(model, opt, data[:4])
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"m": model_sd, "o": optim_sd}, checkpoint_id=str(tmp_path))
    resumed, resumed_opt = make(5)
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    loaded = {"m": model_sd, "o": optim_sd}
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    set_state_dict(resumed, resumed_opt, model_state_dict=loaded["m"], optim_state_dict=loaded["o"])
    assert resumed_opt.param_groups[0]["stochastic_rounding_stream"] == opt.param_groups[0]["stochastic_rounding_stream"]
    train(model, opt, data[4:])
    train(resumed, resumed_opt, data[4:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
