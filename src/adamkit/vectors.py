"""The 8-bit block step written as explicit 256-bit vectors (AVX2), from the same rules and state formats.

On targets with 256-bit vectors and no AVX-512, LLVM's loop vectorizer leaves the 8-bit kernels short of memory
bandwidth: AVX2 has 16 vector registers, so the rule's coefficients and the code maps' constants spill, and
narrowing 32-bit codes to bytes costs shuffles. Here the rule (:mod:`adamkit.rules`) and the code maps
(:mod:`adamkit.states`) are *traced*: called once on :class:`Lanes`, values that emit LLVM IR for eight float32
or int32 lanes instead of computing, so each operation of the one definition becomes one vector instruction.
The primitives are bound to vector instructions: the code maps' ``unless_zero`` and ``with_sign_of`` (written with
``where`` for the other engines) are one ``vpsignd`` each. The loop around it is explicit too: coefficients
broadcast once per block, codes sign- or zero-extended as they load, and four vectors of codes narrowed to 32 bytes
with two saturating packs and one permutation (``vpackssdw``, ``vpacksswb``, ``vpermd``; the codes are within ±120
and 0…248, so nothing saturates).

The two passes of a block are numba intrinsics the generated kernels call (:mod:`adamkit.kernels`) for every full
block of :data:`adamkit.states.BLOCK` elements: :func:`block_update` (dequantize, rule, new values into the
block's buffers, running absmax bits) and :func:`block_quantize` (buffer to codes). Partial blocks and the rare
rescans stay in the generated loop. Every operation is the rule's own, with the same fast-math flags as the
generated loops (``contract``, ``arcp``), so the two give the same bits (tests/test_vectors.py). With AVX2 code on
Zen 4 the 8-bit kernels take 7–23 % less time than LLVM's loops, AdamW's 18 % (one thread, in L2); LLVM's loops
stay faster on AVX-512 targets (:func:`adamkit.kernels.explicit_vectors`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import rules as _rules
from . import states as _states

LANES = 8
"""float32 lanes of one AVX2 register."""
FLAGS = ("contract", "arcp")
"""The generated loops' fast-math flags (FMA contraction, reciprocals of loop constants)."""
_F32, _I32, _I1 = ir.FloatType(), ir.IntType(32), ir.IntType(1)
_FV, _IV = ir.VectorType(_F32, LANES), ir.VectorType(_I32, LANES)


def _declare(builder: ir.IRBuilder, name: str, result: ir.Type, arguments: list[ir.Type]) -> ir.Function:
    module = builder.module
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(result, arguments), name=name)


