"""Data for the interactive figures: precomputed runs, rounded, in the shape ``assets.JS`` draws.

``explorer(controls, panels, colors, runs)`` → a JSON-ready dict. ``runs`` maps a tuple of slider indices to one
list of series per panel; a slider only chooses which precomputed run is shown.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .report import plt


def rounded(values: Any, lo: float, hi: float, digits: int = 4) -> list[float]:
    """Finite floats clipped into [lo, hi] (the panel's range) with ``digits`` significant digits."""
    a = np.clip(np.nan_to_num(np.asarray(values, dtype=float), nan=hi, posinf=hi, neginf=lo), lo, hi)
    return [float(f"{v:.{digits}g}") for v in a]


def series(name: str, x: Sequence[float], y: Sequence[float], panel: dict[str, Any], dash: str = "") -> dict:
    """One curve of a panel, clipped to the panel's limits."""
    s = {"n": name, "x": rounded(x, *panel["x"]), "y": rounded(y, *panel["y"])}
    if dash:
        s["dash"] = dash
    return s


def panel(title: str, xlabel: str, ylabel: str, x: tuple[float, float], y: tuple[float, float],
          xlog: bool = False, ylog: bool = False, bg: list | None = None) -> dict[str, Any]:
    return {"title": title, "xlabel": xlabel, "ylabel": ylabel, "x": [float(v) for v in x],
            "y": [float(v) for v in y], "xlog": xlog, "ylog": ylog, "bg": bg or []}


def control(name: str, label: str, values: Sequence[float], start: int) -> dict[str, Any]:
    return {"name": name, "label": label, "values": [float(f"{v:.4g}") for v in values], "start": start}


def explorer(controls: list[dict], panels: list[dict], colors: dict[str, str],
             runs: dict[tuple[int, ...], list[list[dict]]]) -> dict[str, Any]:
    """The page's data: each distinct curve stored once (``curves``), each run a list of curve ids per panel."""
    curves: dict[str, dict] = {}
    ids: dict[str, int] = {}
    table: dict[str, list[list[int]]] = {}
    for key, per_panel in runs.items():
        table["-".join(map(str, key))] = [[ids.setdefault(repr(s), len(ids)) for s in p] for p in per_panel]
        for p in per_panel:
            for s in p:
                curves[str(ids[repr(s)])] = s
    return {"controls": controls, "panels": panels, "colors": colors, "curves": curves, "runs": table}


def contour_lines(f: Callable[[np.ndarray], np.ndarray], box: tuple[float, float, float, float],
                  levels: Sequence[float], n: int = 120) -> list[list[list[float]]]:
    """Level sets of ``f`` over ``box`` as polylines ``[xs, ys]`` (the grey background of a path panel)."""
    x0, x1, y0, y1 = box
    X, Y = np.meshgrid(np.linspace(x0, x1, n), np.linspace(y0, y1, n))
    fig, ax = plt.subplots()
    cs = ax.contour(X, Y, f(np.array([X, Y])), levels=sorted(levels))
    lines = [[rounded(seg[:, 0], x0, x1, 3), rounded(seg[:, 1], y0, y1, 3)]
             for segs in cs.allsegs for seg in segs if len(seg) > 2]
    plt.close(fig)
    return lines
