"""One DICOM series: list its files, read and check slice geometry, sort spatially, build the affine.

Geometry conventions (DICOM patient coordinates, LPS, mm):
``IOP[0:3]`` is the direction of increasing column index, ``IOP[3:6]`` of increasing row index,
``PixelSpacing = (row spacing, column spacing)``, the slice normal is ``cross(IOP[0:3], IOP[3:6])``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bundle.codec import mm_to_pixels_np, pixels_to_mm_np
from bundle.errors import BundleInputError, MissingInputError
from bundle.io.pixels import read_header
from pydicom.dataset import Dataset

__all__ = [
    "SliceHeader",
    "SortedSeries",
    "list_dicom_files",
    "slice_header",
    "read_slice_headers",
    "slice_normal",
    "plane_name",
    "pixel_to_patient",
    "patient_to_pixel",
    "sort_series",
    "middle_indices",
    "series_affine",
    "SAGITTAL_THRESHOLD",
]

logger = logging.getLogger(__name__)

SAGITTAL_THRESHOLD = 0.75  # |normal . x| above this is a sagittal plane (data-formats.md)
SAME_POSITION_MM = 0.01  # two instances whose ImagePositionPatient differ by less lie at the same position
GAP_FACTOR = 1.5  # a gap between neighbouring slices wider than this times the series' spacing: missing slices
_WARNED: set[str] = set()  # irregular-series warnings already logged (each once per process, not per load)
_GEOMETRY_TAGS = {
    "ImagePositionPatient": "(0020,0032)",
    "ImageOrientationPatient": "(0020,0037)",
    "PixelSpacing": "(0028,0030)",
    "Rows": "(0028,0010)",
    "Columns": "(0028,0011)",
}


@dataclass(frozen=True)
class SliceHeader:
    """Geometry and identity of one single-frame DICOM image (no pixel data)."""

    path: Path
    series_uid: str
    study_uid: str
    sop_uid: str
    instance_number: int  # -1 when absent
    position: np.ndarray  # (3,) ImagePositionPatient, mm: centre of the first transmitted pixel
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing), mm
    rows: int
    cols: int
    description: str
    spacing_between_slices: float | None
    slice_thickness: float | None

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal ``cross(IOP[0:3], IOP[3:6])``, shape (3,)."""
        return slice_normal(self.orientation)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)


def slice_normal(orientation: Sequence[float] | np.ndarray) -> np.ndarray:
    """Unit normal (3,) of a plane given by the 6 ImageOrientationPatient values."""
    iop = np.asarray(orientation, dtype=np.float64).reshape(6)
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise ValueError(f"degenerate ImageOrientationPatient {iop.tolist()}: row and column directions are parallel")
    return n / norm


def plane_name(normal: np.ndarray) -> str:
    """'sagittal', 'coronal', 'axial' (|component| > 0.75 along x, y, z) or 'oblique'."""
    for axis, name in enumerate(("sagittal", "coronal", "axial")):
        if abs(float(normal[axis])) > SAGITTAL_THRESHOLD:
            return name
    return "oblique"


def pixel_to_patient(header: SliceHeader, x: float, y: float) -> np.ndarray:
    """Patient mm (3,) of the pixel (x = column, y = row) of ``header``'s image.

    ``p = IPP + x * PS[1] * IOP[0:3] + y * PS[0] * IOP[3:6]``: the codec's geometry (``bundle.codec``) on the
    slice's affine (:func:`series_affine`).
    """
    return pixels_to_mm_np([[float(x), float(y)]], series_affine(header, 1.0))[0]


def patient_to_pixel(header: SliceHeader, point_mm) -> tuple[float, float, float]:
    """Inverse of :func:`pixel_to_patient`: ``(x column, y row, signed mm from the plane along its normal)`` of a
    patient-mm point on ``header``'s image (the in-plane part by the codec's geometry)."""
    point = np.asarray(point_mm, dtype=np.float64)
    x, y = mm_to_pixels_np(point[None], series_affine(header, 1.0))[0]
    return float(x), float(y), float((point - header.position) @ header.normal)


