"""The report page's style sheet and script, inlined into ``index.html`` (the page stays one file that works
offline). The script only draws: every curve it shows was computed by the Python rules and embedded as JSON."""

CSS = """
*, *::before, *::after { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 1.5em auto;
       padding: 0 1em; color: #222; line-height: 1.55; overflow-wrap: anywhere; }
h1 { margin-bottom: 0.2em; line-height: 1.2; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; cursor: zoom-in; }
figcaption { font-size: 0.95em; color: #333; background: #f7f7f7; padding: 0.5em 0.8em; }
figcaption b { color: #000; } figcaption .lesson { font-weight: 600; }
.scroll { overflow-x: auto; max-width: 100%; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
caption { caption-side: bottom; font-size: 0.9em; color: #555; padding-top: 0.3em; text-align: left; }
code { background: #f1f1f1; padding: 0 0.2em; }
.meta { color: #666; font-size: 0.9em; }
.box { border: 2px solid #0072B2; border-radius: 6px; padding: 0.6em 1em; background: #f5f9fc; }
.box td, .box th { border: none; border-bottom: 1px solid #dde; vertical-align: middle; }
.box math { font-size: 1.15em; }
.row { display: flex; flex-wrap: wrap; gap: 1em; }
.row > figure { flex: 1 1 300px; min-width: 0; margin: 0.5em 0; }
.explore .panels { display: flex; flex-wrap: wrap; gap: 0.5em; }
.explore .panel { flex: 1 1 300px; min-width: 0; }
.explore svg { width: 100%; height: auto; display: block; background: #fff; }
.explore .controls { display: flex; flex-wrap: wrap; gap: 0.4em 1.5em; margin: 0.4em 0; }
.explore label { display: flex; align-items: center; gap: 0.5em; }
.explore input[type=range] { width: 9em; }
.legend { display: flex; flex-wrap: wrap; gap: 0.3em 1em; font-size: 0.9em; margin: 0.3em 0; }
.legend span { cursor: pointer; white-space: nowrap; }
.legend i { display: inline-block; width: 1.4em; height: 0.3em; vertical-align: middle; margin-right: 0.3em; }
.explore polyline { fill: none; stroke-width: 2; transition: opacity 0.15s; }
.explore .dim { opacity: 0.12; } .explore .bg { stroke: #bbb; stroke-width: 0.7; }
.explore text { font-size: 11px; fill: #333; } .explore .axis { stroke: #666; stroke-width: 1; }
.fallback { display: none; } .nojs .fallback { display: block; } .nojs .panels, .nojs .controls { display: none; }
#zoom { position: fixed; inset: 0; background: rgba(0,0,0,0.85); overflow: auto; display: none; z-index: 10;
        cursor: zoom-out; }
#zoom img { display: block; margin: auto; max-width: none; width: min(1600px, 180vw); background: #fff; }
.pan { overflow-x: auto; }
@media (max-width: 640px) {
  .pan img { width: calc(var(--cols) * 88vw); max-width: none; }
  .row > figure .pan img { width: 100%; }
}
nav li { margin: 0.1em 0; }
ol.refs li { margin: 0.3em 0; }
"""

