"""Chosen slices of one DICOM series -> a MONAI MetaTensor with geometry: the one place the three loaders
(sagittal T2 middle slices, sagittal T1 foramen slabs, axial slices at a disc) decode pixels and write meta."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bundle.errors import BundleInputError
from bundle.io.dicom_series import SliceHeader, series_affine
from bundle.io.pixels import read_dicom_pixels
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import SpaceKeys

__all__ = ["decode_slices", "slices_tensor", "SliceLoaderd"]


def decode_slices(headers: Sequence[SliceHeader]) -> np.ndarray:
    """float32 (len(headers), rows, cols) pixels of the given slices in that order; each file decoded once.

    Raises BundleInputError naming the file when its decoded pixels do not have the header's shape.
    """
    decoded: dict[Path, np.ndarray] = {}
    for h in headers:
        if h.path not in decoded:
            pixels = read_dicom_pixels(h.path)
            if pixels.shape != h.shape:
                raise BundleInputError(f"{h.path}: decoded pixels have shape {pixels.shape}, the header says {h.shape}")
            decoded[h.path] = pixels
    out = np.empty((len(headers), *headers[0].shape) if headers else (0, 0, 0), dtype=np.float32)
    for channel, h in enumerate(headers):
        out[channel] = decoded[h.path]
    return out


def slices_tensor(
    headers: Sequence[SliceHeader],
    reference: SliceHeader,
    slice_spacing: float,
    filename: str | os.PathLike,
    **extra_meta: Any,
) -> MetaTensor:
    """The slices ``headers`` (channels, in order) as a float32 MetaTensor (C, rows, cols).

    ``reference`` is the slice whose plane the 4x4 LPS ``affine`` describes ((row, col, k) -> patient mm, k = 0
    on that plane, ``slice_spacing`` mm per k). Meta: ``filename_or_obj, series_instance_uid, instance_numbers
    (per channel), middle_instance_number, middle_filename`` (the reference slice, drawn by the overlay writer),
    ``pixel_spacing, slice_spacing, spatial_shape, original_affine, original_channel_dim, space``, then
    ``extra_meta`` (entries that are None are left out). No patient identity.
    """
    affine = series_affine(reference, slice_spacing)
    meta = {
        "filename_or_obj": os.fspath(filename),
        "series_instance_uid": reference.series_uid,
        "instance_numbers": [h.instance_number for h in headers],
        "middle_instance_number": reference.instance_number,
        "middle_filename": os.fspath(reference.path),
        "pixel_spacing": np.array(reference.pixel_spacing, dtype=np.float64),
        "slice_spacing": float(slice_spacing),
        "spatial_shape": np.array(reference.shape, dtype=np.int64),
        "original_affine": affine.copy(),
        "original_channel_dim": 0,
        "space": SpaceKeys.LPS.value,
    }
    meta.update({k: v for k, v in extra_meta.items() if v is not None})
    volume = torch.from_numpy(decode_slices(headers))
    return MetaTensor(volume, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


class SliceLoaderd(MapTransform):
    """Base of the series loaders' dictionary transforms: ``keys``, ``num_slices`` (>= 1, channels per slab) and
    ``allow_missing_keys``; subclasses implement ``__call__``. ``channels`` is the image's channel count (one
    slab: ``num_slices``), which sizes a skipped study's placeholder (``bundle.skipping``)."""

    slabs: int = 1

    def __init__(self, keys: KeysCollection = "image", num_slices: int = 7, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(num_slices) < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}")
        self.num_slices = int(num_slices)

    @property
    def channels(self) -> int:
        """Channels of the loaded image: ``slabs * num_slices``."""
        return self.slabs * self.num_slices
