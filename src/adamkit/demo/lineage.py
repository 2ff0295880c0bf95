"""Section — the lineage, one mechanism at a time, on one ill-conditioned problem.

f(x, y) = (x² + 100 y²)/2 is a valley 100 times steeper across (y) than along (x). Gradient descent must take
steps small enough for the steep direction and crawls along the flat one; momentum accumulates the consistent
direction; Nesterov looks ahead; AdaGrad divides by the root of the summed squared gradients (and its effective
learning rate only shrinks); RMSprop averages instead of summing; Adam is momentum + RMSprop + bias correction.
Every run is ``adamkit.minimize`` (or an ``adamkit.numpy`` optimizer where its state is read); each learning rate
is the best of one log grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import adamkit.numpy as akn
from adamkit import rules

from .functions import FLOOR, TestFunction, gaps, optimize, tune
from .report import OKABE_ITO, Section, plt


def _valley(p):
    x, y = p
    return 0.5 * (x ** 2 + 100 * y ** 2)


def _valley_grad(p):
    x, y = p
    return np.array([x, 100 * y])


VALLEY = TestFunction("valley", "(x² + 100 y²)/2", _valley, _valley_grad, (-4.0, 1.2), (0.0, 0.0), 0.0,
                      (-4.5, 1.0, -1.6, 1.6), steps=100, quick_steps=100)
GRID = np.logspace(-3, 0, 13)

# (label, adamkit.minimize method, options, what it adds) — each line adds one mechanism to the one before
LINEAGE: list[tuple[str, str, dict[str, Any], str]] = [
    ("GD", "sgd", {}, "θ ← θ − α·g: one step size for every direction"),
    ("Momentum", "sgd", {"momentum": 0.9},
     "b ← 0.9·b + g (momentum_buffer), θ ← θ − α·b: consistent directions add up"),
    ("Nesterov", "sgd", {"momentum": 0.9, "nesterov": True},
     "the same buffer, the step taken from the look-ahead g + 0.9·b"),
    ("AdaGrad", "adagrad", {}, "s ← s + g² (sum), θ ← θ − α·g/√s: a step size per coordinate, which only shrinks"),
    ("RMSprop", "rmsprop", {},
     "v ← 0.99·v + 0.01·g² (square_avg): an average that forgets, so the step can grow back"),
    ("Adam", "adam", {}, "RMSprop's v with momentum's m, both bias-corrected"),
]
# the variants, each defined in one line beside its figure
VARIANTS: list[tuple[str, str, dict[str, Any], str]] = [
    ("AMSGrad", "adam", {"amsgrad": True},
     "AMSGrad divides by the largest v̂ seen so far (max_exp_avg_sq), so a step size never grows back."),
    ("AdaMax", "adamax", {},
     "AdaMax replaces √v by an exponentially weighted maximum u ← max(β₂u, |g|) (exp_inf): the ∞-norm of Adam."),
    ("NAdam", "nadam", {},
     "NAdam is Adam with Nesterov's look-ahead: the step uses the next momentum, β₁m + (1 − β₁)g, with a "
     "decaying β₁ schedule (mu_product)."),
    ("RAdam", "radam", {},
     "RAdam multiplies Adam's step by a rectification r_t that is small while v̂ rests on few samples: a "
     "warm-up built into the rule."),
    ("AdamW", "adamw", {"weight_decay": 0.01},
     "AdamW shrinks θ by the fraction α·λ each step, outside the adaptive step (decoupled weight decay)."),
]


def effective_lr(cls: type, lr: float, state: str, steps: int) -> np.ndarray:
    """Per-coordinate step size α/(√state + ε) that ``cls`` (AdaGrad or RMSprop) uses on the valley, step by step,
    read from the optimizer's own state; shape (steps, 2)."""
    theta = np.array(VALLEY.start)
    opt = cls([theta], lr=lr)
    out = []
    for _ in range(steps):
        opt.step([VALLEY.grad(theta)])
        out.append(lr / (np.sqrt(opt.state[0][state]) + opt.defaults["eps"]))
    return np.array(out)


