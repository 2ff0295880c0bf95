"""Compiled, multi-threaded CPU kernels generated from the rules.

For a rule and the set of states present, :func:`kernel` writes a small loop — and only a loop — into a Python
module under the cache directory, imports it and compiles it with ``numba.njit(parallel=True, cache=True)``.
The loop calls the rule's own element function (:mod:`adamkit.rules`, bound to ``math.sqrt`` / ``max`` and
compiled by numba) and, for low-precision states, the load/store functions of :mod:`adamkit.states` (bfloat16
rounding, 8-bit codes block by block), so the math is never re-typed. 16-bit parameters (bfloat16, float16) are
loaded to float32 and stored rounded to nearest even, as torch's CPU fused kernels do. One call covers many
tensors: a table of chunks ``(tensor, start, stop)`` is split across threads, each chunk reads and writes every
byte once.

The generator is a few small emitters: the layout of a configuration (:class:`_Layout`: storage, loads, stores,
random streams), the chunk's views, the element step (built once, used by both loops), and the flat or
block-by-block loop. Once calls whose tensors share their option flags (every call of one param group) have
stepped enough elements, they run a loop compiled with the flags as constants (:class:`Kernel`), so that the
branches they select are gone from it.

Kernels whose loops store narrowed values (8-bit codes, bfloat16 or float16) are vectorized for the bandwidth of
their narrowest type on targets with 256-bit vectors (:func:`widens_loops`): 16 float32 lanes, where LLVM's own
choice is 8. There, full blocks of 8-bit states run as explicit vectors instead (:mod:`adamkit.vectors`, the same
rule and code maps traced into vector instructions), in the loops compiled with the flags as constants.

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
from numba.core.compiler import Compiler
from numba.extending import intrinsic

from . import rules as _rules
from . import states as _states
from . import storage as _storage
from . import vectors as _vectors

CHUNK = 1 << 15  # elements per work item: large enough to stream, small enough to balance two or more threads


def prefetch_distance() -> int:
    """Elements ahead of the loop whose cache lines the kernels prefetch, in every stream they read; 0: none.

    ``ADAMKIT_PREFETCH`` sets it. By default 1,024, except on AMD Zen hosts (LLVM's host CPU ``znver*``), whose
    hardware prefetchers keep enough lines in flight on their own: there software prefetches cost 5–20 % of the
    step (Zen 4, 2 threads, every storage, AVX2 and AVX-512 code alike), where on Intel Sapphire Rapids they gained
    30–40 % (docs/benchmarks.md). It depends on the machine, not on the code target."""
    value = os.environ.get("ADAMKIT_PREFETCH")
    if value is not None:
        if not value.isdigit():
            raise ValueError(f"ADAMKIT_PREFETCH must be a number of elements (0: no prefetches); got {value!r}")
        return int(value)
    from llvmlite import binding
    return 0 if binding.get_host_cpu_name().startswith("znver") else 1024


AHEAD = prefetch_distance()

# storage formats: name -> (storage dtype, compute dtype, exponent mask of the storage bits for the finite scan)
FORMATS: dict[str, tuple[Any, Any, int]] = {
    "float32": (np.uint32, np.float32, 0x7F800000),
    "float64": (np.uint64, np.float64, 0x7FF0000000000000),
    "bfloat16": (np.uint16, np.float32, 0x7F80),
    "float16": (np.uint16, np.float32, 0x7C00),
}
HALF_FORMATS = ("bfloat16", "float16")
"""16-bit formats: stored as their bits (uint16), computed in float32, as torch's CPU fused kernels do."""
_lock = threading.Lock()
_kernels: dict[tuple, "Kernel"] = {}
_finite_kernels: dict[str, Callable] = {}


def target_features() -> set[str]:
    """The CPU features the kernels are compiled for: numba's target (``NUMBA_CPU_FEATURES``, else the host's)."""
    from numba.core.codegen import get_host_cpu_features
    features = numba.config.CPU_FEATURES
    features = get_host_cpu_features() if features is None else features
    return {f[1:] for f in features.split(",") if f.startswith("+")}


def widens_loops(fmt: str, kinds: Sequence[str]) -> bool:
    """Whether a kernel's loops are vectorized for the bandwidth of their narrowest type: kernels whose float32 math
    stores narrowed values (8-bit codes, bfloat16, float16), on targets with 256-bit vectors (AVX2 without AVX-512).

    LLVM sizes a loop's vectors by its widest type there, 8 float32 lanes, so each store narrows 8 values by
    extracting and shuffling register halves. Told to maximize bandwidth (LLVM's ``-vectorizer-maximize-bandwidth``),
    its cost model also weighs 16 and 32 lanes and picks 16 here, which packs register pairs (``vpackusdw``,
    ``vpackuswb``): the AVX2 AdamW kernels with int8 and bf16 states take 11–13 % less time (Zen 4, one thread, in
    L2; docs/benchmarks.md)."""
    narrows = fmt in HALF_FORMATS or any(kind in ("bf16", "int8") for kind in kinds)
    features = target_features()
    return narrows and fmt != "float64" and "avx2" in features and "avx512f" not in features


def explicit_vectors(fmt: str, kinds: Sequence[str]) -> bool:
    """Whether a kernel's full 8-bit blocks run as explicit vectors (:mod:`adamkit.vectors`): float32 parameters
    whose array states are all 8-bit, on targets with 256-bit vectors and no AVX-512 (:func:`widens_loops`), in
    loops compiled with their flags as constants. There LLVM's vectorized loops spill the rule's constants and
    narrow codes with shuffles; the explicit passes take 7–23 % less time, AdamW's 18 % (Zen 4, AVX2 code, one
    thread, in L2; docs/benchmarks.md). On AVX-512 targets LLVM's own 16-lane loops are faster than 8 explicit lanes."""
    return fmt == "float32" and bool(kinds) and all(kind == "int8" for kind in kinds) and widens_loops(fmt, kinds)


class _LoopPipeline(Compiler):
    """numba's compiler, with LLVM's loop vectorizer maximizing bandwidth while it compiles (an LLVM option, set
    under numba's global compiler lock, which every numba compile holds, and reset after)."""

    maximize_bandwidth = False

    def compile_extra(self, func):
        if not self.maximize_bandwidth:
            return super().compile_extra(func)
        from llvmlite import binding
        binding.set_option("adamkit", "-vectorizer-maximize-bandwidth=true")
        try:
            return super().compile_extra(func)
        finally:
            binding.set_option("adamkit", "-vectorizer-maximize-bandwidth=false")


@functools.cache
def loop_pipeline(maximize_bandwidth: bool) -> type:
    """A numba ``pipeline_class`` whose loop vectorizer maximizes bandwidth, or not (:func:`widens_loops`)."""
    name = f"LoopPipeline{int(maximize_bandwidth)}"
    return type(name, (_LoopPipeline,), {"maximize_bandwidth": maximize_bandwidth})


def cache_dir() -> Path:
    """Where generated kernel modules and numba's machine code live."""
    root = Path(os.environ.get("ADAMKIT_CACHE_DIR", Path.home() / ".cache" / "adamkit"))
    return root


def _source_hash() -> str:
    """Changes whenever the rules, the state formats, the storage module (the rounding hash's constants are
    compiled into the kernels), the explicit-vector passes or this module change, so stale machine code is never
    loaded. Taken once, at import (see the end of this module): it names the code this process runs, even if the
    files are edited later."""
    h = hashlib.sha256()
    for mod in (_rules, _states, _storage, _vectors, sys.modules[__name__]):
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


@intrinsic
def f16_load(typingctx, bits):
    """IEEE float16 bits (uint16) -> float32, exactly (one ``vcvtph2ps`` lane with F16C)."""
    if not (isinstance(bits, types.Integer) and bits.bitwidth == 16):
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def f16_store(typingctx, value):
    """float32 -> IEEE float16 bits, rounded to nearest even (overflow to inf, nan stays nan), as torch's
    ``.to(torch.float16)``."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(value), codegen


@numba.njit(inline="always")
def nearest_even(value):
    return np.uint32(0x7FFF) + ((_f32_as_u32(value) >> np.uint32(16)) & np.uint32(1))


@intrinsic
def prefetch(typingctx, address):
    """A hint to load the cache line at ``address`` (an integer) for reading: ``llvm.prefetch``, which never
    faults and changes no value. The element loop does arithmetic between its loads, so the hardware prefetcher
    alone keeps too few lines in flight; the kernels ask for each stream's lines ``AHEAD`` elements early."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        name = "llvm.prefetch.p0"
        fn = builder.module.globals.get(name) or ir.Function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), name=name)
        pointer = builder.inttoptr(builder.sext(args[0], ir.IntType(64)) if args[0].type.width < 64 else args[0],
                                   i8p)
        builder.call(fn, [pointer, i32(0), i32(3), i32(1)])  # read, keep in all cache levels, data
        return context.get_dummy_value()

    return types.void(address), codegen


