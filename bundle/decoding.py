"""Decoding kernels used by :meth:`bundle.codec.OCPCCodec.decode`: Hough voting (paper eq. 3), peak picking and
sub-pixel refinement. Nothing here knows about streams, levels or mm; the codec owns those.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PATCH_HALF",
    "REFINE_STEPS",
    "REFINE_TOLERANCE",
    "hough_voting",
    "upsample_blocks",
    "landing_reach",
    "splat_points",
    "max_filter",
    "pick_peaks",
    "refine_peak",
    "refine_peaks",
    "splat_votes",
    "splat_votes_public",
]

#: use ``aten.grid_sampler_2d_backward`` (private) when this torch has it; :func:`splat_votes_public` otherwise
USE_PRIVATE_SPLAT = hasattr(torch.ops.aten, "grid_sampler_2d_backward")


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
    dtype = probs.dtype if probs.is_floating_point() else torch.float32
    probs, offsets = probs.as_subclass(torch.Tensor), offsets.as_subclass(torch.Tensor)  # drop MetaTensor meta
    p = probs.to(dtype).reshape(b * c, 1, h, w)
    off = offsets.to(dtype).reshape(b * c, 2, h, w)
    votes = splat_votes(p, off) if USE_PRIVATE_SPLAT else splat_votes_public(p, off)
    return votes.view(b, c, h, w).div_(math.pi * radius * radius)


def max_filter(score: torch.Tensor, kernel: int) -> torch.Tensor:
    """``kernel`` x ``kernel`` moving maximum of (..., H, W) maps, -inf outside: ``F.max_pool2d(stride=1,
    padding=kernel // 2)``, computed separably with ``torch.maximum`` (max_pool2d on one channel is
    single-threaded and keeps indices, about 10x slower at 640 x 640); leading dimensions in one pass."""
    half = kernel // 2
    if half == 0:
        return score
    h, w = score.shape[-2:]
    lead = score.shape[:-2]
    flat = score.reshape(-1, h, w)
    padded = F.pad(flat, (half, half, half, half), value=-math.inf)
    across = padded[..., 0:w]
    for dx in range(1, kernel):
        across = torch.maximum(across, padded[..., dx : dx + w])
    pooled = across[:, 0:h]
    for dy in range(1, kernel):
        pooled = torch.maximum(pooled, across[:, dy : dy + h])
    return pooled.reshape(*lead, h, w)


def pick_peaks(score: torch.Tensor, k: int, kernel: int) -> list[tuple[int, int]]:
    """Top-``k`` local maxima (row, col) of one (H, W) map with ``kernel`` x ``kernel`` NMS, scores > 0.

    Plateaus (equal neighbours, e.g. a vote split evenly between two pixels) pass max-pool equality on
    every pixel; of candidates closer than the kernel half-width, only the first in score order is kept.
    """
    pooled = max_filter(score, kernel)
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


#: most mean-shift steps of :func:`refine_peak`, and the step (target pixels) below which it has converged
REFINE_STEPS = 16
REFINE_TOLERANCE = 1e-4
_REACH = 2  # the estimate stays within this many pixels of the start; the patch spans its window's reach
#: :func:`refine_peaks` reads ``total`` up to this many pixels from the peak (rows and columns)
PATCH_HALF = _REACH + 2


def _cell_overlap(centre: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Overlap (in [0, 1]) of the unit cells ``[lower, upper]`` (P,) (pixel -/+ 0.5) with the 3-pixel windows
    ``[centre - 1.5, centre + 1.5]``, centres (K, 1) -> (K, P): 1 inside, fractional at its two edges, 0 outside."""
    return np.clip(np.minimum(upper, centre + 1.5) - np.maximum(lower, centre - 1.5), 0.0, 1.0)


