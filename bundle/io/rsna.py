"""Datalist items from the RSNA 2024 Lumbar Spine Degenerative Classification layout.

Stream "disc" = spinal canal stenosis at L1/L2..L5/S1 on the study's Sagittal T2/STIR series.
Points (x = column, y = row, pixels of the referenced instance) become patient mm with that
instance's own geometry, so they stay valid on any series of the study.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

from bundle.csvrows import read_csv_rows
from bundle.errors import BundleInputError
from bundle.io.dicom_series import SliceHeader, pixel_to_patient, slice_header
from bundle.io.pixels import read_header
from bundle.io.series_selection import RSNA_SAGITTAL_T2
from bundle.rsna_labels import CONDITION_NAMES as RSNA_CONDITIONS
from bundle.rsna_labels import CONDITIONS as CONDITION_KEYS
from bundle.rsna_labels import LEVELS as RSNA_LEVELS
from bundle.rsna_labels import SEVERITIES, snake
from bundle.skipping import skipped_item
from bundle.streams import RSNA_STREAMS

__all__ = [
    "build_rsna_datalist",
    "read_rsna_condition_labels",
    "read_rsna_series",
    "RSNA_CONDITIONS",
    "RSNA_SEVERITY_CLASSES",
]

logger = logging.getLogger(__name__)

RSNA_SEVERITY_CLASSES = {s.lower(): i for i, s in enumerate(SEVERITIES)}
_SPINAL = RSNA_CONDITIONS[0]
_CONDITION_KEYS = {c.lower(): c for c in RSNA_CONDITIONS}
_LEVEL_KEYS = {lv.lower(): lv for lv in RSNA_LEVELS}


def _rows(path: Path, required: set[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV (CRLF, BOM and blank rows accepted); ids stay strings."""
    return read_csv_rows(path, sorted(required), what="CSV file")


def _norm_condition(text: str, where: str) -> str:
    key = text.replace("_", " ").strip().lower()
    if key not in _CONDITION_KEYS:
        raise BundleInputError(f"{where}: unknown condition {text!r}; expected one of {list(RSNA_CONDITIONS)}")
    return _CONDITION_KEYS[key]


def _norm_level(text: str, where: str) -> str:
    key = text.replace("_", "/").strip().lower()
    if key not in _LEVEL_KEYS:
        raise BundleInputError(f"{where}: unknown level {text!r}; expected one of {list(RSNA_LEVELS)}")
    return _LEVEL_KEYS[key]


def _read_series(path: Path) -> dict[str, list[tuple[str, str]]]:
    """study_id -> [(series_id, description)] in file order."""
    out: dict[str, list[tuple[str, str]]] = {}
    for _, row in _rows(path, {"study_id", "series_id", "series_description"}):
        out.setdefault(row["study_id"], []).append((row["series_id"], row["series_description"]))
    return out


def _read_labels(path: Path, conditions: tuple[str, ...] = (_SPINAL,)) -> dict[str, list[int]]:
    """study_id -> class per (condition, level) cell, conditions then levels (-1 for an empty cell)."""
    columns = [f"{snake(c)}_{snake(level)}" for c in conditions for level in RSNA_LEVELS]
    labels: dict[str, list[int]] = {}
    for line, row in _rows(path, {"study_id", *columns}):
        values = []
        for column in columns:
            cell = row[column]
            if cell == "":
                values.append(-1)
            elif cell.lower() in RSNA_SEVERITY_CLASSES:
                values.append(RSNA_SEVERITY_CLASSES[cell.lower()])
            else:
                raise BundleInputError(
                    f"{path}, row {line}: unknown severity {cell!r} in column {column}; "
                    f"expected {', '.join(SEVERITIES)} or empty"
                )
        labels[row["study_id"]] = values
    return labels


