"""Axial T2 input for the subarticular-stenosis model: one item per (study, disc level).

An axial image shows one level, so each item holds the slices of the study's Axial T2 stacks nearest one
disc point (the sagittal T2 spinal-canal point of that level, patient mm) and the streams
``left_subarticular`` / ``right_subarticular`` have a single level (``bundle.streams.AXIAL_LEVEL``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bundle.errors import BundleInputError
from bundle.io.dicom_series import (
    SliceHeader,
    list_dicom_files,
    patient_to_pixel,
    pixel_to_patient,
    read_slice_headers,
    sort_series,
)
from bundle.io.rsna import instance_point_mm, read_rsna_condition_labels, read_rsna_series
from bundle.io.slices import SliceLoaderd, slices_tensor
from bundle.rsna_labels import LEVELS as RSNA_LEVELS
from bundle.rsna_labels import SPINAL
from bundle.skipping import skipped_item
from bundle.streams import RSNA_AXIAL_STREAMS
from monai.config import KeysCollection
from monai.data import MetaTensor

__all__ = [
    "RSNA_AXIAL_T2",
    "AxialSlices",
    "read_axial_stacks",
    "nearest_axial_slices",
    "parallel_blocks",
    "block_centre_mm",
    "load_axial_slices",
    "LoadAxialSlicesd",
    "build_rsna_axial_datalist",
]

logger = logging.getLogger(__name__)

RSNA_AXIAL_T2 = "Axial T2"
_PARALLEL = 0.9999  # |cos| between slice normals of one block (tilted blocks differ by degrees)


@dataclass(frozen=True)
class AxialSlices:
    """The slices chosen around a point: ``slices`` (num_slices, edge-repeated) sorted along ``centre``'s normal."""

    stack: int  # index of the stack in the list given
    centre: SliceHeader  # the slice whose plane lies nearest the point
    slices: list[SliceHeader]
    distance_mm: float  # signed distance of the point from the centre plane, along its normal
    slice_spacing: float  # mm, median gap of the block (1 mm for a single slice)


def _covers(header: SliceHeader, point: np.ndarray) -> bool:
    x, y, _ = patient_to_pixel(header, point)
    return -0.5 <= x <= header.cols - 0.5 and -0.5 <= y <= header.rows - 0.5


def nearest_axial_slices(
    stacks: Sequence[Sequence[SliceHeader]], point_mm: Sequence[float], num_slices: int = 3
) -> AxialSlices | None:
    """The stack and ``num_slices`` slices whose planes lie nearest ``point_mm`` (patient mm, (3,)).

    Distance is taken along each slice's own normal, so tilted per-level blocks are handled; only slices on
    which the point projects inside the image count. Neighbours are the slices of the same stack parallel to
    the nearest one, sorted by position along its normal (never by InstanceNumber), centred on it one slice gap
    apart (:func:`bundle.io.dicom_series.sort_series`: a duplicated slice is read once, the lowest InstanceNumber;
    a missing slice's position takes its nearest neighbour, the lower on ties) and edge-repeated when the block is
    short. Returns None when no slice covers the point (none projects it inside its image, or the nearest plane
    lies farther than one slice gap / thickness from it).
    """
    if int(num_slices) < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    point = np.asarray(point_mm, dtype=np.float64)
    if point.shape != (3,) or not np.isfinite(point).all():
        raise ValueError(f"point_mm must be 3 finite numbers, got {point_mm}")
    best: tuple[float, int, SliceHeader] | None = None
    for s, stack in enumerate(stacks):
        for h in stack:
            d = abs(patient_to_pixel(h, point)[2])
            if _covers(h, point) and (best is None or d < best[0]):
                best = (d, s, h)
    if best is None:
        return None
    _, s, centre = best
    block = sort_series(
        [h for h in stacks[s] if abs(float(h.normal @ centre.normal)) >= _PARALLEL], require_sagittal=False
    )
    k = int(np.argmin(np.abs(block.offsets - float(centre.position @ block.normal))))  # a dropped copy: its kept twin
    centre = block.slices[k]
    half = (int(num_slices) - 1) // 2
    picked = [block.slices[block.nearest_on_grid(int(block.grid[k]) - half + i)] for i in range(int(num_slices))]
    spacing = block.slice_spacing if len(block.slices) > 1 else 1.0
    slab = max(spacing, centre.slice_thickness or 0.0, centre.spacing_between_slices or 0.0)
    if abs(patient_to_pixel(centre, point)[2]) > slab:  # beyond the stack's ends: no slice shows the point
        return None
    return AxialSlices(s, centre, picked, patient_to_pixel(centre, point)[2], spacing)


