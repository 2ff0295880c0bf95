"""The update rules of the Adam family, each written once.

Every rule here is a pure element-wise function: it takes one parameter ``theta``, its gradient ``g`` and its
state (``m``, ``v``, ...) plus per-step scalar coefficients, and returns the new parameter and state. The same
function runs

* on whole NumPy arrays (:mod:`adamkit.numpy`),
* on whole torch tensors (the reference path of :mod:`adamkit.torch`),
* on single scalars inside a compiled, multi-threaded loop (:mod:`adamkit.kernels`).

The few non-arithmetic primitives a rule uses (``sqrt``, ``maximum``, ``abs``) are free names that each engine
binds to its own namespace (``numpy.sqrt``, ``torch.sqrt``, ``math.sqrt``); see :func:`bind`.

Rules contain no numeric literals: a literal such as ``1 - beta1`` would silently promote float32 math to
float64 in compiled code. Every coefficient is computed once per step, in float64, by the rule's ``coefficients``
function (the scalars that depend only on the hyperparameters and the step count), and handed to the element
function already in its final form. Conventions follow ``torch.optim`` 2.13 exactly (see ``shared/design.md``).

Example:
    >>> import numpy as np
    >>> from adamkit import rules
    >>> c = rules.ADAM.coefficients(rules.ADAM.hyperparameters(lr=0.1), step=1, scalar_state={})[0]
    >>> f = rules.bind(rules.adam, rules.NUMPY_OPS)
    >>> theta, m, v, v_max = f(np.array([1.0]), np.array([0.5]), np.zeros(1), np.zeros(1), None, **c)
    >>> round(float(theta[0]), 6)   # first Adam step moves by ~lr against the gradient's sign
    0.9
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Collection, Mapping

import numpy as np

__all__ = [
    "Hyper",
    "Rule",
    "RULES",
    "bind",
    "NUMPY_OPS",
    "SCALAR_OPS",
    "sgd",
    "adagrad",
    "rmsprop",
    "adam",
    "adamax",
    "nadam",
    "radam",
]

# --------------------------------------------------------------------------------------------------------------
# Element-wise update functions (the math, once)
# --------------------------------------------------------------------------------------------------------------
# Free names bound by each engine: sqrt, maximum, variance, lerp. ``abs`` and arithmetic work on every backend as
# they are. ``maximum`` propagates NaN from either argument in every engine, as torch.maximum does.
sqrt: Callable[[Any], Any] = np.sqrt
maximum: Callable[[Any, Any], Any] = np.maximum


def lerp(a, b, w):
    """``a + w·(b − a)``, the moving average torch.optim computes with ``lerp_``, in torch.lerp's two forms:
    ``a + w·(b − a)`` for ``|w| < ½`` and ``b − (b − a)·(1 − w)`` otherwise. They differ where ``a`` is infinite
    and ``b`` finite: the first gives inf − inf = NaN, the second keeps the infinity (so ``β1 ≤ ½`` keeps an
    infinite moment infinite). On torch tensors it is torch's own operation; on NumPy arrays ``w`` and ``1 − w``
    are rounded to the arrays' precision first, as torch does.
    """
    if hasattr(a, "lerp"):
        return a.lerp(b, w)
    w = np.asarray(w, dtype=np.result_type(a, b))
    if abs(w) < 0.5:
        return a + w * (b - a)
    return b - (b - a) * (1 - w)


def variance(v, a):
    """``v − a²``, the centered second moment, as torch.optim's centered RMSprop computes it,
    ``addcmul(v, a, a, value=-1)``: one fused multiply-add, so an ``a²`` that overflows leaves an infinite ``v``
    infinite (two roundings would give inf − inf = NaN). On torch tensors it is torch's own operation; on NumPy
    arrays the overflow case is kept. No clamp, as in torch.optim: states stored in bf16 or 8 bits keep the
    variance itself instead (:func:`rmsprop`), which cannot go negative.
    """
    if hasattr(v, "addcmul"):
        return v.addcmul(a, a, value=-1)
    return np.where(np.isposinf(v) & np.isfinite(a), v, v - a * a)


def gradient(theta, g, weight_decay, l2, maximize):
    """The gradient a rule sees: ``g ← −g`` if maximizing, then the L2 term ``g ← g + λ·θ`` if ``l2``."""
    if maximize:
        g = -g
    if l2:
        g = g + weight_decay * theta
    return g


def sgd(theta, g, b, lr, momentum, one_minus_dampening, weight_decay, l2, use_momentum, nesterov, first_step,
        maximize):
    """Stochastic gradient descent with (Nesterov) momentum.

    .. math::
        g_t &= ∇f(θ_{t-1}) + λθ_{t-1} \\\\
        b_t &= μ b_{t-1} + (1-τ) g_t \\quad (b_1 = g_1) \\\\
        θ_t &= θ_{t-1} - γ \\,(g_t + μ b_t \\text{ if nesterov else } b_t)

    ``lr`` = γ, ``momentum`` = μ, ``one_minus_dampening`` = 1−τ, ``weight_decay`` = λ. Without momentum the
    buffer ``b`` is absent and the step is θ ← θ − γ g.
    """
    g = gradient(theta, g, weight_decay, l2, maximize)
    if use_momentum:
        if first_step:
            b = g
        else:
            b = momentum * b + one_minus_dampening * g
        if nesterov:
            g = g + momentum * b
        else:
            g = b
    theta = theta - lr * g
    return theta, b


def adagrad(theta, g, s, clr, eps, weight_decay, l2, maximize):
    """AdaGrad (Duchi et al., 2011).

    .. math::
        s_t &= s_{t-1} + g_t^2 \\\\
        θ_t &= θ_{t-1} - \\tilde γ_t \\, g_t / (\\sqrt{s_t} + ε), \\qquad \\tilde γ_t = γ / (1 + (t-1) η)

    ``s`` is the running sum of squared gradients (torch's ``sum``), ``clr`` = γ̃_t with η = ``lr_decay``.
    """
    g = gradient(theta, g, weight_decay, l2, maximize)
    s = s + g * g
    theta = theta - clr * g / (sqrt(s) + eps)
    return theta, s


def rmsprop(theta, g, v, g_avg, b, lr, alpha, one_minus_alpha, eps, momentum, weight_decay, l2, centered,
            variance_stored, use_momentum, maximize):
    """RMSprop (Hinton, 2012), optionally centered and with momentum.

    .. math::
        v_t &= α v_{t-1} + (1-α) g_t^2 \\\\
        \\bar g_t &= α \\bar g_{t-1} + (1-α) g_t \\quad (\\text{centered}) \\\\
        d_t &= \\sqrt{v_t - \\bar g_t^2} + ε \\quad (\\text{centered; else } \\sqrt{v_t} + ε) \\\\
        b_t &= μ b_{t-1} + g_t / d_t, \\quad θ_t = θ_{t-1} - γ b_t \\quad (\\text{momentum; else } θ_t = θ_{t-1} - γ g_t/d_t)

    ``v`` is torch's ``square_avg``, ``g_avg`` its ``grad_avg``, ``b`` its ``momentum_buffer``.

    ``variance_stored`` (centered, ``square_avg`` stored in bf16 or 8 bits): ``v`` holds the variance
    :math:`c = v - \\bar g^2` itself, updated as :math:`c_t = α (c_{t-1} + (1-α)(g_t - \\bar g_{t-1})^2)` (the same
    value, exactly), so that it is rounded on its own scale and cannot go negative. Rounded separately, v and ḡ²
    (about equal when the gradient varies little) keep nothing of their difference. Checkpoints in torch's format
    hold v = c + ḡ² (:mod:`adamkit.checkpoints`).
    """
    g = gradient(theta, g, weight_decay, l2, maximize)
    if centered and variance_stored:
        deviation = g - g_avg
        v = alpha * (v + one_minus_alpha * deviation * deviation)
        g_avg = lerp(g_avg, g, one_minus_alpha)
        d = sqrt(v + (g_avg - g_avg)) + eps  # ḡ − ḡ: NaN for an infinite or NaN ḡ, where v − ḡ² is NaN or −inf
    else:
        v = alpha * v + one_minus_alpha * g * g
        if centered:
            g_avg = lerp(g_avg, g, one_minus_alpha)
            d = sqrt(variance(v, g_avg)) + eps
        else:
            d = sqrt(v) + eps
    if use_momentum:
        b = momentum * b + g / d
        theta = theta - lr * b
    else:
        theta = theta - lr * g / d
    return theta, v, g_avg, b


def adam(theta, g, m, v, v_max, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
         weight_decay, l2, decay, decoupled, amsgrad, maximize):
    """Adam (Kingma & Ba, 2014); AMSGrad (Reddi et al., 2018) and AdamW (Loshchilov & Hutter, 2019) as options.

    .. math::
        θ &← θ (1 - γλ) \\quad (\\text{decoupled weight decay, AdamW}) \\\\
        m_t &= β_1 m_{t-1} + (1-β_1) g_t \\qquad \\text{(first moment)} \\\\
        v_t &= β_2 v_{t-1} + (1-β_2) g_t^2 \\qquad \\text{(uncentered second moment)} \\\\
        \\hat v_t &= \\max(\\hat v_{t-1}, v_t) \\quad (\\text{AMSGrad, raw } v) \\\\
        θ_t &= θ_{t-1} - \\frac{γ}{1-β_1^t} \\, \\frac{m_t}{\\sqrt{v_t}/\\sqrt{1-β_2^t} + ε}

    ``step_size`` = γ/(1−β1^t) and ``bc2_sqrt`` = √(1−β2^t) are the bias corrections; ``decay`` = 1 − γλ.
    """
    if decoupled:
        theta = theta * decay
    g = gradient(theta, g, weight_decay, l2, maximize)
    m = lerp(m, g, one_minus_beta1)
    v = beta2 * v + one_minus_beta2 * g * g
    if amsgrad:
        v_max = maximum(v_max, v)
        denom = sqrt(v_max) / bc2_sqrt + eps
    else:
        denom = sqrt(v) / bc2_sqrt + eps
    theta = theta - step_size * m / denom
    return theta, m, v, v_max


def adamax(theta, g, m, u, beta1, one_minus_beta1, beta2, eps, step_size, weight_decay, l2, maximize):
    """AdaMax, Adam with the infinity norm (Kingma & Ba, 2014, §7.1).

    .. math::
        m_t &= β_1 m_{t-1} + (1-β_1) g_t \\\\
        u_t &= \\max(β_2 u_{t-1}, |g_t| + ε) \\\\
        θ_t &= θ_{t-1} - \\frac{γ}{1-β_1^t} \\, m_t / u_t

    ``u`` is torch's ``exp_inf``; ``step_size`` = γ/(1−β1^t).
    """
    g = gradient(theta, g, weight_decay, l2, maximize)
    m = lerp(m, g, one_minus_beta1)
    u = maximum(beta2 * u, abs(g) + eps)
    theta = theta - step_size * m / u
    return theta, m, u


def nadam(theta, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bc2, grad_step, momentum_step,
          weight_decay, l2, decay, decoupled, maximize):
    """NAdam, Adam with Nesterov momentum (Dozat, 2016), with torch's momentum schedule.

    .. math::
        μ_t &= β_1 (1 - ½ · 0.96^{tψ}) \\\\
        m_t &= β_1 m_{t-1} + (1-β_1) g_t, \\quad v_t = β_2 v_{t-1} + (1-β_2) g_t^2 \\\\
        θ_t &= θ_{t-1} - γ\\frac{1-μ_t}{1-\\prod_{i≤t} μ_i}\\frac{g_t}{\\sqrt{\\hat v_t}+ε}
                        - γ\\frac{μ_{t+1}}{1-\\prod_{i≤t+1} μ_i}\\frac{m_t}{\\sqrt{\\hat v_t}+ε},
                        \\qquad \\hat v_t = v_t / (1-β_2^t)

    ``grad_step`` and ``momentum_step`` are the two fractions times γ; ``bc2`` = 1−β2^t.
    """
    if decoupled:
        theta = theta * decay
    g = gradient(theta, g, weight_decay, l2, maximize)
    m = lerp(m, g, one_minus_beta1)
    v = beta2 * v + one_minus_beta2 * g * g
    denom = sqrt(v / bc2) + eps
    theta = theta - grad_step * g / denom
    theta = theta - momentum_step * m / denom
    return theta, m, v


def radam(theta, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, lr, bc1, bc2_sqrt, rect, rectified,
          weight_decay, l2, decay, decoupled, maximize):
    """RAdam, rectified Adam (Liu et al., 2020).

    .. math::
        ρ_∞ &= 2/(1-β_2) - 1, \\quad ρ_t = ρ_∞ - 2tβ_2^t/(1-β_2^t) \\\\
        r_t &= \\sqrt{\\frac{(ρ_t-4)(ρ_t-2)ρ_∞}{(ρ_∞-4)(ρ_∞-2)ρ_t}} \\\\
        θ_t &= θ_{t-1} - γ \\hat m_t \\, r_t \\frac{\\sqrt{1-β_2^t}}{\\sqrt{v_t}+ε} \\quad \\text{if } ρ_t > 5,
              \\text{ else } θ_{t-1} - γ \\hat m_t, \\qquad \\hat m_t = m_t/(1-β_1^t)

    ``rectified`` is ρ_t > 5 and ``rect`` is r_t, both computed per step.
    """
    if decoupled:
        theta = theta * decay
    g = gradient(theta, g, weight_decay, l2, maximize)
    m = lerp(m, g, one_minus_beta1)
    v = beta2 * v + one_minus_beta2 * g * g
    m_hat = m / bc1
    if rectified:
        theta = theta - m_hat * lr * (bc2_sqrt / (sqrt(v) + eps)) * rect
    else:
        theta = theta - m_hat * lr
    return theta, m, v


# Functions a rule may call; engines bind them along with the rule.
HELPERS: dict[str, Callable] = {"gradient": gradient}

def _scalar_maximum(a, b):
    """max(a, b) of two scalars, NaN if either is NaN (as torch.maximum; Python's max drops a NaN in ``b``)."""
    if a != a or b != b:
        return a + b
    return b if b > a else a


def _scalar_lerp(a, b, w):
    """:func:`lerp` of scalars, as ``base + (b − a)·c``: ``a + w·(b − a)`` for ``|w| < ½``, else ``b + (b − a)·(w − 1)``,
    which is ``b − (b − a)·(1 − w)`` exactly (``w − 1`` rounds to ``−(1 − w)``; ``w / w``: a one of ``w``'s type, a
    literal would widen float32; ``|w| ≥ ½`` there). The form depends on ``w`` alone, so in a loop ``c`` is hoisted
    and each element takes a select, not a branch (7 % of the AVX2 bf16-state kernel)."""
    near_a = abs(w) < 0.5
    return (a if near_a else b) + (b - a) * (w if near_a else w - w / w)


def _scalar_variance(v, a):
    """:func:`variance` of two scalars."""
    if v == math.inf and a - a == 0:  # v infinite, a finite: the fused multiply-add keeps v
        return v
    return v - a * a


NUMPY_OPS: dict[str, Any] = {"sqrt": np.sqrt, "maximum": np.maximum, "variance": variance, "lerp": lerp}
SCALAR_OPS: dict[str, Any] = {"sqrt": math.sqrt, "maximum": _scalar_maximum, "variance": _scalar_variance,
                              "lerp": _scalar_lerp}
"""Scalar primitives; the Python functions among them are compiled along with the rule (``wrap``)."""


def bind(fn: Callable, ops: Mapping[str, Any], wrap: Callable[[Callable], Callable] = lambda f: f,
         helpers: Mapping[str, Callable] | None = None) -> Callable:
    """Return ``fn`` with its primitives (``sqrt``, ``maximum``) and helpers bound to an engine's namespace.

    The code object is shared, so the math is the one written above; only the names it looks up change.
    ``wrap`` is applied to the result and to every helper (the compiled engine passes ``numba.njit``);
    ``helpers`` are the functions the rule calls (default: :data:`HELPERS`).
    """
    namespace = dict(fn.__globals__)
    namespace.update({k: wrap(v) if isinstance(v, types.FunctionType) else v for k, v in ops.items()})
    helpers = HELPERS if helpers is None else helpers
    for name, helper in helpers.items():
        if helper is not fn:
            namespace[name] = bind(helper, ops, wrap, {})
    bound = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    bound.__doc__ = fn.__doc__
    return wrap(bound)


# --------------------------------------------------------------------------------------------------------------
# Hyperparameters and per-step coefficients (float64 scalars, once per step and tensor)
# --------------------------------------------------------------------------------------------------------------

def _number(x: Any, label: str, name: str) -> float:
    """``x`` as a float; torch's ``TypeError`` (with our words) for anything that is not a number."""
    if not _is_number(x):
        raise TypeError(f"Invalid {label}: {x!r} ({name} must be a number, not {type(x).__name__})")
    return float(x)


def _nonneg(label: str, name: str) -> Callable[[Any], None]:
    """``x ≥ 0`` and finite; the message starts with torch.optim's (``Invalid learning rate: -1``)."""
    def check(x: Any) -> None:
        value = _number(x, label, name)
        if not 0.0 <= value or math.isinf(value):  # nan fails the first test
            raise ValueError(f"Invalid {label}: {x} ({name} must be a finite number >= 0)")
    return check


def _is_number(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float, np.floating, np.integer)):
        return True
    # 0-dim / 1-element tensors (torch) are numbers for validation purposes
    numel = getattr(x, "numel", None)
    return callable(numel) and numel() == 1 and getattr(x, "dtype", None) is not None and x.dtype.is_floating_point


def _flag(name: str) -> Callable[[Any], None]:
    """True or False (0 and 1 too: torch.optim takes any truthy value, adamkit the lossless ones)."""
    def check(x: Any) -> None:
        if not (isinstance(x, (bool, np.bool_)) or (isinstance(x, (int, np.integer)) and x in (0, 1))):
            raise ValueError(f"Invalid {name}: {x!r} (must be True or False)")
    return check


def _betas(x: Any) -> None:
    """Two numbers in [0, 1): torch's ``IndexError`` for fewer, ``TypeError`` for no sequence."""
    try:
        b1, b2 = x
    except TypeError:
        raise TypeError(f"Invalid betas: {x!r} (must be a pair (beta1, beta2))") from None
    except ValueError:
        error = IndexError if len(x) < 2 else ValueError
        raise error(f"Invalid betas: {x!r} (must be a pair (beta1, beta2))") from None
    for i, b in enumerate((b1, b2)):
        label = f"beta parameter at index {i}"
        if not 0.0 <= _number(b, label, "betas") < 1.0:
            raise ValueError(f"Invalid {label}: {b} (betas must lie in [0, 1))")


def _unit(label: str, name: str) -> Callable[[Any], None]:
    """``0 ≤ x ≤ 1`` (torch.optim checks only ``x ≥ 0``, where it checks at all: outside [0, 1] a moving average
    has a negative weight)."""
    def check(x: Any) -> None:
        if not 0.0 <= _number(x, label, name) <= 1.0:
            raise ValueError(f"Invalid {label}: {x} ({name} must lie in [0, 1])")
    return check


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its torch.optim name and default, and a validator raising torch.optim's error type
    (``ValueError`` for a bad value, ``TypeError`` for a value that is not a number)."""

    name: str
    default: Any
    check: Callable[[Any], None]
    keyword_only: bool = False
    doc: str = ""


@dataclass(frozen=True)
class Rule:
    """A family member: the element function plus everything an engine needs to run it.

    Attributes:
        name: torch.optim class name (``"Adam"``).
        update: the element-wise function (``theta, g, *states, **coefficients``).
        hypers: hyperparameters in torch.optim's positional order, with torch's defaults.
        states: ``states(h)`` → ``{name: initial value}`` of the array states present under hyperparameters ``h``
            (names are torch.optim's state keys). Absent states are passed to ``update`` as ``None``.
        update_states: names of ``update``'s state arguments, in order.
        scalar_states: names and initial values of per-tensor scalar states (``step``, ``mu_product``).
        coefficients: ``coefficients(h, step, scalar_state)`` → (coefficient dict for ``update``, new scalar
            state); computed in float64 once per tensor and step.
        check_group: ``check_group(h, precision)``: cross-parameter validation (e.g. Nesterov needs momentum),
            given the states' storage (``state_precision``: ``None``, ``"bf16"`` or ``"int8"``).
        sparse_gradients: whether sparse gradients are taken (torch.optim's SGD and Adagrad take them; the math
            is the dense rule on the entries present); ``sparse_weight_decay``: also with weight decay.
        states_at_construction: the states exist from construction (torch.optim.Adagrad's ``sum``), not from
            the first step.
        states_on_first_step_only: a checkpoint may lack them until the first step (SGD's momentum buffer; SGD
            keeps no step count).
        torch_fused: torch.optim has a fused kernel for this class (its checkpoints carry ``fused``).
        stored_variance: ``(v, a)``: with ``centered`` and ``v`` stored in bf16 or 8 bits, the state ``v`` holds
            the variance ``v − a²`` instead (RMSprop's ``square_avg``; ``a`` is ``grad_avg``), which rounding cannot
            make negative; torch's format holds ``v``.
        initial_from_defaults: hyperparameters whose constructor value, not the group's, sets the initial states
            (torch.optim.Adagrad starts every group's ``sum`` at the constructor's ``initial_accumulator_value``).
    """

    name: str
    update: Callable
    hypers: tuple[Hyper, ...]
    update_states: tuple[str, ...]
    states: Callable[[Mapping[str, Any]], dict[str, float]]
    coefficients: Callable[[Mapping[str, Any], float, Mapping[str, float]], tuple[dict, dict]]
    scalar_states: dict[str, float] = field(default_factory=lambda: {"step": 0.0})
    check_group: Callable[[Mapping[str, Any], str | None], None] = lambda h, precision: None
    defaults_override: dict[str, Any] = field(default_factory=dict)
    sparse_gradients: bool = False
    sparse_weight_decay: bool = True
    states_at_construction: bool = False
    states_on_first_step_only: bool = False
    torch_fused: bool = False
    stored_variance: tuple[str, str] | None = None
    initial_from_defaults: tuple[str, ...] = ()

    def hyperparameters(self, **given: Any) -> dict[str, Any]:
        """Defaults overlaid with ``given``, validated. Raises ``ValueError`` naming a bad value or name."""
        names = {h.name for h in self.hypers}
        unknown = set(given) - names
        if unknown:
            raise TypeError(f"{self.name} got unexpected hyperparameter(s): {', '.join(sorted(unknown))}")
        h = {x.name: x.default for x in self.hypers}
        h.update(self.defaults_override)
        h.update(given)
        self.validate(h)
        return h

    def initial_states(self, h: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, float]:
        """:attr:`states` of a group with hyperparameters ``h`` in an optimizer constructed with ``defaults``."""
        return self.states({**h, **{k: defaults[k] for k in self.initial_from_defaults if k in defaults}})

    def states_to_make(self, h: Mapping[str, Any], defaults: Mapping[str, Any], have: Any,
                       stepped: bool) -> dict[str, float]:
        """The array states (and initial values) to make for a tensor whose state holds the keys ``have`` and has
        ``stepped`` (a step count above 0). As in torch.optim, states are made once, for a tensor with no state
        yet: a state missing later (deleted, or needed after a flag such as ``amsgrad`` was switched on) raises
        torch's ``KeyError``, except for rules whose states appear at the first step only (SGD's momentum buffer
        restarts from the gradient)."""
        missing = {k: v for k, v in self.initial_states(h, defaults).items() if k not in have}
        made = stepped or any(k in have for k in self.update_states)
        if missing and made and not self.states_on_first_step_only:
            raise KeyError(next(iter(missing)), f"{self.name}: this tensor's state lacks it; a state is made at "
                                                f"the first step only, as in torch.optim")
        return missing

    def validate(self, h: Mapping[str, Any], precision: str | None = None) -> None:
        """Raise ``ValueError`` (or torch's error type) for a bad value in ``h``, or a combination that states
        stored in ``precision`` cannot run."""
        for x in self.hypers:
            if x.name in h:
                x.check(h[x.name])
        self.check_group(h, precision)


def _lr(h: Mapping[str, Any]) -> Any:
    """γ as a float64 scalar; a tensor lr that requires grad stays a tensor, so that with differentiable=True the
    gradient reaches it through every coefficient (each is affine in γ)."""
    lr = h["lr"]
    return lr if getattr(lr, "requires_grad", False) else float(lr)


def _weight_decay_terms(h: Mapping[str, Any], lr: float) -> dict[str, Any]:
    wd = float(h["weight_decay"])
    decoupled = bool(h.get("decoupled_weight_decay", False)) and wd != 0
    return dict(weight_decay=wd, l2=wd != 0 and not decoupled, decay=1.0 - lr * wd, decoupled=decoupled)


def _moments(h: Mapping[str, Any]) -> dict[str, float]:
    beta1, beta2 = (float(b) for b in h["betas"])
    return dict(beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2)


def learning_rate(default: float) -> Hyper:
    """The learning rate γ, with a class's torch.optim default."""
    return Hyper("lr", default, _nonneg("learning rate", "lr"), doc="learning rate γ")


LR = learning_rate(1e-3)
EPS = Hyper("eps", 1e-8, _nonneg("epsilon value", "eps"), doc="ε added to the denominator")
BETAS = Hyper("betas", (0.9, 0.999), _betas, doc="(β1, β2), decay rates of the first and second moments")
WD = Hyper("weight_decay", 0, _nonneg("weight_decay value", "weight_decay"), doc="weight decay λ")
MAXIMIZE = Hyper("maximize", False, _flag("maximize"), keyword_only=True, doc="maximize the objective")


def _sgd_states(h):
    return {"momentum_buffer": 0.0} if float(h["momentum"]) != 0 else {}


def _sgd_coefficients(h, step, scalar_state):
    momentum = float(h["momentum"])
    c = dict(lr=_lr(h), momentum=momentum, one_minus_dampening=1.0 - float(h["dampening"]),
             weight_decay=float(h["weight_decay"]), l2=float(h["weight_decay"]) != 0, use_momentum=momentum != 0,
             nesterov=bool(h["nesterov"]), first_step=bool(scalar_state.get("fresh", False)),
             maximize=bool(h["maximize"]))
    return c, {}


def _sgd_check(h, precision):
    if h["nesterov"] and (float(h["momentum"]) <= 0 or float(h["dampening"]) != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening (nesterov=True needs "
                         "momentum > 0 and dampening = 0)")


SGD = Rule(
    name="SGD",
    update=sgd,
    hypers=(learning_rate(1e-3), Hyper("momentum", 0, _nonneg("momentum value", "momentum")),
            Hyper("dampening", 0, _unit("dampening value", "dampening")), WD,
            Hyper("nesterov", False, _flag("nesterov")), MAXIMIZE),
    update_states=("momentum_buffer",),
    states=_sgd_states,
    coefficients=_sgd_coefficients,
    scalar_states={},  # torch's SGD keeps no step count; the engine counts steps to know the first one
    check_group=_sgd_check,
    sparse_gradients=True,
    sparse_weight_decay=False,  # torch.optim.SGD fails on a sparse gradient plus its weight term
    states_on_first_step_only=True,
    torch_fused=True,
)


def _adagrad_coefficients(h, step, scalar_state):
    clr = _lr(h) / (1 + (step - 1) * float(h["lr_decay"]))
    wd = float(h["weight_decay"])
    return dict(clr=clr, eps=float(h["eps"]), weight_decay=wd, l2=wd != 0, maximize=bool(h["maximize"])), {}


ADAGRAD = Rule(
    name="Adagrad",
    update=adagrad,
    hypers=(learning_rate(1e-2), Hyper("lr_decay", 0, _nonneg("lr_decay value", "lr_decay")), WD,
            Hyper("initial_accumulator_value", 0,
                  _nonneg("initial_accumulator_value value", "initial_accumulator_value")),
            Hyper("eps", 1e-10, _nonneg("epsilon value", "eps")), MAXIMIZE),
    update_states=("sum",),
    states=lambda h: {"sum": float(h["initial_accumulator_value"])},
    coefficients=_adagrad_coefficients,
    sparse_gradients=True,
    sparse_weight_decay=False,
    states_at_construction=True,
    initial_from_defaults=("initial_accumulator_value",),
    torch_fused=True,
)


def _rmsprop_states(h):
    s = {"square_avg": 0.0}
    if float(h["momentum"]) > 0:
        s["momentum_buffer"] = 0.0
    if h["centered"]:
        s["grad_avg"] = 0.0
    return s


def _rmsprop_check(h, precision):
    # With α = 0, ḡ is the last gradient and the variance is exactly 0: the stored form keeps that 0 and divides
    # by ε, while torch.optim divides by the rounding error of g² − g·g (NaN where it is negative, 0 updates
    # where g² overflows). Neither is a variance estimate, and the two cannot agree: refused.
    if h["centered"] and precision in ("bf16", "int8") and float(h["alpha"]) == 0:
        raise ValueError(f"Invalid alpha value: 0.0 with centered=True and state_precision={precision!r}: the "
                         f"variance of a one-sample average is 0 (use alpha > 0, or full-precision states)")


def _rmsprop_coefficients(h, step, scalar_state):
    alpha, wd, momentum = float(h["alpha"]), float(h["weight_decay"]), float(h["momentum"])
    centered = bool(h["centered"])
    return dict(lr=_lr(h), alpha=alpha, one_minus_alpha=1.0 - alpha, eps=float(h["eps"]), momentum=momentum,
                weight_decay=wd, l2=wd != 0, centered=centered,
                variance_stored=centered and "square_avg" in scalar_state.get("low_precision", ()),
                use_momentum=momentum > 0, maximize=bool(h["maximize"])), {}


RMSPROP = Rule(
    name="RMSprop",
    update=rmsprop,
    hypers=(learning_rate(1e-2), Hyper("alpha", 0.99, _unit("alpha value", "alpha")), EPS, WD,
            Hyper("momentum", 0, _nonneg("momentum value", "momentum")), Hyper("centered", False, _flag("centered")),
            replace(MAXIMIZE, keyword_only=False)),  # positional in torch.optim.RMSprop
    update_states=("square_avg", "grad_avg", "momentum_buffer"),
    states=_rmsprop_states,
    coefficients=_rmsprop_coefficients,
    check_group=_rmsprop_check,
    stored_variance=("square_avg", "grad_avg"),
)


def _adam_states(h):
    s = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
    if h["amsgrad"]:
        s["max_exp_avg_sq"] = 0.0
    return s


def _adam_coefficients(h, step, scalar_state):
    lr = _lr(h)
    moments = _moments(h)
    bc1 = 1 - moments["beta1"] ** step
    bc2 = 1 - moments["beta2"] ** step
    return dict(**moments, eps=float(h["eps"]), step_size=lr / bc1, bc2_sqrt=bc2 ** 0.5,
                **_weight_decay_terms(h, lr), amsgrad=bool(h["amsgrad"]), maximize=bool(h["maximize"])), {}


ADAM = Rule(
    name="Adam",
    update=adam,
    hypers=(LR, BETAS, EPS, WD, Hyper("amsgrad", False, _flag("amsgrad")), MAXIMIZE,
            Hyper("decoupled_weight_decay", False, _flag("decoupled_weight_decay"), keyword_only=True)),
    update_states=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    states=_adam_states,
    coefficients=_adam_coefficients,
    torch_fused=True,
)

# AdamW is Adam with decoupled weight decay (and torch's default λ = 1e-2).
ADAMW = Rule(
    name="AdamW",
    update=adam,
    hypers=(LR, BETAS, EPS, Hyper("weight_decay", 1e-2, _nonneg("weight_decay value", "weight_decay")),
            Hyper("amsgrad", False, _flag("amsgrad")), MAXIMIZE),
    update_states=ADAM.update_states,
    states=_adam_states,
    coefficients=_adam_coefficients,
    defaults_override={"decoupled_weight_decay": True},
    torch_fused=True,
)


def _adamax_coefficients(h, step, scalar_state):
    moments = _moments(h)
    wd = float(h["weight_decay"])
    return dict(beta1=moments["beta1"], one_minus_beta1=moments["one_minus_beta1"], beta2=moments["beta2"],
                eps=float(h["eps"]), step_size=_lr(h) / (1 - moments["beta1"] ** step), weight_decay=wd,
                l2=wd != 0, maximize=bool(h["maximize"])), {}


ADAMAX = Rule(
    name="Adamax",
    update=adamax,
    hypers=(learning_rate(2e-3), BETAS, EPS, WD, MAXIMIZE),
    update_states=("exp_avg", "exp_inf"),
    states=lambda h: {"exp_avg": 0.0, "exp_inf": 0.0},
    coefficients=_adamax_coefficients,
)


def _nadam_coefficients(h, step, scalar_state):
    lr = _lr(h)
    moments = _moments(h)
    beta1, psi = moments["beta1"], float(h["momentum_decay"])
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * psi)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * psi)))
    # torch keeps the running product of μ in a float32 scalar tensor (float64 if that is torch's default dtype)
    dtype = scalar_state.get("dtype", np.float32)
    mu_product = float(dtype(scalar_state["mu_product"]) * dtype(mu))
    mu_product_next = mu_product * mu_next
    c = dict(**moments, eps=float(h["eps"]), bc2=1 - moments["beta2"] ** step,
             grad_step=lr * (1.0 - mu) / (1.0 - mu_product), momentum_step=(lr * mu_next) / (1.0 - mu_product_next),
             **_weight_decay_terms(h, lr), maximize=bool(h["maximize"]))
    return c, {"mu_product": mu_product}


NADAM = Rule(
    name="NAdam",
    update=nadam,
    hypers=(learning_rate(2e-3), BETAS, EPS, WD,
            Hyper("momentum_decay", 4e-3, _nonneg("momentum_decay value", "momentum_decay")),
            Hyper("decoupled_weight_decay", False, _flag("decoupled_weight_decay")), MAXIMIZE),
    update_states=("exp_avg", "exp_avg_sq"),
    states=lambda h: {"exp_avg": 0.0, "exp_avg_sq": 0.0},
    coefficients=_nadam_coefficients,
    scalar_states={"step": 0.0, "mu_product": 1.0},
)


def _radam_coefficients(h, step, scalar_state):
    lr = _lr(h)
    moments = _moments(h)
    beta1, beta2 = moments["beta1"], moments["beta2"]
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2 ** step) / bc2
    rectified = rho_t > 5.0
    rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5 if rectified else 1.0
    return dict(**moments, eps=float(h["eps"]), lr=lr, bc1=bc1, bc2_sqrt=bc2 ** 0.5, rect=rect, rectified=rectified,
                **_weight_decay_terms(h, lr), maximize=bool(h["maximize"])), {}


