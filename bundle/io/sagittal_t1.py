"""Sagittal T1 input of the neural foraminal narrowing model: one slab of slices around each side's foramina.

Slab selection is done in patient mm (LPS: +x = patient left). The canal's left-right position is the mean
of the study's sagittal T2 spinal canal points (patient mm) when given, else the middle slice's centre.
Each side's foramina lie ``foramen_offset_mm`` lateral of it: ``x_left = x_canal + offset``,
``x_right = x_canal - offset`` (same y, z). The ``num_slices`` slices whose planes are nearest that point
(distance along the series normal, mm: right for oblique series too) form the side's slab, ordered by
ascending patient x.

Default offset, 14 mm: the phantoms place the foramen centre ``canal_half_width + 4 * scale`` = 12-18 mm
(13-14 mm typical) from the midline; in real lumbar spines the foramen lies just lateral to the pedicle's
medial wall, about 15-20 mm from the midline (interpedicular distance 20-30 mm). A 3-slice slab at the usual
3.5-5 mm T1 spacing covers +/- 4-6 mm around it, so the default suits both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
from bundle.codec import mm_to_pixels_np
from bundle.errors import BundleInputError
from bundle.io.dicom_series import (
    SliceHeader,
    SortedSeries,
    list_dicom_files,
    pixel_to_patient,
    read_slice_headers,
    sort_series,
)
from bundle.io.rsna import instance_point_mm, read_rsna_condition_labels, read_rsna_series
from bundle.io.slices import SliceLoaderd, slices_tensor
from bundle.rsna_labels import CONDITIONS, LEVELS, SPINAL
from bundle.skipping import skipped_item
from bundle.streams import RSNA_T1_STREAMS
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialCrop

__all__ = [
    "DEFAULT_FORAMEN_OFFSET_MM",
    "RSNA_SAGITTAL_T1",
    "SIDES",
    "canal_centre_mm",
    "foramen_slab_indices",
    "load_foramen_slabs",
    "LoadForamenSlabsd",
    "CropAroundCentred",
    "build_rsna_t1_datalist",
]

logger = logging.getLogger(__name__)

DEFAULT_FORAMEN_OFFSET_MM = 14.0
RSNA_SAGITTAL_T1 = "Sagittal T1"
SIDES = ("left", "right")  # channel order of the slabs; LPS sign of the lateral offset: +1, -1
_SIDE_SIGN = {"left": 1.0, "right": -1.0}
#: condition key per stream (RSNA_T1_STREAMS order)
_STREAM_CONDITIONS = dict(zip((s.name for s in RSNA_T1_STREAMS), CONDITIONS[1:3]))


def canal_centre_mm(series: SortedSeries, canal_mm: Sequence[Sequence[float] | None] | None = None) -> np.ndarray:
    """Patient-mm point (3,) of the spinal canal: mean of the given canal points, else the middle slice's centre."""
    points = [[float(v) for v in p] for p in (canal_mm or []) if p is not None]
    if points:
        return np.mean(np.asarray(points, dtype=np.float64), axis=0)
    middle = series.slices[series.middle]
    return pixel_to_patient(middle, 0.5 * (middle.cols - 1), 0.5 * (middle.rows - 1))


def foramen_slab_indices(
    series: SortedSeries, side: str, num_slices: int, foramen_offset_mm: float, canal_centre: np.ndarray
) -> list[int]:
    """Indices into ``series.slices`` of the ``num_slices`` slices nearest ``side``'s foramen position.

    The target is ``canal_centre`` moved ``foramen_offset_mm`` along patient x (+ for left, LPS); the distance of
    a slice is that of its plane to the target along the series normal. Ties go to the lower index; fewer slices
    than ``num_slices`` repeat the nearest. Returned in ascending patient x.
    """
    if side not in _SIDE_SIGN:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    target = np.asarray(canal_centre, dtype=np.float64).copy()
    target[0] += _SIDE_SIGN[side] * float(foramen_offset_mm)
    distance = np.abs(series.offsets - float(np.dot(target, series.normal)))
    order = [int(i) for i in np.argsort(distance, kind="stable")]
    picked = order[: int(num_slices)]
    picked += [order[0]] * (int(num_slices) - len(picked))
    return sorted(picked, key=lambda i: (float(series.slices[i].position[0]), i))


