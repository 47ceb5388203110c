"""MONAI dictionary transforms around the keypoint codec (:class:`bundle.codec.OCPCCodec`).

Training: ``KeypointsToArraysd`` early (nested JSON keypoints -> fixed-size arrays that collate), spatial
transforms on the image only (keypoints stay in patient mm), then ``OCPCTargetsd`` last, which encodes the mm
points with the image's *final* affine. Inference: ``KeypointsDecoded`` turns one item's network output into
named keypoints in mm; it is the evaluator's ``postprocessing`` and MONAI Label's, the one decode path.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from bundle.codec import OCPCCodec
from bundle.errors import BundleInputError
from bundle.streams import StreamSpec, parse_streams
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["KeypointsToArraysd", "OCPCTargetsd", "KeypointsDecoded"]


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
        streams: Mapping[str, Mapping] | Sequence[StreamSpec] | OCPCCodec = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.streams = streams.streams if isinstance(streams, OCPCCodec) else parse_streams(streams)

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
    """Training targets of every stream from ``{s}_points``/``{s}_labels`` with ``codec.encode`` (paper eq. 1, 2).

    Inputs: ``data[image_key]`` a MetaTensor (C_img, H, W) whose 4x4 ``affine`` maps voxel (row, col, k) to
    patient mm; ``data[f"{s}_points"]`` (L, 3) mm (NaN = missing) and ``data[f"{s}_labels"]`` (L,) (-1 = unknown).
    Outputs per stream ``s`` (see :meth:`bundle.codec.OCPCCodec.encode`): ``{s}_heatmap`` (C, Ht, Wt),
    ``{s}_offset`` and ``{s}_offset_mask`` (2C, Ht, Wt) on the codec's target grid, ``{s}_points_px`` (L, 2).

    Example:
        >>> img = MetaTensor(torch.zeros(1, 8, 8), affine=torch.eye(4, dtype=torch.float64))
        >>> codec = OCPCCodec({"disc": {"levels": ["a"], "classes": ["n", "d"]}}, radius=1.0, network_stride=4)
        >>> out = OCPCTargetsd(codec)({"image": img, "disc_points": torch.tensor([[3.0, 4.0, 0.0]]),
        ...                            "disc_labels": torch.tensor([1])})
        >>> int(out["disc_heatmap"][1].sum()), out["disc_points_px"].tolist()
        (5, [[4.0, 3.0]])
    """

    def __init__(self, codec: OCPCCodec, image_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(image_key, allow_missing_keys)
        if not isinstance(codec, OCPCCodec):
            raise TypeError(f"codec must be a bundle.codec.OCPCCodec, got {type(codec).__name__}")
        self.codec = codec
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = _checked_image(d[key], key)
            names = [s.name for s in self.codec.streams]
            missing = [k for n in names for k in (f"{n}_points", f"{n}_labels") if k not in d]
            if missing:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"{missing} are needed (run KeypointsToArraysd before OCPCTargetsd)")
            points = {n: d[f"{n}_points"] for n in names}
            labels = {n: d[f"{n}_labels"] for n in names}
            d.update(self.codec.encode(points, labels, image.affine, image.shape[-2:]))
        return d


class KeypointsDecoded(MapTransform):
    """Decode one item's network output ``data[keys]`` (sum 3C, h, w) into ``data[output_key]`` with ``codec.decode``.

    ``data[image_key]`` is the network input, a MetaTensor (C_img, H, W) whose affine gives the keypoints'
    patient mm. The result is ``{stream: [keypoint dict, ...]}`` (see :meth:`bundle.codec.OCPCCodec.decode`).
    The evaluator runs it as ``postprocessing`` on each decollated item and MONAI Label on its one item.

    Example:
        >>> codec = OCPCCodec({"disc": {"levels": ["a"], "classes": ["n", "d"]}}, radius=1.0, network_stride=1)
        >>> img = MetaTensor(torch.zeros(1, 8, 8), affine=torch.eye(4, dtype=torch.float64))
        >>> pred = torch.zeros(7, 8, 8); pred[:2] = -20.0; pred[1, 3, 4] = 20.0  # class 1 at row 3, col 4; level map 0
        >>> KeypointsDecoded(codec)({"image": img, "pred": pred})["keypoints"]["disc"][0]["mm"]
        [3.0, 4.0, 0.0]
    """

    def __init__(
        self,
        codec: OCPCCodec,
        keys: KeysCollection = "pred",
        image_key: str = "image",
        output_key: str = "keypoints",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not isinstance(codec, OCPCCodec):
            raise TypeError(f"codec must be a bundle.codec.OCPCCodec, got {type(codec).__name__}")
        self.codec = codec
        self.image_key = image_key
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]  # a MetaTensor's metadata would follow every op (slow); decoding needs only the values
            pred = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
            if pred.ndim != 3:
                raise ValueError(f"data[{key!r}] must be one item's network output (C, h, w), got {tuple(pred.shape)}")
            image = d.get(self.image_key)
            affine = image.affine if isinstance(image, MetaTensor) else None
            d[self.output_key] = self.codec.decode(pred[None], affine)[0]
        return d


def _checked_image(image: object, key: Hashable) -> MetaTensor:
    if not isinstance(image, MetaTensor):
        raise ValueError(f"{key!r} must be a MetaTensor (C, H, W) carrying its affine, got {type(image)}")
    if image.ndim != 3:
        raise ValueError(f"{key!r} must be (C, H, W), got shape {tuple(image.shape)}")
    if tuple(image.affine.shape) != (4, 4):
        raise ValueError(
            f"{key!r} must carry a 4x4 affine (voxel (row, col, k) -> mm), got {tuple(image.affine.shape)}"
        )
    return image