JS = """
// Draws the demo's interactive figures from runs the Python rules computed ahead of time (embedded as JSON).
// Nothing here updates a parameter: each slider position selects one precomputed run.
"use strict";
(function () {
  var SVG = "http://www.w3.org/2000/svg", W = 420, H = 300, M = {l: 56, r: 10, t: 24, b: 40};
  function el(name, attrs, parent) {
    var e = document.createElementNS(SVG, name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function scale(lim, lo, hi, log) {
    var a = log ? Math.log10(lim[0]) : lim[0], b = log ? Math.log10(lim[1]) : lim[1];
    return function (v) {
      var u = log ? Math.log10(Math.max(v, lim[0])) : v;
      return lo + (hi - lo) * (u - a) / (b - a);
    };
  }
  function ticks(lim, log) {
    if (log) {
      var out = [], a = Math.ceil(Math.log10(lim[0])), b = Math.floor(Math.log10(lim[1]));
      var stride = Math.max(1, Math.ceil((b - a + 1) / 6));
      for (var e = a; e <= b; e += stride) out.push(Math.pow(10, e));
      return out;
    }
    var span = lim[1] - lim[0], step = Math.pow(10, Math.floor(Math.log10(span / 4)));
    if (span / step > 10) step *= 2.5; if (span / step > 10) step *= 2;
    var t = [], v = Math.ceil(lim[0] / step) * step;
    for (; v <= lim[1] + 1e-12 * span; v += step) t.push(Math.abs(v) < 1e-12 * span ? 0 : v);
    return t;
  }
  function fmt(v, log) { return log ? "1e" + Math.round(Math.log10(v)) : String(+v.toPrecision(3)); }
  function axes(svg, p, sx, sy) {
    el("line", {x1: M.l, y1: H - M.b, x2: W - M.r, y2: H - M.b, "class": "axis"}, svg);
    el("line", {x1: M.l, y1: M.t, x2: M.l, y2: H - M.b, "class": "axis"}, svg);
    ticks(p.x, p.xlog).forEach(function (v) {
      el("text", {x: sx(v), y: H - M.b + 14, "text-anchor": "middle"}, svg).textContent = fmt(v, p.xlog);
    });
    ticks(p.y, p.ylog).forEach(function (v) {
      el("text", {x: M.l - 4, y: sy(v) + 4, "text-anchor": "end"}, svg).textContent = fmt(v, p.ylog);
    });
    el("text", {x: (M.l + W - M.r) / 2, y: H - 6, "text-anchor": "middle"}, svg).textContent = p.xlabel;
    el("text", {x: 12, y: (M.t + H - M.b) / 2, "text-anchor": "middle",
                transform: "rotate(-90 12 " + (M.t + H - M.b) / 2 + ")"}, svg).textContent = p.ylabel;
    el("text", {x: M.l, y: 14}, svg).textContent = p.title;
  }
  function points(xs, ys, sx, sy) {
    var out = [];
    for (var i = 0; i < xs.length; i++) out.push(sx(xs[i]).toFixed(1) + "," + sy(ys[i]).toFixed(1));
    return out.join(" ");
  }
  function highlight(root, name) {
    root.querySelectorAll("[data-name]").forEach(function (e) {
      e.classList.toggle("dim", name !== null && e.getAttribute("data-name") !== name);
    });
  }
  function draw(root, data, state) {
    var run = data.runs[state.join("-")], holders = root.querySelectorAll(".panel");
    data.panels.forEach(function (p, k) {
      var holder = holders[k], svg = el("svg", {viewBox: "0 0 " + W + " " + H, role: "img",
                                                "aria-label": p.title});
      var sx = scale(p.x, M.l, W - M.r, p.xlog), sy = scale(p.y, H - M.b, M.t, p.ylog);
      (p.bg || []).forEach(function (b) { el("polyline", {points: points(b[0], b[1], sx, sy), "class": "bg"}, svg); });
      axes(svg, p, sx, sy);
      var id = root.id + "-clip-" + k, defs = el("defs", {}, svg);
      el("rect", {x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b},
         el("clipPath", {id: id}, defs));
      var clip = el("g", {"clip-path": "url(#" + id + ")"}, svg);
      run[k].forEach(function (id) {
        var s = data.curves[id];
        var line = el("polyline", {points: points(s.x, s.y, sx, sy), stroke: data.colors[s.n], "data-name": s.n,
                                   "stroke-dasharray": s.dash || ""}, clip);
        line.addEventListener("mouseenter", function () { highlight(root, s.n); });
        line.addEventListener("mouseleave", function () { highlight(root, null); });
      });
      holder.replaceChildren(svg);
    });
  }
  function build(root) {
    var data = JSON.parse(root.querySelector("script[type='application/json']").textContent);
    var state = data.controls.map(function (c) { return c.start; });
    var controls = root.querySelector(".controls"), panels = root.querySelector(".panels");
    data.controls.forEach(function (c, i) {
      var label = document.createElement("label"), input = document.createElement("input"),
          out = document.createElement("output");
      input.type = "range"; input.min = 0; input.max = c.values.length - 1; input.step = 1; input.value = c.start;
      input.name = c.name; input.setAttribute("aria-label", c.label);
      out.textContent = c.values[c.start];
      input.addEventListener("input", function () {
        state[i] = +input.value; out.textContent = c.values[state[i]]; draw(root, data, state);
      });
      label.append(c.label + " ", input, out);
      controls.appendChild(label);
    });
    data.panels.forEach(function () {
      var d = document.createElement("div"); d.className = "panel"; panels.appendChild(d);
    });
    var legend = root.querySelector(".legend");
    Object.keys(data.colors).forEach(function (n) {
      var s = document.createElement("span"), sw = document.createElement("i");
      sw.style.background = data.colors[n]; s.setAttribute("data-name", n); s.append(sw, n);
      s.addEventListener("mouseenter", function () { highlight(root, n); });
      s.addEventListener("mouseleave", function () { highlight(root, null); });
      legend.appendChild(s);
    });
    draw(root, data, state);
    root.classList.remove("nojs");
  }
  function zoom() {
    var box = document.getElementById("zoom"), big = box.querySelector("img");
    document.querySelectorAll("figure img").forEach(function (img) {
      img.addEventListener("click", function () { big.src = img.src; big.alt = img.alt; box.style.display = "block"; });
    });
    box.addEventListener("click", function () { box.style.display = "none"; });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll(".explore").forEach(build);
    zoom();
  });
})();
"""
