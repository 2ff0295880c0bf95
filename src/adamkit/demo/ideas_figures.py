"""The figures of the ideas section (the runs are in :mod:`adamkit.demo.ideas`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .lineage import VALLEY, contours
from .report import OKABE_ITO, PALETTE, Section, plt

FLOOR = 1e-12


def first_below(err: np.ndarray, level: float) -> int:
    """First index where ``err`` falls below ``level`` and stays there (``len(err)`` if it never does)."""
    above = np.nonzero(err >= level)[0]
    return int(above[-1] + 1) if len(above) else 0


def sparse(sec: Section, r: dict[str, Any], res: dict[str, Any]) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained", sharey=True)
    for (name, (lr, w)), c in zip(res["runs"].items(), OKABE_ITO):
        err = np.abs(w - res["w_true"])
        for k in (0, 1):
            ax[k].semilogy(np.maximum(err[:, k], 1e-4), color=c, label=f"{name} (lr = {lr:.2g})")
        r[f"sp_err_{name}"], r[f"sp_lr_{name}"] = float(err[-1, 1]), float(lr)
        r[f"sp_dense_{name}"] = float(err[-1, 0])
        r[f"sp_t_{name}"] = first_below(err[:, 1], 0.1 * res["w_true"][1])
    ax[0].set(title="dense feature (always on)", xlabel="example", ylabel="|w − w_true|")
    ax[1].set(title="rare feature (on for 2 % of examples)", xlabel="example", ylabel="|w − w_true|")
    ax[1].yaxis.set_tick_params(labelleft=True)
    ax[1].legend()
    r.update(sp_steps=res["steps"], sp_seen=res["rare_seen"], sp_level=0.1 * res["w_true"][1])
    sec.figure(fig, "ideas-sparse.png", "Sparse gradients and rare features",
               "A rare feature gets a gradient only now and then; AdaGrad and Adam divide it by its own small "
               "history, while SGD's one step size must also suit the dense feature.",
               "{sp_steps} single-example steps, the rare feature present {sp_seen} times; each optimizer has the "
               "best lr of a grid. Error of the rare weight at the end: SGD {sp_err_SGD:.2g} (lr = {sp_lr_SGD:.2g}), "
               "AdaGrad {sp_err_AdaGrad:.2g}, Adam {sp_err_Adam:.2g}; it stays below {sp_level:g} from example "
               "{sp_t_SGD} (SGD), {sp_t_AdaGrad} (AdaGrad), {sp_t_Adam} (Adam). Dense weight's error: SGD "
               "{sp_dense_SGD:.1e}, AdaGrad {sp_dense_AdaGrad:.1e}, Adam {sp_dense_Adam:.1e}.", r)


def scale(sec: Section, r: dict[str, Any], paths: dict[str, np.ndarray]) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained")
    for a, name in zip(ax, ("SGD", "Adam")):
        contours(a)
        a.plot(*paths[f"{name}_1"].T, color=PALETTE["blue"], lw=2.5, label="loss f")
        a.plot(*paths[f"{name}_k"].T, "--", color=PALETTE["vermillion"], label="loss 1000·f")
        a.set_title(name)
        a.legend(loc="lower right")
    with np.errstate(over="ignore", invalid="ignore"):
        diff = {n: float(np.max(np.abs(paths[f"{n}_1"] - paths[f"{n}_k"]))) for n in ("SGD", "Adam")}
    r.update(sc_adam=diff["Adam"], sc_sgd=diff["SGD"], sc_factor=1000,
             sc_sgd_end=float(np.linalg.norm(paths["SGD_k"][-1])),
             sc_sgd_end1=float(np.linalg.norm(paths["SGD_1"][-1])))
    sec.figure(fig, "ideas-scale.png", "Invariance to the gradient's scale",
               "Multiplying the loss by a constant changes nothing for Adam, whose step divides the gradient by "
               "its own size, and everything for SGD.",
               "Loss × {sc_factor}, same lr: Adam's path moves by at most {sc_adam:.1e} (only ε is not rescaled); "
               "SGD's ends {sc_sgd_end:.1e} from the minimum instead of {sc_sgd_end1:.1e}: it diverges.", r)


def snr(sec: Section, r: dict[str, Any], runs: dict[float, tuple[np.ndarray, np.ndarray]]) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained")
    window = np.ones(25) / 25
    for (sigma, (theta, moves)), c in zip(runs.items(), (PALETTE["blue"], PALETTE["vermillion"])):
        ax[0].plot(theta, color=c, label=f"noise σ = {sigma:g}")
        ax[1].semilogy(np.convolve(moves, window, mode="valid"), color=c, label=f"noise σ = {sigma:g}")
    ax[0].set(xlabel="step", ylabel="θ", title="θ (the minimum is at 0)")
    ax[1].set(xlabel="step", ylabel="|Δθ| / lr (mean of 25 steps)", title="Adam's step, in units of lr")
    ax[0].legend()
    (lo, (_, m_lo)), (hi, (_, m_hi)) = runs.items()
    r.update(snr_two=2, snr_lo=lo, snr_hi=hi, snr_early_hi=float(m_hi[:50].mean()),
             snr_late_hi=float(m_hi[-200:].mean()),
             snr_early_lo=float(m_lo[:50].mean()), snr_late_lo=float(m_lo[-200:].mean()))
    sec.figure(fig, "ideas-snr.png", "Low signal-to-noise: Adam's steps shrink by themselves",
               "Near a minimum the gradient is mostly noise; its average m̂ shrinks while v̂ stays at the noise's "
               "size, so Adam's step m̂/√v̂ shrinks without any schedule (automatic annealing).",
               "f(θ) = θ²/{snr_two:g}, gradient θ + σ·noise, lr fixed. With σ = {snr_hi:g} the mean step falls from "
               "{snr_early_hi:.2f}·lr over the first fifty steps to {snr_late_hi:.2f}·lr over the last two hundred; "
               "with σ = {snr_lo:g}, from {snr_early_lo:.2f}·lr to {snr_late_lo:.2f}·lr.", r)


def eps(sec: Section, r: dict[str, Any], runs: dict[float, np.ndarray]) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.4), layout="constrained")
    for i, ((e, gap), c) in enumerate(zip(runs.items(), OKABE_ITO)):
        ax.semilogy(np.maximum(gap, FLOOR), color=c, label=f"ε = {e:g}")
        r[f"eps_v{i}"], r[f"eps_g{i}"] = e, max(float(gap[-1]), FLOOR)
    ax.set(xlabel="step", ylabel="f − f* (of the unscaled valley)", title="Adam on 1e-4 × the valley, lr 0.1",
           ylim=(FLOOR / 3, None))
    ax.legend()
    sec.figure(fig, "ideas-eps.png", "What ε does",
               "ε is the gradient size below which Adam stops normalizing: once √v̂ is much smaller than ε, the "
               "step is lr·m̂/ε, plain momentum SGD with a tiny step.",
               "Gradients here are about a ten-thousandth of the unscaled valley's. Final f − f* (unscaled): "
               "ε = {eps_v0:g} → {eps_g0:.1e}, ε = {eps_v1:g} → {eps_g1:.1e}, ε = {eps_v2:g} → {eps_g2:.1e}, "
               "ε = {eps_v3:g} → {eps_g3:.1e}.", r)


def betas(sec: Section, r: dict[str, Any], res: dict[str, Any]) -> None:
    logs = np.log10(res["final"])
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    im = ax.imshow(logs, origin="lower", aspect="auto", cmap="cividis_r")
    ax.set_xticks(range(len(res["b2s"])), [f"{b:g}" for b in res["b2s"]])
    ax.set_yticks(range(len(res["b1s"])), [f"{b:g}" for b in res["b1s"]])
    ax.set(xlabel="β₂", ylabel="β₁", title=f"{res['name']}: log10(f − f*) after {res['steps']} steps")
    ax.grid(False)
    for (i, j), v in np.ndenumerate(logs):
        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="w" if v > logs.mean() else "k")
    fig.colorbar(im, ax=ax, label="log10(f − f*), floored at −12")
    i, j = np.unravel_index(np.argmin(logs), logs.shape)
    k, m = np.unravel_index(np.argmax(logs), logs.shape)
    d = (res["b1s"].index(0.9), res["b2s"].index(0.999))
    r.update(bb_lr=res["lr"], bb_steps=res["steps"], bb_best=float(res["final"][i, j]), bb_best_b1=res["b1s"][i],
             bb_best_b2=res["b2s"][j], bb_worst=float(res["final"][k, m]), bb_worst_b1=res["b1s"][k],
             bb_worst_b2=res["b2s"][m], bb_default=float(res["final"][d]), bb_cells=logs.size,
             bb_near=int(np.sum(logs <= logs.min() + 1)), bb_name=res["name"],
             bb_floor=FLOOR, bb_d1=0.9, bb_d2=0.999)
    sec.figure(fig, "ideas-betas.png", "Sensitivity to β₁ × β₂",
               "β₁ and β₂ act together, so they are tuned as a pair, not one at a time.",
               "Adam on {bb_name}, lr = {bb_lr:.2g} (best for the default betas), {bb_steps} steps, f − f* floored at "
               "{bb_floor:.0e}. Best cell β = ({bb_best_b1:g}, {bb_best_b2:g}): {bb_best:.1e}; the default "
               "({bb_d1:g}, {bb_d2:g}): "
               "{bb_default:.1e}; worst ({bb_worst_b1:g}, {bb_worst_b2:g}): {bb_worst:.1e}. {bb_near} of "
               "{bb_cells} cells are within a factor of ten of the best.", r)


def memory(sec: Section, r: dict[str, Any], sizes: dict[str, dict], small: float, n: int, block: float,
           n_small: int) -> None:
    names = list(sizes)
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    y = np.arange(len(names))
    for k, (prec, label, c) in enumerate(((None, "float32 (default)", PALETTE["blue"]),
                                          ("bf16", "state_precision='bf16'", PALETTE["orange"]),
                                          ("int8", "state_precision='int8'", PALETTE["green"]))):
        ax.barh(y + (k - 1) * 0.27, [sizes[n][prec] for n in names], height=0.27, color=c, label=label)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set(xlabel="bytes of optimizer state per parameter (float32 parameters)", ylabel="optimizer",
           title="measured from state_dict() after one step")
    ax.legend(loc="lower right")
    for name in names:
        key = name.replace(" + ", "_").replace(" ", "_")
        r.update({f"mem_{key}_fp32": sizes[name][None], f"mem_{key}_bf16": sizes[name]["bf16"],
                  f"mem_{key}_int8": sizes[name]["int8"]})
    r.update(mem_small_int8=small, mem_n=n, mem_block=block, mem_small_n=n_small)
    sec.figure(fig, "ideas-memory.png", "Memory: bytes of state per parameter",
               "Adam's two moments double SGD-with-momentum's memory; adamkit's bf16 and int8 states cut that by "
               "two and by almost four.",
               "From real state_dicts of a parameter of {mem_n} float32 elements: SGD with momentum "
               "{mem_SGD_momentum_fp32:g} bytes per parameter, Adam {mem_Adam_fp32:g}, AMSGrad {mem_AMSGrad_fp32:g}; "
               "Adam with bf16 states {mem_Adam_bf16:g}, with int8 states {mem_Adam_int8:.3f} (one byte per element "
               "and state plus one float32 absmax per block of {mem_block:.0f}). Small tensors keep full precision: a "
               "parameter of {mem_small_n} elements with int8 states still takes {mem_small_int8:g} bytes per "
               "parameter.", r)
