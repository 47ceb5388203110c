"""Per-group scores of a study-level run (bundle.study_scores), on outputs built from a phantom set's own labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from bundle.errors import BundleInputError
from bundle.io.dicom_series import SliceHeader
from bundle.io.rsna import instance_point_mm, read_rsna_condition_labels
from bundle.phantoms import generate_phantoms
from bundle.rsna_labels import CONDITIONS, GROUPS, LEVELS, PRED_COLUMNS, snake
from bundle.study_scores import GROUP_CONDITIONS, read_study_keypoints, score_study_run


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return generate_phantoms(tmp_path_factory.mktemp("rsna"), "rsna", studies=4, seed=3, min_size=64, max_size=96)


def _truth(root: Path) -> dict[str, dict[tuple[str, str], tuple[list[float] | None, int, np.ndarray | None]]]:
    """{study: {(condition, level): (label mm or None, severity, normal of the labelled instance or None)}}."""
    headers: dict[Path, SliceHeader] = {}
    out = {}
    for study, cells in read_rsna_condition_labels(root).items():
        out[study] = {}
        for condition in CONDITIONS:
            for level in LEVELS:
                c = cells[condition][level]
                if c["series_id"] is None:
                    out[study][(condition, level)] = (None, int(c["severity"]), None)
                    continue
                path = root / "train_images" / study / c["series_id"] / f"{c['instance_number']}.dcm"
                mm = instance_point_mm(path, c["x"], c["y"], "test", headers)
                out[study][(condition, level)] = (mm, int(c["severity"]), headers[path].normal)
    return out


def _write_run(out: Path, truth, shift=None, wrong_class=None, drop=None, probs=None) -> None:
    """keypoints.json per study and submission.csv from the labels; ``shift(study, condition, level, normal)``
    returns a mm offset, ``wrong_class`` / ``drop`` are sets of (study, condition, level)."""
    rows = []
    for study, cells in truth.items():
        points = []
        for (condition, level), (mm, severity, normal) in cells.items():
            label = max(severity, 0)
            if wrong_class and (study, condition, level) in wrong_class:
                label = (label + 1) % 3
            p = np.eye(3)[label] * 0.9 + 0.05 if probs is None else np.asarray(probs[condition])
            rows.append([f"{study}_{condition}_{snake(level)}", *p])
            if mm is None or (drop and (study, condition, level) in drop):
                continue
            offset = shift(study, condition, level, normal) if shift else np.zeros(3)
            point = {"condition": condition, "level": level, "label_index": label}
            points.append({**point, "position_mm": list(np.asarray(mm) + offset)})
        (out / study).mkdir(parents=True, exist_ok=True)
        (out / study / "keypoints.json").write_text(json.dumps({"study_id": study, "keypoints": points}))
    with open(out / "submission.csv", "w", newline="") as f:
        csv.writer(f).writerows([["row_id", *PRED_COLUMNS], *rows])


def _in_plane_unit(normal: np.ndarray) -> np.ndarray:
    """A unit vector perpendicular to ``normal``."""
    v = np.cross(normal, [0.0, 0.0, 1.0] if abs(normal[2]) < 0.9 else [1.0, 0.0, 0.0])
    return v / np.linalg.norm(v)


def test_perfect_run_scores_one_and_beats_the_constant(phantoms, tmp_path):
    truth = _truth(phantoms)
    _write_run(tmp_path, truth)
    result = score_study_run(tmp_path, phantoms)
    assert result["studies"] == 4
    for group in GROUPS:
        scores = result["keypoints"][group]
        located = sum(
            1 for cells in truth.values() for (c, _), v in cells.items() if c in GROUP_CONDITIONS[group] and v[0]
        )
        assert scores["num_gt"] == located > 0
        assert scores["pck"]["1"] == 1.0
        assert scores["counts"]["Normal/Mild"]["fp"] == 0
        assert result["rsna_over_constant"][group] < 0.5  # 0.9 on the right class against the weighted constant
    assert set(result["rsna"]) >= {"spinal", "foraminal", "subarticular", "any_severe_spinal"}


def test_distances_are_in_plane_and_count_by_hand(phantoms, tmp_path):
    """7 mm in-plane shifts of every left foraminal point: foraminal PCK@6 drops to the right fraction by hand;
    12 mm along the labelled instance's normal changes nothing."""
    truth = _truth(phantoms)
    left = GROUP_CONDITIONS["foraminal"][0]

    def shift(study, condition, level, normal):
        if condition == left:
            return 7.0 * _in_plane_unit(normal)
        return 12.0 * normal

    _write_run(tmp_path, truth, shift=shift)
    scores = score_study_run(tmp_path, phantoms)["keypoints"]
    foraminal = [
        (c, v) for cells in truth.values() for (c, _), v in cells.items() if c in GROUP_CONDITIONS["foraminal"]
    ]
    located = [c for c, v in foraminal if v[0] is not None]
    expected = sum(c != left for c in located) / len(located)
    assert scores["foraminal"]["pck"]["6"] == pytest.approx(expected)
    assert scores["foraminal"]["pck"]["7"] == 1.0  # (7 mm within float rounding of the threshold)
    assert scores["spinal"]["pck"]["1"] == 1.0 and scores["subarticular"]["pck"]["1"] == 1.0