def _as_i32(builder: Any, value: Any) -> Any:
    i32 = ir.IntType(32)
    width = value.type.width
    return builder.trunc(value, i32) if width > 32 else builder.zext(value, i32) if width < 32 else value


@intrinsic
def random32(typingctx, key, base, index):
    """:func:`adamkit.storage.random32` (the one definition, which the tests hold this to bit for bit): 32 random
    bits for element ``base + index`` under ``key``. Emitted as 32-bit integer operations, the sum included, so
    that a vector loop over ``index`` counts it in 32-bit lanes and keeps 8 (AVX2) or 16 (AVX-512) of them:
    numba's own arithmetic would widen it to 64 bits."""
    if not all(isinstance(a, types.Integer) for a in (key, base, index)):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        k, b, i = (_as_i32(builder, a) for a in args)
        first, second = (ir.Constant(i32, m) for m in _storage.HASH_MULTIPLIERS)
        v = builder.mul(builder.add(builder.add(b, i), k), first)
        return builder.mul(builder.xor(v, builder.lshr(v, ir.Constant(i32, _storage.HASH_SHIFT))), second)

    return types.uint32(key, base, index), codegen


def _value_bits(value: int) -> Callable:
    """:func:`adamkit.storage.value_bits` for rounded value ``value``, in 32-bit lanes."""
    def emit(typingctx, bits):
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            v = _as_i32(builder, args[0])
            if value == 0:
                return builder.and_(v, ir.Constant(i32, 0xFFFF))
            if value >= 2:
                v = builder.mul(v, ir.Constant(i32, _storage.SPREAD[value - 2]))
            return builder.lshr(v, ir.Constant(i32, 16))

        return types.uint32(bits), codegen
    emit.__name__ = f"value{value}_bits"
    return intrinsic(emit)


