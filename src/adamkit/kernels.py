"""Compiled, multi-threaded CPU kernels generated from the rules.

For a rule and the set of states present, :func:`kernel` writes a small loop — and only a loop — into a Python
module under the cache directory, imports it and compiles it with ``numba.njit(parallel=True, cache=True)``.
The loop calls the rule's own element function (:mod:`adamkit.rules`, bound to ``math.sqrt`` / ``max`` and
compiled by numba), so the math is never re-typed. One call covers many tensors: a table of chunks
``(tensor, start, stop)`` is split across threads, each chunk reads and writes every byte once.

Tensors are reached through their addresses (``data_ptr``), so torch tensors and NumPy arrays need no copies.
Per-tensor coefficients (bias corrections for that tensor's step) come as rows of a float64 matrix and are
rounded to the parameter's dtype once per chunk, as torch.optim does.

Nothing compiles at import: the first step of a configuration compiles (a few seconds), later processes load
the machine code from the disk cache (``ADAMKIT_CACHE_DIR``, default ``~/.cache/adamkit``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from . import rules as _rules

CHUNK = 1 << 15  # elements per work item: large enough to stream, small enough to balance two or more threads

# storage formats: name -> (storage dtype, compute dtype, exponent mask of the storage bits for the finite scan)
FORMATS: dict[str, tuple[Any, Any, int]] = {
    "float32": (np.uint32, np.float32, 0x7F800000),
    "float64": (np.uint64, np.float64, 0x7FF0000000000000),
    "bfloat16": (np.uint16, np.float32, 0x7F80),
}
_lock = threading.Lock()
_kernels: dict[tuple, Callable] = {}
_finite_kernels: dict[str, Callable] = {}


def cache_dir() -> Path:
    """Where generated kernel modules and numba's machine code live."""
    root = Path(os.environ.get("ADAMKIT_CACHE_DIR", Path.home() / ".cache" / "adamkit"))
    return root


def _source_hash() -> str:
    """Changes whenever the rules or this module change, so stale machine code is never loaded."""
    h = hashlib.sha256()
    for mod in (_rules, sys.modules[__name__]):
        h.update(Path(inspect.getfile(mod)).read_bytes())
    h.update(numba.__version__.encode())
    return h.hexdigest()[:16]


# -- pieces used by the generated modules ------------------------------------------------------------------------

@intrinsic
def address_as_pointer(typingctx, address):
    """An integer address as a ``void*``, so ``numba.carray`` can view a tensor's memory without a copy."""
    sig = types.voidptr(address)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return sig, codegen


@intrinsic
def _u32_as_f32(typingctx, bits):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_as_u32(typingctx, value):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@numba.njit(inline="always")
def bf16_load(bits):
    """bfloat16 bits (uint16) -> float32: the bf16 value is the top half of a float32."""
    return _u32_as_f32(np.uint32(bits) << np.uint32(16))


@numba.njit(inline="always")
def bf16_store(value, noise):
    """float32 -> bfloat16 bits. ``noise`` < 2^16 picks the rounding: 0x7FFF + lsb is round-to-nearest-even
    (as torch's ``.to(torch.bfloat16)``); uniform random 16 bits is stochastic rounding (unbiased)."""
    if value != value:
        return np.uint16(0x7FC0)
    return np.uint16((_f32_as_u32(value) + noise) >> np.uint32(16))


@numba.njit(inline="always")
def nearest_even(value):
    return np.uint32(0x7FFF) + ((_f32_as_u32(value) >> np.uint32(16)) & np.uint32(1))


@numba.njit(inline="always")
def random16(seed, tensor, index, stream):
    """16 random bits from a counter-based hash (splitmix64 finalizer) of (seed, tensor, index, stream)."""
    x = np.uint64(seed) ^ (np.uint64(tensor) * np.uint64(0x9E3779B97F4A7C15)) \
        ^ (np.uint64(index) * np.uint64(0xBF58476D1CE4E5B9)) ^ (np.uint64(stream) * np.uint64(0x94D049BB133111EB))
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(33)
    return np.uint32(x & np.uint64(0xFFFF))


_scalar_updates: dict[str, Callable] = {}