def _read_points(path: Path, conditions: tuple[str, ...] = (_SPINAL,)) -> dict[str, list[dict]]:
    """study_id -> points of ``conditions`` (display names); every row's condition, level and numbers are checked."""
    points: dict[str, list[dict]] = {}
    required = {"study_id", "series_id", "instance_number", "condition", "level", "x", "y"}
    for line, row in _rows(path, required):
        where = f"{path}, row {line}"
        condition = _norm_condition(row["condition"], where)
        level = _norm_level(row["level"], where)
        try:
            x, y = float(row["x"]), float(row["y"])
            instance = int(row["instance_number"])
        except ValueError as err:
            raise BundleInputError(f"{where}: non-numeric instance_number/x/y ({err})") from err
        if not (math.isfinite(x) and math.isfinite(y)):
            raise BundleInputError(f"{where}: coordinates must be finite, got x={row['x']}, y={row['y']}")
        if condition in conditions:
            point = {"series_id": row["series_id"], "instance": instance, "level": level, "x": x, "y": y}
            if conditions != (_SPINAL,):
                point["condition"] = condition
            point["where"] = where
            points.setdefault(row["study_id"], []).append(point)
    return points


def read_rsna_series(path: str | os.PathLike) -> dict[str, list[tuple[str, str]]]:
    """``{study_id: [(series_id, series_description)]}`` of a ``*_series_descriptions.csv``, in file order."""
    return _read_series(Path(path))


def _sagittal_t2(series: list[tuple[str, str]]) -> list[str]:
    return [sid for sid, desc in series if desc.lower() == RSNA_SAGITTAL_T2.lower()]


