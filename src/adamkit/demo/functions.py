"""Section 3 — the whole family on two-dimensional test functions, through ``adamkit.minimize``.

Eleven optimizers (SGD, Momentum, Nesterov, AdaGrad, RMSprop, Adam, AMSGrad, AdamW, AdaMax, NAdam, RAdam) on
Rosenbrock's banana valley, Beale's function and a saddle. No learning rate is hand-picked: each optimizer
runs every learning rate of a log grid and keeps the one with the lowest loss after the fixed number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import adamkit

from matplotlib.colors import LogNorm

from .report import Section, plt


@dataclass(frozen=True)
class TestFunction:
    name: str
    formula: str
    f: Callable[[np.ndarray], float]
    grad: Callable[[np.ndarray], np.ndarray]
    start: tuple[float, float]
    minimum: tuple[float, float]  # the one the paths head for; ``others`` are further minima, for the plot
    f_min: float
    box: tuple[float, float, float, float]  # x0, x1, y0, y1 of the contour plot
    steps: int
    quick_steps: int
    others: tuple[tuple[float, float], ...] = ()


def _rosenbrock(p):
    x, y = p
    return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2


def _rosenbrock_grad(p):
    x, y = p
    return np.array([-2 * (1 - x) - 400 * x * (y - x ** 2), 200 * (y - x ** 2)])


def _beale(p):
    x, y = p
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y ** 2) ** 2 + (2.625 - x + x * y ** 3) ** 2


def _beale_grad(p):
    x, y = p
    a, b, c = 1.5 - x + x * y, 2.25 - x + x * y ** 2, 2.625 - x + x * y ** 3
    return np.array([2 * a * (y - 1) + 2 * b * (y ** 2 - 1) + 2 * c * (y ** 3 - 1),
                     2 * a * x + 4 * b * x * y + 6 * c * x * y ** 2])


def _saddle(p):
    x, y = p
    return x ** 2 - y ** 2 + y ** 4 / 4


def _saddle_grad(p):
    x, y = p
    return np.array([2 * x, -2 * y + y ** 3])


FUNCTIONS = [
    TestFunction("Rosenbrock", "(1 − x)² + 100 (y − x²)²", _rosenbrock, _rosenbrock_grad, (-1.5, 2.0), (1.0, 1.0),
                 0.0, (-2.0, 2.0, -1.0, 3.0), steps=2000, quick_steps=500),
    TestFunction("Beale", "(1.5 − x + xy)² + (2.25 − x + xy²)² + (2.625 − x + xy³)²", _beale, _beale_grad,
                 (1.0, 1.5), (3.0, 0.5), 0.0, (-1.0, 4.5, -1.0, 2.0), steps=1000, quick_steps=300),
    TestFunction("saddle", "x² − y² + y⁴/4 (saddle at the origin, minima at (0, ±√2))", _saddle, _saddle_grad,
                 (1.0, 1e-6), (0.0, np.sqrt(2.0)), -1.0, (-1.5, 1.5, -2.0, 2.0), steps=200, quick_steps=100,
                 others=((0.0, -np.sqrt(2.0)),)),
]

# (label, adamkit.minimize method, extra options). Momentum, Nesterov and AMSGrad are options of SGD and Adam.
OPTIMIZERS: list[tuple[str, str, dict[str, Any]]] = [
    ("SGD", "sgd", {}),
    ("Momentum", "sgd", {"momentum": 0.9}),
    ("Nesterov", "sgd", {"momentum": 0.9, "nesterov": True}),
    ("AdaGrad", "adagrad", {}),
    ("RMSprop", "rmsprop", {}),
    ("Adam", "adam", {}),
    ("AMSGrad", "adam", {"amsgrad": True}),
    ("AdamW", "adamw", {}),  # torch's default weight decay 0.01 pulls it slightly off the minimum
    ("AdaMax", "adamax", {}),
    ("NAdam", "nadam", {}),
    ("RAdam", "radam", {}),
]

FLOOR = 1e-12  # gaps below this count as converged (ties are broken by the mean log-gap: faster wins)


def optimize(fn: TestFunction, method: str, options: dict[str, Any], lr: float, steps: int) -> np.ndarray:
    """Run ``adamkit.minimize`` for exactly ``steps`` steps; return the path, shape (steps + 1, 2)."""
    path = [np.array(fn.start)]
    with np.errstate(over="ignore", invalid="ignore"):
        adamkit.minimize(fn.f, fn.start, method=method, jac=fn.grad, callback=path.append,
                         options={"lr": lr, "maxiter": steps, "gtol": 0.0, **options})
    path = np.array(path)
    if len(path) < steps + 1:  # stopped early: the loss overflowed (status 4); pad with the last point
        path = np.vstack([path, np.repeat(path[-1:], steps + 1 - len(path), axis=0)])
    return path


def gaps(fn: TestFunction, path: np.ndarray) -> np.ndarray:
    """f(x_t) − f* along a path (inf where it diverged)."""
    with np.errstate(over="ignore", invalid="ignore"):
        g = np.array([fn.f(p) for p in path]) - fn.f_min
    return np.where(np.isfinite(g), np.maximum(g, 0.0), np.inf)


def score(gap: np.ndarray) -> tuple[float, float]:
    """Lower is better: the final gap (floored), then the mean log-gap along the way."""
    final = max(float(gap[-1]), FLOOR) if np.isfinite(gap[-1]) else np.inf
    mean_log = float(np.mean(np.log10(np.maximum(gap, FLOOR)))) if np.all(np.isfinite(gap)) else np.inf
    return final, mean_log


def tune(fn: TestFunction, method: str, options: dict[str, Any], grid: np.ndarray,
         steps: int) -> tuple[float, np.ndarray, np.ndarray]:
    """The grid search: every lr of ``grid`` from the same start for ``steps`` steps; the best by :func:`score`.
    Returns (lr, path, gap per step)."""
    trials = []
    for lr in grid:
        path = optimize(fn, method, options, lr, steps)
        gap = gaps(fn, path)
        trials.append((score(gap), lr, path, gap))
    _, lr, path, gap = min(trials, key=lambda trial: trial[0])
    return float(lr), path, gap


def run(sec: Section, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    grid = np.logspace(-4, 0, 5 if quick else 9)
    sec.text("Eleven members of the family minimize three functions with <code>adamkit.minimize(f, x0, "
             "method=..., jac=grad, options={'lr': ..., 'maxiter': ...})</code>; a callback records the path. "
             "Momentum and Nesterov are <code>method='sgd'</code> with <code>momentum=0.9</code> "
             "(and <code>nesterov=True</code>), AMSGrad is <code>method='adam'</code> with "
             "<code>amsgrad=True</code>; every other hyperparameter is torch.optim's default. Each optimizer's "
             "learning rate is the best of the log grid " + ", ".join(f"{g:.2g}" for g in grid) + " (lowest "
             "loss after the run's last step). Functions: " + "; ".join(f"<b>{f.name}</b> {f.formula}, "
             "start " + str(f.start) for f in FUNCTIONS) + ". Code: <code>adamkit/demo/functions.py</code>.")
    r: dict[str, Any] = {"grid": grid, "lr": {}, "final_gap": {}, "best": {}, "worst": {}, "steps": {}}
    colors = list(plt.get_cmap("tab10").colors) + ["black"]
    # SGD family dash-dotted, AdaGrad and RMSprop dashed, the Adam family solid
    styles = ["-."] * 3 + ["--"] * 2 + ["-"] * 6
    table = {}
    for fn in FUNCTIONS:
        steps = fn.quick_steps if quick else fn.steps
        chosen: dict[str, tuple[float, np.ndarray, np.ndarray]] = {}
        for label, method, options in OPTIMIZERS:
            chosen[label] = tune(fn, method, options, grid, steps)
        key = fn.name.lower()
        final = {label: float(gap[-1]) for label, (_, _, gap) in chosen.items()}
        order = sorted(final, key=lambda k: score(chosen[k][2]))
        r["lr"][key] = {label: lr for label, (lr, _, _) in chosen.items()}
        r["final_gap"][key] = final
        r["steps"][key] = steps
        r["best"][key], r["worst"][key] = order[0], order[-1]
        table[key] = chosen
        fr = {"name": fn.name, "steps": steps, "best": order[0], "best_gap": final[order[0]],
              "best_lr": chosen[order[0]][0], "worst": order[-1], "worst_gap": final[order[-1]],
              "worst_lr": chosen[order[-1]][0], "n_opt": len(OPTIMIZERS), "n_grid": len(grid),
              "adam_gap": final["Adam"], "adam_lr": chosen["Adam"][0], "sgd_gap": final["SGD"],
              "sgd_lr": chosen["SGD"][0]}

        # contour + paths (left), loss gap per step on a log scale (right)
        fig = plt.figure(figsize=(14, 5.6), layout="constrained")
        ax0, ax1 = fig.subplots(1, 2, width_ratios=[1.15, 1])
        x0, x1, y0, y1 = fn.box
        X, Y = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
        Z = fn.f(np.array([X, Y])) - fn.f_min
        levels = np.logspace(np.log10(max(Z.min(), 1e-3)), np.log10(Z.max()), 25)
        Z = np.maximum(Z, levels[0])
        ax0.contourf(X, Y, Z, levels=levels, norm=LogNorm(), cmap="Blues_r", alpha=0.45)
        ax0.contour(X, Y, Z, levels=levels, colors="0.55", linewidths=0.5)
        stars = np.array([fn.minimum, *fn.others])
        ax0.plot(stars[:, 0], stars[:, 1], "k*", ms=14, ls="", zorder=5, label="minimum")
        ax0.plot(*fn.start, "ko", ms=6, zorder=5, label="start")
        for (label, (lr, path, gap)), c, ls in zip(chosen.items(), colors, styles):
            name = f"{label} (lr={lr:.2g})"
            ax0.plot(path[:, 0], path[:, 1], ls, color=c, lw=1.5, alpha=0.9, label=name)
            ax1.semilogy(np.arange(len(gap)), np.maximum(gap, FLOOR), ls, color=c, lw=1.5, label=name)
        ax0.set(xlim=(x0, x1), ylim=(y0, y1), xlabel="x", ylabel="y", title=f"{fn.name}: paths")
        ax1.set(xlabel="step", ylabel="f − f* (log scale)", title=f"{fn.name}: loss gap per step",
                ylim=(FLOOR / 3, None))
        ax1.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="lr from the grid search")
        template = ("{f[name]}, {f[steps]} steps from the black dot. Legend: each optimizer with the learning "
                    "rate its grid search chose (the best of {f[n_grid]} values). Closest to the minimum: {f[best]} "
                    "(lr = {f[best_lr]:.2g}, f − f* = {f[best_gap]:.1e}); farthest: {f[worst]} (lr = "
                    "{f[worst_lr]:.2g}, {f[worst_gap]:.1e}). Adam (lr = {f[adam_lr]:.2g}) ends at {f[adam_gap]:.1e}, "
                    "plain SGD (lr = {f[sgd_lr]:.2g}) at {f[sgd_gap]:.1e}.")
        if key == "saddle":
            # How long each method needs to leave the saddle: first step with f below half-way to f*.
            level = 0.5 * (fn.f(np.zeros(2)) + fn.f_min)  # half-way from the saddle's value to the minimum
            esc = {k: int(np.argmax(g + fn.f_min < level)) if np.any(g + fn.f_min < level) else steps
                   for k, (_, _, g) in chosen.items()}
            fr.update(esc_level=level, esc_sgd=esc["SGD"], esc_momentum=esc["Momentum"], esc_adam=esc["Adam"],
                      esc_rmsprop=esc["RMSprop"], esc_adagrad=esc["AdaGrad"])
            r["escape_steps"] = esc
            adaptive = min(esc["AdaGrad"], esc["RMSprop"], esc["Adam"])
            fr["verdict"] = ("the adaptive methods are faster: they divide the tiny gradient by its own tiny RMS, "
                             "so their first steps along y are as long as along x" if adaptive < esc["SGD"] else
                             "with its tuned learning rate SGD is as fast here")
            template += (" The start is almost on the ridge (y is tiny, and so is the gradient's y-component). "
                         "Steps to get below f = {f[esc_level]:.1f}: SGD {f[esc_sgd]}, Momentum "
                         "{f[esc_momentum]}, AdaGrad {f[esc_adagrad]}, RMSprop {f[esc_rmsprop]}, Adam {f[esc_adam]}: "
                         "{f[verdict]}.")
        r[key] = fr
        # the caption reads this function's entry of the results: {f[best]} → {rosenbrock[best]}
        template = template.replace("{f[", "{" + key + "[")
        sec.figure(fig, f"functions-{key}.png", f"{fn.name}: paths and loss", template, r)

    header = ["optimizer"] + [f"{fn.name}: lr, f − f* after {r['steps'][fn.name.lower()]} steps" for fn in FUNCTIONS]
    rows = [[label] + [f"{r['lr'][fn.name.lower()][label]:.2g}, {r['final_gap'][fn.name.lower()][label]:.1e}"
                       for fn in FUNCTIONS] for label, _, _ in OPTIMIZERS]
    sec.table(header, rows, "Learning rate chosen by the grid search, and the final gap, per optimizer.")
    sec.summary = "closest to the minimum: " + ", ".join(f"{fn.name} {r['best'][fn.name.lower()]}"
                                                          for fn in FUNCTIONS)
    return r