def scalar_update(rule_name: str) -> Callable:
    """The rule's element function compiled for scalars (used by the generated loops)."""
    if rule_name not in _scalar_updates:
        rule = _rules.RULES[rule_name]
        _scalar_updates[rule_name] = _rules.bind(rule.update, _rules.SCALAR_OPS, numba.njit(inline="always", error_model="numpy"))
    return _scalar_updates[rule_name]


def coefficient_names(rule: _rules.Rule) -> tuple[list[str], list[str]]:
    """Names of the rule's per-step coefficients, split into floating ones and boolean ones."""
    return _coefficient_names(rule.name)


@functools.lru_cache(maxsize=None)
def _coefficient_names(name: str) -> tuple[list[str], list[str]]:
    rule = _rules.RULES[name]
    h = rule.hyperparameters()
    sample, _ = rule.coefficients(h, 1.0, {**rule.scalar_states, "fresh": False, "dtype": np.float32})
    names = [n for n in list(inspect.signature(rule.update).parameters)[2 + len(rule.update_states):]]
    floats = [n for n in names if not isinstance(sample[n], bool)]
    bools = [n for n in names if isinstance(sample[n], bool)]
    return floats, bools


def _generate(rule: _rules.Rule, present: tuple[bool, ...], fmt: str, stochastic: bool = False) -> str:
    """Source of the loop for ``rule`` with the states marked in ``present``, over arrays stored as ``fmt``."""
    floats, bools = coefficient_names(rule)
    states = [s for s, on in zip(rule.update_states, present) if on]
    arrays = ["theta", "g"] + states
    names = list(inspect.signature(rule.update).parameters)[2 + len(rule.update_states):]
    storage, compute, _ = FORMATS[fmt]
    bf16 = fmt == "bfloat16"
    load = (lambda x: f"bf16_load({x})") if bf16 else (lambda x: x)

    def store(target: str, value: str, stream: int) -> str:
        if not bf16:
            return f"{target} = {value}"
        noise = f"random16(seed, k, lo + i, {stream})" if stochastic else f"nearest_even({value})"
        return f"{target} = bf16_store({value}, {noise})"

    L = [
        f"# generated by adamkit.kernels: rule {rule.name}, states {states}, storage {fmt}"
        f"{', stochastic rounding' if stochastic else ''}. A loop that calls the rule; no math here.",
        "import numpy as np",
        "from numba import njit, prange, carray",
        "from adamkit.kernels import address_as_pointer, scalar_update, bf16_load, bf16_store, nearest_even, random16",
        f"update = scalar_update({rule.name!r})",
        f"DT = np.{compute.__name__}",
        f"ST = np.{storage.__name__ if bf16 else compute.__name__}",
        "",
        "@njit(parallel=True, cache=True, nogil=True, error_model='numpy')",
        "def kernel(chunk_tensor, chunk_start, chunk_stop, sizes, addresses, coefficients, flags, seed):",
        "    zero = DT(0.0)",
        "    for c in prange(chunk_tensor.shape[0]):",
        "        k = chunk_tensor[c]",
        "        n = sizes[k]",
        "        lo = chunk_start[c]",
        "        hi = chunk_stop[c]",
        "        # views of this chunk, indexed from 0, so LLVM sees a simple loop and vectorizes it",
    ]
    for j, a in enumerate(arrays):
        L.append(f"        {a}_ = carray(address_as_pointer(addresses[k, {j}]), n, dtype=ST)[lo:hi]")
    for j, n in enumerate(floats):
        L.append(f"        {n} = DT(coefficients[k, {j}])")
    for j, n in enumerate(bools):
        L.append(f"        {n} = flags[k, {j}] != 0")
    L.append("        for i in range(hi - lo):")
    call = [load("theta_[i]"), load("g_[i]")] + [load(f"{s}_[i]") if on else "zero"
                                                 for s, on in zip(rule.update_states, present)]
    L.append(f"            r = update({', '.join(call + names)})")
    L.append("            " + store("theta_[i]", "r[0]", 0))
    for j, (s, on) in enumerate(zip(rule.update_states, present)):
        if on:
            L.append("            " + store(f"{s}_[i]", f"r[{j + 1}]", j + 1))
    L.append("")
    return "\n".join(L)


