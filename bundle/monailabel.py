"""Postprocessing for MONAI Label's ``monaibundle`` app: network output -> keypoints JSON and a label map.

MONAI Label runs inference.json's ``preprocessing``, ``inferer`` and ``postprocessing`` on one item
``{"image": series folder or DICOM files}``; it leaves the network output, without batch dimension, in
``data["pred"]`` (sum over streams of 3C, h, w) on the network grid of the preprocessed image, then
appends its ``Restored`` transform and writes ``data["pred"]`` as the label file and ``data["result"]`` as
the JSON answer. The postprocessing is ``bundle.transforms.KeypointsDecoded`` (the evaluator's decode
path, writing ``data["keypoints"]``) followed by :class:`KeypointsToLabeld`. MONAI Label has no keypoint task
type, so the bundle is served as a segmentation-type model whose label map marks each keypoint with a small disk.
:func:`check_image_id` is the shipped app's (scripts/monailabel_app) check of a request's image id.

The axial T2 model sees one disc level per image, so for one axial series (configs/inference_axial_t2.json)
:class:`AxialBlocksd`, :class:`BlocksInferer` and :class:`BlockKeypointsToLabeld` run that pipeline once per
parallel block of the series (or per disc point the request gives) and merge the answers.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bundle.errors import BundleInputError, MissingInputError
from bundle.io.axial import block_centre_mm, parallel_blocks
from bundle.io.dicom_series import list_dicom_files, read_slice_headers
from bundle.outputs import keypoint_record
from bundle.streams import StreamSpec, parse_streams
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

__all__ = [
    "SERVED_MODELS",
    "AxialBlocksd",
    "BlockKeypointsToLabeld",
    "BlocksInferer",
    "KeypointsToLabeld",
    "axial_block_points_mm",
    "check_image_id",
    "label_values",
    "read_served_config",
    "served_keys",
    "served_weights",
]

#: MONAI Label model name -> override file merged after configs/inference.json (None: inference.json alone)
SERVED_MODELS: dict[str, str | None] = {
    "spineone": None,
    "spineone_sagittal_t1": "inference_sagittal_t1.json",
    "spineone_axial_t2": "inference_axial_t2.json",
}
#: config keys MONAI Label reads (BundleConstants) and the served variant used instead when a config has it
_SERVED_KEYS = {key: f"monailabel_{key}" for key in ("preprocessing", "inferer", "postprocessing")}

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


def read_served_config(bundle_root: str | os.PathLike, model: str) -> ConfigParser:
    """The config MONAI Label serves ``model`` (a :data:`SERVED_MODELS` name) with: ``configs/inference.json``
    merged with the model's override file, ``bundle_root`` set to ``bundle_root``."""
    if model not in SERVED_MODELS:
        raise ValueError(f"unknown model {model!r}; the bundle serves {', '.join(SERVED_MODELS)}")
    configs = Path(bundle_root) / "configs"
    files = [configs / "inference.json"] + ([configs / SERVED_MODELS[model]] if SERVED_MODELS[model] else [])
    parser = ConfigParser()
    parser.read_config([os.fspath(f) for f in files])
    parser["bundle_root"] = os.fspath(bundle_root)
    return parser


def served_weights(parser: ConfigParser, bundle_root: str | os.PathLike) -> str:
    """The weights file of a served config relative to ``bundle_root/models`` (``ckpt_dir``/model.pt):
    ``model.pt``, ``sagittal_t1/model.pt``, ``axial_t2/model.pt``."""
    ckpt = Path(parser.get_parsed_content("ckpt_dir")) / "model.pt"
    return os.path.relpath(ckpt, Path(bundle_root) / "models")


