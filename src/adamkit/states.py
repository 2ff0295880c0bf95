"""The 8-bit state format: code maps, quantize and dequantize (which format a state gets, and bfloat16, are
:mod:`adamkit.storage`'s).

``state_precision="int8"`` stores each large state tensor as one 8-bit code per element plus one float32 scale
(the block's absolute maximum) per block of :data:`BLOCK` elements — about 1 byte per element and state instead of
4. The code maps are *dynamic* maps — a small floating-point format relative to the block's absmax, dense near
zero and spanning many orders of magnitude:

* signed states (``exp_avg``, ``grad_avg``, ``momentum_buffer``): sign + 7 bits; code magnitude ``c = 8e + f``
  (``e`` 1…15, ``f`` 0…7) stands for ``absmax · 2^(e−15) · (1 + f/8)``, 0 for zero (smallest non-zero magnitude
  3.4e-5 · absmax);
* non-negative states (``exp_avg_sq``, ``max_exp_avg_sq``, ``exp_inf``, ``sum``, ``square_avg``): 8 bits;
  ``c = 8e + f`` (``e`` 0…31) stands for ``absmax · 2^(e−31) · (1 + f/8)``, code 0 for zero (smallest non-zero
  5.2e-10 · absmax: its square root spans the signed map's range).

Within a binade the codes are 12.5 % apart, so the relative rounding error is at most 6.25 %. Quantization picks the
*nearest* code: adding half a code step to the float32 bits of ``x/absmax`` and truncating rounds to nearest within
and across binades (an exact tie goes to the larger code), and between zero and the smallest code the closer one,
except that a non-negative state that is not zero never stores as code 0 (Adam would divide by √0 + ε). Everything
is integer work on the float's bits, in 32-bit lanes: no table lookups, no transcendental functions. Tensors under
:data:`MIN_QUANTIZED` elements stay in
full precision.

The element functions here are written once, like the rules: the compiled kernels run them on scalars, the
reference path on whole tensors (primitives ``f32_bits``, ``bits_f32``, ``where``, ``minimum``, ``i32`` are bound
per engine).
"""

from __future__ import annotations

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
minimum = np.minimum
maximum = np.maximum
where = np.where


def i32(x):
    """Keep an integer result in 32 bits (bound per engine). NumPy and torch already keep int32 arithmetic in
    int32; numba widens it to int64, which halves the lanes of a vector loop, so the compiled engine casts back."""
    return x


def f32_bits(x):
    """The IEEE bits of float32 ``x`` ≥ 0 as an int32 (bound per engine)."""
    return np.asarray(x, dtype=np.float32).view(np.int32)


def bits_f32(b):
    """The float32 whose IEEE bits are the int32 ``b`` (bound per engine)."""
    return np.asarray(b).astype(np.int32).view(np.float32)


_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
# float32 exponent field of 2^(e-15) is e + 112; of 2^(e-31) is e + 96. Codes are (bits >> 20) minus these × 8.
# Integer constants are int32 scalars so that compiled code does the bit work in 32-bit lanes.
SIGNED_OFFSET = np.int32(112 * 8)
UNSIGNED_OFFSET = np.int32(96 * 8)
SIGNED_MAX = np.int32(120)  # 2^0 · 1.0: the block's absmax itself
UNSIGNED_MAX = np.int32(248)
# half the value of signed code 1: the midpoint between 0 and code 1 (exact, a power of two below a normal float)
SIGNED_MIDPOINT = np.array([(int(SIGNED_OFFSET) + 1) << 20], dtype=np.int32).view(np.float32)[0] / np.float32(2)
_I0, _I1, _SHIFT, _HALF = np.int32(0), np.int32(1), np.int32(20), np.int32(0x80000)
_SIGN = np.int32(-(1 << 31))  # the float32 sign bit as an int32
# half a code step minus the offset, both in the float's bits: one addition before the shift does both
SIGNED_ROUNDING = np.int32(0x80000 - (112 * 8 << 20))
UNSIGNED_ROUNDING = np.int32(0x80000 - (96 * 8 << 20))
SIGNED_BIAS = np.int32(112 * 8 << 20)  # the offset in the float's bits: a code's magnitude << 20 plus this
UNSIGNED_BIAS = np.int32(96 * 8 << 20)