def parallel_blocks(stack: Sequence[SliceHeader], gap_factor: float = 2.5) -> list[list[SliceHeader]]:
    """The slices of one series split into blocks: parallel planes (|cos| of the normals >= 0.9999) with no gap
    wider than ``gap_factor`` times the block's median gap (mm, along its normal), each sorted along its normal
    with one slice per position (a duplicated slice once, the lowest InstanceNumber). One missing slice (a gap of
    2 spacings) stays inside its block.

    Per-level stacks tilted along each disc give one block per stack; one stack through all levels gives one.
    Blocks are returned cranial first (descending patient z of their centre slice, LPS).
    """
    groups: list[list[SliceHeader]] = []
    for h in stack:
        group = next((g for g in groups if abs(float(h.normal @ g[0].normal)) >= _PARALLEL), None)
        if group is None:
            groups.append([h])
        else:
            group.append(h)
    blocks = []
    for group in groups:
        ordered = sort_series(group, require_sagittal=False)  # sorted along its normal, a duplicated slice once
        group, gaps = ordered.slices, np.diff(ordered.offsets)
        limit = gap_factor * float(np.median(gaps)) if gaps.size else 0.0
        start = 0
        for i, gap in enumerate(gaps, start=1):
            if gap > limit > 0:
                blocks.append(group[start:i])
                start = i
        blocks.append(group[start:])
    return sorted(blocks, key=lambda b: -float(block_centre_mm(b)[2]))


