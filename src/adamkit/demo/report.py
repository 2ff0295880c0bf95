"""A small report writer shared by the demo's sections: figures with captions, tables, interactive figures.

Every caption is a one-sentence lesson followed by a ``str.format`` template filled from the section's results
dictionary, so each number a reader sees was computed by the run (the tests re-format every template from the
returned results and check that no digit is typed into a template outside a ``{field}``). The page itself is
written by :mod:`adamkit.demo.page`.
"""

from __future__ import annotations

import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display: works on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from cycler import cycler  # noqa: E402  (comes with matplotlib)

# Okabe & Ito's colour-blind-safe palette (https://jfly.uni-koeln.de/color/), by name.
PALETTE = {"blue": "#0072B2", "orange": "#E69F00", "green": "#009E73", "vermillion": "#D55E00",
           "sky": "#56B4E9", "purple": "#CC79A7", "yellow": "#F0E442", "black": "#000000"}
OKABE_ITO = [PALETTE[k] for k in ("blue", "orange", "green", "vermillion", "sky", "purple", "black")]
DPI = 200
MAX_CURVES = 4
"""At most this many curves share one panel; more become labelled small multiples."""

plt.rcParams.update({
    "figure.dpi": 100,
    "savefig.dpi": DPI,
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.framealpha": 0.85,
    "axes.prop_cycle": cycler(color=OKABE_ITO),
    "image.cmap": "cividis",
})


@dataclass
class Figure:
    """One saved figure: its file name (relative to the report folder), caption template and caption.

    ``curves`` is the largest number of curves in one of its panels, ``unlabelled`` the panels without a y label.
    """

    filename: str
    template: str
    caption: str
    title: str
    lesson: str = ""
    curves: int = 0
    unlabelled: list[str] = field(default_factory=list)
    size_px: tuple[int, int] = (0, 0)
    columns: int = 1


@dataclass
class Interactive(Figure):
    """A figure a reader explores: precomputed runs (``data``, embedded in the page as JSON) drawn in the
    browser, sliders choosing between them; ``filename`` is its PNG fallback."""

    data: dict[str, Any] = field(default_factory=dict)
    key: str = ""


@dataclass
class Table:
    """A small table for the HTML report (and, by the section's choice, for the terminal)."""

    header: list[str]
    rows: list[list[str]]
    caption: str


def count_curves(ax: plt.Axes) -> int:
    """Curves drawn in one panel: lines with more than two points (reference lines such as ``axhline`` have two)."""
    return sum(1 for line in ax.get_lines() if len(line.get_xdata()) > 2)


@dataclass
class Section:
    """What one section of the demo produces: text, figures and tables, in order, and a one-line summary."""

    name: str
    title: str
    out: Path
    blocks: list[Any] = field(default_factory=list)
    summary: str = ""
    seconds: float = 0.0
    verbose: bool = False

    @property
    def figures(self) -> list[Figure]:
        flat = [f for b in self.blocks for f in (b[1] if isinstance(b, tuple) and b[0] == "row" else [b])]
        return [b for b in flat if isinstance(b, Figure)]

    def row(self, figures: Sequence[Figure]) -> None:
        """Show these (already recorded) figures side by side; they stack on a narrow screen."""
        self.blocks = [b for b in self.blocks if not any(b is f for f in figures)]
        self.blocks.append(("row", list(figures)))

    @property
    def tables(self) -> list[Table]:
        return [b for b in self.blocks if isinstance(b, Table)]

    def progress(self, message: str) -> None:
        """One line of progress inside a long section (only when the run is verbose)."""
        if self.verbose:
            print(f"      … {message}", flush=True)

    def text(self, paragraph: str) -> None:
        """A paragraph of explanation (plain text; ``<code>``, ``<b>``, ``<i>`` and ``<br>`` may be used)."""
        self.blocks.append(("p", paragraph))

    def figure(self, fig: plt.Figure, filename: str, title: str, lesson: str, template: str,
               results: Mapping[str, Any], **interactive: Any) -> Figure:
        """Save ``fig`` as ``out/filename`` (PNG, :data:`DPI` dots per inch); its caption is ``lesson`` (one
        sentence, no numbers) then ``template.format(**results)``. With ``data=`` and ``key=`` the figure is an
        :class:`Interactive` one and the PNG its fallback."""
        axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        curves = max((count_curves(ax) for ax in axes), default=0)
        unlabelled = [ax.get_title() or f"panel {i + 1}" for i, ax in enumerate(axes)
                      if ax.get_visible() and ax.has_data() and not ax.get_ylabel()]
        columns = len({round(ax.get_position().x0, 2) for ax in axes if ax.get_visible()})
        fig.savefig(self.out / filename, bbox_inches="tight")
        size = tuple(int(v) for v in fig.get_size_inches() * DPI)
        plt.close(fig)
        cls = Interactive if interactive else Figure
        item = cls(filename, template, template.format(**results), title, lesson, curves, unlabelled, size,
                   columns, **interactive)
        self.blocks.append(item)
        return item

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str) -> Table:
        item = Table([str(h) for h in header], [[str(c) for c in r] for r in rows], caption)
        self.blocks.append(item)
        return item


def template_fields(template: str) -> list[str]:
    """The field names a caption template uses (``"{x:.2f} and {y}"`` → ``["x", "y"]``)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def literal_text(template: str) -> str:
    """A template with its ``{fields}`` removed: what was typed rather than computed."""
    return "".join(text for text, _, _, _ in string.Formatter().parse(template))


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A plain-text table; ``align`` has one letter per column, ``l`` or ``r`` (default: first left, others right)."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M")
