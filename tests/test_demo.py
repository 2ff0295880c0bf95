"""``adamkit demo``: every section runs (quick mode), writes valid PNGs that index.html references, its captions
are filled from the run's results, and the science comes out right."""

from __future__ import annotations

import contextlib
import html
import io
import re

import matplotlib.image
import numpy as np
import pytest

import adamkit.numpy as akn
from adamkit import cli
from adamkit.demo import SECTIONS, main, run
from adamkit.demo.digits import AdamAblation
from adamkit.demo.report import literal_text, template_fields

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sections(tmp_path_factory):
    """Each section in quick mode, alone, into its own folder: name → (folder, Section, results)."""
    out = {}
    for name in SECTIONS:
        folder = tmp_path_factory.mktemp(name)
        with contextlib.redirect_stdout(io.StringIO()):
            index, secs, results = run(folder, only=[name], quick=True, seed=0, verbose=False)
        assert index == folder / "index.html"
        out[name] = (folder, secs[0], results[name])
    return out


@pytest.mark.parametrize("name", list(SECTIONS))
def test_section_writes_valid_pngs(sections, name):
    folder, section, _ = sections[name]
    assert (folder / "index.html").is_file()
    assert section.figures, f"{name} made no figure"
    for fig in section.figures:
        path = folder / fig.filename
        assert path.read_bytes()[:8] == PNG_SIGNATURE, fig.filename
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
        assert float(image[..., :3].std()) > 0.05, f"{fig.filename} looks blank"


@pytest.mark.parametrize("name", list(SECTIONS))
def test_html_references_only_existing_files(sections, name):
    folder, section, _ = sections[name]
    page = (folder / "index.html").read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    local = [html.unescape(r) for r in refs if not r.startswith("#")]
    assert sorted(local) == sorted(f.filename for f in section.figures)  # every figure, nothing else
    for ref in local:
        assert "://" not in ref and not ref.startswith("/")  # self-contained: no network, relative paths
        assert (folder / ref).read_bytes()[:8] == PNG_SIGNATURE


# Digits typed into a caption may only belong to formulas (1 − β₁ᵗ, 1/L); every other number is a {field}.
FORMULA = re.compile(r"\b1 − |1/L\b")
NUMBER = re.compile(r"(?<![\w.])\d")


@pytest.mark.parametrize("name", list(SECTIONS))
def test_captions_are_computed_from_results(sections, name):
    folder, section, results = sections[name]
    page = (folder / "index.html").read_text(encoding="utf-8")
    for fig in section.figures:
        assert template_fields(fig.template), f"{fig.filename}: caption has no computed value"
        typed = FORMULA.sub("", literal_text(fig.template))
        assert not NUMBER.search(typed), f"{fig.filename}: a number is typed into the caption: {typed!r}"
        assert fig.caption == fig.template.format(**results)  # the caption is the template filled by results
        assert html.escape(fig.caption) in page


def test_failure_adam_diverges_amsgrad_converges(sections):
    folder, section, r = sections["failure"]
    assert r["adam_final_x"] > 0.9       # Adam drifts to the worst point of [−1, 1]
    assert r["amsgrad_final_x"] < -0.9   # AMSGrad goes to the optimum −1
    caption = section.figures[0].caption
    assert f"Adam ends at x = {r['adam_final_x']:.2f}" in caption
    assert f"AMSGrad at x = {r['amsgrad_final_x']:.2f}" in caption
    assert r["c3"]["adam_regret"] > 0.5 > 0.05 > r["c3"]["amsgrad_regret"]


def test_regression_adam_matches_lstsq(sections):
    _, section, r = sections["regression"]
    assert np.abs(r["w_adam"] - r["lstsq"]).max() < 1e-2
    assert r["err_adam"] < 1e-2 < r["err_gd"]
    assert f"{r['err_adam']:.1e}" in section.figures[0].caption
    assert r["rmse_adam"] == pytest.approx(r["rmse_lstsq"], rel=1e-3)
    epochs = [row[0] for row in section.tables[0].rows]
    assert epochs[0] == "0" and epochs[-1] == str(r["epochs"])


def test_digits_accuracy(sections):
    _, section, r = sections["digits"]
    assert r["adam_logreg_acc"] > 0.9
    assert r["adam_mlp_acc"] > 0.9
    caption = section.figures[0].caption
    assert f"Adam {r['adam_logreg_acc']:.3f}" in caption and f"Adam {r['adam_mlp_acc']:.3f}" in caption
    for h in r["heatmaps"].values():
        assert h.shape == (3, 3)


def test_functions_grid_search(sections):
    _, section, r = sections["functions"]
    grid = set(r["grid"].tolist())
    for fn, lrs in r["lr"].items():
        assert set(lrs.values()) <= grid  # learning rates come from the grid, not from constants
        assert len(lrs) == 11
        assert r["final_gap"][fn][r["best"][fn]] < 1e-3
        assert f"{r[fn]['adam_lr']:.2g}" in section.figures[list(r["lr"]).index(fn)].caption
    assert r["escape_steps"]["Adam"] < r["escape_steps"]["SGD"]


def test_averages_bias_correction(sections):
    _, _, r = sections["averages"]
    assert r["ratio_first"] == pytest.approx((1 - 0.9) / np.sqrt(1 - 0.999), rel=1e-6)
    assert r["max_move_error"] < 1e-9           # adamkit's steps are the corrected ones
    assert r["lag_ema"] < r["lag_sma"]          # the EMA reacts to the jump first
    assert r["v_before"] == pytest.approx(r["ex2_before"], rel=0.1)  # v tracks E[g²]


def test_ablation_with_bias_correction_is_adam():
    rng = np.random.default_rng(1)
    a = [rng.normal(size=(4, 3)), rng.normal(size=3)]
    b = [x.copy() for x in a]
    c = [x.copy() for x in a]
    ours, adam = AdamAblation(a, lr=0.01), akn.Adam(b, lr=0.01)
    off = AdamAblation(c, lr=0.01, bias_correction=False)
    m, v = [np.zeros_like(x) for x in c], [np.zeros_like(x) for x in c]
    for _ in range(20):
        grads = [rng.normal(size=x.shape) for x in a]
        ours.step(grads)
        adam.step(grads)
        expected = []
        for i, (x, g) in enumerate(zip(c, grads)):  # Adam without bias correction, by hand
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            expected.append(x - 0.01 * m[i] / (np.sqrt(v[i]) + 1e-8))
        off.step(grads)
        for x, e in zip(c, expected):
            np.testing.assert_allclose(x, e, rtol=1e-12, atol=1e-15)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_cli_prints_summary_and_report_path(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--only", "regression", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "[1/1]" in out and "Summary" in out and "regression" in out
    assert "GD RMSE" in out  # the RMSE-per-epoch table
    assert out.strip().splitlines()[-1] == f"Report: {(tmp_path / 'r' / 'index.html').resolve()}"


def test_cli_rejects_unknown_section(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--only", "averages,nonsense"])
    assert e.value.code == 2
    assert "nonsense" in capsys.readouterr().err
