"""Load the middle slices of one sagittal DICOM series as a MONAI MetaTensor (2.5D input)."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

from bundle.io.dicom_series import list_dicom_files, read_slice_headers, sort_series
from bundle.io.slices import SliceLoaderd, slices_tensor
from monai.config import KeysCollection
from monai.data import MetaTensor

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
    A duplicated slice is read once; where slices are missing, the middle and the slab follow the positions
    (:meth:`SortedSeries.slab`: a missing position repeats its nearest slice), so the channels stay one
    ``slice_spacing`` apart as the affine says.

    Args:
        source: a series directory or a list of the DICOM files of one series.
        num_slices: number of channels; channel ``(num_slices - 1) // 2`` is the middle slice (``(S - 1) // 2`` of a
            complete series).
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
    picked = series.slab(int(num_slices))
    filename = os.fspath(source) if isinstance(source, (str, os.PathLike)) else os.fspath(files[0])
    return slices_tensor(
        [series.slices[i] for i in picked],
        series.slices[series.middle],
        series.slice_spacing,
        filename,
        series_num_slices=len(series.slices),
        study_id=None if study_id is None else str(study_id),
        series_id=None if series_id is None else str(series_id),
    )


class LoadSagittalSeriesd(SliceLoaderd):
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
        super().__init__(keys, num_slices, allow_missing_keys)

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