def served_keys(parser: ConfigParser) -> dict[str, str]:
    """Config key of each of ``preprocessing``, ``inferer``, ``postprocessing`` that MONAI Label reads: its
    ``monailabel_`` variant where the config has one (the axial model's per-block pipeline), else itself."""
    return {key: served if parser.get(served) is not None else key for key, served in _SERVED_KEYS.items()}


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
        """uint8 (rows, cols) map with a disk of ``disk_mm`` (in-plane mm, per-axis spacing) per keypoint; each
        disk is tested on its bounding box only (later points drawn over earlier ones)."""
        spacing = np.linalg.norm(affine[:3, :2], axis=0)  # mm per row step, per column step
        reach = np.ceil(self.disk_mm / spacing).astype(int)  # (rows, cols) pixels
        label = np.zeros((rows, cols), dtype=np.uint8)
        for point in points:
            y, x = float(point["y"]), float(point["x"])
            r0, r1 = max(int(np.floor(y)) - reach[0], 0), min(int(np.ceil(y)) + reach[0] + 1, rows)
            c0, c1 = max(int(np.floor(x)) - reach[1], 0), min(int(np.ceil(x)) + reach[1] + 1, cols)
            if r0 >= r1 or c0 >= c1:
                continue
            ii, jj = np.ogrid[r0:r1, c0:c1]
            inside = ((ii - y) * spacing[0]) ** 2 + ((jj - x) * spacing[1]) ** 2 <= self.disk_mm**2
            label[r0:r1, c0:c1][inside] = point["value"]
        return label


def axial_block_points_mm(source: str | Sequence[str]) -> list[list[float]]:
    """Patient mm [x, y, z] of each parallel block's centre slice centre of one axial series (folder or files),
    cranial first (:func:`bundle.io.axial.parallel_blocks`): per-level stacks give one point per stack."""
    headers = read_slice_headers(list_dicom_files(source))
    return [[float(v) for v in block_centre_mm(b)] for b in parallel_blocks(headers)]


class AxialBlocksd(MapTransform):
    """One axial series -> one preprocessed image per block (MONAI Label's axial preprocessing).

    ``data[points_key]`` (a list of [x, y, z] patient-mm points, e.g. the sagittal T2 model's disc keypoints'
    ``position_mm``) when the request gives it, else :func:`axial_block_points_mm` of the series. For each
    point, ``preprocessing`` (the per-level pipeline starting with ``LoadAxialSlicesd``) runs on
    ``{key: series, "disc_mm": point}``. ``data[key]`` becomes the float32 MetaTensor (B, C, H, W) of the B
    preprocessed images (block 0's metadata), ``data[blocks_key]`` the list of them (each with its own affine),
    ``data[points_key]`` the B points (mm).
    """

    def __init__(
        self, keys: str = "image", preprocessing: Any = None, points_key: str = "disc_mm", blocks_key: str = "blocks"
    ) -> None:
        super().__init__(keys)
        if not callable(preprocessing):
            raise ValueError("preprocessing must be the per-level pipeline (the config's @preprocessing)")
        self.preprocessing = preprocessing
        self.points_key = points_key
        self.blocks_key = blocks_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            points = d.get(self.points_key)
            if points is None:
                points = axial_block_points_mm(d[key])
            points = np.asarray(points, dtype=np.float64)
            if points.ndim != 2 or points.shape[1:] != (3,) or not len(points) or not np.isfinite(points).all():
                raise BundleInputError(
                    f"{self.points_key} must be a list of [x, y, z] mm points, got {points.tolist()}"
                )
            blocks = [self.preprocessing({key: d[key], "disc_mm": p.tolist()})[key] for p in points]
            if len({tuple(b.shape) for b in blocks}) > 1:
                raise BundleInputError(
                    f"axial blocks of {d[key]} differ in preprocessed shape: {[b.shape for b in blocks]}"
                )
            d[key] = MetaTensor(torch.stack([b.as_tensor() for b in blocks]), meta=dict(blocks[0].meta))
            d[self.blocks_key] = blocks
            d[self.points_key] = points.tolist()
        return d


