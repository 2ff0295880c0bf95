"""State formats: how an optimizer's moments are stored (full precision, bfloat16, or 8-bit block-wise).

``state_precision="int8"`` stores each large state tensor as one 8-bit code per element plus one float32 scale
(the block's absolute maximum) per block of :data:`BLOCK` elements — about 1 byte per element and state instead of
4. The code maps are *dynamic* (power-law) maps, dense near zero and spanning many orders of magnitude:

* signed states (``exp_avg``, ``grad_avg``, ``momentum_buffer``): code c ∈ [−127, 127] stands for
  ``absmax · sign(c) · (|c|/127)²`` (smallest non-zero magnitude 6.2e-5 · absmax, top step 1.6 %);
* non-negative states (``exp_avg_sq``, ``max_exp_avg_sq``, ``exp_inf``, ``sum``, ``square_avg``): code
  c ∈ [0, 255] stands for ``absmax · (c/255)⁴`` (smallest non-zero 2.3e-10 · absmax, i.e. its square root spans
  the same range as the signed map; top step 1.6 %).

Quantization picks the *nearest* code (not a lookup by the companded value, which would snap small values): the
companded value gives the two neighbouring codes and the closer one in value wins. A non-negative state that is
not zero never stores as code 0 (Adam would divide by √0 + ε). Tensors under :data:`MIN_QUANTIZED` elements stay
in full precision.

The element functions here are written once, like the rules: the compiled kernels run them on scalars, the
reference path on whole tensors (primitives ``sqrt``, ``floor``, ``minimum``, ``maximum``, ``where`` are bound per
engine).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BLOCK = 256
"""Elements per quantization block (one float32 absmax each)."""
MIN_QUANTIZED = 4096
"""Tensors with fewer elements keep full-precision states."""
PRECISIONS = (None, "bf16", "int8")

SIGNED_STATES = frozenset({"exp_avg", "grad_avg", "momentum_buffer"})
"""States that take both signs; every other array state is non-negative."""

# free names, bound per engine (defaults: NumPy)
sqrt = np.sqrt
floor = np.floor
minimum = np.minimum
maximum = np.maximum
where = np.where


# Constants as float32 scalars: in compiled float32 code a Python float literal would promote the math to float64.
_S = np.float32(127.0)
_U = np.float32(255.0)
_INV_S = np.float32(1.0 / 127.0)
_INV_U = np.float32(1.0 / 255.0)
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)


def dequantize_signed(code, scale):
    """Value of a signed code: ``scale · a·|a|`` with ``a = c/127`` (so ``sign(c)·(|c|/127)²``)."""
    a = code * _INV_S
    return a * abs(a) * scale


def dequantize_unsigned(code, scale):
    """Value of a non-negative code: ``scale · (c/255)⁴``."""
    a = code * _INV_U
    a2 = a * a
    return a2 * a2 * scale


def quantize_signed(x, inv_scale):
    """Nearest signed code of ``x`` given ``inv_scale`` = 1/absmax of its block (0 for an all-zero block)."""
    t = minimum(abs(x) * inv_scale, _ONE)
    c0 = minimum(floor(sqrt(t) * _S), _S - _ONE)
    lo = c0 * _INV_S
    hi = (c0 + _ONE) * _INV_S
    c = where(hi * hi - t < t - lo * lo, c0 + _ONE, c0)
    return where(x < _ZERO, -c, c)


def quantize_unsigned(x, inv_scale):
    """Nearest non-negative code of ``x`` ≥ 0; a positive ``x`` never gets code 0."""
    t = minimum(x * inv_scale, _ONE)
    c0 = minimum(floor(sqrt(sqrt(t)) * _U), _U - _ONE)
    lo = c0 * _INV_U
    hi = (c0 + _ONE) * _INV_U
    lo2 = lo * lo
    hi2 = hi * hi
    c = where(hi2 * hi2 - t < t - lo2 * lo2, c0 + _ONE, c0)
    return where((c == _ZERO) & (x > _ZERO), _ONE, c)  # x, not t: x·inv_scale may underflow to 0


def inverse_scale(absmax):
    """1/absmax, with 0 for an all-zero block (every code is then 0)."""
    return where(absmax > _ZERO, _ONE / where(absmax > _ZERO, absmax, _ONE), _ZERO)


def n_blocks(n: int) -> int:
    return -(-n // BLOCK)


def is_quantized(precision: str | None, numel: int) -> bool:
    return precision == "int8" and numel >= MIN_QUANTIZED


def validate_precision(precision: Any) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid state_precision: {precision!r} (must be None, 'bf16' or 'int8')")


def code_values(signed: bool) -> np.ndarray:
    """Every code's value for absmax 1, in code order (for tests and for reading checkpoints by hand)."""
    if signed:
        codes = np.arange(-127, 128, dtype=np.float64)
        return np.sign(codes) * (np.abs(codes) / 127.0) ** 2
    return (np.arange(256, dtype=np.float64) / 255.0) ** 4


