"""MONAI dictionary transforms that turn datalist keypoints into OCPC training targets.

Pipeline order: ``KeypointsToArraysd`` early (nested JSON keypoints -> fixed-size arrays that collate),
spatial transforms on the image only (keypoints stay in patient mm), then ``OCPCTargetsd`` last, which maps
the mm points with the image's *final* affine. Geometry lives in :mod:`bundle.codec`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from bundle.codec import encode_ocpc, image_to_target, inside_grid, mm_to_pixels, target_shape
from bundle.errors import BundleInputError
from bundle.streams import StreamSpec, parse_streams
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["KeypointsToArraysd", "OCPCTargetsd"]


def _item_name(data: Mapping) -> str:
    parts = [f"{k}={data[k]}" for k in ("study_id", "series_id") if k in data]
    return f" (item {', '.join(parts)})" if parts else ""


class KeypointsToArraysd(MapTransform):
    """Convert the datalist's nested ``keypoints`` into per-stream arrays.

    Reads ``data[key] = {stream: {"mm": [[x, y, z] | None] * L, "label": [int] * L}}`` and writes
    ``data[f"{stream}_points"]`` (L, 3) float64 tensor in patient mm (NaN rows for missing levels) and
    ``data[f"{stream}_labels"]`` (L,) int64 tensor (-1 = unknown class); the nested key is removed.
    A stream absent from the item is an error unless ``allow_missing_keys``, then it is all-missing.

    Example:
        >>> t = KeypointsToArraysd(streams={"disc": {"levels": ["a", "b"], "classes": ["n", "d"]}})
        >>> out = t({"keypoints": {"disc": {"mm": [[1, 2, 3], None], "label": [1, -1]}}})
        >>> out["disc_points"].shape, out["disc_labels"].tolist()
        (torch.Size([2, 3]), [1, -1])
    """

    def __init__(
        self,
        keys: KeysCollection = "keypoints",
        streams: Mapping[str, Mapping] | Sequence[StreamSpec] = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.streams = parse_streams(streams)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            nested = d.pop(key)
            if not isinstance(nested, Mapping):
                raise BundleInputError(f"{key!r} must be a mapping {{stream: {{mm, label}}}}{_item_name(d)}")
            for spec in self.streams:
                d[f"{spec.name}_points"], d[f"{spec.name}_labels"] = self._stream_arrays(nested, spec, d)
        return d

    def _stream_arrays(self, nested: Mapping, spec: StreamSpec, d: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        n = spec.num_levels
        points = torch.full((n, 3), float("nan"), dtype=torch.float64)
        labels = torch.full((n,), -1, dtype=torch.int64)
        where = f"stream {spec.name!r}{_item_name(d)}"
        if spec.name not in nested:
            if self.allow_missing_keys:
                return points, labels
            raise BundleInputError(f"{where}: no keypoints for this stream (streams given: {sorted(nested)})")
        entry = nested[spec.name]
        if not isinstance(entry, Mapping) or "mm" not in entry or "label" not in entry:
            raise BundleInputError(f"{where}: keypoints need 'mm' and 'label' lists")
        mm, lab = entry["mm"], entry["label"]
        if len(mm) != n or len(lab) != n:
            raise BundleInputError(
                f"{where}: expected {n} levels {list(spec.levels)}, got {len(mm)} 'mm' and {len(lab)} 'label' entries"
            )
        for i, (p, c) in enumerate(zip(mm, lab)):
            if p is not None:
                if len(p) != 3:
                    raise BundleInputError(f"{where}, level {spec.levels[i]!r}: mm must be [x, y, z], got {p}")
                points[i] = torch.tensor([float(v) for v in p], dtype=torch.float64)
            c = -1 if c is None else int(c)
            if not -1 <= c < spec.num_classes:
                raise BundleInputError(
                    f"{where}, level {spec.levels[i]!r}: label {c} not in -1..{spec.num_classes - 1} "
                    f"{list(spec.classes)}"
                )
            labels[i] = c
        return points, labels


class OCPCTargetsd(MapTransform):
    """Synthesise OCPC heatmaps and short-range offsets (paper eq. 1, 2) for every stream.

    Inputs: ``data[image_key]`` a MetaTensor (C_img, H, W) whose 4x4 ``affine`` maps voxel (row, col, k) to
    patient mm; ``data[f"{s}_points"]`` (L, 3) mm (NaN = missing) and ``data[f"{s}_labels"]`` (L,) (-1 = unknown).
    Outputs per stream ``s`` with C classes, on the target grid (Ht, Wt) = (H // stride, W // stride), as plain
    float32 torch tensors:

    - ``{s}_heatmap`` (C, Ht, Wt): 1 on the disk of radius ``radius`` target pixels around each keypoint, in
      channel = its label; keypoints missing, outside the target grid or of label -1 are not drawn; where
      disks overlap the nearest keypoint wins.
    - ``{s}_offset`` (2C, Ht, Wt): interleaved (dx, dy) = keypoint minus pixel centre, in target pixels.
    - ``{s}_offset_mask`` (2C, Ht, Wt): 1 on the disk pixels of each class, on its dx and dy channels.
    - ``{s}_points_px`` (L, 2): keypoints ``(x=col, y=row)`` on the image grid; NaN where missing or outside.

    Example:
        >>> img = MetaTensor(torch.zeros(1, 8, 8), affine=torch.eye(4, dtype=torch.float64))
        >>> t = OCPCTargetsd(streams={"disc": {"levels": ["a"], "classes": ["n", "d"]}}, radius=1.0)
        >>> out = t({"image": img, "disc_points": torch.tensor([[3.0, 4.0, 0.0]]), "disc_labels": torch.tensor([1])})
        >>> int(out["disc_heatmap"][1].sum()), out["disc_points_px"].tolist()
        (5, [[4.0, 3.0]])
    """

    def __init__(
        self,
        image_key: str = "image",
        streams: Mapping[str, Mapping] | Sequence[StreamSpec] = (),
        radius: float = 6.0,
        stride: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(image_key, allow_missing_keys)
        if not math.isfinite(radius) or radius <= 0:
            raise ValueError(f"radius must be a positive number of target pixels, got {radius}")
        target_shape(stride, stride, stride)  # validates stride
        self.image_key = image_key
        self.streams = parse_streams(streams)
        self.radius = float(radius)
        self.stride = int(stride)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, MetaTensor):
                raise ValueError(f"{key!r} must be a MetaTensor (C, H, W) carrying its affine, got {type(image)}")
            if image.ndim != 3:
                raise ValueError(f"{key!r} must be (C, H, W), got shape {tuple(image.shape)}")
            affine = image.affine
            if tuple(affine.shape) != (4, 4):
                raise ValueError(
                    f"{key!r} must carry a 4x4 affine (voxel (row, col, k) -> mm), got {tuple(affine.shape)}"
                )
            height, width = int(image.shape[-2]), int(image.shape[-1])
            grid = target_shape(height, width, self.stride)
            for spec in self.streams:
                pkey, lkey = f"{spec.name}_points", f"{spec.name}_labels"
                if pkey not in d or lkey not in d:
                    if self.allow_missing_keys:
                        continue
                    raise KeyError(f"stream {spec.name!r}: {pkey!r} and {lkey!r} are needed (run KeypointsToArraysd)")
                self._encode_stream(d, spec, affine, (height, width), grid)
        return d

    def _encode_stream(self, d: dict, spec: StreamSpec, affine, image_hw, grid) -> None:
        mm = torch.as_tensor(np.asarray(d[f"{spec.name}_points"], dtype=np.float64)).reshape(-1, 3)
        labels = torch.as_tensor(np.asarray(d[f"{spec.name}_labels"], dtype=np.int64)).reshape(-1)
        if mm.shape[0] != spec.num_levels or labels.shape[0] != spec.num_levels:
            raise ValueError(
                f"stream {spec.name!r}: expected {spec.num_levels} points and labels, "
                f"got {mm.shape[0]} and {labels.shape[0]}"
            )
        px = mm_to_pixels(mm, affine)  # (L, 2) image grid
        px[~inside_grid(px, image_hw)] = float("nan")
        tgt = image_to_target(px, self.stride)
        heatmap, offset, mask = encode_ocpc(tgt, labels, spec.num_classes, grid, self.radius)
        d[f"{spec.name}_heatmap"] = heatmap
        d[f"{spec.name}_offset"] = offset
        d[f"{spec.name}_offset_mask"] = mask
        d[f"{spec.name}_points_px"] = px.float()
