"""Writing phantom slices as DICOM MR Image Storage files (explicit VR little endian, with file meta)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from bundle.atomic import atomic_write_bytes
from bundle.phantoms.study import PhantomSeries, PhantomStudy
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

__all__ = ["MR_IMAGE_STORAGE", "MANUFACTURER", "PROFILE_PROTOCOL", "slice_dataset", "dataset_bytes", "write_atomic"]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MANUFACTURER = "SpineOne phantom"
PROFILE_PROTOCOL = {"realistic": "SpineOne phantom realistic"}  # ProtocolName of non-"easy" phantom files
_PYDICOM3 = int(pydicom.__version__.split(".")[0]) >= 3


def _ds(v: float) -> str:
    """Decimal string (DS) of at most 16 characters."""
    return f"{float(v):.10g}"[:16]


def slice_dataset(
    study: PhantomStudy, series: PhantomSeries, k: int, pixels: np.ndarray, duplicate: bool = False
) -> Dataset:
    """Dataset of spatial slice ``k`` of ``series``; ``pixels`` (rows, cols) uint16 stored values.

    ``duplicate``: the second instance of the series' duplicated slice (``series.duplicate == k``), with its own
    SOPInstanceUID and InstanceNumber (``series.duplicate_uid``, ``series.duplicate_instance``).
    """
    if duplicate and series.duplicate != k:
        raise ValueError(f"slice {k} of series {series.series_id} is not its duplicated slice ({series.duplicate})")
    sop_uid = series.duplicate_uid if duplicate else series.sop_uids[k]
    g = series.geometry
    if pixels.shape != (g.rows, g.cols) or pixels.dtype != np.uint16:
        raise ValueError(f"pixels must be uint16 of shape {(g.rows, g.cols)}, got {pixels.dtype} {pixels.shape}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = f"A{study.index:06d}"
    ds.Modality = "MR"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "LUMBAR SPINE"
    ds.SeriesDescription = series.description
    if series.appearance is not None:  # "easy" files stay byte-identical to those made before profiles
        ds.ProtocolName = PROFILE_PROTOCOL["realistic"]
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = "O"
    ds.BodyPartExamined = "LSPINE"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.MRAcquisitionType = "2D"
    t1 = series.contrast == "T1"
    ds.RepetitionTime = "550" if t1 else "3500"
    ds.EchoTime = "12" if t1 else "100"
    ds.MagneticFieldStrength = "1.5"
    ds.SliceThickness = _ds(g.slice_thickness)
    if g.slice_spacing is not None:
        ds.SpacingBetweenSlices = _ds(g.slice_spacing)
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = str(study.index + 1)
    ds.SeriesNumber = series.series_number
    ds.InstanceNumber = series.duplicate_instance if duplicate else series.instance_numbers[k]
    ds.ImagePositionPatient = [_ds(v) for v in g.positions[k]]
    ds.ImageOrientationPatient = [_ds(v) for v in g.slice_orientation(k)]
    ds.FrameOfReferenceUID = study.frame_uid
    ds.SliceLocation = _ds(float(g.positions[k] @ g.dirs(k)[2]))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = series.photometric
    ds.Rows = g.rows
    ds.Columns = g.cols
    ds.PixelSpacing = [_ds(v) for v in g.pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = series.bits_stored
    ds.HighBit = series.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = _ds(series.intercept)
    ds.RescaleSlope = _ds(series.slope)
    ds.RescaleType = "US"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    if not _PYDICOM3:  # pydicom 2.x reads the encoding from these attributes
        ds.is_little_endian = True
        ds.is_implicit_VR = False
    return ds


def dataset_bytes(ds: Dataset) -> bytes:
    """Encode ``ds`` as a DICOM file (preamble, file meta, explicit VR little endian)."""
    buf = io.BytesIO()
    if _PYDICOM3:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    else:
        pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (no partial files)."""
    atomic_write_bytes(path, data)
