"""``adamkit demo``: placeholder, replaced by the full report (issue 5)."""
from __future__ import annotations

import argparse

import numpy as np

import adamkit.numpy as akn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adamkit demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    X = rng.normal(size=(200, 3))
    y = X @ np.array([2.0, -1.0, 0.5]) + 0.3 + 0.1 * rng.normal(size=200)
    runs = {}
    for name in ("gd", "adam"):
        w, b = np.zeros(3), np.zeros(1)
        opt = akn.SGD([w, b], lr=0.05) if name == "gd" else akn.Adam([w, b], lr=0.05)
        rmse = []
        for _ in range(100):
            r = X @ w + b - y
            rmse.append(float(np.sqrt(np.mean(r ** 2))))
            opt.step([2 * X.T @ r / len(y), np.array([2 * r.mean()])])
        runs[name] = rmse
    print(f"{'epoch':>5} {'GD RMSE':>10} {'Adam RMSE':>10}")
    for e in (0, 1, 2, 5, 10, 20, 50, 99):
        print(f"{e:5d} {runs['gd'][e]:10.4f} {runs['adam'][e]:10.4f}")
    return 0
