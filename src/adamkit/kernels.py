"""Compiled, multi-threaded CPU kernels generated from the rules.

For a rule and the set of states present, :func:`kernel` writes a small loop — and only a loop — into a Python
module under the cache directory, imports it and compiles it with ``numba.njit(parallel=True, cache=True)``.
The loop calls the rule's own element function (:mod:`adamkit.rules`, bound to ``math.sqrt`` / ``max`` and
compiled by numba) and, for low-precision states, the load/store functions of :mod:`adamkit.states` (bfloat16
rounding, 8-bit codes block by block), so the math is never re-typed. One call covers many tensors: a table of
chunks ``(tensor, start, stop)`` is split across threads, each chunk reads and writes every byte once.

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
from . import states as _states

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
    """Changes whenever the rules, the state formats or this module change, so stale machine code is never
    loaded. Taken once, at import (see the end of this module): it names the code this process runs, even if
    the files are edited later."""
    h = hashlib.sha256()
    for mod in (_rules, _states, sys.modules[__name__]):
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


def _bitcast(source: Any, target: Any, llvm_type: Any) -> Any:
    """An intrinsic reinterpreting a ``source`` scalar's bits as ``target`` (no conversion)."""

    @intrinsic
    def cast(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_type)

        return target(source), codegen

    return cast


_u32_as_f32 = _bitcast(types.uint32, types.float32, ir.FloatType())
_f32_as_u32 = _bitcast(types.float32, types.uint32, ir.IntType(32))
_i32_as_f32 = _bitcast(types.int32, types.float32, ir.FloatType())
_f32_as_i32 = _bitcast(types.float32, types.int32, ir.IntType(32))


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
    return np.uint16(np.uint32(_f32_as_u32(value) + np.uint32(noise)) >> np.uint32(16))


@numba.njit(inline="always")
def nearest_even(value):
    return np.uint32(0x7FFF) + ((_f32_as_u32(value) >> np.uint32(16)) & np.uint32(1))


@numba.njit(inline="always")
def stream_key(seed, tensor, stream):
    """A 32-bit key for one tensor's stochastic-rounding stream in one step (splitmix64 finalizer of (seed, tensor,
    stream)); computed once per chunk, outside the element loop."""
    x = np.uint64(seed) ^ (np.uint64(tensor) * np.uint64(0x9E3779B97F4A7C15)) \
        ^ (np.uint64(stream) * np.uint64(0x94D049BB133111EB))
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(33)
    return np.uint32(x & np.uint64(0xFFFFFFFF))


@numba.njit(inline="always")
def random16(key, index):
    """16 random bits for element ``index`` of the stream ``key``: a 32-bit integer hash (Wellons' lowbias32, a
    bijection with full avalanche) of the index mixed with the key; every step is cast back to 32 bits, since
    numba widens 32-bit arithmetic to 64."""
    x = np.uint32(np.uint32(index) ^ key)
    x = np.uint32(x ^ (x >> np.uint32(16)))
    x = np.uint32(x * np.uint32(0x7FEB352D))
    x = np.uint32(x ^ (x >> np.uint32(15)))
    x = np.uint32(x * np.uint32(0x846CA68B))
    x = np.uint32(x ^ (x >> np.uint32(16)))
    return np.uint32(x >> np.uint32(16))


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


STATE_KINDS = ("plain", "bf16", "q8")
"""How a state is stored: like the parameter ("plain"), bfloat16 with stochastic rounding, or 8-bit block-wise."""


def address_columns(rule: _rules.Rule, present: tuple[bool, ...], kinds: tuple[str, ...]) -> list[str]:
    """Names of the address columns a kernel expects: param, grad, then each state (+ its absmax if 8-bit)."""
    cols = ["param", "grad"]
    for s, on, kind in zip(rule.update_states, present, kinds):
        if on:
            cols.append(s)
            if kind == "q8":
                cols.append(f"{s}.absmax")
    return cols