def test_missing_points_and_wrong_classes_count(phantoms, tmp_path):
    truth = _truth(phantoms)
    study = sorted(truth)[0]
    spinal = CONDITIONS[0]
    labelled = [lv for lv in LEVELS if truth[study][(spinal, lv)][0] is not None and truth[study][(spinal, lv)][1] >= 0]
    drop = {(study, spinal, labelled[0])}
    wrong = {(study, spinal, labelled[1])}
    _write_run(tmp_path, truth, drop=drop, wrong_class=wrong)
    scores = score_study_run(tmp_path, phantoms)["keypoints"]["spinal"]
    assert scores["pck"]["10"] == pytest.approx((scores["num_gt"] - 1) / scores["num_gt"])
    counts = scores["counts"]
    assert sum(c["fn"] for c in counts.values()) == 2  # the dropped and the misclassified point
    assert sum(c["fp"] for c in counts.values()) == 1  # the misclassified point, in its predicted class


def test_constant_submission_scores_as_the_constant(phantoms, tmp_path):
    from bundle.outputs import read_rsna_prior

    prior = read_rsna_prior(phantoms / "train.csv")
    _write_run(tmp_path, _truth(phantoms), probs=prior)
    result = score_study_run(tmp_path, phantoms)
    for term, ratio in result["rsna_over_constant"].items():
        assert ratio == pytest.approx(1.0, abs=1e-5), term


def test_bad_outputs_are_named(phantoms, tmp_path):
    with pytest.raises(BundleInputError, match="submission.csv not found"):
        score_study_run(tmp_path, phantoms)
    bad = tmp_path / "keypoints.json"
    bad.write_text(json.dumps({"keypoints": [{"level": "L1/L2"}]}))
    with pytest.raises(BundleInputError, match=r"keypoints.json: keypoint 0 lacks"):
        read_study_keypoints(bad)


def test_score_study_script_writes_the_json(phantoms, tmp_path):
    import subprocess
    import sys

    _write_run(tmp_path, _truth(phantoms))
    script = Path(__file__).resolve().parents[1] / "scripts" / "score_study.py"
    args = [sys.executable, str(script), "--outputs", str(tmp_path), "--dataset_dir", str(phantoms)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "study_scores.json").read_text())
    assert written["keypoints"]["foraminal"]["pck"]["6"] == 1.0 and "PCK-6 1.000" in done.stdout
    missing = subprocess.run([*args[:3], str(tmp_path / "none"), *args[4:]], capture_output=True, text=True)
    assert missing.returncode == 2 and "submission.csv not found" in missing.stderr
