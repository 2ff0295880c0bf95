"""Section 5 — real data: scikit-learn's bundled handwritten digits (8×8 images, 10 classes, no download).

Two models written by hand in NumPy (forward and backward pass): a softmax (multinomial logistic) regression
and a one-hidden-layer MLP. Every optimizer gets the same initial weights, the same mini-batches in the same
order and the same number of epochs; its learning rate is the best of a small log grid on a validation split,
and the test split is only used to report. Then two ablations on the MLP: Adam with its bias correction
switched off (run through :mod:`adamkit.rules`), and AdamW vs Adam + L2 over a learning-rate × weight-decay grid.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

import adamkit.numpy as akn
from adamkit import rules

from matplotlib.colors import LogNorm
from matplotlib.patches import Rectangle

from .report import OKABE_ITO, PALETTE, Section, plt

Params = dict[str, np.ndarray]
MakeOptimizer = Callable[[list[np.ndarray], list[np.ndarray]], Any]  # (weights, biases) → optimizer


# ---- data ---------------------------------------------------------------------------------------------------

def load(seed: int) -> dict[str, np.ndarray]:
    """Train / validation / test splits (56% / 19% / 25%, stratified), standardized with the training stats."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=seed)
    X_train, X_val, y_train, y_val = train_test_split(X_rest, y_rest, test_size=0.25, stratify=y_rest,
                                                      random_state=seed)
    mean, std = X_train.mean(0), X_train.std(0) + 1.0  # +1: some border pixels are (almost) always 0 of 16
    scale = lambda A: (A - mean) / std  # noqa: E731
    return dict(X_train=scale(X_train), y_train=y_train, X_val=scale(X_val), y_val=y_val, X_test=scale(X_test),
                y_test=y_test)


# ---- models: forward and backward by hand ---------------------------------------------------------------------

def init(model: str, rng: np.random.Generator, n_in: int = 64, hidden: int = 64, n_out: int = 10) -> Params:
    if model == "logreg":
        return {"W": np.zeros((n_in, n_out)), "b": np.zeros(n_out)}
    return {"W1": rng.normal(0, np.sqrt(2 / n_in), (n_in, hidden)), "b1": np.zeros(hidden),  # He init (ReLU)
            "W2": rng.normal(0, np.sqrt(1 / hidden), (hidden, n_out)), "b2": np.zeros(n_out)}


def softmax_cross_entropy(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of logits ``z`` against labels ``y``, and its gradient with respect to ``z``."""
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(-np.mean(np.log(p[rows, y] + 1e-300)))
    p[rows, y] -= 1.0
    return loss, p / len(y)


def logits(params: Params, X: np.ndarray) -> np.ndarray:
    if "W" in params:
        return X @ params["W"] + params["b"]
    return np.maximum(X @ params["W1"] + params["b1"], 0.0) @ params["W2"] + params["b2"]


def loss_and_grads(params: Params, X: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
    if "W" in params:
        loss, dz = softmax_cross_entropy(logits(params, X), y)
        return loss, {"W": X.T @ dz, "b": dz.sum(0)}
    h = np.maximum(X @ params["W1"] + params["b1"], 0.0)      # hidden layer, ReLU
    loss, dz = softmax_cross_entropy(h @ params["W2"] + params["b2"], y)
    dh = (dz @ params["W2"].T) * (h > 0)                       # back through the ReLU
    return loss, {"W1": X.T @ dh, "b1": dh.sum(0), "W2": h.T @ dz, "b2": dz.sum(0)}


def evaluate(params: Params, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(loss, accuracy)."""
    z = logits(params, X)
    return softmax_cross_entropy(z, y)[0], float(np.mean(z.argmax(1) == y))


def train(model: str, make_optimizer: MakeOptimizer, data: dict[str, np.ndarray], epochs: int, seed: int,
          batch: int = 64) -> dict[str, Any]:
    """Mini-batch training; per-epoch train loss, validation and test loss/accuracy, and per-step losses."""
    rng = np.random.default_rng(seed)  # same seed → same initial weights and batch order for every optimizer
    params = init(model, rng)
    weights = [k for k in params if k.startswith("W")]
    biases = [k for k in params if k.startswith("b")]
    order = weights + biases  # the optimizer's parameter order, so gradients are passed in the same order
    opt = make_optimizer([params[k] for k in weights], [params[k] for k in biases])
    X, y = data["X_train"], data["y_train"]
    hist: dict[str, list[float]] = {k: [] for k in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc",
                                                    "step_loss")}
    for _ in range(epochs):
        perm = rng.permutation(len(y))
        losses = []
        for start in range(0, len(y), batch):
            idx = perm[start:start + batch]
            loss, grads = loss_and_grads(params, X[idx], y[idx])
            if not np.isfinite(loss):
                break
            opt.step([grads[k] for k in order])
            losses.append(loss)
        hist["step_loss"] += losses
        hist["train_loss"].append(float(np.mean(losses)) if losses else np.inf)
        for split in ("val", "test"):
            with np.errstate(over="ignore", invalid="ignore"):
                l, a = evaluate(params, data[f"X_{split}"], data[f"y_{split}"])
            hist[f"{split}_loss"].append(l if np.isfinite(l) else np.inf)
            hist[f"{split}_acc"].append(a)
    return hist