RADAM = Rule(
    name="RAdam",
    update=radam,
    hypers=(LR, BETAS, EPS, WD, Hyper("decoupled_weight_decay", False, _flag("decoupled_weight_decay")), MAXIMIZE),
    update_states=("exp_avg", "exp_avg_sq"),
    states=lambda h: {"exp_avg": 0.0, "exp_avg_sq": 0.0},
    coefficients=_radam_coefficients,
)

RULES: dict[str, Rule] = {r.name: r for r in (SGD, ADAGRAD, RMSPROP, ADAM, ADAMW, ADAMAX, NADAM, RADAM)}
"""Every family member by torch.optim class name."""


def step_tensor(rule: Rule, h: Mapping[str, Any], theta: Any, g: Any, state: Mapping[str, Any], update: Callable,
                fresh: bool = False, scalar_dtype: Any = np.float32,
                low_precision: Collection[str] = ()) -> tuple[Any, dict[str, Any], dict[str, float]]:
    """One step of ``rule`` for one tensor, on any array backend (the engines' shared core).

    ``state`` holds the array states under torch's names and the scalar states as Python floats; ``fresh``
    says the array states were just created (SGD's first momentum step copies the gradient). ``update`` is the
    rule bound to the backend; ``scalar_dtype`` is the precision torch keeps scalar states in; ``low_precision``
    names the states stored in bf16 or 8 bits (see :attr:`Rule.stored_variance`). Returns the new parameter, the
    new array states and the new scalar states.
    """
    coefficients, new_scalars = step_coefficients(rule, h, state, fresh, scalar_dtype, low_precision)
    args = [state.get(name) for name in rule.update_states]
    theta, *new_states = update(theta, g, *args, **coefficients)
    arrays = {name: new for name, new in zip(rule.update_states, new_states) if name in state}
    return theta, arrays, new_scalars


def step_coefficients(rule: Rule, h: Mapping[str, Any], state: Mapping[str, Any], fresh: bool = False,
                      scalar_dtype: Any = np.float32,
                      low_precision: Collection[str] = ()) -> tuple[dict[str, Any], dict[str, float]]:
    """The coefficients of the next step of one tensor and its new scalar states (``step`` advanced by one);
    ``low_precision``: the names of its states stored in bf16 or 8 bits."""
    step = float(state.get("step", 0.0)) + 1
    scalars = {k: float(state[k]) for k in rule.scalar_states if k != "step"}
    coefficients, new_scalars = rule.coefficients(h, step, {**scalars, "fresh": fresh, "dtype": scalar_dtype,
                                                            "low_precision": frozenset(low_precision)})
    if "step" in rule.scalar_states:
        new_scalars = {"step": step, **new_scalars}
    return coefficients, new_scalars