class BlocksInferer(Inferer):
    """``inferer`` on the blocks of one item: (1, B, C, H, W) (MONAI Label's batch axis added to
    :class:`AxialBlocksd`'s image) -> (1, B, K, h, w); a (N, C, H, W) batch is passed through as it is."""

    def __init__(self, inferer: Inferer) -> None:
        self.inferer = inferer

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if inputs.ndim == 4:
            return self.inferer(inputs, network, *args, **kwargs)
        if inputs.ndim != 5 or inputs.shape[0] != 1:
            raise ValueError(f"expected (1, B, C, H, W) blocks or a (N, C, H, W) batch, got {tuple(inputs.shape)}")
        return self.inferer(inputs[0], network, *args, **kwargs)[None]


class BlockKeypointsToLabeld(MapTransform):
    """``decode`` then ``to_label`` (KeypointsDecoded, :class:`KeypointsToLabeld`) on each block, merged.

    ``data[keys]`` (B, K, h, w) network outputs and ``data[blocks_key]`` (:class:`AxialBlocksd`) in;
    ``data["result"]["keypoints"]`` all blocks' keypoints (each with ``block``, 0 = most cranial, and its
    ``instance_number``), ``data["result"]["blocks"]`` per block ``{block, point_mm, instance_number,
    affine}`` (the 4x4 RAS affine of its centre slice) and ``data[keys]`` the label map (1, rows, cols, B):
    plane b is block b's centre slice. Its affine is block 0's, with k stepping by the mean move between the
    centre slices: exact for one block or evenly spaced parallel ones; tilted per-level blocks are exact on
    plane 0 only (the JSON's ``position_mm`` and ``blocks[b]["affine"]`` are exact for every block).
    """

    def __init__(
        self,
        keys: str = "pred",
        decode: Any = None,
        to_label: KeypointsToLabeld | None = None,
        image_key: str = "image",
        blocks_key: str = "blocks",
        points_key: str = "disc_mm",
    ) -> None:
        super().__init__(keys)
        if not callable(decode) or not isinstance(to_label, KeypointsToLabeld):
            raise ValueError("decode (bundle.KeypointsDecoded) and to_label (KeypointsToLabeld) must be given")
        self.decode, self.to_label = decode, to_label
        self.image_key, self.blocks_key, self.points_key = image_key, blocks_key, points_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        blocks = d.pop(self.blocks_key)
        points_mm = d.get(self.points_key) or [None] * len(blocks)
        for key in self.key_iterator(d):
            keypoints, labels, infos = [], [], []
            for b, (image, pred) in enumerate(zip(blocks, d[key])):
                out = self.to_label(self.decode({self.image_key: image, key: pred}))
                keypoints += [{**p, "block": b} for p in out["result"]["keypoints"]]
                labels.append(out[key].as_tensor()[0, :, :, 0])
                affine = np.asarray(out[self.image_key].meta["original_affine"], dtype=np.float64)  # RAS
                infos.append(
                    {
                        "block": b,
                        "point_mm": points_mm[b],
                        "instance_number": int(image.meta.get("middle_instance_number", 0)),
                        "affine": affine.tolist(),
                    }
                )
            if len({tuple(lab.shape) for lab in labels}) > 1:
                raise BundleInputError(f"axial blocks differ in image size: {[tuple(lab.shape) for lab in labels]}")
            affine = np.asarray(infos[0]["affine"])
            if len(infos) > 1:
                affine[:3, 2] = (np.asarray(infos[-1]["affine"])[:3, 3] - affine[:3, 3]) / (len(infos) - 1)
            d[key] = MetaTensor(torch.stack(labels, dim=-1)[None], affine=torch.from_numpy(affine))
            d["result"] = {
                **dict(d.get("result") or {}),
                "keypoints": keypoints,
                "label_values": dict(self.to_label.values),
                "blocks": infos,
            }
            meta = d[self.image_key].meta  # MONAI Label's Restored and writer read these (KeypointsToLabeld)
            meta["spatial_shape"] = np.array([*labels[0].shape, len(labels)], dtype=np.int64)
            meta["original_affine"] = affine
        d.setdefault("result_extension", self.to_label.result_extension)
        return d