value0_bits, value1_bits, value2_bits, value3_bits = (_value_bits(v) for v in range(2 + len(_storage.SPREAD)))


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




def address_columns(rule: _rules.Rule, present: tuple[bool, ...], kinds: tuple[str, ...]) -> list[str]:
    """Names of the address columns a kernel expects: param, grad, then each state (+ its absmax if 8-bit)."""
    cols = ["param", "grad"]
    for s, on, kind in zip(rule.update_states, present, kinds):
        if on:
            cols.append(s)
            if kind == "int8":
                cols.append(f"{s}.absmax")
    return cols


class _Layout:
    """What one generated kernel reads and writes: the parameter's format, each present state's storage, the
    coefficient and flag names, and the stochastically rounded values (0: the parameter, j + 1: state j), which
    share one 32-bit hash per element. ``constants``, if given, are the flags' values compiled in."""

    def __init__(self, rule: _rules.Rule, present: tuple[bool, ...], fmt: str, stochastic: bool,
                 kinds: tuple[str, ...], constants: tuple[bool, ...] | None) -> None:
        self.rule, self.fmt, self.stochastic, self.constants = rule, fmt, stochastic, constants
        self.bf16_param = fmt == "bfloat16"  # stochastic rounding is offered for bfloat16 params only
        self.on = [(j, s, kind) for j, (s, p, kind) in enumerate(zip(rule.update_states, present, kinds)) if p]
        self.kind_of = {s: kind for _, s, kind in self.on}
        self.quantized = [s for _, s, kind in self.on if kind == "int8"]
        self.names = list(inspect.signature(rule.update).parameters)[2 + len(rule.update_states):]
        self.floats, self.bools = coefficient_names(rule)
        self.rounded = _storage.rounded_values([self.kind_of.get(s) for s in rule.update_states],
                                               self.bf16_param, stochastic)
        self.vector = constants is not None and explicit_vectors(fmt, [kind for _, _, kind in self.on])

    def columns(self) -> list[tuple[int, str]]:
        """(address column, state) of each present state's values."""
        present = tuple(s in self.kind_of for s in self.rule.update_states)
        kinds = tuple(self.kind_of.get(s, "plain") for s in self.rule.update_states)
        return [(c, name) for c, name in enumerate(address_columns(self.rule, present, kinds)) if c >= 2]

    def streams(self) -> list[tuple[int, int]]:
        """(address column, bytes per element) of every array the element loop reads: param, grad, each state
        (8-bit scales, one per block, are left to the hardware)."""
        size = np.dtype(FORMATS[self.fmt][0]).itemsize
        out, col = [(0, size), (1, size)], 2
        for _, _, kind in self.on:
            out.append((col, {"int8": 1, "bf16": 2}.get(kind, size)))
            col += 2 if kind == "int8" else 1
        return out

    def rounds_stochastically(self, kind: str) -> bool:
        """bf16 states always; bf16 params (and states stored like them) when ``stochastic``."""
        return kind == "bf16" or (kind == "plain" and self.bf16_param and self.stochastic)

    def half(self, kind: str) -> str | None:
        """The 16-bit format of values of ``kind`` (bf16 states; the parameter and states stored like it, for a
        16-bit parameter), or None."""
        if kind == "bf16":
            return "bfloat16"
        return self.fmt if kind == "plain" and self.fmt in HALF_FORMATS else None

    def storage(self, kind: str, s: str = "") -> str:
        if kind == "int8":
            return "np.int8" if s in _states.SIGNED_STATES else "np.uint8"
        return "np.uint16" if self.half(kind) else "DT"

    def load(self, kind: str, s: str, x: str) -> str:
        if kind == "int8":
            fn = "dequantize_signed" if s in _states.SIGNED_STATES else "dequantize_unsigned"
            return f"DT({fn}({x}, {s}_scale))"
        half = self.half(kind)
        return x if half is None else f"DT({'bf16' if half == 'bfloat16' else 'f16'}_load({x}))"

    def noise(self, stream: int) -> str:
        """The 16 random bits of ``stream`` (0: the parameter, j + 1: state j), from the element's hash."""
        return f"value{self.rounded.index(stream)}_bits(bits)"

    def store(self, kind: str, target: str, value: str, stream: int) -> str:
        half = self.half(kind)
        if half is None:
            return f"{target} = {value}"
        if half == "float16":
            return f"{target} = f16_store(np.float32({value}))"
        noise = self.noise(stream) if self.rounds_stochastically(kind) else f"nearest_even(np.float32({value}))"
        return f"{target} = bf16_store(np.float32({value}), {noise})"


