"""Read DICOM headers and pixel values with clear errors instead of pydicom tracebacks."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pydicom
from bundle.errors import BundleInputError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

__all__ = ["read_header", "read_dicom_pixels", "transfer_syntax_name"]


def _path_str(path: str | os.PathLike) -> str:
    return os.fspath(path)


def read_header(path: str | os.PathLike, specific_tags: Sequence[str] | None = None) -> Dataset:
    """Read a DICOM file's header only (``stop_before_pixels``), or raise BundleInputError naming the file.

    Files without the 128-byte preamble are accepted when they look like images (they carry Rows and
    SOPInstanceUID); anything else that is not DICOM is an error.
    """
    name = _path_str(path)
    if not os.path.isfile(name):
        raise BundleInputError(f"{name}: DICOM file not found")
    kwargs = {"stop_before_pixels": True}
    if specific_tags is not None:
        kwargs["specific_tags"] = list(specific_tags)
    try:
        return pydicom.dcmread(name, **kwargs)
    except InvalidDicomError:
        pass
    except Exception as err:  # truncated or corrupt file: pydicom raises many types
        raise BundleInputError(f"{name}: not a readable DICOM file ({type(err).__name__}: {err})") from err
    try:  # preamble-less files (older exports) are read with force=True, then sanity-checked
        ds = pydicom.dcmread(name, force=True, stop_before_pixels=True)
    except Exception as err:
        raise BundleInputError(f"{name}: not a DICOM file ({type(err).__name__}: {err})") from err
    if "Rows" not in ds or "SOPInstanceUID" not in ds:
        raise BundleInputError(f"{name}: not a DICOM image file (no DICOM preamble, no Rows/SOPInstanceUID)")
    return ds


def transfer_syntax_name(ds: Dataset) -> str:
    """Human-readable transfer syntax of ``ds`` ("unknown" when the file meta lacks it)."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        return "unknown transfer syntax"
    return f"{uid.name} ({uid})" if uid.name != uid else str(uid)


def read_dicom_pixels(source: str | os.PathLike | Dataset) -> np.ndarray:
    """Decode one greyscale DICOM image into modality values, bright = high signal.

    RescaleSlope / RescaleIntercept are applied; MONOCHROME1 images are inverted on the stored-value
    range first (``max_stored + min_stored - v``), so the same offset holds for every slice of a series.

    Args:
        source: a file path or a dataset read *with* pixel data.

    Returns:
        float32 array (rows, cols) for a single-frame file, (frames, rows, cols) for a multi-frame one.

    Raises:
        BundleInputError: unreadable file, no pixel data, colour image, or pixel data that the installed
            pydicom plugins cannot decode (the message names the file and the transfer syntax).

    Example:
        >>> from pydicom.data import get_testdata_file
        >>> read_dicom_pixels(get_testdata_file("MR_small.dcm")).shape
        (64, 64)
    """
    if isinstance(source, Dataset):
        ds, name = source, str(getattr(source, "filename", None) or "<dataset>")
    else:
        name = _path_str(source)
        if not os.path.isfile(name):
            raise BundleInputError(f"{name}: DICOM file not found")
        try:
            ds = pydicom.dcmread(name)
        except InvalidDicomError:
            read_header(name)  # raises a clear error unless it is a preamble-less image
            ds = pydicom.dcmread(name, force=True)
        except Exception as err:
            raise BundleInputError(f"{name}: not a readable DICOM file ({type(err).__name__}: {err})") from err
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise BundleInputError(f"{name}: the file has no pixel data")
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise BundleInputError(
            f"{name}: colour image (PhotometricInterpretation {photometric}, SamplesPerPixel {samples}); "
            "a greyscale MR image is expected"
        )
    if getattr(ds, "file_meta", None) is not None and "TransferSyntaxUID" not in ds.file_meta and "PixelData" in ds:
        raise BundleInputError(f"{name}: the file meta has no TransferSyntaxUID, the pixel data cannot be decoded")
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as err:  # every decoder failure (missing plugin, corrupt stream) becomes one clear error
        detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        first_line = detail if len(detail) <= 400 else detail[:397] + "..."
        raise BundleInputError(
            f"{name}: cannot decode pixel data with transfer syntax {transfer_syntax_name(ds)} "
            f"using the installed pydicom plugins ({first_line})"
        ) from err
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    # float32 holds every stored value of up to 16 bits exactly; wider ones and a real rescale go through float64
    exact32 = stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2 and slope == 1.0 and intercept == 0.0
    values = stored.astype(np.float32 if exact32 else np.float64)
    if photometric == "MONOCHROME1":
        bits = int(getattr(ds, "BitsStored", 0) or stored.dtype.itemsize * 8)
        if int(getattr(ds, "PixelRepresentation", 0) or 0) == 1:
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            lo, hi = 0, 2**bits - 1
        if stored.dtype.kind == "f":  # float pixel data has no stored-value range: mirror on the data range
            lo, hi = float(stored.min()), float(stored.max())
        values = np.subtract(lo + hi, values, dtype=values.dtype)
    if exact32:
        return values
    return (values * slope + intercept).astype(np.float32)
