"""Drop-in ``torch.optim`` replacements: same keywords, defaults, math and ``state_dict``.

``adamkit.torch.AdamW(model.parameters(), lr=1e-3)`` behaves as ``torch.optim.AdamW``: param groups, closures,
``zero_grad``, step and state-dict hooks, LR schedulers, deepcopy and printing come from
:class:`torch.optim.Optimizer`. A ``torch.optim`` checkpoint loads into the adamkit class of the same name and
training continues exactly as it would have; an adamkit checkpoint loads into ``torch.optim``.

The math is the rule of the same name in :mod:`adamkit.rules`. On CPU, float32/float64/bfloat16/float16 tensors step
through compiled, multi-threaded kernels generated from that rule (:mod:`adamkit.kernels`); ``fused=False``
selects the reference path, which runs the rule on whole tensors with torch ops and works on any device.

Differences from torch.optim, all deliberate:

* ``check_finite=False`` (keyword, default) steps on inf or nan gradients as torch.optim does.
  ``check_finite=True`` (opt-in) scans every gradient first and raises ``FloatingPointError`` naming the
  parameter, before any parameter or state changes. With ``state_precision="int8"``, a block of 256 elements
  whose gradient is not finite always keeps its params and 8-bit states (one nan would poison the block's scale;
  the guard reads each block while it is in cache, no extra scan); the rest of the step is applied and a
  ``RuntimeWarning`` gives the count.
* ``differentiable=True`` runs the reference path inside autograd, as torch.optim does: gradients flow to the
  parameters and states it updates, and to a tensor ``lr`` that requires grad. ``capturable=True`` is accepted as
  torch.optim accepts it, and refused at the step with torch's words on a device that cannot capture (CPU);
  ``foreach`` is accepted and has no effect (adamkit picks its own
  multi-tensor path).

Example:
    >>> import torch, adamkit.torch
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = adamkit.torch.AdamW(model.parameters(), lr=1e-2)
    >>> loss = model(torch.ones(2, 3)).pow(2).mean()
    >>> loss.backward()
    >>> opt.step()
    >>> sorted(opt.state_dict()["state"][0])
    ['exp_avg', 'exp_avg_sq', 'step']
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, Mapping

import torch
import torch.optim as _optim

from . import checkpoints as _checkpoints
from . import rules as _rules
from . import storage as _storage
from . import _tensors
from . import _torch_states
from . import _torch_step
from ._quantized import QuantizedState
from ._signature import bind as _bind

__all__ = ["Optimizer", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "QuantizedState"]

# torch.optim group keys that are not part of the math: kept in every group so checkpoints move both ways.
_ENGINE_KEYS = _checkpoints.ENGINE_KEYS


class _Checkpoints(_optim.Optimizer):
    """The checkpoint half of :class:`Optimizer`: torch.optim's ``state_dict``, loaded after
    :func:`adamkit.checkpoints.check_state_dict` and stored in the optimizer's formats."""

    rule: _rules.Rule

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """As torch.optim's, after checking that the state dict fits this optimizer
        (:func:`adamkit.checkpoints.check_state_dict`).

        Raises ``ValueError`` naming the mismatch (group count or sizes, invalid hyperparameters or engine
        options, missing or unknown state keys, state shapes, dtypes and values) and leaves the optimizer
        unchanged. Engine options (``fused``, ``state_precision``, ...) stay this optimizer's own.
        """
        engine = [{k: g[k] for k in _ENGINE_KEYS if k in g} for g in self.param_groups]
        precisions = [g.get("state_precision") for g in self.param_groups]
        hypers = _checkpoints.check_state_dict(state_dict, self.rule, [g["params"] for g in self.param_groups],
                                               precisions, torch.is_tensor)
        full = _checkpoints.full_precision(state_dict, self.rule)
        for g, h in zip(full["param_groups"], hypers):
            g.update(h)
        super().load_state_dict(full)
        for group, own in zip(self.param_groups, engine):  # this optimizer's engine options win over the checkpoint's
            for k in _ENGINE_KEYS:
                group.pop(k, None)
            group.update(own)
        saved = [(i, g) for g in state_dict["param_groups"] for i in g["params"]]
        mine = [(p, group) for group in self.param_groups for p in group["params"]]
        for (saved_id, saved_group), (p, group) in zip(saved, mine):  # each state in this optimizer's format
            _torch_states.restore_storage(self.rule, self.state.get(p), p, state_dict["state"].get(saved_id, {}),
                                          group, saved_group)

    def state_dict(self) -> dict[str, Any]:
        """As torch.optim's: per-parameter states as plain dicts of plain tensors (``torch.load(weights_only=True)``
        reads them); an 8-bit state as its codes (int8 or uint8) beside its block scales (``"<state>.absmax"``),
        or, of a DTensor parameter, as a float32 DTensor of its values."""
        out = super().state_dict()
        out["state"] = {k: _torch_states.distributable(v) if isinstance(v, dict) else v
                        for k, v in out["state"].items()}
        return out

    def torch_state_dict(self) -> dict[str, Any]:
        """The state in torch.optim's own format: full-precision states in the parameter's dtype, no adamkit
        keys. ``torch.optim.<Class>.load_state_dict`` takes it; for full-precision states it equals
        :meth:`state_dict`."""
        params = [p for g in self.param_groups for p in g["params"]]
        return _checkpoints.full_precision(
            self.state_dict(), self.rule, drop_engine_keys=True,
            low=lambda i, entry: _torch_states.low_precision_states(self.rule, entry, params[i]))


