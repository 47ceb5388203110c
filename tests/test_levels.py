"""Level assignment: missed structures leave gaps, extra (thoracic) structures are dropped, on synthetic heatmaps
of phantom spines whose field of view starts anywhere from T9 to L1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bundle.codec import OCPCCodec
from bundle.levels import assign_levels
from bundle.phantoms import phantom_study
from bundle.phantoms.anatomy import DISC_NAMES
from bundle.phantoms.study import FOV_TOPS
from bundle.streams import RSNA_STREAMS, TIANCHI_STREAMS, StreamSpec

LUMBAR = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")  # phantom names of the RSNA levels L1/L2 .. L5/S1


def _codec(spec: StreamSpec) -> OCPCCodec:
    return OCPCCodec([spec], radius=4.0, target_stride=1, network_stride=1)


def test_hand_case_missed_disc_leaves_a_gap():
    """Four discs 35 mm apart with the third of five missing: levels 0, 1, 3, 4, not 0..3 (or 1..4)."""
    pos = np.array([[0.0, 0.0], [0.0, 35.0], [0.0, 105.0], [0.0, 140.0]])
    result = assign_levels(pos, np.ones(4), 5, 35.0)
    assert result.level.tolist() == [0, 1, 3, 4]
    assert np.all(result.confidence > 0.95)  # spacing consistent everywhere, full scores


def test_hand_case_thoracic_extras_and_a_spurious_peak_are_dropped():
    """Three thoracic discs above five lumbar ones, and a weak peak between two discs: only the five are named."""
    pos = np.array([[0.0, 35.0 * i] for i in range(8)] + [[3.0, 35.0 * 5.5]])
    scores = np.array([0.9] * 8 + [0.4])
    order = np.argsort(pos[:, 1])
    result = assign_levels(pos[order], scores[order], 5, 32.0)
    level = np.full(9, -2)
    level[order] = result.level
    assert level.tolist() == [-1, -1, -1, 0, 1, 2, 3, 4, -1]
    assert result.spacing == pytest.approx(35.0, rel=0.1)


def test_level_confidence_drops_with_inconsistent_spacing():
    even = assign_levels(np.array([[0.0, 35.0 * i] for i in range(5)]), np.full(5, 0.8), 5, 35.0)
    uneven = assign_levels(np.array([[0.0, v] for v in (0.0, 35.0, 55.0, 105.0, 140.0)]), np.full(5, 0.8), 5, 35.0)
    assert np.allclose(even.confidence, 0.8)
    assert (uneven.confidence <= even.confidence + 1e-12).all() and uneven.confidence[2] < 0.5
    assert ((uneven.confidence >= 0) & (uneven.confidence <= 1)).all()


def _middle_affine(geom) -> torch.Tensor:
    """4x4 voxel (row, col, k) -> mm of a phantom series' middle slice (independent of the DICOM reader)."""
    m = (geom.num_slices - 1) // 2
    a = np.eye(4)
    a[:3, 0] = geom.row_dir * geom.pixel_spacing[0]
    a[:3, 1] = geom.col_dir * geom.pixel_spacing[1]
    a[:3, 2] = geom.normal * (geom.slice_spacing or 1.0)
    a[:3, 3] = geom.positions[m]
    return torch.tensor(a)


def _visible_discs(study, names=DISC_NAMES[:8]) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Affine and the in-plane mm of every phantom disc (T10-T11 .. L5-S1) inside the sagittal T2's image."""
    geom = study.sagittal_t2.geometry
    m = (geom.num_slices - 1) // 2
    found = {}
    for name in names:
        x, y, _ = geom.to_pixel(study.spine.disc_centre(name), m)
        if -0.5 <= x < geom.cols - 0.5 and -0.5 <= y < geom.rows - 0.5:
            found[name] = geom.to_mm(x, y, m)
    return _middle_affine(geom), found