# ---- the bias-correction ablation ---------------------------------------------------------------------------

class AdamAblation:
    """Adam run straight from the rule :func:`adamkit.rules.adam`, with the bias corrections optional.

    ``adamkit.numpy.Adam`` always corrects m and v (the coefficients ``step_size = lr/(1 − β₁ᵗ)`` and
    ``bc2_sqrt = √(1 − β₂ᵗ)`` come from ``rules.ADAM.coefficients``). Here we compute the same coefficients and,
    for the ablation, overwrite them with ``step_size = lr`` and ``bc2_sqrt = 1``: the update becomes
    θ ← θ − lr · m/(√v + ε) with the raw, zero-started moments. With ``bias_correction=True`` this class is
    exactly ``adamkit.numpy.Adam``.
    """

    def __init__(self, params: list[np.ndarray], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, bias_correction: bool = True) -> None:
        self.params = params
        self.h = rules.ADAM.hyperparameters(lr=lr, betas=betas, eps=eps)  # validated, torch's defaults
        self.update = rules.bind(rules.adam, rules.NUMPY_OPS)           # the rule, on NumPy arrays
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0
        self.bias_correction = bias_correction

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        c, _ = rules.ADAM.coefficients(self.h, float(self.t), {})
        if not self.bias_correction:
            c.update(step_size=float(self.h["lr"]), bc2_sqrt=1.0)
        for i, (p, g) in enumerate(zip(self.params, grads)):
            p[...], self.m[i], self.v[i], _ = self.update(p, g, self.m[i], self.v[i], None, **c)


# ---- the optimizers compared ----------------------------------------------------------------------------------

def compared() -> dict[str, Callable[[float], MakeOptimizer]]:
    """Name → (lr → optimizer factory). Everything not named is torch.optim's default."""
    return {
        "SGD-Nesterov": lambda lr: lambda w, b: akn.SGD(w + b, lr=lr, momentum=0.9, nesterov=True),
        "AdaGrad": lambda lr: lambda w, b: akn.Adagrad(w + b, lr=lr),
        "RMSprop": lambda lr: lambda w, b: akn.RMSprop(w + b, lr=lr),
        "Adam": lambda lr: lambda w, b: akn.Adam(w + b, lr=lr),
        "AdamW": lambda lr: lambda w, b: akn.AdamW(w + b, lr=lr),  # weight_decay 0.01, on all parameters
        "NAdam": lambda lr: lambda w, b: akn.NAdam(w + b, lr=lr),
    }