def _emit_header(lay: _Layout) -> list[str]:
    """Imports and constants of the generated module."""
    bits, compute, exponent = FORMATS[lay.fmt]
    states = [(s, kind) for _, s, kind in lay.on]
    return [
        f"# generated by adamkit.kernels: rule {lay.rule.name}, param {lay.fmt}, states {states}"
        f"{', stochastic rounding' if lay.stochastic else ''}"
        f"{'' if lay.constants is None else f', flags {dict(zip(lay.bools, lay.constants))}'}.",
        "# A loop that loads, calls the rule, and stores; the math lives in adamkit.rules and adamkit.states.",
        "import numpy as np",
        "from numba import njit, prange, carray",
        "from adamkit.kernels import address_as_pointer, scalar_update, bf16_load, bf16_store, nearest_even",
        "from adamkit.kernels import f16_load, f16_store",
        "from adamkit.kernels import random32, value0_bits, value1_bits, value2_bits, value3_bits, prefetch",
        "from adamkit.kernels import loop_pipeline",
        "from adamkit.kernels import scalar_state_functions, _f32_as_u32 as f32_bits, _u32_as_f32 as bits_f32",
        "dequantize_signed, dequantize_unsigned, quantize_signed, quantize_unsigned, inverse_scale = "
        "scalar_state_functions()",
        f"update = scalar_update({lay.rule.name!r})",
        f"DT = np.{compute.__name__}",
        f"BLOCK = {_states.BLOCK}",
        f"AHEAD = {AHEAD}",
        f"BITS = np.{bits.__name__}  # the gradient's storage bits, for the non-finite check",
        f"EXPONENT = BITS({exponent:#x})",
        f"MAGNITUDE = BITS({(1 << (8 * np.dtype(bits).itemsize - 1)) - 1:#x})",
        "INF = np.uint32(0x7F800000)  # float32 bits of inf: a magnitude's bits from here up are inf or nan",
        f"PIPELINE = loop_pipeline(maximize_bandwidth={widens_loops(lay.fmt, [kind for _, _, kind in lay.on])})",
        *_emit_vector_header(lay),
        "",
        # FMA contraction and reciprocals of a tensor's constants (a division by bc2_sqrt becomes a multiplication):
        # within an ulp per operation, no assumption about inf or nan
        "@njit(parallel=True, cache=True, nogil=True, error_model='numpy', fastmath={'arcp', 'contract'},",
        "      pipeline_class=PIPELINE)",
        "def kernel(chunk_tensor, chunk_start, chunk_stop, sizes, addresses, coefficients, flags, keys):",
        "    zero = DT(0.0)",
        "    skipped = 0  # 8-bit blocks left unchanged because their gradient was not finite",
        "    for c in prange(chunk_tensor.shape[0]):",
    ]


