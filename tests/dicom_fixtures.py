"""Small synthetic DICOM files for the reader tests (written with pydicom, no external data)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SAGITTAL_IOP = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # columns run anterior->posterior, rows superior->inferior
AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def normal_of(iop: Sequence[float]) -> np.ndarray:
    iop = np.asarray(iop, dtype=float)
    n = np.cross(iop[:3], iop[3:])
    return n / np.linalg.norm(n)


def make_image(
    pixels: np.ndarray,
    *,
    ipp: Sequence[float],
    iop: Sequence[float] = SAGITTAL_IOP,
    pixel_spacing: Sequence[float] = (0.8, 0.7),
    series_uid: str,
    study_uid: str,
    instance_number: int = 1,
    sop_uid: str | None = None,
    description: str = "Sagittal T2",
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    drop: Sequence[str] = (),
) -> Dataset:
    """One uncompressed single-frame MR image; ``pixels`` uint16 (rows, cols)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = MR_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P-SECRET-1"
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "Secret Hospital"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 4.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    ds.PixelData = pixels.tobytes()
    for tag in drop:
        if tag in ds:
            delattr(ds, tag)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.save_as(path, write_like_original=False)  # pydicom 2.x
    return path


def slice_pattern(k: int, rows: int, cols: int) -> np.ndarray:
    """Pixels of spatial slice ``k``: value 100 * (k + 1) plus a column ramp (0..cols-1)."""
    return np.full((rows, cols), 100 * (k + 1), dtype=np.uint16) + np.arange(cols, dtype=np.uint16)[None, :]


def write_series(
    folder: Path,
    *,
    n_slices: int = 5,
    rows: int = 32,
    cols: int = 40,
    iop: Sequence[float] = SAGITTAL_IOP,
    origin: Sequence[float] = (-10.0, -60.0, 40.0),
    pixel_spacing: Sequence[float] = (0.8, 0.7),
    gap: float = 4.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    description: str = "Sagittal T2",
    seed: int = 0,
    pixel_fn: Callable[[int, int, int], np.ndarray] = slice_pattern,
    name_by_instance: bool = True,
    **kwargs,
) -> list[Path]:
    """Write a series whose InstanceNumbers are shuffled w.r.t. spatial order; returns paths in spatial order.

    Slice k sits at ``origin + k * gap * normal``.
    """
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    numbers = np.random.default_rng(seed).permutation(n_slices) + 1
    normal = normal_of(iop)
    paths = []
    for k in range(n_slices):
        ipp = np.asarray(origin, dtype=float) + k * gap * normal
        ds = make_image(
            pixel_fn(k, rows, cols),
            ipp=ipp,
            iop=iop,
            pixel_spacing=pixel_spacing,
            series_uid=series_uid,
            study_uid=study_uid,
            instance_number=int(numbers[k]),
            description=description,
            **kwargs,
        )
        name = f"{int(numbers[k])}.dcm" if name_by_instance else f"image{k}.dcm"
        paths.append(save(ds, Path(folder) / name))
    return paths
