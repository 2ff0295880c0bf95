"""The Adam family on NumPy arrays.

Each class runs the rule of the same name in :mod:`adamkit.rules` on whole arrays, with the hyperparameters,
defaults and state names of ``torch.optim``. Parameters are updated in place.

Example:
    >>> import numpy as np
    >>> import adamkit.numpy as ak
    >>> w = np.zeros(3)
    >>> opt = ak.Adam([w], lr=0.1)
    >>> for _ in range(200):
    ...     opt.step([2 * (w - np.array([1.0, -2.0, 3.0]))])   # gradient of |w - target|^2
    >>> np.round(w, 2).tolist()
    [1.0, -2.0, 3.0]
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import checkpoints as _checkpoints
from . import core as _core
from . import rules as _rules
from . import states as _states
from . import storage as _storage
from ._signature import bind as _bind, rule_signature

__all__ = ["Optimizer", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "RAdam"]

ParamsT = Iterable[np.ndarray] | Iterable[dict[str, Any]]


class _Checkpoints:
    """The checkpoint half of :class:`Optimizer`: torch.optim's ``state_dict`` layout, loaded after
    :func:`adamkit.checkpoints.check_state_dict` and stored in the optimizer's format."""

    rule: _rules.Rule
    param_groups: list[dict[str, Any]]
    state: dict[int, dict[str, Any]]
    state_precision: str | None

    def state_dict(self) -> dict[str, Any]:
        """A deep copy of the state in torch.optim's layout."""
        groups, start = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            stream = {k: list(g[k]) for k in (_storage.ROUNDING,) if k in g}
            groups.append({**copy.deepcopy(self._hyper(g)), **stream, "params": list(range(start, start + n))})
            start += n
        state = {i: {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v for k, v in s.items()}
                 for i, s in self.state.items() if any(k in self.rule.update_states for k in s)}
        # a parameter that has not stepped has no state (torch.optim's layout; a bare step count would not load)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` or from a torch.optim optimizer of the same class.

        Everything is checked first (:func:`adamkit.checkpoints.check_state_dict`: group count and sizes,
        hyperparameters, state keys, shapes, dtypes and values); on a mismatch a ``ValueError`` says what does not
        match and the optimizer is left unchanged. The states are stored in this optimizer's ``state_precision``.
        """
        groups = [g["params"] for g in self.param_groups]
        hypers = _checkpoints.check_state_dict(state_dict, self.rule, groups, [self.state_precision] * len(groups),
                                               _is_array)
        full = _checkpoints.full_precision(state_dict, self.rule)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_groups = {i: g for g in state_dict["param_groups"] for i in g["params"]}
        params = self._params()
        new_state = {}
        for index, (saved_id, p) in enumerate(zip(saved_ids, params)):
            h = hypers[self._group_of(index)]
            low = set(self.rule.update_states) if self._format(p) != "plain" else set()
            saved = state_dict["state"].get(saved_id, {})
            entry = _checkpoints.variance_form(self.rule, h, full["state"].get(saved_id, {}),
                                               _checkpoints.low_precision_states(saved, saved_groups[saved_id]),
                                               low)
            new_state[index] = self._stored(entry, p, h)
        self.param_groups = [{"params": ps, **{k: _to_python(v) for k, v in h.items()}}
                             for ps, h in zip(groups, hypers)]
        stream = state_dict["param_groups"][0].get(_storage.ROUNDING)
        if stream is not None:  # a resumed run rounds as an uninterrupted one
            self.param_groups[0][_storage.ROUNDING] = [int(x) for x in stream]
        self.state = new_state

    def _stored(self, entry: Mapping[str, Any], p: np.ndarray, h: Mapping[str, Any]) -> dict[str, Any]:
        """A checked, full-precision saved state as this optimizer stores it."""
        if not entry:
            return self._initial_state(p, h)
        out: dict[str, Any] = {}
        for k, v in entry.items():
            if k in self.rule.update_states:
                values = np.array(_to_numpy(v), dtype=p.dtype, copy=True)
                _storage.store(_storage.NUMPY, out, k, values, self._format(p))
            else:
                out[k] = float(np.asarray(_to_numpy(v)).reshape(-1)[0])
        return out

    def torch_state_dict(self) -> dict[str, Any]:
        """The state in torch.optim's format (NumPy arrays): full-precision states, no adamkit storage keys."""
        return _checkpoints.full_precision(self.state_dict(), self.rule, drop_engine_keys=True)


