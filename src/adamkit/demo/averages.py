"""Section 1 — moving averages: what Adam's ``m`` and ``v`` are, and why they are bias-corrected.

Adam keeps two exponential moving averages (EMAs) per parameter:

    m_t = β₁ m_{t−1} + (1 − β₁) g_t        (the gradient's mean; ``state["exp_avg"]``)
    v_t = β₂ v_{t−1} + (1 − β₂) g_t²       (its *uncentered* second moment; ``state["exp_avg_sq"]``)

both started at zero, so early on they are biased towards zero; dividing by 1 − βᵗ removes that bias.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import adamkit.numpy as akn

from . import explore as ex
from .report import PALETTE, Section, plt


def ema(x: np.ndarray, beta: float) -> np.ndarray:
    """Exponential moving average started at zero: ``m_t = β m_{t−1} + (1−β) x_t`` (Adam's recursion)."""
    m, out = 0.0, np.empty_like(x)
    for t, xt in enumerate(x):
        m = beta * m + (1 - beta) * xt
        out[t] = m
    return out


def sma(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing simple moving average (the mean of the last ``window`` values, fewer at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    t = np.arange(1, len(x) + 1)
    lo = np.maximum(t - window, 0)
    return (c[t] - c[lo]) / (t - lo)


def first_crossing(y: np.ndarray, start: int, level: float) -> int:
    """Steps after ``start`` until ``y`` first reaches ``level`` (rising)."""
    return int(np.argmax(y[start:] >= level))


def ema_vs_sma(sec: Section, r: dict[str, Any], x: np.ndarray, level: np.ndarray, jump: int,
               sigma: float) -> np.ndarray:
    """SMA vs EMA on a noisy signal that jumps; returns the bias-corrected EMA m̂."""
    n = len(x)
    beta1 = 0.9
    # An EMA's weights (1−β)βᵏ have mean age β/(1−β); a window of 2/(1−β) − 1 gives an SMA the same mean age.
    window = round(2 / (1 - beta1) - 1)
    m = ema(x, beta1)
    steps = np.arange(1, n + 1)
    m_hat = m / (1 - beta1 ** steps)  # bias-corrected EMA
    s = sma(x, window)
    mid = 0.5 * (level[0] + level[-1])
    r.update(beta1=beta1, window=window, mean_age=beta1 / (1 - beta1), jump=jump, sigma=sigma,
             lag_sma=first_crossing(s, jump, mid), lag_ema=first_crossing(m_hat, jump, mid), midpoint=mid,
             # noise left in each average on the flat stretch before the jump (after both have warmed up)
             noise_raw=float(np.std(x[100:jump])), noise_sma=float(np.std(s[100:jump] - level[100:jump])),
             noise_ema=float(np.std(m_hat[100:jump] - level[100:jump])),
             early_t=5, ema_raw_early=float(m[4]), ema_hat_early=float(m_hat[4]), level0=float(level[0]))

    fig = plt.figure(figsize=(10, 5.6), layout="constrained")
    gs = fig.add_gridspec(2, 2)
    top, left, right = fig.add_subplot(gs[0, :]), fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[1, 1])
    for ax in (top, left, right):
        ax.plot(steps, x, ".", color="0.7", ms=3, label="noisy signal")
        ax.plot(steps, level, color="k", lw=1, ls=":", label="true level")
        if ax is left:  # the first steps: raw vs corrected EMA
            ax.plot(steps, m, color=PALETTE["vermillion"], lw=1.2, ls="--", label=f"EMA β={beta1}, raw (starts at 0)")
        else:
            ax.plot(steps, s, color=PALETTE["blue"], lw=1.6, label=f"SMA, window {window}")
        ax.plot(steps, m_hat, color=PALETTE["vermillion"], lw=1.6, label="EMA bias-corrected m/(1−βᵗ)")
        ax.set(xlabel="step t", ylabel="value")
    top.set_title("Simple vs exponential moving average")
    top.legend(loc="upper left", ncol=2)
    left.set(xlim=(0, 40), ylim=(-0.1, 1.8), title="the first steps: the raw EMA starts at zero")
    left.legend(loc="lower right", fontsize=7)
    right.set(xlim=(jump - 10, jump + 40), ylim=(0.5, 2.6), title="after the jump: the EMA reacts first")
    right.axhline(mid, color="0.5", lw=0.8)
    sec.figure(fig, "averages-ema.png", "Simple vs exponential moving average",
               "An exponential moving average reacts to a change sooner than a simple one with the same memory, "
               "and needs bias correction because it starts at zero.",
               "Both averages have the same mean age ({mean_age:.0f} steps: an SMA of window {window} and an EMA "
               "with β = {beta1}) and leave about the same noise on the flat stretch (std {noise_sma:.3f} and "
               "{noise_ema:.3f}, from {noise_raw:.3f} raw). After the jump the EMA crosses half-way "
               "({midpoint:.1f}) {lag_ema} steps later, the SMA {lag_sma} steps later: the EMA weighs recent "
               "values most. Bottom left: at step {early_t} the raw EMA is only {ema_raw_early:.2f} while the "
               "signal's level is {level0:.1f}; dividing by 1 − βᵗ gives {ema_hat_early:.2f}.", r)
    return m_hat


def second_moment(sec: Section, r: dict[str, Any], x: np.ndarray, level: np.ndarray, m_hat: np.ndarray, jump: int,
                  sigma: float) -> None:
    """The uncentered second moment v, against a centered variance, and m̂/√v̂ as a signal-to-noise ratio."""
    n, steps = len(x), np.arange(1, len(x) + 1)
    beta2 = 0.99
    v = ema(x ** 2, beta2)
    v_hat = v / (1 - beta2 ** steps)
    # a centered variance for contrast: EMA of (x − m̂)², which Adam does not compute
    c = ema((x - m_hat) ** 2, beta2)
    c_hat = c / (1 - beta2 ** steps)
    before, after = slice(jump - 100, jump), slice(n - 100, n)
    r.update(beta2=beta2, v_before=float(v_hat[before].mean()), v_after=float(v_hat[after].mean()),
             ex2_before=level[0] ** 2 + sigma ** 2, ex2_after=level[-1] ** 2 + sigma ** 2, var=sigma ** 2,
             c_before=float(c_hat[before].mean()), c_after=float(c_hat[after].mean()),
             lag_v=first_crossing(v_hat, jump, 0.5 * (level[0] ** 2 + level[-1] ** 2) + sigma ** 2))
    r["snr_before"] = float(m_hat[before].mean() / np.sqrt(r["v_before"]))
    r["snr_after"] = float(m_hat[after].mean() / np.sqrt(r["v_after"]))
    r["snr_theory_before"] = level[0] / np.sqrt(r["ex2_before"])
    r["snr_theory_after"] = level[-1] / np.sqrt(r["ex2_after"])
    ratio = m_hat / np.sqrt(v_hat)
    r["snr_peak"], r["snr_peak_lag"] = float(ratio[jump:].max()), int(np.argmax(ratio[jump:]))

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    ax[0].plot(steps, x ** 2, ".", color="0.75", ms=3, label="g²")
    ax[0].plot(steps, v_hat, color=PALETTE["purple"], lw=1.8, label=f"v̂: EMA of g², β₂={beta2} (uncentered)")
    ax[0].plot(steps, c_hat, color=PALETTE["green"], lw=1.5, label="EMA of (g − m̂)² (centered, for contrast)")
    ax[0].plot(steps, level ** 2 + sigma ** 2, "k:", lw=1, label="E[g²] = μ² + σ²")
    ax[0].axhline(sigma ** 2, color=PALETTE["green"], ls=":", lw=1, label="σ²")
    ax[0].set(xlabel="step t", ylabel="second moment", ylim=(0, 6), title="Adam's v tracks E[g²], not the variance")
    ax[0].legend(loc="upper left", fontsize=7)
    ax[1].plot(steps, ratio, color=PALETTE["orange"], lw=1.5, label="m̂ / √v̂")
    ax[1].plot(steps, level / np.sqrt(level ** 2 + sigma ** 2), "k:", lw=1, label="μ / √(μ² + σ²)")
    ax[1].set(xlabel="step t", ylabel="m̂ / √v̂", ylim=(0.5, 1.05 * r["snr_peak"]),
              title="Adam's step in units of lr: a signal-to-noise ratio")
    ax[1].legend(loc="lower right")
    sec.figure(fig, "averages-variance.png", "The uncentered exponential moving variance",
               "Adam's v measures the gradient's mean square, not its variance, so m̂/√v̂ is a signal-to-noise "
               "ratio.",
               "Adam's v is an EMA of g² (β₂ = {beta2}), not of (g − mean)². Before the jump v̂ averages "
               "{v_before:.2f} ≈ μ² + σ² = {ex2_before:.2f}, after it {v_after:.2f} ≈ {ex2_after:.2f}, while "
               "the noise variance σ² = {var:.2f} never changed (a centered estimate reads {c_before:.3f} and "
               "{c_after:.3f}). With the longer memory of β₂, v̂ needs {lag_v} steps to get half-way to its new "
               "level (m̂: {lag_ema}). Right: Adam's step m̂/√v̂ is a signal-to-noise ratio ≈ μ/√(μ² + σ²): "
               "{snr_before:.2f} before the jump (theory {snr_theory_before:.2f}) and {snr_after:.2f} after "
               "(theory {snr_theory_after:.2f}); it stays near one while the mean dominates the noise, so lr "
               "sets the size of the step, whatever the scale of the gradient. Right after the jump m̂ adapts "
               "faster than v̂ and the ratio overshoots to {snr_peak:.2f}, {snr_peak_lag} steps after it.", r)


def bias_correction(sec: Section, r: dict[str, Any], rng: np.random.Generator) -> None:
    """Bias correction, read from an adamkit optimizer's own state: a parameter that only receives gradients
    g_t ~ N(μ, σ²); the state holds the raw m_t and v_t."""
    t_max, mu, sd = 50, 1.0, 0.5
    b1, b2 = akn.Adam([np.zeros(1)]).defaults["betas"]
    g = mu + sd * rng.normal(size=t_max)
    res = adam_moments(g, (b1, b2))
    t = np.arange(1, t_max + 1)
    raw_m, raw_v, moves, m_hat, v_hat = res["m"], res["v"], res["step"], res["m_hat"], res["v_hat"]
    raw_step, step = raw_m / np.sqrt(raw_v), m_hat / np.sqrt(v_hat)
    worst = int(np.argmax(raw_step / step))
    r.update(b1=b1, b2=b2, t_max=t_max, mu=mu, sd=sd, ex2=mu ** 2 + sd ** 2,
             m_frac_end=float(raw_m[-1] / m_hat[-1]), raw_v_end=float(raw_v[-1]),
             v_hat_end=float(v_hat[-1]), v_frac_end=float(raw_v[-1] / v_hat[-1]),
             raw_step_first=float(raw_step[0]), step_first=float(step[0]),
             ratio_first=float(raw_step[0] / step[0]), ratio_theory=(1 - b1) / np.sqrt(1 - b2),
             ratio_worst=float(raw_step[worst] / step[worst]), t_worst=worst + 1,
             ratio_end=float(raw_step[-1] / step[-1]),
             max_move_error=float(np.max(np.abs(moves - m_hat / (np.sqrt(v_hat) + res["eps"])))))
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), layout="constrained")
    ax = axes.flat
    ax[0].plot(t, g, ".", color="0.7", label="gradient g_t")
    ax[0].plot(t, raw_m, "--", color=PALETTE["vermillion"], label="m_t  (state['exp_avg'])")
    ax[0].plot(t, m_hat, color=PALETTE["vermillion"], label="m̂_t = m_t / (1 − β₁ᵗ)")
    ax[0].axhline(mu, color="k", ls=":", lw=1, label="μ")
    ax[0].set(title=f"first moment, β₁ = {b1}", xlabel="step t", ylabel="m")
    ax[0].legend(fontsize=7)
    ax[1].semilogy(t, raw_v, "--", color=PALETTE["purple"], label="v_t  (state['exp_avg_sq'])")
    ax[1].semilogy(t, v_hat, color=PALETTE["purple"], label="v̂_t = v_t / (1 − β₂ᵗ)")
    ax[1].axhline(mu ** 2 + sd ** 2, color="k", ls=":", lw=1, label="E[g²]")
    ax[1].set(title=f"second moment, β₂ = {b2}", xlabel="step t", ylabel="v (log scale)")
    ax[1].legend(fontsize=7)
    ax[2].plot(t, raw_step, "--", color=PALETTE["orange"], label="uncorrected m_t / √v_t")
    ax[2].plot(t, step, color=PALETTE["orange"], label="corrected m̂_t / √v̂_t")
    ax[2].plot(t, moves, "k.", ms=4, label="adamkit's actual step / lr")
    ax[2].set(title="the step, in units of lr", xlabel="step t", ylabel="step / lr")
    ax[2].legend(fontsize=7)
    ax[3].plot(t, raw_step / step, color=PALETTE["blue"], label="uncorrected / corrected")
    ax[3].plot(worst + 1, raw_step[worst] / step[worst], "o", color=PALETTE["vermillion"], label="largest ratio")
    ax[3].set(title="how much too large the uncorrected step is", xlabel="step t", ylabel="ratio")
    ax[3].legend(fontsize=7)
    sec.figure(fig, "averages-bias-correction.png", "Why bias correction matters",
               "Without bias correction Adam's first steps are several times too large, because v starts at zero "
               "and forgets that start more slowly than m.",
               "An adamkit.numpy.Adam with the default betas (β₁ = {b1}, β₂ = {b2}) fed gradients with mean "
               "{mu:.1f} and std {sd:.1f}; the dashed curves are the raw moments read from opt.state. After "
               "{t_max} steps the raw m has reached {m_frac_end:.1%} of m̂ but the raw v only "
               "{v_frac_end:.1%} of v̂ = {v_hat_end:.2f}: with β₂ this close to one, v stays biased for hundreds "
               "of steps. Uncorrected, the first step would be {ratio_first:.2f} times too large "
               "(= (1 − β₁)/√(1 − β₂) = {ratio_theory:.2f}), the worst {ratio_worst:.2f} times at step "
               "{t_worst}, still {ratio_end:.2f} times at step {t_max}. The dots are the steps adamkit took: "
               "they follow the corrected curve (largest difference {max_move_error:.1e}). Bottom right: the ratio "
               "of the two steps, largest at step {t_worst}.", r)


