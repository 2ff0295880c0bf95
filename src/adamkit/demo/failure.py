"""Section 4 — where Adam fails: the online problems of Reddi, Kale & Kumar (2018), "On the Convergence of Adam
and Beyond".

On the feasible set [−1, 1] the losses are linear, f_t(x) = C·x once every period and −x otherwise (C > 2), so
the average gradient is positive and the best fixed point is x* = −1. With β₁ = 0 and β₂ = 1/(1 + C²), Adam's
second moment forgets the rare large gradient within a step or two: the large gradient's step gets divided by a
large √v, the frequent small ones by a small √v, and x drifts to +1 — the worst point. AMSGrad divides by the
largest v seen so far and goes to −1. Both are ``adamkit.numpy.Adam`` (AMSGrad is ``amsgrad=True``), followed by
a projection onto [−1, 1] after every step, with the paper's step size α/√t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import adamkit.numpy as akn

from .report import PALETTE, Section, plt


@dataclass(frozen=True)
class Problem:
    key: str
    title: str
    big: float     # gradient C on the rare steps
    small: float   # gradient −small on the others
    period: int    # the large gradient comes when t mod period == 1
    betas: tuple[float, float]
    steps: int
    quick_steps: int


def online_adam(p: Problem, amsgrad: bool, steps: int, alpha: float = 0.5, x0: float = 0.0) -> np.ndarray:
    """x_t for Adam (or AMSGrad) on the online problem, projected onto [−1, 1]; returns x_1..x_T."""
    x = np.array([x0])
    opt = akn.Adam([x], lr=alpha, betas=p.betas, amsgrad=amsgrad)
    g = np.empty(1)
    xs = np.empty(steps + 1)
    xs[0] = x0
    for t in range(1, steps + 1):
        g[0] = p.big if t % p.period == 1 else -p.small  # ∇f_t(x): the losses are linear in x
        opt.param_groups[0]["lr"] = alpha / np.sqrt(t)    # the paper's step size α_t = α/√t
        opt.step([g])
        np.clip(x, -1.0, 1.0, out=x)                      # projection onto the feasible set, in place
        xs[t] = x[0]
    return xs


def average_regret(p: Problem, xs: np.ndarray) -> np.ndarray:
    """R_T / T with R_T = Σ_t f_t(x_t) − f_t(x*), x* = −1 (x_t is the point played before seeing f_t)."""
    t = np.arange(1, len(xs))
    g = np.where(t % p.period == 1, p.big, -p.small)
    regret = np.cumsum(g * (xs[:-1] - (-1.0)))
    return regret / t


def problems() -> list[Problem]:
    c = 3.0
    ratio = 1010 / 10  # the synthetic experiment's large gradient is 101 times the small one
    return [
        Problem("c3", f"f_t = {c:g}x if t mod 3 = 1, else −x; β = (0, 1/(1+C²))", c, 1.0, 3,
                (0.0, 1 / (1 + c ** 2)), 3000, 3000),
        Problem("synthetic_construction", "f_t = 1010x if t mod 101 = 1, else −10x; β = (0, 1/(1+101²))", 1010.0,
                10.0, 101, (0.0, 1 / (1 + ratio ** 2)), 20_000, 5_000),
        Problem("synthetic_099", "same f_t; β = (0.9, 0.99)", 1010.0, 10.0, 101, (0.9, 0.99), 20_000, 5_000),
        Problem("synthetic_default", "same f_t; default β = (0.9, 0.999)", 1010.0, 10.0, 101, (0.9, 0.999),
                20_000, 5_000),
    ]


def x_figure(sec: Section, r: dict[str, Any], runs: dict) -> None:
    """x_t of Adam and AMSGrad on each problem."""
    r["linthresh_c3"] = 10 * problems()[0].period
    r["linthresh_synthetic"] = 10 * problems()[1].period
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.6), layout="constrained")
    for ax, (key, (p, adam, ams)) in zip(axes.flat, runs.items()):
        t = np.arange(len(adam))
        ax.plot(t, adam, color=PALETTE["vermillion"], lw=1.2, label="Adam")
        ax.plot(t, ams, color=PALETTE["blue"], lw=1.2, label="AMSGrad (amsgrad=True)")
        ax.axhline(-1, color="k", ls=":", lw=1, label="optimum x* = −1")
        ax.set(ylim=(-1.08, 1.08), xlabel=f"step t (linear to {10 * p.period}, then log)", ylabel="x_t",
               title=p.title)
        ax.set_xscale("symlog", linthresh=10 * p.period)  # linear for the first periods, then logarithmic
        ax.set_xlim(0, len(adam) - 1)
        ax.legend(loc="center right")
    sec.figure(fig, "failure-x.png", "Adam can drift away from the optimum; AMSGrad cannot grow its step back",
               "Adam, whose v soon forgets the rare large gradient, can be pushed towards the worst point; AMSGrad, "
               "whose step size never grows back, moves towards the optimum, slowly on the harder problems.",
               "The step axis is linear up to {linthresh_c3} (C = {C:g}) or {linthresh_synthetic} steps (synthetic) "
               "and logarithmic after, so the first periods and the long run are both visible. x_t on [{lo:g}, "
               "{hi:g}], where the optimum is x* = {x_star:g} (α = {alpha}, step α/√t). "
               "Top left, C = {C:g} with β₁ = {c3_beta1:g}, β₂ = {c3_beta2:.2g}: after {c3_steps} steps "
               "Adam ends at x = {adam_final_x:.2f}, AMSGrad at x = {amsgrad_final_x:.2f}. The synthetic "
               "problem with the construction's betas (β₂ = {synthetic_construction_beta2:.1e}): Adam at "
               "{synthetic_construction_adam_x:.2f} after {synthetic_construction_steps} steps; AMSGrad, whose "
               "small steps are divided by the largest gradient's RMS, creeps to "
               "{synthetic_construction_amsgrad_x:.2f}. With β = ({synthetic_099_beta1:g}, "
               "{synthetic_099_beta2:g}): Adam {synthetic_099_adam_x:.2f}, AMSGrad {synthetic_099_amsgrad_x:.2f}. "
               "With the default β = ({synthetic_default_beta1:g}, {synthetic_default_beta2:g}) v remembers the "
               "large gradient for about {synthetic_default_memory:.0f} steps: Adam ends at "
               "{synthetic_default_adam_x:.2f} but moved by {synthetic_default_adam_drift:+.2f} over the second "
               "half of the run (AMSGrad {synthetic_default_amsgrad_drift:+.2f}, ending at "
               "{synthetic_default_amsgrad_x:.2f}).", r)


def regret_figure(sec: Section, r: dict[str, Any], runs: dict) -> None:
    """Average regret R_T/T on log-log axes."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.6), layout="constrained")
    for ax, (key, (p, adam, ams)) in zip(axes.flat, runs.items()):
        t = np.arange(1, len(adam))
        ax.loglog(t, np.maximum(average_regret(p, adam), 1e-4), color=PALETTE["vermillion"], label="Adam")
        ax.loglog(t, np.maximum(average_regret(p, ams), 1e-4), color=PALETTE["blue"], label="AMSGrad")
        ax.set(xlabel="step T", ylabel="average regret R_T / T (log)", title=p.title.split(";")[-1].strip())
        ax.legend()
    axes[0, 0].set_title(f"C = {r['C']:g}: " + axes[0, 0].get_title())
    r["regret_floor"] = 1e-4
    sec.figure(fig, "failure-regret.png", "Average regret",
               "An online method converges when its average regret goes to zero; the log axis shows how far from "
               "zero each one still is.",
               "R_T/T is the mean over t ≤ T of f_t(x_t) − f_t(x*), on log-log axes (values below "
               "{regret_floor:.0e} drawn at that floor) so that small regrets are readable. At the last step: "
               "C = {C:g}, Adam {c3_adam_regret:.3f} and AMSGrad {c3_amsgrad_regret:.3f}; synthetic with the "
               "construction's betas {synthetic_construction_adam_regret:.3f} and "
               "{synthetic_construction_amsgrad_regret:.3f}; with β₂ = {synthetic_099_beta2:g} "
               "{synthetic_099_adam_regret:.3f} and {synthetic_099_amsgrad_regret:.3f}; with the default betas "
               "{synthetic_default_adam_regret:.3f} and {synthetic_default_amsgrad_regret:.3f}.", r)