def build_rsna_datalist(
    root: str | os.PathLike, *, image_dir: str | None = None, split: str = "train", keep_unusable: bool = False
) -> list[dict]:
    """Datalist items (see the project's datalist format) for an RSNA 2024 data folder.

    Args:
        root: folder holding ``train.csv``, ``train_label_coordinates.csv``, ``{split}_series_descriptions.csv``.
        image_dir: image folder under ``root``; default ``"{split}_images"`` (``train_images``).
        split: ``"train"`` (items with keypoints) or ``"test"`` (items without keypoints).

    Returns:
        items ``{"image": series folder (absolute), "study_id", "series_id", "keypoints": {"disc":
        {"mm": [[x, y, z] | None] * 5, "label": [0|1|2|-1] * 5}}}`` in train.csv / CSV order; test items
        have no "keypoints". Studies without a Sagittal T2/STIR series are skipped with a warning; with
        ``keep_unusable`` (evaluation), they and studies whose points or series cannot be read become skipped
        items (:func:`bundle.skipping.skipped_item`: reason, labels, no located points) for the batch run.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root).resolve()
    images = root / (image_dir or f"{split}_images")
    series_csv = root / f"{split}_series_descriptions.csv"
    series = _read_series(series_csv)
    if split == "test":
        items = []
        for study, study_series in series.items():
            candidates = _sagittal_t2(study_series)
            if not candidates:
                logger.warning("study %s: no %s series in %s, skipped", study, RSNA_SAGITTAL_T2, series_csv)
                continue
            folder = images / study / candidates[0]
            if not folder.is_dir():
                raise BundleInputError(f"{series_csv}: series folder {folder} not found (study {study})")
            items.append({"image": str(folder), "study_id": study, "series_id": candidates[0]})
        return items

    labels_csv, points_csv = root / "train.csv", root / "train_label_coordinates.csv"
    labels = _read_labels(labels_csv)
    points = _read_points(points_csv)
    headers: dict[Path, SliceHeader] = {}
    items = []
    for study, study_labels in labels.items():
        candidates = _sagittal_t2(series.get(study, []))
        try:
            if not candidates:
                raise BundleInputError(f"no {RSNA_SAGITTAL_T2} series in {series_csv}")
            items.append(_labelled_item(study, study_labels, candidates, points.get(study, []), images, headers))
        except BundleInputError as err:
            if not keep_unusable and candidates:
                raise
            if keep_unusable:  # the batch run reports it (bundle.skipping)
                unlocated = {RSNA_STREAMS[0].name: {"mm": [None] * len(RSNA_LEVELS), "label": list(study_labels)}}
                items.append(skipped_item(study, str(err), keypoints=unlocated))
            else:
                logger.warning("study %s: %s, skipped", study, err)
    return items


def instance_point_mm(path: Path, x: float, y: float, where: str, headers: dict[Path, SliceHeader]) -> list[float]:
    """Patient mm ``[x, y, z]`` of pixel (x = column, y = row) of the instance file ``path`` (headers cached in
    ``headers``). Raises BundleInputError naming ``where`` (the CSV row) when the file is missing or the point
    lies outside the instance."""
    if path not in headers:
        if not path.is_file():
            present = sorted(p.name for p in path.parent.glob("*.dcm")) if path.parent.is_dir() else []
            raise BundleInputError(
                f"{where}: referenced instance file {path} not found"
                + (f" (its series holds {len(present)} other instances: a missing slice)" if present else "")
                + "; the point cannot be placed without that instance's geometry"
            )
        headers[path] = slice_header(read_header(path), path)
    header = headers[path]
    if not (0 <= x < header.cols and 0 <= y < header.rows):
        raise BundleInputError(
            f"{where}: point (x={x}, y={y}) lies outside the referenced instance {path} "
            f"of {header.cols} columns x {header.rows} rows"
        )
    return [float(v) for v in pixel_to_patient(header, x, y)]


def _labelled_item(
    study: str,
    study_labels: list[int],
    candidates: list[str],
    study_points: list[dict],
    images: Path,
    headers: dict[Path, SliceHeader],
) -> dict:
    """The item of one labelled study: its Sagittal T2/STIR series and spinal canal points in patient mm."""
    counts = {sid: sum(p["series_id"] == sid for p in study_points) for sid in candidates}
    chosen = max(candidates, key=lambda sid: counts[sid])  # first one on ties (max keeps the first)
    folder = images / study / chosen
    if not folder.is_dir():
        raise BundleInputError(f"series folder {folder} not found (study {study})")
    mm: list[list[float] | None] = [None] * len(RSNA_LEVELS)
    for level_index, level in enumerate(RSNA_LEVELS):
        rows = [p for p in study_points if p["level"] == level]
        rows.sort(key=lambda p: p["series_id"] != chosen)  # points on the chosen series first
        if not rows:
            continue
        if len(rows) > 1:
            logger.debug("study %s level %s: %d spinal points, using %s", study, level, len(rows), rows[0]["where"])
        p = rows[0]
        path = images / study / p["series_id"] / f"{p['instance']}.dcm"
        mm[level_index] = instance_point_mm(path, p["x"], p["y"], p["where"], headers)
    return {
        "image": str(folder),
        "study_id": study,
        "series_id": chosen,
        "keypoints": {RSNA_STREAMS[0].name: {"mm": mm, "label": list(study_labels)}},
    }


def read_rsna_condition_labels(root: str | os.PathLike) -> dict[str, dict[str, dict[str, dict]]]:
    """Every condition's labels per study from ``train.csv``, ``train_label_coordinates.csv`` and the series list.

    Returns ``{study_id: {condition key ("left_subarticular_stenosis", ...): {level ("L1/L2", ...): {"severity":
    class index or -1 (empty cell), "series_id": str | None, "instance_number": int | None, "x", "y": float
    pixels of that instance | None, "description": the series' description | None}}}}`` for all 25 cells of
    every train.csv study, in file order. Points are taken as written (the first row of a repeated
    (study, condition, level) wins). Raises BundleInputError naming the file and row for a bad cell or row,
    a point of a study missing from train.csv, or a point on a series the series list does not give the study.
    """
    root = Path(root).resolve()
    series_csv, labels_csv, points_csv = (
        root / "train_series_descriptions.csv",
        root / "train.csv",
        root / "train_label_coordinates.csv",
    )
    descriptions = {study: dict(pairs) for study, pairs in _read_series(series_csv).items()}
    labels = _read_labels(labels_csv, tuple(RSNA_CONDITIONS))
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for study, cells in labels.items():
        grid = iter(cells)
        out[study] = {
            key: {lv: {"severity": next(grid), **dict.fromkeys(_POINT_FIELDS)} for lv in RSNA_LEVELS}
            for key in CONDITION_KEYS
        }
    for study, study_points in _read_points(points_csv, tuple(RSNA_CONDITIONS)).items():
        if study not in out:
            raise BundleInputError(f"{study_points[0]['where']}: study {study} is not in {labels_csv}")
        for p in study_points:
            desc = descriptions.get(study, {}).get(p["series_id"])
            if desc is None:
                raise BundleInputError(
                    f"{p['where']}: series {p['series_id']} is not listed for study {study} in {series_csv}"
                )
            cell = out[study][snake(p["condition"])][p["level"]]
            if cell["series_id"] is None:
                cell.update(series_id=p["series_id"], instance_number=p["instance"], x=p["x"], y=p["y"])
                cell["description"] = desc
    return out


_POINT_FIELDS = ("series_id", "instance_number", "x", "y", "description")