def _emit_vector_header(lay: _Layout) -> list[str]:
    """The explicit-vector passes of full 8-bit blocks (:mod:`adamkit.vectors`), if the kernel uses them."""
    if not lay.vector:
        return []
    states = tuple(lay.quantized)
    return ["from adamkit.vectors import block_update, block_quantize",
            f"BLOCK_UPDATE = block_update({lay.rule.name!r}, {states!r}, {tuple(lay.constants)!r})",
            f"QUANTIZE = block_quantize({states!r})"]


def _tuple(names: list[str]) -> str:
    return f"({', '.join(names)}{',' * (len(names) == 1)})"


def _emit_chunk(lay: _Layout) -> list[str]:
    """One chunk's views (indexed from 0, so LLVM sees simple loops and vectorizes them), its tensor's
    coefficients and flags, and its stochastic-rounding key, hoisted out of the loop."""
    view = "carray(address_as_pointer(addresses[k, {}]), n, dtype={})[lo:hi]"
    L = ["k = chunk_tensor[c]", "n = sizes[k]", "lo = chunk_start[c]", "hi = chunk_stop[c]",
         f"theta_ = {view.format(0, lay.storage('plain'))}", f"g_ = {view.format(1, lay.storage('plain'))}"]
    columns = address_columns(lay.rule, tuple(s in lay.kind_of for s in lay.rule.update_states),
                              tuple(lay.kind_of.get(s, "plain") for s in lay.rule.update_states))
    for col, name in enumerate(columns[2:], start=2):
        if name.endswith(".absmax"):
            s = name[:-len(".absmax")]
            L += [f"{s}_absmax = carray(address_as_pointer(addresses[k, {col}]), (n + BLOCK - 1) // BLOCK, "
                  "dtype=np.float32)", f"{s}_buffer = np.empty(BLOCK, DT)"]
            L += [f"{s}_address = np.int64({s}_buffer.ctypes.data)"] * lay.vector
        else:
            L.append(f"{name}_ = {view.format(col, lay.storage(lay.kind_of[name], name))}")
    L += [f"{n} = DT(coefficients[k, {j}])" for j, n in enumerate(lay.floats)]
    if lay.constants is None:
        L += [f"{n} = flags[k, {j}] != 0" for j, n in enumerate(lay.bools)]
    else:
        L += [f"{n} = {value}" for n, value in zip(lay.bools, lay.constants)]
    L += ["key = keys[k, 0]"] * bool(lay.rounded)
    if lay.quantized:
        L.append(f"g_bits = {view.format(1, 'BITS')}")
    return ["        " + line for line in L]


def _emit_element(lay: _Layout, view: str, index: str) -> list[str]:
    """The element step, built once for both loops: random bits, load (dequantize), the rule, store (round, or
    keep new 8-bit states in the block's buffer with a running absmax: an integer max over the float bits, the
    same order for non-negative floats, which vectorizes). Arrays are ``{name}{view}``, indexed by ``i``;
    ``index`` gives the element's place in its tensor (the stochastic-rounding counter) as ``base, i``."""
    args = [lay.load("plain", "", f"theta{view}[i]"), lay.load("plain", "", f"g{view}[i]")]
    args += [lay.load(lay.kind_of[s], s, f"{s}{view}[i]") if s in lay.kind_of else "zero"
             for s in lay.rule.update_states]
    L = [f"bits = random32(key, {index})"] * bool(lay.rounded)
    L += [f"r = update({', '.join(args + lay.names)})", lay.store("plain", f"theta{view}[i]", "r[0]", 0)]
    for j, s, kind in lay.on:
        if kind == "int8":
            L += [f"{s}_buf[i] = r[{j + 1}]", f"{s}_bits = max({s}_bits, f32_bits(abs(np.float32(r[{j + 1}]))))"]
        else:
            L.append(lay.store(kind, f"{s}{view}[i]", f"r[{j + 1}]", j + 1))
    return L