def _code_of(t, rounding):
    """Nearest normal code of ``t`` ∈ [0, 1]: the float's exponent and top 3 mantissa bits, rounded to nearest
    (an exact tie goes to the larger code), ``(bits(t) + 2^19 − 8·offset·2^20) >> 20``; ``rounding`` is
    :data:`SIGNED_ROUNDING` or :data:`UNSIGNED_ROUNDING`. ``t`` ≤ 1 keeps it at most the map's largest code; it
    is ≤ 0 where ``t`` rounds below code 1 (the caller then picks 0 or 1)."""
    return i32(i32(f32_bits(t) + rounding) >> _SHIFT)


def unless_zero(x, c):
    """``x`` where ``c ≠ 0``, else 0, for integers ``c ≥ 0`` (a code's magnitude); one ``vpsignd`` in the
    explicit-vector engine (:mod:`adamkit.vectors`)."""
    return where(c == _I0, _I0, x)


def with_sign_of(c, x):
    """``−c`` where the float ``x < 0``, else ``c``, for codes ``c`` that are 0 where ``x`` is ±0 or nan (so the
    sign bit alone may decide); one ``vpsignd`` by ``x``'s bits in the explicit-vector engine."""
    return where(x < _ZERO, i32(-c), c)


HELPERS = {"_code_of": _code_of, "unless_zero": unless_zero, "with_sign_of": with_sign_of}
"""Functions the element functions call; engines bind them along (an engine may bind its own primitive instead of
``unless_zero`` or ``with_sign_of``: same values, fewer instructions)."""


def dequantize_signed(code, scale):
    """Value of a signed code: ``scale · ±2^(e−15)(1 + f/8)`` with ``|c| = 8e + f``; 0 for code 0. The bits are
    ``(|c| << 20) + 2^20·offset``, with the code's own sign bit."""
    wide = i32(code)
    magnitude = i32(abs(wide))
    bits = i32(i32(magnitude << _SHIFT) + SIGNED_BIAS) | i32(wide & _SIGN)
    return bits_f32(unless_zero(bits, magnitude)) * scale


def dequantize_unsigned(code, scale):
    """Value of a non-negative code: ``scale · 2^(e−31)(1 + f/8)`` with ``c = 8e + f``; 0 for code 0."""
    wide = i32(code)
    return bits_f32(unless_zero(i32(i32(wide << _SHIFT) + UNSIGNED_BIAS), wide)) * scale


def quantize_signed(x, inv_scale):
    """Nearest signed code of ``x`` given ``inv_scale`` = 1/absmax of its block (1 for an all-zero block).
    Non-finite values are contained: ±inf → ±the top code, nan → 0 (``|x|·inv_scale ≥`` the midpoint is False
    for nan)."""
    t = abs(x) * inv_scale
    c = where(t >= SIGNED_MIDPOINT, maximum(_code_of(minimum(t, _ONE), SIGNED_ROUNDING), _I1), _I0)
    return with_sign_of(c, x)  # below code 1: code 1 from the midpoint up, else 0


def quantize_unsigned(x, inv_scale):
    """Nearest non-negative code of ``x``; a positive ``x`` never gets code 0 (``x``, not ``x·inv_scale``, which
    may underflow to 0, decides). Non-finite values are contained: +inf → the top code, −inf and nan → 0."""
    return where(x > _ZERO, maximum(_code_of(minimum(x * inv_scale, _ONE), UNSIGNED_ROUNDING), _I1), _I0)


def inverse_scale(absmax):
    """1/absmax, with 1 for an all-zero block (its finite values are ±0, code 0; +inf takes the top code, worth 0
    at scale 0 like every other code)."""
    return _ONE / where(absmax > _ZERO, absmax, _ONE)


def constant_code(value: float, signed: bool) -> tuple[int, float]:
    """Code and block absmax of a block whose every element equals ``value`` (no temporaries needed)."""
    if value == 0:
        return 0, 0.0
    top = int(SIGNED_MAX if signed else UNSIGNED_MAX)
    return (-top if value < 0 else top), abs(float(value))


