"""The compiled path of :mod:`adamkit.torch`: batches of CPU tensors stepped by :mod:`adamkit.kernels`.

Per step the Python work is a handful of list comprehensions over the parameters (their gradients' addresses
and a check that no parameter moved); everything else — which tensors go together, their sizes, the chunk table,
the addresses of parameters and states, the step counts — lives in a plan that is rebuilt only when the set of
parameters with gradients, the hyperparameters that decide which states exist, or the state itself (on
``load_state_dict``) changes.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import numpy as np
import torch

from . import kernels
from . import rules as _rules

FORMAT_OF = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16"}
# unbound methods, mapped over lists of tensors (C-level iteration: the per-step passes over 1,000s of tensors)
_data_ptr, _is_contiguous = torch.Tensor.data_ptr, torch.Tensor.is_contiguous
_dtype = operator.attrgetter("dtype")


def _kinds(rule: _rules.Rule, p: torch.Tensor, state: dict) -> tuple[str, ...]:
    """How each state of ``p`` is stored, as the kernels name it."""
    out = []
    for s in rule.update_states:
        if f"{s}.absmax" in state:
            out.append("q8")
        elif s in state and state[s].dtype == torch.bfloat16 and p.dtype != torch.bfloat16:
            out.append("bf16")
        else:
            out.append("plain")
    return tuple(out)


class _Batch:
    """Tensors of one group with the same storage format and states: one kernel call per step."""

    def __init__(self, fmt: str, present: tuple[bool, ...], params: list[torch.Tensor],
                 kinds: tuple[str, ...] = (), positions: list[int] | None = None, group_size: int = 0):
        self.fmt, self.present, self.params, self.kinds = fmt, present, params, kinds
        # where each param sits among its group's params with gradients (None: all of them, in order)
        self.positions = None if positions is None or positions == list(range(group_size)) else positions
        self.sizes = np.array([p.numel() for p in params], dtype=np.int64)
        self.table = kernels.chunk_table(self.sizes)
        self.param_ptrs = list(map(_data_ptr, params))
        self.dtype = params[0].dtype if params else None  # every parameter's (and gradient's) dtype
        self.addresses: np.ndarray | None = None  # filled once states exist
        self.scalar_tensors: list[list[torch.Tensor]] = []
        self.scalars: np.ndarray | None = None  # mirror of the per-tensor scalar states (step, mu_product)
        self.uniform = False  # every row of ``scalars`` is the same (all tensors at the same step)
        self.fresh = False
        self.kernel: Any = None  # the compiled loop, once the states are known


class _Plan:
    def __init__(self, key: tuple, params: list[list], groups: list[tuple[int, dict, list[_Batch]]],
                 reference: list[tuple[dict, Any]]):
        self.key, self.params, self.groups, self.reference = key, params, groups, reference
        self.ready = False

    def fits(self, key: tuple, work: list) -> bool:
        """Whether this plan still describes ``work``: same groups, options and parameter objects (compared by
        identity, without touching the tensors), and no parameter moved to other memory (``p.data = ...``)."""
        return (self.key == key and len(self.params) == len(work)
                and all(len(mine) == len(w[1]) and all(map(operator.is_, mine, w[1]))
                        for mine, w in zip(self.params, work))
                and all(b.param_ptrs == list(map(_data_ptr, b.params)) for _, _, bs in self.groups for b in bs))


def _key(opt: Any, work: list[tuple[dict, list, list, dict]]) -> tuple:
    rule = opt.rule
    return (opt._plan_version,) + tuple(
        (id(group), group.get("fused"), tuple(rule.states(h))) for group, _, _, h in work)


def _build(opt: Any, work: list[tuple[dict, list, list, dict]], key: tuple) -> _Plan:
    rule = opt.rule
    groups, reference = [], []
    for gi, (group, params, _, _) in enumerate(work):
        for p in params:
            if p.grad.is_sparse or p.is_meta:
                opt._check_grad(gi, p)  # raises a clear error before anything changes
        if group.get("fused") is False:
            reference.extend((group, p) for p in params)
            continue
        by_format: dict[str, list] = {}
        for i, p in enumerate(params):
            fmt = FORMAT_OF.get(p.dtype)
            if fmt is None or not p.is_cpu or not p.is_contiguous() or not p.grad.is_contiguous():
                if group.get("fused") is True:
                    raise RuntimeError(f"fused=True: {rule.name} has no compiled kernel for a parameter of dtype "
                                       f"{p.dtype} on {p.device} (contiguous float32/float64/bfloat16 CPU tensors)")
                reference.append((group, p))
                continue
            by_format.setdefault(fmt, []).append((i, p))
        groups.append((gi, group, [_Batch(fmt, (), [p for _, p in items], (), [i for i, _ in items], len(params))
                                   for fmt, items in by_format.items()]))
    return _Plan(key, [list(w[1]) for w in work], groups, reference)


def _prepare_states(opt: Any, plan: _Plan) -> None:
    """Create missing states, split batches by the states present, and record addresses and step counts."""
    rule = opt.rule
    for index, (gi, group, batches) in enumerate(plan.groups):
        split: list[_Batch] = []
        for batch in batches:
            by_present: dict[tuple, list] = {}
            fresh: dict[tuple, bool] = {}
            positions = batch.positions if batch.positions is not None else list(range(len(batch.params)))
            size = len(batch.params) if batch.positions is None else -1
            for position, p in zip(positions, batch.params):
                new = opt._init_state(p, group)
                state = opt.state[p]
                present = tuple(s in state for s in rule.update_states)
                layout = (present, _kinds(rule, p, state))
                by_present.setdefault(layout, []).append((position, p))
                fresh[layout] = fresh.get(layout, False) or new
            for (present, kinds), items in by_present.items():
                ps = [p for _, p in items]
                b = _Batch(batch.fmt, present, ps, kinds, [i for i, _ in items], size)
                b.fresh = fresh[(present, kinds)]
                columns = kernels.address_columns(rule, present, kinds)[2:]
                b.addresses = np.array([[p.data_ptr(), 0, *(opt.state[p][c].data_ptr() for c in columns)]
                                        for p in ps], dtype=np.int64)
                b.scalar_tensors = [[opt.state[p][k] for p in ps] for k in rule.scalar_states]
                b.scalar_ptrs = [np.array([t.data_ptr() for t in col], dtype=np.int64) for col in b.scalar_tensors]
                b.scalar_formats = [("float64" if col[0].dtype == torch.float64 else "float32")
                                    if all(t.is_cpu and t.numel() == 1 and t.dtype == col[0].dtype for t in col)
                                    else None for col in b.scalar_tensors]
                b.scalars = (torch.stack([torch.stack(col).to(torch.float64) for col in b.scalar_tensors], dim=1)
                             .numpy().copy() if b.scalar_tensors else np.zeros((len(ps), 0)))
                b.uniform = bool((b.scalars == b.scalars[:1]).all())
                b.kernel = kernels.kernel(rule, present, b.fmt, opt.stochastic_rounding and b.fmt == "bfloat16",
                                          kinds)
                split.append(b)
        plan.groups[index] = (gi, group, split)
    plan.ready = True


def step(opt: Any, work: list[tuple[dict, list, list, dict]],
         check_finite: bool) -> tuple[list[tuple[dict, Any]], int]:
    """Step every parameter the kernels can take; return the (group, param) pairs left for the reference path
    and the number of 8-bit blocks left unchanged because their gradient was not finite.

    ``work`` holds (group, params with gradients, their gradients, the group's validated hyperparameters).
    With ``check_finite``, every gradient (compiled or not) is scanned before anything changes.
    """
    key = _key(opt, work)
    plan = opt._kernel_plan
    if plan is None or not plan.fits(key, work):
        plan = opt._kernel_plan = _build(opt, work, key)
    grad_ptrs = _grad_addresses(plan, work, opt.rule.name)
    if grad_ptrs is None:  # a non-contiguous (or sparse) gradient: plan again, routing it elsewhere
        plan = opt._kernel_plan = _build(opt, work, key)
        grad_ptrs = _grad_addresses(plan, work, opt.rule.name)
    if plan.reference:  # the kernels' batches were checked with their addresses
        _check_grad_dtypes(opt.rule.name, [p for _, p in plan.reference], [p.grad for _, p in plan.reference])
    return _step_plan(opt, plan, check_finite, work, grad_ptrs)


def _check_grad_dtypes(name: str, params: list[torch.Tensor], grads: list[torch.Tensor],
                       dtype: torch.dtype | None = None) -> None:
    """Raise a ``TypeError`` (before anything changes) if a gradient's dtype differs from its parameter's — possible
    after ``p.grad_dtype = None`` or ``p.grad.data = ...``; the kernels would read its memory as the parameter's dtype. ``dtype``:
    the dtype every parameter has (one C-level pass over the gradients instead of two)."""
    expected = itertools.repeat(dtype) if dtype is not None else map(_dtype, params)
    if all(map(operator.is_, map(_dtype, grads), expected)):
        return
    p, g = next((p, g) for p, g in zip(params, grads) if g.dtype != p.dtype)
    raise TypeError(f"{name}: the gradient of a parameter of shape {tuple(p.shape)} has dtype {g.dtype}, the "
                    f"parameter {p.dtype}; they must match (as in torch.optim); no parameter or state was changed")


def _grad_addresses(plan: _Plan, work: list, name: str) -> list[np.ndarray] | None:
    """The gradients' addresses per batch (one pass over the gradient tensors), or None if one is not contiguous;
    a gradient whose dtype is not its parameter's raises (``name``: the optimizer's, for the message)."""
    out = []
    for gi, _, batches in plan.groups:
        grads = work[gi][2]
        for b in batches:
            gs = grads if b.positions is None else [grads[i] for i in b.positions]
            if not all(map(_is_contiguous, gs)):
                return None
            _check_grad_dtypes(name, b.params, gs, b.dtype)
            out.append(np.array(list(map(_data_ptr, gs)), dtype=np.int64))
    return out


def _step_plan(opt: Any, plan: _Plan, check_finite: bool, work: list,
               grad_ptrs: list[np.ndarray]) -> tuple[list, int]:
    batches = [b for _, _, bs in plan.groups for b in bs]
    if check_finite:
        _check_finite(opt, plan, batches, grad_ptrs)
    if not plan.ready:
        _prepare_states(opt, plan)
        batches = [b for _, _, bs in plan.groups for b in bs]
        grad_ptrs = _grad_addresses(plan, work, opt.rule.name)
    rule = opt.rule
    floats, bools = kernels.coefficient_names(rule)
    scalar_names = list(rule.scalar_states)
    index = skipped = 0
    for gi, _, bs in plan.groups:
        h = work[gi][3]
        for b in bs:
            b.addresses[:, 1] = grad_ptrs[index]
            index += 1
            coef, flags, new = _coefficients(rule, h, b, floats, bools, scalar_names)
            rounding = opt.stochastic_rounding or "bf16" in b.kinds
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=opt._rounding_generator)) if rounding else 0
            skipped += b.kernel(*b.table, b.sizes, b.addresses, coef, flags, seed)
            b.fresh = False
            if scalar_names:
                _write_scalars(b, new, scalar_names)
    return plan.reference, skipped


def _check_finite(opt: Any, plan: _Plan, batches: list[_Batch], grad_ptrs: list[np.ndarray]) -> None:
    ordered: list[Any] = []
    for b, ptrs in zip(batches, grad_ptrs):
        if kernels.count_nonfinite(b.fmt, b.table, b.sizes, ptrs):
            ordered.extend(p for p in b.params if not bool(torch.isfinite(p.grad).all()))
    ordered.extend(p for _, p in plan.reference if not bool(torch.isfinite(p.grad).all()))
    if ordered:
        p = ordered[0]
        raise FloatingPointError(
            f"{opt.rule.name}: the gradient of a parameter of shape {tuple(p.shape)} has non-finite values "
            f"(inf or nan); no parameter or state was changed")


def _coefficients(rule: _rules.Rule, h: dict, b: _Batch, floats: list, bools: list, scalar_names: list):
    """Per-tensor coefficient rows; tensors at the same step share one computation."""
    n = len(b.params)
    scalar_dtype = np.float64 if b.scalar_tensors and b.scalar_tensors[0][0].dtype == torch.float64 else np.float32
    coef = np.empty((n, len(floats)), dtype=np.float64)
    flags = np.empty((n, len(bools)), dtype=np.uint8)
    new = np.empty((n, len(scalar_names)), dtype=np.float64)
    if n and (not scalar_names or b.uniform):
        rows, inverse = b.scalars[:1], slice(None)  # the common case: every tensor at the same step
    else:
        rows, inverse = np.unique(b.scalars, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
    for r, row in enumerate(rows):
        c, s = _rules.step_coefficients(rule, h, dict(zip(scalar_names, row.tolist())), b.fresh, scalar_dtype)
        where = inverse if isinstance(inverse, slice) else inverse == r
        coef[where] = [c[f] for f in floats]
        flags[where] = [c[x] for x in bools]
        new[where] = [s[k] for k in scalar_names]
    return coef, flags, new


def _write_scalars(b: _Batch, new: np.ndarray, scalar_names: list) -> None:
    for j, tensors in enumerate(b.scalar_tensors):
        fmt = b.scalar_formats[j]
        if fmt is not None:  # CPU scalar tensors (torch's default for these states): written in one compiled loop
            kernels.write_scalars(b.scalar_ptrs[j], new[:, j], fmt)
        else:
            values = torch.from_numpy(new[:, j]).to(tensors[0].dtype)
            torch._foreach_copy_(tensors, list(values.to(tensors[0].device).unbind()))
    b.scalars = new  # one step each: rows that were all equal stay equal, distinct ones stay distinct
