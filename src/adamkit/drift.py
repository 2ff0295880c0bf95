"""Drift of low-precision states: every class with bf16 and int8 states against the same class with float32
states, on a well- and an ill-conditioned noisy quadratic.

``python -m adamkit.drift`` (``--steps``, ``--size``, ``--classes``) prints one line per class, problem and
precision: the worst relative drift of the parameters, max over the run of ‖x_low − x_fp32‖ / ‖x_fp32‖ (sampled
every ``--every`` steps), and whether any parameter became non-finite.

Example:
    >>> from adamkit import drift
    >>> row = drift.run("Adam", "well", "bf16", steps=20, size=4096)
    >>> row["finite"], row["drift"] < 0.05
    (True, True)
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Sequence

import torch

from . import torch as _akt

__all__ = ["CONFIGS", "PROBLEMS", "run", "main"]

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "SGD": ("SGD", dict(lr=1e-3, momentum=0.9)),
    "Adagrad": ("Adagrad", dict(lr=1e-2)),
    "RMSprop": ("RMSprop", dict(lr=1e-3)),
    "RMSprop(centered)": ("RMSprop", dict(lr=1e-3, centered=True, momentum=0.5)),
    "Adam": ("Adam", dict(lr=1e-3)),
    "AdamW": ("AdamW", dict(lr=1e-3, amsgrad=True)),
    "Adamax": ("Adamax", dict(lr=2e-3)),
    "NAdam": ("NAdam", dict(lr=2e-3)),
    "RAdam": ("RAdam", dict(lr=1e-3)),
}
"""Label → (class, hyperparameters): each class once, centered RMSprop besides, AdamW with AMSGrad."""

PROBLEMS = {"well": (1.0, 10.0), "ill": (1e-4, 1e2)}
"""Curvature range of the quadratic ½ Σ d_i (x_i − t_i)², d log-spaced: condition numbers 10 and 1e6."""

NOISE = 0.1


def _problem(kind: str, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    low, high = PROBLEMS[kind]
    curvature = torch.logspace(math.log10(low), math.log10(high), size)[torch.randperm(size, generator=gen)]
    return curvature, torch.randn(size, generator=gen), torch.randn(size, generator=gen)


def _trajectory(label: str, kind: str, precision: str | None, steps: int, size: int, every: int) -> list:
    """Parameters every ``every`` steps (float32 copies) of one run; the noise sequence is the same for all."""
    name, options = CONFIGS[label]
    curvature, target, start = _problem(kind, size)
    p = torch.nn.Parameter(start.clone())
    opt = getattr(_akt, name)([p], **options, state_precision=precision)
    noise = torch.Generator().manual_seed(1)
    samples = []
    for t in range(1, steps + 1):
        p.grad = curvature * (p.detach() - target) + NOISE * torch.randn(size, generator=noise)
        opt.step()
        if t % every == 0 or t == steps:
            samples.append(p.detach().clone())
    return samples


def run(label: str, kind: str, precision: str, steps: int = 10_000, size: int = 8192, every: int = 100,
        reference: list | None = None) -> dict:
    """Worst relative drift of ``label`` with ``precision`` states against float32 states on problem ``kind``
    (``reference``: the float32 run's samples, if already taken)."""
    reference = reference or _trajectory(label, kind, None, steps, size, every)
    low = _trajectory(label, kind, precision, steps, size, every)
    finite = all(bool(torch.isfinite(x).all()) for x in low)
    drift = [float((x.double() - r.double()).norm() / r.double().norm()) for x, r in zip(low, reference)]
    return {"class": label, "problem": kind, "precision": precision, "steps": steps, "finite": finite,
            "drift": max(drift), "final": drift[-1]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adamkit.drift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=8192, help="parameters (8-bit states need at least 4096)")
    parser.add_argument("--every", type=int, default=100, help="sample the drift every this many steps")
    parser.add_argument("--classes", default=",".join(CONFIGS), help="comma-separated labels of CONFIGS")
    parser.add_argument("--threads", type=int, default=1,
                        help="numba and torch threads (default 1: a problem of 8192 parameters is one chunk of "
                             "work, and waiting threads cost more than they give, 15x under load)")
    args = parser.parse_args(argv)
    import numba
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(args.threads)
    print(f"{'class':<18} {'problem':<5} {'state':<5} {'worst drift':>12} {'final':>10}  finite")
    start = time.perf_counter()
    for label in args.classes.split(","):
        for kind in PROBLEMS:
            reference = _trajectory(label, kind, None, args.steps, args.size, args.every)
            for precision in ("bf16", "int8"):
                r = run(label, kind, precision, args.steps, args.size, args.every, reference)
                print(f"{label:<18} {kind:<5} {precision:<5} {r['drift']:>12.3g} {r['final']:>10.3g}  {r['finite']}",
                      flush=True)
    print(f"{args.steps} steps, {args.size} parameters, noise {NOISE}; {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
