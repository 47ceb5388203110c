"""The OCPC keypoint codec: one object owning the streams, the sizes and the geometry of encode and decode.

:class:`OCPCCodec` holds the streams (levels and classes), the disk radius, the target stride (image pixels
per target pixel) and the network stride (image pixels per output pixel). ``encode`` turns keypoints in
patient mm into training targets (paper eq. 1, 2); ``decode`` turns the network output into keypoints in
mm: Hough voting (paper eq. 3, :mod:`bundle.decoding`), peak picking, classes, then level names by
dynamic programming along the spine (:mod:`bundle.levels`). The functions below are the bundle's one
implementation of mm <-> image pixel <-> target pixel (torch; ``*_np`` are thin numpy entry points).

Conventions:

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

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from bundle.decoding import (
    PATCH_HALF,
    hough_voting,
    landing_reach,
    max_filter,
    pick_peaks,
    refine_peaks,
    splat_points,
    upsample_blocks,
)
from bundle.levels import assign_levels
from bundle.streams import StreamSpec, parse_streams, split_output, stream_channels

__all__ = [
    "OCPCCodec",
    "TARGET_SUFFIXES",
    "mm_to_pixels_np",
    "pixels_to_mm_np",
    "image_to_target",
    "target_to_image",
    "target_shape",
    "inside_grid",
    "as_affine",
    "mm_to_pixels",
    "pixels_to_mm",
    "encode_ocpc",
    "encode_level_map",
    "level_end_points",
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


def mm_to_pixels_np(points_mm, affine) -> np.ndarray:
    """Numpy entry point of :func:`mm_to_pixels`: (N, 3) mm -> (N, 2) ``(x=col, y=row)`` float64 array."""
    return mm_to_pixels(points_mm, affine).numpy()


def pixels_to_mm_np(xy, affine) -> np.ndarray:
    """Numpy entry point of :func:`pixels_to_mm`: (N, 2) ``(x=col, y=row)`` -> (N, 3) mm on the plane k = 0."""
    return pixels_to_mm(xy, affine).numpy()


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


def level_end_points(points: torch.Tensor) -> torch.Tensor:
    """The structures one level beyond each end of a stream, extrapolated from its keypoints (L, 2) (NaN =
    missing): ``2 p_0 - p_1`` (level -1, e.g. T12/L1 above L1/L2) and ``2 p_{L-1} - p_{L-2}`` (level L, e.g. the
    sacrum below L5/S1) -> (2, 2), NaN where an end or its neighbour is missing (and for L < 2)."""
    pts = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)
    ends = torch.full((2, 2), float("nan"), dtype=torch.float64)
    if pts.shape[0] >= 2:
        ends[0], ends[1] = 2 * pts[0] - pts[1], 2 * pts[-1] - pts[-2]
    return ends


def encode_level_map(
    points: torch.Tensor, shape: Sequence[int], radius: float, ends: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the level-map target on a target grid: inside the disk (radius R) of keypoint ``l`` the value ``l``.

    Args:
        points: (L, 2) keypoints ``(x=col, y=row)`` in target-grid pixels, row ``l`` = level index ``l``
            (head to feet); NaN = missing. Unlike the heatmap, a keypoint of unknown class is drawn.
        shape: target grid ``(Ht, Wt)``. radius: R in target pixels.
        ends: also draw -1 and L at the structures one level beyond the ends (:func:`level_end_points`), so that
            the map learns what the neighbours of the first and last levels read (T12/L1 is not L1/L2) instead
            of leaving them unsupervised.

    Returns:
        level (1, Ht, Wt) and level mask (1, Ht, Wt), float32; the nearest keypoint owns a pixel.

    Example:
        >>> level, mask = encode_level_map(torch.tensor([[0.0, 0.0], [0.0, 3.0]]), (4, 1), radius=1.0)
        >>> level[0, :, 0].tolist(), mask[0, :, 0].tolist()
        ([0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
        >>> level, mask = encode_level_map(torch.tensor([[0.0, 3.0], [0.0, 6.0]]), (10, 1), 1.0, ends=True)
        >>> level[0, :, 0].tolist()
        [-1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    """
    pts = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)
    ht, wt = int(shape[0]), int(shape[1])
    level = torch.zeros(1, ht, wt, dtype=torch.float32)
    mask = torch.zeros(1, ht, wt, dtype=torch.float32)
    index = torch.arange(pts.shape[0], dtype=torch.float32)
    if ends:
        pts = torch.cat([pts, level_end_points(pts)])
        index = torch.cat([index, torch.tensor([-1.0, float(len(index))])])
    keep = inside_grid(pts, (ht, wt))
    if not keep.any():
        return level, mask
    pts, index = pts[keep], index[keep]
    rows = torch.arange(ht, dtype=torch.float64).view(1, ht, 1)
    cols = torch.arange(wt, dtype=torch.float64).view(1, 1, wt)
    dist2 = (pts[:, 0].view(-1, 1, 1) - cols) ** 2 + (pts[:, 1].view(-1, 1, 1) - rows) ** 2  # (K, Ht, Wt)
    best, owner = dist2.min(dim=0)
    inside = best <= radius * radius
    level[0] = torch.where(inside, index[owner], torch.zeros((), dtype=torch.float32))
    mask[0] = inside.float()
    return level, mask


