"""A small report writer shared by the demo's sections: figures with captions, tables, one ``index.html``.

Every caption is a ``str.format`` template filled from the section's results dictionary, so each number a
reader sees was computed by the run (the tests re-format every template from the returned results and check
that no digit is typed into a template outside a ``{field}``).
"""

from __future__ import annotations

import html
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display: works on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

plt.rcParams.update({
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.framealpha": 0.85,
})


@dataclass
class Figure:
    """One saved figure: its file name (relative to the report folder), caption template and caption."""

    filename: str
    template: str
    caption: str
    title: str


@dataclass
class Table:
    """A small table for the HTML report (and, by the section's choice, for the terminal)."""

    header: list[str]
    rows: list[list[str]]
    caption: str


@dataclass
class Section:
    """What one section of the demo produces: text, figures and tables, in order, and a one-line summary."""

    name: str
    title: str
    out: Path
    blocks: list[Any] = field(default_factory=list)
    summary: str = ""
    seconds: float = 0.0

    @property
    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]

    @property
    def tables(self) -> list[Table]:
        return [b for b in self.blocks if isinstance(b, Table)]

    def text(self, paragraph: str) -> None:
        """A paragraph of explanation (plain text; ``<code>``, ``<b>``, ``<i>`` and ``<br>`` may be used)."""
        self.blocks.append(("p", paragraph))

    def figure(self, fig: plt.Figure, filename: str, title: str, template: str,
               results: Mapping[str, Any]) -> Figure:
        """Save ``fig`` as ``out/filename`` (PNG) and record its caption ``template.format(**results)``."""
        fig.savefig(self.out / filename, bbox_inches="tight")
        plt.close(fig)
        item = Figure(filename, template, template.format(**results), title)
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


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.5; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.95em; color: #333; background: #f7f7f7; padding: 0.5em 0.8em; }
figcaption b { color: #000; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
caption { caption-side: bottom; font-size: 0.9em; color: #555; padding-top: 0.3em; text-align: left; }
code { background: #f1f1f1; padding: 0 0.2em; }
.meta { color: #666; font-size: 0.9em; }
nav li { margin: 0.1em 0; }
"""


def write_html(out: Path, sections: Sequence[Section], meta: Mapping[str, Any]) -> Path:
    """Write ``out/index.html``: one self-contained page (inline CSS, PNGs next to it, no network)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>adamkit demo: the Adam family, made visible</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>adamkit demo: the Adam family, made visible</h1>",
        f'<p class="meta">adamkit {esc(str(meta["version"]))} · seed {esc(str(meta["seed"]))} · '
        f'{"quick mode" if meta["quick"] else "full mode"} · generated {esc(meta["date"])} · '
        f'total {meta["seconds"]:.1f} s. Every number in a caption is computed by this run; '
        "re-run <code>adamkit demo</code> to regenerate.</p>",
        "<nav><ol>",
    ]
    parts += [f'<li><a href="#{esc(s.name)}">{esc(s.title)}</a> ({s.seconds:.1f} s)</li>' for s in sections]
    parts.append("</ol></nav>")
    for s in sections:
        parts.append(f'<section id="{esc(s.name)}"><h2>{esc(s.title)}</h2>')
        for block in s.blocks:
            if isinstance(block, Figure):
                parts.append(f'<figure><img src="{esc(block.filename)}" alt="{esc(block.title)}">'
                             f"<figcaption><b>{esc(block.title)}.</b> {esc(block.caption)}</figcaption></figure>")
            elif isinstance(block, Table):
                head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
                body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in block.rows)
                parts.append(f"<table><caption>{esc(block.caption)}</caption><thead><tr>{head}</tr></thead>"
                             f"<tbody>{body}</tbody></table>")
            else:  # a paragraph written by the demo itself (trusted, may use a few tags)
                parts.append(f"<p>{block[1]}</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M")
