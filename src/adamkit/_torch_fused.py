"""The compiled path of :mod:`adamkit.torch`: batches of CPU tensors stepped by :mod:`adamkit.kernels`.

The kernels reach tensors through raw addresses, so this module is where memory safety is decided. The rule:
**a kernel never touches an address that was not validated for this call.**

* When a plan is built, every tensor a kernel will touch — parameter, gradient, each state, the step counters —
  is checked against what the kernel reads: its kind (a plain strided tensor with real storage, or a DTensor's
  local shard; never a fake, meta or other subclass), dtype, device, number of elements and layout. Anything
  else goes to the reference path, or gets a clear error before anything changes.
* On every step, the parts that can change between steps without the plan noticing are checked again, in C-level
  passes over the tensors: each gradient's address, dtype, layout and size; each parameter's (and each DTensor's
  local shard's) address and size; each 8-bit state's codes and scales, which code can replace or re-point
  without touching ``opt.state`` (:class:`_Quantized`: a replacement is counted, their addresses are compared);
  and the state mapping itself, which is a :class:`TrackedState` whose every mutation (``opt.state[p][k] = ...``,
  ``opt.state.clear()``, a new ``opt.state``) is counted. The plan keeps a reference to every storage it
  validated, so memory it checked cannot be freed and reused under it by dropping the tensor; the storages a
  kernel writes without re-reading their addresses (states, step counters) cannot be resized either
  (:func:`adamkit._tensors.fixed_storage`), so ``untyped_storage().resize_(0)`` on one is torch's error, not a
  dangling address.
* Step counts are read from the ``step`` tensors themselves on every step (an in-place ``fill_(0)`` restarts
  warm-up, as with torch.optim) and written back to them.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

from . import checkpoints as _checkpoints
from . import kernels
from . import rules as _rules
from . import storage as _storage
from . import _torch_step
from ._quantized import QuantizedState
from ._torch_states import quantized, storage_form, stored_format
from ._torch_step import Stepper
from ._tensors import (MetadataGuard, TrackedState, fixed_storage, is_dtensor, local_view,
                       nonfinite_gradients, refuse_nonfinite, track_entries, tracked)

FORMAT_OF = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
             torch.float16: "float16"}  # 16-bit formats: float32 math, as torch's CPU fused kernels
SCALAR_FORMAT_OF = {torch.float32: "float32", torch.float64: "float64"}
# unbound methods, mapped over lists of tensors (C-level iteration: the per-step passes over 1,000s of tensors)
_data_ptr, _numel, _is_contiguous = torch.Tensor.data_ptr, torch.Tensor.numel, torch.Tensor.is_contiguous
_dtype = operator.attrgetter("dtype")
_local = operator.attrgetter("_local_tensor")
_codes, _scales = operator.attrgetter("codes_"), operator.attrgetter("absmax_")
_NO_KEYS = np.zeros((1, 0), dtype=np.uint32)  # a batch that rounds nothing stochastically


class _Batch:
    """Tensors of one group with the same storage format and states: one kernel call per step."""

    def __init__(self, fmt: str, params: list[torch.Tensor], locals_: list[torch.Tensor],
                 positions: list[int] | None, group_size: int):
        self.fmt, self.params, self.locals = fmt, params, locals_
        self.dtensor = any(map(is_dtensor, params))
        # where each param sits among its group's params with gradients (None: all of them, in order)
        self.positions = None if positions is None or positions == list(range(group_size)) else positions
        self.size_list = list(map(_numel, locals_))
        self.sizes = np.array(self.size_list, dtype=np.int64)
        self.table = kernels.chunk_table(self.sizes)
        self.param_ptrs = list(map(_data_ptr, locals_))
        self.keep = [t.untyped_storage() for t in locals_]  # validated memory stays allocated while planned
        self.dtype = locals_[0].dtype if locals_ else None  # every parameter's (and gradient's) dtype
        self.present: tuple[bool, ...] = ()
        self.kinds: tuple[str, ...] = ()
        self.states: list[list[torch.Tensor]] = []  # the state tensors a kernel touches, column by column
        self.quantized: list[_Quantized] = []  # the 8-bit states among them, one per state name
        self.addresses: np.ndarray | None = None
        self.scalar_tensors: list[list[torch.Tensor]] = []
        self.scalar_ptrs: list[np.ndarray] = []
        self.state_tensors: list[torch.Tensor] = []  # every state and scalar-state tensor, and its validated address
        self.state_ptrs: list[int] = []
        self.guard = MetadataGuard([])  # the parameters' and state tensors' metadata as validated (shapes...)
        self.scale_columns: list[int] = []  # the address columns of 8-bit block scales, and their state names
        self.scale_names: list[str] = []
        self.scalar_formats: list[str] = []
        self.fresh = False
        self.kernel: Any = None
        self.ids = np.zeros(0, dtype=np.int64)  # each tensor's position among the optimizer's parameters
        self.rounds = False  # whether some value rounds stochastically (one 32-bit hash per element serves all)
        self.grad_guard = MetadataGuard([])  # the last gradients validated in full (matches nothing yet)

    def unchanged(self) -> bool:
        """Whether every parameter (or DTensor shard) still has the address and size validated when the plan was
        made (and, for 16-bit parameters, the dtype), and every 8-bit state the QuantizedState, codes and scales
        (:class:`_Quantized`)."""
        locals_ = self.locals
        if self.dtensor and not all(map(operator.is_, map(_local, self.params), locals_)):
            return False  # a DTensor whose local shard was replaced
        if self.fmt in kernels.HALF_FORMATS and list(map(_dtype, locals_)).count(self.dtype) != len(locals_):
            return False  # float16 memory viewed as bfloat16 in place (or back): same address and size
        # No size needs a check of its own: the plan holds every storage it validated (``keep``), so an unchanged
        # address is the same live allocation, as large as when validated (each gradient's size is checked).
        # Replacing a state tensor is a counted mutation of opt.state; one re-pointed in place (``.data =``,
        # ``set_()``) keeps its object but not its address: the kernels must then step the new memory, so the
        # addresses of the state tensors are compared too (the old memory, held by the plan, is never freed
        # under a kernel either way).
        return (list(map(_data_ptr, locals_)) == self.param_ptrs and all(q.unchanged() for q in self.quantized)
                and list(map(_data_ptr, self.state_tensors)) == self.state_ptrs
                and self.guard.matches(locals_ + self.state_tensors))  # resize_ keeps the address, not the shape


class _Quantized:
    """One 8-bit state of every tensor of a batch: the QuantizedStates ``opt.state`` holds (or DTensors of them),
    and the codes and scales the plan validated in each. Code can re-point those without touching ``opt.state``;
    a kernel then must not step the old memory while the state reads the new. Replacing the tensors themselves
    (``q.codes_ = ...``) is counted by :attr:`QuantizedState.repointed` (see :meth:`_Plan.fits`); here, per step:
    a DTensor's local shard replaced, and the codes' and scales' memory re-pointed or freed (``.data =``,
    ``set_()``, ``untyped_storage().resize_(0)``): their addresses, in one C-level pass."""

    def __init__(self, holders: list[Any]) -> None:
        self.holders = holders
        self.dtensor = any(map(is_dtensor, holders))
        self.wrappers: list[QuantizedState] = list(map(quantized, holders))
        self.tensors = list(map(_codes, self.wrappers)) + list(map(_scales, self.wrappers))
        self.ptrs = list(map(_data_ptr, self.tensors))

    def unchanged(self) -> bool:
        if self.dtensor and not all(map(operator.is_, map(_local, self.holders), self.wrappers)):
            return False
        return list(map(_data_ptr, self.tensors)) == self.ptrs


class _Plan:
    """Which tensors go together, their sizes, chunk tables, addresses and kernels: rebuilt only when the set of
    parameters with gradients, the options that decide which states exist, or the state mapping changes."""

    def __init__(self, key: tuple, params: list[list], groups: list[tuple[int, dict, list[_Batch]]],
                 reference: list[tuple[dict, Any]], state: TrackedState):
        self.key, self.params, self.groups, self.reference = key, params, groups, reference
        self.state, self.generation = state, -1
        self.repointed = QuantizedState.repointed
        self.ready = False

    def batches(self) -> list[_Batch]:
        return [b for _, _, bs in self.groups for b in bs]

    def fits(self, key: tuple, work: list, state: TrackedState) -> bool:
        """Whether this plan still describes ``work``: same groups, options and parameter objects (compared by
        identity), the same state mapping with no mutation since it was validated, no 8-bit state's codes or scales
        replaced since, and every parameter and 8-bit state tensor at the address it was validated with."""
        return (self.key == key and state is self.state and (not self.ready or state.generation == self.generation)
                and QuantizedState.repointed == self.repointed and len(self.params) == len(work)
                and all(len(mine) == len(w[1]) and all(map(operator.is_, mine, w[1]))
                        for mine, w in zip(self.params, work))
                and all(b.unchanged() for b in self.batches()))


def _key(opt: Stepper, work: list[tuple[dict, list, list, dict]]) -> tuple:
    rule = opt.rule
    return (opt._plan_version,) + tuple(
        (id(group), group.get("fused"), tuple(rule.states(h))) for group, _, _, h in work)


def _compiled_view(p: torch.Tensor) -> tuple[str | None, torch.Tensor | None]:
    """(format, local tensor) for a parameter the kernels can step; (None, None) otherwise (not a plain strided
    tensor or a DTensor of one with real storage, a dtype without kernels, not on CPU, not contiguous, empty, or
    with a gradient that is not laid out like it)."""
    local, g = local_view(p), p.grad
    glocal = local_view(g) if local is not None and is_dtensor(g) == is_dtensor(p) else None
    if local is None or glocal is None or not local.is_cpu or local.numel() == 0:
        return None, None
    fmt = FORMAT_OF.get(local.dtype)
    if fmt is None or not (local.is_contiguous() and glocal.is_contiguous()):
        return None, None
    return fmt, local


def _overlapping(work: list[tuple[dict, list, list, dict]]) -> set[int]:
    """ids of the contiguous parameters whose memory overlaps another's (views of one storage). They go to the
    reference path, one after another as torch.optim steps them: the kernels' threads would race on the shared
    elements."""
    spans = []
    for _, params, _, _ in work:
        for p in params:
            local = local_view(p)
            if local is not None and local.numel() and local.is_contiguous():
                start = local.data_ptr()
                spans.append((start, start + local.numel() * local.element_size(), id(p)))
    spans.sort()
    shared: set[int] = set()
    end, owner = -1, 0
    for start, stop, i in spans:
        if start < end:
            shared |= {i, owner}
        if stop > end:
            end, owner = stop, i
    return shared


def _build(opt: Stepper, work: list[tuple[dict, list, list, dict]], key: tuple, state: TrackedState) -> _Plan:
    track_entries(state)
    groups, reference = [], []
    shared = _overlapping(work)
    for gi, (group, params, _, _) in enumerate(work):
        for p in params:
            _torch_step.check_grad(opt, gi, p)  # raises a clear error (before anything changes) for what no path can step
        if group.get("fused") is False or group.get("differentiable"):  # autograd through the step: torch ops
            reference.extend((group, p) for p in params)
            continue
        by_format: dict[str, list] = {}
        for i, p in enumerate(params):
            fmt, local = _compiled_view(p) if id(p) not in shared else (None, None)
            if fmt is None:  # what the kernels cannot take (torch's fused checks passed in _check_grad)
                reference.append((group, p))
                continue
            by_format.setdefault(fmt, []).append((i, p, local))
        groups.append((gi, group, [_Batch(fmt, [p for _, p, _ in items], [t for _, _, t in items],
                                          [i for i, _, _ in items], len(params))
                                   for fmt, items in by_format.items()]))
    return _Plan(key, [list(w[1]) for w in work], groups, reference, state)


def _prepare_states(opt: Stepper, plan: _Plan) -> None:
    """Validate every existing state against its parameter (all of them, before anything is created), create the
    missing ones, split batches by the states present, and record every address a kernel will touch."""
    for gi, _, batches in plan.groups:
        for b in batches:
            for p in b.params:
                _torch_step.validate_state(opt, gi, p)
    ids = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    for index, (gi, group, batches) in enumerate(plan.groups):
        split: list[_Batch] = []
        for batch in batches:
            positions = batch.positions if batch.positions is not None else list(range(len(batch.params)))
            size = len(batch.params) if batch.positions is None else -1
            layouts: dict[tuple, list] = {}
            for position, p, local in zip(positions, batch.params, batch.locals):
                new = _torch_step.init_state(opt, p, group)
                state = opt.state.get(p, {})
                present = tuple(s in state for s in opt.rule.update_states)
                kinds = tuple(stored_format(state, s, p) if s in state else "plain" for s in opt.rule.update_states)
                # tensors whose states were just made take a first step of their own (SGD's buffer = gradient)
                layouts.setdefault((present, kinds, new), []).append((position, p, local, new))
            for (present, kinds, _), items in layouts.items():
                split.append(_ready_batch(opt, batch.fmt, present, kinds, items, size, ids))
        plan.groups[index] = (gi, group, split)
    plan.generation, plan.repointed = plan.state.generation, QuantizedState.repointed
    plan.ready = True


def _ready_batch(opt: Stepper, fmt: str, present: tuple, kinds: tuple, items: list, size: int,
                 ids: dict[int, int]) -> _Batch:
    """A batch whose states exist: the state tensors it touches, their addresses, its step tensors and kernel."""
    rule = opt.rule
    b = _Batch(fmt, [p for _, p, _, _ in items], [t for _, _, t, _ in items], [i for i, _, _, _ in items], size)
    b.present, b.kinds, b.fresh = present, kinds, any(new for *_, new in items)
    columns = kernels.address_columns(rule, present, kinds)[2:]
    b.scale_columns = [2 + j for j, c in enumerate(columns) if c.endswith(".absmax")]
    b.scale_names = [c for c in columns if c.endswith(".absmax")]
    entries = [storage_form(opt.state.get(p, {})) for p in b.params]  # 8-bit states: their codes and scales
    b.states = [[local_view(e[c]) for e in entries] for c in columns]
    b.scalar_tensors = [[opt.state[p][k] for p in b.params] for k in rule.scalar_states]
    # the memory the kernels write is held, and cannot be resized (freed) under them; addresses read after
    b.keep += [fixed_storage(t) for col in b.states + b.scalar_tensors for t in col]
    b.quantized = [_Quantized([opt.state[p][s] for p in b.params])
                   for s, on, kind in zip(rule.update_states, present, kinds) if on and kind == "int8"]
    b.addresses = np.zeros((len(b.params), 2 + len(columns)), dtype=np.int64)
    b.addresses[:, 0] = b.param_ptrs
    for j, col in enumerate(b.states):
        b.addresses[:, 2 + j] = list(map(_data_ptr, col))
    b.scalar_ptrs = [np.array(list(map(_data_ptr, col)), dtype=np.int64) for col in b.scalar_tensors]
    b.state_tensors = [t for col in b.states + b.scalar_tensors for t in col]
    b.state_ptrs = list(map(_data_ptr, b.state_tensors))
    b.guard = MetadataGuard(b.locals + b.state_tensors)
    b.scalar_formats = [SCALAR_FORMAT_OF[col[0].dtype] for col in b.scalar_tensors]
    if any(t.dtype != col[0].dtype for col in b.scalar_tensors for t in col):
        raise RuntimeError(f"{rule.name}: scalar states of one group mix float32 and float64 tensors")
    stochastic = opt.stochastic_rounding and fmt == "bfloat16"
    b.kernel = kernels.kernel(rule, present, fmt, stochastic, kinds)
    formats = [kind if on else None for kind, on in zip(kinds, present)]
    b.rounds = bool(_storage.rounded_values(formats, fmt == "bfloat16", stochastic))
    b.ids = np.array([ids[id(p)] for p in b.params], dtype=np.int64)
    return b


def step(opt: Stepper, work: list[tuple[dict, list, list, dict]],
         check_finite: bool) -> tuple[list[tuple[dict, Any]], int]:
    """Step every parameter the kernels can take; return the (group, param) pairs left for the reference path
    and the number of 8-bit blocks left unchanged because their gradient was not finite.

    ``work`` holds (group, params with gradients, their gradients, the group's validated hyperparameters).
    Everything is validated before the first kernel runs; with ``check_finite``, every gradient (compiled or
    not) is scanned too.
    """
    state = tracked(opt)
    key = _key(opt, work)
    plan = opt._kernel_plan
    if plan is None or not plan.fits(key, work, state):
        plan = opt._kernel_plan = _build(opt, work, key, state)
    grad_ptrs = _grad_addresses(plan, work)
    if grad_ptrs is None:  # a gradient changed kind, dtype, layout or size: plan again (routes it, or raises)
        plan = opt._kernel_plan = _build(opt, work, key, state)
        grad_ptrs = _grad_addresses(plan, work)
        if grad_ptrs is None:
            raise RuntimeError(f"{opt.rule.name}: a gradient does not match its parameter")
    if plan.reference:  # the reference path's parameters, checked every step (the kernels' were above)
        _torch_step.check_reference(opt, plan.reference, work)
    if check_finite:
        _check_finite(opt, plan, grad_ptrs)
    if not plan.ready:
        _prepare_states(opt, plan)
        grad_ptrs = _grad_addresses(plan, work)
    return plan.reference, _run(opt, plan, work, grad_ptrs)


def _grad_addresses(plan: _Plan, work: list) -> list[np.ndarray] | None:
    """The gradients' addresses per batch, after checking each gradient is what its kernel reads (kind, dtype,
    layout, size, real storage): one C-level pass over the gradients per property. None if one is not."""
    out = []
    try:
        for gi, _, batches in plan.groups:
            grads = work[gi][2]
            for b in batches:
                gs = grads if b.positions is None else [grads[i] for i in b.positions]
                if b.dtensor:
                    gs = _dtensor_grads(b, gs)
                    if gs is None:
                        return None
                if not b.grad_guard.matches(gs):
                    # list.count compares by identity first: a dtype is one object
                    if not (list(map(_dtype, gs)).count(b.dtype) == len(gs) and all(map(_is_contiguous, gs))
                            and list(map(_numel, gs)) == b.size_list):
                        return None
                    if not b.dtensor:  # validated: later steps need only one call over these properties
                        b.grad_guard = MetadataGuard(gs)
                ptrs = np.fromiter(map(_data_ptr, gs), dtype=np.int64, count=len(gs))
                if not ptrs.all():  # a tensor without memory (its storage freed or resized to 0)
                    return None
                out.append(ptrs)
    except (RuntimeError, TypeError, AttributeError):  # a tensor without storage (fake, sparse, ...)
        return None
    return out


def _dtensor_grads(b: _Batch, grads: list) -> list[torch.Tensor] | None:
    """The local shards of DTensor gradients laid out like their parameters (None if one is not)."""
    for p, g in zip(b.params, grads):
        if type(g) is not type(p) or g.placements != p.placements or g.device_mesh != p.device_mesh:
            return None
    return [local_view(g) for g in grads]


def _run(opt: Stepper, plan: _Plan, work: list, grad_ptrs: list[np.ndarray]) -> int:
    """Every batch's coefficients first (a value no step can use raises before any kernel runs), then the
    kernels, then the new step counts."""
    rule = opt.rule
    floats, bools = kernels.coefficient_names(rule)
    scalar_names = list(rule.scalar_states)
    try:
        calls = [(b, _coefficients(rule, work[gi][3], b, floats, bools, scalar_names))
                 for gi, _, bs in plan.groups for b in bs]
    except (TypeError, ValueError, ArithmeticError, RuntimeError):
        for _, group, _ in plan.groups:
            _torch_step.usable_math(opt, group)  # raises the clear error naming the group
        raise
    for b in plan.batches():
        _check_scales(opt, b)
    skipped = 0
    for (b, (coef, flags, new)), ptrs in zip(calls, grad_ptrs):
        b.addresses[:, 1] = ptrs
        keys = _storage.stream_keys(opt.rounding_seed(), b.ids)[:, None] if b.rounds else _NO_KEYS
        skipped += b.kernel(*b.table, b.sizes, b.addresses, coef, flags, keys)
        b.fresh = False
        for j in range(len(scalar_names)):
            kernels.write_scalars(b.scalar_ptrs[j], new[:, j], b.scalar_formats[j])
    return skipped


def _check_scales(opt: Stepper, b: _Batch) -> None:
    """Refuse the step if a block scale of an 8-bit state was edited in place into one no step can use (inf, nan
    or negative), as a loaded one would be."""
    if not b.scale_columns:
        return
    k, c = kernels.first_bad_scale(b.sizes, b.addresses[:, b.scale_columns])
    if k >= 0:
        raise ValueError(f"{opt.rule.name}: '{b.scale_names[c]}' of a parameter of shape "
                         f"{tuple(b.params[k].shape)} holds a block scale that is not a finite number >= 0 (edited "
                         f"in place?); no parameter or state was changed")


def _check_finite(opt: Stepper, plan: _Plan, grad_ptrs: list[np.ndarray]) -> None:
    """Refuse the step (every rank alike) if a gradient holds inf or nan: an integer scan of the kernels'
    gradients, torch ops for the reference path's."""
    bad: list[Any] = []
    for b, ptrs in zip(plan.batches(), grad_ptrs):
        if kernels.count_nonfinite(b.fmt, b.table, b.sizes, ptrs):
            bad.extend(nonfinite_gradients(b.params))
    bad.extend(nonfinite_gradients([p for _, p in plan.reference]))
    shards = [p for b in plan.batches() if b.dtensor for p in b.params[:1]]
    refuse_nonfinite(opt.rule.name, bad, shards[0] if shards else None)