class Lanes:
    """Eight float32, int32 or boolean lanes of a vector being built in LLVM IR: arithmetic on them emits the
    instruction instead of computing. Python numbers (the rules' and code maps' constants) become splats of the
    other operand's type. A branch on a value (``if x > 0``) cannot be traced and raises."""

    __slots__ = ("builder", "value")
    __hash__ = None

    def __init__(self, builder: ir.IRBuilder, value: ir.Value) -> None:
        self.builder, self.value = builder, value

    @property
    def kind(self) -> str:
        element = self.value.type.element
        return "float" if element == _F32 else "bool" if element == _I1 else "int"

    def _wrap(self, value: ir.Value) -> "Lanes":
        return Lanes(self.builder, value)

    def _operand(self, other: Any) -> ir.Value:
        if isinstance(other, Lanes):
            return other.value
        if self.kind == "float":
            return ir.Constant(_FV, [float(np.float32(other))] * LANES)
        return ir.Constant(self.value.type, [int(other) & 0xFFFFFFFF] * LANES)

    def _binary(self, float_op: str, int_op: str, other: Any, reverse: bool = False) -> "Lanes":
        a, b = self.value, self._operand(other)
        a, b = (b, a) if reverse else (a, b)
        if self.kind == "float":
            return self._wrap(getattr(self.builder, float_op)(a, b, flags=FLAGS))
        return self._wrap(getattr(self.builder, int_op)(a, b))

    def __add__(self, other): return self._binary("fadd", "add", other)
    def __radd__(self, other): return self._binary("fadd", "add", other, True)
    def __sub__(self, other): return self._binary("fsub", "sub", other)
    def __rsub__(self, other): return self._binary("fsub", "sub", other, True)
    def __mul__(self, other): return self._binary("fmul", "mul", other)
    def __rmul__(self, other): return self._binary("fmul", "mul", other, True)
    def __truediv__(self, other): return self._binary("fdiv", "sdiv", other)
    def __rtruediv__(self, other): return self._binary("fdiv", "sdiv", other, True)
    def __lshift__(self, other): return self._binary("", "shl", other)
    def __rshift__(self, other): return self._binary("", "ashr", other)  # int32 >> is arithmetic, as NumPy's
    def __and__(self, other): return self._binary("", "and_", other)
    def __or__(self, other): return self._binary("", "or_", other)

    def __neg__(self):
        if self.kind == "float":
            return self._wrap(self.builder.fneg(self.value, flags=FLAGS))
        return self._wrap(self.builder.neg(self.value))

    def __abs__(self):
        if self.kind == "float":
            fabs = _declare(self.builder, "llvm.fabs.v8f32", _FV, [_FV])
            return self._wrap(self.builder.call(fabs, [self.value]))
        return where(self < 0, -self, self)

    def _compare(self, op: str, other: Any) -> "Lanes":
        b = self._operand(other)
        if self.kind == "float":  # Python's and NumPy's comparisons: ordered, except != (true for nan)
            compare = self.builder.fcmp_unordered if op == "!=" else self.builder.fcmp_ordered
            return self._wrap(compare(op, self.value, b, flags=FLAGS))
        return self._wrap(self.builder.icmp_signed(op, self.value, b))

    def __lt__(self, other): return self._compare("<", other)
    def __le__(self, other): return self._compare("<=", other)
    def __gt__(self, other): return self._compare(">", other)
    def __ge__(self, other): return self._compare(">=", other)
    def __eq__(self, other): return self._compare("==", other)
    def __ne__(self, other): return self._compare("!=", other)

    def __bool__(self):
        raise TypeError("a branch on a value cannot be traced into vector code: use where(...)")


def where(condition: Lanes, a: Any, b: Any) -> Lanes:
    """Lane-wise ``a if condition else b``."""
    like = a if isinstance(a, Lanes) else b
    return like._wrap(like.builder.select(condition.value, like._operand(a), like._operand(b)))


def _sqrt(x: Lanes) -> Lanes:
    return x._wrap(x.builder.call(_declare(x.builder, "llvm.sqrt.v8f32", _FV, [_FV]), [x.value]))


def _maximum(a: Lanes, b: Lanes) -> Lanes:
    """:func:`adamkit.rules._scalar_maximum` lane-wise: NaN if either is NaN."""
    return where((a != a) | (b != b), a + b, where(b > a, b, a))


def _lerp(a: Lanes, b: Lanes, w: Lanes) -> Lanes:
    """:func:`adamkit.rules._scalar_lerp` lane-wise (``w`` is a coefficient, the same in every lane)."""
    near_a = abs(w) < 0.5
    return where(near_a, a, b) + (b - a) * where(near_a, w, w - w / w)


def _variance(v: Lanes, a: Lanes) -> Lanes:
    """:func:`adamkit.rules._scalar_variance` lane-wise."""
    return where((v == np.float32(np.inf)) & (a - a == 0), v, v - a * a)


def _bits(x: Lanes) -> Lanes:
    return x._wrap(x.builder.bitcast(x.value, _IV))


def _float(x: Lanes) -> Lanes:
    return x._wrap(x.builder.bitcast(x.value, _FV))


def _min(a: Lanes, b: Any) -> Lanes:
    """numba's ``min`` of two numbers: ``b`` where ``b < a``, else ``a``."""
    return where(a > b, b, a)


