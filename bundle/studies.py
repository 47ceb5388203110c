"""Find the studies of an inference folder and pick each one's sagittal T2 series (no labels needed).

Accepted layouts: RSNA (``test_images/`` or ``train_images/`` with ``{study}/{series}/*.dcm`` and the
series-descriptions CSV beside it), Tianchi (study folders mixing several series) and a single series
or study folder holding DICOM files directly.

:func:`find_full_studies` adds, for the RSNA layout, each study's Sagittal T1 and Axial T2 series (the
study-level inference of ``configs/inference_study.json``).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from bundle.errors import BundleInputError
from bundle.io import read_header, select_sagittal_t2
from bundle.io.axial import RSNA_AXIAL_T2
from bundle.io.dicom_series import list_dicom_files
from bundle.io.sagittal_t1 import RSNA_SAGITTAL_T1
from bundle.io.series_selection import group_series, read_series_descriptions
from bundle.skipping import SKIPPED_KEY, skipped_item

__all__ = ["find_studies", "find_full_studies", "STUDY_SERIES_KEY", "SERIES_TYPES"]

logger = logging.getLogger(__name__)

RSNA_IMAGE_DIRS = ("test_images", "train_images")


def _is_dicom(path: Path) -> bool:
    """A ``.dcm`` file, or any file with the DICOM preamble (``DICM`` at byte 128)."""
    if path.name.startswith(".") or not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _has_dicom(folder: Path) -> bool:
    return any(_is_dicom(p) for p in folder.iterdir())


def _dicom_dirs(root: Path) -> list[Path]:
    return sorted(Path(d) for d, _, files in os.walk(root) if any(_is_dicom(Path(d) / f) for f in files))


def _study_uid(folder: Path) -> str | None:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            try:
                return str(read_header(path, ["StudyInstanceUID"]).get("StudyInstanceUID", "")) or None
            except BundleInputError:
                continue
    return None


def _item(study_id: str, files: list[Path], series_id: str | None) -> dict[str, Any]:
    if series_id is None:
        parent = files[0].parent
        same_folder = all(f.parent == parent for f in files)
        series_id = parent.name if same_folder and len(list(parent.iterdir())) == len(files) else None
    if series_id is None:
        series_id = str(read_header(files[0], ["SeriesInstanceUID"]).get("SeriesInstanceUID", ""))
    return {"image": [str(f) for f in files], "study_id": str(study_id), "series_id": str(series_id)}


def _study_item(study_id: str, folder: Path, descriptions: Any, on_error: str, rsna: bool) -> dict[str, Any]:
    """The item of one study folder; with ``on_error="skip"`` a study that cannot be used becomes a skipped item."""
    try:
        files = select_sagittal_t2(folder, descriptions)
        series_id = files[0].parent.name if rsna and files[0].parent.parent == folder else None
        return _item(study_id, files, series_id)
    except BundleInputError as err:
        if on_error != "skip":
            raise
        return skipped_item(study_id, str(err))


def _rsna_studies(root: Path, image_dir: Path, on_error: str) -> list[dict[str, Any]]:
    prefix = image_dir.name.split("_")[0]
    csv_path = root / f"{prefix}_series_descriptions.csv"
    descriptions = read_series_descriptions(csv_path) if csv_path.is_file() else None
    studies = sorted(p for p in image_dir.iterdir() if p.is_dir())
    return [_study_item(study.name, study, descriptions, on_error, rsna=True) for study in studies]


def find_studies(dataset_dir: str | os.PathLike, on_error: str = "raise") -> list[dict[str, Any]]:
    """Inference items ``{"image": [files of the sagittal T2 series], "study_id", "series_id"}``, one per study.

    ``on_error="skip"``: a study without a usable sagittal series becomes a skipped item
    (:func:`bundle.skipping.skipped_item`, with the reason) instead of stopping the search.

    Raises:
        BundleInputError: the folder is missing or holds no DICOM file; with ``on_error="raise"``, also when a
            study has no sagittal series.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    root = Path(dataset_dir)
    if not root.is_dir():
        raise BundleInputError(f"dataset_dir {root} is not an existing folder")
    for name in RSNA_IMAGE_DIRS:
        if (root / name).is_dir():
            return _rsna_studies(root, root / name, on_error)
    if _has_dicom(root):
        return [_item(root.name, select_sagittal_t2(root), None)]
    folders = _dicom_dirs(root)
    if not folders:
        raise BundleInputError(f"dataset_dir {root} holds no DICOM files")
    by_parent: dict[Path, list[Path]] = defaultdict(list)
    for folder in folders:
        by_parent[folder.parent].append(folder)
    studies: list[tuple[str, Path]] = []
    for parent, children in sorted(by_parent.items()):
        uids = {_study_uid(child) for child in children}
        if parent != root and len(children) > 1 and len(uids) == 1 and None not in uids:
            studies.append((parent.name, parent))  # series sub-folders of one study
        else:
            studies.extend((child.name, child) for child in children)
    items = [_study_item(study_id, folder, None, on_error, rsna=False) for study_id, folder in studies]
    logger.info(f"found {len(items)} studies in {root}")
    return items


