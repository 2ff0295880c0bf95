"""How each state array is stored, for every engine: the one place that decides a state's format, creates it,
stores new values into it and loads it back, and the one stochastic-rounding function.

A state is stored in one of three formats:

* ``"plain"``: like its parameter (torch.optim's format);
* ``"bf16"``: bfloat16, 2 bytes (a torch bfloat16 tensor; NumPy, which has no bfloat16, holds its bits in uint16);
* ``"int8"``: one 8-bit code per element and one float32 scale per block of 256, under ``"<state>.absmax"``
  (:mod:`adamkit.states` defines the codes).

:func:`format_for` decides it from the optimizer's ``state_precision``; :func:`format_of` reads it back from a
state dict. Engines reach their arrays through a small protocol, :class:`ArrayOps`: :data:`NUMPY` here, and the
torch engine's in :mod:`adamkit.torch`.

**Stochastic rounding.** A float32 value ``x`` rounds to bfloat16 as ``(bits(x) + r) >> 16`` with 16 random bits
``r``: up with probability equal to the distance from the value below, so the rounding is unbiased and small EMA
updates survive on average (round to nearest even uses ``r = 0x7FFF + lsb``). The random bits are a counter-based
hash of (step seed, tensor, value, element), the same on every path, so the NumPy engine, the torch reference path
and the compiled kernels round to the same bits:

* a step draws one seed from the optimizer's rounding stream (:func:`next_seed`);
* tensor ``t`` (its position among the optimizer's parameters) numbers the values it rounds stochastically
  ``0, 1, …`` (the parameter first if it is rounded, then its states in the rule's order; at most 4), and takes
  the key ``stream_keys(seed, [t])``;
* element ``i`` gets one 32-bit hash ``random32(key, i)``, which serves all its values (:func:`value_bits`): the
  first takes its low 16 bits, the second the high 16 bits, a third and a fourth the high 16 bits of the hash
  times an odd constant. Each value's bits are uniform and unbiased on their own, and one hash per element is
  what keeps stochastic rounding about as fast as rounding to nearest.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from . import states as _states

FORMATS = ("plain", "bf16", "int8")
"""How a state is stored: like its parameter, bfloat16, or 8-bit block-wise."""

ROUNDING = "stochastic_rounding_stream"
"""The key, in the first param group, of the stochastic-rounding stream: [its key, seeds drawn so far]."""

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_NAN_BF16 = 0x7FC0


# -- which format ----------------------------------------------------------------------------------------------

def format_for(precision: str | None, numel: int, dtype: str) -> str:
    """The format of the states of a parameter of ``numel`` elements and dtype ``dtype`` (a name, e.g.
    ``"float32"``) under ``state_precision=precision``: 8-bit for real floating parameters with int8 precision;
    bfloat16 for float32/float64 parameters with bf16 precision (and, with int8, for those 8 bits cannot hold,
    e.g. complex ones); like the parameter for tensors under :data:`states.MIN_QUANTIZED` elements."""
    if precision not in ("bf16", "int8") or numel < _states.MIN_QUANTIZED:
        return "plain"
    if precision == "int8" and "float" in dtype:
        return "int8"
    return "bf16" if dtype in ("float32", "float64") else "plain"


def format_of(state: dict, key: str, param_dtype: str, stored_dtype: str) -> str:
    """The format state ``key`` is stored in (``stored_dtype``: its array's dtype name)."""
    if f"{key}.absmax" in state:
        return "int8"
    if stored_dtype in ("bfloat16", "uint16") and param_dtype != stored_dtype:
        return "bf16"
    return "plain"


# -- the array protocol the engines implement --------------------------------------------------------------------

class ArrayOps(Protocol):
    """What storage needs from an engine's arrays (NumPy arrays, torch tensors)."""

    def dtype_name(self, x: Any) -> str:
        """``x``'s dtype as a name (``"float32"``, ``"bfloat16"``, ``"uint16"``, ...)."""

    def full_like(self, like: Any, value: Any, dtype: str | None = None) -> Any:
        """An array shaped like ``like`` filled with ``value``, of dtype ``dtype`` (a name; None: ``like``'s)."""

    def blocks_of(self, like: Any, value: float) -> Any:
        """One float32 ``value`` per 8-bit block of ``like`` (of a DTensor: of its local shard)."""

    def float32_bits(self, x: Any) -> Any:
        """The IEEE bits of ``x`` as float32, in int64 (0 … 2^32 − 1)."""

    def from_bf16_bits(self, bits: Any, like: Any) -> Any:
        """Stored bfloat16 from its bits (int64, 0 … 65535), shaped like ``like``."""

    def bf16_value(self, x: Any, dtype: Any) -> Any:
        """Stored bfloat16 ``x`` as values of ``dtype``."""

    def index(self, n: int, like: Any) -> Any:
        """0 … n − 1 as int64, where ``like`` lives."""

    def cast(self, x: Any, dtype: Any) -> Any:
        """``x`` as ``dtype`` (itself if it already is)."""


class NumpyOps:
    """:class:`ArrayOps` for NumPy arrays (bfloat16 as its bits in uint16)."""

    def dtype_name(self, x: np.ndarray) -> str:
        return str(x.dtype)

    def full_like(self, like: np.ndarray, value: Any, dtype: str | None = None) -> np.ndarray:
        if dtype == "bfloat16":
            value, dtype = bf16_nearest_bits(value), "uint16"
        return np.full(like.shape, value, dtype=dtype or like.dtype)

    def blocks_of(self, like: np.ndarray, value: float) -> np.ndarray:
        return np.full(_states.n_blocks(like.size), value, dtype=np.float32)

    def float32_bits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.int64)

    def from_bf16_bits(self, bits: np.ndarray, like: np.ndarray) -> np.ndarray:
        return bits.astype(np.uint16).reshape(like.shape)

    def bf16_value(self, x: np.ndarray, dtype: Any) -> np.ndarray:
        return (x.astype(np.uint32) << 16).view(np.float32).astype(dtype)

    def index(self, n: int, like: np.ndarray) -> np.ndarray:
        return np.arange(n, dtype=np.int64)

    def cast(self, x: np.ndarray, dtype: Any) -> np.ndarray:
        return np.asarray(x, dtype=dtype)


