"""OCPC codec geometry shared by target synthesis (``bundle.targets``) and decoding (``bundle.decoding``).

Conventions (one place, used by both sides):

- Pixel coordinates are pixel *centres*: image pixel ``(row i, col j)`` has centre ``(x=j, y=i)``.
- A target grid of stride ``s`` has shape ``(H // s, W // s)``; target pixel ``t`` covers image pixels
  ``[t*s, (t+1)*s)``, so image coordinate ``u`` is target coordinate ``(u + 0.5) / s - 0.5``
  (:func:`image_to_target`, inverse :func:`target_to_image`). This is also the geometry of
  ``F.interpolate(..., mode="bilinear", align_corners=False)`` between the two grids.
- Points in patient mm (DICOM LPS) map to voxel index ``(row, col, k)`` with the inverse of the image's
  4x4 affine; ``x = col``, ``y = row``; the out-of-plane index ``k`` is ignored (:func:`mm_to_pixels`),
  and pixels go back to mm on the plane ``k = 0`` (:func:`pixels_to_mm`).
- A disk of radius ``R`` (target pixels) around keypoint ``y_k`` holds the target pixels whose centre
  lies within ``||x_i - y_k|| <= R`` (paper eq. 1); where disks overlap, the nearest keypoint owns the
  pixel. Offsets (paper eq. 2) are ``y_k - x_i`` in target pixels, interleaved ``(dx_c, dy_c)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "image_to_target",
    "target_to_image",
    "target_shape",
    "inside_grid",
    "as_affine",
    "mm_to_pixels",
    "pixels_to_mm",
    "encode_ocpc",
]


def image_to_target(u, stride: float):
    """Image-grid coordinate (pixels) -> target-grid coordinate for a target grid of ``stride``."""
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    return (u + 0.5) / stride - 0.5


def target_to_image(t, stride: float):
    """Target-grid coordinate -> image-grid coordinate (pixels); inverse of :func:`image_to_target`."""
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    return (t + 0.5) * stride - 0.5


def target_shape(height: int, width: int, stride: int) -> tuple[int, int]:
    """Shape ``(H // stride, W // stride)`` of the target grid of an ``H x W`` image."""
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride}")
    ht, wt = int(height) // int(stride), int(width) // int(stride)
    if ht < 1 or wt < 1:
        raise ValueError(f"image {height}x{width} is smaller than one target pixel at stride {stride}")
    return ht, wt