def refine_peak(total: torch.Tensor, r: int, c: int) -> tuple[float, float]:
    """Sub-pixel (x, y) of the peak of ``total`` (H, W) picked at pixel (r, c): mean shift of a 3 x 3 window.

    The first step is the centroid of the 3 x 3 window around (r, c) (zero outside the grid); each further
    step re-centres a 3 x 3 window on the estimate (edge pixels weighted by the fraction of their cell inside
    it) and takes its centroid, until a step moves less than :data:`REFINE_TOLERANCE` pixels (at most
    :data:`REFINE_STEPS` steps; the estimate stays within 2 pixels of (r, c)). The fixed point does not depend
    on which of near-tied neighbouring pixels the peak picking chose. For one exact bilinear-splatted vote the
    peak is the nearest of its four corners, the first window holds all four and the centroid is the vote
    position, which is also the fixed point. :func:`refine_peaks` does the same for many peaks at once.

    Example:
        >>> m = torch.zeros(5, 5); m[1:3, 2:4] = torch.tensor([[0.12, 0.28], [0.18, 0.42]])  # vote at (2.7, 1.6)
        >>> [round(v, 6) for v in refine_peak(m, 2, 3)]
        [2.7, 1.6]
    """
    x, y = refine_peaks(total, [(r, c)])[0]
    return float(x), float(y)