NUMPY = NumpyOps()


def bf16_nearest_bits(value: float) -> int:
    """The bfloat16 bits of a number, rounded to nearest even."""
    return int(bf16_bits(NUMPY, np.array([value], dtype=np.float32), None)[0])


# -- creating, storing and loading ------------------------------------------------------------------------------

def create(ops: ArrayOps, state: dict, key: str, like: Any, value: float, fmt: str) -> None:
    """Make state ``key`` of parameter ``like`` with every element ``value``, directly in format ``fmt`` (no
    full-precision temporary). A complex parameter steps like its real view: both parts start at ``value``."""
    if fmt == "int8":
        code, scale = _states.constant_code(value, key in _states.SIGNED_STATES)
        state[key] = ops.full_like(like, code, "int8" if key in _states.SIGNED_STATES else "uint8")
        state[f"{key}.absmax"] = ops.blocks_of(like, scale)
    elif fmt == "bf16":
        state[key] = ops.full_like(like, value, "bfloat16")
    else:
        state[key] = ops.full_like(like, complex(value, value) if "complex" in ops.dtype_name(like) else value)


def store(ops: ArrayOps, state: dict, key: str, values: Any, fmt: str, noise: Any = None) -> None:
    """Store full-precision ``values`` as state ``key`` in format ``fmt``: quantized, rounded to bfloat16 (with
    16-bit ``noise`` per element: stochastic; None: to nearest even), or as they are."""
    state.pop(f"{key}.absmax", None)
    if fmt == "int8":
        state[key], state[f"{key}.absmax"] = _states.quantize(values, key in _states.SIGNED_STATES)
    elif fmt == "bf16":
        state[key] = ops.from_bf16_bits(bf16_bits(ops, values, noise), values)
    else:
        state[key] = values


def load(ops: ArrayOps, state: dict, key: str, dtype: Any) -> Any:
    """State ``key`` in full precision as ``dtype``, whatever its format."""
    value = state[key]
    if f"{key}.absmax" in state:
        return _states.dequantize(value, state[f"{key}.absmax"], key in _states.SIGNED_STATES, dtype)
    if ops.dtype_name(value) in ("bfloat16", "uint16"):
        return ops.bf16_value(value, dtype)
    return ops.cast(value, dtype)


def bf16_bits(ops: ArrayOps, values: Any, noise: Any) -> Any:
    """The bfloat16 bits (int64, 0…65535) of ``values``: ``(bits + noise) >> 16``, with round to nearest even's
    ``0x7FFF + lsb`` for ``noise=None``; nan becomes the quiet nan 0x7FC0 (as the kernels store it)."""
    bits = ops.float32_bits(values)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1) if noise is None else noise)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return rounded * ~nan + _NAN_BF16 * nan


# -- the random bits of stochastic rounding ----------------------------------------------------------------------

def _splitmix64(x: Any) -> Any:
    """The splitmix64 finalizer on uint64 values (Python ints or NumPy uint64 arrays)."""
    if isinstance(x, int):
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _M64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _M64
        return x ^ (x >> 31)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