def _emit_prefetch(lay: _Layout) -> list[str]:
    """At the start of a block (``b0``): ask for the cache lines of the block ``AHEAD`` elements on, in every
    stream, within the tensor (nothing if ``AHEAD`` is 0)."""
    if not AHEAD:
        return []
    L = ["ahead = lo + b0 + AHEAD", "if ahead < n:", "    last = min(ahead + BLOCK, n)"]
    for col, size in lay.streams():
        L += [f"    for q in range(ahead * {size}, last * {size}, 64):",
              f"        prefetch(addresses[k, {col}] + q)"]
    return L


def _emit_flat_loop(lay: _Layout) -> list[str]:
    """Element by element over the chunk (no 8-bit state), block by block for the prefetches; every array is
    re-viewed per block so that the loop indexes from 0 (and vectorizes)."""
    L = ["for b0 in range(0, hi - lo, BLOCK):", "    b1 = min(b0 + BLOCK, hi - lo)", "    base = lo + b0"]
    L += ["    " + x for x in _emit_prefetch(lay)]
    L += [f"    {s}_b = {s}_[b0:b1]" for s in ["theta", "g"] + [s for _, s, _ in lay.on]]
    L.append("    for i in range(b1 - b0):")
    L += ["        " + x for x in _emit_element(lay, "_b", "base, i")]
    return ["        " + line for line in L]


def _emit_block_loop(lay: _Layout) -> list[str]:
    """Block by block (8-bit states): skip a block whose gradient holds inf or nan (one nan would poison the
    block's absmax; the largest magnitude's bits, an integer max that vectorizes, reach the exponent mask only
    then), then the block's step (:func:`_emit_block`, or :func:`_emit_vector_block` for full blocks of kernels
    with explicit-vector passes)."""
    L = ["for b0 in range(0, hi - lo, BLOCK):", "    b1 = min(b0 + BLOCK, hi - lo)", "    base = lo + b0"]
    L += ["    " + x for x in _emit_prefetch(lay)]
    L += ["    block = base // BLOCK",
         "    g_bits_b = g_bits[b0:b1]", "    magnitude = BITS(0)", "    for i in range(b1 - b0):",
         "        magnitude = max(magnitude, BITS(g_bits_b[i] & MAGNITUDE))", "    if magnitude >= EXPONENT:",
         "        skipped += 1", "        continue"]
    if lay.vector:
        L += ["    if b1 - b0 == BLOCK:"] + ["        " + x for x in _emit_vector_block(lay)] + ["    else:"]
        L += ["        " + x for x in _emit_block(lay)]
    else:
        L += ["    " + x for x in _emit_block(lay)]
    return ["        " + line for line in L]


def _emit_scale(s: str) -> list[str]:
    """State ``s``'s absmax from its running max ``{s}_bits``: taken again over the finite values of its buffer if
    a new value is inf or nan (the running max reaches INF, rarely; the quantizers contain the others: ±inf → ±the
    top code, nan → 0), so the common case pays nothing; stored, and inverted."""
    return [f"if {s}_bits >= INF:", f"    {s}_bits = np.uint32(0)", "    for i in range(b1 - b0):",
            f"        {s}_m = f32_bits(abs(np.float32({s}_buffer[i])))",
            f"        {s}_bits = max({s}_bits, {s}_m if {s}_m < INF else np.uint32(0))",
            f"{s}_amax = bits_f32({s}_bits)", f"{s}_inv = DT(inverse_scale({s}_amax))",
            f"{s}_absmax[block] = np.float32({s}_amax)"]


def _emit_block(lay: _Layout) -> list[str]:
    """One block in compiled loops: one loop of element steps (new 8-bit values into the block's buffers), each
    absmax, then one loop quantizing every 8-bit state. Every array is re-viewed per block so that the loops
    index from 0 (and vectorize)."""
    L = [f"{s}_b = {s}_[b0:b1]" for s in ["theta", "g"] + [s for _, s, _ in lay.on]]
    for s in lay.quantized:
        L += [f"{s}_scale = {s}_absmax[block]", f"{s}_buf = {s}_buffer[:b1 - b0]", f"{s}_bits = np.uint32(0)"]
    L += ["for i in range(b1 - b0):"] + ["    " + x for x in _emit_element(lay, "_b", "base, i")]
    for s in lay.quantized:
        L += _emit_scale(s)
    L.append("for i in range(b1 - b0):")
    for s in lay.quantized:
        signed = s in _states.SIGNED_STATES
        q, dt = ("quantize_signed", "np.int8") if signed else ("quantize_unsigned", "np.uint8")
        L.append(f"    {s}_b[i] = {dt}({q}({s}_buf[i], {s}_inv))")
    return L


