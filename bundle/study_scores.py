"""Scores of a study-level run per RSNA condition group, from its written outputs and the data set's labels.

For each group (spinal, foraminal, subarticular): keypoint PCK and per-class F1 (:func:`bundle.metrics.keypoint_scores`)
of the points in each study's ``keypoints.json`` against ``train_label_coordinates.csv`` and ``train.csv``, and the
competition's log-loss terms (:func:`bundle.rsna_metric.rsna_score`) of ``submission.csv`` beside those of the
weighted constant (:func:`bundle.outputs.read_rsna_prior` of the same ``train.csv``) on the same studies.

Distances are in-plane mm: the prediction minus the label, less its component along the normal of the labelled
instance (the series the point was marked on), as the per-series metric projects onto the image plane.
A labelled point with no prediction of the same condition and level counts as missed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bundle.errors import BundleInputError
from bundle.io.dicom_series import SliceHeader
from bundle.io.rsna import instance_point_mm, read_rsna_condition_labels
from bundle.metrics import DEFAULT_PCK_THRESHOLDS_MM, keypoint_scores
from bundle.rsna_labels import CONDITIONS, GROUPS, LEVELS, PRED_COLUMNS, SEVERITIES, snake

__all__ = ["GROUP_CONDITIONS", "read_study_keypoints", "group_keypoint_scores", "group_rsna_terms", "score_study_run"]

#: the conditions of each competition group, in CONDITIONS order
GROUP_CONDITIONS: dict[str, tuple[str, ...]] = {g: tuple(c for c in CONDITIONS if g in c) for g in GROUPS}


def read_study_keypoints(path: str | os.PathLike) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(condition key, level display name): point}`` of one study's ``keypoints.json`` (points need
    ``condition``, ``level``, ``position_mm`` and ``label_index``; others are ignored). The first point of a
    repeated (condition, level) wins."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
        points = list(content["keypoints"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise BundleInputError(f"{path}: not a study keypoints.json ({err})") from err
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for i, point in enumerate(points):
        try:
            key = (snake(str(point["condition"])), str(point["level"]))
            _ = [float(v) for v in point["position_mm"]], int(point["label_index"])
        except (KeyError, TypeError, ValueError) as err:
            raise BundleInputError(f"{path}: keypoint {i} lacks condition, level, position_mm or label_index") from err
        found.setdefault(key, point)
    return found


def _in_plane_distance(pred_mm: Sequence[float], gt_mm: Sequence[float], normal: np.ndarray) -> float:
    diff = np.asarray(pred_mm, dtype=np.float64) - np.asarray(gt_mm, dtype=np.float64)
    return float(np.linalg.norm(diff - float(diff @ normal) * normal))


def _group_rows(
    group: str,
    labels: Mapping[str, Mapping[str, Mapping[str, Mapping]]],
    predictions: Mapping[str, Mapping[tuple[str, str], Mapping]],
    images: Path,
) -> tuple[list[float], list[int], list[int]]:
    """Per labelled cell of ``group``: in-plane distance (inf when either side lacks a point; NaN when the label
    has no point), predicted class (-1 = none), labelled class (-1 = empty cell)."""
    headers: dict[Path, SliceHeader] = {}
    dist, pred, truth = [], [], []
    for study, cells in labels.items():
        found = predictions.get(study, {})
        for condition in GROUP_CONDITIONS[group]:
            for level in LEVELS:
                cell, point = cells[condition][level], found.get((condition, level))
                truth.append(int(cell["severity"]))
                pred.append(-1 if point is None else int(point["label_index"]))
                if cell["series_id"] is None:
                    dist.append(float("nan"))
                    continue
                path = images / study / str(cell["series_id"]) / f"{cell['instance_number']}.dcm"
                where = f"study {study}, {condition} {level}"
                gt = instance_point_mm(path, float(cell["x"]), float(cell["y"]), where, headers)
                normal = headers[path].normal
                dist.append(float("inf") if point is None else _in_plane_distance(point["position_mm"], gt, normal))
    return dist, pred, truth


def group_keypoint_scores(
    labels: Mapping[str, Mapping[str, Mapping[str, Mapping]]],
    predictions: Mapping[str, Mapping[tuple[str, str], Mapping]],
    images: str | os.PathLike,
    hit_mm: float = 6.0,
    pck_thresholds_mm: Sequence[float] = DEFAULT_PCK_THRESHOLDS_MM,
) -> dict[str, dict]:
    """:func:`bundle.metrics.keypoint_scores` per group over all studies of ``labels``
    (:func:`bundle.io.rsna.read_rsna_condition_labels`) against ``predictions`` ({study: :func:`read_study_keypoints`}).

    The in-plane distance is passed as a 2-D position difference (the label at the origin, the prediction at
    ``(distance, 0)``), so PCK and hits are those of the in-plane distance."""
    scores = {}
    for group in GROUPS:
        dist, pred, truth = _group_rows(group, labels, predictions, Path(images))
        d = np.asarray(dist, dtype=np.float64).reshape(-1, 1)
        gt_mm = np.where(np.isnan(d), np.nan, 0.0) * np.ones((1, 2))
        pred_mm = np.hstack([np.where(np.isinf(d), np.nan, np.nan_to_num(d, nan=0.0)), np.zeros_like(d)])
        scores[group] = keypoint_scores(
            pred_mm, np.asarray(pred), gt_mm, np.asarray(truth), SEVERITIES, hit_mm, pck_thresholds_mm
        )
    return scores


def group_rsna_terms(
    solution_csv: str | os.PathLike, rows: Sequence[Mapping[str, Any]], studies: Sequence[str]
) -> dict[str, float]:
    """The competition terms of ``rows`` (submission rows) restricted to ``studies``, scored against ``solution_csv``."""
    from bundle.rsna_metric import read_rsna_solution, rsna_score

    wanted = {str(s) for s in studies}
    solution = [r for r in read_rsna_solution(solution_csv) if str(r["study_id"]) in wanted]
    kept = [r for r in rows if str(r["row_id"]).split("_", 1)[0] in wanted]
    return rsna_score(solution, kept, solution_name=str(solution_csv), submission_name="predictions")


def _constant_rows(studies: Sequence[str], prior: Mapping[str, Sequence[float]]) -> list[dict[str, Any]]:
    return [
        {"row_id": f"{study}_{condition}_{snake(level)}", **dict(zip(PRED_COLUMNS, prior[condition]))}
        for study in studies
        for condition in CONDITIONS
        for level in LEVELS
    ]


def score_study_run(
    output_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    prior_csv: str | os.PathLike | None = None,
    hit_mm: float = 6.0,
    image_dir: str = "train_images",
) -> dict[str, Any]:
    """Per-group scores of a study-level run whose outputs are in ``output_dir`` (``submission.csv`` and
    ``<study>/keypoints.json``) on the labelled RSNA folder ``dataset_dir``.

    Returns ``{"studies": n, "keypoints": {group: keypoint_scores}, "rsna": {term: loss}, "rsna_constant": {term:
    loss}, "rsna_over_constant": {term: ratio}}``. The constant is :func:`bundle.outputs.read_rsna_prior` of
    ``prior_csv`` (the training set's train.csv; default: ``dataset_dir``'s own). A study of train.csv
    without ``keypoints.json`` (e.g. skipped) has all its points missed.
    """
    from bundle.outputs import read_rsna_prior
    from bundle.rsna_metric import read_rsna_submission

    out, root = Path(output_dir), Path(dataset_dir)
    submission = out / "submission.csv"
    if not submission.is_file():
        raise BundleInputError(f"{submission} not found: run the study inference first")
    rows = read_rsna_submission(submission)
    studies = sorted({str(r["row_id"]).split("_", 1)[0] for r in rows})
    labels = {s: v for s, v in read_rsna_condition_labels(root).items() if s in set(studies)}
    if not labels:
        raise BundleInputError(f"none of the {len(studies)} studies of {submission} is labelled in {root}")
    predictions = {
        s: read_study_keypoints(out / s / "keypoints.json") for s in labels if (out / s / "keypoints.json").is_file()
    }
    solution = root / "train.csv"
    rsna = group_rsna_terms(solution, rows, list(labels))
    prior = read_rsna_prior(prior_csv if prior_csv is not None else solution)
    constant = group_rsna_terms(solution, _constant_rows(list(labels), prior), list(labels))
    return {
        "studies": len(labels),
        "keypoints": group_keypoint_scores(labels, predictions, root / image_dir, hit_mm),
        "rsna": rsna,
        "rsna_constant": constant,
        "rsna_over_constant": {k: rsna[k] / constant[k] for k in rsna if constant.get(k)},
    }