def compare(sec: Section, r: dict[str, Any], data: dict, epochs: int, grid: np.ndarray, seed: int) -> dict:
    """Every optimizer of :func:`compared` on both models, each with its best lr on the validation split."""
    best: dict[str, dict[str, Any]] = {"logreg": {}, "mlp": {}}
    for model in best:
        for name, factory in compared().items():
            runs = [(lr, train(model, factory(lr), data, epochs, seed)) for lr in grid]
            lr, hist = min(runs, key=lambda run: run[1]["val_loss"][-1])
            best[model][name] = {"lr": float(lr), **hist}
        sec.progress(f"{model}: {len(compared())} optimizers × {len(grid)} learning rates")
    for model in best:
        for name, h in best[model].items():
            r[f"{model}_{name}_acc"] = h["test_acc"][-1]
            r[f"{model}_{name}_loss"] = h["test_loss"][-1]
            r[f"{model}_{name}_lr"] = h["lr"]
        top = max(best[model], key=lambda k: best[model][k]["test_acc"][-1])
        r[f"{model}_top"], r[f"{model}_top_acc"] = top, best[model][top]["test_acc"][-1]
        accs = [h["test_acc"][-1] for h in best[model].values()]
        r[f"spread_{model}"] = int(round((max(accs) - min(accs)) * r["n_test"]))
    r["one_image"] = 1 / r["n_test"]
    r["adam_logreg_acc"] = r["logreg_Adam_acc"]
    r["adam_mlp_acc"] = r["mlp_Adam_acc"]
    return best


def compare_figure(sec: Section, r: dict[str, Any], best: dict, epochs: int) -> None:
    fig, axes = plt.subplots(2, 4, figsize=(14, 6), layout="constrained")
    colors = dict(zip(compared(), OKABE_ITO * 2))
    groups = [list(compared())[:3], list(compared())[3:]]  # at most three optimizers per panel
    e = np.arange(1, epochs + 1)
    for col, (model, group) in enumerate((m, g) for m in ("logreg", "mlp") for g in groups):
        for name in group:
            h = best[model][name]
            label = f"{name} (lr={h['lr']:.2g})"
            axes[0, col].semilogy(e, h["test_loss"], color=colors[name], label=label)
            axes[1, col].plot(e, h["test_acc"], color=colors[name], label=label)
        title = "softmax regression" if model == "logreg" else "MLP 64-64-10"
        axes[0, col].set(title=f"{title}: test loss", xlabel="epoch", ylabel="test loss (log)")
        axes[1, col].set(title=f"{title}: test accuracy", xlabel="epoch", ylabel="test accuracy", ylim=(0.85, 1.0))
        axes[1, col].legend(loc="lower right", fontsize=7)
    sec.figure(fig, "digits-optimizers.png", "Optimizers compared on the digits",
               "Tuned on a small real problem, the optimizers' test accuracies are close; the differences are counted "
               "in test images below.",
               "Same initial weights, batches and {epochs} epochs for every optimizer; learning rates chosen on the "
               "validation split. Test accuracy of softmax regression: Adam {logreg_Adam_acc:.3f}, SGD-Nesterov "
               "{logreg_SGD-Nesterov_acc:.3f}, AdaGrad {logreg_AdaGrad_acc:.3f}, RMSprop {logreg_RMSprop_acc:.3f}, "
               "AdamW {logreg_AdamW_acc:.3f}, NAdam {logreg_NAdam_acc:.3f}. MLP: Adam {mlp_Adam_acc:.3f}, "
               "SGD-Nesterov {mlp_SGD-Nesterov_acc:.3f}, AdaGrad {mlp_AdaGrad_acc:.3f}, RMSprop "
               "{mlp_RMSprop_acc:.3f}, AdamW {mlp_AdamW_acc:.3f}, NAdam {mlp_NAdam_acc:.3f} ({n_test} test "
               "images, so one image is worth {one_image:.4f}). Between the best and the worst tuned optimizer: "
               "{spread_logreg} test images for softmax regression ({logreg_top} best), {spread_mlp} for the MLP "
               "({mlp_top} best).", r)
    rows = [[name] + [f"{best[m][name]['lr']:.2g}" for m in best] +
            [f"{best[m][name]['test_acc'][-1]:.3f} / {best[m][name]['test_loss'][-1]:.3f}" for m in best]
            for name in compared()]
    sec.table(["optimizer", "lr (softmax)", "lr (MLP)", "softmax: test acc / loss", "MLP: test acc / loss"], rows,
              f"After {epochs} epochs; learning rates chosen on the validation split.")


