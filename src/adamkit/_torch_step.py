"""The torch engine's step: validate → coefficients → run the rule → store, on two paths.

* The **reference path** (:func:`reference_step`) runs the rule on whole tensors with torch ops: any device, any
  tensor kind, autograd through the step (``differentiable=True``). It imports no numba.
* The **compiled path** (:mod:`adamkit._torch_fused`, imported when first needed) steps batches of CPU tensors
  with the generated kernels, and hands back what it cannot take.

Both see the optimizer only through :class:`Stepper`, and store states through :mod:`adamkit._torch_states`.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch
from torch.optim.optimizer import _device_dtype_check_for_fused, _get_capturable_supported_devices

from . import checkpoints as _checkpoints
from . import core as _core
from . import rules as _rules
from . import states as _states
from . import _tensors
from . import _torch_states as _ts

_GRAD = operator.attrgetter("grad")

Work = list[tuple[dict, list[torch.Tensor], list[torch.Tensor], dict[str, Any]]]
"""One step's work per group: (group, params with gradients, their gradients, the group's hyperparameters)."""

SPARSE_ERRORS = {"Adam": "Adam does not support sparse gradients, please consider SparseAdam instead",
                 "AdamW": "Adam does not support sparse gradients, please consider SparseAdam instead"}
"""torch.optim's words where they are not '<Class> does not support sparse gradients'."""
SPARSE_DECAY_ERRORS = {"SGD": "add(sparse, dense) is not supported. Use add(dense, sparse) instead."}
"""torch.optim's words for weight decay with a sparse gradient where they are not Adagrad's."""


class Stepper(Protocol):
    """What the step needs from an optimizer (:class:`adamkit.torch.Optimizer`)."""

    rule: _rules.Rule
    state: Any
    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any]
    check_finite: bool
    stochastic_rounding: bool
    _kernel_plan: Any  # the compiled path's cached batches
    _plan_version: int  # bumped when the groups change

    def hyperparameters(self, group: Mapping[str, Any]) -> dict[str, Any]: ...
    def rounding_seed(self) -> int: ...


def step(opt: Stepper) -> None:
    """One step of every parameter with a gradient (all checks before anything changes)."""
    work = gather(opt)
    if amp_step_skipped(opt, work):
        return
    if all(w[0].get("fused") is False or w[0].get("differentiable") for w in work):
        reference, skipped = reference_only(opt, work), 0  # torch ops only: no compiled module imported
    else:
        from . import _torch_fused  # imported when first needed: importing adamkit compiles nothing
        reference, skipped = _torch_fused.step(opt, work, opt.check_finite)
    position = tensor_positions(opt)
    for group, p in reference:
        skipped += reference_step(opt, group, p, position)
    if skipped:
        _states.warn_skipped_blocks(opt.rule.name, skipped)


def gather(opt: Stepper) -> Work:
    """The step's work, reading each ``.grad`` once."""
    work: Work = []
    for group in opt.param_groups:
        _checkpoints.check_options(group)  # an option set in the group since: checked before anything changes
        grads = list(map(_GRAD, group["params"]))
        if any(map(operator.is_, grads, itertools.repeat(None))):
            params = [p for p, g in zip(group["params"], grads) if g is not None]
            grads = [g for g in grads if g is not None]
        else:
            params = group["params"]
        if params:
            h = opt.hyperparameters(group)
            opt.rule.check_group(h, group.get("state_precision"))  # e.g. a value set in the group since
            work.append((group, params, grads, h))
    return work


def amp_step_skipped(opt: Any, work: Work) -> bool:
    """torch's fused protocol with AMP (``_step_supports_amp_scaling``): ``GradScaler`` sets ``grad_scale`` and
    ``found_inf`` on the optimizer instead of unscaling; skip the step if an inf was found, else unscale the
    gradients in place (as torch's fused kernels do) and step."""
    if not getattr(opt, "_step_supports_amp_scaling", False):
        return False
    found_inf, grad_scale = getattr(opt, "found_inf", None), getattr(opt, "grad_scale", None)
    if found_inf is not None and bool(found_inf.ne(0).any()):
        return True
    if grad_scale is not None:
        grads = [g for _, _, gs, _ in work for g in gs]
        torch._foreach_div_(grads, grad_scale.to(grads[0].device) if grads else grad_scale)
    return False


# -- checks, before anything changes -------------------------------------------------------------------------------

def where(opt: Stepper, gi: int, p: torch.Tensor) -> str:
    return f"{opt.rule.name}: parameter of shape {tuple(p.shape)} in group {gi}"


