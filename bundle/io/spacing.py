"""In-plane resampling of a 2D sagittal MetaTensor whose 4x4 affine maps to patient (LPS) mm.

Why not ``monai.transforms.Spacingd`` directly: for a 2D image MONAI's ``Spacing`` reduces the 4x4
affine to its top-left 2x2 block (world x, y rows), which for a sagittal plane (in-plane directions
along y and z) is singular, so ``Spacingd`` fails (or, for a slightly oblique plane, computes a wildly
wrong zoom). Here MONAI's ``Spacing`` runs on a temporary in-plane affine ``diag(row mm, col mm)``
and the voxel-space change it makes is composed onto the full affine: ``A_new = A @ P^-1 @ P_new``.
Flip, zoom, crop, pad and resize transforms already update the full affine correctly (they
right-multiply voxel-space matrices) and need no wrapper.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Spacing, Transform

__all__ = ["InPlaneSpacing", "InPlaneSpacingd"]


class InPlaneSpacing(Transform):
    """Resample a (C, H, W) MetaTensor to in-plane spacing ``pixdim = (row mm, col mm)``.

    The output's 4x4 affine keeps mapping (row, col, k) to the same patient mm. Output size follows
    MONAI's pixel-centre extent rule (31 x 0.875 mm -> 63 pixels of 0.4375 mm). Not invertible. ``dtype`` is
    the resampling's compute type: float64 (MONAI's default; the training configs keep it, so a trained demo
    reproduces) or float32 (configs/inference.json: about 0.4 of the float64 time on a 7 x 436 x 436 image,
    values within 1e-4 of the float64 result's range).

    Example:
        >>> import numpy as np, torch
        >>> affine = np.eye(4); affine[:3, 0] = [0, 0, -0.875]; affine[:3, 1] = [0, 0.875, 0]; affine[:3, 2] = [4, 0, 0]
        >>> img = MetaTensor(torch.zeros(7, 32, 32), affine=torch.as_tensor(affine))
        >>> InPlaneSpacing((0.4375, 0.4375))(img).shape
        torch.Size([7, 63, 63])
    """

    def __init__(
        self,
        pixdim: Sequence[float] | float = (0.4375, 0.4375),
        mode: str = "bilinear",
        padding_mode: str = "border",
        align_corners: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        pix = np.atleast_1d(np.asarray(pixdim, dtype=np.float64))
        if pix.size == 1:
            pix = np.repeat(pix, 2)
        if pix.shape != (2,) or np.any(pix <= 0):
            raise ValueError(f"pixdim must be one or two positive values (row mm, col mm), got {pixdim}")
        self.pixdim = pix
        self._spacing = Spacing(
            pixdim=tuple(pix),
            mode=mode,
            padding_mode=padding_mode,
            align_corners=align_corners,
            recompute_affine=False,
            dtype=dtype,
        )

    def __call__(self, img: torch.Tensor) -> MetaTensor:
        if not isinstance(img, MetaTensor) or img.ndim != 3:
            raise ValueError(f"expected a (C, H, W) MetaTensor, got {type(img).__name__} of shape {tuple(img.shape)}")
        full = np.asarray(img.affine, dtype=np.float64)
        if full.shape != (4, 4):
            raise ValueError(f"expected a 4x4 affine, got shape {full.shape}")
        plane = np.diag([*np.linalg.norm(full[:3, :2], axis=0), 1.0, 1.0])
        meta = {k: v for k, v in img.meta.items() if k != "affine"}
        work = MetaTensor(img.as_tensor(), affine=torch.as_tensor(plane), meta=meta)
        out = self._spacing(work)
        new_plane = np.asarray(out.affine, dtype=np.float64)
        out.affine = torch.as_tensor(full @ np.linalg.inv(plane) @ new_plane, dtype=torch.float64)
        out.applied_operations = list(img.applied_operations)  # the temporary affine's record is dropped
        return out


class InPlaneSpacingd(MapTransform):
    """Dictionary wrapper of :class:`InPlaneSpacing` (drop-in for ``Spacingd`` on sagittal images)."""

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float] | float = (0.4375, 0.4375),
        mode: str = "bilinear",
        padding_mode: str = "border",
        align_corners: bool = False,
        dtype: torch.dtype = torch.float64,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = InPlaneSpacing(pixdim, mode, padding_mode, align_corners, dtype)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