def _synthetic_output(codec: OCPCCodec, affine, shape, discs: dict[str, np.ndarray]) -> torch.Tensor:
    """A perfect network output with one disc structure at each of ``discs`` (whatever their names)."""
    spec = codec.streams[0]
    every = OCPCCodec(
        [StreamSpec(spec.name, tuple(discs), spec.classes)],
        codec.radius,
        codec.target_stride,
        codec.network_stride,
        level_ends=False,  # every disc is a level here: the map holds their indices only
    )
    points = torch.tensor(np.array(list(discs.values())), dtype=torch.float64)
    t = every.encode({spec.name: points}, {spec.name: torch.zeros(len(discs), dtype=torch.int64)}, affine, shape)
    logits = torch.where(t[f"{spec.name}_heatmap"] > 0, 8.0, -8.0)
    # the level map of a perfect network: each disc's level index counted from the stream's first level
    # (thoracic discs above it negative), on the pixels of its disk
    first = DISC_NAMES.index(spec.levels[0].replace("/", "-"))
    index = torch.tensor([DISC_NAMES.index(name) - first for name in discs], dtype=torch.float32)
    level = index[t[f"{spec.name}_level"].long()] * t[f"{spec.name}_level_mask"]
    return torch.cat([logits, t[f"{spec.name}_offset"], level])[None]


def _names(codec: OCPCCodec, output, affine, discs: dict[str, np.ndarray]) -> dict[str, str]:
    """Decoded level -> the phantom disc it landed on (nearest within 2 mm)."""
    out = {}
    for kp in codec.decode(output, affine)[0][codec.streams[0].name]:
        dist = {name: np.linalg.norm(np.asarray(kp["mm"]) - p) for name, p in discs.items()}
        nearest = min(dist, key=dist.get)
        assert dist[nearest] < 2.0
        out[kp["level"]] = nearest
        assert 0.0 <= kp["level_confidence"] <= 1.0
    return out


@pytest.mark.parametrize("fov_top", FOV_TOPS)
@pytest.mark.parametrize("index", [0, 1])
def test_levels_right_whatever_the_top_of_the_field_of_view(fov_top, index):
    """Every disc in view is detected, thoracic ones included: the five lumbar ones get their own RSNA names and
    the thoracic ones none; with the Tianchi disc stream T12-L1 is named when in view and absent when not."""
    study = phantom_study(3, index, "rsna", min_size=128, max_size=160, fov_top=fov_top)
    affine, discs = _visible_discs(study)
    shape = (study.sagittal_t2.geometry.rows, study.sagittal_t2.geometry.cols)
    assert set(LUMBAR) <= set(discs)
    assert ("T12-L1" in discs) == (fov_top != "L1") and ("T10-T11" in discs) == (fov_top in ("T9", "T10"))
    rsna = _codec(RSNA_STREAMS[0])
    named = _names(rsna, _synthetic_output(rsna, affine, shape, discs), affine, discs)
    assert named == dict(zip(RSNA_STREAMS[0].levels, LUMBAR))
    tianchi = _codec(TIANCHI_STREAMS[0])
    named = _names(tianchi, _synthetic_output(tianchi, affine, shape, discs), affine, discs)
    expected = {lv: lv for lv in TIANCHI_STREAMS[0].levels if lv in discs}
    assert named == expected


@pytest.mark.parametrize("dropped", LUMBAR)
def test_drop_one_structure_the_rest_keep_their_names(dropped):
    """Remove one disc from the synthetic heatmap (thoracic discs still in view): it is absent, no name shifts.

    A lost L5-S1 cannot be told from a lost L1-L2 by spacing alone; the level map tells them apart.
    """
    study = phantom_study(3, 2, "rsna", min_size=128, max_size=160, fov_top="T11")
    affine, discs = _visible_discs(study)
    shape = (study.sagittal_t2.geometry.rows, study.sagittal_t2.geometry.cols)
    kept = {name: p for name, p in discs.items() if name != dropped}
    rsna = _codec(RSNA_STREAMS[0])
    named = _names(rsna, _synthetic_output(rsna, affine, shape, kept), affine, kept)
    expected = {lv: name for lv, name in zip(RSNA_STREAMS[0].levels, LUMBAR) if name != dropped}
    assert named == expected


def test_fov_option_keeps_default_phantoms_unchanged():
    """``fov_top=None`` is the historical generator (byte-identical files are checked in test_phantoms)."""
    a, b = phantom_study(0, 4, "rsna"), phantom_study(0, 4, "rsna", fov_top=None)
    assert np.array_equal(a.sagittal_t2.geometry.positions, b.sagittal_t2.geometry.positions)
    with pytest.raises(ValueError, match="fov_top"):
        phantom_study(0, 4, "rsna", fov_top="T8")