def _patches(total: torch.Tensor, peaks: Sequence[tuple[int, int]], half: int) -> np.ndarray:
    """(K, 2 half + 1, 2 half + 1) float64 windows of ``total`` (H, W) centred on each (row, col), zero off
    the grid and where ``total`` is negative."""
    h, w = total.shape
    span = torch.arange(-half, half + 1)
    at = torch.tensor(peaks, dtype=torch.int64).view(-1, 2)
    rows, cols = at[:, :1] + span, at[:, 1:] + span  # (K, P) each
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    patch = total[rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    return torch.where(inside, patch.double().clamp_min(0), 0.0).numpy()


def refine_peaks(total: torch.Tensor, peaks: Sequence[tuple[int, int]]) -> np.ndarray:
    """:func:`refine_peak` of every (row, col) in ``peaks`` at once -> (K, 2) float64 sub-pixel (x, y).

    Each peak runs its own steps and stops when it converges (or its window sums to 0), as one call would.
    """
    if len(peaks) == 0:
        return np.zeros((0, 2))
    half = PATCH_HALF  # window half-width 1.5 around an estimate at most _REACH from the start
    patch = _patches(total, peaks, half)  # (K, P, P)
    offsets = np.arange(-half, half + 1, dtype=np.float64)  # pixel positions relative to (r, c)
    lower, upper = offsets - 0.5, offsets + 0.5
    d = np.zeros((len(peaks), 2))  # (dx, dy) per peak
    active = np.ones(len(peaks), dtype=bool)
    for _ in range(REFINE_STEPS):  # every peak computes each step (a few numpy calls); converged ones keep d
        if not active.any():
            break
        weights = _cell_overlap(d[:, :, None], lower, upper)  # (K, 2, P): x then y window weights
        wx, wy = weights[:, 0], weights[:, 1]
        cols = (wy[:, None, :] @ patch)[:, 0] * wx  # window-weighted column and row profiles (K, P)
        rows = (patch @ wx[:, :, None])[:, :, 0] * wy
        s = cols.sum(axis=1)
        moving = active & (s > 0)
        new = np.clip(np.stack([cols, rows], axis=1) @ offsets / np.where(moving, s, 1.0)[:, None], -_REACH, _REACH)
        step = np.abs(new - d).max(axis=1)
        d = np.where(moving[:, None], new, d)
        active &= moving & (step >= REFINE_TOLERANCE)
    at = np.asarray(peaks, dtype=np.float64).reshape(-1, 2)
    return np.stack([at[:, 1] + d[:, 0], at[:, 0] + d[:, 1]], axis=1)


def landing_reach(offsets: torch.Tensor, up: int) -> torch.Tensor:
    """Where the votes of each network pixel's block can land on a target grid ``up`` times finer.

    ``offsets`` (2C, h, w) interleaved ``(dx_c, dy_c)`` in target pixels on the network grid; the target grid
    is their bilinear upsampling (``align_corners=False``), whose pixels ``[i up, (i + 1) up)`` (block of
    network pixel i) interpolate network pixels i - 1 .. i + 1, so their offsets lie between the minimum and
    maximum over that 3 x 3 neighbourhood and all classes. Returns (4, h, w): x_lo, x_hi, y_lo, y_hi, bounds
    (target pixels) of the landing points of the block's votes. NaN offsets (votes dropped) count as 0.
    """
    c2, h, w = offsets.shape
    limit = float(up * (h + w) + 2)  # beyond the grid either way: a vote landing there is dropped
    off = torch.nan_to_num(offsets.float(), nan=0.0, posinf=limit, neginf=-limit).clamp(-limit, limit)
    x, y = off[0::2], off[1::2]
    # the four extremes negated where a minimum is wanted, so that one 3 x 3 maximum filter serves them all
    spread = max_filter(torch.stack([-x.amin(dim=0), x.amax(dim=0), -y.amin(dim=0), y.amax(dim=0)]), 3)
    spread[0::2].neg_()
    start = torch.stack(
        torch.meshgrid(torch.arange(h, dtype=off.dtype), torch.arange(w, dtype=off.dtype), indexing="ij")
    )
    start = start.flip(0).repeat_interleave(2, dim=0).mul_(up)  # (4, h, w): column, column, row, row
    start[1::2] += up - 1
    return start + spread


def _block_weights(up: int, dtype: torch.dtype) -> torch.Tensor:
    """(up^2, 9) weights of a network pixel's 3 x 3 neighbourhood (row-major, replicate-padded) for each target
    pixel (row-major) of its ``up`` x ``up`` block under bilinear upsampling, ``align_corners=False``: target
    pixel k of a block sits at ``(k + 0.5) / up - 0.5`` network pixels from its centre, between the centre and
    the neighbour on that side."""
    s = (torch.arange(up, dtype=torch.float64) + 0.5) / up - 0.5  # (up,) in (-0.5, 0.5)
    one = torch.zeros(up, 3, dtype=torch.float64)  # 1-D weights on neighbours -1, 0, +1
    one[:, 0], one[:, 1], one[:, 2] = (-s).clamp_min(0), 1 - s.abs(), s.clamp_min(0)
    return (one[:, None, :, None] * one[None, :, None, :]).reshape(up * up, 9).to(dtype)


def upsample_blocks(field: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, up: int) -> torch.Tensor:
    """``F.interpolate(field[None], scale_factor=up, mode="bilinear", align_corners=False)[0]`` on the ``up`` x
    ``up`` target blocks of network pixels (rows, cols) (S,) int64 only: field (M, h, w) -> (M, S, up^2), each
    block row-major (target pixels ``rows * up + ky``, ``cols * up + kx``). Bilinear weights within a block do
    not depend on where the block is, so every block is one gather of its 3 x 3 neighbourhood (edges
    replicated, as the interpolation clamps them) and one product with :func:`_block_weights`."""
    m, h, w = field.shape
    padded = F.pad(field[None], (1, 1, 1, 1), mode="replicate")[0].reshape(m, (h + 2) * (w + 2))
    step = torch.arange(3)
    around = ((rows[:, None, None] + step[:, None]) * (w + 2) + cols[:, None, None] + step).reshape(-1)  # (S 9,)
    taps = padded.index_select(1, around).view(m, -1, 9)
    return taps @ _block_weights(up, field.dtype).T


def splat_points(weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Bilinear splat of M maps' point votes: ``weights``, ``x`` (column), ``y`` (row) (M, N) in pixels of a grid
    of ``shape`` (H, W) -> (M, H, W); corners outside the grid (and NaN points) are dropped, as in
    :func:`splat_votes`."""
    m, n = weights.shape
    h, w = int(shape[0]), int(shape[1])
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], dim=-1).nan_to_num_(nan=-3.0).clamp_(-3.0, 3.0)
    if USE_PRIVATE_SPLAT:
        like = weights.new_zeros(()).expand(m, 1, h, w)  # the input's shape only
        votes, _ = torch.ops.aten.grid_sampler_2d_backward(
            weights.view(m, 1, 1, n), like, grid.view(m, 1, n, 2), 0, 0, False, [True, False]
        )
        return votes.view(m, h, w)
    gx, gy = (grid[..., 0] + 1) * (w / 2) - 0.5, (grid[..., 1] + 1) * (h / 2) - 0.5
    out = torch.zeros(m * h * w, dtype=weights.dtype)
    base = (torch.arange(m) * (h * w)).view(m, 1)
    fx, fy = gx - gx.floor(), gy - gy.floor()
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            cx, cy = (gx.floor() + dx).long(), (gy.floor() + dy).long()
            inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
            out.index_add_(0, (base + cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1))[inside], (weights * wx * wy)[inside])
    return out.view(m, h, w)


def _landing_grid(p: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Vote landing points (N, H, W, 2) in grid_sample's normalised coordinates (align_corners=False)."""
    _, _, h, w = p.shape
    dtype = p.dtype
    cols = torch.arange(w, device=p.device, dtype=dtype).view(1, w).expand(h, w)
    rows = torch.arange(h, device=p.device, dtype=dtype).view(h, 1).expand(h, w)
    # pixel u -> (2u + 1) / n - 1, computed in the (N, 2, H, W) layout and viewed as the (N, H, W, 2) grid
    scale = torch.tensor([2.0 / w, 2.0 / h], device=p.device, dtype=dtype).view(1, 2, 1, 1)
    shift = torch.tensor([1.0 / w - 1.0, 1.0 / h - 1.0], device=p.device, dtype=dtype).view(1, 2, 1, 1)
    grid = (off + torch.stack([cols, rows])).mul_(scale).add_(shift)
    # non-finite or huge offsets: move the vote well outside (all corners dropped) before any int cast
    return grid.nan_to_num_(nan=-3.0).clamp_(-3.0, 3.0).permute(0, 2, 3, 1)


def splat_votes(p: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Bilinear splat of votes ``p`` (N, 1, H, W) at pixel + ``off`` (N, 2, H, W) -> (N, 1, H, W) (private op).

    Bilinear splatting is the adjoint of bilinear sampling, so the votes are the gradient of ``F.grid_sample``
    with respect to its input: one fused pass instead of ~30 elementwise ops. The backward kernel is called
    directly (no forward pass, no autograd graph, so it runs under ``torch.inference_mode()``).
    :func:`splat_votes_public` computes the same with public ops (tests check that they agree).
    """
    votes, _ = torch.ops.aten.grid_sampler_2d_backward(
        p, p, _landing_grid(p, off), 0, 0, False, [True, False]  # grad_output, input (shape), grid, bilinear, zeros
    )
    return votes


def splat_votes_public(p: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """:func:`splat_votes` with public ops only: ``index_add_`` of the four bilinear corners, out-of-grid
    corners dropped one by one."""
    n, _, h, w = p.shape
    grid = _landing_grid(p, off)
    x = (grid[..., 0] + 1.0) * (w / 2.0) - 0.5  # back to pixel units, (N, H, W)
    y = (grid[..., 1] + 1.0) * (h / 2.0) - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    weight = p[:, 0]
    out = torch.zeros(n * h * w, dtype=p.dtype, device=p.device)
    base = (torch.arange(n, device=p.device) * (h * w)).view(n, 1, 1)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            cx, cy = (x0 + dx).long(), (y0 + dy).long()
            inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
            index = (base + cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1))[inside]
            out.index_add_(0, index, (weight * wx * wy)[inside])
    return out.view(n, 1, h, w)