def ablation(lr: float, beta2: float, steps: int) -> dict[str, np.ndarray]:
    """Adam with β₁ = 0 on the valley, and what RMSprop's state says its step should be once bias-corrected.

    An ``RMSprop(alpha=β₂)`` receives the same gradients as the Adam run (its own parameter is not used); from its
    ``square_avg`` v_t the predicted step is α·g/(√(v_t/(1 − β₂ᵗ)) + ε)."""
    theta, shadow = np.array(VALLEY.start), np.zeros(2)
    adam = akn.Adam([theta], lr=lr, betas=(0.0, beta2))
    rms = akn.RMSprop([shadow], lr=lr, alpha=beta2)
    moves, predicted = [], []
    for t in range(1, steps + 1):
        g, before = VALLEY.grad(theta), theta.copy()
        adam.step([g])
        rms.step([g])
        v_hat = rms.state[0]["square_avg"] / (1 - beta2 ** t)
        moves.append(np.linalg.norm(theta - before))
        predicted.append(np.linalg.norm(lr * g / (np.sqrt(v_hat) + rms.defaults["eps"])))
    plain = optimize(VALLEY, "rmsprop", {"alpha": beta2}, lr, steps)
    return {"adam_b1_0": np.array(moves), "predicted": np.array(predicted),
            "rmsprop": np.linalg.norm(np.diff(plain, axis=0), axis=1),
            "adam_path": optimize(VALLEY, "adam", {"betas": (0.0, beta2)}, lr, steps), "rmsprop_path": plain}


def contours(ax: plt.Axes) -> None:
    x0, x1, y0, y1 = VALLEY.box
    X, Y = np.meshgrid(np.linspace(x0, x1, 200), np.linspace(y0, y1, 200))
    ax.contour(X, Y, _valley(np.array([X, Y])), levels=np.geomspace(0.02, 40, 10), colors="0.75", linewidths=0.6)
    ax.plot(*VALLEY.start, "ko", ms=4)
    ax.plot(0, 0, "k*", ms=9)
    ax.set(xlim=(x0, x1), ylim=(y0, y1), xlabel="x", ylabel="y")


def run(sec: Section, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    from . import lineage_figures as figs

    steps = VALLEY.steps
    sec.text("One problem, one mechanism at a time. The loss f(x, y) = " + VALLEY.formula + " is a valley 100 "
             "times steeper across than along, the classic picture of ill-conditioning; it is aligned with the "
             "axes, the case where a per-coordinate step size helps most. Every optimizer starts at the black dot "
             "and runs the same number of steps with the best learning rate of one log grid "
             f"({GRID[0]:g} … {GRID[-1]:g}, {len(GRID[::2] if quick else GRID)} values; best = lowest final "
             "loss, ties to the faster). "
             "Code: <code>adamkit/demo/lineage.py</code>.")
    r: dict[str, Any] = {"steps": steps, "floor": FLOOR}
    chosen = {}
    for label, method, options, _ in LINEAGE + VARIANTS:
        chosen[label] = tune(VALLEY, method, options, GRID[::2] if quick else GRID, steps)
        r[f"lr_{label}"], r[f"gap_{label}"] = chosen[label][0], max(float(chosen[label][2][-1]), FLOOR)
    sec.progress(f"{len(chosen)} optimizers tuned on the valley")
    figs.paths(sec, chosen, r)
    figs.adagrad(sec, r, effective_lr(akn.Adagrad, r["lr_AdaGrad"], "sum", steps),
                 effective_lr(akn.RMSprop, r["lr_RMSprop"], "square_avg", steps))
    figs.ablation(sec, r, ablation(0.05, 0.99, steps))
    h = rules.RADAM.hyperparameters(lr=1.0)
    r.update({f"rect_{t}": rules.RADAM.coefficients(h, float(t), {})[0]["rect"] for t in (6, 10, 100, 1000)})
    figs.variants(sec, chosen, r)
    sec.progress("interactive trajectories: precomputing every slider position")
    figs.explorer(sec, r)
    sec.summary = (f"final f on the valley: GD {r['gap_GD']:.1e}, Momentum {r['gap_Momentum']:.1e}, "
                   f"AdaGrad {r['gap_AdaGrad']:.1e}, Adam {r['gap_Adam']:.1e}")
    return r


COLORS = dict(zip([label for label, *_ in LINEAGE], OKABE_ITO))