def usable_math(opt: Stepper, group: Mapping[str, Any]) -> dict[str, Any]:
    """The group's hyperparameters, after a dry run of the step's coefficients: like torch.optim, a step takes
    whatever values a scheduler wrote, but one the math cannot use at all (a two-element lr, a beta that makes a
    bias correction negative) is refused here, before any parameter changes, instead of half-way."""
    h = opt.hyperparameters(group)
    try:
        coefficients, _ = _rules.step_coefficients(opt.rule, h, opt.rule.scalar_states)
        for value in coefficients.values():
            float(value)  # a real number (a complex one means a negative bias correction)
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
        gi = next(i for i, g in enumerate(opt.param_groups) if g is group)
        raise ValueError(f"{opt.rule.name}: the hyperparameters of group {gi} cannot make a step ({e}); no "
                         f"parameter or state was changed") from None
    return h


def check_grad(opt: Stepper, gi: int, p: torch.Tensor) -> None:
    """Raise a clear error, before anything changes, for a gradient no path can step with its parameter."""
    g, at = p.grad, where(opt, gi, p)
    group = opt.param_groups[gi] if 0 <= gi < len(opt.param_groups) else {}
    capturable = "capturable" in opt.defaults and group.get("capturable")  # an option of this class only
    if capturable and p.device.type not in _get_capturable_supported_devices():
        tensors = "params, mu_products and state_steps" if "mu_product" in opt.rule.scalar_states \
            else "params and state_steps"  # torch.optim.NAdam's words name its μ products too
        raise AssertionError(f"If capturable=True, {tensors} must be on supported devices: "
                             f"{_get_capturable_supported_devices()}. ({at})")
    if group.get("fused") is True:
        try:
            _device_dtype_check_for_fused(p)
        except RuntimeError as e:
            raise RuntimeError(f"{e} ({at})") from None
    if g.is_sparse:
        return _check_sparse(opt.rule, group, at)
    if p.is_meta:
        raise RuntimeError(f"{at} is on the meta device: it holds no values to update (materialize the model, "
                           f"e.g. with to_empty(), before stepping)")
    local = _tensors.local_view(p)
    if local is not None and not _tensors.has_memory(local):
        raise RuntimeError(f"{at} has no memory for its elements (its storage was freed or resized); no parameter "
                           f"or state was changed")
    if not (p.is_floating_point() or p.is_complex()):
        raise TypeError(f"{at} has dtype {p.dtype}; optimizers need floating or complex parameters")
    if g.dtype != p.dtype:  # torch.optim's Adam family fails with a RuntimeError here
        raise RuntimeError(f"{opt.rule.name}: the gradient of a parameter of shape {tuple(p.shape)} has dtype "
                        f"{g.dtype}, the parameter {p.dtype}; they must match (as in torch.optim); no parameter or "
                        f"state was changed")
    if g.shape != p.shape or g.device != p.device:
        raise RuntimeError(f"{at}: its gradient has shape {tuple(g.shape)} on {g.device}; it must have the "
                           f"parameter's shape and device (was p.grad.data reassigned?); no parameter or state was "
                           f"changed")


def _check_sparse(rule: _rules.Rule, group: Mapping[str, Any], at: str) -> None:
    if not rule.sparse_gradients:
        raise RuntimeError(SPARSE_ERRORS.get(rule.name, f"{rule.name} does not support sparse gradients")
                           + f" ({at})")
    if group.get("fused") is True:
        raise RuntimeError(f"`fused` does not support sparse gradients ({at})")
    if not rule.sparse_weight_decay and float(group.get("weight_decay", 0)) != 0:
        words = SPARSE_DECAY_ERRORS.get(rule.name, "weight_decay option is not compatible with sparse gradients")
        raise RuntimeError(f"{words} ({at})")


def validate_state(opt: Stepper, gi: int, p: torch.Tensor) -> None:
    _ts.validate_state(opt.rule, opt.state.get(p), where(opt, gi, p), p)


def init_state(opt: Stepper, p: torch.Tensor, group: Mapping[str, Any]) -> bool:
    return _ts.init_state(opt.rule, opt.state, p, opt.hyperparameters(group), group.get("state_precision"),
                          opt.defaults)


def check_reference(opt: Stepper, pairs: list[tuple[dict, torch.Tensor]], work: Work) -> None:
    """Check every (group, parameter) the reference path will step, before anything changes."""
    index = {id(w[0]): gi for gi, w in enumerate(work)}
    for group in {id(g): g for g, _ in pairs}.values():
        usable_math(opt, group)
    for group, p in pairs:
        check_grad(opt, index[id(group)], p)
        validate_state(opt, index[id(group)], p)
        _ts.missing_states(opt.rule, opt.state, p, opt.hyperparameters(group), opt.defaults)
        _ts.check_assigned(opt.rule, opt.state.get(p), p, _ts.state_format(p, group.get("state_precision")))


