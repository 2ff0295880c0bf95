"""``adamkit bench``: every optimizer step against torch.optim and against the machine's memory floor, in one run.

The floor is a compiled, multi-threaded loop with the same memory streams as the step (for Adam: the gradient read
once, parameter and two states read and written once), so "% of floor" is the share of the machine's bandwidth the
step reaches. Ratios against torch.optim are measured in the same process, one after the other. With
``--state-precision``, AdamW with bf16 and 8-bit states is set against the floor of its own storage (the same loop
with 16- or 8-bit state streams), so the table shows both the speed-up over torch and how much of it was reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

from .states import PRECISIONS

CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("SGD momentum", "SGD", dict(lr=0.01, momentum=0.9)),
    ("SGD Nesterov", "SGD", dict(lr=0.01, momentum=0.9, nesterov=True)),
    ("Adagrad", "Adagrad", dict()),
    ("RMSprop", "RMSprop", dict()),
    ("RMSprop centered", "RMSprop", dict(centered=True)),
    ("Adam", "Adam", dict()),
    ("AMSGrad", "Adam", dict(amsgrad=True)),
    ("AdamW", "AdamW", dict()),
    ("Adamax", "Adamax", dict()),
    ("NAdam", "NAdam", dict()),
    ("RAdam", "RAdam", dict()),
]


def transformer_shapes(total: int, d: int | None = None) -> list[tuple[int, ...]]:
    """A transformer-like mix: per layer qkv (d×3d), proj (d×d), MLP (d×4d, 4d×d), biases and norms.

    ``d`` defaults to the width giving about eight layers (512 for 25 M parameters).
    """
    if d is None:
        d = int(min(1024, max(64, (total / 96) ** 0.5 // 64 * 64)))
    layer = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    per_layer = sum(int(np.prod(s)) for s in layer)
    shapes: list[tuple[int, ...]] = [(1000, d)]  # embedding
    while sum(int(np.prod(s)) for s in shapes) + per_layer <= total:
        shapes.extend(layer)
    return shapes


# An AVX2 machine's code on an AVX-512 one: numba takes its target CPU and its features from these variables (a CPU
# name alone keeps the host's features, AVX-512 included), torch its kernels' ISA from ATEN_CPU_CAPABILITY.
AVX2_ENVIRONMENT = {
    "NUMBA_CPU_NAME": "haswell",
    "NUMBA_CPU_FEATURES": "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+lzcnt,+mmx,"
                          "+movbe,+pclmul,+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt",
    "ATEN_CPU_CAPABILITY": "avx2"}


def _loops(isa: dict) -> str:
    widened = ", low-precision loops widened" if isa.get("low_precision_loops") == "widened" else ""
    return widened + (", 8-bit blocks as explicit vectors" if isa.get("int8_blocks") == "explicit vectors" else "")


def compiled_isa() -> dict[str, str]:
    """The vector ISA the kernels are compiled for (numba's target: NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, else the
    host's), the one torch's CPU kernels run, the kernels' prefetch distance in elements (0: none), whether the
    low-precision kernels' loops are vectorized for bandwidth (:func:`adamkit.kernels.widens_loops`) and whether
    8-bit blocks run as explicit vectors (:func:`adamkit.kernels.explicit_vectors`)."""
    import numba
    from llvmlite import binding

    from .kernels import AHEAD, explicit_vectors, target_features, widens_loops
    on = target_features()
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse2", "SSE2"))
                if flag in on), "scalar")
    try:
        import torch
        torch_isa = torch.backends.cpu.get_cpu_capability().replace("AVX512", "AVX-512")
    except ImportError:
        torch_isa = "none"
    return {"adamkit": isa, "numba_cpu": numba.config.CPU_NAME or binding.get_host_cpu_name(), "torch": torch_isa,
            "host_cpu": binding.get_host_cpu_name(), "prefetch": AHEAD,
            "low_precision_loops": "widened" if widens_loops("float32", ("int8",)) else "LLVM's choice",
            "int8_blocks": "explicit vectors" if explicit_vectors("float32", ("int8",)) else "compiled loops"}


def _stream_kernel():
    """The floor loop: read a gradient once, read-modify-write ``n_rmw`` float32 arrays and ``n_narrow`` arrays of
    ``narrow``'s dtype (8- or 16-bit state codes, bf16 params) once; with no float32 array, the gradient has the
    narrow dtype and is read with the first narrow array (compiled on first use)."""
    import numba
    from numba import prange
    from . import kernels

    @numba.njit(parallel=True, nogil=True, error_model="numpy")
    def stream(tensor, start, stop, sizes, addresses, n_rmw, narrow, n_narrow):
        one = narrow[0]
        for c in prange(tensor.shape[0]):
            k = tensor[c]
            lo, hi = start[c], stop[c]
            g = numba.carray(kernels.address_as_pointer(addresses[k, 0]), sizes[k], dtype=np.float32)[lo:hi]
            g_narrow = numba.carray(kernels.address_as_pointer(addresses[k, 0]), sizes[k], dtype=narrow.dtype)[lo:hi]
            for s in range(n_rmw):
                a = numba.carray(kernels.address_as_pointer(addresses[k, 1 + s]), sizes[k], dtype=np.float32)[lo:hi]
                for i in range(a.size):
                    a[i] = a[i] * np.float32(0.999) + g[i]
            for s in range(n_narrow):
                b = numba.carray(kernels.address_as_pointer(addresses[k, 1 + n_rmw + s]), sizes[k],
                                 dtype=narrow.dtype)[lo:hi]
                if n_rmw == 0 and s == 0:
                    for i in range(b.size):
                        b[i] = b[i] + g_narrow[i]
                else:
                    for i in range(b.size):
                        b[i] = b[i] + one

    return stream


def floor_step(shapes: list[tuple[int, ...]], rmw_streams: int, narrow_streams: int = 0,
               narrow_dtype: Any = np.uint8) -> Callable[[], None]:
    """A callable with the memory traffic of a step: one gradient read stream, ``rmw_streams`` float32
    read-modify-write ones and ``narrow_streams`` read-modify-write ones of ``narrow_dtype`` (low-precision states:
    uint16 for bf16, uint8 for 8-bit codes, whose per-block absmax adds 1/64 of their bytes and is left out). The
    gradient is float32, or ``narrow_dtype`` when ``rmw_streams`` is 0 (bf16 params)."""
    from . import kernels
    stream = _stream_kernel()
    sizes = np.array([int(np.prod(s)) for s in shapes], dtype=np.int64)
    grad_dtype = np.float32 if rmw_streams else narrow_dtype
    arrays = [[np.ones(n, dtype=grad_dtype)] + [np.ones(n, dtype=np.float32) for _ in range(rmw_streams)]
              + [np.zeros(n, dtype=narrow_dtype) for _ in range(narrow_streams)] for n in sizes]
    addresses = np.array([[a.ctypes.data for a in row] for row in arrays], dtype=np.int64)
    table = kernels.chunk_table(sizes)
    narrow = np.ones(1, dtype=narrow_dtype)

    def step() -> None:
        stream(*table, sizes, addresses, rmw_streams, narrow, narrow_streams)

    step.keep_alive = arrays  # type: ignore[attr-defined]
    return step


def _params(shapes, seed=0, dtype=None):
    import torch
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(dtype)
    return ps


def interleaved_medians(steps_by_name: dict[str, Callable[[], Any]], rounds: int,
                        warmup: int = 6) -> dict[str, float]:
    """Median ms of each callable, timed round-robin (one call of each per round) so drift hits all alike.

    Each round starts one place further along the list, so every callable runs equally often right after each
    other one (the first call after a cache-flushing one pays for code and data that the later ones find warm).

    ``warmup`` untimed rounds come first: first-use compiles and lazy state, and on virtual machines freshly
    allocated memory can stream slowly for the first few passes (a new int8 AdamW's first ~6 steps took 11–17 ms,
    then 7 ms, on a 2-vCPU cloud VM), while a training run lives in the steady state.
    """
    for _ in range(warmup):
        for fn in steps_by_name.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps_by_name}
    order = list(steps_by_name.items())
    for r in range(rounds):
        for name, fn in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _state_streams(name: str, cfg: dict) -> int:
    """Read-modify-write streams of a step: the parameter plus each state array."""
    from . import rules
    h = rules.RULES[name].hyperparameters(**cfg)
    return 1 + len(rules.RULES[name].states(h))


def machine() -> dict[str, Any]:
    """What the numbers were measured on, the ISA of both sides included."""
    import torch
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "python": sys.version.split()[0], "torch": torch.__version__,
            "isa": compiled_isa()}


def run(total: int, steps: int, only: list[str] | None, small: bool, log: Callable[[str], None]) -> dict:
    import torch
    import adamkit.torch as akt

    suites = [("transformer", transformer_shapes(total))]
    if small:
        suites.append(("1000x1024", [(1024,)] * 1000))
    results: dict[str, Any] = {"machine": machine(), "steps": steps, "suites": {}}
    for suite, shapes in suites:
        n = sum(int(np.prod(s)) for s in shapes)
        log(f"[{suite}] {len(shapes)} tensors, {n / 1e6:.1f} M params, median of {steps} steps")
        rows = []
        configs = [c for c in CONFIGS if not only or c[0] in only or c[1] in only]
        if suite == "1000x1024":
            configs = [c for c in configs if c[0] in ("Adam", "AdamW")]
        for label, name, cfg in configs:
            rmw = _state_streams(name, cfg)
            bytes_per_param = 4 * (1 + 2 * rmw)
            torch_cls = getattr(torch.optim, name)
            # "adamkit" does the same work as torch.optim (check_finite=False, the default); for Adam the opt-in
            # check_finite=True is measured too, to show what the finite scan costs.
            makers: dict[str, Callable[[list], Any]] = {
                "adamkit": lambda ps: akt.OPTIMIZERS[name](ps, **cfg, check_finite=False)}
            if label == "Adam":
                makers["adamkit (check_finite)"] = lambda ps: akt.OPTIMIZERS[name](ps, **cfg, check_finite=True)
            makers["torch single"] = lambda ps: torch_cls(ps, **cfg, foreach=False)
            makers["torch foreach"] = lambda ps: torch_cls(ps, **cfg, foreach=True)
            if "fused" in torch_cls.__init__.__code__.co_varnames:
                makers["torch fused"] = lambda ps: torch_cls(ps, **cfg, fused=True)
            calls: dict[str, Callable[[], Any]] = {"floor": floor_step(shapes, rmw)}
            for path, make in makers.items():
                calls[path] = make(_params(shapes)).step
            ms = interleaved_medians(calls, steps)
            floor = ms.pop("floor")
            log(f"  {label:17s} floor {floor:7.2f} ms | " + " | ".join(f"{k} {v:.2f}" for k, v in ms.items()))
            torch_best_path = min((k for k in ms if k.startswith("torch")), key=ms.get)
            ours = ms["adamkit"]
            rows.append({"config": label, "optimizer": name, "options": cfg, "bytes_per_param": bytes_per_param,
                         "floor_ms": floor, "ms": ms, "torch_best_path": torch_best_path,
                         "torch_best_ms": ms[torch_best_path], "speedup_vs_torch_best": ms[torch_best_path] / ours,
                         "pct_of_floor": 100 * floor / ours, "mparams_per_s": n / ours / 1e3,
                         "effective_gb_s": n * bytes_per_param / ours / 1e6})
            del calls
        results["suites"][suite] = {"params": n, "tensors": len(shapes), "rows": rows}
    return results


def _tensor_bytes(t: Any) -> int:
    """Real bytes of a tensor; a wrapper subclass (torchao's 8-bit state) is counted by the tensors it holds."""
    if hasattr(t, "__tensor_flatten__") and type(t).__name__ != "Tensor":
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes(opt: Any) -> int:
    """Bytes held in the optimizer's array states (codes, scales, moments; not the step counters)."""
    return sum(_tensor_bytes(v) for st in opt.state.values() for k, v in st.items()
               if k not in ("step", "mu_product") and hasattr(v, "numel"))


def _state_precision_makers(precisions: list[str], libraries: bool, bf16_params: bool) -> dict[str, tuple]:
    """label -> (make optimizer from params, the storage whose floor it is set against, params dtype name).

    adamkit rows do the work torch does (check_finite=False: int8 still leaves a block with a non-finite gradient
    unchanged); the last state-precision row adds the opt-in check_finite=True scan."""
    import importlib.util
    import torch
    import adamkit.torch as akt
    makers: dict[str, tuple] = {"torch fused fp32": (lambda ps: torch.optim.AdamW(ps, fused=True), "fp32", "float32"),
                                "adamkit fp32": (lambda ps: akt.AdamW(ps, check_finite=False), "fp32", "float32")}
    for precision in precisions:
        makers[f"adamkit {precision}"] = (lambda ps, precision=precision: akt.AdamW(
            ps, state_precision=precision, check_finite=False), precision, "float32")
    if precisions:
        last = precisions[-1]
        makers[f"adamkit {last}, check_finite=True"] = (lambda ps: akt.AdamW(ps, state_precision=last,
                                                                             check_finite=True), last,
                                                        "float32")
    if bf16_params:  # params, gradients and states all bfloat16
        makers["torch fused, bf16 params"] = (lambda ps: torch.optim.AdamW(ps, fused=True), "bf16 params", "bfloat16")
        makers["adamkit bf16 params"] = (lambda ps: akt.AdamW(ps, check_finite=False), "bf16 params", "bfloat16")
        makers["adamkit bf16 params, stochastic rounding"] = (lambda ps: akt.AdamW(
            ps, check_finite=False, stochastic_rounding=True), "bf16 params", "bfloat16")
    if libraries and importlib.util.find_spec("bitsandbytes"):
        import bitsandbytes as bnb
        makers["bitsandbytes AdamW8bit"] = (lambda ps: bnb.optim.AdamW8bit(ps), "int8", "float32")
    if libraries and importlib.util.find_spec("torchao"):
        from torchao.optim import AdamW8bit
        makers["torchao AdamW8bit"] = (lambda ps: AdamW8bit(ps), "int8", "float32")
    return makers


# each storage's memory floor: (float32 read-modify-write streams, narrow ones, their dtype); the gradient is read
# as float32, or as the narrow dtype when no stream is float32 (bf16 params: param, gradient and states 16-bit)
FLOOR_STREAMS = {"fp32": (3, 0, np.uint8), "bf16": (1, 2, np.uint16), "int8": (1, 2, np.uint8),
                 "bf16 params": (0, 3, np.uint16)}


def run_state_precision(total: int, steps: int, precisions: list[str], log: Callable[[str], None],
                        libraries: bool = True, bf16_params: bool = False) -> dict:
    """AdamW with low-precision states (and, with ``bf16_params``, bf16 params with and without stochastic
    rounding) next to torch's fused AdamW (and bitsandbytes / torchao if installed), each against its floor."""
    import resource
    import torch

    shapes = transformer_shapes(total)
    n = sum(int(np.prod(s)) for s in shapes)
    makers = _state_precision_makers(precisions, libraries, bf16_params)
    log(f"[state precision] AdamW, {len(shapes)} tensors, {n / 1e6:.1f} M params, median of {steps} rounds "
        f"(adamkit rows check_finite=False unless marked)")
    floors = {storage: floor_step(shapes, *FLOOR_STREAMS[storage]) for _, storage, _ in makers.values()}
    calls: dict[str, Callable[[], Any]] = {f"floor {k}": f for k, f in floors.items()}
    optimizers = {}
    for label, (make, _, dtype) in makers.items():
        opt = make(_params(shapes, dtype=getattr(torch, dtype)))
        calls[label], optimizers[label] = opt.step, opt
    ms = interleaved_medians(calls, steps)
    floor_ms = {k: ms.pop(f"floor {k}") for k in floors}
    log("  floors (same streams, no math): " + "  ".join(
        f"{k} {v:.2f} ms ({ms['torch fused fp32'] / v:.2f}x vs torch fused fp32)" for k, v in floor_ms.items()))
    rows = []
    eight_bit = [k for k in ms if k.endswith("AdamW8bit")]
    for label, value in ms.items():
        b = state_bytes(optimizers[label]) / n
        storage = makers[label][1]
        row = {"optimizer": label, "ms": value, "state_bytes_per_param": b, "params": makers[label][2],
               "speedup_vs_torch_fused": ms["torch fused fp32"] / value, "floor": storage,
               "floor_ms": floor_ms[storage], "pct_of_floor": 100 * floor_ms[storage] / value}
        row.update({f"speedup_vs_{k.split()[0]}": ms[k] / value for k in eight_bit})
        rows.append(row)
        others = "  ".join(f"{ms[k] / value:6.1f}x vs {k.split()[0]}" for k in eight_bit)
        log(f"  {label:40s} {value:8.2f} ms  {b:5.2f} B/param state  "
            f"{ms['torch fused fp32'] / value:5.2f}x vs torch fused fp32  {row['pct_of_floor']:4.0f} % of "
            f"{storage} floor  {others}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"params": n, "rows": rows, "floors_ms": floor_ms, "process_peak_mib": peak}


def peak_memory(total: int, precisions: list[str | None]) -> dict[str, dict[str, float]]:
    """Process peak memory (MiB) of a fresh process that builds the model and takes 3 AdamW steps, per precision.

    Each measurement runs in its own interpreter so that peaks do not mix; params and grads are fp32 in all.
    """
    import json as _json
    import subprocess
    code = (
        "import sys, json, torch\n"
        "def hwm():  # peak resident set of this process (resets at exec, unlike ru_maxrss)\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "import adamkit.torch as akt\n"
        "from adamkit.bench import transformer_shapes, state_bytes\n"
        "shapes = transformer_shapes(int(sys.argv[1])); prec = None if sys.argv[2] == 'None' else sys.argv[2]\n"
        "ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]\n"
        "base = hwm()\n"
        "opt = akt.AdamW(ps, state_precision=prec) if prec != 'torch' else torch.optim.AdamW(ps, fused=True)\n"
        "for _ in range(3):\n"
        "    for p in ps: p.grad = torch.full_like(p, 1e-3)\n"
        "    opt.step()\n"
        "peak = hwm()\n"
        "n = sum(p.numel() for p in ps)\n"
        "print(json.dumps({'peak_mib': peak / 1024, 'before_optimizer_mib': base / 1024,\n"
        "                  'state_bytes_per_param': state_bytes(opt) / n, 'params': n}))\n")
    out = {}
    for precision in precisions:
        res = subprocess.run([sys.executable, "-c", code, str(total), str(precision)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-2000:])
        out[str(precision)] = _json.loads(res.stdout.strip().splitlines()[-1])
    return out


def table(results: dict) -> str:
    out = []
    for suite, data in results["suites"].items():
        out.append(f"\n{suite}: {data['tensors']} tensors, {data['params'] / 1e6:.1f} M params "
                   f"({results['machine']['threads']} threads)")
        out.append("| config | B/param | adamkit ms | floor ms | torch best ms (path) | × vs torch best | % of floor "
                   "| GB/s | Mparam/s |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in data["rows"]:
            best_path = r["torch_best_path"]
            out.append(f"| {r['config']} | {r['bytes_per_param']} | {r['ms']['adamkit']:.2f} | {r['floor_ms']:.2f} | "
                       f"{r['torch_best_ms']:.2f} ({best_path.replace('torch ', '')}) | "
                       f"{r['speedup_vs_torch_best']:.2f}× | {r['pct_of_floor']:.0f} % | {r['effective_gb_s']:.1f} | "
                       f"{r['mparams_per_s']:.0f} |")
    return "\n".join(out)


def state_table(results: dict) -> str:
    """The state-precision table: each AdamW row against torch fused fp32 and its own storage's floor, with the
    ISA both sides ran, the floors, and (with bf16 params) what stochastic rounding costs."""
    sp, isa = results["state_precision"], results["machine"]["isa"]
    rows, floors = sp["rows"], sp["floors_ms"]
    others = [k[len("speedup_vs_"):] for k in rows[0] if k.startswith("speedup_vs_") and k != "speedup_vs_torch_fused"]
    out = [f"\nadamkit {isa['adamkit']} (prefetch {isa.get('prefetch') or 'off'}{_loops(isa)}), "
           f"torch {isa['torch']}, {results['machine']['threads']} threads, {sp['params'] / 1e6:.1f} M params",
           "| AdamW | ms/step | state B/param | × vs torch fused fp32 | % of its floor |" + "".join(
               f" × vs {o} |" for o in others), "|---|---|---|---|---|" + "---|" * len(others)]
    for r in rows:
        out.append(f"| {r['optimizer']} | {r['ms']:.2f} | {r['state_bytes_per_param']:.2f} | "
                   f"{r['speedup_vs_torch_fused']:.2f}× | {r['pct_of_floor']:.0f} % ({r['floor']}) |"
                   + "".join(f" {r[f'speedup_vs_{o}']:.1f}× |" for o in others))
    ms = {r["optimizer"]: r["ms"] for r in rows}
    out.append("\nFloors (same memory streams, no math): " + ", ".join(
        f"{k} {v:.2f} ms = {ms['torch fused fp32'] / v:.2f}× torch fused fp32" for k, v in floors.items())
        + " — the most any step of that storage could reach in this run.")
    if "adamkit bf16 params, stochastic rounding" in ms:
        out.append(f"bf16 params: stochastic rounding runs at "
                   f"{ms['adamkit bf16 params'] / ms['adamkit bf16 params, stochastic rounding']:.2f}× the speed of "
                   f"round-to-nearest; torch fused on bf16 params "
                   f"{ms['torch fused, bf16 params'] / ms['adamkit bf16 params']:.2f}× slower than adamkit's.")
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adamkit bench", description=__doc__)
    parser.add_argument("--params", type=float, default=25e6, help="parameters in the transformer-like model")
    parser.add_argument("--steps", type=int, default=15, help="timed rounds per measurement (median reported)")
    parser.add_argument("--only", default="", help="comma-separated configs or class names (e.g. Adam,NAdam)")
    parser.add_argument("--no-small", action="store_true", help="skip the 1000 x 1024 many-small-tensors model")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--memory", action="store_true", help="with --state-precision: process peak memory per "
                        "precision, each in a fresh process (AdamW, 3 steps)")
    parser.add_argument("--no-libraries", action="store_true", help="with --state-precision: leave out "
                        "bitsandbytes and torchao even when installed")
    parser.add_argument("--bf16-params", action="store_true", help="with --state-precision: also AdamW with "
                        "bfloat16 params, with and without stochastic rounding, next to torch fused on bf16 params")
    parser.add_argument("--isa", choices=("host", "avx2"), default="host", help="avx2: compile the kernels and run "
                        "torch for AVX2 (an AVX2 machine's code, measured on this one); restarts the command with "
                        "NUMBA_CPU_NAME, NUMBA_CPU_FEATURES and ATEN_CPU_CAPABILITY set")
    parser.add_argument("--state-precision", default="", help="also compare AdamW with these state precisions "
                        "(comma-separated: bf16,int8) against torch fused fp32; add 'only' to skip the other tables "
                        "(e.g. bf16,int8,only)")
    parser.add_argument("--compiled", action="store_true", help="instead: a whole training step under "
                        "torch.compile (forward, backward, opt.step()), adamkit against torch.optim compiled the "
                        "same way, eager for reference")
    parser.add_argument("--distributed", action="store_true", help="instead: the step on FSDP2 shards, 2 processes "
                        "(gloo), against torch.optim's paths on DTensors and the shard's memory floor")
    return parser


def _other_bench(args: argparse.Namespace, only: list[str] | None, log: Callable[[str], None]) -> int:
    """``--distributed`` or ``--compiled``: the module's own run and table, with the machine."""
    if args.distributed:
        from . import bench_distributed as module
        results = module.run(int(args.params), args.steps, only, log)
    else:
        from . import bench_compiled as module
        results = module.run(args.steps, only, log)
    results["machine"] = {**machine(), "isa": compiled_isa()}
    print(module.table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ENVIRONMENT.items()):
        os.environ.update(AVX2_ENVIRONMENT)  # both libraries read them once, at import: start again with them
        os.execv(sys.executable, [sys.executable, "-m", "adamkit.cli", "bench",
                                  *(sys.argv[2:] if argv is None else argv)])
    only = [s.strip() for s in args.only.split(",") if s.strip()] or None
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.distributed or args.compiled:
        return _other_bench(args, only, log)
    names = [p.strip() for p in args.state_precision.split(",") if p.strip()]
    precisions = [p for p in names if p != "only"]
    choices = [p for p in PRECISIONS if p]
    unknown = [p for p in precisions if p not in choices]
    if unknown:
        parser.error(f"--state-precision: unknown precision(s) {', '.join(unknown)} (choose from "
                     f"{', '.join(choices)})")
    if "only" in names and not precisions:
        parser.error("--state-precision only: name the precisions to compare too, e.g. --state-precision "
                     "bf16,int8,only")
    isa = compiled_isa()
    log(f"ISA: adamkit kernels compiled for {isa['adamkit']} (numba target {isa['numba_cpu']}, host "
        f"{isa['host_cpu']}, prefetch {isa['prefetch'] or 'off'}{_loops(isa)}), torch runs {isa['torch']}")
    if "only" in names:
        results = {"machine": machine(), "suites": {}}
    else:
        results = run(int(args.params), args.steps, only, not args.no_small, log)
        print(table(results))
    if precisions:
        results["state_precision"] = run_state_precision(int(args.params), args.steps, precisions, log,
                                                         not args.no_libraries, args.bf16_params)
        print(state_table(results))
        if args.memory:
            mem = peak_memory(int(args.params), ["torch", "None", *precisions])
            results["peak_memory"] = mem
            print("\n| AdamW (fresh process, 3 steps) | process peak MiB | of which before the optimizer | "
                  "state B/param |\n|---|---|---|---|")
            for k, m in mem.items():
                label = {"torch": "torch fused fp32", "None": "adamkit fp32"}.get(k, f"adamkit {k}")
                print(f"| {label} | {m['peak_mib']:.0f} | {m['before_optimizer_mib']:.0f} | "
                      f"{m['state_bytes_per_param']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0