def _generate(rule: _rules.Rule, present: tuple[bool, ...], fmt: str, stochastic: bool = False,
              kinds: tuple[str, ...] | None = None) -> str:
    """Source of the loop for ``rule``: parameter stored as ``fmt``, each present state stored as its ``kind``.

    The loop loads (and dequantizes) each element, calls the rule, and stores (and rounds or quantizes) the
    results; 8-bit states go block by block (new values in a small buffer, then the block's absmax, then codes).
    A block whose gradient holds inf or nan is left unchanged (params, codes, absmax) and counted; the kernel
    returns that count (0 for kernels without 8-bit states).
    """
    kinds = kinds or tuple("plain" for _ in rule.update_states)
    bits, compute, exponent = FORMATS[fmt]
    bf16_param = fmt == "bfloat16"
    on = [(j, s, kind) for j, (s, p, kind) in enumerate(zip(rule.update_states, present, kinds)) if p]
    quantized = [(j, s) for j, s, kind in on if kind == "q8"]
    names = list(inspect.signature(rule.update).parameters)[2 + len(rule.update_states):]
    floats, bools = coefficient_names(rule)
    signed = _states.SIGNED_STATES

    def storage(kind: str, s: str = "") -> str:
        if kind == "q8":
            return "np.int8" if s in signed else "np.uint8"
        if kind == "bf16" or (kind == "plain" and bf16_param):
            return "np.uint16"
        return "DT"

    def load(kind: str, s: str, x: str) -> str:
        if kind == "q8":
            fn = "dequantize_signed" if s in signed else "dequantize_unsigned"
            return f"DT({fn}({x}, {s}_scale))"
        if kind == "bf16" or (kind == "plain" and bf16_param):
            return f"DT(bf16_load({x}))"
        return x

    def rounds_stochastically(kind: str) -> bool:
        """bf16 states always; bf16 params (and states stored like them) when ``stochastic``."""
        return kind == "bf16" or (kind == "plain" and bf16_param and stochastic)

    def store(kind: str, target: str, value: str, stream: int, index: str = "lo + i") -> str:
        if kind == "bf16" or (kind == "plain" and bf16_param):
            noise = (f"random16(key{stream}, {index})" if rounds_stochastically(kind)
                     else f"nearest_even(np.float32({value}))")
            return f"{target} = bf16_store(np.float32({value}), {noise})"
        return f"{target} = {value}"

    L = [
        f"# generated by adamkit.kernels: rule {rule.name}, param {fmt}, states "
        f"{[(s, kind) for _, s, kind in on]}{', stochastic rounding' if stochastic else ''}.",
        "# A loop that loads, calls the rule, and stores; the math lives in adamkit.rules and adamkit.states.",
        "import numpy as np",
        "from numba import njit, prange, carray",
        "from adamkit.kernels import address_as_pointer, scalar_update, bf16_load, bf16_store, nearest_even",
        "from adamkit.kernels import random16, stream_key",
        "from adamkit.kernels import scalar_state_functions, _f32_as_u32 as f32_bits, _u32_as_f32 as bits_f32",
        "dequantize_signed, dequantize_unsigned, quantize_signed, quantize_unsigned, inverse_scale = "
        "scalar_state_functions()",
        f"update = scalar_update({rule.name!r})",
        f"DT = np.{compute.__name__}",
        f"BLOCK = {_states.BLOCK}",
        f"BITS = np.{bits.__name__}  # the gradient's storage bits, for the non-finite check",
        f"EXPONENT = BITS({exponent:#x})",
        f"MAGNITUDE = BITS({(1 << (8 * np.dtype(bits).itemsize - 1)) - 1:#x})",
        "",
        "@njit(parallel=True, cache=True, nogil=True, error_model='numpy')",
        "def kernel(chunk_tensor, chunk_start, chunk_stop, sizes, addresses, coefficients, flags, seed):",
        "    zero = DT(0.0)",
        "    skipped = 0  # 8-bit blocks left unchanged because their gradient was not finite",
        "    for c in prange(chunk_tensor.shape[0]):",
        "        k = chunk_tensor[c]",
        "        n = sizes[k]",
        "        lo = chunk_start[c]",
        "        hi = chunk_stop[c]",
        "        # views of this chunk, indexed from 0, so LLVM sees simple loops and vectorizes them",
        f"        theta_ = carray(address_as_pointer(addresses[k, 0]), n, dtype={storage('plain')})[lo:hi]",
        f"        g_ = carray(address_as_pointer(addresses[k, 1]), n, dtype={storage('plain')})[lo:hi]",
    ]
    col = 2
    for j, s, kind in on:
        L.append(f"        {s}_ = carray(address_as_pointer(addresses[k, {col}]), n, dtype={storage(kind, s)})[lo:hi]")
        col += 1
        if kind == "q8":
            L.append(f"        {s}_absmax = carray(address_as_pointer(addresses[k, {col}]), (n + BLOCK - 1) // BLOCK, "
                     f"dtype=np.float32)")
            L.append(f"        {s}_buffer = np.empty(BLOCK, DT)")
            col += 1
    for j, n in enumerate(floats):
        L.append(f"        {n} = DT(coefficients[k, {j}])")
    for j, n in enumerate(bools):
        L.append(f"        {n} = flags[k, {j}] != 0")
    # one stochastic-rounding key per stored stream (0: the parameter, j + 1: state j), hoisted out of the loop
    streams = [(0, "plain")] + [(j + 1, kind) for j, _, kind in on]
    for stream in (stream for stream, kind in streams if rounds_stochastically(kind)):
        L.append(f"        key{stream} = stream_key(seed, k, {stream})")
    call = [load("plain", "", "theta_[i]"), load("plain", "", "g_[i]")]
    present_kind = {s: kind for _, s, kind in on}
    for s in rule.update_states:
        call.append(load(present_kind[s], s, f"{s}_[i]") if s in present_kind else "zero")
    body = [f"r = update({', '.join(call + names)})", store("plain", "theta_[i]", "r[0]", 0)]
    for j, s, kind in on:
        if kind == "q8":
            body.append(f"{s}_buffer[i - b0] = r[{j + 1}]")
        else:
            body.append(store(kind, f"{s}_[i]", f"r[{j + 1}]", j + 1))
    if quantized:
        L.append("        g_bits = carray(address_as_pointer(addresses[k, 1]), n, dtype=BITS)[lo:hi]")
    if not quantized:
        L.append("        for i in range(hi - lo):")
        L.extend("            " + line for line in body)
    else:
        # block by block; every array is re-viewed per block so the loops index from 0 (and vectorize)
        L.append("        for b0 in range(0, hi - lo, BLOCK):")
        L.append("            b1 = min(b0 + BLOCK, hi - lo)")
        L.append("            block = (lo + b0) // BLOCK")
        L.append("            theta_b = theta_[b0:b1]")
        L.append("            g_b = g_[b0:b1]")
        # a block whose gradient holds inf or nan is left as it is (one nan would poison the block's absmax):
        # the largest magnitude's bits, an integer max that vectorizes, reach the exponent mask only then
        L.append("            g_bits_b = g_bits[b0:b1]")
        L.append("            magnitude = BITS(0)")
        L.append("            for i in range(b1 - b0):")
        L.append("                magnitude = max(magnitude, BITS(g_bits_b[i] & MAGNITUDE))")
        L.append("            if magnitude >= EXPONENT:")
        L.append("                skipped += 1")
        L.append("                continue")
        for _, s, kind in on:
            L.append(f"            {s}_b = {s}_[b0:b1]")
        for _, s in quantized:
            L.append(f"            {s}_scale = {s}_absmax[block]")
            L.append(f"            {s}_buf = {s}_buffer[:b1 - b0]")
            L.append(f"            {s}_bits = np.uint32(0)")
        # one loop: dequantize, the rule, and each new 8-bit state's running absmax (an integer max over the
        # float bits: same order for non-negative floats; it vectorizes); new 8-bit states wait in buffers
        L.append("            for i in range(b1 - b0):")
        call_b = [load("plain", "", "theta_b[i]"), load("plain", "", "g_b[i]")]
        for s in rule.update_states:
            kind = present_kind.get(s)
            call_b.append("zero" if kind is None else load(kind, s, f"{s}_b[i]"))
        index = "lo + b0 + i"  # the element's place in its tensor (the stochastic-rounding counter)
        block_body = [f"r = update({', '.join(call_b + names)})", store("plain", "theta_b[i]", "r[0]", 0, index)]
        for j, s, kind in on:
            if kind == "q8":
                block_body.append(f"{s}_buf[i] = r[{j + 1}]")
                block_body.append(f"{s}_bits = max({s}_bits, f32_bits(abs(np.float32(r[{j + 1}]))))")
            else:
                block_body.append(store(kind, f"{s}_b[i]", f"r[{j + 1}]", j + 1, index))
        L.extend("                " + line for line in block_body)
        for _, s in quantized:
            L.append(f"            {s}_amax = bits_f32({s}_bits)")
            L.append(f"            {s}_inv = DT(inverse_scale({s}_amax))")
            L.append(f"            {s}_absmax[block] = np.float32({s}_amax)")
        L.append("            for i in range(b1 - b0):")  # quantize every 8-bit state
        for _, s in quantized:
            q = "quantize_signed" if s in signed else "quantize_unsigned"
            dt = "np.int8" if s in signed else "np.uint8"
            L.append(f"                {s}_b[i] = {dt}({q}({s}_buf[i], {s}_inv))")
    L.append("    return skipped")
    L.append("")
    return "\n".join(L)