def reference_only(opt: Stepper, work: Work) -> list[tuple[dict, torch.Tensor]]:
    """The (group, parameter) pairs of a step that the kernels take no part in, checked."""
    pairs = [(group, p) for group, params, _, _ in work for p in params]
    check_reference(opt, pairs, work)
    if opt.check_finite:
        dtensor = next((p for _, p in pairs if _tensors.is_dtensor(p)), None)
        _tensors.refuse_nonfinite(opt.rule.name, _tensors.nonfinite_gradients([p for _, p in pairs]), dtensor)
    return pairs


# -- the reference path ------------------------------------------------------------------------------------------

def tensor_positions(opt: Stepper) -> Callable[[torch.Tensor], int]:
    """A parameter's position among the optimizer's parameters (its id in the state dict; the rounding streams'
    tensor), from an index made at the first call (one per step, only if a state rounds stochastically)."""
    index: dict[int, int] = {}

    def position(p: torch.Tensor) -> int:
        if not index:
            index.update((id(q), i) for i, q in enumerate(q for g in opt.param_groups for q in g["params"]))
        return index[id(p)]
    return position


def reference_step(opt: Stepper, group: dict[str, Any], p: torch.Tensor,
                   position: Callable[[torch.Tensor], int]) -> int:
    """Step ``p`` with torch ops (:func:`adamkit.core.step_parameter`); return how many 8-bit blocks were left
    unchanged (non-finite gradient). ``position``: see :func:`tensor_positions`."""
    rule = opt.rule
    fresh = init_state(opt, p, group)
    state = opt.state[p] if p in opt.state else {}  # SGD without momentum keeps no entry
    stored = _ts.storage_form(state)  # what core.py steps: 8-bit states as codes beside their scales
    grad = p.grad.to_dense() if p.grad.is_sparse else p.grad  # torch's sparse math, on the entries present
    formats = [_ts.stored_format(stored, k, p) if k in stored else None for k in rule.update_states]
    noise = _core.rounding_noise(_ts.OPS, formats, opt.rounding_seed, lambda: position(p))
    scalar_dtype = np.float64 if stored.get("step", torch.tensor(0.0)).dtype == torch.float64 else np.float32
    skipped = _core.step_parameter(rule, _update(rule), opt.hyperparameters(group), _TorchArrays(p, group), p,
                                   grad, stored, formats, fresh, opt.check_finite, noise, scalar_dtype)
    _ts.write_back(state, stored, rule.update_states)
    return skipped


class _TorchArrays:
    """:class:`adamkit.core.Arrays` for a torch parameter: states updated in place where stored like it."""

    ops = _ts.OPS

    def __init__(self, p: torch.Tensor, group: Mapping[str, Any]) -> None:
        self.p, self.complex = p, p.is_complex()
        self.view = _math_view(p, group)

    def untracked(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    def load(self, state: dict, key: str) -> torch.Tensor:
        return _ts.load_state(self.p, state, key)

    def _in_place(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(x) if self.complex else x

    def write_param(self, theta: torch.Tensor) -> None:
        self._in_place(self.p).copy_(theta)

    def write_state(self, state: dict, key: str, values: torch.Tensor, fmt: str, noise: Any) -> None:
        if fmt == "plain":
            self._in_place(state[key]).copy_(values)
        else:
            _ts.store_state(self.p, state, key, values, fmt, noise)

    def scalar(self, state: dict, key: str) -> float:
        return state[key].item()

    def write_scalar(self, state: dict, key: str, value: float) -> None:
        state[key].fill_(value)


TORCH_OPS: dict[str, Any] = {"sqrt": torch.sqrt, "maximum": torch.maximum}
_UPDATES: dict[str, Any] = {}


def _update(rule: _rules.Rule):
    """The rule's element function bound to torch ops (once per rule)."""
    fn = _UPDATES.get(rule.name)
    if fn is None:
        fn = _UPDATES[rule.name] = _rules.bind(rule.update, TORCH_OPS)
    return fn


def _math_view(p: torch.Tensor, group: Mapping[str, Any]):
    """How the rule sees a tensor of ``p``: a complex one as its real view; float32 math for 16-bit tensors with
    ``fused=True`` (as torch's fused kernels) or 8-bit states (as the kernels; in 16 bits ε = 1e-8 is 0); a copy inside autograd (the graph keeps the old values, the tensors
    are updated in place)."""
    real = torch.view_as_real if p.is_complex() else (lambda t: t)
    if p.dtype in (torch.float16, torch.bfloat16) and (group.get("fused") is True
                                                     or group.get("state_precision") == "int8"):
        real = lambda t: t.to(torch.float32)  # noqa: E731 - 8-bit states: ε and small moments need float32
    if torch.is_grad_enabled():
        plain = real
        real = lambda t: plain(t).clone()  # noqa: E731
    return real
