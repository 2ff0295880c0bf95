"""What the compiled path may touch, decided in one place (no numba here: the reference path uses it too).

* :class:`TrackedState`: ``opt.state`` as a ``defaultdict`` whose every mutation, and its entries', is counted,
  so a plan knows when a state tensor may have been replaced or removed.
* :func:`local_view`: the tensor whose memory a kernel may read for a parameter, gradient or state — the tensor
  itself if it is a plain strided tensor with real storage, a DTensor's local shard — or None.
* :func:`check_state_tensor`: a state tensor is what a kernel stepping its parameter reads (dtype, size, device,
  layout), or a clear error.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import numpy as np
import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)
try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - a torch without dynamo: every check is done in full
    _TensorGuards = None


# -- the state mapping: every mutation counted ---------------------------------------------------------------------

class _Counter:
    """A shared mutation count (one object for a state mapping and all its entries)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


def _counting(cls: type) -> type:
    """Make every mutating method of the dict subclass ``cls`` bump ``self._counter`` first."""
    def wrap(name: str) -> Callable:
        base = getattr(dict, name)

        def method(self, *args, **kwargs):
            self._counter.value += 1
            return base(self, *args, **kwargs)
        method.__name__ = name
        return method

    for name in ("__setitem__", "__delitem__", "clear", "pop", "popitem", "setdefault", "update", "__ior__"):
        setattr(cls, name, wrap(name))
    return cls


@_counting
class TrackedEntry(dict):
    """One parameter's state (``opt.state[p]``): a dict whose mutations are counted."""

    def __init__(self, counter: _Counter | None = None, *args: Any, **kwargs: Any) -> None:
        self._counter = counter if counter is not None else _Counter()
        dict.__init__(self, *args, **kwargs)

    def __reduce__(self):
        return TrackedEntry, (self._counter,), None, None, iter(self.items())


@_counting
class TrackedState(collections.defaultdict):
    """``opt.state``: a ``defaultdict`` of :class:`TrackedEntry` whose mutations, and its entries', are counted, so
    the compiled path knows when a state tensor may have been replaced or removed."""

    def __init__(self, default_factory: Any = None, *args: Any, **kwargs: Any) -> None:
        self._counter = _Counter()
        collections.defaultdict.__init__(self, None, *args, **kwargs)

    def __missing__(self, key: Any) -> TrackedEntry:
        entry = self[key] = TrackedEntry(self._counter)
        return entry

    @property
    def generation(self) -> int:
        """How many mutations this mapping and its entries have seen."""
        return self._counter.value

    @classmethod
    def of(cls, state: Any) -> "TrackedState":
        """``state`` as a TrackedState (itself if it already is one)."""
        if type(state) is cls:
            return state
        tracked = cls()
        for key, entry in dict(state).items():  # other values (a hook's notes) are kept as they are
            tracked[key] = TrackedEntry(tracked._counter, entry) if isinstance(entry, dict) else entry
        return tracked

    def __reduce__(self):
        return TrackedState.of, (dict(self),)


def tracked(opt: Any) -> TrackedState:
    """``opt.state`` as a :class:`TrackedState` (converted in place if code replaced it with a plain mapping)."""
    if type(opt.state) is not TrackedState:
        opt.state = TrackedState.of(opt.state)
    return opt.state


def track_entries(state: TrackedState) -> None:
    """Make every per-parameter entry a :class:`TrackedEntry` (plain dicts come in through ``opt.state[p] = {...}``
    or ``update``, each of which is itself a counted mutation, so a plan being rebuilt is the place to do this)."""
    for key, entry in list(dict.items(state)):
        if type(entry) is dict:
            state[key] = TrackedEntry(state._counter, entry)


# -- what a kernel may touch -----------------------------------------------------------------------------------