def _emit_vector_block(lay: _Layout) -> list[str]:
    """One full block in explicit vectors (:mod:`adamkit.vectors`): the element pass, each absmax, the quantize
    pass. Addresses, not views: nothing is reference-counted per block."""
    q = lay.quantized
    codes = {s: f"addresses[k, {c}] + base" for c, s in lay.columns() if s in q}
    L = [f"{s}_codes = {codes[s]}" for s in q]
    L.append(f"{_tuple([s + '_bits' for s in q])} = BLOCK_UPDATE(addresses[k, 0] + base * 4, "
             f"addresses[k, 1] + base * 4, {_tuple([s + '_codes' for s in q])}, "
             f"{_tuple([s + '_absmax[block]' for s in q])}, {_tuple([s + '_address' for s in q])}, "
             f"{_tuple(lay.floats)})")
    for s in q:
        L += _emit_scale(s)
    return L + [f"QUANTIZE({_tuple([s + '_address' for s in q])}, {_tuple([s + '_inv' for s in q])}, "
                f"{_tuple([s + '_codes' for s in q])})"]


def _generate(rule: _rules.Rule, present: tuple[bool, ...], fmt: str, stochastic: bool = False,
              kinds: tuple[str, ...] | None = None, constants: tuple[bool, ...] | None = None) -> str:
    """Source of the loop for ``rule``: parameter stored as ``fmt``, each present state stored as its ``kind``;
    the flags read per tensor, or compiled in as ``constants``.

    The loop loads (and dequantizes) each element, calls the rule, and stores (and rounds or quantizes) the
    results; 8-bit states go block by block (new values in a small buffer, then the block's absmax, then codes).
    A block whose gradient holds inf or nan is left unchanged (params, codes, absmax) and counted; the kernel
    returns that count (0 for kernels without 8-bit states).
    """
    lay = _Layout(rule, present, fmt, stochastic, kinds or tuple("plain" for _ in rule.update_states), constants)
    loop = _emit_block_loop(lay) if lay.quantized else _emit_flat_loop(lay)
    return "\n".join(_emit_header(lay) + _emit_chunk(lay) + loop + ["    return skipped", ""])


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


SPECIALISE_AFTER = 1 << 27
"""Elements stepped with one set of flags after which a kernel compiles a loop with those flags as constants (a
compile of a few seconds pays back only over long runs: 134 M elements are about 5 steps of a 25 M model)."""


class Kernel:
    """The compiled multi-tensor loop of one configuration, called as ``kernel(chunk_tensor, chunk_start,
    chunk_stop, sizes, addresses, coefficients, flags, keys) -> skipped``; ``keys[k, 0]`` is tensor ``k``'s
    stochastic-rounding key (:func:`adamkit.storage.stream_keys`; no column if nothing rounds stochastically).

    A call runs the loop that reads each tensor's flags, until calls whose tensors all carry the same flags (one
    param group: every call the engines make, except a step where some tensors start and others do not) have
    stepped :data:`SPECIALISE_AFTER` elements; from then on such calls run a loop compiled with those flags as
    constants, so that the branches they select and the code they switch off are gone from it."""

    def __init__(self, rule: _rules.Rule, present: tuple[bool, ...], fmt: str, stochastic: bool,
                 kinds: tuple[str, ...]) -> None:
        self.config = (rule, present, fmt, stochastic, kinds)
        self.loops: dict[int, Callable] = {}
        self.stepped: dict[int, int] = {}  # elements stepped per flags code, until its loop is compiled

    def loop(self, code: int) -> Callable:
        """The compiled loop for the flags ``code`` (bit j: flag j) of :func:`uniform_flags`; -1: flags read per
        tensor."""
        fn = self.loops.get(code)
        if fn is None:
            with _lock:
                fn = self.loops.get(code)
                if fn is None:
                    n = len(coefficient_names(self.config[0])[1])
                    constants = None if code < 0 else tuple(bool(code >> j & 1) for j in range(n))
                    fn = self.loops[code] = _load(*self.config, constants)
        return fn

    def __call__(self, chunk_tensor, chunk_start, chunk_stop, sizes, addresses, coefficients, flags, keys) -> int:
        code, elements = uniform_flags(flags, sizes)
        if code >= 0 and code not in self.loops:
            self.stepped[code] = self.stepped.get(code, 0) + elements
            code = code if self.stepped[code] > SPECIALISE_AFTER else -1
        return self.loop(code)(chunk_tensor, chunk_start, chunk_stop, sizes, addresses, coefficients, flags, keys)


