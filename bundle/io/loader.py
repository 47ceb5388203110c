"""Load the middle slices of one sagittal DICOM series as a MONAI MetaTensor (2.5D input)."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from bundle.errors import BundleInputError
from bundle.io.dicom_series import list_dicom_files, middle_indices, read_slice_headers, series_affine, sort_series
from bundle.io.pixels import read_dicom_pixels
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import SpaceKeys

__all__ = ["load_sagittal_series", "LoadSagittalSeriesd"]


def load_sagittal_series(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    num_slices: int = 7,
    *,
    study_id: str | None = None,
    series_id: str | None = None,
) -> MetaTensor:
    """Read one sagittal series and return its middle ``num_slices`` slices.

    Headers are read first (no pixels) to check and sort the series along its slice normal; pixels
    are decoded only for the selected slices. Fewer slices than ``num_slices``: the edge slice repeats.

    Args:
        source: a series directory or a list of the DICOM files of one series.
        num_slices: number of channels; channel ``(num_slices - 1) // 2`` is slice ``(S - 1) // 2``.
        study_id, series_id: copied into the metadata when given.

    Returns:
        float32 MetaTensor (num_slices, rows, cols), bright = high signal, with the 4x4 LPS ``affine``
        mapping (row i, col j, k) to patient mm (k = 0 is the middle slice's plane) and meta keys
        ``filename_or_obj, series_instance_uid, instance_numbers, middle_instance_number, middle_filename,
        pixel_spacing, slice_spacing, spatial_shape, original_affine, original_channel_dim, space`` (no
        patient identity; ``middle_filename`` is the middle instance's file, drawn by the overlay writer).

    Raises:
        BundleInputError: empty or ``None`` path, missing/empty folder, non-DICOM or undecodable file, several series, missing
            geometry tags, non-sagittal plane, mixed image shapes.
    """
    if int(num_slices) < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    files = list_dicom_files(source)
    series = sort_series(read_slice_headers(files))
    picked = middle_indices(len(series.slices), int(num_slices))
    decoded: dict[int, np.ndarray] = {}
    for idx in dict.fromkeys(picked):  # unique, in order: each file decoded once
        header = series.slices[idx]
        pixels = read_dicom_pixels(header.path)
        if pixels.shape != header.shape:
            raise BundleInputError(
                f"{header.path}: decoded pixels have shape {pixels.shape}, the header says {header.shape}"
            )
        decoded[idx] = pixels
    volume = np.stack([decoded[i] for i in picked]).astype(np.float32)

    middle = series.slices[series.middle]
    affine = series_affine(middle, series.slice_spacing)
    filename = os.fspath(source) if isinstance(source, (str, os.PathLike)) else os.fspath(files[0])
    meta = {
        "filename_or_obj": filename,
        "series_instance_uid": middle.series_uid,
        "instance_numbers": [series.slices[i].instance_number for i in picked],
        "middle_instance_number": middle.instance_number,
        "middle_filename": os.fspath(middle.path),
        "series_num_slices": len(series.slices),
        "pixel_spacing": np.array(middle.pixel_spacing, dtype=np.float64),
        "slice_spacing": float(series.slice_spacing),
        "spatial_shape": np.array(middle.shape, dtype=np.int64),
        "original_affine": affine.copy(),
        "original_channel_dim": 0,
        "space": SpaceKeys.LPS.value,
    }
    if study_id is not None:
        meta["study_id"] = str(study_id)
    if series_id is not None:
        meta["series_id"] = str(series_id)
    return MetaTensor(torch.from_numpy(volume), affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


class LoadSagittalSeriesd(MapTransform):
    """Dictionary wrapper of :func:`load_sagittal_series`: ``data[key]`` (folder or file list) -> MetaTensor.

    ``data["study_id"]`` and ``data["series_id"]``, when present, are copied into the image metadata. A missing
    key raises MONAI's KeyError naming it (unless ``allow_missing_keys``); ``None``, an empty string or a path
    that does not exist raises BundleInputError naming it: an empty path never reads the working directory.

    Example:
        >>> loader = LoadSagittalSeriesd(keys="image", num_slices=7)  # doctest: +SKIP
        >>> loader({"image": "train_images/1/2", "study_id": "1"})["image"].shape  # doctest: +SKIP
        torch.Size([7, 512, 512])
    """

    def __init__(self, keys: KeysCollection = "image", num_slices: int = 7, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(num_slices) < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}")
        self.num_slices = int(num_slices)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        study_id, series_id = d.get("study_id"), d.get("series_id")
        for key in self.key_iterator(d):
            d[key] = load_sagittal_series(
                d[key],  # type: ignore[arg-type]
                self.num_slices,
                study_id=None if study_id is None else str(study_id),
                series_id=None if series_id is None else str(series_id),
            )
        return d