def _checked_path(path: str | os.PathLike | None, what: str) -> Path:
    """``path`` as a Path, refusing ``None``, empty names and paths that do not exist (MissingInputError, HTTP
    404 behind a server). ``Path("")`` would be the working directory, whose DICOM files would then be read
    instead of the requested ``what``."""
    if path is None or not os.fspath(path).strip():
        raise MissingInputError(
            f"empty {what} path {path!r}: no image was named, so none is read (an empty path would read the working"
            " directory); behind MONAI Label this means the requested image id is not in its datastore"
        )
    found = Path(path)
    if not found.exists():
        raise MissingInputError(f"{found}: {what} folder or file not found")
    return found


def list_dicom_files(
    source: str | os.PathLike | Sequence[str | os.PathLike] | None, *, recursive: bool = False, what: str = "series"
) -> list[Path]:
    """Files of a ``what`` ("series" or "study") given as a directory (its regular files, searched
    recursively when asked; ``*.dcm`` if any) or a list of paths. Empty, ``None`` or non-existent paths
    raise BundleInputError naming them."""
    if source is None or isinstance(source, (str, os.PathLike)):
        folder = _checked_path(source, what)
        if folder.is_file():
            return [folder]
        found = folder.rglob("*") if recursive else folder.iterdir()
        files = sorted(p for p in found if p.is_file() and not p.name.startswith("."))
        dcm = [p for p in files if p.suffix.lower() == ".dcm"]
        files = dcm or files
        if not files:
            raise BundleInputError(f"{folder}: the {what} folder holds no files")
        return files
    files = [_checked_path(p, what) for p in source]
    if not files:
        raise BundleInputError(f"empty list of DICOM files: a {what} needs at least one file")
    return files


def _float_tag(ds: Dataset, name: str) -> float | None:
    value = getattr(ds, name, None)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def slice_header(ds: Dataset, path: str | os.PathLike) -> SliceHeader:
    """Check and extract the geometry of one image header; BundleInputError names the file and the tag."""
    for tag, number in _GEOMETRY_TAGS.items():
        if getattr(ds, tag, None) in (None, ""):
            raise BundleInputError(f"{path}: missing {tag} {number}, needed for the slice geometry")
    try:
        position = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
    except (TypeError, ValueError) as err:
        raise BundleInputError(f"{path}: non-numeric geometry tag ({err})") from err
    if position.shape != (3,):
        raise BundleInputError(f"{path}: ImagePositionPatient (0020,0032) needs 3 values, got {position.tolist()}")
    if orientation.shape != (6,):
        raise BundleInputError(
            f"{path}: ImageOrientationPatient (0020,0037) needs 6 values, got {orientation.tolist()}"
        )
    if len(spacing) != 2 or min(spacing) <= 0:
        raise BundleInputError(f"{path}: PixelSpacing (0028,0030) needs 2 positive values, got {list(spacing)}")
    try:
        slice_normal(orientation)
    except ValueError as err:
        raise BundleInputError(f"{path}: {err}") from err
    number = getattr(ds, "InstanceNumber", None)
    return SliceHeader(
        path=Path(path),
        series_uid=str(getattr(ds, "SeriesInstanceUID", "") or ""),
        study_uid=str(getattr(ds, "StudyInstanceUID", "") or ""),
        sop_uid=str(getattr(ds, "SOPInstanceUID", "") or ""),
        instance_number=int(number) if number not in (None, "") else -1,
        position=position,
        orientation=orientation,
        pixel_spacing=(spacing[0], spacing[1]),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        description=str(getattr(ds, "SeriesDescription", "") or ""),
        spacing_between_slices=_float_tag(ds, "SpacingBetweenSlices"),
        slice_thickness=_float_tag(ds, "SliceThickness"),
    )


def read_slice_headers(files: Sequence[str | os.PathLike]) -> list[SliceHeader]:
    """Read headers only (``stop_before_pixels``) and check each file's geometry tags."""
    out = []
    for f in files:
        ds = read_header(f)
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise BundleInputError(f"{f}: multi-frame image ({ds.NumberOfFrames} frames); one file per slice expected")
        out.append(slice_header(ds, f))
    return out