def load_foramen_slabs(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    num_slices: int = 3,
    foramen_offset_mm: float = DEFAULT_FORAMEN_OFFSET_MM,
    canal_mm: Sequence[Sequence[float] | None] | None = None,
    *,
    study_id: str | None = None,
    series_id: str | None = None,
) -> MetaTensor:
    """Read a Sagittal T1 series and return its left and right foramen slabs.

    Returns:
        float32 MetaTensor (2 * num_slices, rows, cols): the left slab's channels, then the right's, with the
        4x4 LPS ``affine`` of the series' middle slice (:func:`series_affine`, as the spinal loader gives), so
        patient-mm foramen points project onto the image plane. Meta: ``instance_numbers`` per channel,
        ``slab_sides``, ``canal_x_mm``, ``foramen_x_mm`` {side: mm}, ``canal_centre_mm`` (the mean of the given
        canal points, [x, y, z] mm) and ``study_id``/``series_id`` when given.
    """
    if int(num_slices) < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    files = list_dicom_files(source)
    series = sort_series(read_slice_headers(files))
    centre = canal_centre_mm(series, canal_mm)
    located = any(p is not None for p in (canal_mm or []))
    x0 = float(centre[0])
    picked = [i for side in SIDES for i in foramen_slab_indices(series, side, num_slices, foramen_offset_mm, centre)]
    return slices_tensor(
        [series.slices[i] for i in picked],
        series.slices[series.middle],
        series.slice_spacing,
        source if isinstance(source, (str, os.PathLike)) else files[0],
        slab_sides=[side for side in SIDES for _ in range(int(num_slices))],
        canal_x_mm=x0,
        foramen_x_mm={side: x0 + _SIDE_SIGN[side] * float(foramen_offset_mm) for side in SIDES},
        series_num_slices=len(series.slices),
        canal_centre_mm=[float(v) for v in centre] if located else None,
        study_id=None if study_id is None else str(study_id),
        series_id=None if series_id is None else str(series_id),
    )


class LoadForamenSlabsd(SliceLoaderd):
    """Dictionary wrapper of :func:`load_foramen_slabs`: ``data[key]`` (T1 series folder) -> MetaTensor
    (2 * num_slices channels: one slab per side).

    ``data[canal_key]`` (five ``[x, y, z]`` mm points or None, or absent) locates the canal; it is removed from
    the item (a list with None entries would not collate). ``study_id``/``series_id`` go into the metadata.
    """

    slabs = len(SIDES)

    def __init__(
        self,
        keys: KeysCollection = "image",
        num_slices: int = 3,
        foramen_offset_mm: float = DEFAULT_FORAMEN_OFFSET_MM,
        canal_key: str = "canal_mm",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, num_slices, allow_missing_keys)
        self.foramen_offset_mm = float(foramen_offset_mm)
        self.canal_key = canal_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        canal = d.pop(self.canal_key, None)
        study_id, series_id = d.get("study_id"), d.get("series_id")
        for key in self.key_iterator(d):
            d[key] = load_foramen_slabs(
                d[key],  # type: ignore[arg-type]
                self.num_slices,
                self.foramen_offset_mm,
                canal,  # type: ignore[arg-type]
                study_id=None if study_id is None else str(study_id),
                series_id=None if series_id is None else str(series_id),
            )
        return d


def _cell_mm(images: Path, study: str, cell: Mapping, what: str, headers: dict[Path, SliceHeader]) -> list[float]:
    """Patient mm [x, y, z] of one labelled point (pixels of its instance); ``what`` names the CSV row."""
    path = images / study / str(cell["series_id"]) / f"{cell['instance_number']}.dcm"
    return instance_point_mm(path, cell["x"], cell["y"], what, headers)


def _t1_item(
    study: str, cells: Mapping, t1: list[str], images: Path, where: str, headers: dict[Path, SliceHeader]
) -> dict:
    """One study's item: the T1 series carrying most foraminal points, canal and foramen points in mm."""
    foraminal = [c for key in _STREAM_CONDITIONS.values() for c in cells[key].values()]
    chosen = max(t1, key=lambda sid: sum(c["series_id"] == sid for c in foraminal))  # first one on ties
    folder = images / study / chosen
    if not folder.is_dir():
        raise BundleInputError(f"series folder {folder} not found (study {study})")
    spinal = [cells[SPINAL][lv] for lv in LEVELS]
    canal = [
        None if c["series_id"] is None else _cell_mm(images, study, c, f"{where}, {lv}", headers)
        for lv, c in zip(LEVELS, spinal)
    ]
    keypoints = {}
    for stream, key in _STREAM_CONDITIONS.items():
        row = [cells[key][lv] for lv in LEVELS]
        mm = [
            None if c["series_id"] is None else _cell_mm(images, study, c, f"{where}, {key} {lv}", headers)
            for lv, c in zip(LEVELS, row)
        ]
        keypoints[stream] = {"mm": mm, "label": [int(c["severity"]) for c in row]}
    canal_mm = canal if any(p is not None for p in canal) else None
    return {"image": str(folder), "study_id": study, "series_id": chosen, "canal_mm": canal_mm, "keypoints": keypoints}


