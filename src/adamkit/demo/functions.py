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


from adamkit import rules

from .report import OKABE_ITO, Section, plt


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
    lesson: str = ""


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
                 0.0, (-2.0, 2.0, -1.0, 3.0), steps=1500, quick_steps=500,
                 lesson="A curved, narrow valley: steps long enough to travel along it are too long across it, "
                        "so every method's tuned learning rate is a compromise."),
    TestFunction("Beale", "(1.5 − x + xy)² + (2.25 − x + xy²)² + (2.625 − x + xy³)²", _beale, _beale_grad,
                 (1.0, 1.5), (3.0, 0.5), 0.0, (-1.0, 4.5, -1.0, 2.0), steps=1000, quick_steps=300,
                 lesson="Beale's function has flat plateaus and steep walls, so no single step size suits the whole "
                        "path."),
    TestFunction("saddle", "x² − y² + y⁴/4 (saddle at the origin, minima at (0, ±√2))", _saddle, _saddle_grad,
                 (1.0, 1e-6), (0.0, np.sqrt(2.0)), -1.0, (-1.5, 1.5, -2.0, 2.0), steps=200, quick_steps=100,
                 others=((0.0, -np.sqrt(2.0)),),
                 lesson="Starting almost on a saddle the gradient is tiny; methods that divide it by its own size "
                        "leave the saddle sooner."),
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
    ("AdamW", "adamw", {}),  # torch's default weight decay 0.01: it minimizes f plus a pull towards zero
    ("AdaMax", "adamax", {}),
    ("NAdam", "nadam", {}),
    ("RAdam", "radam", {}),
]

FLOOR = 1e-12  # gaps below this count as converged (ties are broken by the mean log-gap: faster wins)
GROUPS = {"SGD and momentum": ["SGD", "Momentum", "Nesterov"], "adaptive": ["AdaGrad", "RMSprop", "Adam"],
          "Adam variants": ["AMSGrad", "AdaMax", "NAdam"], "warm-up and decay": ["RAdam", "AdamW"]}
"""Small multiples: at most four curves per panel."""


def shown(gap: float) -> str:
    """A final gap as the caption shows it: below the floor it reads ``< 1e-12`` (the ranking cannot tell)."""
    return f"{gap:.1e}" if gap >= FLOOR else f"< {FLOOR:.0e}"


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


def plot(fn: TestFunction, chosen: dict[str, tuple[float, np.ndarray, np.ndarray]]) -> plt.Figure:
    """Paths (top row) and loss gaps (bottom row), one column per group of at most four optimizers."""
    fig, axes = plt.subplots(2, len(GROUPS), figsize=(14, 7), layout="constrained", sharey="row")
    x0, x1, y0, y1 = fn.box
    X, Y = np.meshgrid(np.linspace(x0, x1, 200), np.linspace(y0, y1, 200))
    Z = fn.f(np.array([X, Y])) - fn.f_min
    levels = np.logspace(np.log10(max(Z.min(), 1e-3)), np.log10(Z.max()), 18)
    stars = np.array([fn.minimum, *fn.others])
    for col, (title, group) in enumerate(GROUPS.items()):
        top, bottom = axes[0, col], axes[1, col]
        top.contour(X, Y, np.maximum(Z, levels[0]), levels=levels, colors="0.75", linewidths=0.5)
        top.plot(stars[:, 0], stars[:, 1], "k*", ms=10, ls="")
        top.plot(*fn.start, "ko", ms=5)
        for label, c in zip(group, OKABE_ITO):
            lr, path, gap = chosen[label]
            name = f"{label} (lr={lr:.2g})"
            top.plot(path[:, 0], path[:, 1], color=c, lw=1.4, label=name)
            bottom.semilogy(np.maximum(gap, FLOOR), color=c, lw=1.4, label=name)
        top.set(xlim=(x0, x1), ylim=(y0, y1), xlabel="x", ylabel="y", title=f"{fn.name}: {title}")
        bottom.set(xlabel="step", ylabel="f − f* (floored at 1e-12)", ylim=(FLOOR / 3, None), title="loss gap")
        bottom.yaxis.set_tick_params(labelleft=True)
        top.yaxis.set_tick_params(labelleft=True)
        bottom.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8)
    return fig


def function_results(fn: TestFunction, chosen: dict, steps: int, n_grid: int) -> dict[str, Any]:
    final = {label: float(gap[-1]) for label, (_, _, gap) in chosen.items()}
    order = sorted(final, key=lambda k: score(chosen[k][2]))
    at_floor = [k for k in order if final[k] < FLOOR]
    return {"name": fn.name, "steps": steps, "best": order[0], "best_gap": shown(final[order[0]]),
            "best_lr": chosen[order[0]][0], "worst": order[-1], "worst_gap": shown(final[order[-1]]),
            "worst_lr": chosen[order[-1]][0], "n_opt": len(OPTIMIZERS), "n_grid": n_grid,
            "adam_gap": shown(final["Adam"]), "adam_lr": chosen["Adam"][0], "sgd_gap": shown(final["SGD"]),
            "sgd_lr": chosen["SGD"][0], "floor": FLOOR, "n_floor": len(at_floor),
            "adamw_gap": shown(final["AdamW"]), "radam_gap": shown(final["RAdam"]),
            "radam_rect": rules.RADAM.coefficients(rules.RADAM.hyperparameters(), float(steps), {})[0]["rect"],
            "_order": order, "_final": final}


