"""Section — the ideas behind Adam, one run each: rare features, invariance to the gradient's scale, shrinking
steps when the signal is weak, what ε does, β₁ × β₂, and what the state costs in memory.

Every figure is a run of ``adamkit.numpy`` or ``adamkit.minimize``; the figures are in
:mod:`adamkit.demo.ideas_figures`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

import adamkit.numpy as akn

from . import ideas_figures as figs
from .functions import FUNCTIONS, gaps, optimize, tune
from .lineage import VALLEY
from .report import Section

SPARSE_OPTIMIZERS = {"SGD": akn.SGD, "AdaGrad": akn.Adagrad, "Adam": akn.Adam}


def sparse_run(cls: type, lr: float, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One pass of single-example steps on the squared error; the weights after every step, shape (n + 1, 2)."""
    w = np.zeros(2)
    opt = cls([w], lr=lr)
    out = [w.copy()]
    for x, target in zip(X, y):
        opt.step([2 * (x @ w - target) * x])
        out.append(w.copy())
    return np.array(out)


def sparse(steps: int, rng: np.random.Generator) -> dict[str, Any]:
    """A dense feature (always on) and a rare one (on for 2 % of the examples), true weights (2, 3). Each
    optimizer's lr is the best of a grid for the final squared error of both weights."""
    X = np.column_stack([rng.normal(size=steps), (rng.random(steps) < 0.02).astype(float)])
    w_true = np.array([2.0, 3.0])
    y = X @ w_true + 0.1 * rng.normal(size=steps)
    runs = {}
    for name, cls in SPARSE_OPTIMIZERS.items():
        trials = [(lr, sparse_run(cls, lr, X, y)) for lr in np.logspace(-3, 0, 7)]
        runs[name] = min(trials, key=lambda t: float(np.sum((t[1][-1] - w_true) ** 2)))
    return {"runs": runs, "w_true": w_true, "rare_seen": int(X[:, 1].sum()), "steps": steps}


def scale_invariance(steps: int, factor: float = 1000.0) -> dict[str, np.ndarray]:
    """Paths on the valley and on ``factor`` × the valley, for SGD and Adam with the same lr each."""
    scaled = replace(VALLEY, f=lambda p: factor * VALLEY.f(p), grad=lambda p: factor * VALLEY.grad(p))
    return {f"{name}_{k}": optimize(fn, method, {}, lr, steps)
            for name, method, lr in (("SGD", "sgd", 0.015), ("Adam", "adam", 0.1))
            for k, fn in (("1", VALLEY), ("k", scaled))}


def low_snr(steps: int, rng: np.random.Generator, sigmas=(0.1, 2.0), lr: float = 0.05) -> dict[str, np.ndarray]:
    """Adam on f(θ) = θ²/2 with gradients θ + σ·noise: θ and the step |Δθ|/lr for each σ."""
    out = {}
    noise = rng.normal(size=steps)
    for sigma in sigmas:
        theta = np.array([5.0])
        opt = akn.Adam([theta], lr=lr)
        thetas, moves = [], []
        for t in range(steps):
            before = theta[0]
            opt.step([theta + sigma * noise[t:t + 1]])
            thetas.append(theta[0])
            moves.append(abs(theta[0] - before) / lr)
        out[sigma] = (np.array(thetas), np.array(moves))
    return out


def epsilon(steps: int, eps_values=(1e-8, 1e-4, 1e-2, 1.0), scale: float = 1e-4) -> dict[float, np.ndarray]:
    """Adam (lr 0.1) on ``scale`` × the valley, whose gradients are small, for several ε: f − f* per step."""
    small = replace(VALLEY, f=lambda p: scale * VALLEY.f(p), grad=lambda p: scale * VALLEY.grad(p))
    return {e: gaps(small, optimize(small, "adam", {"eps": e}, 0.1, steps)) / scale for e in eps_values}


def betas_grid(quick: bool) -> dict[str, Any]:
    """Adam on Rosenbrock over β₁ × β₂ at the lr the default betas prefer; log10 of the final f − f*."""
    fn = FUNCTIONS[0]
    steps = fn.quick_steps if quick else fn.steps
    lr = tune(fn, "adam", {}, np.logspace(-3, -1, 5), steps)[0]
    b1s, b2s = [0.0, 0.5, 0.9, 0.95, 0.99], [0.9, 0.99, 0.999, 0.9999]
    final = np.array([[max(gaps(fn, optimize(fn, "adam", {"betas": (b1, b2)}, lr, steps))[-1], 1e-12)
                       for b2 in b2s] for b1 in b1s])
    return {"lr": lr, "b1s": b1s, "b2s": b2s, "final": final, "steps": steps, "name": fn.name}


MEMORY = {"SGD + momentum": (akn.SGD, {"momentum": 0.9}), "AdaGrad": (akn.Adagrad, {}), "RMSprop": (akn.RMSprop, {}),
          "Adam": (akn.Adam, {}), "AMSGrad": (akn.Adam, {"amsgrad": True}), "AdamW": (akn.AdamW, {}),
          "AdaMax": (akn.Adamax, {}), "NAdam": (akn.NAdam, {}), "RAdam": (akn.RAdam, {})}


def state_arrays(cls: type, options: dict, precision: str | None, n: int) -> dict[str, np.ndarray]:
    """The arrays of a real ``state_dict`` after one step on a float32 parameter of ``n`` elements."""
    p = np.zeros(n, dtype=np.float32)
    opt = cls([p], lr=1e-3, state_precision=precision, **options)
    opt.step([np.ones_like(p)])
    return {k: v for k, v in opt.state_dict()["state"][0].items() if isinstance(v, np.ndarray)}


def state_bytes(cls: type, options: dict, precision: str | None, n: int) -> float:
    """Bytes of optimizer state per parameter."""
    return sum(a.nbytes for a in state_arrays(cls, options, precision, n).values()) / n


def run(sec: Section, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    sec.text("Each figure below isolates one idea with a run of its own. Code: <code>adamkit/demo/ideas.py</code>.")
    rng = np.random.default_rng(seed)
    r: dict[str, Any] = {}
    figs.sparse(sec, r, sparse(1000 if quick else 3000, rng))
    sec.progress("rare features done")
    figs.scale(sec, r, scale_invariance(100))
    figs.snr(sec, r, low_snr(600 if quick else 1500, rng))
    figs.eps(sec, r, epsilon(200))
    sec.progress("scale, signal-to-noise and ε done")
    sec.progress("β₁ × β₂ grid on Rosenbrock")
    figs.betas(sec, r, betas_grid(quick))
    n, n_small = 1 << 16, 1000
    sizes = {name: {prec: state_bytes(cls, opts, prec, n) for prec in (None, "bf16", "int8")}
             for name, (cls, opts) in MEMORY.items()}
    block = n / state_arrays(akn.Adam, {}, "int8", n)["exp_avg.absmax"].size  # elements per absmax
    figs.memory(sec, r, sizes, state_bytes(akn.Adam, {}, "int8", n_small), n, block, n_small)
    sec.summary = (f"rare feature: AdaGrad/Adam error {r['sp_err_AdaGrad']:.2g}/{r['sp_err_Adam']:.2g} vs SGD "
                   f"{r['sp_err_SGD']:.2g}; Adam state {r['mem_Adam_fp32']:g} → {r['mem_Adam_int8']:.2f} bytes/param")
    return r
