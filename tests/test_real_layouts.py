"""Real-data layouts (issue 10): the weighted constant prediction, CSV quirks of real files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from bundle.outputs import RSNA_CLASS_FREQUENCIES, RSNA_PRIOR, best_constant, read_rsna_prior
from bundle.rsna_metric import CONDITIONS, LABEL_COLUMNS, SAMPLE_WEIGHTS, weighted_log_loss


def _constant_loss(labels: np.ndarray, p: np.ndarray) -> float:
    """The competition's weighted log loss of one constant prediction ``p`` (3,) for every row."""
    weights = np.asarray(SAMPLE_WEIGHTS)[labels]
    return weighted_log_loss(labels, np.tile(p, (len(labels), 1)), weights)


def test_best_constant_by_hand_and_by_brute_force():
    labels = np.array([0] * 6 + [1] * 3 + [2])  # frequencies 0.6, 0.3, 0.1
    best = np.array(best_constant((0.6, 0.3, 0.1)))
    # by hand: w * f = (0.6, 0.6, 0.4), sum 1.6
    np.testing.assert_allclose(best, [0.375, 0.375, 0.25])
    grid = [np.array([a, b, 100 - a - b]) / 100 for a, b in itertools.product(range(1, 99), repeat=2) if a + b < 100]
    losses = [_constant_loss(labels, p) for p in grid]
    assert _constant_loss(labels, best) <= min(losses) + 1e-12
    np.testing.assert_allclose(grid[int(np.argmin(losses))], best, atol=0.011)
    assert _constant_loss(labels, best) < _constant_loss(labels, np.array([0.6, 0.3, 0.1]))


@pytest.mark.parametrize(
    "group, frequency_loss, weighted_loss",
    [("spinal", 0.888, 0.783), ("foraminal", 1.019, 0.919), ("subarticular", 1.198, 1.051)],
)
def test_builtin_constant_beats_frequencies_and_uniform(group, frequency_loss, weighted_loss):
    """Expected loss under the built-in RSNA frequencies: the issue's measured figures, to their rounding."""
    f = np.asarray(RSNA_CLASS_FREQUENCIES[group]) / np.sum(RSNA_CLASS_FREQUENCIES[group])
    w = np.asarray(SAMPLE_WEIGHTS)

    def expected(p) -> float:
        return float(-(w * f * np.log(p)).sum() / (w * f).sum())

    condition = next(c for c in CONDITIONS if group in c)
    prior = np.asarray(RSNA_PRIOR[condition])
    assert expected(f) == pytest.approx(frequency_loss, abs=0.005)
    assert expected(prior) == pytest.approx(weighted_loss, abs=0.005)
    assert expected(prior) < min(expected(f), expected(np.full(3, 1 / 3)))


def test_prior_from_train_csv_with_crlf_bom_and_spreadsheet_blank_rows(tmp_path):
    header = ",".join(["study_id", *LABEL_COLUMNS])
    rows = [
        "4294967296123," + ",".join(["Severe"] * 5 + ["Moderate"] * 5 + [""] * 15),
        "1," + ",".join(["Normal/Mild"] * 5 + ["Moderate"] * 5 + [""] * 15),
        "," * len(LABEL_COLUMNS),
        "," * len(LABEL_COLUMNS),
    ]
    path = tmp_path / "train.csv"
    path.write_bytes(("\ufeff" + "\r\n".join([header, *rows]) + "\r\n").encode("utf-8"))
    prior = read_rsna_prior(path)
    # spinal counts (5, 0, 5), add-one smoothed (6, 1, 6) / 13, times weights (1, 2, 4): (6, 2, 24) / 32
    assert prior["spinal_canal_stenosis"] == pytest.approx((6 / 32, 2 / 32, 24 / 32))
    # left foraminal counts (0, 10, 0): (1, 11, 1) / 13 -> (1, 22, 4) / 27
    assert prior["left_neural_foraminal_narrowing"] == pytest.approx((1 / 27, 22 / 27, 4 / 27))
    assert prior["left_subarticular_stenosis"] == RSNA_PRIOR["left_subarticular_stenosis"]  # no labels: built-in