TEMPLATE = ("{f[name]}, {f[steps]} steps from the black dot; each optimizer with the learning rate its grid search "
            "chose (the best of {f[n_grid]} values). Ranking: the final f − f*, where gaps below {f[floor]:.0e} count "
            "as reached and are plotted at that floor; {f[n_floor]} optimizers reach it, and ties go to the faster "
            "(lower mean log-gap). First: {f[best]} (lr = {f[best_lr]:.2g}, f − f* {f[best_gap]}); last: "
            "{f[worst]} (lr = {f[worst_lr]:.2g}, {f[worst_gap]}). Adam (lr = {f[adam_lr]:.2g}) ends at "
            "{f[adam_gap]}, plain SGD (lr = {f[sgd_lr]:.2g}) at {f[sgd_gap]}. AdamW ({f[adamw_gap]}) keeps torch's "
            "weight decay, so it settles where the decay balances the gradient, not at f's minimum; RAdam "
            "({f[radam_gap]}) still scales its steps by r_t = {f[radam_rect]:.2f} at the last step: a warm-up.")


def saddle_escape(fn: TestFunction, chosen: dict, fr: dict[str, Any], steps: int) -> str:
    """How long each method needs to leave the saddle: the first step with f below half-way to f*."""
    level = 0.5 * (fn.f(np.zeros(2)) + fn.f_min)
    esc = {k: int(np.argmax(g + fn.f_min < level)) if np.any(g + fn.f_min < level) else steps
           for k, (_, _, g) in chosen.items()}
    fr.update(esc_level=level, esc_sgd=esc["SGD"], esc_momentum=esc["Momentum"], esc_adam=esc["Adam"],
              esc_rmsprop=esc["RMSprop"], esc_adagrad=esc["AdaGrad"], escape_steps=esc)
    adaptive = min(esc["AdaGrad"], esc["RMSprop"], esc["Adam"])
    fr["verdict"] = ("the adaptive methods are faster: they divide the tiny gradient by its own tiny RMS, "
                     "so their first steps along y are as long as along x" if adaptive < esc["SGD"] else
                     "with its tuned learning rate SGD is as fast here")
    return (" The start is almost on the ridge (y is tiny, and so is the gradient's y-component). "
            "Steps to get below f = {f[esc_level]:.1f}: SGD {f[esc_sgd]}, Momentum "
            "{f[esc_momentum]}, AdaGrad {f[esc_adagrad]}, RMSprop {f[esc_rmsprop]}, Adam {f[esc_adam]}: "
            "{f[verdict]}.")


def run(sec: Section, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    grid = np.logspace(-4, 0, 5 if quick else 7)
    sec.text("Eleven members of the family minimize three functions with <code>adamkit.minimize(f, x0, "
             "method=..., jac=grad, options={'lr': ..., 'maxiter': ...})</code>; a callback records the path. "
             "Momentum and Nesterov are <code>method='sgd'</code> with <code>momentum=0.9</code> "
             "(and <code>nesterov=True</code>), AMSGrad is <code>method='adam'</code> with "
             "<code>amsgrad=True</code>; every other hyperparameter is torch.optim's default, so AdamW keeps "
             "<code>weight_decay=0.01</code> and minimizes f plus a pull towards the origin. Each optimizer's "
             "learning rate is the best of the log grid " + ", ".join(f"{g:.2g}" for g in grid) + " (lowest "
             "loss after the run's last step). Functions: " + "; ".join(f"<b>{f.name}</b> {f.formula}, "
             "start " + str(f.start) for f in FUNCTIONS) + ". Code: <code>adamkit/demo/functions.py</code>.")
    r: dict[str, Any] = {"grid": grid, "lr": {}, "final_gap": {}, "best": {}, "worst": {}, "steps": {}}
    for fn in FUNCTIONS:
        steps = fn.quick_steps if quick else fn.steps
        chosen = {label: tune(fn, method, options, grid, steps) for label, method, options in OPTIMIZERS}
        sec.progress(f"{fn.name}: {len(OPTIMIZERS)} optimizers × {len(grid)} learning rates")
        key = fn.name.lower()
        fr = function_results(fn, chosen, steps, len(grid))
        order, final = fr.pop("_order"), fr.pop("_final")
        r["lr"][key] = {label: lr for label, (lr, _, _) in chosen.items()}
        r["final_gap"][key], r["steps"][key] = final, steps
        r["best"][key], r["worst"][key] = order[0], order[-1]
        template = TEMPLATE + (saddle_escape(fn, chosen, fr, steps) if key == "saddle" else "")
        if key == "saddle":
            r["escape_steps"] = fr.pop("escape_steps")
        r[key] = fr
        # the caption reads this function's entry of the results: {f[best]} → {rosenbrock[best]}
        sec.figure(plot(fn, chosen), f"functions-{key}.png", f"{fn.name}: paths and loss", fn.lesson,
                   template.replace("{f[", "{" + key + "["), r)
    header = ["optimizer"] + [f"{fn.name}: lr, f − f* after {r['steps'][fn.name.lower()]} steps" for fn in FUNCTIONS]
    rows = [[label] + [f"{r['lr'][fn.name.lower()][label]:.2g}, {shown(r['final_gap'][fn.name.lower()][label])}"
                       for fn in FUNCTIONS] for label, _, _ in OPTIMIZERS]
    sec.table(header, rows, f"Learning rate chosen by the grid search, and the final gap, per optimizer (gaps "
                            f"below {FLOOR:.0e} shown as < {FLOOR:.0e}).")
    sec.summary = "ranked first: " + ", ".join(f"{fn.name} {r['best'][fn.name.lower()]}" for fn in FUNCTIONS)
    return r
