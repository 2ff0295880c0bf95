"""An 8-bit state that reads as its values: a tensor subclass over the codes and block scales of
:mod:`adamkit.states`.

``QuantizedState(codes, absmax)`` reports the dequantized tensor (float32, the codes' shape); every torch op on
it sees the values ``dequantize(codes, absmax)``, so a logger's ``state.norm()``, an EMA tool's ``state.clone()``,
``torch.equal``, printing and pickling read true numbers. Writes (``copy_``, ``fill_``, ``mul_``, ``x[i] = v``,
writes through a view) compute on the values and requantize into the same codes and scales, in place, so a kernel
that holds their addresses keeps stepping the same memory. The kernels read :attr:`codes` and :attr:`absmax`
directly.

* View ops (slicing, ``select``, ``t``, ``unbind`` and so iteration, ...) give views that read their part of the
  values and write back through their root; a reshape of the whole tensor shares the codes (blocks follow the
  flat order).
* ``clone()`` and ``copy.deepcopy`` copy the codes and scales (a quantized copy); any other op returns plain
  tensors. Pickling (``torch.save``, torch.distributed.checkpoint) writes the values as a plain float32 tensor.
* ``out=`` arguments that are quantized states are refused with a clear error; ``numpy()`` gives the values
  read-only (a copy).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_leaves, tree_map

from . import states as _states

_aten = torch.ops.aten
_SAME_CODES = {_aten.detach.default, _aten.alias.default, _aten.view.default, _aten._unsafe_view.default}
"""Ops that give the whole tensor, in the flat order, under a new shape: the result shares the codes."""


def _write_target(func: Any) -> bool:
    """Whether ``func`` writes its first argument in place (``add_``, ``copy_``, ``index_put_``, ...)."""
    args = func._schema.arguments
    return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write


def _views(func: Any) -> str | None:
    """Whether ``func`` returns a view of its first argument (``"one"``: ``slice``, ``select``, ``t``, ``expand``,
    ...) or a list of views of it (``"list"``: ``unbind``, ``split``, ``chunk``, and so iteration), else None."""
    returns = func._schema.returns
    if len(returns) != 1 or returns[0].alias_info is None or _write_target(func):
        return None
    return "list" if isinstance(returns[0].type, torch._C.ListType) else "one"


class QuantizedState(torch.Tensor):
    """An 8-bit block-wise state (codes + one float32 absmax per 256 elements) that reads as float32 values.

    A root holds ``codes`` (int8 for signed states, uint8 for unsigned ones) and ``absmax``; a view holds its
    root and the view op that gives its part of the root's values."""

    codes_: torch.Tensor | None
    absmax_: torch.Tensor | None
    __torch_function__ = torch._C._disabled_torch_function_impl  # every op reaches __torch_dispatch__
    repointed = 0
    """How many times the codes or scales of any QuantizedState were replaced after it was made (``q.codes_ =
    ...``): a kernel planned over the old ones must plan again."""

    @staticmethod
    def __new__(cls, codes: torch.Tensor | None, absmax: torch.Tensor | None, *,
                root: "QuantizedState | None" = None, view: Callable | None = None):
        like = torch.empty(codes.shape, device="meta") if root is None else view(torch.empty(root.shape, device="meta"))
        device = codes.device if root is None else root.device
        return torch.Tensor._make_wrapper_subclass(cls, like.shape, strides=like.stride(), dtype=torch.float32,
                                                   device=device, requires_grad=False)

    def __init__(self, codes: torch.Tensor | None, absmax: torch.Tensor | None, *,
                 root: "QuantizedState | None" = None, view: Callable | None = None) -> None:
        if root is None:
            _check_format(codes, absmax)
        self.codes_, self.absmax_, self.root, self.view_of_root = codes, absmax, root, view
        self.code_dtype = codes.dtype if root is None else root.code_dtype  # int8: a signed state

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("codes_", "absmax_") and name in self.__dict__:
            QuantizedState.repointed += 1
        super().__setattr__(name, value)

    # -- what the kernels read -------------------------------------------------------------------------------------
    @property
    def codes(self) -> torch.Tensor:
        """The 8-bit codes (a plain tensor, the values' shape): what a kernel reads and writes."""
        if self.codes_ is None:
            raise RuntimeError("a view of a quantized state has no codes of its own; use the state itself")
        return self.codes_

    @property
    def absmax(self) -> torch.Tensor:
        """One float32 scale per block of 256 elements of the flat codes."""
        if self.absmax_ is None:
            raise RuntimeError("a view of a quantized state has no block scales of its own; use the state itself")
        return self.absmax_

    @property
    def signed(self) -> bool:
        return self.code_dtype == torch.int8

    @classmethod
    def from_values(cls, values: torch.Tensor, signed: bool) -> "QuantizedState":
        """Quantize ``values`` (the format of :func:`adamkit.states.quantize`)."""
        codes, absmax = _states.quantize(values.detach(), signed)
        return cls(codes.contiguous(), absmax)

    def dequantize(self) -> torch.Tensor:
        """The values as a plain float32 tensor (a new tensor)."""
        if self.root is not None:
            return self.view_of_root(self.root.dequantize())
        self._check_inner()
        return _states.dequantize(self.codes_, self.absmax_, self.signed, torch.float32)

    def _check_inner(self) -> None:
        """Raise a clear error if code replaced the codes or scales (``q.codes_ = ...``, ``q.codes.data = ...``)
        by tensors this state cannot read as its values."""
        if self.codes_.dtype != self.code_dtype or self.codes_.shape != self.shape:
            raise RuntimeError(f"the codes of this quantized state were replaced by a {self.codes_.dtype} tensor of "
                               f"shape {tuple(self.codes_.shape)}; it reads {self.code_dtype} codes of shape "
                               f"{tuple(self.shape)}")
        _check_format(self.codes_, self.absmax_)

    def numpy(self, *, force: bool = False) -> Any:
        """The values as a read-only NumPy array: a copy (a plain tensor's ``numpy()`` shares its memory; writes
        to this one could not reach the codes, so NumPy refuses them). ``np.asarray(state)`` gives the same."""
        values = self.dequantize().detach().cpu().numpy()
        values.flags.writeable = False
        return values

    def tolist(self) -> Any:
        """The values as (nested) Python floats."""
        return self.dequantize().tolist()

    # -- torch's protocols -----------------------------------------------------------------------------------------
    def __tensor_flatten__(self):
        if self.root is not None:
            raise RuntimeError("a view of a quantized state cannot be flattened; use the state itself")
        return ["codes_", "absmax_"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: Any, outer_size: Any, outer_stride: Any) -> "QuantizedState":
        return QuantizedState(inner["codes_"], inner["absmax_"])

    def _stable_hash_for_caching(self) -> str:
        """What a graph compiled over this state depends on (torch.compile's cache key): shape and code layout,
        not values."""
        root = self if self.root is None else self.root
        return (f"QuantizedState(shape={tuple(self.shape)}, stride={tuple(self.stride())}, "
                f"codes={root.codes_.dtype}{tuple(root.codes_.shape)}, blocks={tuple(root.absmax_.shape)})")

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        kind = "int8" if self.signed else "uint8"
        return f"QuantizedState({self.dequantize()!r}, codes={kind}, blocks of {_states.BLOCK})"

    def __reduce_ex__(self, protocol: int):
        """Pickled as its values, a plain float32 tensor: ``torch.load(weights_only=True)`` reads it (as does
        torch.distributed.checkpoint, which loads that way), and it requantizes bit for bit when copied into a
        quantized state."""
        return self.dequantize().__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict) -> Any:
        if self.root is not None:
            return self.dequantize()
        return QuantizedState(copy.deepcopy(self.codes_, memo), copy.deepcopy(self.absmax_, memo))

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _dispatch(func, args, kwargs or {})