def bias_ablation(sec: Section, r: dict[str, Any], data: dict, epochs: int, grid: np.ndarray, seed: int) -> None:
    """Bias correction on and off (MLP). Kingma & Ba (2015): without it the first steps are too large, worst when
    β₂ is near 1."""
    ablation: dict[tuple[float, bool], list[dict]] = {}
    for beta2 in (0.99, 0.999):
        for bc in (True, False):
            ablation[beta2, bc] = [
                train("mlp", lambda w, b, lr=lr, beta2=beta2, bc=bc: AdamAblation(
                    w + b, lr=lr, betas=(0.9, beta2), bias_correction=bc), data, epochs, seed) for lr in grid]
    sec.progress("bias-correction ablation done")
    fin = {k: np.array([h["val_loss"][-1] for h in v]) for k, v in ablation.items()}
    first = {k: np.array([h["train_loss"][0] for h in v]) for k, v in ablation.items()}
    hi = len(grid) - 1  # the largest learning rate is where the uncorrected steps hurt most
    r.update(ab_lr=float(grid[hi]), ab_first_on=float(first[0.999, True][hi]),
             ab_first_off=float(first[0.999, False][hi]), ab_final_on=float(fin[0.999, True][hi]),
             ab_final_off=float(fin[0.999, False][hi]),
             ab_best_on=float(fin[0.999, True].min()), ab_best_off=float(fin[0.999, False].min()),
             ab_best_lr_on=float(grid[fin[0.999, True].argmin()]),
             ab_best_lr_off=float(grid[fin[0.999, False].argmin()]),
             ab_99_final_on=float(fin[0.99, True][hi]), ab_99_final_off=float(fin[0.99, False][hi]),
             ab_worse=int(np.sum(fin[0.999, False] > fin[0.999, True])), n_grid=len(grid), bc2_off=1.0,
             b2_default=0.999, b2_small=0.99)
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    for (beta2, bc), hs in ablation.items():
        style = dict(color=PALETTE["vermillion"] if beta2 == 0.999 else PALETTE["blue"], ls="-" if bc else "--")
        label = f"β₂={beta2}, bias correction {'on' if bc else 'off'}"
        ax[1].loglog(grid, [max(h["val_loss"][-1], 1e-3) for h in hs], marker="o", label=label, **style)
        smooth = np.convolve(hs[hi]["step_loss"], np.ones(10) / 10, mode="valid")  # mean of 10 batches
        ax[0].semilogy(np.arange(10, len(smooth) + 10), np.maximum(smooth, 1e-2), lw=1.5, label=label, **style)
    ax[0].set(xlabel="step", ylabel="mini-batch loss (mean of the last 10)",
              title=f"training at lr = {grid[hi]:.2g}", ylim=(1e-2, None))
    ax[0].legend()
    ax[1].set(xlabel="learning rate", ylabel=f"validation loss after {epochs} epochs", title="every learning rate")
    ax[1].legend()
    sec.figure(fig, "digits-bias-correction.png", "Bias correction on and off",
               "Switching the bias correction off makes the first steps too large; how much that costs depends on "
               "the learning rate and on β₂.",
               "The MLP trained by adamkit.rules.adam directly, once with the usual coefficients and once with "
               "step_size = lr and bc2_sqrt = {bc2_off:g} (no bias correction). Without it the early steps are "
               "larger by (1 − β₁ᵗ)/√(1 − β₂ᵗ): at lr = {ab_lr:.2g} and β₂ = {b2_default} the first epoch's mean "
               "loss is {ab_first_off:.3f} instead of {ab_first_on:.3f}, and the validation loss after {epochs} epochs "
               "{ab_final_off:.3f} instead of {ab_final_on:.3f} (β₂ = {b2_small}: {ab_99_final_off:.3f} vs "
               "{ab_99_final_on:.3f}). Switching the correction off is worse at {ab_worse} of {n_grid} learning "
               "rates; the best validation loss is {ab_best_on:.3f} with it (lr = {ab_best_lr_on:.2g}), "
               "{ab_best_off:.3f} without (lr = {ab_best_lr_off:.2g}).", r)


