"""Postprocessing for MONAI Label's ``monaibundle`` app: network output -> keypoints JSON and a label map.

MONAI Label runs inference.json's ``preprocessing``, ``inferer`` and ``postprocessing`` on one item
``{"image": series folder or DICOM files}``; it leaves the network output, without batch dimension, in
``data["pred"]`` (sum over streams of 3C, h, w) on the network grid of the preprocessed image, then
appends its ``Restored`` transform and writes ``data["pred"]`` as the label file and ``data["result"]`` as
the JSON answer. The postprocessing is ``bundle.transforms.KeypointsDecoded`` (the evaluator's decode
path, writing ``data["keypoints"]``) followed by :class:`KeypointsToLabeld`. MONAI Label has no keypoint task
type, so the bundle is served as a segmentation-type model whose label map marks each keypoint with a small disk.
:func:`check_image_id` is the shipped app's (scripts/monailabel_app) check of a request's image id.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from bundle.errors import MissingInputError
from bundle.outputs import keypoint_record
from bundle.streams import StreamSpec, parse_streams
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["KeypointsToLabeld", "check_image_id", "label_values"]

# LPS <-> RAS: MONAI Label's writer takes a RAS affine (it flips the first two axes for ITK itself).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def label_values(streams: Mapping[str, Mapping] | Sequence[StreamSpec]) -> dict[str, int]:
    """Label-map value of each level: ``"{stream}/{level}"`` -> 1, 2, ... in stream then level order (0 = background).

    Example:
        >>> label_values({"disc": {"levels": ["L4/L5", "L5/S1"], "classes": ["n", "d"]}})
        {'disc/L4/L5': 1, 'disc/L5/S1': 2}
    """
    values, value = {}, 1
    for spec in parse_streams(streams):
        for level in spec.levels:
            values[f"{spec.name}/{level}"] = value
            value += 1
    return values


def check_image_id(image_id: str, images: Sequence[str], datastore: str, shown: int = 5) -> None:
    """Refuse an image id that is not among the datastore's ``images`` with MissingInputError (HTTP 404) naming it,
    the datastore (its studies path or URL) and its first ``shown`` image ids (sorted).

    Example:
        >>> check_image_id("no_such_id", ["b", "a"], "/data/studies")
        Traceback (most recent call last):
        bundle.errors.MissingInputError: image 'no_such_id' is not in the datastore /data/studies; its images are: a, b
    """
    if image_id in images:
        return
    listed = sorted(images)
    if listed:
        more = f" (first {shown} of {len(listed)})" if len(listed) > shown else ""
        held = f"its images are: {', '.join(listed[:shown])}{more}"
    else:
        held = "it holds no images (a studies folder of series folders needs MONAI_LABEL_DATASTORE_FILE_EXT='[\"*.series\"]')"
    raise MissingInputError(f"image {image_id!r} is not in the datastore {datastore}; {held}")


class KeypointsToLabeld(MapTransform):
    """Turn the decoded ``data[keypoints_key]`` into MONAI Label's answer and draw them as a label map in ``data[keys]``.

    Writes ``data["result"] = {"keypoints": [...], "label_values": {...}}``. Each keypoint holds ``stream``,
    ``level``, ``level_confidence``, ``label`` (class name), ``label_index``, ``probabilities`` ({class: p}),
    ``score``, ``position_mm`` (patient LPS mm), ``x``/``y`` (column/row pixels of the original series' middle
    slice, the image's voxel grid), ``voxel`` ([row, column, 0] index in that grid) and ``instance_number``.
    ``data[keys]`` becomes a label map (1, rows, cols, 1) on that grid, uint8: a disk of ``disk_mm`` radius
    around each keypoint whose value is ``label_values(streams)`` of its level. The image metadata's
    ``spatial_shape`` and ``original_affine`` are set to that grid (the affine in RAS) so that MONAI Label's
    ``Restored`` keeps the map as is and its writer stores it with the series' geometry.

    Args:
        keys: the network output key (``"pred"``), replaced by the label map.
        streams: the model's streams (``"@codec"``).
        image_key: the preprocessed image (MetaTensor with the loader's metadata).
        keypoints_key: where ``KeypointsDecoded`` left the keypoints.
        disk_mm: radius of each drawn disk in mm.
        result_extension: label file type used when the request does not name one.

    Example:
        >>> post = Compose([KeypointsDecoded(codec), KeypointsToLabeld("pred", codec.streams)])  # doctest: +SKIP
        >>> out = post({"image": image, "pred": net(image[None])[0]})  # doctest: +SKIP
        >>> out["result"]["keypoints"][0]["level"], out["pred"].shape  # doctest: +SKIP
        ('L4/L5', torch.Size([1, 512, 512, 1]))
    """

    def __init__(
        self,
        keys: str = "pred",
        streams: Mapping[str, Mapping] | Sequence[StreamSpec] | None = None,
        image_key: str = "image",
        keypoints_key: str = "keypoints",
        disk_mm: float = 3.0,
        result_extension: str = ".nii.gz",
    ) -> None:
        super().__init__(keys)
        if streams is None:
            raise ValueError("streams must be given (the model's streams, as in the configs)")
        if disk_mm <= 0:
            raise ValueError(f"disk_mm must be positive, got {disk_mm}")
        self.specs = parse_streams(streams)
        self.values = label_values(self.specs)
        self.image_key = image_key
        self.keypoints_key = keypoints_key
        self.disk_mm = float(disk_mm)
        self.result_extension = result_extension

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        if not isinstance(image, MetaTensor):
            raise TypeError(f"data[{self.image_key!r}] must be the preprocessed MetaTensor, got {type(image).__name__}")
        if self.keypoints_key not in d:
            raise KeyError(f"data[{self.keypoints_key!r}] is missing: run bundle.KeypointsDecoded first")
        meta = image.meta
        original_affine = np.asarray(meta["original_affine"], dtype=np.float64)
        rows, cols = (int(v) for v in np.asarray(meta["spatial_shape"]).reshape(-1)[:2])
        for key in self.key_iterator(d):
            points = self._points(d[self.keypoints_key], original_affine, int(meta.get("middle_instance_number", 0)))
            label = self._draw(points, rows, cols, original_affine)
            ras_affine = torch.from_numpy(_LPS_TO_RAS @ original_affine)
            d[key] = MetaTensor(torch.from_numpy(label)[None, :, :, None], affine=ras_affine)
            d["result"] = {**dict(d.get("result") or {}), "keypoints": points, "label_values": dict(self.values)}
        # MONAI Label's Restored resizes to meta["spatial_shape"] and its writer takes meta["original_affine"] as RAS.
        meta["spatial_shape"] = np.array([rows, cols, 1], dtype=np.int64)
        meta["original_affine"] = _LPS_TO_RAS @ original_affine
        d.setdefault("result_extension", self.result_extension)
        return d

    def _points(self, decoded: Mapping[str, Sequence[Mapping]], affine: np.ndarray, instance: int) -> list[dict]:
        points = []
        for spec in self.specs:
            for point in decoded.get(spec.name, []):
                record = keypoint_record(spec, point, affine, instance)
                record["value"] = self.values[f"{spec.name}/{point['level']}"]
                record["voxel"] = [record["y"], record["x"], 0.0]
                points.append(record)
        return points

    def _draw(self, points: Sequence[Mapping], rows: int, cols: int, affine: np.ndarray) -> np.ndarray:
        """uint8 (rows, cols) map with a disk of ``disk_mm`` (in-plane mm, per-axis spacing) per keypoint."""
        spacing = np.linalg.norm(affine[:3, :2], axis=0)  # mm per row step, per column step
        label = np.zeros((rows, cols), dtype=np.uint8)
        ii, jj = np.mgrid[0:rows, 0:cols]
        for point in points:
            inside = ((ii - point["y"]) * spacing[0]) ** 2 + ((jj - point["x"]) * spacing[1]) ** 2 <= self.disk_mm**2
            label[inside] = point["value"]
        return label