def _dispatch(func: Any, args: tuple, kwargs: dict) -> Any:
    """A torch op on quantized states: writes requantize into the root's codes, views write back through the
    root, a reshape or clone of a whole state stays quantized, and every other op computes on the values."""
    if any(isinstance(v, QuantizedState) for v in tree_leaves(kwargs.get("out"))):
        raise RuntimeError(f"{func}: a quantized state cannot be an out= argument; assign to it instead "
                           f"(state.copy_(result))")
    first = args[0] if args else None
    if isinstance(first, QuantizedState):
        if _write_target(func):
            return _write(first, func, args[1:], kwargs)
        if func in _SAME_CODES and first.root is None:
            shape = args[1] if len(args) > 1 else first.shape
            return QuantizedState(first.codes_.view(shape), first.absmax_)
        if func is _aten.clone.default and first.root is None:
            return QuantizedState(first.codes_.clone(), first.absmax_.clone())
        views = _views(func)
        if views == "one":
            return _view(first, lambda t: func(t, *args[1:], **kwargs))
        if views == "list":
            n = len(func(torch.empty(first.shape, device="meta"), *args[1:], **kwargs))
            return [_view(first, lambda t, i=i: func(t, *args[1:], **kwargs)[i]) for i in range(n)]
    return func(*_plain(args), **_plain(kwargs))