def kernel(rule: _rules.Rule, present: tuple[bool, ...], fmt: str, stochastic: bool = False) -> Callable:
    """The compiled multi-tensor loop for ``rule`` (generated, cached on disk and loaded on first use)."""
    key = (rule.name, present, fmt, stochastic)
    fn = _kernels.get(key)
    if fn is not None:
        return fn
    with _lock:
        if key in _kernels:
            return _kernels[key]
        source = _generate(rule, present, fmt, stochastic)
        tag = hashlib.sha256((source + _source_hash()).encode()).hexdigest()[:16]
        directory = cache_dir() / "kernels"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{rule.name.lower()}_{fmt}_{tag}.py"
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(source)
            os.replace(tmp, path)
        os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir() / "numba"))
        spec = importlib.util.spec_from_file_location(f"adamkit_kernel_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # numba's disk cache finds the module by name when it loads
        spec.loader.exec_module(module)
        _kernels[key] = module.kernel
        return module.kernel


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _count_nonfinite_u32(tensor, start, stop, sizes, addresses, mask):
    bad = 0
    for c in prange(tensor.shape[0]):
        k = tensor[c]
        x = numba.carray(address_as_pointer(addresses[k]), sizes[k], dtype=np.uint32)[start[c]:stop[c]]
        m = np.uint32(mask)
        count = 0
        for i in range(x.size):
            count += 1 if (x[i] & m) == m else 0  # exponent all ones: inf or nan
        bad += count
    return bad


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _count_nonfinite_u64(tensor, start, stop, sizes, addresses, mask):
    bad = 0
    for c in prange(tensor.shape[0]):
        k = tensor[c]
        x = numba.carray(address_as_pointer(addresses[k]), sizes[k], dtype=np.uint64)[start[c]:stop[c]]
        m = np.uint64(mask)
        count = 0
        for i in range(x.size):
            count += 1 if (x[i] & m) == m else 0
        bad += count
    return bad


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _count_nonfinite_u16(tensor, start, stop, sizes, addresses, mask):
    bad = 0
    for c in prange(tensor.shape[0]):
        k = tensor[c]
        x = numba.carray(address_as_pointer(addresses[k]), sizes[k], dtype=np.uint16)[start[c]:stop[c]]
        m = np.uint16(mask)
        count = 0
        for i in range(x.size):
            count += 1 if (x[i] & m) == m else 0
        bad += count
    return bad


_COUNT_NONFINITE = {"float32": _count_nonfinite_u32, "float64": _count_nonfinite_u64, "bfloat16": _count_nonfinite_u16}


def count_nonfinite(fmt: str, table: tuple, sizes: np.ndarray, addresses: np.ndarray) -> int:
    """Number of inf/nan elements in the tensors at ``addresses`` (a parallel integer scan of the exponent bits)."""
    return int(_COUNT_NONFINITE[fmt](*table, sizes, addresses, FORMATS[fmt][2]))


@numba.njit(nogil=True, cache=True)
def _write_f32(addresses, values):
    for k in range(addresses.shape[0]):
        numba.carray(address_as_pointer(addresses[k]), 1, dtype=np.float32)[0] = np.float32(values[k])


@numba.njit(nogil=True, cache=True)
def _write_f64(addresses, values):
    for k in range(addresses.shape[0]):
        numba.carray(address_as_pointer(addresses[k]), 1, dtype=np.float64)[0] = values[k]


def write_scalars(addresses: np.ndarray, values: np.ndarray, fmt: str) -> None:
    """Store ``values`` into the one-element tensors at ``addresses`` (per-tensor step counts, NAdam's μ product):
    one compiled loop instead of a torch call per tensor."""
    (_write_f32 if fmt == "float32" else _write_f64)(addresses, np.ascontiguousarray(values, dtype=np.float64))


def chunk_table(sizes: Sequence[int], chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split tensors of the given sizes into chunks of at most ``chunk`` elements: (tensor, start, stop)."""
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    counts = np.maximum(1, -(-sizes_arr // chunk))
    tensor = np.repeat(np.arange(len(sizes_arr), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    within = np.arange(len(tensor), dtype=np.int64) - np.repeat(first, counts)
    start = within * chunk
    stop = np.minimum(start + chunk, sizes_arr[tensor])
    return tensor, start, stop
