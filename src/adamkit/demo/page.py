"""The report page: one self-contained ``index.html`` (inline style, script and data; PNGs beside it as the
figures and as the interactive figures' fallback; no network). It opens with what an optimizer does and Adam in
one box, typeset in MathML and tied to adamkit's state names, and ends with the references."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from .assets import CSS, JS
from .report import Figure, Interactive, Section, Table

esc = html.escape


def _mi(x: str) -> str:
    return f"<mi>{x}</mi>"


def _sub(base: str, sub: str) -> str:
    return f"<msub>{base}{sub}</msub>"


def _hat(x: str) -> str:
    return f'<mover accent="true">{x}<mo>^</mo></mover>'


T = "<mi>t</mi>"
T1 = "<mrow><mi>t</mi><mo>−</mo><mn>1</mn></mrow>"
B1, B2 = _sub(_mi("β"), "<mn>1</mn>"), _sub(_mi("β"), "<mn>2</mn>")

ADAM_BOX: list[tuple[str, str]] = [
    (f"{_sub(_mi('g'), T)}<mo>=</mo><mo>∇</mo><mi>f</mi><mo>(</mo>{_sub(_mi('θ'), T1)}<mo>)</mo>",
     "the gradient you pass to <code>opt.step([g])</code>"),
    (f"{_sub(_mi('m'), T)}<mo>=</mo>{B1}{_sub(_mi('m'), T1)}<mo>+</mo><mo>(</mo><mn>1</mn><mo>−</mo>{B1}<mo>)</mo>"
     f"{_sub(_mi('g'), T)}", "momentum: <code>state['exp_avg']</code>, β₁ = <code>betas[0]</code>"),
    (f"{_sub(_mi('v'), T)}<mo>=</mo>{B2}{_sub(_mi('v'), T1)}<mo>+</mo><mo>(</mo><mn>1</mn><mo>−</mo>{B2}<mo>)</mo>"
     f"<msubsup><mi>g</mi>{T}<mn>2</mn></msubsup>",
     "RMSprop's scale: <code>state['exp_avg_sq']</code>, β₂ = <code>betas[1]</code>"),
    (f"{_sub(_hat(_mi('m')), T)}<mo>=</mo><mfrac>{_sub(_mi('m'), T)}<mrow><mn>1</mn><mo>−</mo>"
     f"<msubsup><mi>β</mi><mn>1</mn>{T}</msubsup></mrow></mfrac><mo>,</mo><mspace width='1em'/>"
     f"{_sub(_hat(_mi('v')), T)}<mo>=</mo><mfrac>{_sub(_mi('v'), T)}<mrow><mn>1</mn><mo>−</mo>"
     f"<msubsup><mi>β</mi><mn>2</mn>{T}</msubsup></mrow></mfrac>",
     "bias correction, from the step count <code>state['step']</code> = t (m and v start at zero)"),
    (f"{_sub(_mi('θ'), T)}<mo>=</mo>{_sub(_mi('θ'), T1)}<mo>−</mo><mi>α</mi><mfrac>{_sub(_hat(_mi('m')), T)}"
     f"<mrow><msqrt>{_sub(_hat(_mi('v')), T)}</msqrt><mo>+</mo><mi>ε</mi></mrow></mfrac>",
     "the step, in place on your array: α = <code>lr</code>, ε = <code>eps</code> "
     "(<code>adamkit.rules.adam</code>)"),
]

OPENING = (
    "<p>An optimizer turns gradients into steps. Given the gradient g of a loss f at the parameters θ, it decides "
    "how far to move θ, in which direction, and what to remember for the next step. Plain gradient descent "
    "moves by −α·g and remembers nothing. The Adam family remembers two running averages per parameter and "
    "divides one by the square root of the other, so that every coordinate takes steps of about the size α, "
    "whatever the scale of its gradient. The sections below build that up one mechanism at a time, each time "
    "with a run of <code>adamkit</code> itself.</p>")

REFERENCES: list[tuple[str, str]] = [
    ("Polyak (1964), Some methods of speeding up the convergence of iteration methods (momentum)",
     "https://doi.org/10.1016/0041-5553(64)90137-5"),
    ("Sutskever, Martens, Dahl &amp; Hinton (2013), On the importance of initialization and momentum in deep "
     "learning (Nesterov momentum)", "https://proceedings.mlr.press/v28/sutskever13.html"),
    ("Duchi, Hazan &amp; Singer (2011), Adaptive Subgradient Methods for Online Learning and Stochastic "
     "Optimization (AdaGrad)", "https://jmlr.org/papers/v12/duchi11a.html"),
    ("Tieleman &amp; Hinton (2012), Lecture 6.5, rmsprop (Neural Networks for Machine Learning)",
     "https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf"),
    ("Kingma &amp; Ba (2015), Adam: A Method for Stochastic Optimization (Adam, AdaMax)",
     "https://arxiv.org/abs/1412.6980"),
    ("Dozat (2016), Incorporating Nesterov Momentum into Adam (NAdam)",
     "https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ"),
    ("Reddi, Kale &amp; Kumar (2018), On the Convergence of Adam and Beyond (AMSGrad)",
     "https://openreview.net/forum?id=ryQu7f-RZ"),
    ("Loshchilov &amp; Hutter (2019), Decoupled Weight Decay Regularization (AdamW)",
     "https://arxiv.org/abs/1711.05101"),
    ("Liu et al. (2020), On the Variance of the Adaptive Learning Rate and Beyond (RAdam)",
     "https://arxiv.org/abs/1908.03265"),
    ("Dettmers, Lewis, Shleifer &amp; Zettlemoyer (2022), 8-bit Optimizers via Block-wise Quantization",
     "https://arxiv.org/abs/2110.02861"),
    ("Goh (2017), Why Momentum Really Works, Distill", "https://distill.pub/2017/momentum/"),
    ("Okabe &amp; Ito, Color Universal Design (the palette of every figure)", "https://jfly.uni-koeln.de/color/"),
]


def adam_box() -> str:
    rows = "".join(f'<tr><td><math display="block">{m}</math></td><td>{why}</td></tr>' for m, why in ADAM_BOX)
    return ('<div class="box"><b>Adam in one box</b> (Kingma &amp; Ba, 2015), per parameter, for t = 1, 2, …'
            f'<div class="scroll"><table>{rows}</table></div>'
            "The rest of the family changes one line: SGD keeps only a momentum buffer "
            "(<code>momentum_buffer</code>), AdaGrad sums g² instead of averaging it (<code>sum</code>), RMSprop "
            "averages g² without momentum or bias correction (<code>square_avg</code>).</div>")


def figure_html(f: Figure) -> str:
    caption = (f'<figcaption><b>{esc(f.title)}.</b> <span class="lesson">{esc(f.lesson)}</span> '
               f"{esc(f.caption)}</figcaption>")
    img = f'<img src="{esc(f.filename)}" alt="{esc(f.title)}" loading="lazy">'
    if not isinstance(f, Interactive):
        # side-by-side panels: on a narrow screen each keeps most of the screen's width and the figure pans
        return f'<figure><div class="pan" style="--cols:{f.columns}">{img}</div>{caption}</figure>'
    data = json.dumps(f.data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return (f'<figure class="explore nojs" id="{esc(f.key)}"><div class="controls"></div><div class="legend"></div>'
            f'<div class="panels"></div><div class="fallback">{img}</div>'
            f'<script type="application/json">{data}</script>{caption}</figure>')


def table_html(t: Table) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in t.rows)
    return (f'<div class="scroll"><table><caption>{esc(t.caption)}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def section_html(s: Section) -> list[str]:
    parts = [f'<section id="{esc(s.name)}"><h2>{esc(s.title)}</h2>']
    for block in s.blocks:
        if isinstance(block, Figure):
            parts.append(figure_html(block))
        elif isinstance(block, Table):
            parts.append(table_html(block))
        elif block[0] == "row":  # figures side by side, stacking on a narrow screen
            parts.append('<div class="row">' + "".join(figure_html(f) for f in block[1]) + "</div>")
        else:  # a paragraph written by the demo itself (trusted, may use a few tags)
            parts.append(f"<p>{block[1]}</p>")
    parts.append("</section>")
    return parts


def write_html(out: Path, sections: Sequence[Section], meta: Mapping[str, Any]) -> Path:
    """Write ``out/index.html`` and return its path."""
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>adamkit demo: the Adam family, made visible</title>",
        f"<style>{CSS}</style><script>{JS}</script></head><body>",
        "<h1>adamkit demo: the Adam family, made visible</h1>",
        f'<p class="meta">adamkit {esc(str(meta["version"]))} · seed {esc(str(meta["seed"]))} · '
        f'{"quick mode" if meta["quick"] else "full mode"} · generated {esc(meta["date"])} · '
        f'total {meta["seconds"]:.1f} s. Every number in a caption is computed by this run; '
        "re-run <code>adamkit demo</code> to regenerate. Click a figure to enlarge it.</p>",
        OPENING, adam_box(), "<nav><ol>",
    ]
    parts += [f'<li><a href="#{esc(s.name)}">{esc(s.title)}</a> ({s.seconds:.1f} s)</li>' for s in sections]
    parts.append('<li><a href="#references">References</a></li></ol></nav>')
    for s in sections:
        parts += section_html(s)
    parts.append('<section id="references"><h2>References</h2><ol class="refs">')
    parts += [f'<li><a href="{esc(url)}">{text}</a></li>' for text, url in REFERENCES]
    parts.append('</ol></section><div id="zoom"><img alt=""></div></body></html>')
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
