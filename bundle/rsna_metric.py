"""RSNA 2024 Lumbar Spine Degenerative Classification competition metric (lower is better).

Follows the official Kaggle metric ("rsna-lumbar-metric", which calls ``sklearn.metrics.log_loss``):

- condition groups spinal / foraminal / subarticular: sample-weighted log loss over the scored rows
  of the group, weights 1 / 2 / 4 for Normal/Mild / Moderate / Severe ground truth;
- ``any_severe_spinal``: per study with scored spinal rows, label = any of them Severe, prediction =
  the maximum submitted ``severe`` value over them (as submitted, not renormalised, as the official
  code does), weight = the maximum sample weight of them; binary weighted log loss;
- probabilities are clipped to [eps, 1 - eps] and each row renormalised to sum 1 (sklearn's order);
  ``eps`` defaults to float64 machine epsilon, sklearn's default since 1.2 (``eps="auto"``);
- score = mean of the terms present.

Differences from the official code, both for use outside Kaggle: only the studies present in the
submission are scored (so a submission for a validation fold can be scored against the full
train.csv), and a term is present only when the submission has rows of that group and there is at
least one scored row for it (the official code scores all three groups always, and its
``any_severe_spinal`` term raises when no or every study is severe; here it is computed anyway).
Empty train.csv cells are not scored. Log loss is written with numpy because sklearn is not a
dependency of the bundle.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from bundle.csvrows import is_blank_row
from bundle.errors import BundleInputError
from bundle.rsna_labels import CONDITIONS, GROUPS
from bundle.rsna_labels import LEVEL_KEYS as LEVELS
from bundle.rsna_labels import PRED_COLUMNS, SAMPLE_WEIGHTS, SEVERITIES

__all__ = [
    "CONDITIONS",
    "EPS",
    "GROUPS",
    "LABEL_COLUMNS",
    "LEVELS",
    "PRED_COLUMNS",
    "SAMPLE_WEIGHTS",
    "SEVERITIES",
    "read_rsna_solution",
    "read_rsna_submission",
    "rsna_score",
    "weighted_log_loss",
]

LABEL_COLUMNS = tuple(f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS)
EPS = float(np.finfo(np.float64).eps)
ANY_SEVERE = "any_severe_spinal"


def _group(column: str) -> str:
    return next(g for g in GROUPS if g in column)


def _study_key(value: object) -> str:
    """Canonical study id: stripped text, leading zeros dropped for integers (ids may exceed int32)."""
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def _where(name: str, index: int) -> str:
    return f"{name}, line {index + 2}"  # header is line 1


def weighted_log_loss(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray, eps: float = EPS) -> float:
    """Weighted mean of ``-log p[true]`` after clipping to [eps, 1 - eps] and renormalising each row.

    Args:
        y_true: (N,) class indices.
        y_pred: (N, K) non-negative scores, or (N,) probabilities of class 1 (binary case).
        weights: (N,) sample weights.

    Example:
        >>> round(weighted_log_loss(np.array([0, 1]), np.array([[0.5, 0.5], [0.0, 2.0]]), np.array([1.0, 3.0])), 6)
        0.173287
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    p = np.clip(np.asarray(y_pred, dtype=np.float64), eps, 1.0 - eps)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    w = np.asarray(weights, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y_true.shape[0] or w.shape != y_true.shape:
        raise ValueError(f"shape mismatch: y_true {y_true.shape}, y_pred {p.shape}, weights {w.shape}")
    if y_true.size == 0 or w.sum() <= 0:
        raise ValueError("log loss needs at least one row with positive weight")
    p = p / p.sum(axis=1, keepdims=True)
    losses = -np.log(p[np.arange(len(y_true)), y_true])
    return float(np.sum(w * losses) / np.sum(w))


def _read_csv(path: str | os.PathLike, required: Sequence[str], kind: str) -> list[dict[str, str]]:
    name = os.fspath(path)
    try:
        with open(name, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise BundleInputError(f"{kind} file {name}: missing columns {missing} (header: {header})")
            return list(reader)
    except OSError as e:
        raise BundleInputError(f"cannot read {kind} file {name}: {e.strerror or e}") from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise BundleInputError(f"{kind} file {name} is not a readable CSV: {e}") from e


def read_rsna_solution(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read and check a train.csv-format file (``study_id`` + the 25 label columns); rows as dicts."""
    rows = _read_csv(path, ("study_id", *LABEL_COLUMNS), "solution")
    _parse_solution(rows, os.fspath(path))
    return rows


def read_rsna_submission(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read and check a ``row_id,normal_mild,moderate,severe`` file; rows as dicts."""
    rows = _read_csv(path, ("row_id", *PRED_COLUMNS), "submission")
    _parse_submission(rows, os.fspath(path))
    return rows


def _parse_solution(rows: Iterable[Mapping[str, object]], name: str) -> dict[str, list[int]]:
    """``{study: [severity index or -1 for the 25 LABEL_COLUMNS]}``, in file order."""
    out: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if is_blank_row(row):
            continue  # a spreadsheet's trailing ",,,," rows
        missing = [c for c in ("study_id", *LABEL_COLUMNS) if c not in row]
        if missing:
            raise BundleInputError(f"{_where(name, i)}: missing columns {missing}")
        study = _study_key(row["study_id"] if row["study_id"] is not None else "")
        if not study:
            raise BundleInputError(f"{_where(name, i)}: empty study_id")
        if study in out:
            raise BundleInputError(f"{_where(name, i)}: duplicate study_id {study}")
        labels = []
        for col in LABEL_COLUMNS:
            value = "" if row[col] is None else str(row[col]).strip()
            if value and value not in SEVERITIES:
                raise BundleInputError(
                    f"{_where(name, i)}: column {col} has {value!r}; expected one of {list(SEVERITIES)} or empty"
                )
            labels.append(SEVERITIES.index(value) if value else -1)
        out[study] = labels
    return out


def _parse_submission(rows: Iterable[Mapping[str, object]], name: str) -> dict[tuple[str, str], np.ndarray]:
    """``{(study, label column): (3,) probabilities}`` after checking ids and values."""
    out: dict[tuple[str, str], np.ndarray] = {}
    for i, row in enumerate(rows):
        if is_blank_row(row):
            continue
        missing = [c for c in ("row_id", *PRED_COLUMNS) if c not in row]
        if missing:
            raise BundleInputError(f"{_where(name, i)}: missing columns {missing}")
        row_id = str(row["row_id"] or "").strip()
        study, _, column = row_id.partition("_")
        if not study or column not in LABEL_COLUMNS:
            raise BundleInputError(
                f"{_where(name, i)}: row_id {row_id!r} is not '{{study_id}}_{{condition}}_{{level}}' "
                f"with a condition in {list(CONDITIONS)} and a level in {list(LEVELS)}"
            )
        key = (_study_key(study), column)
        if key in out:
            raise BundleInputError(f"{_where(name, i)}: duplicate row_id {row_id}")
        values = []
        for col in PRED_COLUMNS:
            try:
                v = float(str(row[col]).strip())
            except ValueError:
                raise BundleInputError(f"{_where(name, i)} ({row_id}): {col} is not a number: {row[col]!r}") from None
            if not math.isfinite(v):
                raise BundleInputError(f"{_where(name, i)} ({row_id}): {col} is not finite: {row[col]!r}")
            if v < 0:
                raise BundleInputError(f"{_where(name, i)} ({row_id}): {col} is negative: {v}")
            values.append(v)
        out[key] = np.asarray(values, dtype=np.float64)
    return out


def rsna_score(
    solution_rows: Iterable[Mapping[str, object]],
    submission_rows: Iterable[Mapping[str, object]],
    eps: float = EPS,
    solution_name: str = "solution",
    submission_name: str = "submission",
) -> dict[str, float]:
    """Competition score of a submission against train.csv-format ground truth.

    Args:
        solution_rows: rows of train.csv (``study_id`` + 25 ``{condition}_{level}`` columns, values
            ``Normal/Mild``, ``Moderate``, ``Severe`` or empty = unscored), e.g. ``csv.DictReader`` rows.
        submission_rows: rows with ``row_id`` = ``{study_id}_{condition}_{level}`` and
            ``normal_mild``, ``moderate``, ``severe`` (non-negative numbers).
        eps: probability clipping bound.
        solution_name, submission_name: names used in error messages (file paths for the CLI).

    Returns:
        ``{"spinal", "foraminal", "subarticular", "any_severe_spinal"}`` (each only when present)
        and ``"score"``, their mean.

    Raises:
        BundleInputError: bad rows, a submission study absent from the solution, or a scored row of a
            present group without a submission row (the first one in solution order is named).
    """
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    solution = _parse_solution(solution_rows, solution_name)
    submission = _parse_submission(submission_rows, submission_name)
    if not submission:
        raise BundleInputError(f"{submission_name}: no rows to score")
    sub_studies = {study for study, _ in submission}
    unknown = sorted(sub_studies - set(solution))
    if unknown:
        raise BundleInputError(f"{submission_name}: studies {unknown[:5]} are not in {solution_name}")
    present = {_group(col) for _, col in submission}
    studies = [s for s in solution if s in sub_studies]

    result: dict[str, float] = {}
    for group in GROUPS:
        if group not in present:
            continue
        y, p, w = [], [], []
        for study in studies:
            for col, label in zip(LABEL_COLUMNS, solution[study]):
                if label < 0 or _group(col) != group:
                    continue
                if (study, col) not in submission:
                    raise BundleInputError(
                        f"{submission_name}: no row for row_id {study}_{col}, scored in {solution_name}"
                    )
                y.append(label)
                p.append(submission[(study, col)])
                w.append(SAMPLE_WEIGHTS[label])
        if y:
            result[group] = weighted_log_loss(np.array(y), np.stack(p), np.array(w), eps)

    if "spinal" in result:
        y, p, w = [], [], []
        for study in studies:
            labelled = zip(LABEL_COLUMNS, solution[study])
            rows = [(col, lab) for col, lab in labelled if lab >= 0 and _group(col) == "spinal"]
            if rows:
                labels = [lab for _, lab in rows]
                y.append(int(max(labels) == 2))
                w.append(max(SAMPLE_WEIGHTS[lab] for lab in labels))
                p.append(max(submission[(study, col)][2] for col, _ in rows))
        result[ANY_SEVERE] = weighted_log_loss(np.array(y), np.array(p), np.array(w), eps)

    if not result:
        raise BundleInputError(f"{submission_name}: none of its rows is scored in {solution_name}")
    result["score"] = float(np.mean(list(result.values())))
    return result
