"""The experiment plots say what they show: clipped +- 1 std bands, the paper figure, the threshold line,
one colour per model size (vanilla dashed), integer hop counts, compare curves with more than 3 points."""

from __future__ import annotations

import numpy as np
import pytest

from kvshift.experiments.common import model_styles
from kvshift.experiments.runner import plot_curves
from kvshift.experiments.toy import plot_hopk
from kvshift.train.recipes import get_recipe


def _runs():
    steps = [0, 50, 100, 150]
    curves = {"vanilla-1L": [[0.1, 0.1, 0.12, 0.1], [0.1, 0.3, 0.5, 0.1]],
              "kvshift-1L": [[0.1, 0.9, 1.0, 1.0], [0.1, 0.5, 0.95, 1.0]],
              "vanilla-2L": [[0.1, 0.4, 0.99, 1.0], [0.1, 0.2, 0.9, 1.0]]}
    return [{"model": m, "lr": 1e-3, "curve": list(zip(steps, c))} for m, cs in curves.items() for c in cs]


def test_curve_plot_bands_threshold_title_and_colours():
    kv = {"vanilla-1L": False, "kvshift-1L": True, "vanilla-2L": False}
    fig = plot_curves(_runs(), kv, title="induction (paper Fig. 1a)", metric_name="induction accuracy",
                      threshold=0.9, bounds=(0.0, 1.0))
    ax = fig.axes[0]
    assert "Fig. 1a" in ax.get_title() and "1 std over seeds" in ax.get_title()
    for band in ax.collections:  # the shaded bands never leave [0, 1]
        ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
        assert ys.min() >= 0.0 and ys.max() <= 1.0
    assert len(ax.collections) == 3
    lines = {line.get_label().split(" (")[0]: line for line in ax.get_lines()}
    assert any(np.allclose(line.get_ydata(), 0.9) for line in ax.get_lines())  # the 90% line
    assert lines["vanilla-1L"].get_color() == lines["kvshift-1L"].get_color() != lines["vanilla-2L"].get_color()
    assert lines["vanilla-1L"].get_linestyle() == "--" and lines["kvshift-1L"].get_linestyle() == "-"


def test_model_styles_pair_sizes():
    styles = model_styles({"vanilla-XS": False, "kvshift-XS": True, "vanilla-S": False, "kvshift-S": True})
    assert styles["vanilla-XS"]["color"] == styles["kvshift-XS"]["color"] != styles["kvshift-S"]["color"]
    assert {s["linestyle"] for n, s in styles.items() if n.startswith("vanilla")} == {"--"}


def test_hopk_plot_has_integer_ticks():
    rows = [{"model": "vanilla-1L", "kv_shift": False, "error_by_k": {"1": 0.2, "2": 0.4, "3": 0.5}},
            {"model": "kvshift-1L", "kv_shift": True, "error_by_k": {"1": 0.0, "2": 0.1, "3": 0.2}}]
    ax = plot_hopk(rows, seeds=3).axes[0]
    assert list(ax.get_xticks()) == [1, 2, 3] and "Fig. 9" in ax.get_title()


@pytest.mark.parametrize("recipe", ["stdlib-small", "stdlib-quick"])
def test_compare_recipes_draw_curves_with_more_than_3_points(recipe):
    cfg = get_recipe(recipe)
    assert cfg.steps // cfg.eval_every > 3