class Optimizer(_Checkpoints):
    """Base of the adamkit.torch optimizers: one rule, run by the compiled kernels or the reference path
    (:mod:`adamkit._torch_step`)."""

    rule: _rules.Rule
    _signature: inspect.Signature

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        values = _bind(self._signature, self, args, kwargs)
        params = values.pop("params")
        for flag in ("check_finite", "stochastic_rounding"):
            _checkpoints.check_flag(flag, values[flag])
        self.check_finite: bool = bool(values.pop("check_finite"))
        self.stochastic_rounding: bool = bool(values.pop("stochastic_rounding"))
        self._init_engine()
        super().__init__(params, _defaults(self.rule, values))
        self.state = _tensors.TrackedState.of(self.state)
        # torch's fused protocol with AMP: GradScaler hands grad_scale and found_inf to step()
        self._step_supports_amp_scaling = self.defaults.get("fused") is True

    def _init_engine(self) -> None:
        self._handle = id(self)  # how the torch.compile operator finds this optimizer
        _COMPILED_STEPS[self._handle] = self
        self._kernel_plan = None  # the compiled path's cached batches (adamkit._torch_fused)
        self._plan_version = 0
        self._step_seed: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(check_finite=self.check_finite, stochastic_rounding=self.stochastic_rounding)
        # pickled with 8-bit states as codes and scales (a QuantizedState alone pickles as float32 values)
        state["state"] = {p: _torch_states.storage_form(e) if isinstance(e, dict) else e
                          for p, e in self.state.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "state" in state:  # torch.optim's load_state_dict sets a plain defaultdict: track its mutations
            state["state"] = _tensors.TrackedState.of(state["state"])
            for entry in dict.values(state["state"]):
                if isinstance(entry, dict):
                    _torch_states.kept_form(entry)
        self.check_finite = state.pop("check_finite", getattr(self, "check_finite", False))
        self.stochastic_rounding = state.pop("stochastic_rounding", getattr(self, "stochastic_rounding", False))
        super().__setstate__(state)
        if not hasattr(self, "_handle"):
            self._init_engine()
        self._plan_version = getattr(self, "_plan_version", 0) + 1
        _checkpoints.fill_defaults(self.rule, self.defaults, self.param_groups)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch.optim's, with the group's hyperparameters and engine options (``fused``, ``state_precision``)
        validated before it is added (the constructor's groups come through here too)."""
        h = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self.rule.validate(self.hyperparameters(h), h.get("state_precision"))
        _checkpoints.check_options(h)
        super().add_param_group(param_group)
        self._plan_version = getattr(self, "_plan_version", 0) + 1
        if self.rule.states_at_construction:  # torch.optim.Adagrad creates its state here
            group = self.param_groups[-1]
            for p in group["params"]:
                _torch_step.init_state(self, p, group)
            if group.get("state_precision") == "bf16" or self.stochastic_rounding:  # states that will round
                _storage.open_stream(self.param_groups[0])

    def hyperparameters(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The hyperparameters of ``group`` that the rule reads (its engine options left out)."""
        return {k: group[k] for k in self.defaults if k not in _ENGINE_KEYS and k in group}

    def rounding_seed(self) -> int:
        """This step's stochastic-rounding seed (:func:`adamkit.storage.next_seed`: one draw per step, from the
        stream in ``param_groups[0]``)."""
        if self._step_seed is None:
            self._step_seed = _storage.next_seed(self.param_groups[0])
        return self._step_seed

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (re-evaluating the model first if ``closure`` is given).

        As torch.optim: the step runs without autograd unless the optimizer was built with
        ``differentiable=True``; hyperparameters are validated when set, not at every step (schedulers may write
        any value into a group)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():  # torch.compile sees the whole step as one operator
            _as_operator(self)
            return loss
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable"))):
            self._step()
        return loss

    def _step(self) -> None:
        self._step_seed = None  # drawn at most once per step
        _torch_step.step(self)


def _defaults(rule: _rules.Rule, values: dict[str, Any]) -> dict[str, Any]:
    """The constructor's defaults (hyperparameters, then engine options) after torch.optim's checks, in its order
    and with its words (torch.optim.Adam's constructor checks more than the others).

    An engine option torch.optim's class does not have (``state_precision``; ``fused`` where torch has no fused
    path) is a group key only when it is set: with those left at None the groups, and so ``state_dict()``, have
    torch.optim's keys, and ``torch.distributed.checkpoint`` (which loads only a checkpoint holding every key of
    the loader's state dict, and rebuilds flattened groups from the live groups' keys) moves checkpoints between
    adamkit and torch.optim both ways."""
    engine = {k: values.pop(k) for k in _ENGINE_KEYS if k in values}
    adam = rule.name in ("Adam", "AdamW")
    _check_tensor_lr(values.get("lr"), engine if adam else {})
    defaults = rule.hyperparameters(**values)
    if adam:  # after the ranges, as there
        _check_tensor_betas(values.get("betas", defaults["betas"]), engine)
    if engine.get("fused"):  # torch.optim's checks and words, after the value checks as there
        if engine.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
        if engine.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    unset = [k for k in ("state_precision",) + (() if rule.torch_fused else ("fused",)) if engine.get(k) is None]
    return {**defaults, **{k: v for k, v in engine.items() if k not in unset}}


def _check_tensor_lr(lr: Any, engine: Mapping[str, Any]) -> None:
    """torch.optim's checks of a tensor ``lr``, with its words, before anything else (as its constructors); the
    foreach check only where ``engine`` is given (torch.optim.Adam's)."""
    if isinstance(lr, torch.Tensor):
        if engine.get("foreach") and not engine.get("capturable"):
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")


def _check_tensor_betas(betas: Any, engine: Mapping[str, Any]) -> None:
    """torch.optim.Adam's checks of tensor ``betas``, with its words."""
    if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, torch.Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor):
            if engine.get("foreach") and not engine.get("capturable"):
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


_COMPILED_STEPS: "weakref.WeakValueDictionary[int, Optimizer]" = weakref.WeakValueDictionary()


@torch.library.custom_op("adamkit::step", mutates_args=("params", "states"))
def _step_operator(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[torch.Tensor],
                   handle: int) -> None:
    """``opt.step()`` as one operator for torch.compile: it updates ``params`` and ``states`` in place (the
    optimizer's own step, run eagerly), so dynamo traces no Python of the step and breaks no graph."""
    optimizer = _COMPILED_STEPS[handle]
    with torch.set_grad_enabled(bool(optimizer.defaults.get("differentiable"))):
        optimizer._step()


def _as_operator(opt: Optimizer) -> None:
    """``opt.step()`` inside torch.compile: one call of :func:`_step_operator` on every tensor it touches."""
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    # 8-bit states as their codes and scales: an operator given the QuantizedState would update a dequantized copy
    states = [v for p in params for v in _torch_states.storage_form(opt.state.get(p, {})).values()
              if isinstance(v, torch.Tensor)]
    _step_operator(params, [p.grad for p in params], states, opt._handle)


@_step_operator.register_fake
def _(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[torch.Tensor], handle: int) -> None:
    return None


def _make(rule: _rules.Rule) -> type[Optimizer]:
    """The adamkit class for ``rule``, with torch.optim's constructor signature for the class of that name."""
    torch_cls = getattr(_optim, rule.name)
    sig = inspect.signature(torch_cls.__init__)
    params = list(sig.parameters.values())
    if "fused" not in sig.parameters:  # torch has no fused kernel for this class; adamkit does
        params.append(inspect.Parameter("fused", inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=bool | None))
    params.append(inspect.Parameter("check_finite", inspect.Parameter.KEYWORD_ONLY, default=False,
                                    annotation=bool))
    params.append(inspect.Parameter("stochastic_rounding", inspect.Parameter.KEYWORD_ONLY, default=False,
                                    annotation=bool))
    params.append(inspect.Parameter("state_precision", inspect.Parameter.KEYWORD_ONLY, default=None,
                                    annotation=str | None))
    signature = sig.replace(parameters=params)
    cls = type(rule.name, (Optimizer,), {
        "rule": rule,
        "_signature": signature,
        "__doc__": f"Drop-in for ``torch.optim.{rule.name}``; the math is :func:`adamkit.rules."
                   f"{rule.update.__name__}`.\n\n{inspect.cleandoc(rule.update.__doc__ or '')}\n\n"
                   f"Keywords and defaults are torch.optim's: ``{signature}``.",
        "__module__": __name__,
    })
    cls.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    return cls


SGD = _make(_rules.RULES["SGD"])
Adagrad = _make(_rules.RULES["Adagrad"])
RMSprop = _make(_rules.RULES["RMSprop"])
Adam = _make(_rules.RULES["Adam"])
AdamW = _make(_rules.RULES["AdamW"])
Adamax = _make(_rules.RULES["Adamax"])
NAdam = _make(_rules.RULES["NAdam"])
RAdam = _make(_rules.RULES["RAdam"])

OPTIMIZERS: dict[str, type[Optimizer]] = {c.__name__: c for c in (SGD, Adagrad, RMSprop, Adam, AdamW, Adamax,
                                                                    NAdam, RAdam)}
