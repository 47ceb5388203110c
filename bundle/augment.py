"""Training augmentation of the field of view: how far a sagittal scan reaches above and below the lumbar spine.

A lumbar MRI's field of view starts anywhere from the lower thoracic spine to just above L1 and ends below the
sacral promontory. A level map trained on phantoms whose field of view varies little learns to count discs from
the image's edges: on held-out studies whose spine sat high or low in the field of view, it read every disc about
half a level off and whole spines were named one level off (docs/README.md, The CPU demo). MONAI has no
transform that cuts an image relative to keypoints, hence this one.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from bundle.codec import mm_to_pixels
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform

__all__ = ["RandFieldOfViewd"]


class RandFieldOfViewd(RandomizableTransform, MapTransform):
    """Blank the image rows above a random row over the first keypoint and below a random row under the last.

    With probability ``prob`` the rows (the image's first spatial axis, head to feet) above ``top`` and from
    ``bottom`` on are set to the image's minimum (what lies outside a field of view after intensity scaling),
    ``top`` uniform in ``[0, first - above_mm]`` and ``bottom`` uniform in ``[last + below_mm, rows]`` (pixels,
    through the image's affine), where ``first`` / ``last`` are the highest and lowest keypoint rows of all
    ``points_keys``. Each end is drawn independently (``prob`` each); an item without keypoints is left alone.
    The keypoints stay in patient mm, so the targets are unchanged.

    Args:
        keys: the image key (a channel-first MetaTensor (C, rows, cols) with its affine).
        points_keys: keypoint arrays (L, 3) in patient mm, NaN rows missing (``KeypointsToArraysd``'s output).
        above_mm: image kept above the first keypoint (the disc above L1/L2 may go: a field of view "cut just
            above L1").
        below_mm: image kept below the last keypoint (the sacrum's first segment stays in view).
        prob: probability of cutting each end.

    Example:
        >>> from monai.data import MetaTensor
        >>> image = MetaTensor(torch.linspace(1, 2, 40).view(1, 40, 1).repeat(1, 1, 8))  # mm = (row, col, slice)
        >>> fov = RandFieldOfViewd("image", ["disc_points"], above_mm=5.0, below_mm=5.0, prob=1.0)
        >>> fov.set_random_state(0)  # doctest: +ELLIPSIS
        <...RandFieldOfViewd object at ...>
        >>> out = fov({"image": image, "disc_points": torch.tensor([[15.0, 4.0, 0.0], [25.0, 4.0, 0.0]])})
        >>> kept = (out["image"][0, :, 0] > 1).nonzero()[:, 0]  # rows not set to the minimum, 1
        >>> kept.min().item(), kept.max().item()  # cut above row 6 (of 0..10) and below row 35 (of 30..39)
        (6, 35)
    """

    def __init__(
        self,
        keys: KeysCollection,
        points_keys: Sequence[str],
        above_mm: float = 10.0,
        below_mm: float = 40.0,
        prob: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if isinstance(points_keys, str):
            points_keys = [points_keys]
        if not points_keys:
            raise ValueError("points_keys must name at least one keypoint array")
        if above_mm < 0 or below_mm < 0:
            raise ValueError(f"above_mm and below_mm must be >= 0, got {above_mm} and {below_mm}")
        self.points_keys = list(points_keys)
        self.above_mm, self.below_mm = float(above_mm), float(below_mm)

    def _extent(self, data: Mapping[Hashable, object], image: MetaTensor) -> tuple[float, float, float] | None:
        """(first row, last row, mm per row) of the keypoints in ``image``'s grid, or None without keypoints."""
        points = [torch.as_tensor(data[k], dtype=torch.float64).reshape(-1, 3) for k in self.points_keys if k in data]
        if not points:
            return None
        rows = mm_to_pixels(torch.cat(points), image.affine)[:, 1]
        rows = rows[torch.isfinite(rows)]
        if rows.numel() == 0:
            return None
        mm_per_row = float(torch.linalg.norm(torch.as_tensor(image.affine, dtype=torch.float64)[:3, 0]))
        return float(rows.min()), float(rows.max()), mm_per_row

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, MetaTensor):
                raise TypeError(f"RandFieldOfViewd needs data[{key!r}] as a MetaTensor (its affine), got {type(image)}")
            extent = self._extent(d, image)
            cut_top, cut_bottom = self.R.rand() < self.prob, self.R.rand() < self.prob
            if extent is None or not (cut_top or cut_bottom):
                continue
            first, last, mm = extent
            n = image.shape[1]
            top = int(self.R.uniform(0, max(first - self.above_mm / mm, 0))) if cut_top else 0
            bottom = int(np.ceil(self.R.uniform(min(last + self.below_mm / mm, n), n))) if cut_bottom else n
            out = image.clone()
            out[:, : max(top, 0)] = image.min()
            out[:, min(max(bottom, 0), n) :] = image.min()
            d[key] = out
        return d