def n_blocks(n: int) -> int:
    return -(-n // BLOCK)


def is_quantized(precision: str | None, numel: int) -> bool:
    return precision == "int8" and numel >= MIN_QUANTIZED


def validate_precision(precision: Any) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid state_precision: {precision!r} (must be None, 'bf16' or 'int8')")


def code_values(signed: bool) -> np.ndarray:
    """Every code's value for absmax 1, in code order (−127…127 signed, 0…255 unsigned)."""
    offset = int(SIGNED_OFFSET if signed else UNSIGNED_OFFSET)
    top = int(SIGNED_MAX if signed else UNSIGNED_MAX)
    mags = np.arange(128 if signed else 256)
    values = ((mags + offset).astype(np.uint32) << 20).view(np.float32).astype(np.float64)
    values[0] = 0.0
    values[mags > top] = np.nan  # codes above the absmax are never produced
    return np.concatenate([-values[:0:-1], values]) if signed else values


def exact_nearest_code(x: np.ndarray, absmax: float, signed: bool) -> np.ndarray:
    """Brute-force nearest code (ties to the smaller magnitude); the reference the fast formula is tested against."""
    values = np.nan_to_num(code_values(signed) * absmax, nan=np.inf)
    idx = np.abs(np.asarray(x, dtype=np.float64)[..., None] - values).argmin(axis=-1)
    return idx - 127 if signed else idx




# -- whole-tensor forms (reference path and checkpoints), for NumPy arrays and torch tensors ------------------------

def check_codes(key: str, codes: Any, absmax: Any, numel: int) -> None:
    """Raise ``ValueError`` naming the problem unless ``codes`` and ``absmax`` (NumPy arrays or torch tensors) are
    a well-formed 8-bit state ``key`` of a tensor of ``numel`` elements: int8 codes for signed states, uint8 for
    the others, every code inside its map, one finite non-negative absmax per block. Used on checkpoints before
    anything is loaded (a corrupt scale or code would otherwise become a wrong moment silently)."""
    signed = key in SIGNED_STATES
    kind = "int8" if signed else "uint8"
    if str(getattr(codes, "dtype", "")).replace("torch.", "") != kind:
        raise ValueError(f"state '{key}' has '{key}.absmax', so it must hold {kind} codes; it has dtype "
                         f"{getattr(codes, 'dtype', type(codes).__name__)}")
    scale_dtype = str(getattr(absmax, "dtype", "")).replace("torch.", "")
    if scale_dtype not in ("float32", "float64", "float16", "bfloat16"):
        raise ValueError(f"state '{key}.absmax' must be floating point, got "
                         f"{getattr(absmax, 'dtype', type(absmax).__name__)}")
    shape = tuple(getattr(absmax, "shape", ()))
    if shape != (n_blocks(numel),):  # exactly: a (blocks, 1) array would broadcast block 0's scale over all
        count = int(np.prod(shape))
        raise ValueError(f"state '{key}.absmax' must hold one scale per block of {BLOCK} elements, shape "
                         f"({n_blocks(numel)},); it holds {count}, shape {shape}")
    scales = np.asarray(absmax.detach().cpu().double() if hasattr(absmax, "detach") else absmax, dtype=np.float64)
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise ValueError(f"state '{key}.absmax' must be finite and non-negative (a block's largest magnitude)")
    values = np.asarray(codes.detach().cpu() if hasattr(codes, "detach") else codes)
    top = int(SIGNED_MAX if signed else UNSIGNED_MAX)
    if values.size and max(int(values.max()), -int(values.min())) > top:
        raise ValueError(f"state '{key}' holds codes outside its map (|code| ≤ {top}): not written by adamkit")


def _ops_for(x: Any) -> dict[str, Any]:
    if isinstance(x, np.ndarray):
        return {"f32_bits": f32_bits, "bits_f32": bits_f32, "minimum": np.minimum, "maximum": np.maximum,
                "where": np.where}
    import torch

    def t_where(c, a, b):
        like = c if not torch.is_tensor(a) else a
        a = a if torch.is_tensor(a) else torch.as_tensor(a, dtype=(b.dtype if torch.is_tensor(b) else like.dtype))
        return torch.where(c, a, b)

    return {"f32_bits": lambda x: x.to(torch.float32).view(torch.int32),
            "bits_f32": lambda b: b.to(torch.int32).view(torch.float32),
            "minimum": lambda a, b: torch.minimum(a, torch.as_tensor(b, dtype=a.dtype)),
            "maximum": lambda a, b: torch.maximum(a, torch.as_tensor(b, dtype=a.dtype)),
            "where": t_where}


def _bound(name: str, x: Any):
    from .rules import bind
    return bind(globals()[name], _ops_for(x), helpers=HELPERS)


def _blocks(flat: Any, fill: float = 0.0) -> Any:
    """Reshape a flat array to (blocks, BLOCK), padding the last block."""
    n = flat.shape[0]
    pad = n_blocks(n) * BLOCK - n
    if isinstance(flat, np.ndarray):
        return np.concatenate([flat, np.full(pad, fill, dtype=flat.dtype)]).reshape(-1, BLOCK)
    import torch
    return torch.cat([flat, flat.new_full((pad,), fill)]).reshape(-1, BLOCK)


def _finite_absmax(blocks: Any) -> Any:
    """Each block's absmax over its finite values: one inf or nan then costs its own element (the quantizers
    contain it: ±inf → ±the top code, nan → 0), not the scale of all 256 (an inf or nan absmax would make every
    value of the block nan)."""
    if isinstance(blocks, np.ndarray):
        return np.where(np.isfinite(blocks), np.abs(blocks), 0).max(axis=1)
    import torch
    return torch.where(torch.isfinite(blocks), blocks.abs(), 0).amax(dim=1)


def quantize(values: Any, signed: bool) -> tuple[Any, Any]:
    """Codes (int8 signed / uint8 unsigned, shape of ``values``) and float32 absmax per block of ``values``
    (over finite values: see :func:`_finite_absmax`)."""
    flat = values.reshape(-1)
    blocks = _blocks(flat)
    absmax = _finite_absmax(blocks)
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
        blocks = _blocks(flat.astype(np.int64))
        scale = absmax.astype(np.float64)[:, None]
    else:
        import torch
        blocks = _blocks(flat.to(torch.int64))
        scale = absmax.to(torch.float64)[:, None]
    values = _bound("dequantize_signed" if signed else "dequantize_unsigned", blocks)(blocks, scale)
    values = values.reshape(-1)[:n].reshape(codes.shape)
    return values.astype(dtype) if isinstance(values, np.ndarray) else values.to(dtype)


def nonfinite_blocks(g: Any) -> Any:
    """Which blocks of :data:`BLOCK` elements of ``g`` (flattened) hold inf or nan: one bool per block."""
    flat = g.reshape(-1)
    if isinstance(flat, np.ndarray):
        return ~_blocks(np.isfinite(flat), True).all(axis=1)
    import torch
    return ~_blocks(torch.isfinite(flat), True).all(dim=1)


def warn_skipped_blocks(name: str, count: int) -> None:
    """The warning of a ``check_finite=False`` step that left ``count`` 8-bit blocks unchanged."""
    import warnings
    warnings.warn(f"{name}: {count} block(s) of {BLOCK} elements with 8-bit states had non-finite gradients (inf or "
                  f"nan) and were left unchanged (params and states); the rest of the step was applied. "
                  f"check_finite=True refuses such steps whole.", RuntimeWarning, stacklevel=4)


def restore_blocks(new: Any, old: Any, bad: Any) -> None:
    """Copy ``old`` back into ``new`` (same shape, in place, any strides) over the blocks flagged in ``bad``
    (blocks of the row-major flattening, as :func:`quantize` makes them)."""
    n = int(np.prod(new.shape))
    if isinstance(bad, np.ndarray):
        elements = np.repeat(bad, BLOCK)[:n].reshape(new.shape)
    else:
        import torch
        elements = torch.repeat_interleave(bad, BLOCK)[:n].reshape(new.shape)
    new[elements] = old[elements]


class BlockGuard:
    """Keeps the 8-bit blocks of one parameter whose gradient is not finite as they were (``check_finite=False``):
    take it before the step, :meth:`restore` after it. NumPy arrays and torch tensors alike."""

    def __init__(self, param: Any, state: dict, keys: list[str], bad: Any) -> None:
        copy = (lambda x: x.copy()) if isinstance(param, np.ndarray) else (lambda x: x.clone())
        self.param, self.state, self.keys, self.bad = param, state, keys, bad
        self.kept = {"param": copy(param), **{k: copy(state[k]) for k in keys},
                     **{f"{k}.absmax": copy(state[f"{k}.absmax"]) for k in keys}}

    @classmethod
    def take(cls, param: Any, grad: Any, state: dict, keys: Any, check_finite: bool) -> "BlockGuard | None":
        """A guard when ``param`` has 8-bit states, no finite check ran, and some block's gradient is not finite."""
        quantized = [k for k in keys if f"{k}.absmax" in state]
        if check_finite or not quantized:
            return None
        bad = nonfinite_blocks(grad)
        return cls(param, state, quantized, bad) if bool(bad.any()) else None

    def restore(self) -> int:
        """Put the guarded blocks back (params, codes, absmax); return how many blocks that was."""
        restore_blocks(self.param, self.kept["param"], self.bad)
        for k in self.keys:  # the state's current tensors: the step may have replaced them
            restore_blocks(self.state[k], self.kept[k], self.bad)
            self.state[f"{k}.absmax"][self.bad] = self.kept[f"{k}.absmax"][self.bad]
        return int(self.bad.sum())