def _view(state: QuantizedState, view: Callable) -> QuantizedState:
    """The view ``view`` (a function of ``state``'s values) of ``state``, which writes back through its root."""
    root = state if state.root is None else state.root
    inner = state.view_of_root
    return QuantizedState(None, None, root=root, view=lambda t: view(inner(t) if inner else t))


def _write(state: QuantizedState, func: Any, rest: tuple, kwargs: dict) -> QuantizedState:
    """An in-place op on ``state``: computed on the root's values (through ``state``'s view, if one), then
    requantized into the root's codes and scales in place."""
    root = state if state.root is None else state.root
    values = root.dequantize()
    target = state.view_of_root(values) if state.root is not None else values
    func(target, *_plain(rest), **_plain(kwargs))
    if not bool(torch.isfinite(values).all()) or (not root.signed and bool((values < 0).any())):
        what = "inf or nan" if root.signed else "inf, nan or negative values"
        raise RuntimeError(f"{func}: an 8-bit state cannot hold {what} (one would set the scale of its whole block "
                           f"of {_states.BLOCK}); it is unchanged")
    codes, absmax = _states.quantize(values, root.signed)
    root.codes_.copy_(codes)
    root.absmax_.copy_(absmax)
    return state


def _plain(tree: Any) -> Any:
    """``tree`` with every quantized state replaced by its values."""
    return tree_map(lambda x: x.dequantize() if isinstance(x, QuantizedState) else x, tree)


def _check_format(codes: Any, absmax: Any) -> None:
    """codes: a contiguous int8/uint8 tensor; absmax: a contiguous float32 tensor, one scale per block, on the same
    device (the kernels read both as flat memory). Their kind (plain, DTensor shard, or a fake while torch.compile
    traces) is for the kernels' own validation (``_tensors.local_view``) to decide."""
    def plain(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and not isinstance(t, QuantizedState)
    if not (plain(codes) and codes.dtype in (torch.int8, torch.uint8) and codes.is_contiguous()):
        raise TypeError(f"codes must be a contiguous int8 or uint8 tensor, not {type(codes).__name__} "
                        f"{getattr(codes, 'dtype', '')}")
    blocks = _states.n_blocks(codes.numel())
    if not (plain(absmax) and absmax.dtype == torch.float32 and absmax.shape == (blocks,)
            and absmax.is_contiguous() and absmax.device == codes.device):
        raise TypeError(f"absmax must be a contiguous float32 tensor of shape ({blocks},) on {codes.device}, not "
                        f"{type(absmax).__name__} {getattr(absmax, 'dtype', '')} {tuple(getattr(absmax, 'shape', ()))}")