#: item key of :func:`find_full_studies` holding the study's other series (kept out of the batch collation)
STUDY_SERIES_KEY = "study_series"
#: the series types of a full study, one model each
SERIES_TYPES = ("sagittal_t2", "sagittal_t1", "axial_t2")


def _kind_from_headers(folder: Path) -> str | None:
    """'sagittal_t1', 'axial_t2' or None for a series folder without a description: plane from the slice
    normal, weighting from the header's SeriesDescription (:func:`bundle.io.series_selection.weighting`)."""
    try:
        series = list(group_series(list_dicom_files(folder)).values())
    except BundleInputError as err:
        logger.warning("series folder %s not classified: %s", folder, err)
        return None
    if len(series) != 1:
        return None
    info = series[0]
    if info.plane == "sagittal" and info.weighting == "t1":
        return "sagittal_t1"
    if info.plane == "axial" and info.weighting == "t2":
        return "axial_t2"
    return None


def _kind(folder: Path, descriptions: dict[str, str] | None) -> str | None:
    """The series type of one RSNA series folder: from the descriptions CSV when it lists it, else headers."""
    description = (descriptions or {}).get(folder.name)
    if description is None:
        return _kind_from_headers(folder)
    text = description.strip().lower()
    return {RSNA_SAGITTAL_T1.lower(): "sagittal_t1", RSNA_AXIAL_T2.lower(): "axial_t2"}.get(text)


def _other_series(study_dir: Path, descriptions: dict[str, str] | None, where: str) -> dict[str, Any]:
    """``{sagittal_t1, sagittal_t1_id, axial_t2, axial_t2_ids, missing}`` of one study folder.

    Two or more Sagittal T1 series: the one with the most files (the widest left-right coverage, so both
    foramen slabs lie inside it), the first in folder-name order on ties; the choice is logged.
    """
    folders = sorted(p for p in study_dir.iterdir() if p.is_dir()) if study_dir.is_dir() else []
    kinds = {folder: _kind(folder, descriptions) for folder in folders}
    t1 = [f for f, k in kinds.items() if k == "sagittal_t1"]
    axial = [f for f, k in kinds.items() if k == "axial_t2"]
    missing: dict[str, str] = {}
    chosen = max(t1, key=lambda f: len(list(f.iterdir()))) if t1 else None  # max keeps the first on ties
    if len(t1) > 1:
        logger.info("study %s: %d Sagittal T1 series, using %s (most slices)", study_dir.name, len(t1), chosen.name)
    if chosen is None:
        missing["sagittal_t1"] = f"no {RSNA_SAGITTAL_T1} series in {where}"
    if not axial:
        missing["axial_t2"] = f"no {RSNA_AXIAL_T2} series in {where}"
    return {
        "sagittal_t1": str(chosen) if chosen else "",
        "sagittal_t1_id": chosen.name if chosen else "",
        "axial_t2": [str(f) for f in axial],
        "axial_t2_ids": [f.name for f in axial],
        "missing": missing,
    }


def find_full_studies(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Study-level inference items of an RSNA-layout folder, one per study, never raising for one study.

    Each item is :func:`find_studies`'s (``image``: the sagittal T2 files, ``study_id``, ``series_id``; a study
    without a usable sagittal T2 is a skipped item with its reason) plus ``item[STUDY_SERIES_KEY]`` =
    ``{"sagittal_t1": folder | "", "sagittal_t1_id", "axial_t2": [folders], "axial_t2_ids": [...],
    "sagittal_t2_files", "sagittal_t2_id", "missing": {series type: reason}}``. Series types come from
    ``*_series_descriptions.csv`` ("Sagittal T1", "Axial T2") or, for a series folder it does not list (or without
    the CSV), from the headers: plane from the slice normal, T1/T2 from the description. Rule for two Sagittal
    T1 series: see :func:`_other_series`.

    Raises:
        BundleInputError: ``dataset_dir`` is not an RSNA-layout folder (no ``train_images``/``test_images``).
    """
    root = Path(dataset_dir)
    image_dir = next((root / n for n in RSNA_IMAGE_DIRS if (root / n).is_dir()), None)
    if image_dir is None:
        raise BundleInputError(f"{root}: no {' or '.join(RSNA_IMAGE_DIRS)} folder (the RSNA layout) for a full study")
    csv_path = root / f"{image_dir.name.split('_')[0]}_series_descriptions.csv"
    descriptions = read_series_descriptions(csv_path) if csv_path.is_file() else None
    where = csv_path.name if descriptions is not None else "the series headers"
    items = []
    for item in find_studies(root, on_error="skip"):
        other = _other_series(image_dir / item["study_id"], descriptions, where)
        if item.get(SKIPPED_KEY):
            other["missing"] = {"sagittal_t2": str(item[SKIPPED_KEY]), **other["missing"]}
        other["sagittal_t2_files"] = [] if item.get(SKIPPED_KEY) else list(item["image"])
        other["sagittal_t2_id"] = str(item.get("series_id", ""))
        items.append({**item, STUDY_SERIES_KEY: other})
    return items