def _max(a: Lanes, b: Any) -> Lanes:
    """numba's ``max``: ``b`` where ``b > a``, else ``a``."""
    return where(a < b, b, a)


def _psign(x: Lanes, c: Lanes) -> Lanes:
    """``vpsignd``: ``x`` where ``c > 0``, ``−x`` where ``c < 0``, 0 where ``c = 0``."""
    psign = _declare(x.builder, "llvm.x86.avx2.psign.d", _IV, [_IV, _IV])
    return x._wrap(x.builder.call(psign, [x.value, c.value]))


RULE_OPS = {"sqrt": _sqrt, "maximum": _maximum, "lerp": _lerp, "variance": _variance}
"""The rules' primitives on :class:`Lanes` (the scalar engine's semantics, lane by lane)."""
STATE_OPS = {"f32_bits": _bits, "bits_f32": _float, "minimum": _min, "maximum": _max, "where": where,
             "i32": lambda x: x, "unless_zero": _psign, "with_sign_of": lambda c, x: _psign(c, _bits(x))}
"""The code maps' primitives on :class:`Lanes` (32-bit lanes already)."""


@functools.cache
def traced(kind: str, name: str) -> Callable:
    """The rule ``name`` (``kind`` "rule") or the :mod:`adamkit.states` element function ``name`` (``kind``
    "state"), bound to :class:`Lanes` primitives."""
    if kind == "rule":
        return _rules.bind(_rules.RULES[name].update, RULE_OPS)
    helpers = {k: f for k, f in _states.HELPERS.items() if k not in STATE_OPS}
    return _rules.bind(getattr(_states, name), STATE_OPS, helpers=helpers)


# -- the two passes of a full block ------------------------------------------------------------------------------

def _pointer(builder: ir.IRBuilder, address: ir.Value, element: ir.Type) -> ir.Value:
    """An integer address as a pointer to ``element`` (addresses, not arrays: no reference counting per block)."""
    return builder.inttoptr(address, element.as_pointer())


def _vector_at(builder: ir.IRBuilder, pointer: ir.Value, index: ir.Value, vector: ir.Type) -> ir.Value:
    """A pointer to the ``vector`` starting at element ``index`` of ``pointer`` (alignment: one element)."""
    return builder.bitcast(builder.gep(pointer, [index]), vector.as_pointer())


def _splat(builder: ir.IRBuilder, scalar: ir.Value) -> ir.Value:
    one = builder.insert_element(ir.Constant(ir.VectorType(scalar.type, LANES), ir.Undefined), scalar, _I32(0))
    return builder.shuffle_vector(one, one, ir.Constant(_IV, [0] * LANES))


def _load_codes(builder: ir.IRBuilder, pointer: ir.Value, index: ir.Value, signed: bool) -> ir.Value:
    codes = builder.load(_vector_at(builder, pointer, index, ir.VectorType(ir.IntType(8), LANES)), align=1)
    return builder.sext(codes, _IV) if signed else builder.zext(codes, _IV)


def _reduce_max(builder: ir.IRBuilder, lanes: ir.Value) -> ir.Value:
    reduce = _declare(builder, "llvm.vector.reduce.umax.v8i32", _I32, [_IV])
    return builder.call(reduce, [lanes])