def build_rsna_t1_datalist(
    root: str | os.PathLike, *, image_dir: str | None = None, keep_unusable: bool = False
) -> list[dict]:
    """Training items of the sagittal T1 (neural foraminal narrowing) model from an RSNA data folder.

    Returns:
        one item per train.csv study with a Sagittal T1 series: ``{"image": series folder, "study_id",
        "series_id", "canal_mm": [[x, y, z] | None] * 5 (sagittal T2 spinal points, mm) | None, "keypoints":
        {"left_foramen" | "right_foramen": {"mm": [[x, y, z] | None] * 5, "label": [0|1|2|-1] * 5}}}``.
        With two T1 series, the one carrying the most foraminal points. A study without T1 is skipped with a
        warning, or with ``keep_unusable`` becomes a :func:`bundle.skipping.skipped_item` with the reason.

    Raises:
        BundleInputError: naming the file and row (or study, condition and level) of a bad row or point.
    """
    root = Path(root).resolve()
    images = root / (image_dir or "train_images")
    series_csv, points_csv = root / "train_series_descriptions.csv", root / "train_label_coordinates.csv"
    series = read_rsna_series(series_csv)
    labels = read_rsna_condition_labels(root)
    headers: dict[Path, SliceHeader] = {}
    items = []
    for study, cells in labels.items():
        t1 = [sid for sid, desc in series.get(study, []) if desc.lower() == RSNA_SAGITTAL_T1.lower()]
        if t1:
            items.append(_t1_item(study, cells, t1, images, f"{points_csv}, study {study}", headers))
            continue
        reason = f"no {RSNA_SAGITTAL_T1} series in {series_csv}"
        if keep_unusable:
            unlocated = {
                stream: {"mm": [None] * len(LEVELS), "label": [int(cells[key][lv]["severity"]) for lv in LEVELS]}
                for stream, key in _STREAM_CONDITIONS.items()
            }
            items.append(skipped_item(study, reason, keypoints=unlocated))
        else:
            logger.warning("study %s: %s, skipped", study, reason)
    return items


class CropAroundCentred(MapTransform):
    """Crop ``data[key]`` (C, H, W MetaTensor) to ``roi_size`` pixels centred on the patient-mm point
    ``meta[centre_key]`` ([x, y, z]), the window kept inside the image; MONAI's ``SpatialCrop`` does the crop, so
    the affine follows it and decoded mm stay right.

    For the sagittal T1 model: the foramina lie along the spine, which the spinal-canal points place
    (:func:`load_foramen_slabs` records their mean as ``canal_centre_mm``), so at inference and validation the
    network sees a window of its training crop's size around them instead of the whole field of view (the
    position attention's cost grows with the square of the pixel count). Without the point, and along an axis
    the image does not exceed, nothing is cropped.

    Example:
        >>> import torch
        >>> img = MetaTensor(torch.zeros(1, 8, 8), affine=torch.eye(4, dtype=torch.float64))
        >>> img.meta["canal_centre_mm"] = [6.0, 6.0, 0.0]
        >>> out = CropAroundCentred("image", (4, 4))({"image": img})["image"]
        >>> tuple(out.shape), out.affine[:2, 3].tolist()
        ((1, 4, 4), [4.0, 4.0])
    """

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int],
        centre_key: str = "canal_centre_mm",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        size = [int(v) for v in roi_size]
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"roi_size must be two positive pixel counts (rows, cols), got {roi_size}")
        self.roi_size, self.centre_key = size, centre_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, MetaTensor) or image.ndim != 3:
                raise ValueError(f"data[{key!r}] must be a (C, H, W) MetaTensor, got {type(image).__name__}")
            centre = image.meta.get(self.centre_key)
            if centre is None:
                continue
            (x, y), extents = mm_to_pixels_np(np.asarray(centre, dtype=np.float64), image.affine)[0], image.shape[1:]
            sizes = [min(size, int(n)) for size, n in zip(self.roi_size, extents)]
            start = [int(min(max(round(c - size / 2), 0), int(n) - size)) for c, size, n in zip((y, x), sizes, extents)]
            d[key] = SpatialCrop(roi_start=start, roi_end=[s + size for s, size in zip(start, sizes)])(image)
        return d