class Optimizer(_Checkpoints):
    """Base class: param groups, state, ``step(grads)``, ``state_dict()`` and ``load_state_dict()``.

    State layout is torch.optim's: ``{"state": {index: {"step": float, "exp_avg": ndarray, ...}},
    "param_groups": [{...hyperparameters, "params": [indices]}]}``, with indices counted across groups.
    """

    rule: _rules.Rule
    _signature: inspect.Signature

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        values = _bind(self._signature, self, args, kwargs)
        params = values.pop("params")
        _checkpoints.check_flag("check_finite", values["check_finite"])
        self.check_finite: bool = bool(values.pop("check_finite"))
        self.state_precision = values.pop("state_precision")
        _states.validate_precision(self.state_precision)
        self._step_seed: int | None = None
        self.defaults: dict[str, Any] = self.rule.hyperparameters(**values)
        self._update = _rules.bind(self.rule.update, _rules.NUMPY_OPS)
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[int, dict[str, Any]] = {}
        for group in _param_groups(params):
            self.add_param_group(group)

    # -- groups and state ------------------------------------------------------------------------------------
    def add_param_group(self, group: Mapping[str, Any]) -> None:
        """Add a group of arrays with its own hyperparameters (others default to the constructor's)."""
        params = _checked_params(group["params"], self._params())
        hypers = {k: v for k, v in group.items() if k != "params"}
        if hypers.get("state_precision", self.state_precision) != self.state_precision:
            raise ValueError(f"a parameter group asks for state_precision={hypers['state_precision']!r}: "
                             f"adamkit.numpy sets it per optimizer ({self.state_precision!r}), not per group")
        hypers.pop("state_precision", None)
        h = {**self.defaults, **hypers}
        self.rule.validate(h, self.state_precision)
        first = sum(len(g["params"]) for g in self.param_groups)
        self.param_groups.append({"params": params, **h})
        for i, p in enumerate(params):
            self.state[first + i] = self._initial_state(p, h)

    def _params(self) -> list[np.ndarray]:
        return [p for g in self.param_groups for p in g["params"]]

    def _group_of(self, index: int) -> int:
        for gi, g in enumerate(self.param_groups):
            if index < len(g["params"]):
                return gi
            index -= len(g["params"])
        raise IndexError(index)

    def _format(self, p: np.ndarray) -> str:
        return _storage.format_for(self.state_precision, p.size, str(p.dtype))

    def _initial_state(self, p: np.ndarray, h: Mapping[str, Any]) -> dict[str, Any]:
        state: dict[str, Any] = dict(self.rule.scalar_states)
        # Adagrad creates its sum at construction, as torch.optim does; other states appear at the first step
        if self.rule.states_at_construction:
            for k, v in self.rule.initial_states(h, self.defaults).items():
                _storage.create(_storage.NUMPY, state, k, p, v, self._format(p))
        return state

    def rounding_seed(self) -> int:
        """This step's stochastic-rounding seed (:func:`adamkit.storage.next_seed`: one draw per step, from the
        stream in ``param_groups[0]``)."""
        if self._step_seed is None:
            self._step_seed = _storage.next_seed(self.param_groups[0])
        return self._step_seed

    def _hyper(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in group.items() if k not in ("params", _storage.ROUNDING)}

    # -- the step ------------------------------------------------------------------------------------------
    def step(self, grads: Sequence[np.ndarray | None]) -> None:
        """Update every parameter in place from its gradient (``None`` skips a parameter and its step count).

        ``grads`` follows the order of the parameters across groups. All gradients are checked (shape, dtype,
        finiteness when ``check_finite``) before anything changes.
        """
        params = self._params()
        grads = _checked_gradients(params, grads, self.check_finite)
        for group in self.param_groups:
            self.rule.validate(self._hyper(group), self.state_precision)
        for index, g in enumerate(grads):  # a state that was made and is gone: torch's KeyError, before any step
            if g is not None:
                self._missing_states(index)
        skipped, self._step_seed = 0, None
        for index, (p, g) in enumerate(zip(params, grads)):
            if g is not None:
                skipped += self._step_one(index, p, g, self._hyper(self.param_groups[self._group_of(index)]))
        if skipped:
            _states.warn_skipped_blocks(self.rule.name, skipped)

    def _step_one(self, index: int, p: np.ndarray, g: np.ndarray, h: Mapping[str, Any]) -> int:
        """Step one checked parameter (:func:`adamkit.core.step_parameter`); return how many 8-bit blocks were
        left unchanged (non-finite gradient)."""
        state, fmt = self.state[index], self._format(p)
        missing = self._missing_states(index)
        for k, v in missing.items():  # made first, so that the block guard sees a new 8-bit state too
            _storage.create(_storage.NUMPY, state, k, p, v, fmt)
        formats = [fmt if k in state else None for k in self.rule.update_states]
        noise = _core.rounding_noise(_storage.NUMPY, formats, self.rounding_seed, lambda: index)
        return _core.step_parameter(self.rule, self._update, h, _NumpyArrays(p, g), p, g, state, formats,
                                    bool(missing), self.check_finite, noise)

    def _missing_states(self, index: int) -> dict[str, float]:
        """The array states parameter ``index`` lacks and its step makes (:meth:`adamkit.rules.Rule.states_to_make`)."""
        state = self.state[index]
        h = self._hyper(self.param_groups[self._group_of(index)])
        return self.rule.states_to_make(h, self.defaults, state, bool(state.get("step", 0)))

    def zero_grad(self) -> None:
        """Nothing to clear: gradients are passed to :meth:`step`. Present for symmetry with torch."""

    def __repr__(self) -> str:
        lines = [f"adamkit.numpy.{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines.extend(f"    {k}: {v}" for k, v in sorted(self._hyper(g).items()))
        return "\n".join(lines + [")"])


def _param_groups(params: Any) -> list[dict[str, Any]]:
    """The constructor's ``params`` as a list of groups."""
    if isinstance(params, np.ndarray):
        raise TypeError("params must be a list of arrays or of dicts, not a single array: wrap it in a list")
    groups = list(params)
    if not groups:
        raise ValueError("optimizer got an empty parameter list")
    return groups if isinstance(groups[0], dict) else [{"params": groups}]


def _checked_params(params: Any, existing: list[np.ndarray]) -> list[np.ndarray]:
    """A new group's parameters: writeable floating or complex NumPy arrays, none in another group."""
    params = [params] if isinstance(params, np.ndarray) else list(params)
    for p in params:
        if not isinstance(p, np.ndarray):
            raise TypeError(f"parameters must be NumPy arrays, got {type(p).__name__}")
        if p.dtype.kind not in "fc":
            raise TypeError(f"parameters must have a floating or complex dtype, got {p.dtype}")
        if not p.flags.writeable:
            raise ValueError("parameters are updated in place and must be writeable")
    seen = set(map(id, existing))
    if any(id(p) in seen for p in params):
        raise ValueError("some parameters appear in more than one parameter group")
    return params


def _checked_gradients(params: list[np.ndarray], grads: Sequence[Any], check_finite: bool) -> list[Any]:
    """``grads`` as arrays, after checking each against its parameter (shape, dtype, finiteness when
    ``check_finite``), before anything changes."""
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"step() got {len(grads)} gradients for {len(params)} parameters")
    for index, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        g = grads[index] = np.asarray(g)
        if g.shape != p.shape:
            raise ValueError(f"gradient {index} has shape {g.shape}, parameter has shape {p.shape}")
        if g.dtype != p.dtype:
            raise TypeError(f"gradient {index} has dtype {g.dtype}, parameter has dtype {p.dtype}")
        if check_finite and not np.all(np.isfinite(g)):
            raise FloatingPointError(f"gradient {index} has non-finite values (inf or nan); nothing was updated")
    return grads


