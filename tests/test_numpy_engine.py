"""The NumPy engine: equal to the PyTorch engine in float64, the seed example, minimize and scipy_method."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize
import torch

import adamkit
import adamkit.numpy as akn
import adamkit.torch as akt
from conftest import SECOND_GROUP, grid_cases, gradient, has_grad, make_problem, rel_error


@pytest.mark.parametrize("name,cfg", grid_cases()[::3], ids=[f"{n}-{i}" for i, (n, _) in enumerate(grid_cases()[::3])])
def test_numpy_engine_equals_torch_engine_float64(name, cfg):
    init, targets = make_problem(torch.float64)
    tp = [torch.nn.Parameter(x.clone()) for x in init]
    npp = [x.numpy().copy() for x in init]
    topt = akt.OPTIMIZERS[name]([{"params": tp[:2]}, {"params": tp[2:], **SECOND_GROUP[name]}], **cfg, fused=False)
    nopt = akn.OPTIMIZERS[name]([{"params": npp[:2]}, {"params": npp[2:], **SECOND_GROUP[name]}], **cfg)
    for t in range(60):
        grads = []
        for i, p in enumerate(tp):
            g = gradient(p, targets[i], t, i) if has_grad(t, i) else None
            p.grad = g
            grads.append(None if g is None else g.numpy().copy())
        topt.step()
        nopt.step(grads)
        for i, (a, b) in enumerate(zip(npp, tp)):
            assert rel_error(torch.from_numpy(a), b) <= 1e-12
    sd = nopt.state_dict()
    for i, p in enumerate(tp):
        for k, v in topt.state[p].items():
            assert rel_error(torch.as_tensor(sd["state"][i][k]), v) <= 1e-12, (k, i)


def test_seed_linear_regression_reaches_least_squares():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4))
    w_true = np.array([1.5, -2.0, 0.5, 3.0])
    y = X @ w_true + 1.0 + 0.1 * rng.normal(size=200)
    A = np.hstack([X, np.ones((200, 1))])
    w_ls, *_ = np.linalg.lstsq(A, y, rcond=None)
    w, b = np.zeros(4), np.zeros(1)
    opt = akn.Adam([w, b], lr=0.05)
    for epoch in range(3000):
        r = X @ w + b - y
        opt.step([X.T @ r * (2 / len(y)), np.array([2 * r.mean()])])
    assert np.allclose(np.append(w, b), w_ls, atol=1e-6), (np.append(w, b), w_ls)


def rosen(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def rosen_grad(x):
    return np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])


@pytest.mark.parametrize("method,options", [
    ("adam", {"lr": 0.02}), ("amsgrad_via_adam", {"lr": 0.02, "amsgrad": True}), ("adamw", {"lr": 0.02, "weight_decay": 0}),
    ("nadam", {"lr": 0.01}), ("radam", {"lr": 0.01}), ("adamax", {"lr": 0.02}), ("rmsprop", {"lr": 1e-3}),
    ("adagrad", {"lr": 0.5}), ("sgd", {"lr": 1e-3, "momentum": 0.9}),
])
def test_minimize_every_method_on_rosenbrock(method, options):
    method = "adam" if method.startswith("amsgrad") else method
    res = adamkit.minimize(rosen, [-1.0, 1.0], method=method, jac=rosen_grad,
                           options={**options, "maxiter": 20000, "gtol": 1e-5})
    assert isinstance(res, scipy.optimize.OptimizeResult)
    # constant-lr adaptive methods hover around the valley's end; they must get there
    assert np.allclose(res.x, [1, 1], atol=3e-2), res.x
    assert res.fun == rosen(res.x) and np.array_equal(res.jac, rosen_grad(res.x))
    assert res.nfev == res.nit + 1 and res.success == (res.status == 0)


@pytest.mark.parametrize("method", adamkit.minimize.__globals__["METHODS"])
def test_minimize_converges_to_gtol_on_a_convex_quadratic(method):
    H = np.diag([1.0, 3.0, 10.0])
    lr = {"sgd": 0.05, "adagrad": 0.5, "rmsprop": 0.01}.get(method, 0.05)
    opts = {"lr": lr, "maxiter": 20000, "gtol": 1e-8}
    if method == "adamw":
        opts["weight_decay"] = 0.0
    res = adamkit.minimize(lambda x: (0.5 * x @ H @ x - x.sum(), H @ x - 1), np.zeros(3), jac=True, method=method,
                           options=opts)
    assert res.success and res.status == 0, res.message
    assert np.allclose(res.x, np.linalg.solve(H, np.ones(3)), atol=1e-7)


def test_scipy_method_gives_same_result():
    opts = {"lr": 0.02, "maxiter": 500}
    ours = adamkit.minimize(lambda x: (rosen(x), rosen_grad(x)), [-1.0, 1.0], jac=True, method="nadam", options=opts)
    via = scipy.optimize.minimize(lambda x: (rosen(x), rosen_grad(x)), [-1.0, 1.0], jac=True,
                                  method=adamkit.scipy_method("nadam"), options=opts)
    assert np.array_equal(ours.x, via.x) and ours.nit == via.nit == 500 and not via.success


def test_minimize_bounds_callback_ftol_and_finite_differences():
    seen = []
    res = adamkit.minimize(lambda x: float(np.sum((x - 3) ** 2)), np.zeros(3), method="adam",
                           bounds=[(None, 1.0), (-1, 2), (0, None)], callback=seen.append,
                           options={"lr": 0.1, "maxiter": 2000, "gtol": 1e-4})
    assert np.allclose(res.x[:2], [1.0, 2.0]) and abs(res.x[2] - 3) < 1e-3
    assert len(seen) == res.nit
    res = adamkit.minimize(lambda x: float(np.sum(x ** 2)), [1.0, 2.0], method="sgd", options={"lr": 0.1, "ftol": 1e-3,
                                                                                            "gtol": 0})
    assert res.status == 2 and res.success
    with pytest.raises(ValueError, match="unknown option"):
        adamkit.minimize(rosen, [0.0, 0.0], options={"learning_rate": 0.1})
    with pytest.raises(ValueError, match="unknown method"):
        adamkit.minimize(rosen, [0.0, 0.0], method="lbfgs")
    with pytest.raises(ValueError, match="x0 must be finite"):
        adamkit.minimize(rosen, [np.nan, 0.0])


@pytest.mark.parametrize("name", list(akn.OPTIMIZERS))
def test_defaults_and_signature_match_torch(name):
    import inspect
    cls = akn.OPTIMIZERS[name]
    torch_cls = getattr(torch.optim, cls.__name__)
    tsig = inspect.signature(torch_cls.__init__).parameters
    for h in cls.rule.hypers:
        assert h.name in tsig and tsig[h.name].default == h.default, h.name
    t_cls = akt.OPTIMIZERS[cls.__name__]
    ours = inspect.signature(t_cls).parameters
    extras = ("check_finite", "fused", "stochastic_rounding", "state_precision")  # adamkit-only keywords
    assert [p for p in ours if p not in extras] == [p for p in tsig if p not in ("self", "fused")]


@pytest.mark.parametrize("bad,match", [
    (dict(lr=-1.0), "learning rate"), (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(1.0, 0.999)), "beta parameter at index 0"), (dict(betas=(0.9, -0.1)), "index 1"),
    (dict(lr=float("nan")), "learning rate"), (dict(amsgrad="yes"), "amsgrad"),
])
def test_invalid_hyperparameters_raise_at_construction(bad, match):
    with pytest.raises(ValueError, match=match):
        akn.Adam([np.zeros(2)], **bad)
    with pytest.raises(ValueError, match=match):
        akt.Adam([torch.zeros(2, requires_grad=True)], **bad)


def test_other_invalid_hyperparameters():
    with pytest.raises(ValueError, match="nesterov"):
        akt.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="dampening"):
        akn.SGD([np.zeros(2)], dampening=2.0)
    with pytest.raises(ValueError, match="alpha"):
        akn.RMSprop([np.zeros(2)], alpha=1.5)
    with pytest.raises(ValueError, match="momentum_decay"):
        akt.NAdam([torch.zeros(2, requires_grad=True)], momentum_decay=-1)
    with pytest.raises(ValueError, match="lr_decay"):
        akt.Adagrad([torch.zeros(2, requires_grad=True)], lr_decay=-1)
    with pytest.raises(ValueError, match="learning rate"):
        akt.Adam([{"params": [torch.zeros(2, requires_grad=True)], "lr": -1}])
    with pytest.raises(TypeError, match="unexpected keyword"):
        akt.Adam([torch.zeros(2, requires_grad=True)], beta1=0.9)
    with pytest.raises(ValueError, match="capturable"):
        akt.Adam([torch.zeros(2, requires_grad=True)], capturable="yes")
    with pytest.raises(TypeError, match="NumPy arrays"):
        akn.Adam([[1.0, 2.0]])
    with pytest.raises(TypeError, match="floating"):
        akn.Adam([np.zeros(2, dtype=np.int64)])


def test_numpy_bad_gradients_leave_everything_untouched():
    w = np.ones(3)
    opt = akn.Adam([w], lr=0.1)
    opt.step([np.ones(3)])
    before = (w.copy(), opt.state_dict())
    for bad, err in [(np.array([1.0, np.nan, 0.0]), FloatingPointError), (np.ones(4), ValueError),
                     (np.ones(3, dtype=np.float32), TypeError)]:
        with pytest.raises(err):
            opt.step([bad])
        assert np.array_equal(w, before[0])
        assert opt.state_dict()["state"][0]["step"] == 1.0


def test_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, adamkit, adamkit.numpy\n"
            "w = np.zeros(2); o = adamkit.numpy.AdamW([w], lr=0.1); o.step([np.ones(2)])\n"
            "r = adamkit.minimize(lambda x: float((x**2).sum()), [1.0], options={'lr': 0.1, 'maxiter': 5})\n"
            "assert 'numba' not in sys.modules, 'importing adamkit must not compile or import numba'\n"
            "print('ok', w)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok [-0.1 -0.1]")


def test_sgd_momentum_buffer_is_a_copy_of_the_first_gradient_like_torch():
    w, wt = np.array([1.0, 2.0]), torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    opt, ref = akn.SGD([w], lr=0.1, momentum=0.9, nesterov=True), torch.optim.SGD([wt], lr=0.1, momentum=0.9,
                                                                                   nesterov=True)
    g = np.empty(2)
    for _ in range(3):
        g[:] = 2 * w  # the caller refills one gradient buffer in place
        opt.step([g])
        wt.grad = 2 * wt.detach().clone()
        ref.step()
    assert not np.shares_memory(opt.state[0]["momentum_buffer"], g)
    assert np.allclose(w, wt.detach().numpy(), rtol=1e-15, atol=0)
    same = np.array([1.0, 2.0])
    opt = akn.SGD([same], lr=0.1, momentum=0.9)
    opt.step([same])  # the parameter itself as its gradient
    assert not np.shares_memory(opt.state[0]["momentum_buffer"], same)


def test_adagrad_groups_start_from_the_constructors_accumulator_value_like_torch():
    ours, theirs = [np.ones(4), np.ones(4)], [torch.ones(4, dtype=torch.float64, requires_grad=True) for _ in "ab"]
    opt = akn.Adagrad([{"params": ours[:1]}, {"params": ours[1:], "initial_accumulator_value": 0.3}],
                      initial_accumulator_value=0.1)
    ref = torch.optim.Adagrad([{"params": theirs[:1]}, {"params": theirs[1:], "initial_accumulator_value": 0.3}],
                              initial_accumulator_value=0.1)
    opt.step([np.full(4, 0.5)] * 2)
    for t in theirs:
        t.grad = torch.full((4,), 0.5, dtype=torch.float64)
    ref.step()
    for a, b in zip(ours, theirs):
        assert np.allclose(a, b.detach().numpy(), rtol=1e-15, atol=0)


def test_minimize_gives_fun_and_jac_copies_and_counts_every_evaluation():
    seen, calls = [], [0]

    def fun(x):
        seen.append(x)
        calls[0] += 1
        return float(np.sum((x - 1) ** 2))
    adamkit.minimize(fun, np.zeros(2), jac=lambda x: 2 * (x - 1), options={"maxiter": 5, "lr": 0.1})
    assert len({tuple(s) for s in seen}) == len(seen) == 6  # x0 and five iterates, each kept as it was passed
    calls[0] = 0
    res = adamkit.minimize(fun, np.zeros(3), options={"maxiter": 4, "lr": 0.1})  # forward differences
    assert res.nfev == calls[0] == 5 * 4  # per point: f, then one call per variable
    momentum = adamkit.minimize(lambda x: 0.5 * x @ x, np.array([1.0, 2.0]), method="sgd", jac=lambda x: x,
                                options={"lr": 0.1, "momentum": 0.9, "maxiter": 3})
    copied = adamkit.minimize(lambda x: 0.5 * x @ x, np.array([1.0, 2.0]), method="sgd", jac=lambda x: x.copy(),
                              options={"lr": 0.1, "momentum": 0.9, "maxiter": 3})
    assert np.array_equal(momentum.x, copied.x)


def test_minimize_respects_bounds_in_differences_and_converges_on_a_bound():
    points = []

    def f(x):
        points.append(x.copy())
        return float(np.sum(np.sqrt(1 - x)))  # nan beyond x = 1
    res = adamkit.minimize(f, np.array([1.0, 0.0]), bounds=[(None, 1), (None, 1)], options={"maxiter": 50, "lr": 0.1})
    assert max(p.max() for p in points) <= 1.0 and res.status != 4
    res = adamkit.minimize(lambda x: float(x[0] + (x[1] - 2) ** 2), np.array([1.0, 0.0]),
                           jac=lambda x: np.array([1.0, 2 * (x[1] - 2)]), bounds=[(0, 5), (None, None)],
                           options={"lr": 0.05, "maxiter": 3000})
    assert res.success and res.status == 0 and res.nit < 3000 and res.x[0] == 0.0 and res.jac[0] == 1.0


def test_minimize_takes_scipys_conventions_for_tol_callbacks_args_and_bounds():
    quad = lambda x, a=0.0: float(np.sum((x - a) ** 2))  # noqa: E731
    res = scipy.optimize.minimize(quad, np.ones(2), jac=lambda x: 2 * x, tol=1e-3,
                                  method=adamkit.scipy_method("adam"), options={"lr": 0.1})
    assert res.success and np.max(np.abs(res.jac)) <= 1e-3
    seen = []

    def positional(xk, intermediate_result=None):  # SciPy calls this one with xk
        seen.append(xk)
    adamkit.minimize(quad, np.ones(2), jac=lambda x: 2 * x, callback=positional, options={"maxiter": 3})
    assert len(seen) == 3 and all(isinstance(x, np.ndarray) for x in seen)
    res = adamkit.minimize(quad, np.zeros(2), args=3.0, jac=lambda x, a: 2 * (x - a), options={"lr": 0.1})
    assert res.success and np.allclose(res.x, 3.0, atol=1e-5)
    box = scipy.optimize.Bounds(np.zeros((2, 3)), np.full((2, 3), 0.5))
    res = adamkit.minimize(quad, np.zeros((2, 3)), args=(1.0,), jac=lambda x, a: 2 * (x - a), bounds=box,
                           options={"lr": 0.1})
    assert res.x.shape == (2, 3) and np.allclose(res.x, 0.5) and res.success
    with pytest.raises(ValueError, match=r"the gradient has shape \(3, 2\); x has shape \(2, 3\)"):
        adamkit.minimize(quad, np.zeros((2, 3)), jac=lambda x: (2 * x).T)