@numba.njit(nogil=True, cache=True)
def uniform_flags(flags, sizes):
    """The flags every row of ``flags`` shares, as bits (bit j: flag j), or -1 if the rows differ (or are none);
    and the number of elements in ``sizes``."""
    elements = 0
    for k in range(sizes.shape[0]):
        elements += sizes[k]
    if flags.shape[0] == 0:
        return -1, elements
    code = 0
    for j in range(flags.shape[1]):
        first = flags[0, j] != 0
        for k in range(1, flags.shape[0]):
            if (flags[k, j] != 0) != first:
                return -1, elements
        code |= (1 << j) if first else 0
    return code, elements


def kernel(rule: _rules.Rule, present: tuple[bool, ...], fmt: str, stochastic: bool = False,
           kinds: tuple[str, ...] | None = None) -> Kernel:
    """The compiled multi-tensor loop for ``rule`` (generated, cached on disk and loaded on first use)."""
    kinds = kinds or tuple("plain" for _ in rule.update_states)
    key = (rule.name, present, fmt, stochastic, kinds)
    with _lock:
        return _kernels.setdefault(key, Kernel(rule, present, fmt, stochastic, kinds)) if key not in _kernels \
            else _kernels[key]


def _load(rule: _rules.Rule, present: tuple[bool, ...], fmt: str, stochastic: bool, kinds: tuple[str, ...],
          constants: tuple[bool, ...] | None) -> Callable:
    """Write the generated module (once per source) under the cache directory, import it, return its loop."""
    source = _generate(rule, present, fmt, stochastic, kinds, constants)
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
def _first_bad_scale(sizes, addresses):
    """(tensor, column) of the first block scale that is not a finite number >= 0, or (-1, -1). The float32 bits
    of such a scale (−0 aside) are at least those of inf: an integer max over each tensor's scales, which
    vectorizes."""
    for k in range(addresses.shape[0]):
        blocks = (sizes[k] + _states.BLOCK - 1) // _states.BLOCK
        for c in range(addresses.shape[1]):
            bits = numba.carray(address_as_pointer(addresses[k, c]), blocks, dtype=np.uint32)
            worst = np.uint32(0)
            for i in range(blocks):
                worst = max(worst, bits[i] if bits[i] != np.uint32(0x80000000) else np.uint32(0))
            if worst >= np.uint32(0x7F800000):
                return k, c
    return -1, -1


def first_bad_scale(sizes: np.ndarray, addresses: np.ndarray) -> tuple[int, int]:
    """The 8-bit block scales at ``addresses`` (tensor × state; tensor ``k`` has ``sizes[k]`` elements) checked
    before a step: (tensor, column) of the first that is not a finite number >= 0, or (-1, -1). One pass over
    1/256 of the states' elements, so an in-place edit of a scale (``state.absmax[0] = nan``) is refused, not
    stepped."""
    k, c = _first_bad_scale(sizes, np.ascontiguousarray(addresses))
    return int(k), int(c)


_SCALAR_KINDS = {"float32": np.zeros(1, np.float32), "float64": np.zeros(1, np.float64)}
"""A one-element array of each scalar-state dtype: its type picks the compiled specialisation."""


@numba.njit(nogil=True, cache=True)
def _write_scalars(addresses, values, like):
    for k in range(addresses.shape[0]):
        numba.carray(address_as_pointer(addresses[k]), 1, dtype=like.dtype)[0] = values[k]


@numba.njit(nogil=True, cache=True)
def _read_scalars(addresses, like):
    out = np.empty(addresses.shape[0], dtype=np.float64)
    for k in range(addresses.shape[0]):
        out[k] = numba.carray(address_as_pointer(addresses[k]), 1, dtype=like.dtype)[0]
    return out


def write_scalars(addresses: np.ndarray, values: np.ndarray, fmt: str) -> None:
    """Store ``values`` into the one-element tensors at ``addresses`` (per-tensor step counts, NAdam's μ product):
    one compiled loop instead of a torch call per tensor."""
    _write_scalars(addresses, np.ascontiguousarray(values, dtype=np.float64), _SCALAR_KINDS[fmt])


def read_scalars(addresses: np.ndarray, fmt: str) -> np.ndarray:
    """The values of the one-element tensors at ``addresses`` as float64: the counterpart of :func:`write_scalars`."""
    return _read_scalars(addresses, _SCALAR_KINDS[fmt])


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