def _update_at(rule: _rules.Rule, states: tuple[str, ...], constants: tuple[bool, ...]) -> Callable:
    """An emitter of the element step for the 8 elements at ``index``: load (dequantize), the rule, store the
    parameter and each state's new values into its buffer, and keep the running max of their magnitudes' bits."""
    floats, bools = _coefficient_names(rule)
    names = list(inspect.signature(rule.update).parameters)[2 + len(rule.update_states):]
    update = traced("rule", rule.name)
    load = {s: traced("state", "dequantize_signed" if s in _states.SIGNED_STATES else "dequantize_unsigned")
            for s in states}

    def emit(builder, theta_ptr, g_ptr, code_ptrs, scales, buffer_ptrs, coefficients, maxima, index):
        lanes = lambda v: Lanes(builder, v)  # noqa: E731
        theta = builder.load(_vector_at(builder, theta_ptr, index, _FV), align=4)
        g = builder.load(_vector_at(builder, g_ptr, index, _FV), align=4)
        values = {s: load[s](lanes(_load_codes(builder, p, index, s in _states.SIGNED_STATES)), lanes(scale))
                  for s, p, scale in zip(states, code_ptrs, scales)}
        zero = lanes(ir.Constant(_FV, [0.0] * LANES))
        arguments = {**dict(zip(floats, map(lanes, coefficients))), **dict(zip(bools, constants))}
        result = update(lanes(theta), lanes(g), *[values.get(s, zero) for s in rule.update_states],
                        *[arguments[n] for n in names])
        builder.store(result[0].value, _vector_at(builder, theta_ptr, index, _FV), align=4)
        for j, (s, p) in enumerate(zip(states, buffer_ptrs)):
            new = result[1 + rule.update_states.index(s)]
            builder.store(new.value, _vector_at(builder, p, index, _FV), align=4)
            maxima[j] = _umax(builder, maxima[j], _bits(abs(new)).value)

    return emit


_PACKS = {True: ("llvm.x86.avx2.packssdw", "llvm.x86.avx2.packsswb"),
          False: ("llvm.x86.avx2.packusdw", "llvm.x86.avx2.packuswb")}
_I16V, _I8V = ir.VectorType(ir.IntType(16), 16), ir.VectorType(ir.IntType(8), 32)
PACKED = 4 * LANES
"""Codes narrowed and stored together: four vectors, one 32-byte store."""


def _quantize_at(state: str) -> Callable:
    """An emitter of :func:`adamkit.states.quantize_signed` / ``quantize_unsigned`` for the :data:`PACKED` values
    at ``index``: four vectors of 32-bit codes, two saturating packs to bytes, one permutation back to element
    order, one store."""
    signed = state in _states.SIGNED_STATES
    quantize = traced("state", "quantize_signed" if signed else "quantize_unsigned")
    pack32, pack16 = _PACKS[signed]

    def emit(builder, values_ptr, inv, codes_ptr, index):
        codes = []
        for q in range(4):
            at = builder.add(index, ir.Constant(index.type, q * LANES))
            x = builder.load(_vector_at(builder, values_ptr, at, _FV), align=4)
            codes.append(quantize(Lanes(builder, x), Lanes(builder, inv)).value)
        words = [builder.call(_declare(builder, pack32, _I16V, [_IV, _IV]), pair) for pair in (codes[:2], codes[2:])]
        interleaved = builder.call(_declare(builder, pack16, _I8V, [_I16V, _I16V]), words)
        # the packs work within 128-bit halves: dwords hold codes 0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, ...
        order = builder.shuffle_vector(builder.bitcast(interleaved, _IV), ir.Constant(_IV, ir.Undefined),
                                       ir.Constant(_IV, [0, 4, 1, 5, 2, 6, 3, 7]))
        builder.store(builder.bitcast(order, _I8V), _vector_at(builder, codes_ptr, index, _I8V), align=1)

    return emit


def _coefficient_names(rule: _rules.Rule) -> tuple[list[str], list[str]]:
    from .kernels import coefficient_names
    return coefficient_names(rule)


def _unpack(builder: ir.IRBuilder, value: ir.Value, count: int) -> list[ir.Value]:
    return [builder.extract_value(value, j) for j in range(count)]


def _block_loop(builder: ir.IRBuilder, step: int, body: Callable[[ir.Value], None]) -> None:
    """``body(index)`` for index = 0, ``step``, … below :data:`adamkit.states.BLOCK`."""
    i64 = ir.IntType(64)
    with cgutils.for_range_slice(builder, i64(0), i64(_states.BLOCK), i64(step)) as (index, _):
        body(index)