_state_functions: tuple | None = None


def scalar_state_functions() -> tuple:
    """adamkit.states' element functions compiled for scalars (used by the generated loops)."""
    global _state_functions
    if _state_functions is None:
        jit = numba.njit(inline="always", error_model="numpy")
        ops = {"f32_bits": _f32_bits_i32, "bits_f32": _bits_as_f32, "minimum": min, "maximum": max,
               "where": _select, "i32": np.int32}
        _state_functions = tuple(_rules.bind(getattr(_states, f), ops, jit, _states.HELPERS) for f in (
            "dequantize_signed", "dequantize_unsigned", "quantize_signed", "quantize_unsigned", "inverse_scale"))
    return _state_functions


@numba.njit(inline="always")
def _bits_as_f32(bits):
    return _i32_as_f32(np.int32(bits))


@numba.njit(inline="always")
def _f32_bits_i32(value):
    return _f32_as_i32(np.float32(value))


@numba.njit(inline="always")
def _select(condition, a, b):
    return a if condition else b


def kernel(rule: _rules.Rule, present: tuple[bool, ...], fmt: str, stochastic: bool = False,
           kinds: tuple[str, ...] | None = None) -> Callable:
    """The compiled multi-tensor loop for ``rule`` (generated, cached on disk and loaded on first use)."""
    kinds = kinds or tuple("plain" for _ in rule.update_states)
    key = (rule.name, present, fmt, stochastic, kinds)
    fn = _kernels.get(key)
    if fn is not None:
        return fn
    with _lock:
        if key in _kernels:
            return _kernels[key]
        source = _generate(rule, present, fmt, stochastic, kinds)
        tag = hashlib.sha256((source + _SOURCE_HASH).encode()).hexdigest()[:16]
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
def _count_nonfinite(tensor, start, stop, sizes, addresses, mask):
    """Elements whose exponent bits are all ones (inf or nan); ``mask`` (one element) also gives the bit width."""
    m = mask[0]
    bad = 0
    for c in prange(tensor.shape[0]):
        k = tensor[c]
        x = numba.carray(address_as_pointer(addresses[k]), sizes[k], dtype=mask.dtype)[start[c]:stop[c]]
        count = 0
        for i in range(x.size):
            count += 1 if (x[i] & m) == m else 0
        bad += count
    return bad