TARGET_SUFFIXES = ("heatmap", "offset", "offset_mask", "level", "level_mask")
_KEYPOINT_KEYS = (
    "level",
    "level_index",
    "level_confidence",
    "label",
    "class_name",
    "probabilities",
    "score",
    "xy",
    "mm",
)


class OCPCCodec:
    """Encode keypoints into OCPC targets and decode network outputs into named keypoints.

    Args:
        streams: ``{name: {"levels": [...], "classes": [...]}}`` or StreamSpecs (levels head to feet).
        radius: disk radius R in target pixels (targets and Hough voting).
        target_stride: image pixels per target pixel (targets, loss and voting grid).
        network_stride: image pixels per network output pixel; None = ``bundle.networks.OUTPUT_STRIDE`` (SpineOne's).
        nms_kernel: odd peak-suppression window, target pixels.
        candidates: peaks kept per stream before level assignment, as a multiple of its number of levels
            (plus 4), so that missed and extra structures can be told apart.
        level_spacing_mm: expected distance between neighbouring levels (adult lumbar discs ~35 mm); the
            level assignment fits each study's spacing from 0.6 to 1.65 times this.
        window_search: when the target grid is finer than the network grid, find the candidates on a Hough map
            voted on the network grid and vote on the target grid only in a window around each (the votes that
            can land there; exact there, see :meth:`decode`); False: vote on the whole target grid.
        level_ends: the level-map targets also mark the structures one level beyond each stream's first and
            last keypoints (extrapolated, :func:`level_end_points`) with -1 and K, so that the network learns
            that T12/L1 is not L1/L2 and the disc below L5/S1 not L5/S1 (not in the paper).

    Example:
        >>> codec = OCPCCodec({"disc": {"levels": ["a", "b"], "classes": ["n", "d"]}}, 2.0, 1, 1)
        >>> affine = torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0], [-1, 0, 0, 0], [0, 0, 0, 1]])  # rows to the feet
        >>> t = codec.encode({"disc": torch.tensor([[3.0, 0.0, -2.0], [3.0, 0.0, -37.0]])},
        ...                  {"disc": torch.tensor([0, 1])}, affine, (48, 8))
        >>> logits = torch.where(t["disc_heatmap"] > 0, 10.0, -10.0)
        >>> out = codec.decode(torch.cat([logits, t["disc_offset"], t["disc_level"]])[None], affine)[0]["disc"]
        >>> [(kp["level"], kp["class_name"], [round(v, 3) for v in kp["mm"]]) for kp in out]
        [('a', 'n', [3.0, 0.0, -2.0]), ('b', 'd', [3.0, 0.0, -37.0])]
    """

    def __init__(
        self,
        streams: Mapping[str, Mapping] | Sequence[StreamSpec],
        radius: float = 6.0,
        target_stride: int = 1,
        network_stride: int | None = None,
        nms_kernel: int = 3,
        candidates: int = 2,
        level_spacing_mm: float = 35.0,
        window_search: bool = True,
        level_ends: bool = True,
    ) -> None:
        self.streams = parse_streams(streams)
        if network_stride is None:
            from bundle.networks.spineone import OUTPUT_STRIDE  # the network's fact, read where it is defined

            network_stride = OUTPUT_STRIDE
        if not math.isfinite(radius) or radius <= 0:
            raise ValueError(f"radius must be a positive number of target pixels, got {radius}")
        for name, value in (("target_stride", target_stride), ("network_stride", network_stride)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if nms_kernel < 1 or nms_kernel % 2 == 0:
            raise ValueError(f"nms_kernel must be a positive odd integer, got {nms_kernel}")
        if candidates < 1 or level_spacing_mm <= 0:
            raise ValueError(f"candidates and level_spacing_mm must be positive, got {candidates}, {level_spacing_mm}")
        self.radius = float(radius)
        self.target_stride = int(target_stride)
        self.network_stride = int(network_stride)
        self.nms_kernel = int(nms_kernel)
        self.candidates = int(candidates)
        self.level_spacing_mm = float(level_spacing_mm)
        self.window_search = bool(window_search)
        self.level_ends = bool(level_ends)

    def __repr__(self) -> str:
        names = {s.name: (len(s.levels), len(s.classes)) for s in self.streams}
        return (
            f"OCPCCodec(streams(levels, classes)={names}, radius={self.radius}, target_stride={self.target_stride}, "
            f"network_stride={self.network_stride})"
        )

    # ---- sizes
    @property
    def channels(self) -> dict[str, int]:
        """``{stream: C}`` in stream order; the network gives each ``3 C + 1`` output channels."""
        return {s.name: s.num_classes for s in self.streams}

    @property
    def out_channels(self) -> int:
        return stream_channels(self.channels)

    @property
    def upsample(self) -> float:
        """Network grid -> target grid scale factor."""
        return self.network_stride / self.target_stride

    def target_keys(self) -> list[str]:
        """Batch keys of the training targets: ``{stream}_{suffix}`` for each of ``TARGET_SUFFIXES``."""
        return [f"{s.name}_{suffix}" for s in self.streams for suffix in TARGET_SUFFIXES]

    def split(self, output: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Network output (B, sum (3C + 1), h, w) -> ``{stream: (logits (B, C, h, w), offsets (B, 2C, h, w),
        level (B, 1, h, w))}``."""
        return split_output(output, self.channels)

    # ---- encode
    def encode(
        self, points: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor], affine, image_shape: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """Training targets of one image (paper eq. 1, 2).

        Args:
            points: ``{stream: (L, 3)}`` patient mm, NaN rows = missing. labels: ``{stream: (L,)}``, -1 = unknown.
            affine: the image's 4x4 voxel (row, col, k) -> mm. image_shape: ``(H, W)`` image pixels.

        Returns per stream ``s``: ``{s}_heatmap`` (C, Ht, Wt), ``{s}_offset`` and ``{s}_offset_mask`` (2C, Ht, Wt),
        ``{s}_level`` and ``{s}_level_mask`` (1, Ht, Wt), float32 on the target grid
        ``(H // target_stride, W // target_stride)``; ``{s}_points_px`` (L, 2) the keypoints on the image grid,
        NaN where missing or outside. See :func:`encode_ocpc` and :func:`encode_level_map`.
        """
        height, width = int(image_shape[0]), int(image_shape[1])
        grid = target_shape(height, width, self.target_stride)
        out: dict[str, torch.Tensor] = {}
        for spec in self.streams:
            mm = torch.as_tensor(np.asarray(points[spec.name], dtype=np.float64)).reshape(-1, 3)
            lab = torch.as_tensor(np.asarray(labels[spec.name], dtype=np.int64)).reshape(-1)
            if mm.shape[0] != spec.num_levels or lab.shape[0] != spec.num_levels:
                raise ValueError(
                    f"stream {spec.name!r}: expected {spec.num_levels} points and labels, "
                    f"got {mm.shape[0]} and {lab.shape[0]}"
                )
            px = mm_to_pixels(mm, affine)
            px[~inside_grid(px, (height, width))] = float("nan")
            target_px = image_to_target(px, self.target_stride)
            heatmap, offset, mask = encode_ocpc(target_px, lab, spec.num_classes, grid, self.radius)
            out[f"{spec.name}_heatmap"], out[f"{spec.name}_offset"] = heatmap, offset
            out[f"{spec.name}_offset_mask"], out[f"{spec.name}_points_px"] = mask, px.float()
            out[f"{spec.name}_level"], out[f"{spec.name}_level_mask"] = encode_level_map(
                target_px, grid, self.radius, self.level_ends
            )
        return out

    # ---- decode
    def decode(self, output: torch.Tensor, affine=None) -> list[dict[str, list[dict]]]:
        """Named keypoints per image from the network output (B, sum (3C + 1), h, w) on the network grid.

        Per stream: logits and offsets are upsampled bilinearly (``align_corners=False``) to the target grid
        (offsets are in target pixels already), sigmoid, Hough voting per class (:func:`bundle.decoding.hough_voting`),
        maximum over classes, NMS, up to ``candidates * K + 4`` peaks (duplicates of one structure merged). At
        each: ``label`` = the class with the highest Hough score, ``probabilities`` = the class scores normalised
        to sum 1, ``score`` = the highest, ``level_estimate`` = the level map there (bilinear, read on the network grid);
        ``xy`` (image pixels ``[x=col, y=row]``) refined by mean shift of a 3x3 window on the summed Hough map;
        ``mm`` through ``affine`` (None without). The candidates, head to feet (descending patient z, or
        ascending row without an affine), get level names by :func:`bundle.levels.assign_levels` (from spacing,
        scores and level estimates); those without a level are dropped, a level without a candidate is absent.

        Args:
            affine: None, (4, 4) for every image or (B, 4, 4).

        Returns:
            A list over the batch of ``{stream: [keypoint, ...]}`` head to feet, each keypoint a dict with
            ``level``, ``level_index``, ``level_confidence`` (in [0, 1]), ``label``, ``class_name``,
            ``probabilities``, ``score``, ``xy``, ``mm``.
        """
        if isinstance(output, Mapping):
            raise TypeError("decode takes the network's single output tensor (B, sum (3C + 1), h, w)")
        output = torch.as_tensor(output).detach().as_subclass(torch.Tensor)
        parts = self.split(output)
        batch = int(output.shape[0])
        aff = as_affine(affine, batch) if affine is not None else None
        out: list[dict[str, list[dict]]] = [{} for _ in range(batch)]
        windowed = self.window_search and self.upsample > 1 and self.upsample == int(self.upsample)
        for spec in self.streams:
            # NCHW: a channels_last output (bundle.InferenceOptimizer) makes upsampling and voting walk strided memory
            logits, offsets, level = (t.float().contiguous() for t in parts[spec.name])
            if windowed:  # small maps: on the CPU
                logits, offsets = logits.cpu(), offsets.cpu()
                peaks = [self._window_peaks(spec, logits[bi], offsets[bi]) for bi in range(batch)]
            else:
                peaks = self._grid_peaks(spec, logits, offsets)
            for bi, (at, scores, xy) in enumerate(peaks):
                found = self._candidates(spec, at, scores, xy, level[bi, 0].cpu(), None if aff is None else aff[bi])
                out[bi][spec.name] = self._name_levels(spec, found, aff is not None)
        return out

    def _grid_peaks(
        self, spec: StreamSpec, logits: torch.Tensor, offsets: torch.Tensor
    ) -> list[tuple[list[tuple[int, int]], torch.Tensor, np.ndarray]]:
        """Per image of logits (B, C, h, w) and offsets (B, 2C, h, w) on the network grid: the peaks (row, col)
        of the Hough maps voted on the whole target grid, their class scores (K, C) and refined target-grid
        (x, y) (K, 2), in descending score."""
        if self.upsample != 1:  # one pass over logits and offsets; the level map is read at the candidates only
            both = torch.cat([logits, offsets], dim=1)
            both = F.interpolate(both, scale_factor=self.upsample, mode="bilinear", align_corners=False)
            logits, offsets = both[:, : spec.num_classes], both[:, spec.num_classes :]
        hough = hough_voting(torch.sigmoid(logits), offsets, self.radius).cpu()  # (B, C, Ht, Wt)
        best, total = hough.amax(dim=1), hough.sum(dim=1)
        result = []
        for bi in range(hough.shape[0]):
            peaks = pick_peaks(best[bi], self.candidates * spec.num_levels + 4, self.nms_kernel)
            at = torch.tensor(peaks, dtype=torch.int64).view(-1, 2)
            result.append((peaks, hough[bi][:, at[:, 0], at[:, 1]].double().T, refine_peaks(total[bi], peaks)))
        return result

    def _window_peaks(
        self, spec: StreamSpec, logits: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[list[tuple[int, int]], torch.Tensor, np.ndarray]:
        """:meth:`_grid_peaks` of one image (logits (C, h, w), offsets (2C, h, w)) by window search.

        The candidates are the peaks of the Hough maps voted on the network grid. Around each, a window of
        the target grid (the target pixels of network pixels r - 1 .. r + 1, c - 1 .. c + 1, the core, plus
        the NMS half-width and the refinement's reach) gets its exact target-grid Hough maps: only the network
        pixels whose target pixels' votes can land in a window (:func:`bundle.decoding.landing_reach`) are
        upsampled (:func:`bundle.decoding.upsample_blocks`) and vote (:func:`bundle.decoding.splat_points`). A
        window's candidate is the best local maximum in its core, as on the whole target grid.
        """
        up, c = int(self.upsample), spec.num_classes
        h, w = logits.shape[1:]
        coarse = hough_voting(torch.sigmoid(logits)[None], offsets[None] / up, self.radius / up)[0]
        found = pick_peaks(coarse.amax(dim=0), self.candidates * spec.num_levels + 4, self.nms_kernel)
        if not found:
            return [], torch.zeros(0, c, dtype=torch.float64), np.zeros((0, 2))
        at = torch.tensor(found, dtype=torch.int64)
        size = torch.tensor([h * up, h * up, w * up, w * up])
        core = torch.stack([at[:, 0] - 1, at[:, 0] + 2, at[:, 1] - 1, at[:, 1] + 2], dim=1) * up
        core = torch.minimum(core.clamp_min(0), size)  # (K, 4): rows [y0, y1), columns [x0, x1)
        margin = self.nms_kernel // 2 + PATCH_HALF
        win = torch.minimum((core + torch.tensor([-margin, margin, -margin, margin])).clamp_min(0), size)
        nz = _voting_sources(landing_reach(offsets, up).flatten(1), win, w)  # (S, 2) network (row, col)
        block = torch.arange(up)
        rows = (nz[:, :1] * up + block).repeat_interleave(up, dim=1).flatten()  # their target pixels
        cols = (nz[:, 1:] * up + block).repeat(1, up).flatten()
        values = upsample_blocks(torch.cat([logits, offsets]), nz[:, 0], nz[:, 1], up).flatten(1)  # (3C, N)
        oy, ox = int(win[:, 0].min()), int(win[:, 2].min())  # the maps cover the windows' bounding box only
        shape = (int(win[:, 1].max()) - oy, int(win[:, 3].max()) - ox)
        x, y = (cols - ox).to(values.dtype) + values[c::2], (rows - oy).to(values.dtype) + values[c + 1 :: 2]
        hough = splat_points(torch.sigmoid(values[:c]), x, y, shape) / (math.pi * self.radius**2)
        best = hough.amax(dim=0)
        score = torch.where((best == max_filter(best, self.nms_kernel)) & (best > 0), best, torch.zeros_like(best))
        peaks = _core_maxima(score, core - torch.tensor([oy, oy, ox, ox]), 3 * up)
        where = torch.tensor(peaks, dtype=torch.int64).view(-1, 2)
        xy = refine_peaks(hough.sum(dim=0), peaks) + np.array([ox, oy], dtype=np.float64)
        return [(r + oy, col + ox) for r, col in peaks], hough[:, where[:, 0], where[:, 1]].double().T, xy

    def _candidates(
        self,
        spec: StreamSpec,
        peaks: list[tuple[int, int]],
        scores: torch.Tensor,
        xy_target: np.ndarray,
        level: torch.Tensor,
        affine,
    ) -> list[dict]:
        """Candidate keypoints of one image from its peaks (row, col) on the target grid, their class scores
        (K, C) and refined target-grid (x, y) (K, 2); ``level`` (h, w) is the network-grid level map."""
        c = spec.num_classes
        if not peaks:
            return []
        xy = target_to_image(torch.from_numpy(np.asarray(xy_target, dtype=np.float64)), self.target_stride)  # (K, 2)
        mm = pixels_to_mm(xy, affine).tolist() if affine is not None else [None] * len(peaks)
        rows = scores.numpy()  # (K, C) float64: numpy per row is several times cheaper than torch on tiny rows
        sums, labels = rows.sum(axis=1), rows.argmax(axis=1)
        probabilities = np.where(sums[:, None] > 0, rows / np.where(sums > 0, sums, 1.0)[:, None], 1.0 / c)
        level_np = level.numpy()
        found = []
        for i, ((r, col), pos, where) in enumerate(zip(peaks, xy.tolist(), mm)):
            label = int(labels[i])
            found.append(
                {
                    "label": label,
                    "class_name": spec.classes[label],
                    "probabilities": probabilities[i].tolist(),
                    "score": float(rows[i, label]),
                    "xy": pos,
                    "mm": where,
                    "level_estimate": self._level_at(level_np, r, col),
                }
            )
        return found

    def _level_at(self, level: np.ndarray, r: int, col: int) -> float:
        """The level map (h, w) on the network grid at target pixel (r, col): the value bilinear upsampling
        (``align_corners=False``, edges clamped) would give there, without upsampling the whole map."""
        h, w = level.shape
        y = min(max((r + 0.5) / self.upsample - 0.5, 0.0), h - 1.0)
        x = min(max((col + 0.5) / self.upsample - 0.5, 0.0), w - 1.0)
        y0, x0 = int(y), int(x)
        y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
        fy, fx = y - y0, x - x0
        top = (1 - fx) * float(level[y0, x0]) + fx * float(level[y0, x1])
        bottom = (1 - fx) * float(level[y1, x0]) + fx * float(level[y1, x1])
        return (1 - fy) * top + fy * bottom

    def _name_levels(self, spec: StreamSpec, found: list[dict], has_mm: bool) -> list[dict]:
        """Merge duplicates, order candidates head to feet, assign levels (:func:`bundle.levels.assign_levels`),
        drop the rest. Candidates (in descending score) closer than ``0.4 * level_spacing_mm`` (or, without
        geometry, than the disk diameter) to a better one are the same structure and are dropped first."""
        key = "mm" if has_mm else "xy"
        apart = 0.4 * self.level_spacing_mm if has_mm else 2.0 * self.radius * self.target_stride
        kept: list[dict] = []
        for kp in found:
            if all(math.dist(kp[key], other[key]) >= apart for other in kept):
                kept.append(kp)
        found = kept
        found.sort(key=(lambda kp: -kp["mm"][2]) if has_mm else (lambda kp: kp["xy"][1]))
        pos = np.array([kp["mm"] if has_mm else kp["xy"] for kp in found], dtype=np.float64)
        spacing = self.level_spacing_mm if has_mm else _pixel_spacing_guess(pos, self.level_spacing_mm)
        scores = np.array([kp["score"] for kp in found])
        estimates = np.array([kp["level_estimate"] for kp in found])
        result = assign_levels(pos, scores, spec.num_levels, spacing, level_estimates=estimates)
        named = []
        for kp, level, confidence in zip(found, result.level.tolist(), result.confidence.tolist()):
            if level >= 0:
                kp.update(level=spec.levels[level], level_index=level, level_confidence=float(confidence))
                named.append({k: kp[k] for k in _KEYPOINT_KEYS})
        return named


def _voting_sources(reach: torch.Tensor, windows: torch.Tensor, width: int) -> torch.Tensor:
    """Network pixels (row, col) (S, 2), row-major, whose votes can land in some window: ``reach`` (4, h w) holds
    each pixel's landing bounds x_lo, x_hi, y_lo, y_hi (:func:`bundle.decoding.landing_reach`), ``windows``
    (K, 4) the target-grid windows [y0, y1) x [x0, x1). Pixels that cannot reach the windows' bounding box
    are dropped first, so the per-window test runs on the few that can."""
    x_lo, x_hi, y_lo, y_hi = reach
    y0, y1, x0, x1 = windows.unbind(dim=1)
    near = (x_hi > x0.min() - 1) & (x_lo < x1.max()) & (y_hi > y0.min() - 1) & (y_lo < y1.max())
    index = near.nonzero()[:, 0]
    x_lo, x_hi, y_lo, y_hi = reach[:, index]
    hit = (x_hi > x0[:, None] - 1) & (x_lo < x1[:, None]) & (y_hi > y0[:, None] - 1) & (y_lo < y1[:, None])
    index = index[hit.any(dim=0)]
    return torch.stack([index // width, index % width], dim=1)


def _core_maxima(score: torch.Tensor, cores: torch.Tensor, span: int) -> list[tuple[int, int]]:
    """The first maximum (row-major) of ``score`` (H, W) in each core ``[r0, r1) x [c0, c1)`` of ``cores`` (K, 4),
    each at most ``span`` pixels a side, where it is positive; distinct pixels (row, col) in descending score
    (ties in core order)."""
    steps = torch.arange(span)
    rows, cols = cores[:, :1] + steps, cores[:, 2:3] + steps  # (K, span) each
    valid = (rows < cores[:, 1:2])[:, :, None] & (cols < cores[:, 3:4])[:, None, :]
    h, w = score.shape
    region = score[rows.clamp_max(h - 1)[:, :, None], cols.clamp_max(w - 1)[:, None, :]]
    region = torch.where(valid, region, torch.full_like(region, -math.inf)).flatten(1)
    best, i = region.max(dim=1)
    hits: dict[tuple[int, int], float] = {}
    for value, r, c in zip(best.tolist(), (cores[:, 0] + i // span).tolist(), (cores[:, 2] + i % span).tolist()):
        if value > 0:
            hits.setdefault((r, c), value)
    return sorted(hits, key=lambda rc: -hits[rc])


def _pixel_spacing_guess(pos: np.ndarray, default: float) -> float:
    """Without geometry: the median gap between neighbouring candidates (pixels), else ``default``."""
    if len(pos) < 2:
        return default
    gaps = np.linalg.norm(np.diff(pos, axis=0), axis=1)
    gaps = gaps[gaps > 0]
    return float(np.median(gaps)) if len(gaps) else default
