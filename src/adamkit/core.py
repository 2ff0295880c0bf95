"""The step of one parameter on whole arrays, for every engine: load → run the rule → store.

The NumPy engine and the torch reference path differ only in how they reach their arrays: a complex parameter
through its real view, states in place or replaced, step counts as numbers or tensors. Each says so in a small
:class:`Arrays` adapter; :func:`step_parameter` is the one sequence both run (the compiled path runs the same rule
in generated kernels, :mod:`adamkit.kernels`):

1. keep the 8-bit blocks whose gradient is not finite (:class:`adamkit.states.BlockGuard`);
2. load every state in full precision (:func:`adamkit.storage.load`);
3. run the rule (:func:`adamkit.rules.step_tensor`);
4. write the parameter, and store each new state in its format, rounding stochastically with the random bits
   every path shares (:func:`rounding_noise`);
5. write the scalar states, and put the guarded blocks back.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import numpy as np

from . import rules as _rules
from . import states as _states
from . import storage as _storage


class Arrays(Protocol):
    """How an engine reads and writes one parameter's arrays."""

    ops: _storage.ArrayOps

    def view(self, x: Any) -> Any:
        """The array the rule computes on (a complex array's real view, a copy inside autograd, ...)."""

    def untracked(self, x: Any) -> Any:
        """``x`` outside autograd (what the block guard copies and restores)."""

    def load(self, state: dict, key: str) -> Any:
        """State ``key`` in full precision, in the parameter's dtype."""

    def write_param(self, theta: Any) -> None:
        """Write the new parameter (in its :meth:`view`)."""

    def write_state(self, state: dict, key: str, values: Any, fmt: str, noise: Callable[[Any], Any] | None) -> None:
        """Store the new values of state ``key`` (in its :meth:`view`) in format ``fmt``."""

    def scalar(self, state: dict, key: str) -> float:
        """Scalar state ``key`` as a number."""

    def write_scalar(self, state: dict, key: str, value: float) -> None:
        """Write scalar state ``key``."""


def step_parameter(rule: _rules.Rule, update: Callable, h: Mapping[str, Any], arrays: Arrays, param: Any,
                   grad: Any, state: dict, formats: list[str | None], fresh: bool, check_finite: bool,
                   noise: Callable[[int], Callable | None], scalar_dtype: Any = np.float32) -> int:
    """Step ``param`` (its states made, in ``formats``, one per rule state, None if absent) with ``grad``; return
    how many 8-bit blocks were left unchanged because their gradient was not finite. ``noise(j)``: the random bits
    of state ``j`` (see :func:`rounding_noise`)."""
    guard = _states.BlockGuard.take(arrays.untracked(param), grad, state, rule.update_states, check_finite)
    loaded = {k: arrays.view(arrays.load(state, k)) for k in rule.update_states if k in state}
    loaded.update({k: arrays.scalar(state, k) for k in rule.scalar_states})
    low = {k for k, fmt in zip(rule.update_states, formats) if fmt in ("bf16", "int8")}
    theta, new_arrays, scalars = _rules.step_tensor(rule, h, arrays.view(param), arrays.view(grad), loaded, update,
                                                   fresh, scalar_dtype, low)
    arrays.write_param(theta)
    for k, v in new_arrays.items():
        j = rule.update_states.index(k)
        arrays.write_state(state, k, v, formats[j], noise(j))
    for k, v in scalars.items():
        arrays.write_scalar(state, k, v)
    return guard.restore() if guard else 0


def rounding_noise(ops: _storage.ArrayOps, formats: list[str | None], seed: Callable[[], int],
                   tensor: Callable[[], int]) -> Callable[[int], Callable | None]:
    """For each rule state ``j``: None if it is not rounded stochastically, else a function giving the 16 random
    bits per element of an array of that state (:mod:`adamkit.storage`: the same bits on every path). ``seed()``
    and ``tensor()`` (the parameter's position) are called only if some state rounds."""
    rounded = _storage.rounded_values(formats)
    if not rounded:
        return lambda j: None
    key = _storage.stream_keys(seed(), [tensor()])[0]

    def of(j: int) -> Callable | None:
        if j + 1 not in rounded:
            return None
        return lambda like: _storage.noise(ops, key, rounded.index(j + 1), like)
    return of
