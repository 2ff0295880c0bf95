"""The lineage section's figures (the runs are in :mod:`adamkit.demo.lineage`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import explore as ex
from .functions import FLOOR, gaps, optimize
from .lineage import COLORS, LINEAGE, VALLEY, VARIANTS, contours
from .report import PALETTE, Section, plt


def paths(sec: Section, chosen: dict, r: dict[str, Any]) -> None:
    """Small multiples: each mechanism's path over the previous one's (grey), then the loss of each family."""
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.6), layout="constrained", sharex=True, sharey=True)
    for i, (ax, (label, _, _, adds)) in enumerate(zip(axes.flat, LINEAGE)):
        contours(ax)
        if i:
            prev = chosen[LINEAGE[i - 1][0]][1]
            ax.plot(prev[:, 0], prev[:, 1], color="0.6", lw=1, label=LINEAGE[i - 1][0])
        path = chosen[label][1]
        ax.plot(path[:, 0], path[:, 1], ".-", color=COLORS[label], lw=1.5, ms=3, label=label)
        ax.set_title(f"{i + 1}. {label} (lr = {chosen[label][0]:.2g})")
        ax.legend(loc="lower right", fontsize=7)
    sec.figure(fig, "lineage-paths.png", "From gradient descent to Adam, one mechanism at a time",
               "Each mechanism fixes a failure of the one before: momentum the crawl along the valley, per-coordinate "
               "step sizes the zig-zag across it.",
               "After {steps} steps f is {gap_GD:.1e} for GD (lr = {lr_GD:.2g}), {gap_Momentum:.1e} with momentum, "
               "{gap_Nesterov:.1e} with Nesterov, {gap_AdaGrad:.1e} for AdaGrad, {gap_RMSprop:.1e} for RMSprop and "
               "{gap_Adam:.1e} for Adam (values below {floor:.0e} are reported as {floor:.0e}). Grey: the previous "
               "panel's path.", r)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained", sharey=True)
    for ax, group in zip(axes, (LINEAGE[:3], LINEAGE[3:])):
        for label, *_ in group:
            ax.semilogy(np.maximum(chosen[label][2], FLOOR), color=COLORS[label], label=label)
        ax.set(xlabel="step", ylabel="f − f* (floored at 1e-12)", ylim=(FLOOR / 3, None))
        ax.legend(loc="lower left")
    axes[0].set_title("one step size for all directions")
    axes[1].set_title("a step size per coordinate")
    sec.figure(fig, "lineage-loss.png", "The loss of each mechanism",
               "AdaGrad and RMSprop win by orders of magnitude on this clean valley; Adam's momentum makes it circle "
               "the minimum, a cost here that pays off when gradients are noisy.",
               "Final f − f*: GD {gap_GD:.1e}, Momentum {gap_Momentum:.1e}, Nesterov {gap_Nesterov:.1e}; "
               "AdaGrad {gap_AdaGrad:.1e}, RMSprop {gap_RMSprop:.1e}, Adam {gap_Adam:.1e}. The axis stops at "
               "the floor {floor:.0e}.", r)


def adagrad(sec: Section, r: dict[str, Any], ada: np.ndarray, rms: np.ndarray) -> None:
    r.update(ada_shrink=float(ada[0, 0] / ada[-1, 0]), ada_first=float(ada[0, 0]), ada_last=float(ada[-1, 0]),
             rms_min=float(rms[:, 0].min()), rms_last=float(rms[-1, 0]), rms_grow=float(rms[-1, 0] / rms[:, 0].min()),
             ada_never_grows=bool(np.all(np.diff(ada, axis=0) <= 0)))
    fig, ax = plt.subplots(figsize=(6, 3.4), layout="constrained")
    t = np.arange(1, len(ada) + 1)
    for k, (name, ls) in enumerate((("x", "-"), ("y", "--"))):
        ax.semilogy(t, ada[:, k], ls, color=COLORS["AdaGrad"], label=f"AdaGrad, {name}")
        ax.semilogy(t, rms[:, k], ls, color=COLORS["RMSprop"], label=f"RMSprop, {name}")
    ax.set(xlabel="step", ylabel="effective lr α/(√s + ε)", title="step size per coordinate, from opt.state")
    ax.legend(ncol=2)
    sec.figure(fig, "lineage-adagrad.png", "AdaGrad's step size only shrinks; RMSprop's grows back",
               "AdaGrad's sum of squared gradients never forgets, so its step size can only shrink.",
               "Along x, AdaGrad's effective learning rate falls from {ada_first:.2g} to {ada_last:.2g} "
               "({ada_shrink:.1f} times smaller) and stays there, even where the gradient has become tiny; "
               "RMSprop's average forgets, and its step size grows back from its lowest, {rms_min:.2g}, to "
               "{rms_last:.2g} ({rms_grow:.1f} times). Both read from the optimizers' own state (sum, square_avg).", r)


def ablation(sec: Section, r: dict[str, Any], ab: dict[str, np.ndarray]) -> None:
    r.update(ab_match=float(np.max(np.abs(ab["adam_b1_0"] - ab["predicted"]) / ab["predicted"])),
             ab_first_rms=float(ab["rmsprop"][0]), ab_first_adam=float(ab["adam_b1_0"][0]), ab_lr=0.05,
             ab_beta2=0.99, ab_b1=0.0, ab_ratio=float(ab["rmsprop"][0] / ab["adam_b1_0"][0]),
             ab_gap_adam=max(float(VALLEY.f(ab["adam_path"][-1])), FLOOR),
             ab_gap_rms=max(float(VALLEY.f(ab["rmsprop_path"][-1])), FLOOR))
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained")
    contours(ax[0])
    ax[0].plot(*ab["rmsprop_path"].T, color=COLORS["RMSprop"], label="RMSprop")
    ax[0].plot(*ab["adam_path"].T, "--", color=COLORS["Adam"], label="Adam, β₁ = 0")
    ax[0].set_title("paths")
    ax[0].legend(loc="lower right")
    t = np.arange(1, len(ab["rmsprop"]) + 1)
    ax[1].semilogy(t, ab["rmsprop"], color=COLORS["RMSprop"], label="RMSprop")
    ax[1].semilogy(t, ab["adam_b1_0"], color=COLORS["Adam"], lw=4, alpha=0.6, label="Adam, β₁ = 0")
    ax[1].semilogy(t, ab["predicted"], "k.", ms=2, label="RMSprop's state, bias-corrected")
    ax[1].set(xlabel="step", ylabel="step length |Δθ|", title="step lengths")
    ax[1].legend()
    sec.figure(fig, "lineage-ablation.png", "Ablation: Adam with β₁ = 0 is RMSprop with bias correction",
               "Remove Adam's momentum and what is left is RMSprop plus a bias correction of v.",
               "Same lr = {ab_lr:g} and β₂ = α = {ab_beta2:g}. Adam's steps without momentum (β₁ = {ab_b1:g}) "
               "match the steps predicted "
               "from RMSprop's square_avg divided by 1 − β₂ᵗ to a relative {ab_match:.1e}. Without the correction "
               "RMSprop's first step is {ab_ratio:.1f} times longer ({ab_first_rms:.3f} against "
               "{ab_first_adam:.3f}): its v starts at zero. Final f: RMSprop {ab_gap_rms:.1e}, Adam without momentum "
               "{ab_gap_adam:.1e}.", r)


def variants(sec: Section, chosen: dict, r: dict[str, Any]) -> None:
    """One small figure per variant, its one-line definition as the caption's lesson."""
    made = []
    for label, _, _, definition in VARIANTS:
        fig, ax = plt.subplots(figsize=(4.2, 3), layout="constrained")
        ax.semilogy(np.maximum(chosen["Adam"][2], FLOOR), color="0.55", label=f"Adam (lr = {r['lr_Adam']:.2g})")
        ax.semilogy(np.maximum(chosen[label][2], FLOOR), color=PALETTE["vermillion"],
                    label=f"{label} (lr = {r[f'lr_{label}']:.2g})")
        ax.set(xlabel="step", ylabel="f − f* (floored at 1e-12)", title=label, ylim=(FLOOR / 3, None))
        ax.legend(loc="lower left")
        template = "On the valley: final f {gap_" + label + ":.1e} against Adam's {gap_Adam:.1e}."
        if label == "RAdam":
            template += (" r_t is {rect_6:.3f} at step six (the first rectified step), {rect_10:.3f} at step "
                         "ten, {rect_100:.2f} at step one hundred and {rect_1000:.2f} at step one thousand, "
                         "so short runs see mostly its warm-up.")
        if label == "AdamW":
            template += (" λ is torch's default: AdamW minimizes a pull towards zero as well as f, harmless here "
                         "because f's minimum is at zero, not elsewhere.")
        made.append(sec.figure(fig, f"lineage-{label.lower()}.png", label, definition, template, r))
    sec.row(made)