def run(sec: Section, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    sec.text("Reddi, Kale &amp; Kumar (ICLR 2018) built linear online problems on [−1, 1] where Adam provably "
             "does not converge: the loss is C·x once every few steps and −x otherwise, so the optimum is "
             "x* = −1, but with β₁ = 0 and β₂ = 1/(1 + C²) Adam's v forgets the rare large gradient and x drifts "
             "to +1. Their fix, AMSGrad, divides by the largest v seen so far (<code>Adam(..., amsgrad=True)"
             "</code>). Below: their C = 3 example and their synthetic experiment (C = 1010 every 101 steps, "
             "−10 otherwise) with three choices of betas. Every run uses <code>adamkit.numpy.Adam</code>, sets "
             "<code>opt.param_groups[0]['lr'] = α/√t</code> before each step and projects with "
             "<code>np.clip(x, -1, 1, out=x)</code> after it. The seed does not matter: these problems are "
             "deterministic. Code: <code>adamkit/demo/failure.py</code>.")
    r: dict[str, Any] = {"alpha": 0.5, "C": 3.0, "lo": -1.0, "hi": 1.0, "x_star": -1.0}
    runs = {}
    for p in problems():
        steps = p.quick_steps if quick else p.steps
        adam, ams = online_adam(p, False, steps, r["alpha"]), online_adam(p, True, steps, r["alpha"])
        runs[p.key] = (p, adam, ams)
        sec.progress(f"{p.key}: {steps} steps of Adam and AMSGrad")
        half = steps // 2
        r[p.key] = dict(steps=steps, beta1=p.betas[0], beta2=p.betas[1], adam_x=float(adam[-1]),
                        amsgrad_x=float(ams[-1]), adam_drift=float(adam[-1] - adam[half]),
                        amsgrad_drift=float(ams[-1] - ams[half]),
                        adam_regret=float(average_regret(p, adam)[-1]),
                        amsgrad_regret=float(average_regret(p, ams)[-1]))
    # flat names for the captions
    for key in ("c3", "synthetic_construction", "synthetic_099", "synthetic_default"):
        for k, v in r[key].items():
            r[f"{key}_{k}"] = v
    r["synthetic_default_memory"] = 1 / (1 - r["synthetic_default_beta2"])  # an EMA's mean age, roughly
    r["adam_final_x"], r["amsgrad_final_x"] = r["c3"]["adam_x"], r["c3"]["amsgrad_x"]
    x_figure(sec, r, runs)
    regret_figure(sec, r, runs)
    sec.summary = (f"C={r['C']:g}: Adam ends at x = {r['adam_final_x']:+.2f}, AMSGrad at x = "
                   f"{r['amsgrad_final_x']:+.2f} (optimum {r['x_star']:g})")
    return r
