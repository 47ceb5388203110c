"""Keypoint metrics: PCK, per-class P/R/F1, macro/micro, confusion matrix, plots."""

from __future__ import annotations

import os

import numpy as np
import pytest
from bundle.metrics import KeypointMetric, keypoint_scores, plot_confusion_matrix, plot_pck_curve
from bundle.streams import TIANCHI_STREAMS, StreamSpec

NAN = np.nan
STREAM = StreamSpec("disc", ("a", "b", "c", "d", "e", "f"), ("N", "D"))

# Study 1 (N = 0, D = 1):
#  l0 GT N, pred N at 5 mm       -> TP N, confusion N->N
#  l1 GT D, pred N at 2 mm       -> FP N, FN D, confusion D->N
#  l2 GT D, pred D at 7 mm (far) -> FP D, FN D, confusion D->missed
#  l3 GT N, no prediction        -> FN N, confusion N->missed
#  l4 GT unscored (-1), pred D at 1 mm -> PCK only
#  l5 GT not annotated, pred D   -> ignored
S1 = dict(
    pred_mm=[[3, 4], [10, 2], [20, 7], [NAN, NAN], [41, 0], [50, 0]],
    pred_labels=[0, 0, 1, -1, 1, 1],
    gt_mm=[[0, 0], [10, 0], [20, 0], [30, 0], [40, 0], [NAN, NAN]],
    gt_labels=[0, 1, 1, 0, -1, 0],
)
# Study 2:
#  l0 GT D, pred D at exactly 6 mm -> TP D (hit is inclusive)
#  l1 GT D, pred D at 1 mm         -> TP D
#  l2 GT N, pred N at 0.5 mm       -> TP N
#  l3-l5 nothing
S2 = dict(
    pred_mm=[[0, 6], [10, 1], [20, 0.5], [NAN, NAN], [NAN, NAN], [NAN, NAN]],
    pred_labels=[1, 1, 0, -1, -1, -1],
    gt_mm=[[0, 0], [10, 0], [20, 0], [NAN, NAN], [NAN, NAN], [NAN, NAN]],
    gt_labels=[1, 1, 0, -1, -1, -1],
)


def _metric() -> KeypointMetric:
    m = KeypointMetric([STREAM])
    for s in (S1, S2):
        m.update("disc", **{k: np.asarray(v) for k, v in s.items()})
    return m


def test_counts_prf_macro_micro():
    r = _metric().compute()["disc"]
    assert r["num_studies"] == 2
    assert r["counts"] == {"N": {"tp": 2, "fp": 1, "fn": 1}, "D": {"tp": 2, "fp": 1, "fn": 2}}
    assert r["precision"] == pytest.approx({"N": 2 / 3, "D": 2 / 3})
    assert r["recall"] == pytest.approx({"N": 2 / 3, "D": 2 / 4})
    assert r["f1"] == pytest.approx({"N": 2 / 3, "D": 4 / 7})
    assert r["macro_precision"] == pytest.approx(2 / 3)
    assert r["macro_recall"] == pytest.approx(7 / 12)
    assert r["macro_f1"] == pytest.approx(13 / 21)
    assert r["micro_precision"] == pytest.approx(4 / 6)


def test_confusion_matrix():
    r = _metric().compute()["disc"]
    assert r["class_names"] == ["N", "D"]
    assert r["confusion_columns"] == ["N", "D", "missed"]
    assert r["confusion_matrix"] == [[2, 0, 1], [1, 2, 1]]


def test_pck():
    r = _metric().compute()["disc"]
    # annotated GT: 8 points (l4 unscored included); distances 5, 2, 7, inf, 1 | 6, 1, 0.5
    assert r["num_gt"] == 8
    expected = {"1": 3, "2": 4, "3": 4, "4": 4, "5": 5, "6": 6, "7": 7, "8": 7, "9": 7, "10": 7}
    assert r["pck"] == pytest.approx({k: v / 8 for k, v in expected.items()})