def test_hand_case_level_estimates_tell_a_missed_last_level_from_a_missed_first():
    """Four equally spaced discs of five levels: spacing alone anchors them at the caudal end (levels 1-4);
    estimates near 0..3 (L5/S1 missed) move them to 0-3, estimates near 1..4 keep 1-4; NaN is no cue."""
    pos = np.stack([np.zeros(4), 35.0 * np.arange(4)], 1)
    assert assign_levels(pos, np.ones(4), 5, 35.0).level.tolist() == [1, 2, 3, 4]
    est = np.array([0.1, 0.9, 2.2, 3.0])
    got = assign_levels(pos, np.ones(4), 5, 35.0, level_estimates=est)
    assert got.level.tolist() == [0, 1, 2, 3]
    assert assign_levels(pos, np.ones(4), 5, 35.0, level_estimates=est + 1).level.tolist() == [1, 2, 3, 4]
    assert assign_levels(pos, np.ones(4), 5, 35.0, level_estimates=np.full(4, np.nan)).level.tolist() == [1, 2, 3, 4]
    # confidence falls with the disagreement between the estimate and the level taken
    assert got.confidence[2] < got.confidence[3]
    with pytest.raises(ValueError, match="level_sigma"):
        assign_levels(pos, np.ones(4), 5, 35.0, level_estimates=est, level_sigma=0.0)


def _brute_force_cost(chain, pos, rel, k, d, est, costs) -> float:
    """The module doc's cost of one chain ``[(level, candidate), ...]`` at spacing ``d``, term by term."""
    skip, reject, anchor, sigma, level_sigma = costs
    if not chain:
        return skip * k + anchor + reject * rel.sum()

    def level_term(j: int, i: int) -> float:
        return 0.0 if est is None or not np.isfinite(est[i]) else (est[i] - j) ** 2 / (2 * level_sigma**2)

    j0, (jm, im) = chain[0][0], chain[-1]
    total = skip * j0 + anchor * (k - 1 - jm) + reject * rel[im + 1 :].sum()
    total += sum(-np.log(rel[i]) + level_term(j, i) for j, i in chain)
    for (jp, ip), (j, i) in zip(chain, chain[1:]):
        gap = np.linalg.norm(pos[i] - pos[ip])
        total += (
            np.log(gap / ((j - jp) * d)) ** 2 / (2 * sigma**2) + skip * (j - jp - 1) + reject * rel[ip + 1 : i].sum()
        )
    return total


def _all_chains(n: int, k: int):
    """Every order-preserving one-to-one map from a subset of k levels to a subset of n candidates."""
    from itertools import combinations

    yield []
    for m in range(1, min(n, k) + 1):
        for levels in combinations(range(k), m):
            for candidates in combinations(range(n), m):
                yield list(zip(levels, candidates))


@pytest.mark.parametrize("seed", range(16))
def test_assignment_is_the_brute_force_minimum_over_every_chain_and_spacing(seed):
    """The batched dynamic programme (all spacings at once) returns the chain and spacing of least total cost
    found by enumerating every chain at every spacing of the grid, with the log-normal spacing prior."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 5))
    n = int(rng.integers(k, k + 4))  # spurious candidates between and below the levels
    pos = np.cumsum(rng.uniform(5.0, 45.0, size=(n, 2)), axis=0)
    scores = rng.uniform(0.05, 2.0, n)
    est = rng.uniform(-1.0, k, n) if seed % 2 else None
    got = assign_levels(pos, scores, k, 35.0, level_estimates=est)
    rel = np.clip(scores / scores.max(), 1e-12, 1.0)
    costs = (3.0, 4.0, 8.0, 0.2, 0.35)  # assign_levels' defaults: skip, reject, anchor, spacing and level sigma
    options = []
    for factor in np.exp(np.linspace(-0.5, 0.5, 11)):
        prior = np.log(factor) ** 2 / (2 * 0.25**2)
        for chain in _all_chains(n, k):
            options.append(
                (_brute_force_cost(chain, pos, rel, k, 35.0 * factor, est, costs) + prior, 35.0 * factor, chain)
            )
    best_cost, best_d, best_chain = min(options, key=lambda o: o[0])
    got_chain = [(int(j), i) for i, j in enumerate(got.level) if j >= 0]
    got_chain.sort()
    prior = np.log(got.spacing / 35.0) ** 2 / (2 * 0.25**2)
    assert _brute_force_cost(got_chain, pos, rel, k, got.spacing, est, costs) + prior == pytest.approx(
        best_cost, abs=1e-9
    )
    ties = [o for o in options if o[0] <= best_cost + 1e-9]
    if len(ties) == 1:
        assert got_chain == best_chain and got.spacing == pytest.approx(best_d)