@dataclass(frozen=True)
class SortedSeries:
    """A checked series sorted along its slice normal (ascending ``position . normal``), one slice per position.

    ``grid`` places every slice on the series' regular grid of positions (``round((offset - offsets[0]) /
    slice_spacing)``, 0 .. G-1): ``0 .. S-1`` for a complete series, with holes where slices are missing.
    ``duplicates`` holds the instances dropped because another one lies at the same position.
    """

    slices: list[SliceHeader]
    normal: np.ndarray  # (3,) unit
    offsets: np.ndarray  # (S,) position . normal, mm, ascending
    slice_spacing: float  # mm
    grid: np.ndarray  # (S,) int grid positions, ascending, from 0
    duplicates: tuple[SliceHeader, ...] = ()

    @property
    def series_uid(self) -> str:
        return self.slices[0].series_uid

    def nearest_on_grid(self, position: int) -> int:
        """Index into ``slices`` of the slice nearest grid ``position`` (clipped to the grid; lower on ties)."""
        target = min(max(int(position), 0), int(self.grid[-1]))
        return int(np.argmin(np.abs(self.grid - target)))

    @property
    def middle(self) -> int:
        """Index of the middle slice: the one at grid position ``(G - 1) // 2`` (``(S - 1) // 2`` for a complete
        series), or the nearest one (the lower on ties) where that slice is missing."""
        return self.nearest_on_grid(int(self.grid[-1]) // 2)

    def slab(self, num_slices: int) -> list[int]:
        """Indices into ``slices`` of ``num_slices`` channels centred on :attr:`middle`'s grid position, one grid
        step (``slice_spacing``) apart: a missing position takes its nearest slice (the lower on ties), positions
        beyond the ends repeat the edge slice. For a complete series this is ``middle_indices(S, num_slices)``."""
        centre = int(self.grid[self.middle])
        start = centre - (int(num_slices) - 1) // 2
        return [self.nearest_on_grid(start + i) for i in range(int(num_slices))]


def _series_name(headers: Sequence[SliceHeader]) -> str:
    uid = headers[0].series_uid or "<no SeriesInstanceUID>"
    return f"series {uid} ({headers[0].path.parent})"


def sort_series(headers: Sequence[SliceHeader], *, require_sagittal: bool = True) -> SortedSeries:
    """Check that ``headers`` form one series of equal-shaped parallel slices and sort them spatially.

    Slices are ordered by the projection of ImagePositionPatient on the slice normal, never by
    InstanceNumber. Instances at the same position (a duplicated slice) are kept once, the lowest
    InstanceNumber; gaps wider than ``GAP_FACTOR`` spacings (missing slices) are allowed: the slices keep
    their grid positions (``SortedSeries.grid``). Both are logged once as warnings naming the series (gaps
    of sagittal series only: axial series come in per-level blocks).
    Slice spacing = median gap of the sorted projections; with one slice (or all at one position)
    SpacingBetweenSlices, then SliceThickness, then 1 mm.
    """
    if not headers:
        raise BundleInputError("no DICOM slices given")
    uids = sorted({h.series_uid for h in headers})
    if len(uids) > 1:
        raise BundleInputError(
            f"files of {len(uids)} series given where one is expected ({headers[0].path.parent}): "
            f"SeriesInstanceUID {uids}"
        )
    shapes = sorted({h.shape for h in headers})
    if len(shapes) > 1:
        raise BundleInputError(f"{_series_name(headers)} mixes image shapes (Rows, Columns) {shapes}")
    normal = headers[0].normal
    for h in headers[1:]:
        if abs(float(np.dot(h.normal, normal))) < 0.99:
            raise BundleInputError(
                f"{_series_name(headers)} mixes slice orientations: {h.path} has ImageOrientationPatient "
                f"{h.orientation.round(4).tolist()}, {headers[0].path} has {headers[0].orientation.round(4).tolist()}"
            )
    if require_sagittal and abs(float(normal[0])) <= SAGITTAL_THRESHOLD:
        raise BundleInputError(
            f"{_series_name(headers)} is not sagittal: it is {plane_name(normal)} "
            f"(ImageOrientationPatient {headers[0].orientation.round(4).tolist()}, "
            f"slice normal {normal.round(3).tolist()}, |normal . x| = {abs(normal[0]):.3f} <= {SAGITTAL_THRESHOLD})"
        )
    offsets = np.array([float(np.dot(h.position, normal)) for h in headers])
    order = np.argsort(offsets, kind="stable")
    ordered, offsets = [headers[i] for i in order], offsets[order]
    kept = _one_per_position(ordered, offsets)
    slices, offsets = [ordered[k] for k in kept], offsets[kept]
    dropped = set(range(len(ordered))) - set(kept)
    duplicates = [ordered[k] for k in sorted(dropped)]
    gaps = np.diff(offsets)
    spacing = float(np.median(gaps)) if gaps.size else 0.0
    if spacing <= 1e-6:
        first = slices[0]
        spacing = first.spacing_between_slices or first.slice_thickness or 1.0
    grid = np.rint((offsets - offsets[0]) / spacing).astype(np.int64)
    wide = np.flatnonzero(gaps > GAP_FACTOR * spacing)
    if wide.size and plane_name(normal) == "sagittal":  # axial series come in per-level blocks (bundle.io.axial)
        where = ", ".join(f"{offsets[i]:.2f}..{offsets[i + 1]:.2f} mm ({grid[i + 1] - grid[i] - 1})" for i in wide)
        _warn_once(
            f"{_series_name(slices)}: gap in the slice positions (missing slices) at {where} with spacing "
            f"{spacing:.3f} mm; the middle slice and slab follow the positions, not the slice count"
        )
    return SortedSeries(slices, normal, offsets, float(spacing), grid, tuple(duplicates))


def _warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time it occurs in this process (series are re-read every epoch)."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning("%s", message)


def _one_per_position(slices: list[SliceHeader], offsets: np.ndarray) -> list[int]:
    """Indices into ``slices`` (sorted by ``offsets``, mm) keeping one instance per position: of instances whose
    ImagePositionPatient lie within ``SAME_POSITION_MM``, the lowest InstanceNumber (absent last; then the file
    path) is kept, whatever the file order. One warning names the series, the kept and the dropped instances
    (the first five positions)."""
    kept: list[int] = []
    notes: list[str] = []
    i = 0
    while i < len(slices):
        j = i + 1
        while j < len(slices) and offsets[j] - offsets[i] < SAME_POSITION_MM:
            j += 1
        group = list(range(i, j))
        while group:  # instances at this offset that also share the in-plane position
            same = [
                k for k in group if np.linalg.norm(slices[k].position - slices[group[0]].position) < SAME_POSITION_MM
            ]
            group = [k for k in group if k not in same]
            same.sort(
                key=lambda k: (slices[k].instance_number < 0, slices[k].instance_number, os.fspath(slices[k].path))
            )
            kept.append(same[0])
            if len(same) > 1:
                first, names = slices[same[0]], ", ".join(
                    f"{slices[k].instance_number} ({slices[k].path.name})" for k in same[1:]
                )
                notes.append(f"kept instance {first.instance_number} ({first.path.name}), dropped {names}")
        i = j
    if notes:
        more = f"; and {len(notes) - 5} more positions" if len(notes) > 5 else ""
        _warn_once(
            f"{_series_name(slices)}: {len(notes)} position(s) hold several instances (duplicated slices); the "
            f"lowest InstanceNumber is kept: {'; '.join(notes[:5])}{more}"
        )
    return kept


def middle_indices(num_total: int, num_slices: int) -> list[int]:
    """Indices of the ``num_slices`` slices centred on ``(num_total - 1) // 2``, edge-repeated when short.

    Channel ``(num_slices - 1) // 2`` is the middle slice.

    Example:
        >>> middle_indices(3, 7)
        [0, 0, 0, 1, 2, 2, 2]
    """
    if num_total < 1 or num_slices < 1:
        raise ValueError(f"num_total and num_slices must be >= 1, got {num_total}, {num_slices}")
    centre = (num_total - 1) // 2
    start = centre - (num_slices - 1) // 2
    return [min(max(start + i, 0), num_total - 1) for i in range(num_slices)]


def series_affine(middle: SliceHeader, slice_spacing: float) -> np.ndarray:
    """4x4 float64 affine from voxel (row i, col j, k) to patient mm (LPS); k = 0 is ``middle``'s plane.

    Columns: ``PS[0] * IOP[3:6]``, ``PS[1] * IOP[0:3]``, ``normal * slice_spacing``, ``IPP``.
    """
    iop = middle.orientation
    affine = np.eye(4)
    affine[:3, 0] = middle.pixel_spacing[0] * iop[3:]
    affine[:3, 1] = middle.pixel_spacing[1] * iop[:3]
    affine[:3, 2] = middle.normal * float(slice_spacing)
    affine[:3, 3] = middle.position
    return affine