def exact_nearest_code(x: np.ndarray, absmax: float, signed: bool) -> np.ndarray:
    """Brute-force nearest code (ties to the smaller magnitude); the reference the fast formula is tested against."""
    values = code_values(signed) * absmax
    idx = np.abs(np.asarray(x, dtype=np.float64)[..., None] - values).argmin(axis=-1)
    return idx - 127 if signed else idx




# -- whole-tensor forms (reference path and checkpoints), for NumPy arrays and torch tensors ------------------------

def _ops_for(x: Any) -> dict[str, Any]:
    if isinstance(x, np.ndarray):
        return {"sqrt": np.sqrt, "floor": np.floor, "minimum": np.minimum, "maximum": np.maximum, "where": np.where}
    import torch
    return {"sqrt": torch.sqrt, "floor": torch.floor, "minimum": lambda a, b: torch.clamp(a, max=b),
            "maximum": lambda a, b: torch.clamp(a, min=b), "where": torch.where}


def _bound(name: str, x: Any):
    from .rules import bind
    return bind(globals()[name], _ops_for(x))


def _blocks(flat: Any, fill: float = 0.0) -> Any:
    """Reshape a flat array to (blocks, BLOCK), padding the last block."""
    n = flat.shape[0]
    pad = n_blocks(n) * BLOCK - n
    if isinstance(flat, np.ndarray):
        return np.concatenate([flat, np.full(pad, fill, dtype=flat.dtype)]).reshape(-1, BLOCK)
    import torch
    return torch.cat([flat, flat.new_full((pad,), fill)]).reshape(-1, BLOCK)


def quantize(values: Any, signed: bool) -> tuple[Any, Any]:
    """Codes (int8 signed / uint8 unsigned, shape of ``values``) and float32 absmax per block of ``values``."""
    flat = values.reshape(-1)
    blocks = _blocks(flat)
    absmax = abs(blocks).max(axis=1) if isinstance(blocks, np.ndarray) else blocks.abs().amax(dim=1)
    inv = _bound("inverse_scale", blocks)(absmax)[:, None]
    codes = _bound("quantize_signed" if signed else "quantize_unsigned", blocks)(blocks, inv)
    codes = codes.reshape(-1)[: flat.shape[0]].reshape(values.shape)
    if isinstance(values, np.ndarray):
        return codes.astype(np.int8 if signed else np.uint8), absmax.astype(np.float32)
    import torch
    return codes.to(torch.int8 if signed else torch.uint8), absmax.to(torch.float32)


def dequantize(codes: Any, absmax: Any, signed: bool, dtype: Any) -> Any:
    """Values of ``codes`` with per-block scales ``absmax``, as ``dtype`` (shape of ``codes``)."""
    flat = codes.reshape(-1)
    n = flat.shape[0]
    if isinstance(codes, np.ndarray):
        blocks = _blocks(flat.astype(np.float64))
        scale = absmax.astype(np.float64)[:, None]
    else:
        import torch
        blocks = _blocks(flat.to(torch.float64))
        scale = absmax.to(torch.float64)[:, None]
    values = _bound("dequantize_signed" if signed else "dequantize_unsigned", blocks)(blocks, scale)
    values = values.reshape(-1)[:n].reshape(codes.shape)
    return values.astype(dtype) if isinstance(values, np.ndarray) else values.to(dtype)
