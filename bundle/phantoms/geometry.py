"""Series geometry of phantom DICOM series: orientation, positions, pixel grid (patient mm, DICOM LPS)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from bundle.phantoms.anatomy import Spine

__all__ = ["SeriesGeometry", "sample_sagittal", "sample_axial", "sample_axial_stack", "sample_axial_blocks"]

_MARGIN = 15.0  # mm kept between any keypoint and the image border


@dataclass(frozen=True, eq=False)
class SeriesGeometry:
    """Geometry of one series; slices are stored in spatial order along ``normal``.

    ``pixel_spacing`` is DICOM PixelSpacing (row spacing, column spacing) in mm; ``orientation`` is DICOM
    ImageOrientationPatient (direction of increasing column index, then of increasing row index);
    ``positions`` (S, 3) the ImagePositionPatient of each slice (centre of pixel (row 0, col 0)).
    Values are rounded to what the DICOM files store, so the files reproduce this geometry exactly.
    ``orientations`` (S, 6), when given, holds a per-slice ImageOrientationPatient (axial series made of
    per-level blocks, each tilted along its disc); ``orientation`` is then the first slice's.
    """

    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    orientation: tuple[float, ...]
    positions: np.ndarray
    slice_thickness: float
    slice_spacing: float | None  # None when slices are not evenly spaced (axial blocks)
    orientations: np.ndarray | None = None

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

    def slice_orientation(self, k: int) -> tuple[float, ...]:
        """ImageOrientationPatient (6 values) of slice ``k``."""
        return self.orientation if self.orientations is None else tuple(float(v) for v in self.orientations[k])

    def dirs(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Column direction, row direction and normal (each (3,)) of slice ``k``."""
        if self.orientations is None:
            return self.col_dir, self.row_dir, self.normal
        c, r = np.asarray(self.orientations[k, :3], float), np.asarray(self.orientations[k, 3:], float)
        return c, r, np.cross(c, r)

    def grid(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient-mm coordinates (x, y, z), each (rows, cols) float64, of slice ``k``'s pixel centres."""
        j = np.arange(self.cols) * self.pixel_spacing[1]
        i = np.arange(self.rows) * self.pixel_spacing[0]
        col_dir, row_dir, _ = self.dirs(k)
        out = []
        for a in range(3):
            row_part = i * row_dir[a]
            col_part = self.positions[k, a] + j * col_dir[a]
            out.append(row_part[:, None] + col_part[None, :])
        return out[0], out[1], out[2]

    def to_pixel(self, point: Sequence[float], k: int) -> tuple[float, float, float]:
        """Project a patient-mm point onto slice ``k``: (x = column, y = row, signed distance to the plane in mm)."""
        d = np.asarray(point, float) - self.positions[k]
        col_dir, row_dir, normal = self.dirs(k)
        return (
            float(d @ col_dir / self.pixel_spacing[1]),
            float(d @ row_dir / self.pixel_spacing[0]),
            float(d @ normal),
        )

    def to_mm(self, x: float, y: float, k: int) -> np.ndarray:
        """Patient-mm point (3,) of pixel (x = column, y = row) on slice ``k``."""
        col_dir, row_dir, _ = self.dirs(k)
        return self.positions[k] + x * self.pixel_spacing[1] * col_dir + y * self.pixel_spacing[0] * row_dir

    def nearest_slice(self, point: Sequence[float]) -> int:
        """Index of the slice whose plane is closest to ``point``."""
        if self.orientations is None:
            d = (np.asarray(point, float) - self.positions) @ self.normal
        else:
            d = np.array([self.to_pixel(point, k)[2] for k in range(self.num_slices)])
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


def _axial_dirs(normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axial in-plane directions for a slice normal close to +z: columns towards patient left (+x), rows posterior."""
    row = np.cross(normal, np.array([1.0, 0.0, 0.0]))
    return np.array([1.0, 0.0, 0.0]), row / np.linalg.norm(row)


def _axial_grid(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, float]:
    """Rows (= columns) and pixel spacing of an axial series: sizes in the lower half of the range, 160-220 mm FOV."""
    rows = int(rng.integers(min_size, max(min_size, (min_size + max_size) // 2) + 1))
    fov = rng.uniform(160.0, 220.0)
    return rows, float(np.clip(fov / rows, 0.4, 0.9)) if rows >= 180 else fov / rows


def _tilt(normal: np.ndarray, degrees: float) -> np.ndarray:
    """``normal`` rotated about the x axis by ``degrees``."""
    a = np.deg2rad(degrees)
    y, z = normal[1], normal[2]
    return np.array([normal[0], np.cos(a) * y - np.sin(a) * z, np.sin(a) * y + np.cos(a) * z])


def sample_axial_stack(
    rng: np.random.Generator, spine: Spine, disc_s: np.ndarray, min_size: int, max_size: int
) -> SeriesGeometry:
    """One axial stack of parallel slices, 5-6.5 mm apart, through every disc at arc lengths ``disc_s`` (mm).

    The slice normal is the mean of the discs' normals (spine tangents); slices run feet to head.
    """
    rows, ps = _axial_grid(rng, min_size, max_size)
    points = np.array([spine.point(s) for s in disc_s])
    normal = np.sum([spine.tangent(s) for s in disc_s], axis=0)
    normal /= np.linalg.norm(normal)
    col, row = _axial_dirs(normal)
    gap = rng.uniform(5.0, 6.5)
    t = points @ normal
    offsets = np.arange(t.min() - gap, t.max() + 1.5 * gap, gap)
    base = points.mean(axis=0) - (points.mean(axis=0) @ normal) * normal
    base = base + rng.uniform(10.0, 25.0) * row  # a little posterior (canal)
    base[0] = spine.x_mid + rng.uniform(-5.0, 5.0)
    centres = base[None] + offsets[:, None] * normal[None]
    return _finish(rows, rows, ps, col, row, centres, rng.uniform(3.5, gap), gap)


def sample_axial_blocks(
    rng: np.random.Generator, spine: Spine, disc_s: np.ndarray, min_size: int, max_size: int
) -> SeriesGeometry:
    """Axial series of per-level blocks: 3-4 slices 3.5-4.5 mm apart around each disc, tilted along that disc.

    Each block's normal is the spine tangent at the disc (+-4 degrees); ``orientations`` holds each slice's
    ImageOrientationPatient; slices run feet to head (blocks in order of their height).
    """
    rows, ps = _axial_grid(rng, min_size, max_size)
    gap = rng.uniform(3.5, 4.5)
    x_c, y_off = spine.x_mid + rng.uniform(-5.0, 5.0), rng.uniform(10.0, 25.0)
    centres, dirs = [], []
    for s in sorted(disc_s, reverse=True):  # lowest disc first
        normal = _tilt(spine.tangent(s), rng.uniform(-4.0, 4.0))
        col, row = _axial_dirs(normal)
        n = int(rng.integers(3, 5))
        base = spine.point(s) + y_off * row + rng.uniform(-1.0, 1.0) * normal
        base[0] = x_c
        for t in (np.arange(n) - 0.5 * (n - 1)) * gap:
            centres.append(base + t * normal)
            dirs.append((np.round(col, 6), np.round(row, 6)))
    ps = round(float(ps), 6)
    half = 0.5 * (rows - 1) * ps
    ipp = np.array([c - half * cd - half * rd for c, (cd, rd) in zip(centres, dirs)])
    orientations = np.array([np.concatenate(d) for d in dirs])
    return SeriesGeometry(
        rows=rows,
        cols=rows,
        pixel_spacing=(ps, ps),
        orientation=tuple(float(v) for v in orientations[0]),
        positions=np.round(ipp, 4),
        slice_thickness=round(float(gap), 3),
        slice_spacing=None,
        orientations=orientations,
    )
