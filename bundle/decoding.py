"""Decode network outputs into keypoints: Hough voting (paper eq. 3), peak picking, classes and levels.

Geometry (target/image grids, mm mapping) comes from :mod:`bundle.codec`, the same module that encodes
the training targets, so encode -> decode is a round trip.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from bundle.codec import as_affine, pixels_to_mm, target_to_image
from bundle.streams import StreamSpec, parse_streams, split_output

__all__ = ["hough_voting", "decode_keypoints"]


def hough_voting(probs: torch.Tensor, offsets: torch.Tensor, radius: float) -> torch.Tensor:
    """Hough score maps (paper eq. 3): every pixel votes its probability at its position plus its offset.

    Args:
        probs: (B, C, H, W) probabilities in [0, 1].
        offsets: (B, 2C, H, W) interleaved ``(dx_c, dy_c)`` in pixels of the same grid (dx along columns).
        radius: disk radius R (pixels of this grid); the map is divided by ``pi R^2``.

    Returns:
        (B, C, H, W) Hough scores. Each vote is splatted bilinearly onto the four pixels around its
        landing point; corners outside the grid are dropped (the others are kept).

    Example:
        >>> p = torch.zeros(1, 1, 3, 3); p[0, 0, 0, 0] = 1.0
        >>> o = torch.zeros(1, 2, 3, 3); o[0, :, 0, 0] = torch.tensor([1.5, 1.0])  # vote lands at x=1.5, y=1
        >>> [round(v, 4) for v in (hough_voting(p, o, radius=1.0)[0, 0, 1] * math.pi).tolist()]
        [0.0, 0.5, 0.5]
    """
    if probs.ndim != 4 or offsets.ndim != 4:
        raise ValueError(f"probs and offsets must be 4D, got {tuple(probs.shape)} and {tuple(offsets.shape)}")
    b, c, h, w = probs.shape
    if offsets.shape != (b, 2 * c, h, w):
        raise ValueError(f"offsets must be (B, 2C, H, W) = {(b, 2 * c, h, w)}, got {tuple(offsets.shape)}")
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    # Bilinear splatting is the adjoint (transpose) of bilinear sampling, so the votes are the gradient of
    # F.grid_sample with respect to its input: one fused pass instead of ~30 elementwise ops over B*C*H*W
    # for a hand-written index_add_ scatter. Out-of-grid corners are dropped per corner by padding "zeros".
    # The backward kernel is called directly: no forward pass, no autograd graph (so it also runs under
    # torch.inference_mode()), the same arithmetic as autograd.grad of grid_sample.
    dtype = probs.dtype if probs.is_floating_point() else torch.float32
    probs, offsets = probs.as_subclass(torch.Tensor), offsets.as_subclass(torch.Tensor)  # drop MetaTensor meta
    p = probs.to(dtype).reshape(b * c, 1, h, w)
    off = offsets.to(dtype).reshape(b * c, 2, h, w)
    cols = torch.arange(w, device=p.device, dtype=dtype).view(1, w).expand(h, w)
    rows = torch.arange(h, device=p.device, dtype=dtype).view(h, 1).expand(h, w)
    # landing points in grid_sample's normalised coordinates (align_corners=False: pixel u -> (2u + 1) / n - 1),
    # computed in the (B*C, 2, H, W) layout and viewed as the (B*C, H, W, 2) grid (no interleaving copy)
    scale = torch.tensor([2.0 / w, 2.0 / h], device=p.device, dtype=dtype).view(1, 2, 1, 1)
    shift = torch.tensor([1.0 / w - 1.0, 1.0 / h - 1.0], device=p.device, dtype=dtype).view(1, 2, 1, 1)
    grid = (off + torch.stack([cols, rows])).mul_(scale).add_(shift)
    # non-finite or huge offsets: move the vote well outside (all corners dropped) before the kernel's int cast
    grid = grid.nan_to_num_(nan=-3.0).clamp_(-3.0, 3.0).permute(0, 2, 3, 1)
    votes, _ = torch.ops.aten.grid_sampler_2d_backward(
        p, p, grid, 0, 0, False, [True, False]  # grad_output, input (shape only), grid, bilinear, zeros
    )
    return votes.view(b, c, h, w).div_(math.pi * radius * radius)


def _max_filter(score: torch.Tensor, kernel: int) -> torch.Tensor:
    """``kernel`` x ``kernel`` moving maximum of an (H, W) map, -inf outside: ``F.max_pool2d(stride=1,
    padding=kernel // 2)``, computed separably with ``torch.maximum`` (max_pool2d on one channel is
    single-threaded and keeps indices, about 10x slower at 640 x 640)."""
    half = kernel // 2
    if half == 0:
        return score
    h, w = score.shape
    padded = F.pad(score[None], (half, half, half, half), value=-math.inf)[0]
    across = padded[:, 0:w]
    for dx in range(1, kernel):
        across = torch.maximum(across, padded[:, dx : dx + w])
    pooled = across[0:h]
    for dy in range(1, kernel):
        pooled = torch.maximum(pooled, across[dy : dy + h])
    return pooled


def _pick_peaks(score: torch.Tensor, k: int, kernel: int) -> list[tuple[int, int]]:
    """Top-``k`` local maxima (row, col) of one (H, W) map with ``kernel`` x ``kernel`` NMS, scores > 0.

    Plateaus (equal neighbours, e.g. a vote split evenly between two pixels) pass max-pool equality on
    every pixel; of candidates closer than the kernel half-width, only the first in score order is kept.
    """
    pooled = _max_filter(score, kernel)
    peak = (score == pooled) & (score > 0)
    cand = torch.where(peak, score, torch.zeros_like(score)).flatten()
    n_cand = min(int(peak.sum()), kernel * kernel * k)  # a plateau repeats a peak at most kernel^2 times
    if n_cand == 0:
        return []
    _, idx = cand.topk(n_cand)
    w = score.shape[1]
    half = kernel // 2
    chosen: list[tuple[int, int]] = []
    for i in idx.tolist():  # at most kernel^2 * K candidates
        r, c = divmod(i, w)
        if all(max(abs(r - r2), abs(c - c2)) > half for r2, c2 in chosen):
            chosen.append((r, c))
            if len(chosen) == k:
                break
    return chosen


def _refine(total: torch.Tensor, r: int, c: int) -> tuple[float, float]:
    """Sub-pixel (x, y): centroid of the 3x3 window of ``total`` (H, W) around (r, c), zero outside the grid.

    For one exact bilinear-splatted vote, the peak is the nearest of the four corners, so all four corners
    fall in the window and the centroid recovers the vote position exactly.
    """
    h, w = total.shape
    r0, r1, c0, c1 = max(r - 1, 0), min(r + 2, h), max(c - 1, 0), min(c + 2, w)
    win = total[r0:r1, c0:c1].double().clamp_min(0)
    s = float(win.sum())
    if s <= 0:
        return float(c), float(r)
    rr = torch.arange(r0, r1, dtype=torch.float64).view(-1, 1)
    cc = torch.arange(c0, c1, dtype=torch.float64).view(1, -1)
    return float((win * cc).sum()) / s, float((win * rr).sum()) / s


def _decode_stream(
    logits: torch.Tensor,
    offsets: torch.Tensor,
    spec: StreamSpec,
    radius: float,
    upsample: float,
    stride: float,
    affine: torch.Tensor | None,
    nms_kernel: int,
) -> list[list[dict]]:
    b, c = logits.shape[:2]
    if c != spec.num_classes or offsets.shape[1] != 2 * c:
        raise ValueError(
            f"stream {spec.name!r}: expected {spec.num_classes} heatmap and {2 * spec.num_classes} offset channels, "
            f"got {c} and {offsets.shape[1]}"
        )
    if upsample != 1:
        logits = F.interpolate(logits, scale_factor=upsample, mode="bilinear", align_corners=False)
        offsets = F.interpolate(offsets, scale_factor=upsample, mode="bilinear", align_corners=False)
    hough = hough_voting(torch.sigmoid(logits.float()), offsets.float(), radius).cpu()  # (B, C, Ht, Wt)
    best = hough.amax(dim=1)
    total = hough.sum(dim=1)
    results = []
    for bi in range(b):
        found = []
        for r, col in _pick_peaks(best[bi], spec.num_levels, nms_kernel):
            scores = hough[bi, :, r, col].double()
            s = float(scores.sum())
            probs = (scores / s).tolist() if s > 0 else [1.0 / c] * c
            label = int(scores.argmax())
            tx, ty = _refine(total[bi], r, col)
            x, y = float(target_to_image(tx, stride)), float(target_to_image(ty, stride))
            mm = pixels_to_mm([[x, y]], affine[bi])[0].tolist() if affine is not None else None
            found.append(
                {
                    "label": label,
                    "class_name": spec.classes[label],
                    "probabilities": probs,
                    "score": float(scores[label]),
                    "xy": [x, y],
                    "mm": mm,
                }
            )
        # head to feet: superior = larger patient z (LPS); without geometry, smaller image row first
        found.sort(key=(lambda kp: -kp["mm"][2]) if affine is not None else (lambda kp: kp["xy"][1]))
        for i, kp in enumerate(found):
            kp["level"], kp["level_index"] = spec.levels[i], i
        keyorder = ("level", "level_index", "label", "class_name", "probabilities", "score", "xy", "mm")
        results.append([{k: kp[k] for k in keyorder} for kp in found])
    return results


def decode_keypoints(
    heatmap_logits: torch.Tensor | Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    offsets: torch.Tensor | StreamSpec | Sequence[StreamSpec] | Mapping | None = None,
    streams: StreamSpec | Sequence[StreamSpec] | Mapping | None = None,
    *,
    radius: float = 6.0,
    upsample: float = 4.0,
    stride: float = 1,
    affine: torch.Tensor | None = None,
    nms_kernel: int = 3,
) -> list[dict[str, list[dict]]]:
    """Keypoints per image and stream from heatmap logits and offsets.

    Call forms:
        ``decode_keypoints(logits (B, C, h, w), offsets (B, 2C, h, w), stream)`` for one stream;
        ``decode_keypoints({name: (logits, offsets)}, streams)`` (the form of ``bundle.streams.split_output``);
        ``decode_keypoints(output (B, sum 3C, h, w), streams)`` (the network's single output tensor).

    Per stream: logits and offsets are upsampled bilinearly (``align_corners=False``) by ``upsample``
    (network grid -> target grid; offsets are already in target pixels, so their values are not scaled),
    sigmoid, Hough voting per class channel (:func:`hough_voting`, disk radius ``radius`` target pixels),
    maximum over class channels, ``nms_kernel`` NMS by max-pool equality, the top K = number of levels
    peaks with positive score (fewer if fewer exist). At each peak: ``label`` = channel with the highest
    Hough score, ``probabilities`` = the channel scores normalised to sum 1 (uniform if all zero),
    ``score`` = the highest channel score. ``xy`` is refined to sub-pixel by the score-weighted centroid of
    the 3x3 window of the Hough map summed over class channels around the peak, then mapped from the target
    grid (``stride`` image pixels per target pixel) to image-grid pixels ``[x=col, y=row]``.
    ``mm`` = ``affine`` (voxel (row, col, k) -> mm) applied at ``k = 0``, else None. Levels are assigned
    head to feet: by descending patient z (LPS superior) with an affine, else by ascending row.

    Args:
        affine: None, (4, 4) for every image or (B, 4, 4).

    Returns:
        A list over the batch of ``{stream: [keypoint dict, ...]}``, each keypoint dict with keys ``level``,
        ``level_index``, ``label``, ``class_name``, ``probabilities``, ``score``, ``xy``, ``mm``.

    Example:
        >>> spec = StreamSpec("disc", ("a", "b"), ("n", "d"))
        >>> logits = torch.full((1, 2, 16, 16), -float("inf")); logits[0, 1, 4, 5] = 20.0  # p = 0 votes nothing
        >>> kps = decode_keypoints(logits, torch.zeros(1, 4, 16, 16), spec, upsample=1, radius=1.0)[0]["disc"]
        >>> [(kp["level"], kp["class_name"], [round(v, 3) for v in kp["xy"]]) for kp in kps]
        [('a', 'd', [5.0, 4.0])]
    """
    if isinstance(heatmap_logits, Mapping):
        if streams is not None and offsets is not None:
            raise ValueError("with the split-dict form, pass streams as the second argument only")
        specs = _as_specs(offsets if offsets is not None else streams)
        missing = [s.name for s in specs if s.name not in heatmap_logits]
        if missing:
            raise ValueError(f"split dict lacks streams {missing}; it has {sorted(heatmap_logits)}")
        parts = {s.name: heatmap_logits[s.name] for s in specs}
    elif isinstance(offsets, torch.Tensor):
        specs = _as_specs(streams)
        if len(specs) != 1:
            raise ValueError(f"logits/offsets tensors describe one stream, got {len(specs)}; pass a split dict")
        parts = {specs[0].name: (heatmap_logits, offsets)}
    else:
        specs = _as_specs(offsets if offsets is not None else streams)
        parts = split_output(heatmap_logits, {s.name: s.num_classes for s in specs})
    if upsample <= 0 or stride <= 0:
        raise ValueError(f"upsample and stride must be positive, got {upsample} and {stride}")
    if nms_kernel < 1 or nms_kernel % 2 == 0:
        raise ValueError(f"nms_kernel must be a positive odd integer, got {nms_kernel}")
    batch = int(next(iter(parts.values()))[0].shape[0])
    aff = as_affine(affine, batch) if affine is not None else None
    out: list[dict[str, list[dict]]] = [{} for _ in range(batch)]
    for spec in specs:
        logits, offs = parts[spec.name]
        if logits.ndim != 4 or offs.ndim != 4 or logits.shape[0] != batch or offs.shape[0] != batch:
            raise ValueError(
                f"stream {spec.name!r}: logits and offsets must be (B, C, h, w) and (B, 2C, h, w) with B={batch}, "
                f"got {tuple(logits.shape)} and {tuple(offs.shape)}"
            )
        # NCHW: a channels_last network output (bundle.InferenceOptimizer) makes the upsampling and voting
        # kernels walk strided memory (measured 41 ms instead of 24 ms at 640 x 640); the copy is of the small grid
        logits = logits.detach().as_subclass(torch.Tensor).contiguous()
        offs = offs.detach().as_subclass(torch.Tensor).contiguous()
        with _one_cpu_thread(logits.device.type == "cpu"):
            per_image = _decode_stream(logits, offs, spec, radius, upsample, stride, aff, nms_kernel)
        for bi, kps in enumerate(per_image):
            out[bi][spec.name] = kps
    return out


@contextlib.contextmanager
def _one_cpu_thread(enabled: bool) -> Iterator[None]:
    """Run the block with one intra-op thread, restoring the previous count.

    Decoding is ~25 small elementwise ops over a few MB: on one thread it takes ~30 ms at 640 x 640, while
    on 2 threads of a shared machine each op waits at an OpenMP barrier (measured ~245 ms, 2 cores, busy).
    """
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _as_specs(streams) -> tuple[StreamSpec, ...]:
    if streams is None:
        raise ValueError("streams are required (a StreamSpec, a sequence of them or the config mapping)")
    if isinstance(streams, StreamSpec):
        return (streams,)
    return parse_streams(streams)
