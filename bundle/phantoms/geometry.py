"""Series geometry of phantom DICOM series: orientation, positions, pixel grid (patient mm, DICOM LPS)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from bundle.phantoms.anatomy import Spine

__all__ = ["SeriesGeometry", "sample_sagittal", "sample_axial"]

_MARGIN = 15.0  # mm kept between any keypoint and the image border


@dataclass(frozen=True, eq=False)
class SeriesGeometry:
    """Geometry of one series; slices are stored in spatial order along ``normal``.

    ``pixel_spacing`` is DICOM PixelSpacing (row spacing, column spacing) in mm; ``orientation`` is DICOM
    ImageOrientationPatient (direction of increasing column index, then of increasing row index);
    ``positions`` (S, 3) the ImagePositionPatient of each slice (centre of pixel (row 0, col 0)).
    Values are rounded to what the DICOM files store, so the files reproduce this geometry exactly.
    """

    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    orientation: tuple[float, ...]
    positions: np.ndarray
    slice_thickness: float
    slice_spacing: float | None  # None when slices are not evenly spaced (axial blocks)

    @property
    def col_dir(self) -> np.ndarray:
        return np.asarray(self.orientation[:3], float)

    @property
    def row_dir(self) -> np.ndarray:
        return np.asarray(self.orientation[3:], float)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.col_dir, self.row_dir)

    @property
    def num_slices(self) -> int:
        return int(self.positions.shape[0])

    def grid(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient-mm coordinates (x, y, z), each (rows, cols) float64, of slice ``k``'s pixel centres."""
        j = np.arange(self.cols) * self.pixel_spacing[1]
        i = np.arange(self.rows) * self.pixel_spacing[0]
        out = []
        for a in range(3):
            row_part = i * self.row_dir[a]
            col_part = self.positions[k, a] + j * self.col_dir[a]
            out.append(row_part[:, None] + col_part[None, :])
        return out[0], out[1], out[2]

    def to_pixel(self, point: Sequence[float], k: int) -> tuple[float, float, float]:
        """Project a patient-mm point onto slice ``k``: (x = column, y = row, signed distance to the plane in mm)."""
        d = np.asarray(point, float) - self.positions[k]
        return (
            float(d @ self.col_dir / self.pixel_spacing[1]),
            float(d @ self.row_dir / self.pixel_spacing[0]),
            float(d @ self.normal),
        )

    def to_mm(self, x: float, y: float, k: int) -> np.ndarray:
        """Patient-mm point (3,) of pixel (x = column, y = row) on slice ``k``."""
        return self.positions[k] + x * self.pixel_spacing[1] * self.col_dir + y * self.pixel_spacing[0] * self.row_dir

    def nearest_slice(self, point: Sequence[float]) -> int:
        """Index of the slice whose plane is closest to ``point``."""
        d = (np.asarray(point, float) - self.positions) @ self.normal
        return int(np.argmin(np.abs(d)))


def _rotation(yaw: float, roll: float, spin: float) -> np.ndarray:
    """Rotation matrix: ``spin`` about x, then ``roll`` about y, then ``yaw`` about z (radians)."""
    cz, sz, cy, sy, cx, sx = np.cos(yaw), np.sin(yaw), np.cos(roll), np.sin(roll), np.cos(spin), np.sin(spin)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


def _sizes(rng: np.random.Generator, min_size: int, max_size: int, min_rows: int) -> tuple[int, int]:
    rows = int(rng.integers(min(max(min_size, min_rows), max_size), max_size + 1))
    cols = rows
    if rng.random() < 0.5:  # not always square
        cols = int(np.clip(round(rows * rng.uniform(0.75, 1.0)), min_size, max_size))
    return rows, cols


