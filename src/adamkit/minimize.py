"""SciPy-style minimization with any member of the Adam family.

Example:
    >>> import numpy as np, adamkit
    >>> rosen = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
    >>> rosen_grad = lambda x: np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2),
    ...                                  200 * (x[1] - x[0] ** 2)])
    >>> res = adamkit.minimize(rosen, [-1.0, 1.0], method="adam", jac=rosen_grad,
    ...                        options={"lr": 0.02, "maxiter": 20000, "gtol": 1e-6})
    >>> res.success, np.round(res.x, 3).tolist()
    (True, [1.0, 1.0])

    The same through SciPy itself:

    >>> from scipy.optimize import minimize
    >>> res2 = minimize(lambda x: (rosen(x), rosen_grad(x)), [-1.0, 1.0], jac=True,
    ...                 method=adamkit.scipy_method("adam"), options={"lr": 0.02, "maxiter": 20000, "gtol": 1e-6})
    >>> bool(np.allclose(res.x, res2.x, rtol=0, atol=1e-12))
    True
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, OptimizeResult

from .numpy import OPTIMIZERS as _CLASSES

__all__ = ["minimize", "scipy_method", "METHODS"]

_BY_METHOD = {name.lower(): cls for name, cls in _CLASSES.items()}
METHODS = tuple(_BY_METHOD)
"""Method names accepted by :func:`minimize` (lower-case torch.optim class names)."""

_STOP = ("maxiter", "gtol", "ftol", "disp")


def minimize(fun: Callable[..., Any], x0: Sequence[float] | np.ndarray, args: tuple = (), method: str = "adam",
             jac: Callable[..., np.ndarray] | bool | None = None, bounds: Bounds | Sequence[tuple] | None = None,
             callback: Callable[..., Any] | None = None, options: Mapping[str, Any] | None = None,
             tol: float | None = None) -> OptimizeResult:
    """Minimize ``fun(x, *args)`` from ``x0`` with an adamkit optimizer, returning a SciPy ``OptimizeResult``.

    Args:
        fun: the objective; with ``jac=True`` it returns ``(f, gradient)``. It gets a copy of the iterate.
        args: extra arguments of ``fun`` and ``jac`` (one that is not a tuple is one argument, as in SciPy).
        x0: the starting point (converted to a float64 array; not modified).
        method: one of :data:`METHODS` (``"adam"``, ``"adamw"``, ``"nadam"``, ``"sgd"``, ...).
        jac: the gradient function (returning x's shape), ``True`` (``fun`` returns it), or ``None`` for forward
            differences (SciPy ``approx_fprime``'s step; backward where the forward point would leave the bounds).
        bounds: ``scipy.optimize.Bounds`` or ``(low, high)`` pairs; each iterate is projected onto them.
        callback: ``callback(xk)``, or ``callback(intermediate_result)`` when that is its only parameter (SciPy's
            rule); raising ``StopIteration`` ends the run.
        options: stopping rules ``maxiter`` (1000), ``gtol`` (1e-6, sup-norm of the projected gradient: a
            component pushing against an active bound counts as 0), ``ftol`` (0: off; stop when
            ``|f_k − f_{k−1}| ≤ ftol·max(|f_k|, |f_{k−1}|, 1)``) and the optimizer's hyperparameters (``lr``,
            ``betas``, ``eps``, ``weight_decay``, ...).
        tol: ``gtol`` when ``options`` gives none (SciPy's ``tol``).

    Returns:
        ``OptimizeResult`` with ``x, fun, jac, nit, nfev, njev, success, status, message``.
        ``status`` is 0 for gtol, 1 for maxiter, 2 for ftol and 3 for a callback's ``StopIteration``.
    """
    name = _method_name(method)
    options = dict(options or {})
    if tol is not None:
        options.setdefault("gtol", tol)
    args = args if isinstance(args, tuple) else (args,)
    unknown_stop = {k for k in options if k not in _STOP and k not in _hyper_names(name)}
    if unknown_stop:
        raise ValueError(f"unknown option(s) for {method}: {', '.join(sorted(unknown_stop))}")
    maxiter, gtol, ftol = _stopping(options)
    options.pop("disp", None)
    if not (jac is None or isinstance(jac, bool) or callable(jac) or jac == "2-point"):
        raise ValueError(f"jac must be a callable, True (fun returns (f, gradient)), or None, False or '2-point' "
                         f"(finite differences), not {jac!r}")

    x = np.array(x0, dtype=np.float64, copy=True).reshape(-1) if np.ndim(x0) else np.array([x0], dtype=np.float64)
    shape = np.shape(x0)
    if not np.isfinite(x).all():
        raise ValueError("x0 must be finite: it holds inf or nan")
    low, high = _bounds(bounds, x.size)
    np.clip(x, low, high, out=x)
    counts = {"nfev": 0, "njev": 0}
    evaluate = _objective(fun, jac, args, shape, (low, high), counts)
    optimizer = _BY_METHOD[name]([x], **options)
    wants_result = callback is not None and set(inspect.signature(callback).parameters) == {"intermediate_result"}
    f, g = evaluate(x)
    nit, status, f_prev = 0, 1, None
    while True:
        status = _stop(f, g, _projected(g, x, low, high), f_prev, nit, maxiter, gtol, ftol)
        if status is not None:
            break
        optimizer.step([g])
        np.clip(x, low, high, out=x)
        nit += 1
        f_prev = f
        f, g = evaluate(x)
        if callback is not None and not _call_back(callback, wants_result, x.reshape(shape).copy(), f):
            status = 3
            break
    return OptimizeResult(x=x.reshape(shape), fun=f, jac=g.reshape(shape), nit=nit, nfev=counts["nfev"],
                          njev=counts["njev"], success=status in (0, 2), status=status, message=_MESSAGES[status])


_MESSAGES = {0: "Optimization terminated: gradient below gtol.",
             1: "Maximum number of iterations reached.",
             2: "Optimization terminated: relative change of f below ftol.",
             3: "Stopped by the callback.",
             4: "Stopped: the objective or its gradient is not finite."}
"""``OptimizeResult.message`` by ``status``."""


def _call_back(callback: Callable[..., Any], wants_result: bool, x: np.ndarray, f: float) -> bool:
    """Call ``callback`` with the iterate (or an ``intermediate_result``); False if it raised ``StopIteration``."""
    try:
        if wants_result:
            callback(intermediate_result=OptimizeResult(x=x, fun=f))
        else:
            callback(x)
    except StopIteration:
        return False
    return True


def scipy_method(name: str) -> Callable[..., OptimizeResult]:
    """A custom ``method`` for ``scipy.optimize.minimize`` running the adamkit optimizer ``name``.

    ``scipy.optimize.minimize(fun, x0, jac=True, method=adamkit.scipy_method("adam"), options={...})`` gives the
    same result as :func:`minimize` with the same arguments.
    """
    _method_name(name)

    def method(fun: Callable, x0: np.ndarray, args: tuple = (), jac: Any = None, bounds: Any = None,
               callback: Callable | None = None, **options: Any) -> OptimizeResult:
        for ignored in ("hess", "hessp", "constraints"):
            value = options.pop(ignored, None)
            if value and ignored == "constraints":
                raise ValueError("adamkit methods do not support constraints (bounds are supported)")
        tol = options.pop("tol", None)  # SciPy passes its tol= to custom methods as an option
        return minimize(fun, x0, args=args, method=name, jac=jac, bounds=bounds, callback=callback,
                        options=options, tol=tol)

    method.__name__ = f"adamkit_{name.lower()}"
    return method


def _objective(fun: Callable, jac: Any, args: tuple, shape: tuple, bounds: tuple[np.ndarray, np.ndarray],
               counts: dict) -> Callable:
    """``evaluate(z)`` → (f, flat gradient) at the flat point ``z``, counting evaluations in ``counts``; ``fun``
    and ``jac`` get a copy of the point in x0's shape."""

    def evaluate(z: np.ndarray) -> tuple[float, np.ndarray]:
        point = lambda y: y.reshape(shape).copy()  # noqa: E731
        if jac is True:
            f, g = fun(point(z), *args)
            counts["njev"] += 1
        elif callable(jac):
            f, g = fun(point(z), *args), jac(point(z), *args)
            counts["njev"] += 1
        else:
            f = _scalar(fun(point(z), *args))
            g = _differences(lambda y: _scalar(fun(point(y), *args)), z, f, *bounds)
            counts["nfev"] += z.size
        counts["nfev"] += 1
        return _scalar(f), _flat_gradient(g, shape)

    return evaluate


_STEP = float(np.sqrt(np.finfo(np.float64).eps))
"""The finite-difference step: ``scipy.optimize.approx_fprime``'s default."""


def _differences(f: Callable[[np.ndarray], float], z: np.ndarray, f0: float, low: np.ndarray,
                 high: np.ndarray) -> np.ndarray:
    """Forward differences of ``f`` at ``z`` (``f0 = f(z)``), as ``approx_fprime`` computes them, but backward
    where the forward point would leave the box, and 0 for a variable whose box is narrower than the step (SciPy's
    public ``approx_fprime`` takes neither bounds nor ``f0``)."""
    g = np.zeros_like(z)
    for i in range(z.size):
        h = _STEP if z[i] + _STEP <= high[i] else -_STEP if z[i] - _STEP >= low[i] else 0.0
        if h:
            y = z.copy()
            y[i] += h
            g[i] = (f(y) - f0) / (y[i] - z[i])
    return g


def _flat_gradient(g: Any, shape: tuple) -> np.ndarray:
    """The gradient as a flat float64 array, if it has x's shape (or, for a vector x, its size)."""
    g = np.asarray(g, dtype=np.float64)
    if g.shape != shape and not (g.ndim <= 1 and len(shape) <= 1 and g.size == int(np.prod(shape))):
        raise ValueError(f"the gradient has shape {g.shape}; x has shape {shape}")
    return g.reshape(-1)


def _projected(g: np.ndarray, x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``g`` with each component that pushes against an active bound set to 0: the first-order optimality measure
    of a bound-constrained problem (L-BFGS-B's)."""
    return np.where(((x <= low) & (g > 0)) | ((x >= high) & (g < 0)), 0.0, g)


def _stop(f: float, g: np.ndarray, projected: np.ndarray, f_prev: float | None, nit: int, maxiter: int,
          gtol: float, ftol: float) -> int | None:
    """The status that ends the run here, or None to go on."""
    if not (np.isfinite(f) and np.all(np.isfinite(g))):
        return 4
    if np.max(np.abs(projected), initial=0.0) <= gtol:
        return 0
    if f_prev is not None and ftol > 0 and abs(f - f_prev) <= ftol * max(abs(f), abs(f_prev), 1.0):
        return 2
    if nit >= maxiter:
        return 1
    return None


def _method_name(method: Any) -> str:
    name = method.lower() if isinstance(method, str) else None
    if name not in _BY_METHOD:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return name


def _stopping(options: dict[str, Any]) -> tuple[int, float, float]:
    """``maxiter``, ``gtol`` and ``ftol`` popped from ``options`` and checked."""
    maxiter = options.pop("maxiter", 1000)
    integral = isinstance(maxiter, (int, np.integer)) or (isinstance(maxiter, (float, np.floating))
                                                          and float(maxiter).is_integer())
    if isinstance(maxiter, bool) or not integral or maxiter < 0:
        raise ValueError(f"maxiter must be a whole number >= 0, got {maxiter!r}")
    tolerances = []
    for key, default in (("gtol", 1e-6), ("ftol", 0.0)):
        value = options.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value) or value < 0:
            raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        tolerances.append(float(value))
    return int(maxiter), tolerances[0], tolerances[1]


def _scalar(f: Any) -> float:
    """The objective's value as a float: a number or any one-element array (SciPy takes shape (1,) too)."""
    value = np.asarray(f)
    if value.size != 1 or value.dtype.kind not in "biuf":
        raise ValueError(f"fun must return a real scalar (or a one-element array), got "
                         f"{value.dtype} of shape {value.shape}")
    return float(value.reshape(-1)[0])


def _hyper_names(name: str) -> set[str]:
    return {h.name for h in _BY_METHOD[name].rule.hypers} | {"check_finite"}


def _bounds(bounds: Bounds | Sequence[tuple] | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    if bounds is None:
        return np.full(n, -np.inf), np.full(n, np.inf)
    if isinstance(bounds, Bounds):  # each side: a scalar, or one value per variable in any shape
        low, high = (np.asarray(b, dtype=float) for b in (bounds.lb, bounds.ub))
        low, high = (b.reshape(-1) if b.size == n else np.broadcast_to(b, n).astype(float) for b in (low, high))
    else:
        pairs = list(bounds)
        if len(pairs) != n:
            raise ValueError(f"bounds has {len(pairs)} pairs for {n} variables")
        low = np.array([-np.inf if lo is None else lo for lo, _ in pairs], dtype=float)
        high = np.array([np.inf if hi is None else hi for _, hi in pairs], dtype=float)
    if np.isnan(low).any() or np.isnan(high).any():
        raise ValueError("bounds must not hold nan (use None or ±inf for no bound)")
    if np.any(low > high):
        raise ValueError("bounds: some lower bound exceeds its upper bound")
    return low, high
