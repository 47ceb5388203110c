"""Choose the sagittal T2 series of a study when no labels say which one it is.

Rules (data-formats.md): group files by SeriesInstanceUID (headers only); the plane comes from the
slice normal (|n . x| > 0.75 = sagittal); T1/T2 from the series description (T2 and STIR recognised,
T1 excluded); among sagittal T2 candidates the brightest one (mean of its middle slice) wins, which
drops fat-suppressed series. A series described "Sagittal T2/STIR" in an RSNA-style
series_descriptions CSV wins over the headers.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bundle.csvrows import read_csv_rows
from bundle.errors import BundleInputError
from bundle.io.dicom_series import SliceHeader, SortedSeries, list_dicom_files, plane_name, slice_header, sort_series
from bundle.io.pixels import read_dicom_pixels, read_header

__all__ = [
    "SeriesInfo",
    "weighting",
    "find_dicom_files",
    "group_series",
    "read_series_descriptions",
    "select_sagittal_t2",
    "RSNA_SAGITTAL_T2",
]

logger = logging.getLogger(__name__)
RSNA_SAGITTAL_T2 = "Sagittal T2/STIR"


def weighting(description: str) -> str:
    """'t2' (T2 or STIR, no T1), 't1' (T1, no T2/STIR) or 'unknown' from a series description.

    Example:
        >>> [weighting(d) for d in ("Sagittal T2/STIR", "SAG T1 FSE", "t2_tse_fs_sag", "LOCALIZER")]
        ['t2', 't1', 't2', 'unknown']
    """
    text = description.upper()
    t2 = bool(re.search(r"T2|STIR", text))
    t1 = "T1" in text
    if t2 and not t1:
        return "t2"
    if t1 and not t2:
        return "t1"
    return "unknown"


@dataclass
class SeriesInfo:
    """One series of a study, from headers only; ``sorted`` is None when its slices fail the checks."""

    uid: str
    headers: list[SliceHeader]
    description: str
    sorted: SortedSeries | None = None
    problem: str = ""

    @property
    def plane(self) -> str:
        return plane_name(self.headers[0].normal)

    @property
    def weighting(self) -> str:
        return weighting(self.description)

    @property
    def files(self) -> list[Path]:
        series = self.sorted.slices if self.sorted is not None else self.headers
        return [h.path for h in series]

    def brightness(self) -> float:
        """Mean modality value of the spatially middle slice."""
        if self.sorted is None:
            raise ValueError(f"series {self.uid} has no valid sorted slices: {self.problem}")
        return float(np.mean(read_dicom_pixels(self.sorted.slices[self.sorted.middle].path)))

    def summary(self) -> str:
        text = f"series {self.uid} ('{self.description}', {self.plane}, {len(self.headers)} files)"
        return text + (f" [{self.problem}]" if self.problem else "")


def find_dicom_files(files_or_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """All files under a study folder (recursive; ``*.dcm`` if any) or the given list."""
    if isinstance(files_or_dir, (str, os.PathLike)) and not Path(files_or_dir).is_dir():
        raise BundleInputError(f"{files_or_dir}: study folder not found")
    return list_dicom_files(files_or_dir, recursive=True, what="study")


def read_series_descriptions(csv_path: str | os.PathLike) -> dict[str, str]:
    """``{series_id: series_description}`` from an RSNA ``*_series_descriptions.csv``."""
    rows = read_csv_rows(csv_path, ["series_id", "series_description"], what="series descriptions CSV")
    return {row["series_id"]: row["series_description"] for _, row in rows}


def group_series(files: Sequence[Path], descriptions: Mapping[str, str] | None = None) -> dict[str, SeriesInfo]:
    """Group image files by SeriesInstanceUID (headers only); files without geometry are skipped.

    ``descriptions`` maps a SeriesInstanceUID or a series folder name (RSNA ``series_id``) to a
    description that replaces the header's SeriesDescription.
    """
    groups: dict[str, list[SliceHeader]] = {}
    for path in files:
        try:
            ds = read_header(path)
            if "PixelData" not in ds and "Rows" not in ds:
                continue  # not an image (DICOMDIR, SR, ...)
            header = slice_header(ds, path)
        except BundleInputError as err:
            logger.warning("skipping %s: %s", path, err)
            continue
        groups.setdefault(header.series_uid, []).append(header)
    out: dict[str, SeriesInfo] = {}
    for uid, headers in groups.items():
        description = headers[0].description
        if descriptions:
            for key in (uid, headers[0].path.parent.name):
                if key in descriptions:
                    description = descriptions[key]
                    break
        info = SeriesInfo(uid=uid, headers=headers, description=description)
        try:
            info.sorted = sort_series(headers, require_sagittal=False)
        except BundleInputError as err:
            info.problem = str(err)
        out[uid] = info
    return out


def _brightest(candidates: list[SeriesInfo]) -> SeriesInfo:
    if len(candidates) == 1:
        return candidates[0]
    scored = []
    for info in candidates:
        try:
            scored.append((info.brightness(), info))
        except BundleInputError as err:
            logger.warning("cannot score %s: %s", info.summary(), err)
    if not scored:
        return candidates[0]
    return max(scored, key=lambda s: s[0])[1]


def select_sagittal_t2(
    files_or_dir: str | os.PathLike | Sequence[str | os.PathLike],
    series_descriptions: str | os.PathLike | Mapping[str, str] | None = None,
) -> list[Path]:
    """Files (spatially sorted) of the study's sagittal T2 series.

    Args:
        files_or_dir: a study folder (searched recursively) or a list of DICOM files of one study.
        series_descriptions: an RSNA series_descriptions CSV or a mapping series id -> description;
            a series described "Sagittal T2/STIR" there wins.

    Falls back to sagittal series of unknown weighting (with a warning) when no description names
    T2/STIR. Raises BundleInputError when no usable sagittal series exists, listing what was found.
    """
    where = os.fspath(files_or_dir) if isinstance(files_or_dir, (str, os.PathLike)) else "the given files"
    files = find_dicom_files(files_or_dir)
    if series_descriptions is not None and not isinstance(series_descriptions, Mapping):
        series_descriptions = read_series_descriptions(series_descriptions)
    series = group_series(files, series_descriptions)
    usable = [s for s in series.values() if s.sorted is not None]
    sagittal = [s for s in usable if s.plane == "sagittal"]
    labelled = [s for s in sagittal if s.description.strip().lower() == RSNA_SAGITTAL_T2.lower()]
    t2 = [s for s in sagittal if s.weighting == "t2"]
    unknown = [s for s in sagittal if s.weighting == "unknown"]
    for candidates in (labelled, t2):
        if candidates:
            return _brightest(candidates).files
    if unknown:
        chosen = _brightest(unknown)
        logger.warning("%s: no sagittal T2/STIR description; using %s", where, chosen.summary())
        return chosen.files
    found = "; ".join(s.summary() for s in series.values()) or "no DICOM images with geometry"
    raise BundleInputError(f"{where}: no sagittal T2 series found (T1 series are excluded). Found: {found}")
