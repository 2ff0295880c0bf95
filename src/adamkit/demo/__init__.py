"""``adamkit demo``: the experiments that make Adam's math visible, written to an HTML report.

Seven sections, each a module of this package with a ``run(section, quick, seed) -> results`` function:

* ``lineage``    — GD → momentum → Nesterov → AdaGrad → RMSprop → Adam on one valley, the ablation "Adam with
  β₁ = 0 is RMSprop with bias correction", AdaMax, NAdam, RAdam, AMSGrad and AdamW, interactive trajectories;
* ``averages``   — simple vs exponential moving averages, the uncentered second moment, bias correction;
* ``regression`` — linear regression: gradient descent vs Adam against ``np.linalg.lstsq``;
* ``functions``  — the whole family on Rosenbrock, Beale and a saddle, learning rates from a grid search;
* ``failure``    — Reddi, Kale & Kumar (2018): where Adam provably fails and AMSGrad does not;
* ``ideas``      — rare features, scale invariance, low signal-to-noise, ε, β₁ × β₂, bytes of state;
* ``digits``     — real data (scikit-learn's bundled digits): logistic regression and an MLP, a bias-correction
  ablation, and AdamW vs Adam + L2 over a learning-rate × weight-decay grid.

Usage::

    adamkit demo                      # everything: about 47 s of CPU time (measured on a 2-core machine)
    adamkit demo --quick              # smaller grids and runs: about 27 s of CPU time
    adamkit demo --only failure,digits --out /tmp/report --seed 1

The sections use only adamkit's public API (``adamkit.numpy``, ``adamkit.minimize``, ``adamkit.rules``) and
are meant to be read as examples.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import time
from pathlib import Path
from typing import Any

from .page import write_html
from .report import Section, format_table, now

SECTIONS: dict[str, str] = {
    "lineage": "The lineage: from gradient descent to Adam, one mechanism at a time",
    "averages": "Moving averages: what Adam's m and v are",
    "regression": "Linear regression: gradient descent vs Adam",
    "functions": "The family on test functions",
    "failure": "Where Adam fails: Reddi, Kale & Kumar (2018)",
    "ideas": "The ideas behind Adam, one run each",
    "digits": "Real data: handwritten digits",
}
"""Section name → title, in report order. Each name is a module of this package."""


def run_section(name: str, out: Path, quick: bool = False, seed: int = 0,
                verbose: bool = False) -> tuple[Section, dict[str, Any]]:
    """Run one section into ``out`` (created if needed); return its report part and its results dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    section = Section(name, SECTIONS[name], out, verbose=verbose)
    module = importlib.import_module(f"{__name__}.{name}")
    start = time.perf_counter()
    with _single_threaded_blas():
        results = module.run(section, quick=quick, seed=seed)
    section.seconds = time.perf_counter() - start
    return section, results


def _single_threaded_blas() -> contextlib.AbstractContextManager:
    """One BLAS thread: the demo's matrices are tiny, and on a busy machine BLAS threads waiting for a free
    core make small matrix products many times slower. (threadpoolctl comes with scikit-learn.)"""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn (the demo extra) brings it
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def run(out: str | Path = "adamkit-report", only: list[str] | None = None, quick: bool = False, seed: int = 0,
        verbose: bool = True) -> tuple[Path, list[Section], dict[str, dict[str, Any]]]:
    """Run the chosen sections (all by default), write ``out/index.html``; return its path, sections, results."""
    from .. import __version__

    names = list(SECTIONS) if not only else only
    out = Path(out)
    sections, results = [], {}
    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        if verbose:
            print(f"[{i}/{len(names)}] {SECTIONS[name]} ...", flush=True)
        section, res = run_section(name, out, quick=quick, seed=seed, verbose=verbose)
        sections.append(section)
        results[name] = res
        if verbose:
            print(f"      done in {section.seconds:.1f} s: {len(section.figures)} figure(s) — {section.summary}",
                  flush=True)
    meta = dict(version=__version__, seed=seed, quick=quick, date=now(), seconds=time.perf_counter() - start)
    index = write_html(out, sections, meta)
    return index, sections, results


def _seed(text: str) -> int:
    """A NumPy seed: a whole number >= 0, else a usage error."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="adamkit demo",
        description="Run the experiments that make Adam's math visible and write an HTML report with figures.")
    parser.add_argument("--out", default="adamkit-report", metavar="DIR",
                        help="folder for index.html and the PNG figures (default: adamkit-report)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller grids and shorter runs (about 27 s of CPU time, against 47 s for the full run; "
                             "wall time is longer on a busy machine)")
    parser.add_argument("--only", metavar="SECTION[,SECTION...]",
                        help=f"run only these sections: {', '.join(SECTIONS)}")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of every random draw, an integer >= 0 "
                                                           "(default: 0)")
    args = parser.parse_args(argv)

    only = None
    if args.only:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in only if s not in SECTIONS]
        if unknown or not only:
            parser.error(f"unknown section(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(SECTIONS)}")
        only = [s for s in SECTIONS if s in only]  # report order, no duplicates

    start = time.perf_counter()
    index, sections, _ = run(args.out, only=only, quick=args.quick, seed=args.seed)
    total = time.perf_counter() - start
    print()
    print("Summary")
    rows = [[s.name, f"{s.seconds:.1f} s", s.summary] for s in sections]
    rows.append(["total", f"{total:.1f} s", f"{sum(len(s.figures) for s in sections)} figures"])
    print(format_table(["section", "time", "key result"], rows, align="lrl"))
    print()
    print(f"Report: {index.resolve()}")
    return 0