def block_centre_mm(block: Sequence[SliceHeader]) -> np.ndarray:
    """Patient mm (3,) of the image centre of a block's centre slice (index ``(n - 1) // 2`` in the given order)."""
    centre = block[(len(block) - 1) // 2]
    return pixel_to_patient(centre, 0.5 * (centre.cols - 1), 0.5 * (centre.rows - 1))


def read_axial_stacks(folders: str | os.PathLike | Sequence[str | os.PathLike]) -> list[list[SliceHeader]]:
    """Slice headers (no pixels) of each axial series folder, one list per folder, in file order."""
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    if not folders:
        raise BundleInputError("no axial series folder given")
    return [read_slice_headers(list_dicom_files(f)) for f in folders]


def load_axial_slices(
    folders: str | os.PathLike | Sequence[str | os.PathLike],
    disc_mm: Sequence[float],
    num_slices: int = 3,
    *,
    level: str | None = None,
    study_id: str | None = None,
    stacks: Sequence[Sequence[SliceHeader]] | None = None,
) -> MetaTensor:
    """Read the ``num_slices`` axial slices nearest ``disc_mm`` from the given series folders.

    ``stacks``: the folders' headers already read (:func:`read_axial_stacks`, same order), so that a study's
    levels read them once.

    Returns:
        float32 MetaTensor (num_slices, rows, cols) with the 4x4 LPS affine of the nearest slice's geometry
        (k = 0 is its plane), so patient-mm points project onto it, and meta ``filename_or_obj, series_id,
        series_instance_uid, instance_numbers, middle_instance_number, middle_filename, level, study_id,
        distance_mm, pixel_spacing, slice_spacing, spatial_shape, original_affine, space`` (no patient identity).

    Raises:
        BundleInputError: unreadable series, mixed image shapes within the chosen block, or no slice covering
            ``disc_mm`` (the message names the folders and the point).
    """
    stacks = read_axial_stacks(folders) if stacks is None else stacks
    choice = nearest_axial_slices(stacks, disc_mm, num_slices)
    if choice is None:
        names = [os.fspath(f) for f in ([folders] if isinstance(folders, (str, os.PathLike)) else folders)]
        raise BundleInputError(f"no axial slice of {names} covers the point {list(disc_mm)} mm")
    c = choice.centre
    return slices_tensor(
        choice.slices,
        c,
        choice.slice_spacing,
        c.path.parent,
        series_id=c.path.parent.name,
        distance_mm=float(choice.distance_mm),
        level=None if level is None else str(level),
        study_id=None if study_id is None else str(study_id),
    )


class LoadAxialSlicesd(SliceLoaderd):
    """``data[key]`` (axial series folder or folders) -> :func:`load_axial_slices` around ``data["disc_mm"]``.

    ``data["level"]`` and ``data["study_id"]``, when present, go into the metadata; ``data["axial_stacks"]``,
    when present, holds the folders' headers already read (it is removed from the item).
    """

    def __init__(self, keys: KeysCollection = "image", num_slices: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, num_slices, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        stacks = d.pop("axial_stacks", None)
        for key in self.key_iterator(d):
            if d.get("disc_mm") is None:
                raise BundleInputError(f"item of study {d.get('study_id')}: no 'disc_mm' to choose axial slices")
            level, study = d.get("level"), d.get("study_id")
            d[key] = load_axial_slices(
                d[key],  # type: ignore[arg-type]
                d["disc_mm"],  # type: ignore[arg-type]
                self.num_slices,
                level=None if level is None else str(level),
                study_id=None if study is None else str(study),
                stacks=stacks,  # type: ignore[arg-type]
            )
        return d


def _cell_mm(cell: dict, folder: Path, where: str, headers: dict[Path, SliceHeader]) -> list[float]:
    """Patient mm of a label cell's point (pixels of its instance); BundleInputError naming ``where``."""
    path = folder / str(cell["series_id"]) / f"{cell['instance_number']}.dcm"
    return instance_point_mm(path, cell["x"], cell["y"], where, headers)


def _study_items(
    study: str, conditions: dict, axials: list[str], stacks: list[list[SliceHeader]], folder: Path, points_csv: Path
) -> list[dict]:
    """Items of one study: one per level with a spinal point and an axial slice covering it."""
    headers: dict[Path, SliceHeader] = {}
    items = []
    for level in RSNA_LEVELS:
        spinal = conditions[SPINAL][level]
        if spinal["series_id"] is None:
            continue
        disc_mm = _cell_mm(spinal, folder, f"{points_csv}: study {study}, {SPINAL} {level}", headers)
        choice = nearest_axial_slices(stacks, disc_mm, 1)
        if choice is None:
            logger.info("study %s level %s: no axial T2 slice covers the disc point, level skipped", study, level)
            continue
        keypoints = {}
        for spec in RSNA_AXIAL_STREAMS:
            cell = conditions[f"{spec.name}_stenosis"][level]
            where = f"{points_csv}: study {study}, {spec.name}_stenosis {level}"
            mm = None if cell["series_id"] is None else _cell_mm(cell, folder, where, headers)
            keypoints[spec.name] = {"mm": [mm], "label": [int(cell["severity"])]}
        items.append(
            {
                "image": [str(folder / sid) for sid in axials],
                "study_id": study,
                "series_id": axials[choice.stack],
                "level": level,
                "disc_mm": disc_mm,
                "keypoints": keypoints,
            }
        )
    return items


def _unlocated(conditions: dict, level: str) -> dict:
    """The axial streams' labels of one level without points (a study no axial slice can be read for)."""
    return {
        spec.name: {"mm": [None], "label": [int(conditions[f"{spec.name}_stenosis"][level]["severity"])]}
        for spec in RSNA_AXIAL_STREAMS
    }


def build_rsna_axial_datalist(root: str | os.PathLike, *, keep_unusable: bool = False) -> list[dict]:
    """Axial T2 items of an RSNA train folder, one per (study, level), in train.csv then level order.

    Items: ``{"image": [axial series folders], "study_id", "series_id" (the stack nearest the disc), "level",
    "disc_mm": [x, y, z] (sagittal T2 spinal point), "keypoints": {"left_subarticular" | "right_subarticular":
    {"mm": [[x, y, z] | None], "label": [class | -1]}}}``. A study without an Axial T2 series (or whose series
    cannot be read) is skipped with a warning, or with ``keep_unusable`` becomes a skipped item
    (:func:`bundle.skipping.skipped_item`). Bad CSV rows raise BundleInputError naming file and row.
    """
    root = Path(root).resolve()
    labels = read_rsna_condition_labels(root)
    series = read_rsna_series(root / "train_series_descriptions.csv")
    points_csv = root / "train_label_coordinates.csv"
    items: list[dict] = []
    for study, conditions in labels.items():
        axials = [sid for sid, desc in series.get(study, []) if desc.lower() == RSNA_AXIAL_T2.lower()]
        folder = root / "train_images" / study
        try:
            if not axials:
                raise BundleInputError(f"no {RSNA_AXIAL_T2} series listed in {root / 'train_series_descriptions.csv'}")
            stacks = read_axial_stacks([folder / sid for sid in axials])
        except BundleInputError as err:  # the study is unusable; a bad label row below is an error
            if keep_unusable:  # one skipped item per level, its labels kept (evaluation counts them as missed)
                items += [
                    skipped_item(study, str(err), level=level, keypoints=_unlocated(conditions, level))
                    for level in RSNA_LEVELS
                ]
            else:
                logger.warning("study %s: %s, skipped", study, err)
            continue
        items += _study_items(study, conditions, axials, stacks, folder, points_csv)
    return items