def is_dtensor(t: Any) -> bool:
    cls = type(t)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def on_local(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to ``t``, or to a DTensor's local shard and wrapped back with the same mesh and placements
    (element-wise storage work — rounding, quantizing — is local to each shard)."""
    if not is_dtensor(t):
        return fn(t)
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(fn(t._local_tensor), t.device_mesh, t.placements, run_check=False, shape=t.shape,
                              stride=t.stride())


def local_numel(t: torch.Tensor) -> int:
    """Elements of ``t`` on this rank (a DTensor's local shard)."""
    return t._local_tensor.numel() if is_dtensor(t) else t.numel()


def local_view(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor whose memory a kernel may read for ``t``: ``t`` itself if it is a plain strided tensor with real
    storage, a DTensor's local shard if that is one; None for anything else (fake, functional, meta, sparse, other
    subclasses), which the reference path handles with torch ops."""
    if type(t) in _PLAIN:
        return t if t.layout == torch.strided and not t.is_meta else None
    if is_dtensor(t):
        return local_view(t._local_tensor)
    return None


def fixed_storage(t: torch.Tensor) -> torch.UntypedStorage:
    """``t``'s storage, made one that cannot be resized, for memory a kernel writes by address at every step: code
    that frees it (``untyped_storage().resize_(0)``) gets torch's error instead of leaving the kernel a dangling
    address. A resizable storage's bytes move, in place (``set_``: the same tensor object, shape, strides and
    values), into memory NumPy owns, which torch never resizes. A tensor that spans its whole storage moves with
    its base (a DTensor's alias of its shard); a part of a larger storage moves alone, into memory of its size."""
    storage = t.untyped_storage()
    if not storage.resizable():
        return storage
    whole = t.storage_offset() == 0 and t.is_contiguous() and t.numel() * t.element_size() == storage.nbytes()
    fixed = torch.from_numpy(np.empty(storage.nbytes() if whole else t.numel() * t.element_size(), np.uint8))
    with torch.no_grad():
        if whole:
            fixed.untyped_storage().copy_(storage)
            for x in {id(t._base): t._base, id(t): t}.values() if t._base is not None else (t,):
                x.set_(fixed.untyped_storage(), x.storage_offset(), x.shape, x.stride())
        else:
            values = fixed.view(t.dtype).view(t.shape)
            values.copy_(t)
            t.set_(values.untyped_storage(), 0, t.shape, values.stride())
    return t.untyped_storage()


class MetadataGuard:
    """A one-call check that a list of tensors still has the type, dispatch keys, dtype, device, sizes, strides
    and ``requires_grad`` each had when the guard was made: dynamo's C++ tensor guard (the check by which
    torch.compile decides whether compiled code may run again), so that nothing about a tensor but its address
    can change unseen. It reads no addresses. ``matches`` is False on any difference, a tensor more or less, or
    a torch without the guard: the caller then validates in full and makes a new guard."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.count, self._guard = len(tensors), None
        if _TensorGuards is not None and tensors:
            self._guard = _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                                        dynamic_dims_strides=[list(t.stride()) for t in tensors])

    def matches(self, tensors: list[torch.Tensor]) -> bool:
        try:
            return self._guard is not None and len(tensors) == self.count and bool(self._guard.check(*tensors))
        except (TypeError, RuntimeError, ValueError):
            return False


def check_state_tensor(name: str, where: str, value: Any, p_local: torch.Tensor, kind: str,
                       signed: bool = False) -> torch.Tensor:
    """The local tensor of state ``name`` after checking it is what a kernel stepping ``p_local`` reads; raise
    ``RuntimeError`` naming the mismatch otherwise (a state replaced, or a parameter whose dtype, size or device
    changed after the state was made)."""
    local = local_view(value) if torch.is_tensor(value) else None
    if local is None:
        raise RuntimeError(f"{where}: state '{name}' is {type(value).__name__}, not a tensor the step can update")
    expected = {"int8": torch.int8 if signed else torch.uint8, "bf16": torch.bfloat16}.get(kind, p_local.dtype)
    if local.dtype != expected:
        raise RuntimeError(f"{where}: expected dtype {expected} for state '{name}' but got dtype {local.dtype} "
                           f"(the parameter is {p_local.dtype}; was it converted, e.g. by model.double(), after "
                           f"the optimizer made its state?)")
    # a contiguous parameter goes to the kernels, which read its states as contiguous memory too
    if (local.shape != p_local.shape or local.device != p_local.device
            or (p_local.is_contiguous() and not local.is_contiguous())):
        raise RuntimeError(f"{where}: state '{name}' has shape {tuple(local.shape)} on {local.device} "
                           f"(contiguous: {local.is_contiguous()}), the parameter {tuple(p_local.shape)} on "
                           f"{p_local.device}; they must match (was the parameter's .data replaced after the "
                           f"optimizer made its state?)")
    if not has_memory(local):
        raise RuntimeError(f"{where}: state '{name}' has no memory for its elements (its storage was freed or "
                           f"resized)")
    return local


def has_memory(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage holds every element ``t`` addresses (a storage resized to 0 bytes, or freed, leaves
    the tensor its shape and strides)."""
    if t.numel() == 0:
        return True
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr() != 0 and t.untyped_storage().nbytes() >= (last + 1) * t.element_size()


def nonfinite_gradients(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters whose gradient (this rank's shard of it) holds inf or nan."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t._local_tensor if is_dtensor(t) else t
    return [p for p in params if not bool(torch.isfinite(local(p.grad)).all())]


def refuse_nonfinite(name: str, bad: list[torch.Tensor], dtensor: Any = None) -> None:
    """Raise ``FloatingPointError`` if ``bad`` is not empty on any rank of ``dtensor``'s mesh (one small all-reduce
    per mesh dimension, so every rank takes the same decision; this rank's decision alone without a DTensor)."""
    flag = bool(bad)
    if dtensor is not None:
        import torch.distributed as dist
        t = torch.tensor([int(flag)], dtype=torch.int32)
        for dim in range(dtensor.device_mesh.ndim):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dtensor.device_mesh.get_group(dim))
        flag = bool(t.item())
    if flag:
        where = f"a parameter of shape {tuple(bad[0].shape)}" if bad else "a parameter's shard on another rank"
        raise FloatingPointError(f"{name}: the gradient of {where} has non-finite values (inf or nan); no parameter "
                                 f"or state was changed")