class _NumpyArrays:
    """:class:`adamkit.core.Arrays` for a NumPy parameter: a complex one through its real view; states replaced,
    never by the caller's gradient itself (SGD's first momentum buffer is the gradient: a copy, as torch clones)."""

    ops = _storage.NUMPY

    def __init__(self, p: np.ndarray, g: np.ndarray) -> None:
        self.p, self.g, self.complex = p, g, np.iscomplexobj(p)

    def view(self, x: np.ndarray) -> np.ndarray:
        return _real_view(x) if self.complex else x

    def untracked(self, x: np.ndarray) -> np.ndarray:
        return x

    def load(self, state: dict, key: str) -> np.ndarray:
        return _storage.load(self.ops, state, key, self.p.dtype)

    def write_param(self, theta: np.ndarray) -> None:
        self.view(self.p)[...] = theta

    def write_state(self, state: dict, key: str, values: Any, fmt: str, noise: Any) -> None:
        p = self.p
        full = np.array(values, dtype=self.view(p).dtype).view(p.dtype) if self.complex else np.asarray(values, p.dtype)
        full = full.reshape(p.shape)
        if np.may_share_memory(full, self.g) or np.may_share_memory(full, p):
            full = full.copy()
        _storage.store(self.ops, state, key, full, fmt, noise(full) if noise else None)

    def scalar(self, state: dict, key: str) -> float:
        return state[key]

    def write_scalar(self, state: dict, key: str, value: float) -> None:
        state[key] = value