def inside_grid(xy: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Boolean (N,): points ``xy`` (N, 2) (x=col, y=row) lying in a pixel of a grid of ``shape`` (rows, cols).

    Pixel ``t`` spans ``[t - 0.5, t + 0.5)``; NaN points are outside.
    """
    x, y = xy[:, 0], xy[:, 1]
    return (x >= -0.5) & (x < shape[1] - 0.5) & (y >= -0.5) & (y < shape[0] - 0.5)


def as_affine(affine, batch: int | None = None) -> torch.Tensor:
    """Validate a 4x4 (or (B, 4, 4)) affine and return it as a float64 tensor.

    With ``batch`` given, a single (4, 4) affine is broadcast to (batch, 4, 4).
    """
    a = torch.as_tensor(np.asarray(affine) if not isinstance(affine, torch.Tensor) else affine)
    a = a.detach().to(device="cpu", dtype=torch.float64)
    if a.shape[-2:] != (4, 4) or a.ndim not in (2, 3):
        raise ValueError(f"affine must be (4, 4) or (B, 4, 4) (voxel (row, col, k) -> mm), got {tuple(a.shape)}")
    if batch is not None:
        if a.ndim == 2:
            a = a.expand(batch, 4, 4)
        elif a.shape[0] != batch:
            raise ValueError(f"affine batch size {a.shape[0]} does not match the prediction batch size {batch}")
    return a


def mm_to_pixels(points_mm, affine) -> torch.Tensor:
    """Patient-mm points (N, 3) -> image-grid pixels (N, 2) as ``(x=col, y=row)``, float64; NaN stays NaN.

    Example:
        >>> a = torch.eye(4, dtype=torch.float64); a[0, 0] = 2.0  # rows 2 mm apart along patient x
        >>> mm_to_pixels(torch.tensor([[4.0, 3.0, 0.0]]), a).tolist()
        [[3.0, 2.0]]
    """
    p = torch.as_tensor(points_mm, dtype=torch.float64).reshape(-1, 3)
    inv = torch.linalg.inv(as_affine(affine))
    ijk = p @ inv[:3, :3].T + inv[:3, 3]
    return torch.stack([ijk[:, 1], ijk[:, 0]], dim=1)


def pixels_to_mm(xy, affine) -> torch.Tensor:
    """Image-grid pixels (N, 2) ``(x=col, y=row)`` -> patient mm (N, 3) on the plane ``k = 0``, float64."""
    q = torch.as_tensor(xy, dtype=torch.float64).reshape(-1, 2)
    a = as_affine(affine)
    return q[:, 1:2] * a[:3, 0] + q[:, 0:1] * a[:3, 1] + a[:3, 3]


def encode_ocpc(
    points: torch.Tensor, labels: torch.Tensor, num_classes: int, shape: Sequence[int], radius: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the OCPC heatmap, offsets and offset mask on a target grid.

    Args:
        points: (L, 2) keypoints ``(x=col, y=row)`` in target-grid pixels; NaN = missing.
        labels: (L,) class index per keypoint; -1 = unknown class (not drawn).
        num_classes: C.
        shape: target grid ``(Ht, Wt)``.
        radius: disk radius R in target pixels (a pixel belongs to a disk when its centre is at distance <= R).

    Returns:
        heatmap (C, Ht, Wt), offset (2C, Ht, Wt) interleaved ``(dx_c, dy_c)`` = keypoint minus pixel centre
        in target pixels, offset mask (2C, Ht, Wt); all float32. Keypoints outside the grid, missing or of
        unknown class are not drawn; each pixel belongs to at most one keypoint, the nearest.

    Example:
        >>> h, o, m = encode_ocpc(torch.tensor([[2.0, 1.0]]), torch.tensor([1]), 2, (3, 5), radius=1.0)
        >>> h[1].int().tolist()
        [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]
    """
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    pts = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)
    lab = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if lab.numel() != pts.shape[0]:
        raise ValueError(f"got {pts.shape[0]} points but {lab.numel()} labels")
    if ((lab < -1) | (lab >= num_classes)).any():
        raise ValueError(f"labels must be -1 or in [0, {num_classes}), got {lab.tolist()}")
    ht, wt = int(shape[0]), int(shape[1])
    heatmap = torch.zeros(num_classes, ht, wt, dtype=torch.float32)
    offset = torch.zeros(2 * num_classes, ht, wt, dtype=torch.float32)
    mask = torch.zeros(2 * num_classes, ht, wt, dtype=torch.float32)
    keep = inside_grid(pts, (ht, wt)) & (lab >= 0)
    if not keep.any():
        return heatmap, offset, mask
    pts, lab = pts[keep], lab[keep]
    rows = torch.arange(ht, dtype=torch.float64).view(1, ht, 1)
    cols = torch.arange(wt, dtype=torch.float64).view(1, 1, wt)
    dx = pts[:, 0].view(-1, 1, 1) - cols  # (K, 1, Wt)
    dy = pts[:, 1].view(-1, 1, 1) - rows  # (K, Ht, 1)
    dist2 = dx * dx + dy * dy  # (K, Ht, Wt); K <= a dozen keypoints, so this stays small
    best, owner = dist2.min(dim=0)  # nearest keypoint wins; ties go to the first keypoint
    inside = best <= radius * radius
    r_idx, c_idx = inside.nonzero(as_tuple=True)
    k = owner[r_idx, c_idx]
    cls = lab[k]
    heatmap[cls, r_idx, c_idx] = 1.0
    offset[2 * cls, r_idx, c_idx] = (pts[k, 0] - c_idx.to(torch.float64)).float()
    offset[2 * cls + 1, r_idx, c_idx] = (pts[k, 1] - r_idx.to(torch.float64)).float()
    mask[2 * cls, r_idx, c_idx] = 1.0
    mask[2 * cls + 1, r_idx, c_idx] = 1.0
    return heatmap, offset, mask