def test_unscored_gt_counts_for_pck_only():
    s = keypoint_scores([[0, 0], [100, 0]], [1, 1], [[0, 30], [100, 0.5]], [-1, -1], ["N", "D"])
    assert s["counts"] == {"N": {"tp": 0, "fp": 0, "fn": 0}, "D": {"tp": 0, "fp": 0, "fn": 0}}
    assert s["confusion_matrix"] == [[0, 0, 0], [0, 0, 0]]
    assert s["pck"]["1"] == 0.5 and s["num_gt"] == 2
    # empty denominators give 0, not NaN
    assert s["precision"] == {"N": 0.0, "D": 0.0} and s["micro_precision"] == 0.0 and s["macro_f1"] == 0.0


def test_micro_precision_differs_from_macro():
    # class N: 3 TP, 0 FP; class D: 0 TP, 1 FP (wrong class at a hit)
    pred = [[0, 0, 0], [10, 0, 0], [20, 0, 0], [30, 0, 0]]
    gt = [[0, 0, 1], [10, 0, 1], [20, 0, 1], [30, 0, 1]]  # 3D points, 1 mm apart
    s = keypoint_scores(pred, [0, 0, 0, 1], gt, [0, 0, 0, 0], ["N", "D"])
    assert s["micro_precision"] == pytest.approx(3 / 4)
    assert s["macro_precision"] == pytest.approx((1.0 + 0.0) / 2)
    assert s["recall"]["N"] == pytest.approx(3 / 4)
    assert s["confusion_matrix"] == [[3, 1, 0], [0, 0, 0]]


def test_hit_distance_parameter():
    s = keypoint_scores([[0, 6.5]], [0], [[0, 0]], [0], ["N"], hit_mm=6.0)
    assert s["counts"]["N"] == {"tp": 0, "fp": 1, "fn": 1}
    s = keypoint_scores([[0, 6.5]], [0], [[0, 0]], [0], ["N"], hit_mm=7.0)
    assert s["counts"]["N"] == {"tp": 1, "fp": 0, "fn": 0}


def test_reset_and_config_mapping_and_validation():
    m = KeypointMetric({"disc": {"levels": ["a", "b"], "classes": ["N", "D"]}}, pck_thresholds_mm=(2.5, 6))
    m.update("disc", [[0, 0], [1, 1]], [0, 0], [[0, 0], [1, 1]], [0, 0])
    r = m.compute()["disc"]
    assert list(r["pck"]) == ["2.5", "6"] and r["counts"]["N"]["tp"] == 2
    m.reset()
    r = m.compute()["disc"]
    assert r["num_studies"] == 0 and r["counts"]["N"]["tp"] == 0 and r["pck"]["6"] == 0.0
    with pytest.raises(ValueError, match="unknown stream"):
        m.update("vertebra", [[0, 0]], [0], [[0, 0]], [0])
    with pytest.raises(ValueError, match="2 levels"):
        m.update("disc", [[0, 0]], [0], [[0, 0]], [0])
    with pytest.raises(ValueError, match="gt_labels"):
        m.update("disc", [[0, 0], [1, 1]], [0, 0], [[0, 0], [1, 1]], [0, 2])
    with pytest.raises(ValueError, match="shape"):
        m.update("disc", [[0, 0], [1, 1]], [0, 0], [[0, 0, 0], [1, 1, 1]], [0, 0])


def test_plots_written_atomically(tmp_path):
    m = KeypointMetric(TIANCHI_STREAMS)
    rng = np.random.default_rng(0)
    for spec in TIANCHI_STREAMS:
        n = spec.num_levels
        gt = rng.uniform(0, 100, (n, 2))
        m.update(spec.name, gt + rng.normal(0, 3, (n, 2)), rng.integers(0, 2, n), gt, rng.integers(0, 2, n))
    res = m.compute()
    pck_png = tmp_path / "out" / "pck.png"
    cm_png = tmp_path / "cm.png"
    plot_pck_curve(res, pck_png)
    plot_confusion_matrix(res, "vertebra", cm_png)
    for p in (pck_png, cm_png):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["cm.png", "out"] and os.listdir(tmp_path / "out") == ["pck.png"]
    with pytest.raises(ValueError, match="unknown stream"):
        plot_confusion_matrix(res, "nope", cm_png)