def decay_grid(sec: Section, data: dict, quick: bool, seed: int) -> tuple:
    """AdamW vs Adam + L2 over learning rate × weight decay (MLP), decay on the weight matrices only (param
    groups), none on the biases. Returns (lrs, decays, validation losses, epochs)."""
    lrs = np.logspace(-3, -1, 3 if quick else 4)
    # torch's AdamW shrinks θ by lr·λ per step, so with λ fixed the decay moves with lr by construction. Loshchilov &
    # Hutter's decay does not depend on α; we grid over the per-step decay d = lr·λ and pass λ = d/lr.
    wd = {"AdamW": np.logspace(-6, -2, 3 if quick else 5), "Adam + L2": np.logspace(-6, 0, 3 if quick else 5)}
    make = {
        # AdamW: θ ← θ(1 − d) − lr·m̂/(√v̂ + ε)   (decoupled: the decay never enters m or v)
        "AdamW": lambda lr, d: lambda w, b: akn.AdamW(
            [{"params": w, "weight_decay": d / lr}, {"params": b, "weight_decay": 0.0}], lr=lr),
        # Adam + L2: g ← g + λθ, then Adam   (the decay is rescaled by 1/√v̂ like every gradient)
        "Adam + L2": lambda lr, lam: lambda w, b: akn.Adam(
            [{"params": w, "weight_decay": lam}, {"params": b, "weight_decay": 0.0}], lr=lr),
    }
    heat_epochs = 5 if quick else 12
    heat = {}
    for name in make:
        heat[name] = np.array([[train("mlp", make[name](lr, lam), data, heat_epochs, seed)["val_loss"][-1]
                                for lr in lrs] for lam in wd[name]])
    sec.progress("AdamW vs Adam + L2 grid done")
    return lrs, wd, heat, heat_epochs


def separability(r: dict[str, Any], name: str, h: np.ndarray, lrs: np.ndarray, decays: np.ndarray,
                 vmax: float) -> float:
    """"Separable" = one weight decay works for every learning rate. What that restriction costs: with the single
    decay that is best overall, how much higher is each lr's loss than with its own best decay (relative,
    averaged over the learning rates)?"""
    key = "adamw" if name == "AdamW" else "l2"
    h = np.where(np.isfinite(h), h, 10 * vmax)
    relative = h / h.min(axis=0) - 1
    common = int(np.argmin(relative.mean(axis=1)))
    i, j = np.unravel_index(np.argmin(h), h.shape)
    r.update({f"{key}_best": float(h[i, j]), f"{key}_best_lr": float(lrs[j]),
              f"{key}_best_wd": float(decays[i]), f"{key}_sep": float(relative[common].mean()),
              f"{key}_common_wd": float(decays[common]),
              f"{key}_best_wd_per_lr": ", ".join(f"{decays[k]:.0e}" for k in h.argmin(axis=0)),
              f"{key}_edge": "its decay " + ("on the grid's edge" if i in (0, h.shape[0] - 1) else "inside the grid"),
              f"{key}_agree": int(np.sum(h.argmin(axis=0) == common))})
    return float(relative[common].mean())


