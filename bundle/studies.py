"""Find the studies of an inference folder and pick each one's sagittal T2 series (no labels needed).

Accepted layouts: RSNA (``test_images/`` or ``train_images/`` with ``{study}/{series}/*.dcm`` and the
series-descriptions CSV beside it), Tianchi (study folders mixing several series) and a single series
or study folder holding DICOM files directly.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from bundle.errors import BundleInputError
from bundle.io import read_header, select_sagittal_t2
from bundle.io.series_selection import read_series_descriptions
from bundle.skipping import skipped_item

__all__ = ["find_studies"]

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