def _check_scalars(b: _Batch, scalars: np.ndarray, names: list[str]) -> None:
    """The scalar states read from memory (``state['step'].fill_(...)`` edits them in place) checked as a loaded
    one is (:func:`adamkit.checkpoints.check_scalar`): one vectorized test, the message for the first bad one."""
    bad = ~np.isfinite(scalars) | (scalars < 0)
    if "mu_product" in names:
        bad[:, names.index("mu_product")] |= scalars[:, names.index("mu_product")] > 1
    if bad.any():
        i, j = (int(x) for x in np.argwhere(bad)[0])
        _checkpoints.check_scalar(f"a parameter of shape {tuple(b.params[i].shape)}", names[j], float(scalars[i, j]))


def _coefficients(rule: _rules.Rule, h: dict, b: _Batch, floats: list, bools: list, scalar_names: list):
    """Per-tensor coefficient rows from the scalar states read from their tensors now (an in-place edit of
    ``state['step']`` counts); tensors at the same step share one computation."""
    n = len(b.params)
    scalar_dtype = np.float64 if b.scalar_formats and b.scalar_formats[0] == "float64" else np.float32
    scalars = np.empty((n, len(scalar_names)), dtype=np.float64)
    for j in range(len(scalar_names)):
        scalars[:, j] = kernels.read_scalars(b.scalar_ptrs[j], b.scalar_formats[j])
    _check_scalars(b, scalars, scalar_names)
    coef = np.empty((n, len(floats)), dtype=np.float64)
    flags = np.empty((n, len(bools)), dtype=np.uint8)
    new = np.empty((n, len(scalar_names)), dtype=np.float64)
    if n and (not scalar_names or (scalars == scalars[:1]).all()):
        rows, inverse = scalars[:1], slice(None)  # the common case: every tensor at the same step
    else:
        rows, inverse = np.unique(scalars, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
    low = {s for s, kind in zip(rule.update_states, b.kinds) if kind != "plain"}
    for r, row in enumerate(rows):
        c, s = _rules.step_coefficients(rule, h, dict(zip(scalar_names, row.tolist())), b.fresh, scalar_dtype, low)
        where = inverse if isinstance(inverse, slice) else inverse == r
        coef[where] = [float(c[f]) for f in floats]
        flags[where] = [c[x] for x in bools]
        new[where] = [s[k] for k in scalar_names]
    return coef, flags, new
