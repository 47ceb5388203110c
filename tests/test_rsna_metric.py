"""RSNA 2024 competition metric: hand-computed case, uniform / perfect properties, errors, CLI."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle.errors import BundleInputError
from bundle.rsna_metric import (
    LABEL_COLUMNS,
    PRED_COLUMNS,
    SEVERITIES,
    read_rsna_solution,
    read_rsna_submission,
    rsna_score,
    weighted_log_loss,
)

ROOT = Path(__file__).resolve().parents[1]


def _solution_row(study: str, **labels: str) -> dict[str, str]:
    row = {"study_id": study, **dict.fromkeys(LABEL_COLUMNS, "")}
    row.update(labels)
    return row


def _sub(row_id: str, nm: float, mo: float, se: float) -> dict[str, str]:
    return {"row_id": row_id, "normal_mild": str(nm), "moderate": str(mo), "severe": str(se)}


SOLUTION = [
    _solution_row(
        "1",
        spinal_canal_stenosis_l1_l2="Normal/Mild",
        spinal_canal_stenosis_l2_l3="Severe",
        left_neural_foraminal_narrowing_l1_l2="Moderate",
    ),
    _solution_row("2", spinal_canal_stenosis_l1_l2="Moderate", right_subarticular_stenosis_l5_s1="Normal/Mild"),
]
SUBMISSION = [
    _sub("1_spinal_canal_stenosis_l1_l2", 0.7, 0.2, 0.1),
    _sub("1_spinal_canal_stenosis_l2_l3", 0.2, 0.3, 0.5),
    _sub("1_left_neural_foraminal_narrowing_l1_l2", 0.2, 0.6, 0.2),
    _sub("2_spinal_canal_stenosis_l1_l2", 0.5, 0.3, 0.4),  # sums to 1.2: renormalised
    _sub("2_right_subarticular_stenosis_l5_s1", 0.9, 0.1, 0.0),  # 0 clipped to eps
    _sub("2_spinal_canal_stenosis_l3_l4", 0.1, 0.1, 0.8),  # unscored (empty cell): ignored everywhere
]


def test_hand_computed_tiny_case():
    r = rsna_score(SOLUTION, SUBMISSION)
    spinal = (1 * -math.log(0.7) + 4 * -math.log(0.5) + 2 * -math.log(0.3 / 1.2)) / (1 + 4 + 2)
    foraminal = -math.log(0.6)
    subarticular = -math.log(0.9)
    # study 1: severe (weight 4), max severe 0.5; study 2: not severe (weight 2), max raw severe 0.4
    any_severe = (4 * -math.log(0.5) + 2 * -math.log(1 - 0.4)) / (4 + 2)
    assert set(r) == {"spinal", "foraminal", "subarticular", "any_severe_spinal", "score"}
    assert r["spinal"] == pytest.approx(spinal, rel=1e-12)
    assert r["foraminal"] == pytest.approx(foraminal, rel=1e-12)
    assert r["subarticular"] == pytest.approx(subarticular, rel=1e-12)
    assert r["any_severe_spinal"] == pytest.approx(any_severe, rel=1e-12)
    assert r["score"] == pytest.approx((spinal + foraminal + subarticular + any_severe) / 4, rel=1e-12)


def test_only_present_groups_are_scored():
    r = rsna_score(SOLUTION, [s for s in SUBMISSION if "spinal" in s["row_id"]])
    assert set(r) == {"spinal", "any_severe_spinal", "score"}
    assert r["score"] == pytest.approx((r["spinal"] + r["any_severe_spinal"]) / 2)
    # a submission for study 2 only scores study 2 (validation fold against the full train.csv)
    r2 = rsna_score(SOLUTION, [s for s in SUBMISSION if s["row_id"].startswith("2_")])
    assert r2["spinal"] == pytest.approx(-math.log(0.25))
    assert "foraminal" not in r2


def _random_solution(rng: np.random.Generator, n: int) -> list[dict[str, str]]:
    rows = []
    for k in range(n):
        labels = {c: ("" if rng.random() < 0.1 else SEVERITIES[rng.integers(0, 3)]) for c in LABEL_COLUMNS}
        rows.append({"study_id": str(4_000_000_000 + k), **labels})  # ids beyond int32
    return rows


def test_uniform_predictions_give_log3():
    rng = np.random.default_rng(0)
    solution = _random_solution(rng, 12)
    sub = [_sub(f"{r['study_id']}_{c}", 1 / 3, 1 / 3, 1 / 3) for r in solution for c in LABEL_COLUMNS]
    r = rsna_score(solution, sub)
    for group in ("spinal", "foraminal", "subarticular"):
        assert r[group] == pytest.approx(math.log(3), abs=1e-12)
    # unnormalised uniform rows are renormalised to the same value
    sub2 = [_sub(s["row_id"], 5, 5, 5) for s in sub]
    assert rsna_score(solution, sub2)["foraminal"] == pytest.approx(math.log(3), abs=1e-12)


def test_perfect_predictions_give_zero():
    rng = np.random.default_rng(1)
    solution = _random_solution(rng, 8)
    sub = []
    for r in solution:
        for c in LABEL_COLUMNS:
            onehot = [0.0, 0.0, 0.0]
            if r[c]:
                onehot[SEVERITIES.index(r[c])] = 1.0
            sub.append(_sub(f"{r['study_id']}_{c}", *onehot))
    result = rsna_score(solution, sub)
    assert len(result) == 5
    for value in result.values():
        assert 0.0 <= value < 1e-12


def test_weighted_log_loss_clips_and_renormalises():
    eps = 1e-3
    got = weighted_log_loss(np.array([2]), np.array([[0.5, 0.5, 0.0]]), np.array([1.0]), eps=eps)
    assert got == pytest.approx(-math.log(eps / (1.0 + eps)))
    got = weighted_log_loss(np.array([1, 0]), np.array([0.8, 1.0]), np.array([1.0, 3.0]), eps=eps)
    assert got == pytest.approx((-math.log(0.8) - 3 * math.log(eps)) / 4)


@pytest.mark.parametrize(
    "bad_row, message",
    [
        (_sub("1_spinal_canal_stenosis_l1_l2", 0.5, "x", 0.1), "moderate is not a number"),
        (_sub("1_spinal_canal_stenosis_l1_l2", 0.5, -0.1, 0.1), "moderate is negative"),
        (_sub("1_spinal_canal_stenosis_l1_l2", 0.5, "nan", 0.1), "not finite"),
        (_sub("1_spinal_canal_stenosis_l2_l3", 0.5, 0.5, 0.1), "duplicate row_id 1_spinal_canal_stenosis_l2_l3"),
        (_sub("1_spinal_l1_l2", 0.5, 0.5, 0.1), "row_id '1_spinal_l1_l2'"),
        (_sub("3_spinal_canal_stenosis_l1_l2", 0.5, 0.5, 0.1), r"studies \['3'\] are not in"),
    ],
)
def test_bad_submission_rows(bad_row, message):
    sub = SUBMISSION[1:] + [bad_row]
    with pytest.raises(BundleInputError, match=message) as info:
        rsna_score(SOLUTION, sub, submission_name="sub.csv")
    assert "sub.csv" in str(info.value)


def test_missing_scored_row_is_named():
    with pytest.raises(BundleInputError, match="no row for row_id 1_spinal_canal_stenosis_l1_l2"):
        rsna_score(SOLUTION, SUBMISSION[1:])


def test_bad_solution_rows():
    bad = [dict(SOLUTION[0]), dict(SOLUTION[1])]
    bad[1]["spinal_canal_stenosis_l4_l5"] = "severe"
    with pytest.raises(BundleInputError, match="line 3: column spinal_canal_stenosis_l4_l5 has 'severe'"):
        rsna_score(bad, SUBMISSION, solution_name="train.csv")
    with pytest.raises(BundleInputError, match="duplicate study_id 1"):
        rsna_score([SOLUTION[0], SOLUTION[0]], SUBMISSION)


def _write_csv(path: Path, rows: list[dict[str, str]], columns: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_readers_and_missing_columns(tmp_path):
    sol = _write_csv(tmp_path / "train.csv", SOLUTION, ["study_id", *LABEL_COLUMNS])
    sub = _write_csv(tmp_path / "sub.csv", SUBMISSION, ["row_id", *PRED_COLUMNS])
    assert rsna_score(read_rsna_solution(sol), read_rsna_submission(sub)) == rsna_score(SOLUTION, SUBMISSION)
    short_rows = [{k: v for k, v in s.items() if k != "severe"} for s in SUBMISSION]
    short = _write_csv(tmp_path / "short.csv", short_rows, ["row_id", "normal_mild", "moderate"])
    with pytest.raises(BundleInputError, match=r"short.csv: missing columns \['severe'\]"):
        read_rsna_submission(short)
    with pytest.raises(BundleInputError, match="cannot read solution file"):
        read_rsna_solution(tmp_path / "absent.csv")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "rsna_score.py"), *args], capture_output=True, text=True, cwd="/"
    )


def test_cli_end_to_end(tmp_path):
    sol = _write_csv(tmp_path / "train.csv", SOLUTION, ["study_id", *LABEL_COLUMNS])
    sub = _write_csv(tmp_path / "submission.csv", SUBMISSION, ["row_id", *PRED_COLUMNS])
    done = _cli("--solution", str(sol), "--submission", str(sub))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == pytest.approx(rsna_score(SOLUTION, SUBMISSION), rel=1e-12)

    bad_rows = [dict(s) for s in SUBMISSION]
    bad_rows[2]["severe"] = "high"
    bad = _write_csv(tmp_path / "bad.csv", bad_rows, ["row_id", *PRED_COLUMNS])
    done = _cli("--solution", str(sol), "--submission", str(bad))
    assert done.returncode == 2
    assert f"{bad}, line 4" in done.stderr and "severe is not a number" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