def _finish(rows, cols, ps, col_dir, row_dir, centres, thickness, spacing) -> SeriesGeometry:
    col_dir = np.round(col_dir, 6)
    row_dir = np.round(row_dir, 6)
    ps = round(float(ps), 6)
    ipp = centres - 0.5 * (cols - 1) * ps * col_dir - 0.5 * (rows - 1) * ps * row_dir
    return SeriesGeometry(
        rows=rows,
        cols=cols,
        pixel_spacing=(ps, ps),
        orientation=tuple(float(v) for v in np.concatenate([col_dir, row_dir])),
        positions=np.round(ipp, 4),
        slice_thickness=round(float(thickness), 3),
        slice_spacing=None if spacing is None else round(float(spacing), 3),
    )


def sample_sagittal(
    rng: np.random.Generator, spine: Spine, points: np.ndarray, min_size: int, max_size: int
) -> SeriesGeometry:
    """Random sagittal series around ``spine`` keeping ``points`` (N, 3) inside the field of view.

    Column direction ~ +y (posterior), row direction ~ -z (feet), obliquity up to ~8 degrees; 11-17
    slices 3.5-5 mm apart; the slice at index ``(S - 1) // 2`` is the one closest to the mid-sagittal plane.
    """
    rot = _rotation(np.deg2rad(rng.uniform(-5, 5)), np.deg2rad(rng.uniform(-2.5, 2.5)), np.deg2rad(rng.uniform(-6, 6)))
    col_dir, row_dir = rot @ np.array([0.0, 1.0, 0.0]), rot @ np.array([0.0, 0.0, -1.0])
    base = np.array([spine.x_mid, *points[:, 1:].mean(axis=0)])
    pc, pr = (points - base) @ col_dir, (points - base) @ row_dir
    need_r = pr.max() - pr.min() + 2 * _MARGIN
    rows, cols = _sizes(rng, min_size, max_size, int(np.ceil(need_r / 0.9)))
    lo = max(0.4, need_r / rows)
    ps = rng.uniform(lo, max(lo, min(0.9, 320.0 / rows)))
    fov_r, fov_c = rows * ps, cols * ps
    # random placement of the field-of-view centre that keeps the keypoints inside
    off = []
    for p, fov, jitter in ((pc, fov_c, 0.3), (pr, fov_r, 0.5)):
        a, b = p.max() - (0.5 * fov - _MARGIN), p.min() + (0.5 * fov - _MARGIN)
        mid = 0.5 * (p.max() + p.min())
        a, b = max(a, mid - jitter * 0.5 * fov), min(b, mid + jitter * 0.5 * fov)
        off.append(rng.uniform(a, b) if a < b else mid)
    spacing = rng.uniform(3.5, 5.0)
    thickness = rng.uniform(3.5, spacing)
    n = int(rng.integers(11, 18))
    m = (n - 1) // 2
    normal = np.cross(col_dir, row_dir)
    delta = rng.uniform(-0.3, 0.3) * spacing
    centre = base + off[0] * col_dir + off[1] * row_dir
    centres = centre[None] + ((np.arange(n) - m) * spacing + delta)[:, None] * normal[None]
    return _finish(rows, cols, ps, col_dir, row_dir, centres, thickness, spacing)


def sample_axial(
    rng: np.random.Generator, spine: Spine, disc_points: np.ndarray, min_size: int, max_size: int
) -> SeriesGeometry:
    """Axial series (IOP [1,0,0, 0,1,0]): three slices 4 mm apart through each disc centre in ``disc_points``."""
    rows = int(rng.integers(min_size, max_size + 1))
    cols = rows
    fov = rng.uniform(160.0, 220.0)
    ps = float(np.clip(fov / rows, 0.4, 0.9)) if rows >= 180 else fov / rows  # small test images keep the FOV
    gap = rng.uniform(3.5, 4.5)
    zs = np.sort(np.concatenate([p[2] + gap * np.array([-1.0, 0.0, 1.0]) for p in disc_points]))
    y_c = float(np.mean(disc_points[:, 1])) + rng.uniform(10.0, 25.0)  # centre a little posterior (canal)
    centres = np.stack([np.full_like(zs, spine.x_mid + rng.uniform(-5, 5)), np.full_like(zs, y_c), zs], axis=1)
    return _finish(rows, cols, ps, np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), centres, gap, None)
