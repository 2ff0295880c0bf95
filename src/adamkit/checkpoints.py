"""Checkpoints, for both engines: validating a torch-layout state dict, and exporting one in torch.optim's format.

A state dict has torch.optim's layout, ``{"state": {id: {"step": ..., "exp_avg": array, ...}}, "param_groups":
[{...hyperparameters, "params": [ids]}]}``, with adamkit's storage keys next to the states: ``"<state>.absmax"``
(8-bit codes and one scale per block of 256). bfloat16 states are bfloat16 tensors, or from the NumPy engine their
bits in a uint16 array (older NumPy checkpoints also mark them ``"<state>.bf16": True``). Arrays are NumPy arrays or
torch tensors alike.

* :func:`check_state_dict` checks everything a load needs before anything changes, raising ``ValueError`` that
  names the problem (torch.optim's own words first where torch.optim raises too), and returns each group's
  hyperparameters as the load must set them.
* :func:`full_precision` drops the storage keys, giving every state in full precision (torch.optim's format).
* :func:`variance_form` converts a centered RMSprop state between torch's ``square_avg`` (v) and the variance
  v − ḡ² that bf16 and 8-bit storage keep instead (:attr:`adamkit.rules.Rule.stored_variance`).
* :func:`check_options` validates the engine options of a constructor, a new group or a loaded group.

Engine options (``fused``, ``state_precision``, ``capturable``, ``differentiable``, ``foreach``) say how an
optimizer runs, not what it computes: a loaded group keeps the optimizer's own, after the saved ones are
validated like the constructor's.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import rules as _rules
from . import states as _states
from . import storage as _storage

__all__ = ["ENGINE_KEYS", "check_flag", "check_options", "check_state_dict", "class_defaults", "full_precision",
           "low_precision_states", "variance_form"]

ENGINE_KEYS = ("foreach", "capturable", "differentiable", "fused", "state_precision")
"""torch.optim group keys that are not part of the math."""

_STORAGE_SUFFIXES = (".absmax", ".bf16")


def check_flag(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is True or False (a None from a config lookup is not False)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Invalid {name}: {value!r} (must be True or False)")


def check_options(options: Mapping[str, Any]) -> None:
    """Validate the engine options present in ``options`` (a group or constructor keywords)."""
    for name in ("capturable", "differentiable"):
        if name in options:
            check_flag(name, options[name])
    if options.get("differentiable") and options.get("fused"):
        raise RuntimeError("`fused` does not support `differentiable`")
    for name in ("fused", "foreach"):
        if options.get(name) is not None and not isinstance(options[name], (bool, np.bool_)):
            raise ValueError(f"Invalid {name}: {options[name]!r} (must be None, True or False)")
    if "state_precision" in options:
        _states.validate_precision(options["state_precision"])


def class_defaults(rule: _rules.Rule) -> dict[str, Any]:
    """The class's own defaults (torch.optim's signature), which fill a loaded group's missing keys."""
    return rule.hyperparameters()


def fill_defaults(rule: _rules.Rule, defaults: Mapping[str, Any], groups: Sequence[dict[str, Any]]) -> None:
    """Give loaded groups the keys they lack, as torch.optim's ``__setstate__`` does (the optimizer's defaults,
    then the class's own), and the rule's fixed values (AdamW's decoupled decay)."""
    for group in groups:
        for k, v in {**defaults, **class_defaults(rule)}.items():
            group.setdefault(k, v)
        group.update(rule.defaults_override)


def group_hyperparameters(rule: _rules.Rule, saved: Mapping[str, Any], precision: str | None) -> dict[str, Any]:
    """The hyperparameters a loaded group gets: class defaults for missing keys (as torch.optim's
    ``__setstate__``), the saved values, then the rule's fixed values (AdamW's decoupled decay), validated for
    states stored in ``precision``."""
    defaults = class_defaults(rule)
    h = {**defaults, **{k: v for k, v in saved.items() if k in defaults}, **rule.defaults_override}
    rule.validate(h, precision)
    return h


