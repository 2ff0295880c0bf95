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
import itertools
import operator
import weakref
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.optim as _optim
from torch.optim.optimizer import _device_dtype_check_for_fused, _get_capturable_supported_devices

from . import checkpoints as _checkpoints
from . import rules as _rules
from . import states as _states
from . import _tensors
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
        adam = type(self).__name__ in ("Adam", "AdamW")  # torch.optim.Adam's constructor checks more
        _check_tensor_lr(values.get("lr"), engine if adam else {})
        defaults = self.rule.hyperparameters(**values)
        if adam:  # after the ranges, as there
            _check_tensor_betas(values.get("betas", defaults["betas"]), engine)
        defaults.update(engine)
        self._init_engine()
        super().__init__(params, defaults)
        self.state = _tensors.TrackedState.of(self.state)
        # torch's fused protocol with AMP: GradScaler hands grad_scale and found_inf to step() (see _amp_step_skipped)
        self._step_supports_amp_scaling = self.defaults.get("fused") is True

    def _init_engine(self) -> None:
        self._handle = id(self)  # how the torch.compile operator finds this optimizer
        _COMPILED_STEPS[self._handle] = self
        self._reference_update = _rules.bind(self.rule.update, TORCH_OPS)
        self._kernel_plan = None  # the compiled path's cached batches (adamkit._torch_fused)
        self._plan_version = 0

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
        if self.rule.states_at_construction:  # torch.optim.Adagrad creates its state here
            group = self.param_groups[-1]
            for p in group["params"]:
                self._init_state(p, group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "state" in state:  # torch.optim's load_state_dict sets a plain defaultdict: track its mutations
            state["state"] = _tensors.TrackedState.of(state["state"])
        self.check_finite = state.pop("check_finite", getattr(self, "check_finite", False))
        self.stochastic_rounding = state.pop("stochastic_rounding", getattr(self, "stochastic_rounding", False))
        super().__setstate__(state)
        if not hasattr(self, "_reference_update"):
            self._init_engine()
        self._plan_version = getattr(self, "_plan_version", 0) + 1
        defaults = {**self.defaults, **_checkpoints.class_defaults(self.rule)}  # torch.optim: the class's defaults
        for group in self.param_groups:
            for k, v in defaults.items():
                group.setdefault(k, v)
            if self.rule.defaults_override:
                group.update(self.rule.defaults_override)

    def _math(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {k: group[k] for k in self.defaults if k not in _ENGINE_KEYS and k in group}

    def _init_state(self, p: torch.Tensor, group: Mapping[str, Any]) -> bool:
        """Create the state ``group`` needs that ``p`` lacks, and bring scalar states to torch's form (a number
        from an old checkpoint, or a tensor of another dtype, becomes a float tensor as torch.optim makes it);
        return whether the array states were new. Call :meth:`_validate_state` first."""
        missing = {k: v for k, v in self.rule.states(self._math(group)).items() if k not in self.state.get(p, ())}
        if not missing and not self.rule.scalar_states:
            return False  # nothing to keep (SGD without momentum): no empty entry, as torch.optim
        state = self.state[p]
        self._canonical_scalars(state, create=True)
        precision = group.get("state_precision")
        for k, v in missing.items():
            # constant initial values: built directly in the stored format, no full-precision temporaries
            if _states.is_quantized(precision, p.numel()) and not p.is_complex():
                # codes laid out like the parameter (a DTensor's: same mesh and placements); one scale per block
                # of the local shard, a plain tensor of this rank (blocks never straddle two ranks)
                signed = k in _states.SIGNED_STATES
                code, scale = _states.constant_code(v, signed)
                state[k] = torch.full_like(p, code, dtype=torch.int8 if signed else torch.uint8,
                                           memory_format=torch.contiguous_format)
                state[f"{k}.absmax"] = torch.full((_states.n_blocks(_tensors.local_numel(p)),), scale,
                                                  dtype=torch.float32, device=p.device)
            elif self._low_precision(p, precision):
                state[k] = torch.full_like(p, v, dtype=torch.bfloat16, memory_format=torch.preserve_format)
            else:  # a complex parameter steps like its view_as_real: both parts start at v
                state[k] = torch.full_like(p, complex(v, v) if p.is_complex() else v,
                                           memory_format=torch.preserve_format)
        return bool(missing)

    def _canonical_scalars(self, state: dict, create: bool = False) -> None:
        """Scalar states (``step``, ``mu_product``) as the float tensors torch.optim keeps (a number from an old
        checkpoint, or a tensor of another dtype or shape, is converted; ``create``: missing ones are made)."""
        for k, v in self.rule.scalar_states.items():
            if k not in state and not create:
                continue
            value = state.get(k, v)
            if not (type(value) is torch.Tensor and value.dtype in (torch.float32, torch.float64)
                    and value.numel() == 1 and value.is_cpu and value.is_contiguous()):
                value = float(value.item() if torch.is_tensor(value) else value)
                state[k] = torch.tensor(value, dtype=_scalar_dtype())

    def _validate_state(self, gi: int, p: torch.Tensor) -> None:
        """Raise a clear error, before anything changes, if ``p``'s existing state cannot be stepped: a state
        tensor replaced by one of another dtype, size, device or kind (or the parameter converted after the state
        was made, e.g. by ``model.double()``), or a scalar state (``step``) that is not a finite number >= 0."""
        state = self.state.get(p)
        if not state:
            return
        where = f"{self.rule.name}: parameter of shape {tuple(p.shape)} in group {gi}"
        for k in self.rule.scalar_states:
            if k in state:
                _checkpoints.check_scalar(where, k, state[k])
        local = _tensors.local_view(p)
        if local is None:
            return  # a fake or functional tensor: torch ops check it
        for s in self.rule.update_states:
            if s in state:
                kind = _tensors.kind_of(state, s, p)
                _tensors.check_state_tensor(s, where, state[s], local, kind, s in _states.SIGNED_STATES)
                if kind == "q8":
                    scales = state[f"{s}.absmax"]
                    if not (type(scales) in (torch.Tensor,) and scales.dtype == torch.float32
                            and scales.shape == (_states.n_blocks(local.numel()),) and scales.is_contiguous()
                            and scales.device == local.device):
                        raise RuntimeError(f"{where}: state '{s}.absmax' must be a contiguous float32 tensor of "
                                           f"shape ({_states.n_blocks(local.numel())},) on {local.device}")

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
            scales = []

            def quantize(local: torch.Tensor) -> torch.Tensor:
                codes, absmax = _states.quantize(local.detach(), key in _states.SIGNED_STATES)
                scales.append(absmax)
                return codes.contiguous()
            state[key] = _tensors.on_local(quantize, values)
            state[f"{key}.absmax"] = scales[0]
        elif self._low_precision(p, precision):
            state[key] = _tensors.on_local(self._bf16_stochastic, values)
        else:
            state[key] = values.to(p.dtype)

    def _bf16_stochastic(self, values: torch.Tensor) -> torch.Tensor:
        """float → bfloat16 with stochastic rounding: add 16 random bits below the kept ones, then truncate
        (unbiased, so small EMA updates survive on average). Values that are bfloat16 already (a bf16 checkpoint
        being loaded) are kept as they are, and draw nothing from the rounding stream."""
        nearest = values.to(torch.bfloat16)
        if torch.equal(nearest.to(values.dtype), values):
            return nearest
        bits = values.to(torch.float32).contiguous().view(torch.int32)
        generator = torch.Generator().manual_seed(self._rounding_seed()) if bits.device.type == "cpu" else None
        noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, dtype=torch.int32, device=bits.device)
        rounded = ((bits + noise) >> 16).to(torch.int16).view(torch.bfloat16)
        return torch.where(torch.isnan(values), values.to(torch.bfloat16), rounded)

    def _rounding_seed(self) -> int:
        """The next seed of the stochastic-rounding stream: a hash of the stream's key and how many seeds were drawn.
        Both live in the first param group (``group[ROUNDING] = [key, draws]``) and so in the state dict, where
        torch.distributed.checkpoint keeps them too: a resumed run rounds exactly as an uninterrupted one. The
        entry appears with the first rounding (bf16 states or ``stochastic_rounding``); the key comes from
        torch's global generator, so ``torch.manual_seed`` fixes it."""
        stream = self.param_groups[0].setdefault(ROUNDING, [int(torch.randint(0, 2 ** 62, ())), 0])
        draw = stream[1]
        stream[1] = draw + 1
        return _splitmix64(int(stream[0]) ^ (draw * 0x9E3779B97F4A7C15 % 2 ** 64)) % 2 ** 62

    def _load_state(self, p: torch.Tensor, state: Mapping[str, Any], key: str) -> torch.Tensor:
        """A state array in the parameter's dtype, whatever its storage."""
        value = state[key]
        if f"{key}.absmax" in state:
            return _tensors.on_local(lambda codes: _states.dequantize(
                codes, state[f"{key}.absmax"], key in _states.SIGNED_STATES, p.dtype), value)
        return value if value.dtype == p.dtype else value.to(p.dtype)

    # -- the step ------------------------------------------------------------------------------------------
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
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            states = [v for p in params for v in self.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
            _step_operator(params, [p.grad for p in params], states, self._handle)
            return loss
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable"))):
            self._step()
        return loss

    def _step(self) -> None:
        work: list[tuple[dict, list[torch.Tensor], list[torch.Tensor], dict[str, Any]]] = []
        for group in self.param_groups:
            grads = list(map(_GRAD, group["params"]))  # the one pass that reads .grad
            if any(map(operator.is_, grads, itertools.repeat(None))):
                params = [p for p, g in zip(group["params"], grads) if g is not None]
                grads = [g for g in grads if g is not None]
            else:
                params = group["params"]
            if params:
                work.append((group, params, grads, self._math(group)))
        if self._amp_step_skipped(work):
            return
        if all(w[0].get("fused") is False or w[0].get("differentiable") for w in work):
            reference, skipped = self._reference_only(work), 0  # torch ops only: no compiled module imported
        else:
            reference, skipped = _torch_fused_module().step(self, work, self.check_finite)
        for group, p in reference:
            skipped += self._reference_step(group, p)
        if skipped:
            _states.warn_skipped_blocks(self.rule.name, skipped)

    def _usable_math(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The group's hyperparameters, after a dry run of the step's coefficients: like torch.optim, a step takes
        whatever values a scheduler wrote, but one the math cannot use at all (a two-element lr, a beta that makes
        a bias correction negative) is refused here, before any parameter changes, instead of half-way."""
        h = self._math(group)
        try:
            coefficients, _ = _rules.step_coefficients(self.rule, h, self.rule.scalar_states)
            for value in coefficients.values():
                float(value)  # a real number (a complex one means a negative bias correction)
        except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
            gi = next(i for i, g in enumerate(self.param_groups) if g is group)
            raise ValueError(f"{self.rule.name}: the hyperparameters of group {gi} cannot make a step ({e}); no "
                             f"parameter or state was changed") from None
        return h

    def _check_reference(self, pairs: list[tuple[dict, torch.Tensor]], work: list) -> None:
        """Check every (group, parameter) the reference path will step, before anything changes."""
        index = {id(w[0]): gi for gi, w in enumerate(work)}
        for group in {id(g): g for g, _ in pairs}.values():
            self._usable_math(group)
        for group, p in pairs:
            self._check_grad(index[id(group)], p)
            self._validate_state(index[id(group)], p)

    def _reference_only(self, work: list) -> list[tuple[dict, torch.Tensor]]:
        """The (group, parameter) pairs of a step that the kernels take no part in, checked."""
        pairs = [(group, p) for group, params, _, _ in work for p in params]
        self._check_reference(pairs, work)
        if self.check_finite:
            dtensor = next((p for _, p in pairs if _tensors.is_dtensor(p)), None)
            _tensors.refuse_nonfinite(self.rule.name, _tensors.nonfinite_gradients([p for _, p in pairs]), dtensor)
        return pairs

    def _amp_step_skipped(self, work: list) -> bool:
        """torch's fused protocol with AMP (``_step_supports_amp_scaling``): ``GradScaler`` sets ``grad_scale``
        and ``found_inf`` on the optimizer instead of unscaling; skip the step if an inf was found, else unscale
        the gradients in place (as torch's fused kernels do) and step."""
        if not getattr(self, "_step_supports_amp_scaling", False):
            return False
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        if found_inf is not None and bool(found_inf.ne(0).any()):
            return True
        if grad_scale is not None:
            grads = [g for _, _, gs, _ in work for g in gs]
            torch._foreach_div_(grads, grad_scale.to(grads[0].device) if grads else grad_scale)
        return False

    def _check_grad(self, gi: int, p: torch.Tensor) -> None:
        """Raise a clear error, before anything changes, for a gradient no path can step with its parameter."""
        g = p.grad
        where = f"{self.rule.name}: parameter of shape {tuple(p.shape)} in group {gi}"
        group = self.param_groups[gi] if 0 <= gi < len(self.param_groups) else {}
        if group.get("capturable") and p.device.type not in _get_capturable_supported_devices():
            raise AssertionError(f"If capturable=True, params and state_steps must be on supported devices: "
                                 f"{_get_capturable_supported_devices()}. ({where})")
        if group.get("fused") is True:
            try:
                _device_dtype_check_for_fused(p)
            except RuntimeError as e:
                raise RuntimeError(f"{e} ({where})") from None
        if g.is_sparse:
            if not self.rule.sparse_gradients:
                raise RuntimeError(_SPARSE_ERRORS.get(self.rule.name, f"{self.rule.name} does not support sparse "
                                                                      f"gradients") + f" ({where})")
            if group.get("fused") is True:
                raise RuntimeError(f"`fused` does not support sparse gradients ({where})")
            if not self.rule.sparse_weight_decay and float(group.get("weight_decay", 0)) != 0:
                raise RuntimeError(f"weight_decay option is not compatible with sparse gradients ({where})")
            return
        if p.is_meta:
            raise RuntimeError(f"{where} is on the meta device: it holds no values to update (materialize the "
                               f"model, e.g. with to_empty(), before stepping)")
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"{where} has dtype {p.dtype}; optimizers need floating or complex parameters")
        if g.dtype != p.dtype:
            raise TypeError(f"{self.rule.name}: the gradient of a parameter of shape {tuple(p.shape)} has dtype "
                            f"{g.dtype}, the parameter {p.dtype}; they must match (as in torch.optim); no parameter "
                            f"or state was changed")
        if g.shape != p.shape or g.device != p.device:
            raise RuntimeError(f"{where}: its gradient has shape {tuple(g.shape)} on {g.device}; it must have the "
                               f"parameter's shape and device (was p.grad.data reassigned?); no parameter or state "
                               f"was changed")

    def _reference_step(self, group: dict[str, Any], p: torch.Tensor) -> int:
        """Step ``p`` with torch ops; return how many 8-bit blocks were left unchanged (non-finite gradient)."""
        h = self._math(group)
        fresh = self._init_state(p, group)
        state = self.state[p] if p in self.state else {}  # SGD without momentum keeps no entry
        grad = p.grad.to_dense() if p.grad.is_sparse else p.grad  # torch's sparse math, on the entries present
        guard = _states.BlockGuard.take(p.detach(), grad, state, self.rule.update_states, self.check_finite)
        real = torch.view_as_real if p.is_complex() else (lambda t: t)
        if group.get("fused") is True and p.dtype in (torch.float16, torch.bfloat16):
            real = lambda t: t.to(torch.float32)  # noqa: E731 - torch's fused kernels: math in float32
        if torch.is_grad_enabled():  # differentiable: the graph keeps the old values; the tensors are updated in place
            plain = real
            real = lambda t: plain(t).clone()  # noqa: E731
        arrays = {k: real(self._load_state(p, state, k)) for k in self.rule.update_states if k in state}
        arrays.update({k: state[k].item() for k in self.rule.scalar_states})
        scalar_dtype = np.float64 if state.get("step", torch.tensor(0.0)).dtype == torch.float64 else np.float32
        theta, new_arrays, scalars = _rules.step_tensor(self.rule, h, real(p), real(grad), arrays,
                                                       self._reference_update, fresh, scalar_dtype)
        (torch.view_as_real(p) if p.is_complex() else p).copy_(theta)
        for k, v in new_arrays.items():
            if state[k].dtype == p.dtype:
                (torch.view_as_real(state[k]) if p.is_complex() else state[k]).copy_(v)
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
        if state:
            self._canonical_scalars(state)
        for k in self.rule.update_states:
            if not state or k not in state:
                continue
            if f"{k}.absmax" in entry and _states.is_quantized(precision, p.numel()):
                state[k] = entry[k].detach().clone().contiguous()
                state[f"{k}.absmax"] = entry[f"{k}.absmax"].detach().clone().to(torch.float32)
            else:  # stored as this optimizer keeps it, laid out like its parameter
                self._store_state(p, state, k, state[k].contiguous() if p.is_contiguous() else state[k], precision)

    def state_dict(self) -> dict[str, Any]:
        """As torch.optim's: per-parameter states as plain dicts (``torch.load(weights_only=True)`` reads them)."""
        out = super().state_dict()
        out["state"] = {k: _distributable(dict(v)) if isinstance(v, dict) else v for k, v in out["state"].items()}
        return out

    def torch_state_dict(self) -> dict[str, Any]:
        """The state in torch.optim's own format: full-precision states in the parameter's dtype, no adamkit
        keys. ``torch.optim.<Class>.load_state_dict`` takes it; for full-precision states it equals
        :meth:`state_dict`."""
        out = _checkpoints.full_precision(self.state_dict(), self.rule, drop_engine_keys=True)
        for group in out["param_groups"]:
            group.pop(ROUNDING, None)
        return out


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


ROUNDING = "stochastic_rounding_stream"
"""The key, in the first param group, of the stochastic-rounding stream: [its key, seeds drawn so far]."""


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) % 2 ** 64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2 ** 64
    return x ^ (x >> 31)


_SPARSE_ERRORS = {"Adam": "Adam does not support sparse gradients, please consider SparseAdam instead",
                  "AdamW": "Adam does not support sparse gradients, please consider SparseAdam instead"}
"""torch.optim's words where they are not '<Class> does not support sparse gradients'."""


def _distributable(entry: dict[str, Any]) -> dict[str, Any]:
    """A state entry whose 8-bit states of a DTensor parameter are dequantized into float32 DTensors (scales are
    per rank and would not survive resharding; the codes come back bit for bit when loaded at the same sharding)."""
    for k in [k for k in entry if f"{k}.absmax" in entry and _tensors.is_dtensor(entry[k])]:
        absmax = entry.pop(f"{k}.absmax")
        entry[k] = _tensors.on_local(lambda codes: _states.dequantize(codes, absmax, k in _states.SIGNED_STATES,
                                                                       torch.float32), entry[k])
    return entry



_COMPILED_STEPS: "weakref.WeakValueDictionary[int, Optimizer]" = weakref.WeakValueDictionary()


@torch.library.custom_op("adamkit::step", mutates_args=("params", "states"))
def _step_operator(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[torch.Tensor],
                   handle: int) -> None:
    """``opt.step()`` as one operator for torch.compile: it updates ``params`` and ``states`` in place (the
    optimizer's own step, run eagerly), so dynamo traces no Python of the step and breaks no graph."""
    optimizer = _COMPILED_STEPS[handle]
    with torch.set_grad_enabled(bool(optimizer.defaults.get("differentiable"))):
        optimizer._step()


@_step_operator.register_fake
def _(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[torch.Tensor], handle: int) -> None:
    return None


def _torch_fused_module():
    from . import _torch_fused  # imported when first needed: importing adamkit compiles nothing
    return _torch_fused


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