def run(sec: Section, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    sec.text("Adam's state is two exponential moving averages per parameter: <code>exp_avg</code> (m, the "
             "gradient's mean) and <code>exp_avg_sq</code> (v, its uncentered second moment). The step is "
             "lr · m̂/(√v̂ + ε) with m̂ = m/(1 − β₁ᵗ) and v̂ = v/(1 − β₂ᵗ). The figures below show what those "
             "averages measure and what the two corrections fix. Code: <code>adamkit/demo/averages.py</code>.")
    rng = np.random.default_rng(seed)
    r: dict[str, Any] = {}
    n, jump, sigma = 700, 200, 0.3
    level = np.where(np.arange(n) < jump, 1.0, 2.0)
    x = level + sigma * rng.normal(size=n)
    m_hat = ema_vs_sma(sec, r, x, level, jump, sigma)
    second_moment(sec, r, x, level, m_hat, jump, sigma)
    bias_correction(sec, r, rng)
    sec.progress("interactive moving averages: Adam runs for every β₁ and β₂")
    explorer(sec, r, x[:300], jump)
    sec.summary = (f"EMA reacts to the jump in {r['lag_ema']} steps (SMA {r['lag_sma']}); uncorrected first "
                   f"step {r['ratio_first']:.2f}x too large")
    return r


def adam_moments(g: np.ndarray, betas: tuple[float, float]) -> dict[str, np.ndarray]:
    """Feed ``g`` to an ``adamkit.numpy.Adam`` and read m, v from its state; bias-corrected too; and the step."""
    theta = np.zeros(1)
    opt = akn.Adam([theta], lr=1.0, betas=betas)  # lr = 1: its steps are in units of lr
    out: dict[str, list[float]] = {"m": [], "v": [], "step": []}
    for t in range(len(g)):
        before = theta[0]
        opt.step([g[t:t + 1]])
        out["m"].append(opt.state[0]["exp_avg"][0])
        out["v"].append(opt.state[0]["exp_avg_sq"][0])
        out["step"].append(before - theta[0])  # lr = 1: the step in units of lr
    res = {k: np.array(v) for k, v in out.items()}
    t = np.arange(1, len(g) + 1)
    res["m_hat"], res["v_hat"] = res["m"] / (1 - betas[0] ** t), res["v"] / (1 - betas[1] ** t)
    res["eps"] = opt.defaults["eps"]
    return res


def explorer(sec: Section, r: dict[str, Any], g: np.ndarray, jump: int) -> None:
    """m, v and the step for every β₁ × β₂ slider position, from adamkit's own state."""
    b1s, b2s = [0.5, 0.8, 0.9, 0.95, 0.99], [0.9, 0.99, 0.999]
    t = np.arange(1, len(g) + 1)
    p1 = ex.panel("m: the gradient's average", "step t", "value", (0, len(g)), (-0.5, 3.5))
    p2 = ex.panel("√v: the gradient's RMS", "step t", "√v", (0, len(g)), (0, 3))
    p3 = ex.panel("the step m̂/(√v̂ + ε)", "step t", "step / lr", (0, len(g)), (0, 2))
    runs = {}
    for i, j in np.ndindex(len(b1s), len(b2s)):
        res = adam_moments(g, (b1s[i], b2s[j]))
        runs[i, j] = [[ex.series("gradient g", t, g, p1), ex.series("m (exp_avg)", t, res["m"], p1, "4 3"),
                       ex.series("m̂ (corrected)", t, res["m_hat"], p1)],
                      [ex.series("√v (exp_avg_sq)", t, np.sqrt(res["v"]), p2, "4 3"),
                       ex.series("√v̂ (corrected)", t, np.sqrt(res["v_hat"]), p2)],
                      [ex.series("step / lr", t, res["step"], p3)]]
    colors = {"gradient g": "#bbbbbb", "m (exp_avg)": PALETTE["vermillion"], "m̂ (corrected)": PALETTE["vermillion"],
              "√v (exp_avg_sq)": PALETTE["purple"], "√v̂ (corrected)": PALETTE["purple"], "step / lr": PALETTE["blue"]}
    data = ex.explorer([ex.control("beta1", "β₁", b1s, 2), ex.control("beta2", "β₂", b2s, 2)], [p1, p2, p3],
                       colors, runs)
    default = adam_moments(g, (0.9, 0.999))
    r.update(mx_runs=len(runs), mx_b1=0.9, mx_b2=0.999, mx_jump=jump,
             mx_step_before=float(default["step"][jump - 1]), mx_step_after=float(default["step"][jump + 20]))
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2), layout="constrained")
    ax[0].plot(t, g, color="0.75", label="gradient g")
    ax[0].plot(t, default["m_hat"], color=PALETTE["vermillion"], label="m̂")
    ax[1].plot(t, np.sqrt(default["v_hat"]), color=PALETTE["purple"], label="√v̂")
    ax[2].plot(t, default["step"], color=PALETTE["blue"], label="step / lr")
    for a, yl in zip(ax, ("value", "√v̂", "step / lr")):
        a.set(xlabel="step t", ylabel=yl)
        a.legend()
    sec.figure(fig, "averages-explore.png", "Explore: Adam's moving averages for every β₁ and β₂",
               "Slide β₁ and β₂ to see how long each average remembers, and how the step reacts to the jump.",
               "{mx_runs} runs of adamkit.numpy.Adam on the signal above, m and v read from opt.state after every "
               "step. At β = ({mx_b1:g}, {mx_b2:g}) the step is {mx_step_before:.2f}·lr just before the jump at "
               "step {mx_jump} and {mx_step_after:.2f}·lr twenty steps after it.", r, data=data,
               key="explore-averages")