def check_rounding_stream(group: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless the group's stochastic-rounding stream, if any, is [key, draws]: two integers
    in [0, 2^64)."""
    stream = group.get(_storage.ROUNDING)
    if stream is None:
        return
    if not (isinstance(stream, (list, tuple)) and len(stream) == 2
            and all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and 0 <= x < 2 ** 64
                    for x in stream)):
        raise ValueError(f"'{_storage.ROUNDING}' must be [key, draws], two integers in [0, 2^64); got {stream!r}")


def check_state_dict(state_dict: Any, rule: _rules.Rule, groups: Sequence[Sequence[Any]],
                     precisions: Sequence[str | None], is_array: Callable[[Any], bool]) -> list[dict[str, Any]]:
    """Check ``state_dict`` against an optimizer running ``rule`` on the parameter groups ``groups``, whose states
    are stored in ``precisions`` (one per group); ``is_array`` says which values the engine takes as state arrays.

    Returns each group's hyperparameters (see :func:`group_hyperparameters`). Raises ``ValueError`` naming the
    first problem; nothing is changed either way.
    """
    saved_groups, states = _structure(state_dict)
    if len(saved_groups) != len(groups):
        raise ValueError(f"loaded state dict has a different number of parameter groups: the state dict has "
                         f"{len(saved_groups)} parameter groups, the optimizer has {len(groups)}")
    out, index, seen = [], 0, set()
    for gi, (saved, params) in enumerate(zip(saved_groups, groups)):
        if len(saved["params"]) != len(params):
            raise ValueError(f"loaded state dict contains a parameter group that doesn't match the size of "
                             f"optimizer's group: group {gi} has {len(saved['params'])} parameters in the state "
                             f"dict, {len(params)} in the optimizer")
        try:
            check_options(saved)
            check_rounding_stream(saved)
            h = group_hyperparameters(rule, saved, precisions[gi])
        except (ValueError, TypeError, IndexError) as e:
            raise ValueError(f"group {gi} of the state dict: {e}") from None
        for saved_id, p in zip(saved["params"], params):
            if saved_id in seen:
                raise ValueError(f"parameter id {saved_id!r} appears twice in the state dict's groups")
            seen.add(saved_id)
            where = f"parameter {index} (group {gi})"
            _check_entry(where, states.get(saved_id, {}), rule, h, p, precisions[gi], is_array, saved)
            index += 1
        out.append(h)
    stray = [i for i in states if i not in seen]
    if stray:  # torch.optim would keep them under their ids, and its next state_dict give them to other params
        raise ValueError(f"the state dict has states for parameter ids {sorted(map(str, stray))} that no group "
                         f"lists")
    return out


def _structure(state_dict: Any) -> tuple[list[Mapping[str, Any]], Mapping[Any, Any]]:
    """The groups and states of a state dict whose structure is torch.optim's, or a ``ValueError``."""
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state dict must be a mapping with 'state' and 'param_groups' entries")
    groups, states = state_dict["param_groups"], state_dict["state"]
    if not isinstance(states, Mapping):
        raise ValueError(f"the state dict's 'state' must be a mapping from parameter ids to states, "
                         f"not {type(states).__name__}")
    if not isinstance(groups, (list, tuple)):
        raise ValueError(f"the state dict's 'param_groups' must be a list of groups, not {type(groups).__name__}")
    for gi, g in enumerate(groups):
        if not isinstance(g, Mapping) or not isinstance(g.get("params"), (list, tuple)):
            raise ValueError(f"group {gi} of the state dict must be a mapping with a 'params' list of parameter ids")
        for i in g["params"]:
            if isinstance(i, (bool, float)) or not isinstance(i, (int, np.integer, str)):
                raise ValueError(f"group {gi} of the state dict has a parameter id {i!r}: ids are integers")
    return list(groups), states


def _check_entry(where: str, entry: Any, rule: _rules.Rule, h: Mapping[str, Any], p: Any,
                 precision: str | None, is_array: Callable[[Any], bool], saved: Mapping[str, Any]) -> None:
    """Check one parameter's saved state (of the saved group ``saved``) against the parameter ``p`` it will
    belong to."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"state of {where} must be a mapping of state names to values, not {type(entry).__name__}")
    if not entry:
        return
    needed = set() if rule.states_on_first_step_only else set(rule.states(h)) | set(rule.scalar_states)  # SGD: made at step 1
    missing = needed - set(entry)
    if missing:
        raise ValueError(f"state of {where} is missing {sorted(missing)}")
    arrays = set(rule.update_states)
    known = arrays | set(rule.scalar_states) | {k + s for k in arrays for s in _STORAGE_SUFFIXES}
    unknown = [k for k in entry if k not in known]
    if unknown:
        raise ValueError(f"state of {where} has unknown keys {sorted(map(str, unknown))} for {rule.name}")
    for k, v in entry.items():
        if k in arrays:
            _check_array(where, k, entry, p, precision, is_array)
        elif k in rule.scalar_states:
            check_scalar(where, k, v)
        else:
            base = k.rsplit(".", 1)[0]
            if base not in entry:
                raise ValueError(f"state of {where} has '{k}' without the state '{base}' it belongs to")
            if k.endswith(".bf16") and v is not True:
                raise ValueError(f"state '{k}' of {where} must be True (it marks bfloat16 bits), not {v!r}")
    _check_variance(where, entry, rule, h, p, precision, saved)


def _check_variance(where: str, entry: Mapping[str, Any], rule: _rules.Rule, h: Mapping[str, Any], p: Any,
                    precision: str | None, saved: Mapping[str, Any]) -> None:
    """A centered RMSprop state in torch's form (v) that will be stored in bf16 or 8 bits is kept as its variance
    v − ḡ² (:func:`variance_form`), which is ≥ 0 for any real state: v below ḡ² by more than bfloat16 rounding
    (2^-7 of v + ḡ²) is not one, and would be lost by the conversion, so it is refused."""
    if rule.stored_variance is None or not h.get("centered"):
        return
    v, a = rule.stored_variance
    if v not in entry or a not in entry or v in low_precision_states(entry, saved) \
            or _storage.format_for(precision, int(np.prod(p.shape)), _dtype_name(p)) == "plain":
        return
    square, mean = _numpy(entry[v]).astype(np.float64), _numpy(entry[a]).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        below = square - mean * mean < -2.0 ** -7 * (np.abs(square) + mean * mean)
    if below.any():
        raise ValueError(f"state '{v}' of {where} is below '{a}'² at {int(below.sum())} element(s): not a centered "
                         f"RMSprop state (a mean of squares is at least the square of the mean), and its variance "
                         f"could not be stored in {precision} states")


def _dtype_name(v: Any) -> str:
    return str(getattr(v, "dtype", type(v).__name__)).replace("torch.", "")


def as_numpy(v: Any) -> np.ndarray:
    """A NumPy copy of an array or tensor, as the checks read it (see :func:`_numpy`)."""
    return _numpy(v)


def _numpy(v: Any) -> np.ndarray:
    """A NumPy copy of an array or tensor (bfloat16 widened to float32, exactly); of a DTensor, this rank's shard
    (each rank checks its own)."""
    v = getattr(v, "_local_tensor", v)
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        v = v.to_dense() if v.layout != _torch_strided() else v  # torch's SGD keeps sparse gradients' buffers sparse
        return (v.float() if _dtype_name(v) == "bfloat16" else v).numpy()
    return np.asarray(v)


def _check_array(where: str, k: str, entry: Mapping[str, Any], p: Any, precision: str | None,
                 is_array: Callable[[Any], bool]) -> None:
    """A state array: an array of the parameter's shape, well-formed codes, and values its storage can hold."""
    v = entry[k]
    if not is_array(v):
        raise ValueError(f"state '{k}' of {where} must be an array like its parameter (this engine's kind), "
                         f"not {type(v).__module__}.{type(v).__name__}")
    if tuple(v.shape) != tuple(p.shape):
        raise ValueError(f"state '{k}' of {where} has shape {tuple(v.shape)}, the parameter has shape "
                         f"{tuple(p.shape)}")
    if f"{k}.absmax" in entry:
        try:
            _states.check_codes(k, v, entry[f"{k}.absmax"], int(np.prod(p.shape)))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return
    if f"{k}.bf16" in entry or _dtype_name(v) == "uint16":
        if _dtype_name(v) != "uint16":
            raise ValueError(f"state '{k}' of {where} is marked bfloat16 bits and must be uint16, not {_dtype_name(v)}")
        values = _storage.NUMPY.bf16_value(_numpy(v), np.float32)
    else:
        complex_param = "complex" in _dtype_name(p)
        if "float" not in _dtype_name(v) and "complex" not in _dtype_name(v):
            raise ValueError(f"state '{k}' of {where} has dtype {_dtype_name(v)} and no '{k}.absmax': integer "
                             f"codes cannot be read without their scales")
        if ("complex" in _dtype_name(v)) != complex_param:
            raise ValueError(f"state '{k}' of {where} has dtype {_dtype_name(v)}, the parameter {_dtype_name(p)}: "
                             f"a complex parameter needs complex states and a real one real states")
        values = _numpy(v)
    check_values(where, k, values, precision, int(np.prod(p.shape)))


def check_values(where: str, k: str, values: np.ndarray, precision: str | None, numel: int) -> None:
    """Values state ``k`` can hold: not negative for a non-negative state; finite where it is stored in 8 bits
    (``precision``, for a tensor of ``numel`` elements). Used on loaded states and on values assigned to a state."""
    if k not in _states.SIGNED_STATES and values.dtype.kind == "f" and (values < 0).any():
        raise ValueError(f"state '{k}' of {where} holds negative values: it is a running maximum or sum of "
                         f"squares or magnitudes, never below 0")
    if _states.is_quantized(precision, numel) and values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError(f"state '{k}' of {where} holds inf or nan, which this optimizer's 8-bit states cannot "
                         f"hold (one would set the scale of its whole block of {_states.BLOCK})")


def check_scalar(where: str, k: str, v: Any) -> None:
    """A scalar state (``step``, ``mu_product``): a finite real number, as a number or a one-element tensor (checked
    on load and, by the torch engine, before each step that finds one edited)."""
    numel = getattr(v, "numel", None)
    if callable(numel):
        ok = numel() == 1 and ("float" in _dtype_name(v) or "int" in _dtype_name(v))
    else:
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    value = float(_numpy(v).reshape(-1)[0]) if ok and callable(numel) else (float(v) if ok else math.nan)
    low, high = (0.0, 1.0) if k == "mu_product" else (0.0, math.inf)
    if not (ok and low <= value <= high and math.isfinite(value)):
        rule = "in [0, 1]" if k == "mu_product" else ">= 0"
        raise ValueError(f"state '{k}' of {where} must be a finite real number {rule} (a number or a one-element "
                         f"tensor), got {v!r}")


def full_precision(state_dict: Mapping[str, Any], rule: _rules.Rule, drop_engine_keys: bool = False,
                   low: Callable[[Any, Mapping[str, Any]], set[str]] | None = None) -> dict:
    """A copy of a (checked) ``state_dict`` with every state in full precision and no storage keys: 8-bit codes
    dequantized and bfloat16 widened to float32; tensors detached (a state never carries autograd history).

    ``drop_engine_keys`` gives torch.optim's format: it also drops the keys torch.optim's class of that name does
    not have, and a centered RMSprop's ``square_avg`` stored as its variance is given as torch's v (``low(id,
    entry)``: the states of that entry stored in bf16 or 8 bits; default :func:`low_precision_states`). Without
    it, states keep the form they are stored in (for a load, which converts with :func:`variance_form`)."""
    out = {"state": {}, "param_groups": [dict(g) for g in state_dict["param_groups"]]}
    if drop_engine_keys:
        for g in out["param_groups"]:
            g.pop("state_precision", None)
            g.pop(_storage.ROUNDING, None)
            if not rule.torch_fused:
                g.pop("fused", None)  # torch.optim has no fused path for this class
    for i, entry in state_dict["state"].items():
        out["state"][i] = {k: v for k, v in ((k, _full_value(entry, k, rule)) for k in entry)
                           if not str(k).endswith(_STORAGE_SUFFIXES)}
    if drop_engine_keys:
        low = low or (lambda i, entry: low_precision_states(entry))
        for g in state_dict["param_groups"]:
            for i in g["params"]:
                if i in out["state"]:
                    out["state"][i] = variance_form(rule, g, out["state"][i], low(i, state_dict["state"][i]), set())
    return out


def saved_low_precision(group: Mapping[str, Any]) -> bool:
    """Whether a saved group comes from an optimizer that keeps bf16 or 8-bit states (its bfloat16 states are then
    in adamkit's form; torch.optim's are bfloat16 only for bfloat16 parameters, in its own)."""
    return group.get("state_precision") in ("bf16", "int8")


def low_precision_states(entry: Mapping[str, Any], group: Mapping[str, Any] | None = None) -> set[str]:
    """The states of a saved entry stored in bf16 or 8 bits: with ``.absmax`` or ``.bf16`` keys, uint16 bfloat16
    bits (the NumPy engine's), or bfloat16 tensors saved by an optimizer with ``state_precision`` "bf16" or "int8"
    (its ``group``, if given). torch.optim saves bfloat16 states for bfloat16 parameters, in its own form (for a
    bfloat16 parameter, whose states are bfloat16 in torch.optim too, the engine says)."""
    adamkit_low = group is None or saved_low_precision(group)
    return {k for k, v in entry.items() if isinstance(k, str) and not k.endswith(_STORAGE_SUFFIXES)
            and (f"{k}.absmax" in entry or entry.get(f"{k}.bf16") is True or _dtype_name(v) == "uint16"
                 or (adamkit_low and _dtype_name(v) == "bfloat16"))}


def variance_form(rule: _rules.Rule, h: Mapping[str, Any], entry: Mapping[str, Any], stored: set[str],
                  wanted: set[str]) -> Mapping[str, Any]:
    """A full-precision ``entry`` whose states ``stored`` are in low-precision form, converted to the form the
    states ``wanted`` take: under ``centered``, RMSprop's ``square_avg`` is torch's v in full precision and the
    variance c = v − ḡ² in bf16 or 8 bits (:func:`adamkit.rules.rmsprop`). v = c + ḡ²; c = max(v − ḡ², 0) (from
    torch's v, where rounding can leave v − ḡ² slightly negative: a variance is not). A copy if converted."""
    if rule.stored_variance is None or not h.get("centered"):
        return entry
    v, a = rule.stored_variance
    if v not in entry or a not in entry or (v in stored) == (v in wanted):
        return entry
    x, avg = entry[v], entry[a]
    if v in stored:
        return {**entry, v: x + avg * avg}
    c = _rules.variance(x, avg)
    return {**entry, v: c.clamp_min(0) if hasattr(c, "clamp_min") else np.maximum(c, 0)}


def _full_value(entry: Mapping[str, Any], k: str, rule: _rules.Rule) -> Any:
    v = entry[k]
    if hasattr(v, "detach"):
        v = v.detach()
    if f"{k}.absmax" in entry:
        dtype = np.float32 if isinstance(v, np.ndarray) else _torch_float32()
        return _states.dequantize(v, entry[f"{k}.absmax"], k in _states.SIGNED_STATES, dtype)
    if _dtype_name(v) == "uint16":  # bfloat16 bits from the NumPy engine
        return _storage.NUMPY.bf16_value(_numpy(v), np.float32)
    if k in rule.update_states and _dtype_name(v) == "bfloat16":
        return v.float()
    return v


def _torch_float32() -> Any:
    import torch
    return torch.float32


def _torch_strided() -> Any:
    import torch
    return torch.strided