def _trajectory(label: str, lr: float, b1: float, b2: float, steps: int) -> np.ndarray:
    method, options = {"GD": ("sgd", {}), "Momentum": ("sgd", {"momentum": b1}),
                       "RMSprop": ("rmsprop", {"alpha": b2}), "Adam": ("adam", {"betas": (b1, b2)})}[label]
    return optimize(VALLEY, method, options, lr, steps)


def explorer(sec: Section, r: dict[str, Any]) -> None:
    """Trajectories for every slider position (lr × β₁ × β₂), computed here by adamkit and drawn by the page."""
    lrs, b1s, b2s, steps = [0.01, 0.03, 0.1, 0.3], [0.0, 0.5, 0.9, 0.99], [0.9, 0.99, 0.999], 60
    names = ["GD", "Momentum", "RMSprop", "Adam"]
    x0, x1, y0, y1 = VALLEY.box
    pp = ex.panel("paths", "x", "y", (x0, x1), (y0, y1),
                  bg=ex.contour_lines(VALLEY.f, VALLEY.box, np.geomspace(0.02, 40, 8)))
    lp = ex.panel("loss", "step", "f − f* (floored at 1e-12)", (0, steps), (FLOOR, 1e3), ylog=True)
    cache: dict[tuple, np.ndarray] = {}
    runs = {}
    for key in np.ndindex(len(lrs), len(b1s), len(b2s)):
        lr, b1, b2 = lrs[key[0]], b1s[key[1]], b2s[key[2]]
        per = [[], []]
        for n in names:  # a run depends only on the hyperparameters its optimizer has
            k = (n, lr, b1 if n in ("Momentum", "Adam") else None, b2 if n in ("RMSprop", "Adam") else None)
            path = cache.setdefault(k, _trajectory(n, lr, b1, b2, steps))
            per[0].append(ex.series(n, path[:, 0], path[:, 1], pp))
            per[1].append(ex.series(n, np.arange(steps + 1), gaps(VALLEY, path), lp))
        runs[key] = per
    start = (0, 2, 2)
    data = ex.explorer([ex.control("lr", "lr", lrs, start[0]), ex.control("beta1", "β₁ (momentum)", b1s, start[1]),
                        ex.control("beta2", "β₂ (RMSprop's α)", b2s, start[2])], [pp, lp],
                       {n: COLORS[n] for n in names}, runs)
    lr, b1, b2 = lrs[start[0]], b1s[start[1]], b2s[start[2]]
    default = {n: cache[(n, lr, b1 if n in ("Momentum", "Adam") else None, b2 if n in ("RMSprop", "Adam") else None)]
               for n in names}
    r.update(ex_runs=len(cache), ex_lr=lr, ex_b1=b1, ex_b2=b2, ex_steps=steps,
             **{f"ex_gap_{n}": max(float(VALLEY.f(p[-1])), FLOOR) for n, p in default.items()})
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained")
    contours(ax[0])
    for n, p in default.items():
        ax[0].plot(*p.T, color=COLORS[n], label=n)
        ax[1].semilogy(np.maximum(gaps(VALLEY, p), FLOOR), color=COLORS[n], label=n)
    ax[1].set(xlabel="step", ylabel="f − f* (floored at 1e-12)")
    ax[1].legend()
    sec.figure(fig, "lineage-explore.png", "Explore: trajectories for every lr, β₁ and β₂",
               "Move the sliders to see which mechanism tolerates which setting; hover a curve to single it out.",
               "{ex_runs} runs of adamkit were computed for this figure and embedded in the page; the page only "
               "draws them. At the start position (lr = {ex_lr:g}, β₁ = {ex_b1:g}, β₂ = {ex_b2:g}, {ex_steps} "
               "steps) the final f is GD {ex_gap_GD:.1e}, Momentum {ex_gap_Momentum:.1e}, RMSprop "
               "{ex_gap_RMSprop:.1e}, Adam {ex_gap_Adam:.1e}.", r, data=data, key="explore-trajectories")