def decay_figure(sec: Section, r: dict[str, Any], lrs: np.ndarray, wd: dict, heat: dict, heat_epochs: int) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    vmin = min(np.nanmin(h) for h in heat.values())
    vmax = min(max(np.nanmax(np.where(np.isfinite(h), h, np.nan)) for h in heat.values()), 4 * vmin)
    for ax, (name, h) in zip(axes, heat.items()):
        im = ax.imshow(np.minimum(h, vmax), origin="lower", cmap="viridis_r", aspect="auto",
                       norm=LogNorm(vmin=vmin, vmax=vmax))
        ax.set_xticks(range(len(lrs)), [f"{v:.2g}" for v in lrs])
        ax.set_yticks(range(len(wd[name])), [f"{v:.0e}" for v in wd[name]])
        ax.set(xlabel="learning rate", ylabel="decay per step d = lr·λ" if name == "AdamW" else "L2 coefficient λ",
               title=f"{name}: validation loss")
        ax.grid(False)
        i, j = np.unravel_index(np.nanargmin(h), h.shape)
        ax.add_patch(Rectangle((j - 0.48, i - 0.48), 0.96, 0.96, fill=False, ec="red", lw=2.5))
        for (a, b), v in np.ndenumerate(h):
            ax.text(b, a, f"{v:.3f}" if np.isfinite(v) else "inf", ha="center", va="center", fontsize=9,
                    color="w" if v > np.sqrt(vmin * vmax) else "k")
    fig.colorbar(im, ax=axes, shrink=0.8, label="validation loss (log scale, clipped)")
    sep = {name: separability(r, name, h, lrs, wd[name], vmax) for name, h in heat.items()}
    r["heat_epochs"] = heat_epochs
    r["n_lrs"] = len(lrs)
    r["heatmaps"] = heat
    r["heat_lrs"] = ", ".join(f"{v:.2g}" for v in lrs)
    r["sep_verdict"] = ("AdamW's good region is the more separable one here, as Loshchilov & Hutter report"
                        if sep["AdamW"] < sep["Adam + L2"] else
                        "on this small problem Adam + L2's good region is at least as separable as AdamW's, "
                        "unlike in Loshchilov & Hutter's image-classification experiments")
    sec.figure(fig, "digits-adamw-vs-l2.png", "AdamW vs Adam + L2",
               "Decoupled weight decay is meant to let one decay work for every learning rate; whether it does "
               "here is read from every column of the grid, not one.",
               "Validation loss of the MLP after {heat_epochs} epochs (decay on the weight matrices only). torch's "
               "AdamW shrinks θ by lr·λ per step, which would tie the best λ to lr by construction, so AdamW's "
               "axis is the per-step decay d = lr·λ (λ = d/lr is passed), as in Loshchilov & Hutter; Adam + L2 "
               "adds λθ to the gradient. Best cells (red squares): AdamW {adamw_best:.3f} at lr = "
               "{adamw_best_lr:.2g}, d = {adamw_best_wd:.0e} ({adamw_edge}); Adam + L2 {l2_best:.3f} at lr = "
               "{l2_best_lr:.2g}, λ = {l2_best_wd:.0e} ({l2_edge}). Best decay for lr = {heat_lrs}: AdamW "
               "{adamw_best_wd_per_lr}; Adam + L2 {l2_best_wd_per_lr}. One decay for all {n_lrs} learning rates "
               "(AdamW {adamw_common_wd:.0e}, best in {adamw_agree} of {n_lrs} columns; Adam + L2 "
               "{l2_common_wd:.0e}, best in {l2_agree}) raises the validation loss by {adamw_sep:.1%} on average "
               "for AdamW and {l2_sep:.1%} for Adam + L2: {sep_verdict}.", r)


def run(sec: Section, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    data = load(seed)
    epochs = 6 if quick else 20
    grid = np.logspace(-3, -1, 3 if quick else 4)
    sec.text(f"scikit-learn's bundled digits: {sum(len(data[k]) for k in ('y_train', 'y_val', 'y_test'))} "
             f"8×8 images split into {len(data['y_train'])} training, {len(data['y_val'])} validation and "
             f"{len(data['y_test'])} test images. Models written in NumPy with hand-written backward passes: "
             "softmax regression and an MLP (64 → 64 ReLU → 10). Every optimizer starts from the same weights and "
             f"sees the same batches of 64 for {epochs} epochs; its learning rate is the one of the grid "
             + ", ".join(f"{g:.2g}" for g in grid) + " with the lowest final validation loss. Then two "
             "ablations on the MLP: Adam with and without its bias correction (Kingma &amp; Ba, ICLR 2015), and "
             "AdamW against Adam + L2 over a grid of learning rates and weight decays (Loshchilov &amp; Hutter, "
             "<i>Decoupled Weight Decay Regularization</i>, ICLR 2019). Code: <code>adamkit/demo/digits.py</code>.")
    r: dict[str, Any] = {"epochs": epochs, "grid": grid, "n_test": len(data["y_test"])}
    best = compare(sec, r, data, epochs, grid, seed)
    compare_figure(sec, r, best, epochs)
    bias_ablation(sec, r, data, epochs, grid, seed)
    decay_figure(sec, r, *decay_grid(sec, data, quick, seed))
    sec.summary = (f"test accuracy softmax/MLP: Adam {r['logreg_Adam_acc']:.3f}/{r['mlp_Adam_acc']:.3f}, "
                   f"SGD-Nesterov {r['logreg_SGD-Nesterov_acc']:.3f}/{r['mlp_SGD-Nesterov_acc']:.3f}")
    return r
