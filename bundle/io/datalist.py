"""Cross-validation folds by study and datalist JSON files."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from bundle.atomic import atomic_write_text
from bundle.errors import BundleInputError
from bundle.io.dicom_series import list_dicom_files, read_slice_headers, sort_series
from bundle.streams import StreamSpec, parse_streams

logger = logging.getLogger(__name__)

__all__ = [
    "check_series",
    "study_stratum",
    "split_folds",
    "streams_to_json",
    "absolute_images",
    "write_datalist",
    "read_datalist",
]


def check_series(items: Sequence[Mapping]) -> tuple[list[Mapping], list[tuple[Mapping, str]]]:
    """Split items into those whose series passes the loader's header checks and those that fail.

    Reads headers only (one series, geometry tags, equal shapes, sagittal plane), the checks that
    :func:`bundle.io.load_sagittal_series` makes before decoding pixels. Failures are logged.

    Returns:
        (kept items, [(dropped item, reason)]).
    """
    kept, dropped = [], []
    for item in items:
        try:
            sort_series(read_slice_headers(list_dicom_files(item["image"])))
            kept.append(item)
        except BundleInputError as err:
            logger.warning("study %s series %s dropped: %s", item.get("study_id"), item.get("series_id"), err)
            dropped.append((item, str(err)))
    return kept, dropped


def study_stratum(items: Sequence[Mapping]) -> int:
    """Worst (largest) class over all points of a study's items; -1 when none is labelled."""
    labels = [
        int(lb) for item in items for stream in (item.get("keypoints") or {}).values() for lb in stream.get("label", [])
    ]
    return max(labels, default=-1)


def split_folds(
    items: Sequence[Mapping], folds: int = 5, fold: int = 0, seed: int = 0
) -> tuple[list[Mapping], list[Mapping]]:
    """Deterministic k-fold split by study, stratified by each study's worst class.

    Studies are grouped by :func:`study_stratum`; within each stratum (in sorted study-id order) they
    are shuffled with ``random.Random(seed)`` and dealt to folds round robin, continuing the deal
    across strata so fold sizes differ by at most one study. Items keep their input order.

    Returns:
        (training, validation): validation holds the studies of fold ``fold``.

    Example:
        >>> items = [{"study_id": str(i), "keypoints": {"disc": {"label": [i % 2]}}} for i in range(10)]
        >>> train, val = split_folds(items, folds=5, fold=0)
        >>> len(train), len(val)
        (8, 2)
    """
    if int(folds) < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if not 0 <= int(fold) < int(folds):
        raise ValueError(f"fold must be in [0, {folds - 1}], got {fold}")
    by_study: dict[str, list[Mapping]] = {}
    for item in items:
        if "study_id" not in item:
            raise ValueError(f"datalist item without study_id: {dict(item)}")
        by_study.setdefault(str(item["study_id"]), []).append(item)
    strata: dict[int, list[str]] = {}
    for study, study_items in by_study.items():
        strata.setdefault(study_stratum(study_items), []).append(study)
    rng = random.Random(seed)
    assignment: dict[str, int] = {}
    dealt = 0
    for key in sorted(strata):
        studies = sorted(strata[key])
        rng.shuffle(studies)
        for study in studies:
            assignment[study] = dealt % int(folds)
            dealt += 1
    training = [it for it in items if assignment[str(it["study_id"])] != fold]
    validation = [it for it in items if assignment[str(it["study_id"])] == fold]
    return training, validation


def streams_to_json(streams: Mapping[str, Mapping] | Sequence[StreamSpec]) -> dict[str, dict[str, list[str]]]:
    """``{name: {"levels": [...], "classes": [...]}}`` for the datalist file."""
    return {s.name: {"levels": list(s.levels), "classes": list(s.classes)} for s in parse_streams(streams)}


def absolute_images(item: Mapping) -> dict:
    """A copy of ``item`` whose "image" (folder or list of files) holds absolute paths."""
    out = dict(item)
    image = item["image"]
    if isinstance(image, (str, os.PathLike)):
        out["image"] = os.path.abspath(os.fspath(image))
    else:
        out["image"] = [os.path.abspath(os.fspath(p)) for p in image]
    return out


def write_datalist(
    path: str | os.PathLike,
    training: Sequence[Mapping],
    validation: Sequence[Mapping],
    *,
    format: str,
    streams: Mapping[str, Mapping] | Sequence[StreamSpec],
    overwrite: bool = False,
) -> Path:
    """Write ``{"training", "validation", "format", "streams"}`` atomically (temp file + ``os.replace``).

    Raises FileExistsError when ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    content = {
        "training": [absolute_images(it) for it in training],
        "validation": [absolute_images(it) for it in validation],
        "format": format,
        "streams": streams_to_json(streams),
    }
    atomic_write_text(path, json.dumps(content, indent=1) + "\n")
    return path


def read_datalist(path: str | os.PathLike) -> dict:
    """Load a datalist file written by :func:`write_datalist` (checks its top-level keys)."""
    path = Path(path)
    content = json.loads(path.read_text())
    missing = {"training", "validation", "format", "streams"} - set(content)
    if missing:
        raise ValueError(f"{path}: datalist misses key(s) {sorted(missing)}")
    return content