def count_nonfinite(fmt: str, table: tuple, sizes: np.ndarray, addresses: np.ndarray) -> int:
    """Number of inf/nan elements in the tensors at ``addresses`` (a parallel integer scan of the exponent bits)."""
    storage, _, mask = FORMATS[fmt]
    return int(_count_nonfinite(*table, sizes, addresses, np.array([mask], dtype=storage)))


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


@numba.njit(nogil=True, cache=True)
def _read_f32(addresses):
    out = np.empty(addresses.shape[0], dtype=np.float64)
    for k in range(addresses.shape[0]):
        out[k] = numba.carray(address_as_pointer(addresses[k]), 1, dtype=np.float32)[0]
    return out


@numba.njit(nogil=True, cache=True)
def _read_f64(addresses):
    out = np.empty(addresses.shape[0], dtype=np.float64)
    for k in range(addresses.shape[0]):
        out[k] = numba.carray(address_as_pointer(addresses[k]), 1, dtype=np.float64)[0]
    return out


def read_scalars(addresses: np.ndarray, fmt: str) -> np.ndarray:
    """The values of the one-element tensors at ``addresses`` as float64: the counterpart of :func:`write_scalars`."""
    return (_read_f32 if fmt == "float32" else _read_f64)(addresses)


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


_SOURCE_HASH = _source_hash()