STREAM_KEY = 0
"""The key a rounding stream starts with. A fixed key, not one drawn from a generator: the step is then a function
of the parameters, gradients, states and step count alone, so replicas of a model on several processes (DDP, a
Replicate DTensor) round alike and stay equal whatever each process's generator holds."""


def next_seed(first_group: dict) -> int:
    """The next seed of the optimizer's rounding stream: a hash of the stream's key and how many seeds were drawn.
    Both live in the first param group (``group[ROUNDING] = [key, draws]``), and so in the state dict: a resumed
    run rounds exactly as an uninterrupted one. The entry appears with the first rounding, with the key
    :data:`STREAM_KEY`; setting ``group[ROUNDING] = [key, 0]`` before that picks another stream."""
    stream = open_stream(first_group)
    draw = int(stream[1])
    stream[1] = draw + 1
    return _splitmix64((int(stream[0]) ^ (draw * 0x9E3779B97F4A7C15)) & _M64) % 2 ** 62


def open_stream(first_group: dict) -> list:
    """The optimizer's rounding stream ``[key, draws]``, made (key :data:`STREAM_KEY`, no draws) if absent. An
    optimizer whose states exist before its first step (torch.optim.Adagrad's) opens it then, so that a fresh one
    has the entry a checkpoint restores (DCP loads only the keys the loader already has)."""
    stream = first_group.get(ROUNDING)
    if stream is None:
        stream = first_group[ROUNDING] = [STREAM_KEY, 0]
    return stream


SPREAD = (0x9E3779B1, 0x85EBCA77)
"""Odd multipliers that give a tensor's third and fourth rounded values their bits (see :func:`value_bits`)."""


def stream_keys(seed: int, tensors: Sequence[int] | np.ndarray) -> np.ndarray:
    """The 32-bit key (uint32, one per tensor) of each tensor's rounding noise in the step with ``seed``."""
    t = np.asarray(tensors, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return (_splitmix64(np.uint64(seed) ^ (t * np.uint64(0x9E3779B97F4A7C15))) & np.uint64(_M32)).astype(np.uint32)


HASH_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
HASH_SHIFT = 15
"""The two odd multipliers of :func:`random32` and the xor-shift between them."""


def random32(key: int, index: Any) -> Any:
    """32 random bits for each element ``index`` (int64 array) under ``key``: the index's low 32 bits plus the key
    (mod 2^32), times an odd constant, xor-shifted right by 15, times another (the two multiplications of Wellons'
    lowbias32). A bijection of ``index + key``, so under a uniform key every element's bits are uniform. The tests
    hold the statistics: half-words uniform; the halves, two keys, and elements 1, 2, 16 and 256 apart
    uncorrelated. lowbias32's outer xor-shifts and an xor with the key instead of the sum cost 6 % and 9 % of an
    AVX2 bf16-state kernel more, for nothing those tests see. Integer ops on int64 arrays of NumPy or torch,
    masked to 32 bits; the kernels emit the same hash in 32-bit lanes (:func:`adamkit.kernels.random32`)."""
    v = (((index + int(key)) & _M32) * HASH_MULTIPLIERS[0]) & _M32
    return ((v ^ (v >> HASH_SHIFT)) * HASH_MULTIPLIERS[1]) & _M32


def value_bits(bits: Any, value: int) -> Any:
    """The 16 random bits of a tensor's rounded value number ``value`` (0…3), from its element's hash ``bits``:
    the low half, the high half, then the high half of the hash times an odd constant of :data:`SPREAD` (a
    bijection of the hash, so each value's bits are uniform on their own)."""
    if value < 2:
        return bits & 0xFFFF if value == 0 else bits >> 16
    return ((bits * SPREAD[value - 2]) & _M32) >> 16


def noise(ops: ArrayOps, key: int, value: int, like: Any) -> Any:
    """The 16 random bits per element of a tensor's rounded value number ``value``, given the tensor's key
    (:func:`stream_keys`); ``like``'s elements are numbered in row-major order."""
    return value_bits(random32(int(key), ops.index(_numel(like), like)), value).reshape(tuple(like.shape))


def _numel(x: Any) -> int:
    return int(np.prod(tuple(x.shape), dtype=np.int64))


def rounded_values(state_formats: Sequence[str | None], bf16_param: bool = False,
                   stochastic: bool = False) -> list[int]:
    """Which values of one tensor round stochastically, in order: 0 for the parameter, ``j + 1`` for state ``j``
    of the rule (``state_formats[j]``: its format, None if absent). bf16 states always; a bfloat16 parameter, and
    states stored like it, with ``stochastic`` rounding on."""
    param = bf16_param and stochastic
    return [0] * param + [j + 1 for j, fmt in enumerate(state_formats)
                          if fmt == "bf16" or (fmt == "plain" and param)]
