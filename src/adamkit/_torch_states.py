"""The torch engine's states: :mod:`adamkit.storage` on torch tensors (and DTensor shards), plus the checks and
conversions torch.optim's conventions ask for (scalar states as float tensors, states validated against their
parameter before a step). Used by both the reference path and the compiled path; no numba here.

Two forms of a parameter's state, translated here and nowhere else:

* **kept** (``opt.state[p]``): an 8-bit state is one :class:`~adamkit._quantized.QuantizedState` (on a DTensor
  parameter, a DTensor whose local shard is one), which reads as its values under any torch op;
* **stored** (:func:`storage_form`: :mod:`adamkit.storage`, :mod:`adamkit.core`, the kernels' addresses and
  ``state_dict()``): an 8-bit state is its codes under its key and its block scales under ``"<key>.absmax"``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from . import checkpoints as _checkpoints
from . import rules as _rules
from . import states as _states
from . import storage as _storage
from . import _tensors
from ._quantized import QuantizedState

_DTYPES = {None: None, "bfloat16": torch.bfloat16, "int8": torch.int8, "uint8": torch.uint8}


class TorchOps:
    """:class:`adamkit.storage.ArrayOps` for torch tensors; a DTensor's blocks are those of its local shard."""

    def dtype_name(self, x: torch.Tensor) -> str:
        return str(getattr(x, "dtype", type(x).__name__)).replace("torch.", "")

    def full_like(self, like: torch.Tensor, value: Any, dtype: str | None = None) -> torch.Tensor:
        codes = dtype in ("int8", "uint8")  # codes are read block by block: contiguous, whatever the parameter
        return torch.full_like(like, value, dtype=_DTYPES[dtype],
                               memory_format=torch.contiguous_format if codes else torch.preserve_format)

    def blocks_of(self, like: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full((_states.n_blocks(_tensors.local_numel(like)),), value, dtype=torch.float32,
                          device=like.device)

    def float32_bits(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF

    def from_bf16_bits(self, bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        signed = torch.where(bits < 0x8000, bits, bits - 0x10000)  # the same 16 bits as an int16
        return signed.to(torch.int16).view(torch.bfloat16).reshape(like.shape)

    def bf16_value(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype)

    def index(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.arange(n, dtype=torch.int64, device=like.device)

    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x if x.dtype == dtype else x.to(dtype)


OPS = TorchOps()


def state_format(p: torch.Tensor, precision: str | None) -> str:
    """The format ``p``'s states get (:func:`adamkit.storage.format_for`)."""
    return _storage.format_for(precision, p.numel(), OPS.dtype_name(p))


def stored_format(state: Mapping[str, Any], key: str, p: torch.Tensor) -> str:
    """The format state ``key`` of ``p`` is stored in now (``state`` in either form)."""
    if quantized(state[key]) is not None:
        return "int8"
    return _storage.format_of(state, key, OPS.dtype_name(p), OPS.dtype_name(state[key]))


# -- the two forms of a state entry ----------------------------------------------------------------------------

def quantized(value: Any) -> QuantizedState | None:
    """The 8-bit state ``value`` is (itself, or a DTensor's local shard), or None. A view of part of one is not
    a state: it has no codes of its own."""
    local = value._local_tensor if _tensors.is_dtensor(value) else value
    return local if type(local) is QuantizedState and local.root is None else None


def storage_form(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict of ``entry`` with each 8-bit state as :mod:`adamkit.storage` keeps it: its codes under its key (a
    DTensor's laid out like it) and its block scales under ``"<key>.absmax"`` (the same tensors, not copies)."""
    out = dict(entry)
    for k, v in entry.items():
        q = quantized(v)
        if q is not None:
            out[k] = _tensors.on_local(lambda _, q=q: q.codes, v)
            out[f"{k}.absmax"] = q.absmax
    return out


def _kept(stored: Mapping[str, Any], key: str) -> Any:
    """State ``key`` of a stored-form entry as ``opt.state`` keeps it (codes and scales: one QuantizedState)."""
    scales = stored.get(f"{key}.absmax")
    if scales is None:
        return stored[key]
    return _tensors.on_local(lambda codes: QuantizedState(codes.contiguous(), scales), stored[key])


def write_back(state: dict, stored: Mapping[str, Any], keys: Any) -> None:
    """Put the states ``keys`` of the stored-form ``stored`` (after a step) into the kept ``state``: 8-bit codes
    and scales into the memory of the QuantizedState already there when it has their layout (states update in
    place, as torch.optim's and the kernels' do), anything else assigned if it is a new tensor."""
    for k in keys:
        if k not in stored:
            continue
        if f"{k}.absmax" in stored and _copy_into(state.get(k), stored[k], stored[f"{k}.absmax"]):
            continue
        new = _kept(stored, k)
        if state.get(k) is not new:
            state[k] = new


def _copy_into(old: Any, codes: Any, scales: torch.Tensor) -> bool:
    """Copy ``codes`` and ``scales`` into the 8-bit state ``old`` if it has their layout; whether it did."""
    q = quantized(old)
    if q is None or _tensors.is_dtensor(old) != _tensors.is_dtensor(codes):
        return False
    local = codes._local_tensor if _tensors.is_dtensor(codes) else codes
    if (q.codes.dtype, q.codes.shape, q.absmax.shape) != (local.dtype, local.shape, scales.shape):
        return False
    if local.data_ptr() != q.codes.data_ptr():
        q.codes.copy_(local)
    if scales is not q.absmax:
        q.absmax.copy_(scales)
    return True


def kept_form(entry: dict) -> None:
    """Bring ``entry`` to the kept form in place: 8-bit states stored as codes beside a ``"<key>.absmax"`` entry
    (an optimizer pickled by an earlier adamkit, or set so by hand) become QuantizedStates; stray scales go."""
    for k in [k for k in entry if isinstance(k, str) and k.endswith(".absmax")]:
        base, scales = k[:-len(".absmax")], entry.pop(k)
        if base in entry and quantized(entry[base]) is None:
            if OPS.dtype_name(entry[base]) in ("int8", "uint8"):
                entry[base] = _kept({base: entry[base], k: scales}, base)


def scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for a new step counter: the default dtype if float64, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def canonical_scalars(rule: _rules.Rule, state: dict, create: bool = False) -> None:
    """Scalar states (``step``, ``mu_product``) as the float tensors torch.optim keeps (a number from an old
    checkpoint, or a tensor of another dtype or shape, is converted; ``create``: missing ones are made)."""
    for k, v in rule.scalar_states.items():
        if k not in state and not create:
            continue
        value = state.get(k, v)
        if not (type(value) is torch.Tensor and value.dtype in (torch.float32, torch.float64)
                and value.numel() == 1 and value.is_cpu and value.is_contiguous()):
            value = float(value.item() if torch.is_tensor(value) else value)
            state[k] = torch.tensor(value, dtype=scalar_dtype())


def missing_states(rule: _rules.Rule, states: dict, p: torch.Tensor, h: Mapping[str, Any],
                   defaults: Mapping[str, Any]) -> dict[str, float]:
    """The array states ``p`` lacks and a step makes (:meth:`adamkit.rules.Rule.states_to_make`: torch's
    ``KeyError`` for one that was made and is gone)."""
    have = states.get(p, {})
    return rule.states_to_make(h, defaults, have, "step" in have and float(have["step"]) != 0)


def init_state(rule: _rules.Rule, states: dict, p: torch.Tensor, h: Mapping[str, Any],
               precision: str | None, defaults: Mapping[str, Any]) -> bool:
    """Create the states ``h`` needs that ``p`` lacks, in their format (initial values:
    :meth:`adamkit.rules.Rule.initial_states` under the optimizer's ``defaults``), bring scalar states to torch's
    form and 8-bit states to the kept form (a full-precision tensor assigned to a state kept in 8 bits is
    quantized); return whether array states were new. Call :func:`validate_state` first."""
    fmt = state_format(p, precision)
    if p in states:
        _keep_format(rule, states[p], p, fmt)
    missing = missing_states(rule, states, p, h, defaults)
    if not missing and not rule.scalar_states:
        return False  # nothing to keep (SGD without momentum): no empty entry, as torch.optim
    state = states[p]
    canonical_scalars(rule, state, create=True)
    for k, v in missing.items():
        made: dict = {}
        _storage.create(OPS, made, k, p, v, fmt)
        state[k] = _kept(made, k)
    return bool(missing)


def _keep_format(rule: _rules.Rule, state: dict, p: torch.Tensor, fmt: str) -> None:
    """``state`` in the kept form, and each tensor of values assigned to a state of ``p`` kept in 8 bits
    (``opt.state[p]["exp_avg"] = torch.zeros_like(p)``) quantized into one."""
    kept_form(state)
    if fmt != "int8":
        return
    check_assigned(rule, state, p, fmt)
    for k in rule.update_states:
        if k in state and stored_format(state, k, p) != "int8":
            stored: dict = {}
            store_state(p, stored, k, state[k].detach(), "int8")
            state[k] = _kept(stored, k)


def check_assigned(rule: _rules.Rule, state: Mapping[str, Any] | None, p: torch.Tensor, fmt: str) -> None:
    """Values assigned to a state kept in 8 bits (``fmt``), checked as loaded ones are before they are quantized:
    finite, and not negative for a non-negative state (quantized, they would silently become 0)."""
    if fmt != "int8" or not state:
        return
    for k in rule.update_states:
        if k in state and torch.is_tensor(state[k]) and stored_format(state, k, p) != "int8":
            values = state[k].detach()
            _checkpoints.check_values(f"a parameter of shape {tuple(p.shape)}", k, _checkpoints.as_numpy(values),
                                      "int8", values.numel())


def validate_state(rule: _rules.Rule, state: Mapping[str, Any] | None, where: str, p: torch.Tensor) -> None:
    """Raise a clear error, before anything changes, if ``p``'s existing state cannot be stepped: a state tensor
    replaced by one of another dtype, size, device or kind (or the parameter converted after the state was made,
    e.g. by ``model.double()``), 8-bit codes without their scales or with scales of another shape, or a scalar
    state (``step``) that is not a finite number >= 0."""
    if not state:
        return
    for k in rule.scalar_states:
        if k in state:
            _checkpoints.check_scalar(where, k, state[k])
    local = _tensors.local_view(p)
    if local is None:
        return  # a fake or functional tensor: torch ops check it
    stored = storage_form(state)
    for s in rule.update_states:
        if s in stored:
            fmt = stored_format(stored, s, p)
            if isinstance(stored[s], QuantizedState):
                raise RuntimeError(f"{where}: state '{s}' is a view of part of an 8-bit state, which has no codes "
                                   f"of its own; assign the state itself, or its values (.dequantize())")
            if fmt == "plain" and OPS.dtype_name(stored[s]) in ("int8", "uint8"):
                raise RuntimeError(f"{where}: state '{s}' holds {OPS.dtype_name(stored[s])} codes without their "
                                   f"block scales; assign its values (a floating tensor, stored in 8 bits at the "
                                   f"step) or an adamkit QuantizedState")
            codes = _tensors.check_state_tensor(s, where, stored[s], local, fmt, s in _states.SIGNED_STATES)
            if fmt == "int8":
                _check_scales(where, s, codes, stored[f"{s}.absmax"], local)


def _check_scales(where: str, s: str, codes: torch.Tensor, scales: Any, local: torch.Tensor) -> None:
    """8-bit codes are read block by block from flat memory: contiguous, one float32 scale per block."""
    blocks = _states.n_blocks(local.numel())
    if not codes.is_contiguous():
        raise RuntimeError(f"{where}: the codes of state '{s}' must be contiguous")
    if not (type(scales) is torch.Tensor and scales.dtype == torch.float32 and scales.shape == (blocks,)
            and scales.is_contiguous() and scales.device == local.device and _tensors.has_memory(scales)):
        raise RuntimeError(f"{where}: state '{s}.absmax' must be a contiguous float32 tensor of shape ({blocks},) "
                           f"on {local.device}, with its memory")
    if not bool(((scales >= 0) & (scales < float("inf"))).all()):  # nan fails both
        raise ValueError(f"{where}: state '{s}.absmax' holds a block scale that is not a finite number >= 0 "
                         f"(edited in place?); no parameter or state was changed")


def store_state(p: torch.Tensor, state: dict, key: str, values: torch.Tensor, fmt: str,
                noise: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Store full-precision ``values`` of ``p``'s state ``key`` in format ``fmt`` into the stored-form ``state``
    (a DTensor's shard by shard; ``noise(local)``: the 16 random bits per element of stochastic rounding, else
    round to nearest even)."""
    if fmt == "plain":
        state.pop(f"{key}.absmax", None)
        state[key] = values.to(p.dtype)
        return
    scales = []

    def stored(local: torch.Tensor) -> torch.Tensor:
        out: dict = {}
        _storage.store(OPS, out, key, local.detach(), fmt, noise(local) if noise else None)
        scales.extend(v for k, v in out.items() if k != key)
        return out[key].contiguous()
    state[key] = _tensors.on_local(stored, values)
    state.pop(f"{key}.absmax", None)
    if scales:
        state[f"{key}.absmax"] = scales[0]


def load_state(p: torch.Tensor, state: Mapping[str, Any], key: str) -> torch.Tensor:
    """State ``key`` of ``p`` (``state`` in the stored form) in the parameter's dtype, whatever its format; 8-bit
    states of a 16-bit parameter in float32, as the kernels read them (float16 would flush a small second moment
    to 0)."""
    dtype = torch.float32 if f"{key}.absmax" in state and p.dtype in (torch.float16, torch.bfloat16) else p.dtype
    return _tensors.on_local(lambda local: _storage.load(OPS, {**state, key: local}, key, dtype), state[key])


def low_precision_states(rule: _rules.Rule, entry: Mapping[str, Any], p: torch.Tensor,
                         saved_group: Mapping[str, Any] | None = None) -> set[str]:
    """The states of ``entry`` (``p``'s, or saved for it by an optimizer with ``saved_group``) stored in bf16 or 8
    bits: a bfloat16 state of a float32 parameter is in adamkit's form only if saved with ``state_precision``
    "bf16" or "int8" (torch.optim saves the bfloat16 states of bfloat16 parameters, later made float32, in its)."""
    adamkit_low = saved_group is None or _checkpoints.saved_low_precision(saved_group)
    return {k for k in rule.update_states if k in entry and torch.is_tensor(entry[k])
            and stored_format(entry, k, p) != "plain" and (adamkit_low or f"{k}.absmax" in entry)}


def restore_storage(rule: _rules.Rule, state: dict | None, p: torch.Tensor, entry: Mapping[str, Any],
                    group: Mapping[str, Any], saved_group: Mapping[str, Any]) -> None:
    """Store ``p``'s loaded states (``entry``, saved in ``saved_group``) as this optimizer keeps them (8-bit codes
    already in its format are kept bit for bit; others are rounded to nearest; a centered RMSprop's variance
    converted if it was stored in another form)."""
    if not state:
        return
    canonical_scalars(rule, state)
    fmt = state_format(p, group.get("state_precision"))
    low = {k for k in rule.update_states if k in state} if fmt != "plain" else set()
    saved_low = low_precision_states(rule, entry, p, saved_group)
    state.update(_checkpoints.variance_form(rule, group, state, saved_low, low))
    for k in rule.update_states:
        if k not in state:
            continue
        stored: dict = {}
        if f"{k}.absmax" in entry and fmt == "int8":
            stored = {k: entry[k].detach().clone().contiguous(),
                      f"{k}.absmax": entry[f"{k}.absmax"].detach().clone().to(torch.float32)}
        else:  # stored as this optimizer keeps it, dense (torch's SGD keeps a sparse gradient's buffer sparse) and
            # laid out like its parameter
            value = state[k].to_dense() if state[k].layout != torch.strided else state[k]
            store_state(p, stored, k, value.contiguous() if p.is_contiguous() else value, fmt)
        state[k] = _kept(stored, k)


def distributable(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A kept state entry as ``state_dict()`` gives it: in the stored form (8-bit codes beside their scales), with
    the 8-bit states of a DTensor parameter dequantized into float32 DTensors (scales are per rank and would not
    survive resharding; the codes come back bit for bit when loaded at the same sharding)."""
    entry = storage_form(entry)
    for k in [k for k in entry if f"{k}.absmax" in entry and _tensors.is_dtensor(entry[k])]:
        absmax = entry.pop(f"{k}.absmax")
        entry[k] = _tensors.on_local(lambda codes: _states.dequantize(codes, absmax, k in _states.SIGNED_STATES,
                                                                       torch.float32), entry[k])
    return entry
