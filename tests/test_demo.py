"""``adamkit demo``: every section runs (quick mode), writes valid PNGs that index.html references, its captions
are filled from the run's results, and the science comes out right."""

from __future__ import annotations

import contextlib
import html
import io
import json
import re

import matplotlib.image
import numpy as np
import pytest

import adamkit.numpy as akn
from adamkit import cli
from adamkit.demo import SECTIONS, main, run
from adamkit.demo.digits import AdamAblation
from adamkit.demo.report import DPI, MAX_CURVES, Interactive, literal_text, template_fields

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
    local = [html.unescape(r) for r in refs if not r.startswith(("#", "https://"))]
    links = [r for r in refs if r.startswith("https://")]
    assert links and page.index('id="references"') < page.index(links[0])  # external links only in the references
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
        # the caption opens with its lesson: one sentence, typed, without numbers
        assert fig.lesson and not NUMBER.search(FORMULA.sub("", fig.lesson)), fig.filename
        assert not template_fields(fig.lesson), fig.filename
        assert fig.lesson.endswith(".") and ". " not in fig.lesson.rstrip(".")
        assert html.escape(fig.lesson) in page


@pytest.mark.parametrize("name", list(SECTIONS))
def test_figures_are_readable(sections, name):
    """At most four curves per panel, a y label on every panel, 200 dpi."""
    folder, section, _ = sections[name]
    for fig in section.figures:
        assert 0 < fig.curves <= MAX_CURVES or fig.filename in NO_CURVES, (fig.filename, fig.curves)
        assert fig.unlabelled == [], fig.filename
        width, height = fig.size_px
        assert width >= 4 * DPI and matplotlib.image.imread(folder / fig.filename).shape[1] >= 0.8 * width


NO_CURVES = {"ideas-betas.png", "ideas-memory.png", "digits-adamw-vs-l2.png"}  # a heatmap, bars, heatmaps


def test_interactive_figures_embed_their_runs(sections):
    """Trajectories and moving averages: every slider position has a precomputed run, as data in the page."""
    for name, key, controls in (("lineage", "explore-trajectories", ["lr", "beta1", "beta2"]),
                                ("averages", "explore-averages", ["beta1", "beta2"])):
        folder, section, _ = sections[name]
        fig = next(f for f in section.figures if isinstance(f, Interactive) and f.key == key)
        data = fig.data
        assert [c["name"] for c in data["controls"]] == controls
        positions = np.prod([len(c["values"]) for c in data["controls"]])
        assert len(data["runs"]) == positions
        assert all(len(run) == len(data["panels"]) for run in data["runs"].values())
        page = (folder / "index.html").read_text(encoding="utf-8")
        blob = re.search(rf'id="{key}".*?<script type="application/json">(.*?)</script>', page, re.S).group(1)
        assert json.loads(blob) == json.loads(json.dumps(data))  # the page carries exactly these runs


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
        floor_count = sum(g < 1e-12 for g in r["final_gap"][fn].values())
        assert r[fn]["n_floor"] == floor_count  # the caption says how many reach the floor
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
    for seed in ("-1", "abc", "1.5"):
        with pytest.raises(SystemExit) as e:
            main(["--seed", seed])
        assert e.value.code == 2 and "--seed" in capsys.readouterr().err


def test_lineage_mechanisms(sections):
    _, section, r = sections["lineage"]
    assert r["gap_Momentum"] < r["gap_GD"]                               # momentum fixes the crawl
    assert max(r["gap_AdaGrad"], r["gap_RMSprop"]) < 1e-3 * r["gap_Momentum"]  # per-coordinate steps win here
    assert r["ada_never_grows"] and r["ada_last"] < r["ada_first"]   # AdaGrad's step size only shrinks
    assert r["rms_last"] > r["rms_min"]                              # RMSprop's grows back
    assert r["ab_match"] < 1e-10  # Adam(β₁=0) = RMSprop + bias correction, to rounding
    assert r["ab_ratio"] == pytest.approx(1 / np.sqrt(1 - 0.99), rel=1e-6)  # RMSprop's first step: 1/√(1 − α)
    assert r["rect_6"] < r["rect_100"] < r["rect_1000"] < 1


def test_ideas_each_idea_shows(sections):
    _, section, r = sections["ideas"]
    assert r["sp_t_AdaGrad"] < r["sp_t_SGD"]          # AdaGrad learns the rare feature first
    assert r["sc_adam"] < 1e-6 < 1.0 < r["sc_sgd"]     # Adam's path ignores the loss scale, SGD's does not
    assert r["snr_late_hi"] < 0.5 * r["snr_early_hi"]  # the steps shrink by themselves
    assert r["eps_g0"] < 1e-3 * r["eps_g3"]            # a large ε turns Adam into slow SGD
    assert r["mem_Adam_fp32"] == 8 and r["mem_Adam_bf16"] == 4 and r["mem_SGD_momentum_fp32"] == 4
    # int8: one byte per element and state, plus a float32 absmax per block
    assert r["mem_Adam_int8"] == pytest.approx(2 * (1 + 4 / r["mem_block"]))
    assert r["mem_small_int8"] == 8  # small tensors stay in full precision
    assert 0 < r["bb_near"] <= r["bb_cells"]
    captions = " ".join(f.caption for f in section.figures)
    assert f"{r['mem_Adam_int8']:.3f}" in captions and f"{r['sc_adam']:.1e}" in captions


def test_regression_moments_follow_feature_scales(sections):
    _, _, r = sections["regression"]
    # v is the mean squared gradient, which scales with the square of the feature's scale (w₂: 5, w₃: 0.2)
    assert r["mv_ratio"] == pytest.approx(r["mv_scale_ratio"], rel=1.0)
    assert r["mv_ratio"] > 5


def test_digits_adamw_grid_is_per_step_decay(sections):
    _, section, r = sections["digits"]
    assert r["adamw_edge"] in ("its decay on the grid's edge", "its decay inside the grid")
    assert 0 <= r["adamw_agree"] <= r["n_lrs"]
    caption = section.figures[-1].caption
    assert r["adamw_edge"] in caption and r["l2_edge"] in caption


def test_progress_inside_long_sections(tmp_path, capsys):
    run(tmp_path, only=["functions"], quick=True, verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert sum("…" in line for line in lines) >= 3  # one line per test function, before the section ends
