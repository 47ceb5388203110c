"""Level assignment: name the detected candidates of one stream by dynamic programming along the spine.

The candidates (more than the K levels) are ordered head to feet. An assignment is an order-preserving,
one-to-one map from a subset of the levels to a subset of the candidates, and its cost is the sum of

- ``-log(s_i / s_max)`` for each candidate taken (its Hough score relative to the stream's best);
- ``skip_cost`` for each level left without a candidate above or between the taken ones (a missed
  structure leaves a gap, not a shift), ``anchor_cost`` for each level left empty below the most caudal
  taken one;
- ``(log(g / (n d)))^2 / (2 spacing_sigma^2)`` between two consecutive taken candidates ``g`` mm apart
  whose levels are ``n`` apart, ``d`` the inter-level spacing; and a log-normal prior on ``d`` around
  the expected spacing (``d`` is chosen from a grid by the lowest total cost);
- ``reject_cost * s_i / s_max`` for each candidate left out *between* or *below* the taken ones, while a
  candidate above the most cranial taken one is free: the caudal end anchors the levels (on a lumbar
  scan the sacrum is always in view while the top of the field of view varies from T9 to L1), so extra
  thoracic structures above L1 are dropped.

- with level estimates ``e_i`` (the network's level map read at each candidate, in level units),
  ``(e_i - j)^2 / (2 level_sigma^2)`` for candidate ``i`` taken as level ``j``: the cue that tells a missed
  last level (L5/S1) from a missed first one, which spacing alone cannot.

``level_confidence`` of a taken candidate = ``min(1, s_i)`` times the mean spacing-consistency term
``exp(-cost)`` of its links to its neighbours in the chain (1 without neighbours), times
``exp(-(e_i - j)^2 / (2 level_sigma^2))`` with estimates, in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LevelAssignment", "assign_levels"]


@dataclass(frozen=True)
class LevelAssignment:
    """``level[i]`` = level index of candidate ``i`` or -1 (dropped); ``confidence[i]`` in [0, 1]; ``spacing``."""

    level: np.ndarray
    confidence: np.ndarray
    spacing: float


def _gap_cost(gap: np.ndarray, n: int, spacing: float, sigma: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log(np.maximum(gap, 1e-9) / (n * spacing))
    return r * r / (2.0 * sigma * sigma)


def _level_cost(estimates: np.ndarray | None, k: int, n: int, sigma: float) -> np.ndarray:
    """(K, N) cost of taking candidate ``i`` as level ``j``: ``(e_i - j)^2 / (2 sigma^2)``; 0 where ``e_i`` is NaN
    (no estimate) and everywhere without estimates."""
    if estimates is None:
        return np.zeros((k, n))
    cost = (estimates[None, :] - np.arange(k)[:, None]) ** 2 / (2.0 * sigma * sigma)
    return np.where(np.isfinite(cost), cost, 0.0)


def _best_chain(
    pos: np.ndarray,
    rel: np.ndarray,
    k: int,
    spacings: np.ndarray,
    prior: np.ndarray,
    sigma: float,
    skip: float,
    reject: float,
    anchor: float,
    level_cost: np.ndarray,
) -> tuple[int, list[tuple[int, int]]]:
    """Lowest-cost chain ``[(level, candidate), ...]`` over the (F,) grid of ``spacings`` (each with its
    ``prior`` cost); candidates are in head-to-feet order. Returns the winning spacing's index and its chain.

    The dynamic programme runs on (F, K, N) arrays, every spacing in one pass of numpy calls (hand-written:
    no library offers this ordered-assignment DP); the first of equal-cost spacings wins."""
    n, f = len(rel), len(spacings)
    gap = np.linalg.norm(pos[None, :, :] - pos[:, None, :], axis=-1)[None]  # (1, N, N)
    order = np.arange(n)
    later = order[None, :] > order[:, None]  # [i', i]: i' above i
    prefix = np.concatenate([[0.0], np.cumsum(rel)])
    between = reject * (prefix[None, :-1] - prefix[1:, None])  # [i', i]: rel summed strictly between i' and i
    between = np.where(later, between, np.inf)
    below = reject * (prefix[-1] - prefix[1:])  # sum of rel strictly below i
    unary = -np.log(np.clip(rel, 1e-12, None))
    cost = np.full((f, k, n), np.inf)
    back = np.full((f, k, n, 2), -1, dtype=np.int64)
    # link costs by level difference m = k-1 .. 1 (F, K-1, N, N): the previous level jp < j reads m = j - jp
    links = [_gap_cost(gap, m, spacings[:, None, None], sigma) + between + skip * (m - 1) for m in range(k - 1, 0, -1)]
    steps = np.stack(links, axis=1) if links else np.zeros((f, 0, n, n))
    for j in range(k):
        start = unary + level_cost[j] + skip * j  # chain starts here: levels above skipped, candidates above free
        cost[:, j] = start
        if j == 0:
            continue
        # [f, jp, i', i]: chain ... (jp, i') then (j, i), all previous levels at once; the first minimum in
        # (jp, i') order wins, and a chain only where strictly cheaper than starting here
        total = (cost[:, :j, :, None] + steps[:, k - 1 - j :] + (unary + level_cost[j])).reshape(f, j * n, n)
        best = total.argmin(axis=1)  # (F, N)
        value = np.take_along_axis(total, best[:, None, :], axis=1)[:, 0]
        better = value < start
        cost[:, j] = np.where(better, value, start)
        back[:, j][better] = np.stack([best[better] // n, best[better] % n], axis=1)
    end = (cost + anchor * (k - 1 - np.arange(k))[:, None] + below).reshape(f, -1)
    cell = end.argmin(axis=1)
    chain_cost = end[np.arange(f), cell]
    empty = skip * k + anchor + reject * float(prefix[-1])
    use_empty = ~np.isfinite(chain_cost) | (empty < chain_cost)
    winner = int(np.argmin(np.where(use_empty, empty, chain_cost) + prior))
    if use_empty[winner]:
        return winner, []
    chain, (j, i) = [], np.unravel_index(int(cell[winner]), (k, n))
    while j >= 0:
        chain.append((int(j), int(i)))
        j, i = back[winner, j, i]
    return winner, chain[::-1]


def assign_levels(
    positions: np.ndarray,
    scores: np.ndarray,
    num_levels: int,
    spacing: float,
    *,
    spacing_sigma: float = 0.2,
    spacing_prior_sigma: float = 0.25,
    skip_cost: float = 3.0,
    reject_cost: float = 4.0,
    anchor_cost: float = 8.0,
    level_estimates: np.ndarray | None = None,
    level_sigma: float = 0.35,
) -> LevelAssignment:
    """Assign level indices 0..K-1 (head to feet) to candidates by dynamic programming (see the module doc).

    Args:
        positions: (N, D) candidate positions (mm, or pixels without geometry), ordered head to feet.
        scores: (N,) positive candidate scores (Hough scores).
        num_levels: K.
        spacing: expected distance between neighbouring levels, in the unit of ``positions``.
        level_estimates: (N,) optional level index estimates per candidate (0 = first level), e.g. the
            network's level map at each candidate; None (or NaN for a candidate) = spacing and scores only.
        level_sigma: spread of the estimates, in levels.

    Example:
        >>> pos = np.array([[0.0, 0.0], [0.0, 35.0], [0.0, 105.0]])  # the level at 70 mm is missed
        >>> assign_levels(pos, np.ones(3), 4, 35.0).level.tolist()
        [0, 1, 3]
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = len(s)
    pos = np.asarray(positions, dtype=np.float64).reshape(n, -1) if n else np.zeros((0, 2))
    level, confidence = np.full(n, -1, dtype=np.int64), np.zeros(n)
    if n == 0 or num_levels < 1 or not (s > 0).any():
        return LevelAssignment(level, confidence, float(spacing))
    if spacing <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    rel = np.clip(s / s.max(), 1e-12, 1.0)
    est = None if level_estimates is None else np.asarray(level_estimates, dtype=np.float64).reshape(n)
    if level_sigma <= 0:
        raise ValueError(f"level_sigma must be positive, got {level_sigma}")
    level_cost = _level_cost(est, num_levels, n, level_sigma)
    factors = np.exp(np.linspace(-0.5, 0.5, 11))  # d from 0.61 to 1.65 times the expected spacing
    prior = np.log(factors) ** 2 / (2.0 * spacing_prior_sigma**2)
    winner, chain = _best_chain(
        pos, rel, num_levels, spacing * factors, prior, spacing_sigma, skip_cost, reject_cost, anchor_cost, level_cost
    )
    d = float(spacing * factors[winner])
    for idx, (j, i) in enumerate(chain):
        level[i] = j
        links = []
        for other in (chain[idx - 1] if idx > 0 else None, chain[idx + 1] if idx + 1 < len(chain) else None):
            if other is not None:
                gap = np.linalg.norm(pos[i] - pos[other[1]])
                links.append(float(np.exp(-_gap_cost(np.array(gap), abs(j - other[0]), d, spacing_sigma))))
        agreement = float(np.exp(-level_cost[j, i]))
        confidence[i] = min(1.0, float(s[i])) * (float(np.mean(links)) if links else 1.0) * agreement
    return LevelAssignment(level, confidence, d)