def block_update(rule_name: str, states: tuple[str, ...], constants: tuple[bool, ...]) -> Callable:
    """The element pass of one full block as a numba intrinsic:
    ``block_update(theta, g, codes, scales, buffers, coefficients) -> bits``.

    Addresses (integers) of :data:`adamkit.states.BLOCK` elements: ``theta`` and ``g`` (float32, ``theta``
    updated in place); per 8-bit state (tuples, in the rule's state order; ``states`` names them): ``codes`` and
    ``scales`` (its codes and absmax), ``buffers`` (float32, receiving the new values). ``coefficients``: the
    rule's float coefficients (float32, :func:`adamkit.kernels.coefficient_names` order); ``constants``: its flags.
    Returns the largest float32 bits of ``|new value|`` per state (an integer max: the order of non-negative
    floats)."""
    rule = _rules.RULES[rule_name]
    floats = _coefficient_names(rule)[0]
    update = _update_at(rule, states, constants)
    n = len(states)

    @intrinsic
    def step(typingctx, theta, g, codes, scales, buffers, coefficients):
        if not all(len(t) == n for t in (codes, scales, buffers)) or len(coefficients) != len(floats):
            return None
        signature = types.UniTuple(types.uint32, n)(theta, g, codes, scales, buffers, coefficients)

        def codegen(context, builder, sig, args):
            theta_ptr, g_ptr = (_pointer(builder, a, _F32) for a in args[:2])
            code_ptrs = [_pointer(builder, v, ir.IntType(8)) for v in _unpack(builder, args[2], n)]
            scales = [_splat(builder, v) for v in _unpack(builder, args[3], n)]
            buffer_ptrs = [_pointer(builder, v, _F32) for v in _unpack(builder, args[4], n)]
            coefficient_lanes = [_splat(builder, c) for c in _unpack(builder, args[5], len(floats))]
            slots = [cgutils.alloca_once_value(builder, ir.Constant(_IV, [0] * LANES)) for _ in states]

            def body(index):
                maxima = [builder.load(slot) for slot in slots]
                update(builder, theta_ptr, g_ptr, code_ptrs, scales, buffer_ptrs, coefficient_lanes, maxima, index)
                for slot, value in zip(slots, maxima):
                    builder.store(value, slot)

            _block_loop(builder, LANES, body)
            result = [_reduce_max(builder, builder.load(slot)) for slot in slots]
            return context.make_tuple(builder, sig.return_type, result)

        return signature, codegen

    return step


def _umax(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    return builder.select(builder.icmp_unsigned(">", b, a), b, a)


def block_quantize(states: tuple[str, ...]) -> Callable:
    """The quantize pass of one full block as a numba intrinsic: ``block_quantize(values, inv_scales, codes)``,
    tuples of addresses and scales per state as in :func:`block_update`: each state's float32 ``values`` to the
    codes of :func:`adamkit.states.quantize_signed` / ``quantize_unsigned`` with ``inv_scale`` = 1/absmax, every
    state in one loop."""
    quantizers = [_quantize_at(s) for s in states]
    n = len(states)

    @intrinsic
    def quantize_block(typingctx, values, inv_scales, codes):
        if not all(len(t) == n for t in (values, inv_scales, codes)):
            return None

        def codegen(context, builder, sig, args):
            values_ptrs = [_pointer(builder, v, _F32) for v in _unpack(builder, args[0], n)]
            inverses = [_splat(builder, v) for v in _unpack(builder, args[1], n)]
            code_ptrs = [_pointer(builder, v, ir.IntType(8)) for v in _unpack(builder, args[2], n)]

            def body(index):
                for quantize, values, inv, target in zip(quantizers, values_ptrs, inverses, code_ptrs):
                    quantize(builder, values, inv, target, index)

            _block_loop(builder, PACKED, body)
            return context.get_dummy_value()

        return types.void(values, inv_scales, codes), codegen

    return quantize_block
