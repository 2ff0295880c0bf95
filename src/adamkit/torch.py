"""Drop-in ``torch.optim`` replacements: same keywords, defaults, math and ``state_dict``.

``adamkit.torch.AdamW(model.parameters(), lr=1e-3)`` behaves as ``torch.optim.AdamW``: param groups, closures,
``zero_grad``, step and state-dict hooks, LR schedulers, deepcopy and printing come from
:class:`torch.optim.Optimizer`. A ``torch.optim`` checkpoint loads into the adamkit class of the same name and
training continues exactly as it would have; an adamkit checkpoint loads into ``torch.optim``.

The math is the rule of the same name in :mod:`adamkit.rules`. On CPU, float32/float64/bfloat16 tensors step
through compiled, multi-threaded kernels generated from that rule (:mod:`adamkit.kernels`); ``fused=False``
selects the reference path, which runs the rule on whole tensors with torch ops and works on any device.

Differences from torch.optim, all deliberate:

* ``check_finite=True`` (keyword, default): a step whose gradients hold inf or nan raises
  ``FloatingPointError`` naming the parameter, before any parameter or state changes. AMP's ``GradScaler``
  skips such steps itself, so it is unaffected. With ``check_finite=False`` and ``state_precision="int8"``, a
  block of 256 elements whose gradient is not finite keeps its params and 8-bit states (one nan would poison the
  block's scale); the rest of the step is applied and a ``RuntimeWarning`` gives the count.
* ``capturable=True`` and ``differentiable=True`` are refused with ``ValueError``; ``foreach`` is accepted
  and has no effect (adamkit picks its own multi-tensor path).

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
import itertools
import operator
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.optim as _optim

from . import checkpoints as _checkpoints
from . import rules as _rules
from . import states as _states
from ._signature import bind as _bind

_GRAD = operator.attrgetter("grad")

__all__ = ["Optimizer", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "RAdam"]

TORCH_OPS: dict[str, Any] = {"sqrt": torch.sqrt, "maximum": torch.maximum}

# torch.optim group keys that are not part of the math: kept in every group so checkpoints move both ways.
_ENGINE_KEYS = _checkpoints.ENGINE_KEYS


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Optimizer(_optim.Optimizer):
    """Base of the adamkit.torch optimizers: one rule, run by the compiled kernels or the reference path."""

    rule: _rules.Rule
    _signature: inspect.Signature

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        values = _bind(self._signature, self, args, kwargs)
        params = values.pop("params")
        for flag in ("check_finite", "stochastic_rounding"):
            _checkpoints.check_flag(flag, values[flag])
        self.check_finite: bool = bool(values.pop("check_finite"))
        self.stochastic_rounding: bool = bool(values.pop("stochastic_rounding"))
        engine = {k: values.pop(k) for k in _ENGINE_KEYS if k in values}
        defaults = self.rule.hyperparameters(**values)
        defaults.update(engine)
        self._init_engine()
        super().__init__(params, defaults)

    def _init_engine(self) -> None:
        self._reference_update = _rules.bind(self.rule.update, TORCH_OPS)
        self._kernel_plan = None  # the compiled path's cached batches (adamkit._torch_fused)
        self._plan_version = 0
        self._valid_maths: list[dict[str, Any]] = []  # hyperparameter sets already validated (one per group)
        self._rounding_generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(check_finite=self.check_finite, stochastic_rounding=self.stochastic_rounding)
        return state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch.optim's, with the group's hyperparameters and engine options (``fused``, ``state_precision``)
        validated before it is added (the constructor's groups come through here too)."""
        h = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self.rule.validate(self._math(h))
        _checkpoints.check_options(h)
        super().add_param_group(param_group)
        self._plan_version = getattr(self, "_plan_version", 0) + 1
        if self.rule.name == "Adagrad":  # torch.optim.Adagrad creates its state at construction
            group = self.param_groups[-1]
            for p in group["params"]:
                self._init_state(p, group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.check_finite = state.pop("check_finite", getattr(self, "check_finite", True))
        self.stochastic_rounding = state.pop("stochastic_rounding", getattr(self, "stochastic_rounding", False))
        super().__setstate__(state)
        if not hasattr(self, "_reference_update"):
            self._init_engine()
        self._plan_version = getattr(self, "_plan_version", 0) + 1
        self._valid_maths = []
        defaults = {**self.defaults, **_checkpoints.class_defaults(self.rule)}  # torch.optim: the class's defaults
        for group in self.param_groups:
            for k, v in defaults.items():
                group.setdefault(k, v)
            if self.rule.defaults_override:
                group.update(self.rule.defaults_override)

    def _math(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {k: group[k] for k in self.defaults if k not in _ENGINE_KEYS and k in group}

    def _validated_math(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The group's hyperparameters, validated unless they equal values validated before (a step's common
        case: validity depends on the values alone, so equal values need no second check)."""
        h = self._math(group)
        if any(isinstance(v, torch.Tensor) for v in h.values()):
            self.rule.validate(h)  # a tensor value (a tensor lr, say) can change in place: checked every step
        elif h not in self._valid_maths:
            self.rule.validate(h)
            self._valid_maths = [h, *self._valid_maths[:len(self.param_groups) - 1]]
        return h

    def _init_state(self, p: torch.Tensor, group: Mapping[str, Any]) -> bool:
        """Create the state ``group`` needs that ``p`` lacks; return whether the array states were new."""
        state = self.state[p]
        for k, v in self.rule.scalar_states.items():
            if k not in state:
                state[k] = torch.tensor(v, dtype=_scalar_dtype())
        missing = {k: v for k, v in self.rule.states(self._math(group)).items() if k not in state}
        precision = group.get("state_precision")
        for k, v in missing.items():
            # constant initial values: built directly in the stored format, no full-precision temporaries
            if _states.is_quantized(precision, p.numel()) and not p.is_complex():
                signed = k in _states.SIGNED_STATES
                code, scale = _states.constant_code(v, signed)
                state[k] = torch.full(p.shape, code, dtype=torch.int8 if signed else torch.uint8, device=p.device)
                state[f"{k}.absmax"] = torch.full((_states.n_blocks(p.numel()),), scale, dtype=torch.float32,
                                                  device=p.device)
            elif self._low_precision(p, precision):
                state[k] = torch.full_like(p, v, dtype=torch.bfloat16, memory_format=torch.preserve_format)
            else:
                state[k] = torch.full_like(p, v, memory_format=torch.preserve_format)
        return bool(missing)

    @staticmethod
    def _low_precision(p: torch.Tensor, precision: str | None) -> bool:
        """Whether ``p``'s states are stored as bfloat16: bf16 precision (int8 for what cannot be quantized, e.g.
        complex parameters), for tensors of at least MIN_QUANTIZED elements."""
        return precision in ("bf16", "int8") and p.numel() >= _states.MIN_QUANTIZED \
            and p.dtype in (torch.float32, torch.float64)

    def _store_state(self, p: torch.Tensor, state: dict, key: str, values: torch.Tensor,
                     precision: str | None) -> None:
        """Store a state array given in full precision in the group's format (codes + absmax for int8)."""
        state.pop(f"{key}.absmax", None)
        if _states.is_quantized(precision, p.numel()) and not p.is_complex():
            codes, absmax = _states.quantize(values.detach(), key in _states.SIGNED_STATES)
            state[key], state[f"{key}.absmax"] = codes.contiguous(), absmax
        elif self._low_precision(p, precision):
            state[key] = self._bf16_stochastic(values)
        else:
            state[key] = values.to(p.dtype)

    def _bf16_stochastic(self, values: torch.Tensor) -> torch.Tensor:
        """float → bfloat16 with stochastic rounding: add 16 random bits below the kept ones, then truncate
        (unbiased, so small EMA updates survive on average)."""
        bits = values.to(torch.float32).contiguous().view(torch.int32)
        generator = self._rounding_generator if bits.device.type == "cpu" else None
        noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, dtype=torch.int32, device=bits.device)
        rounded = ((bits + noise) >> 16).to(torch.int16).view(torch.bfloat16)
        return torch.where(torch.isnan(values), values.to(torch.bfloat16), rounded)

    def _load_state(self, p: torch.Tensor, state: Mapping[str, Any], key: str) -> torch.Tensor:
        """A state array in the parameter's dtype, whatever its storage."""
        value = state[key]
        if f"{key}.absmax" in state:
            return _states.dequantize(value, state[f"{key}.absmax"], key in _states.SIGNED_STATES, p.dtype)
        return value if value.dtype == p.dtype else value.to(p.dtype)

    # -- the step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (re-evaluating the model first if ``closure`` is given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: list[tuple[dict, list[torch.Tensor], list[torch.Tensor], dict[str, Any]]] = []
        for group in self.param_groups:
            h = self._validated_math(group)
            grads = list(map(_GRAD, group["params"]))  # the one pass that reads .grad
            if any(map(operator.is_, grads, itertools.repeat(None))):
                params = [p for p, g in zip(group["params"], grads) if g is not None]
                grads = [g for g in grads if g is not None]
            else:
                params = group["params"]
            if params:
                work.append((group, params, grads, h))
        from . import _torch_fused  # imported on first step: importing adamkit compiles nothing
        reference, skipped = _torch_fused.step(self, work, self.check_finite)
        for group, p in reference:
            skipped += self._reference_step(group, p)
        if skipped:
            _states.warn_skipped_blocks(self.rule.name, skipped)
        return loss

    def _check_grad(self, gi: int, p: torch.Tensor) -> None:
        g = p.grad
        where = f"{self.rule.name}: parameter of shape {tuple(p.shape)} in group {gi}"
        if g.is_sparse:
            raise RuntimeError(f"{where} has a sparse gradient; adamkit.torch.{self.rule.name} supports dense "
                               f"gradients only (torch.optim.SparseAdam handles sparse ones)")
        if p.is_meta:
            raise RuntimeError(f"{where} is on the meta device: it holds no values to update (materialize the "
                               f"model, e.g. with to_empty(), before stepping)")
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"{where} has dtype {p.dtype}; optimizers need floating or complex parameters")

    def _reference_step(self, group: dict[str, Any], p: torch.Tensor) -> int:
        """Step ``p`` with torch ops; return how many 8-bit blocks were left unchanged (non-finite gradient)."""
        h = self._validated_math(group)
        fresh = self._init_state(p, group)
        state = self.state[p]
        guard = _states.BlockGuard.take(p.detach(), p.grad, state, self.rule.update_states, self.check_finite)
        real = torch.view_as_real if p.is_complex() else (lambda t: t)
        arrays = {k: real(self._load_state(p, state, k)) for k in self.rule.update_states if k in state}
        arrays.update({k: state[k].item() for k in self.rule.scalar_states})
        scalar_dtype = np.float64 if state.get("step", torch.tensor(0.0)).dtype == torch.float64 else np.float32
        theta, new_arrays, scalars = _rules.step_tensor(self.rule, h, real(p), real(p.grad), arrays,
                                                       self._reference_update, fresh, scalar_dtype)
        real(p).copy_(theta)
        for k, v in new_arrays.items():
            if state[k].dtype == p.dtype:
                real(state[k]).copy_(v)
            else:  # low-precision storage: round or quantize the new values
                self._store_state(p, state, k, v, group.get("state_precision"))
        for k, v in scalars.items():
            state[k].fill_(v)
        return guard.restore() if guard else 0

    # -- checkpoints ---------------------------------------------------------------------------------------
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
        for group, own in zip(self.param_groups, engine):
            group.update(own)  # this optimizer's engine options win over the checkpoint's
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        mine = [(p, precision) for g, precision in zip(self.param_groups, precisions) for p in g["params"]]
        for saved_id, (p, precision) in zip(saved_ids, mine):
            self._restore_storage(p, state_dict["state"].get(saved_id, {}), precision)

    def _restore_storage(self, p: torch.Tensor, entry: Mapping[str, Any], precision: str | None) -> None:
        """Store ``p``'s loaded states as this optimizer keeps them (8-bit codes already in its format are kept
        bit for bit)."""
        state = self.state.get(p)
        for k in self.rule.scalar_states:
            if state and k in state and not torch.is_tensor(state[k]):  # a number: the tensor torch.optim keeps
                state[k] = torch.tensor(float(state[k]), dtype=_scalar_dtype())
        for k in self.rule.update_states:
            if not state or k not in state:
                continue
            if f"{k}.absmax" in entry and _states.is_quantized(precision, p.numel()):
                state[k] = entry[k].detach().clone().contiguous()
                state[f"{k}.absmax"] = entry[f"{k}.absmax"].detach().clone().to(torch.float32)
            else:  # stored as this optimizer keeps it, laid out like its parameter
                self._store_state(p, state, k, state[k].contiguous() if p.is_contiguous() else state[k], precision)

    def torch_state_dict(self) -> dict[str, Any]:
        """The state in torch.optim's own format: full-precision states in the parameter's dtype, no adamkit
        keys. ``torch.optim.<Class>.load_state_dict`` takes it; for full-precision states it equals
        :meth:`state_dict`."""
        return _checkpoints.full_precision(self.state_dict(), self.rule, drop_engine_keys=True)


def _make(rule: _rules.Rule) -> type[Optimizer]:
    """The adamkit class for ``rule``, with torch.optim's constructor signature for the class of that name."""
    torch_cls = getattr(_optim, rule.name)
    sig = inspect.signature(torch_cls.__init__)
    params = list(sig.parameters.values())
    if "fused" not in sig.parameters:  # torch has no fused kernel for this class; adamkit does
        params.append(inspect.Parameter("fused", inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=bool | None))
    params.append(inspect.Parameter("check_finite", inspect.Parameter.KEYWORD_ONLY, default=True,
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