def _real_view(a: np.ndarray) -> np.ndarray:
    """A complex array's real and imaginary parts as a writeable view of shape ``a.shape + (2,)`` (torch's
    ``view_as_real``), for any strides and for 0-d arrays (``a.view(float)`` refuses both)."""
    parts = a.real
    return np.lib.stride_tricks.as_strided(parts, shape=a.shape + (2,), strides=a.strides + (parts.itemsize,),
                                           writeable=a.flags.writeable)


def _is_array(v: Any) -> bool:
    return isinstance(v, np.ndarray) or (hasattr(v, "detach") and hasattr(v, "shape"))


def _to_numpy(v: Any) -> Any:
    if hasattr(v, "detach"):  # a torch tensor (bfloat16, which NumPy lacks, widens exactly to float32)
        v = v.detach().cpu()
        return (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()
    return v


def _to_python(v: Any) -> Any:
    if hasattr(v, "detach") and v.numel() == 1:
        return float(v)
    if isinstance(v, list):
        return tuple(v)
    return v


def _make(rule: _rules.Rule) -> type[Optimizer]:
    extra = [inspect.Parameter("check_finite", inspect.Parameter.KEYWORD_ONLY, default=True),
             inspect.Parameter("state_precision", inspect.Parameter.KEYWORD_ONLY, default=None)]
    cls = type(rule.name, (Optimizer,), {
        "rule": rule,
        "_signature": rule_signature(rule, extra),
        "__doc__": f"{rule.name} on NumPy arrays: the rule :func:`adamkit.rules.{rule.update.__name__}`.\n\n"
                   f"{inspect.cleandoc(rule.update.__doc__ or '')}\n\n"
                   f"Hyperparameters (torch.optim's names and defaults): "
                   + ", ".join(f"``{h.name}={h.default!r}``" for h in rule.hypers)
                   + ". ``check_finite`` (default True) rejects non-finite gradients before any update; with "
                   "``check_finite=False`` and ``state_precision='int8'``, a block of 256 whose gradient is not "
                   "finite is left unchanged (with a ``RuntimeWarning``).",
        "__module__": __name__,
    })
    cls.__signature__ = inspect.Signature(list(cls._signature.parameters.values())[1:])
    return cls


SGD = _make(_rules.RULES["SGD"])
Adagrad = _make(_rules.RULES["Adagrad"])
RMSprop = _make(_rules.RULES["RMSprop"])
Adam = _make(_rules.RULES["Adam"])
AdamW = _make(_rules.RULES["AdamW"])
Adamax = _make(_rules.RULES["Adamax"])
NAdam = _make(_rules.RULES["NAdam"])
RAdam = _make(_rules.RULES["RAdam"])

OPTIMIZERS: dict[str, type[Optimizer]] = {c.__name__: c for c in
                                          (SGD, Adagrad, RMSprop, Adam, AdamW, Adamax, NAdam, RAdam)}
