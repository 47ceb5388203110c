"""Hough voting against a brute-force reference; encode -> decode round trips through bundle.codec."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bundle.codec import OCPCCodec, pixels_to_mm, target_to_image
from bundle.decoding import hough_voting, refine_peak, refine_peaks, splat_votes, splat_votes_public
from bundle.streams import StreamSpec, split_output
from bundle.transforms import OCPCTargetsd
from monai.data import MetaTensor

DISC = StreamSpec("disc", ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"), ("n", "m", "s"))
VERT = StreamSpec("vertebra", ("L1", "L2", "L3", "L4", "L5"), ("n", "d"))


def _brute_hough(probs: np.ndarray, offsets: np.ndarray, radius: float) -> np.ndarray:
    b, c, h, w = probs.shape
    out = np.zeros_like(probs, dtype=np.float64)
    for bi in range(b):
        for ci in range(c):
            for r in range(h):
                for q in range(w):
                    x = q + offsets[bi, 2 * ci, r, q]
                    y = r + offsets[bi, 2 * ci + 1, r, q]
                    if not (abs(x) < 1e6 and abs(y) < 1e6):  # NaN / huge: lands nowhere
                        continue
                    for yy in range(math.floor(y), math.floor(y) + 2):
                        for xx in range(math.floor(x), math.floor(x) + 2):
                            if 0 <= yy < h and 0 <= xx < w:
                                wgt = max(0.0, 1 - abs(x - xx)) * max(0.0, 1 - abs(y - yy))
                                out[bi, ci, yy, xx] += probs[bi, ci, r, q] * wgt
    return out / (math.pi * radius**2)


def test_hough_voting_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 2, 9, 11, generator=g, dtype=torch.float64)
    offsets = (torch.rand(2, 4, 9, 11, generator=g, dtype=torch.float64) - 0.5) * 8.0  # many votes land outside
    offsets[0, 0, 0, 0] = 2.0  # an exactly integer offset
    offsets[0, 2, 3, 3] = -3.0  # lands exactly on the left border column
    offsets[1, 1, 4, 5] = float("nan")  # a broken offset votes nowhere
    offsets[1, 2, 2, 2] = 1e12
    got = hough_voting(probs, offsets, radius=2.5)
    ref = _brute_hough(probs.numpy(), offsets.numpy(), 2.5)
    assert got.shape == (2, 2, 9, 11)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    assert got.sum() < probs.sum() / (math.pi * 2.5**2)  # votes falling outside were dropped


def test_hough_voting_argument_checks():
    with pytest.raises(ValueError, match="2C"):
        hough_voting(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), 1.0)
    with pytest.raises(ValueError, match="radius"):
        hough_voting(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), 0.0)


def _affine(flip_rows: bool = False) -> torch.Tensor:
    """Oblique sagittal affine; rows run towards the feet (decreasing z) unless ``flip_rows``."""
    th = math.radians(14.0)
    col_dir = np.array([0.12, math.cos(th), math.sin(th)])
    col_dir /= np.linalg.norm(col_dir)
    row_dir = np.array([0.05, math.sin(th), -math.cos(th)])
    row_dir -= col_dir * (col_dir @ row_dir)
    row_dir /= np.linalg.norm(row_dir)
    if flip_rows:
        row_dir = -row_dir
    a = np.eye(4)
    a[:3, 0], a[:3, 1] = 0.9 * row_dir, 0.7 * col_dir
    a[:3, 2] = np.cross(col_dir, row_dir) * 4.0
    a[:3, 3] = [3.0, -50.0, 20.0]
    return torch.tensor(a)


def _case(spec: StreamSpec, xy: np.ndarray, labels: list[int], affine: torch.Tensor):
    """Ground truth in level order (z descending): pixels (L, 2), mm (L, 3), labels (L,)."""
    mm = pixels_to_mm(torch.tensor(xy), affine)
    order = torch.argsort(mm[:, 2], descending=True)
    return torch.tensor(xy)[order], mm[order], torch.tensor(labels)[order]


def _perfect_prediction(out: dict, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = torch.logit(out[f"{name}_heatmap"] * 0.999)[None]  # 0 -> -inf: background votes nothing
    return logits, out[f"{name}_offset"][None], out[f"{name}_level"][None]


def _no_level(logits: torch.Tensor) -> torch.Tensor:
    """A level map without information (NaN): the level assignment then uses spacing and scores only."""
    return torch.full_like(logits[:, :1], float("nan"))


def _check(kps: list[dict], spec: StreamSpec, xy, mm, labels, tol: float):
    assert [kp["level"] for kp in kps] == list(spec.levels)
    assert [kp["level_index"] for kp in kps] == list(range(spec.num_levels))
    assert [kp["label"] for kp in kps] == labels.tolist()
    assert [kp["class_name"] for kp in kps] == [spec.classes[i] for i in labels.tolist()]
    np.testing.assert_allclose([kp["xy"] for kp in kps], xy.numpy(), atol=tol)
    if mm is not None:
        np.testing.assert_allclose([kp["mm"] for kp in kps], mm.numpy(), atol=tol * 0.9 + 1e-6)
    for kp in kps:
        assert sum(kp["probabilities"]) == pytest.approx(1.0)
        assert kp["probabilities"][kp["label"]] == pytest.approx(1.0)  # perfect one-hot heatmaps
        assert kp["score"] > 0


def _codec(streams, radius: float = 6.0, target_stride: int = 1, network_stride: int = 1, **kw) -> OCPCCodec:
    """The test cases' discs lie ~19 mm apart (21 rows of 0.9 mm)."""
    kw.setdefault("level_spacing_mm", 19.0)
    return OCPCCodec(streams, radius=radius, target_stride=target_stride, network_stride=network_stride, **kw)


def _output(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=1)


def _round_trip_inputs(flip_rows: bool = False, stride: int = 1, radius: float = 6.0, size: int = 128):
    affine = _affine(flip_rows)
    rng = np.random.default_rng(3)
    y_d = 8.0 + 21.0 * np.arange(6) + rng.uniform(0, 1, 6)
    x_d = 60.0 + 6.0 * np.sin(np.arange(6)) + rng.uniform(0, 1, 6)
    y_v = y_d[:5] + 10.5
    x_v = x_d[:5] - 4.25
    disc = _case(DISC, np.stack([x_d, y_d], 1), [0, 1, 2, 0, 2, 1], affine)
    vert = _case(VERT, np.stack([x_v, y_v], 1), [1, 0, 0, 1, 1], affine)
    image = MetaTensor(torch.zeros(7, size, size), affine=affine)
    data = {
        "image": image,
        "disc_points": disc[1],
        "disc_labels": disc[2],
        "vertebra_points": vert[1],
        "vertebra_labels": vert[2],
    }
    out = OCPCTargetsd(_codec([DISC, VERT], radius=radius, target_stride=stride))(data)
    return affine, disc, vert, out


@pytest.mark.parametrize("flip_rows", [False, True])
def test_round_trip_oblique_affine_both_streams(flip_rows):
    affine, disc, vert, out = _round_trip_inputs(flip_rows)
    np.testing.assert_allclose(out["disc_points_px"].numpy(), disc[0].numpy(), atol=1e-4)
    output = _output(*_perfect_prediction(out, "disc"), *_perfect_prediction(out, "vertebra"))
    res = _codec([DISC, VERT]).decode(output, affine)
    assert len(res) == 1 and set(res[0]) == {"disc", "vertebra"}
    _check(res[0]["disc"], DISC, disc[0], disc[1], disc[2], tol=0.01)
    _check(res[0]["vertebra"], VERT, vert[0], vert[1], vert[2], tol=0.01)
    rows = [kp["xy"][1] for kp in res[0]["disc"]]
    # head to feet follows patient z: with rows pointing up in z the first level is the lowest row
    assert rows == sorted(rows, reverse=flip_rows)


def test_round_trip_without_affine_orders_by_row():
    _, disc, _, out = _round_trip_inputs(flip_rows=True)
    logits, offsets, _ = _perfect_prediction(out, "disc")  # no level cue: names follow the rows
    kps = _codec([DISC]).decode(_output(logits, offsets, _no_level(logits)))[0]["disc"]
    order = torch.argsort(disc[0][:, 1])
    _check(kps, DISC, disc[0][order], None, disc[2][order], tol=0.01)
    assert all(kp["mm"] is None for kp in kps)


def test_round_trip_full_output_tensor_and_batched_affines():
    affine, disc, vert, out = _round_trip_inputs()
    dl, do, dv = _perfect_prediction(out, "disc")
    vl, vo, vv = _perfect_prediction(out, "vertebra")
    output = torch.cat([dl, do, dv, vl, vo, vv], 1).repeat(2, 1, 1, 1)
    parts = split_output(output, {"disc": 3, "vertebra": 2})
    assert torch.equal(parts["vertebra"][1], vo.repeat(2, 1, 1, 1))
    assert torch.equal(parts["vertebra"][2], vv.repeat(2, 1, 1, 1))
    codec = _codec(
        {
            "disc": {"levels": DISC.levels, "classes": DISC.classes},
            "vertebra": {"levels": VERT.levels, "classes": VERT.classes},
        }
    )
    res = codec.decode(output, torch.stack([affine, affine]))
    assert len(res) == 2
    for r in res:
        _check(r["disc"], DISC, disc[0], disc[1], disc[2], tol=0.01)
        _check(r["vertebra"], VERT, vert[0], vert[1], vert[2], tol=0.01)


def test_stride_four_targets_decode_to_image_grid():
    affine, disc, _, out = _round_trip_inputs(stride=4, radius=1.5)
    assert out["disc_heatmap"].shape == (3, 32, 32)
    kps = _codec([DISC], radius=1.5, target_stride=4, network_stride=4).decode(
        _output(*_perfect_prediction(out, "disc")), affine
    )
    _check(kps[0]["disc"], DISC, disc[0], disc[1], disc[2], tol=0.05)


def test_network_like_stride_four_predictions_upsampled():
    """Coarse (32 x 32) logits and offsets, as a stride-4 network would give, upsampled 4x by the codec."""
    affine, disc, _, _ = _round_trip_inputs()
    gt_xy, labels = disc[0], disc[2]
    n = 32
    centres = target_to_image(torch.arange(n, dtype=torch.float64), 4)  # coarse (stride 4) centres on target grid
    cy, cx = centres.view(n, 1), centres.view(1, n)
    d2 = (gt_xy[:, 0].view(-1, 1, 1) - cx) ** 2 + (gt_xy[:, 1].view(-1, 1, 1) - cy) ** 2
    near = d2.argmin(0)  # every coarse pixel points at its nearest keypoint (offsets in target pixels)
    logits = torch.full((1, 3, n, n), -8.0, dtype=torch.float64)
    offsets = torch.zeros(1, 6, n, n, dtype=torch.float64)
    for k in range(len(gt_xy)):
        own = near == k
        c = int(labels[k])
        logits[0, c][own & (d2[k] <= 2.0**2)] = 6.0
        offsets[0, 2 * c][own] = (gt_xy[k, 0] - cx).expand(n, n)[own]
        offsets[0, 2 * c + 1][own] = (gt_xy[k, 1] - cy).expand(n, n)[own]
    codec = _codec([DISC], network_stride=4)
    assert codec.upsample == 4
    kps = codec.decode(_output(logits, offsets, _no_level(logits)).float(), affine)[0]["disc"]
    assert [kp["level"] for kp in kps] == list(DISC.levels)
    assert [kp["label"] for kp in kps] == labels.tolist()
    np.testing.assert_allclose([kp["xy"] for kp in kps], gt_xy.numpy(), atol=1.0)


def test_channels_last_output_decodes_like_nchw():
    """The inference path runs the network in channels_last; its output decodes exactly as the NCHW copy."""
    torch.manual_seed(3)
    output = torch.randn(2, 10, 24, 20)
    output[:, :3] *= 4.0
    codec = _codec([DISC], network_stride=4)
    nchw = codec.decode(output)
    strided = output.contiguous(memory_format=torch.channels_last)
    assert not strided.is_contiguous()
    assert codec.decode(strided) == nchw
    assert sum(len(image["disc"]) for image in nchw) > 0


def test_class_probabilities_score_and_fewer_peaks():
    spec = StreamSpec("disc", ("a", "b", "c", "d", "e"), ("n", "d"))
    h = w = 24
    radius = 2.0
    probs = torch.zeros(1, 2, h, w)
    offsets = torch.zeros(1, 4, h, w)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disk = ((cols - 10) ** 2 + (rows - 7) ** 2) <= radius**2  # 13 pixels voting at (x=10, y=7)
    probs[0, 0][disk], probs[0, 1][disk] = 0.3, 0.6
    for c in range(2):
        offsets[0, 2 * c][disk] = (10 - cols)[disk].float()
        offsets[0, 2 * c + 1][disk] = (7 - rows)[disk].float()
    logits = torch.logit(probs)
    kps = _codec([spec], radius=radius).decode(_output(logits, offsets, _no_level(logits)))[0]["disc"]
    assert len(kps) == 1  # one positive peak for five levels
    kp = kps[0]
    # a lone structure is anchored at the caudal end (the most caudal level), see the level tests
    assert kp["level"] == "e" and kp["label"] == 1 and kp["class_name"] == "d"
    assert kp["level_confidence"] == pytest.approx(min(1.0, kp["score"]))
    assert kp["probabilities"] == pytest.approx([1 / 3, 2 / 3], rel=1e-5)
    assert kp["score"] == pytest.approx(0.6 * 13 / (math.pi * radius**2), rel=1e-5)
    assert kp["xy"] == pytest.approx([10.0, 7.0], abs=1e-5)


def test_plateau_peak_counted_once():
    """A vote split evenly between two pixels makes two equal maxima; they are one keypoint."""
    spec = StreamSpec("disc", ("a", "b"), ("n",))
    logits = torch.full((1, 1, 12, 12), -math.inf)  # background votes nothing
    offsets = torch.zeros(1, 2, 12, 12)
    logits[0, 0, 5, 5] = 10.0
    offsets[0, 0, 5, 5] = 0.5
    kps = _codec([spec]).decode(_output(logits, offsets, _no_level(logits)))[0]["disc"]
    assert len(kps) == 1 and kps[0]["xy"] == pytest.approx([5.5, 5.0], abs=1e-4)


def test_decode_argument_checks():
    with pytest.raises(ValueError, match="expected output of shape"):
        _codec([DISC]).decode(torch.zeros(1, 6, 8, 8))
    with pytest.raises(TypeError, match="single output tensor"):
        _codec([DISC]).decode({"disc": (torch.zeros(1, 3, 8, 8), torch.zeros(1, 6, 8, 8))})
    with pytest.raises(ValueError, match="affine"):
        _codec([DISC]).decode(torch.zeros(1, 10, 8, 8), torch.eye(3))
    with pytest.raises(ValueError, match="nms_kernel"):
        _codec([DISC], nms_kernel=2)
    with pytest.raises(ValueError, match="network_stride"):
        _codec([DISC], network_stride=0)


def test_public_splat_agrees_with_the_private_kernel():
    """The private ``aten.grid_sampler_2d_backward`` and the public ``index_add_`` splat give the same votes,
    including votes landing partly or wholly outside the grid and non-finite offsets."""
    torch.manual_seed(5)
    p = torch.rand(3, 1, 17, 13, dtype=torch.float64)
    off = torch.randn(3, 2, 17, 13, dtype=torch.float64) * 6.0
    off[0, 0, 2, 3], off[1, 1, 4, 4], off[2, 0, 0, 0] = float("nan"), float("inf"), 1e9
    public = splat_votes_public(p, off)
    np.testing.assert_allclose(splat_votes(p, off).numpy(), public.numpy(), atol=1e-12)
    np.testing.assert_allclose(public.sum().item(), _brute_total(p, off), rtol=1e-12)


def _brute_total(p: torch.Tensor, off: torch.Tensor) -> float:
    """Sum of the vote mass landing inside the grid, corner by corner (independent loop)."""
    n, _, h, w = p.shape
    total = 0.0
    for b in range(n):
        for r in range(h):
            for c in range(w):
                x, y = c + float(off[b, 0, r, c]), r + float(off[b, 1, r, c])
                if not (math.isfinite(x) and math.isfinite(y)):
                    continue
                x0, y0 = math.floor(x), math.floor(y)
                for cx, cy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                    wgt = (1 - abs(x - cx)) * (1 - abs(y - cy))
                    if 0 <= cx < w and 0 <= cy < h:
                        total += float(p[b, 0, r, c]) * wgt
    return total


@pytest.mark.parametrize("target_stride, network_stride", [(1, 1), (2, 2), (1, 4)])
def test_codec_encode_then_decode_round_trip(target_stride, network_stride):
    """``codec.decode`` of a perfect output built from ``codec.encode`` gives back every keypoint (mm, class, level),
    on the codec's own grids: targets on the target grid, the output on the network grid."""
    affine = _affine()
    codec = _codec([DISC], radius=3.0, target_stride=target_stride, network_stride=network_stride)
    xy = np.stack([60.0 + 2.0 * np.arange(6), 10.0 + 21.0 * np.arange(6)], 1)
    _, mm, labels = _case(DISC, xy, [2, 0, 1, 1, 0, 2], affine)
    t = codec.encode({"disc": mm}, {"disc": labels}, affine, (128, 128))
    logits, offsets, level = torch.where(t["disc_heatmap"] > 0, 8.0, -8.0), t["disc_offset"], t["disc_level"]
    if network_stride != target_stride:  # what the network would give: the targets on its coarser grid
        scale = target_stride / network_stride
        logits, offsets = (
            F.interpolate(v[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]
            for v in (logits, offsets)
        )
        # the level map where the disks are (a network predicts it everywhere; outside the disks it has no target)
        k = network_stride // target_stride
        covered = F.avg_pool2d(t["disc_level_mask"][None], k)[0]
        level = F.avg_pool2d((t["disc_level"] * t["disc_level_mask"])[None], k)[0] / covered
    kps = codec.decode(torch.cat([logits, offsets, level])[None], affine)[0]["disc"]
    assert [kp["level"] for kp in kps] == list(DISC.levels)
    assert [kp["label"] for kp in kps] == labels.tolist()
    tol = 0.05 if network_stride == target_stride else 1.5
    np.testing.assert_allclose([kp["mm"] for kp in kps], mm.numpy(), atol=tol)


def _centroid_3x3(total: np.ndarray, r: int, c: int) -> tuple[float, float]:
    """The plain 3 x 3 centroid around (r, c): what the refinement started from before mean shift."""
    win = total[r - 1 : r + 2, c - 1 : c + 2]
    rows, cols = np.mgrid[r - 1 : r + 2, c - 1 : c + 2]
    return float((win * cols).sum() / win.sum()), float((win * rows).sum() / win.sum())


@pytest.mark.parametrize("centre", [(5.5, 6.3), (6.0, 5.5), (5.48, 5.52)])
def test_refine_peak_same_answer_from_near_tied_neighbours(centre):
    """A blob whose two highest pixels nearly tie (the second scaled by 1 - 1e-3): either one as the start
    gives the same sub-pixel position; a single 3 x 3 centroid around each does not."""
    x0, y0 = centre
    rows, cols = np.mgrid[0:12, 0:12]
    blob = np.exp(-((cols - x0) ** 2 + (rows - y0) ** 2) / (2 * 1.2**2))
    order = np.argsort(blob, axis=None)[::-1]
    (ra, ca), (rb, cb) = np.unravel_index(order[0], blob.shape), np.unravel_index(order[1], blob.shape)
    assert max(abs(ra - rb), abs(ca - cb)) == 1  # the two best pixels are neighbours
    blob[rb, cb] = blob[ra, ca] * (1 - 1e-3)
    old_a, old_b = _centroid_3x3(blob, ra, ca), _centroid_3x3(blob, rb, cb)
    assert math.dist(old_a, old_b) > 0.1  # the hard case: the starting pixel moved the old answer
    total = torch.from_numpy(blob).float()
    new_a, new_b = refine_peak(total, int(ra), int(ca)), refine_peak(total, int(rb), int(cb))
    assert math.dist(new_a, new_b) < 1e-3
    assert math.dist(new_a, (x0, y0)) < 0.1  # and it is the blob's centre (the tie shifts it slightly)


def test_refine_peak_exact_for_one_vote_and_at_the_border():
    """One bilinear vote, splatted by hough_voting, is recovered exactly from any of its four corners;
    a vote next to the grid's edge (corners outside dropped) stays inside the grid; an empty map returns
    the start."""
    p = torch.zeros(1, 1, 8, 8)
    o = torch.zeros(1, 2, 8, 8)
    p[0, 0, 0, 0] = 1.0
    o[0, :, 0, 0] = torch.tensor([4.3, 2.8])  # lands at x = 4.3, y = 2.8
    total = hough_voting(p, o, radius=1.0)[0, 0]
    for r, c in ((2, 4), (2, 5), (3, 4), (3, 5)):
        x, y = refine_peak(total, r, c)
        assert x == pytest.approx(4.3, abs=1e-6) and y == pytest.approx(2.8, abs=1e-6)
    o[0, :, 0, 0] = torch.tensor([-0.4, 6.5])  # x = -0.4: the two left corners fall outside
    edge = hough_voting(p, o, radius=1.0)[0, 0]
    x, y = refine_peak(edge, 7, 0)
    assert x == pytest.approx(0.0, abs=1e-6) and y == pytest.approx(6.5, abs=1e-6)
    assert refine_peak(torch.zeros(4, 4), 1, 2) == (2.0, 1.0)


@pytest.mark.parametrize("upsample, shape", [(4, (5, 7)), (2, (6, 3)), (1, (4, 4))])
def test_level_read_at_a_candidate_equals_the_upsampled_map(upsample, shape):
    """The level map is read on the network grid; at every target pixel it equals bilinear upsampling there."""
    level = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    big = F.interpolate(level[None, None], scale_factor=upsample, mode="bilinear", align_corners=False)[0, 0]
    reader = types.SimpleNamespace(upsample=float(upsample))
    got = torch.tensor(
        [[OCPCCodec._level_at(reader, level, r, c) for c in range(big.shape[1])] for r in range(big.shape[0])]
    )
    assert torch.allclose(got, big, atol=1e-5)


def _refine_one_by_one(total: torch.Tensor, r: int, c: int) -> tuple[float, float]:
    """Reference mean shift of one peak, written as plain loops over a zero-padded copy of ``total``."""
    half = 4
    padded = np.zeros((total.shape[0] + 2 * half, total.shape[1] + 2 * half))
    padded[half:-half, half:-half] = total.double().clamp_min(0).numpy()
    patch = padded[r : r + 2 * half + 1, c : c + 2 * half + 1]
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    dx = dy = 0.0
    for _ in range(16):
        wx = np.clip(np.minimum(offsets + 0.5, dx + 1.5) - np.maximum(offsets - 0.5, dx - 1.5), 0, 1)
        wy = np.clip(np.minimum(offsets + 0.5, dy + 1.5) - np.maximum(offsets - 0.5, dy - 1.5), 0, 1)
        weights = patch * wy[:, None] * wx[None, :]
        s = weights.sum()
        if s <= 0:
            break
        nx = float(np.clip((weights.sum(0) @ offsets) / s, -2, 2))
        ny = float(np.clip((weights.sum(1) @ offsets) / s, -2, 2))
        step = max(abs(nx - dx), abs(ny - dy))
        dx, dy = nx, ny
        if step < 1e-4:
            break
    return c + dx, r + dy


def test_refine_peaks_at_once_equals_one_by_one():
    g = torch.Generator().manual_seed(3)
    total = torch.rand(12, 15, generator=g) - 0.3  # negative pixels are clamped to 0
    total[6:9, 6:9] = 0.0  # a peak with an all-zero window stops at once
    peaks = [(0, 0), (11, 14), (5, 7), (7, 7), (2, 13), (10, 1)]  # corners and edges: windows leave the grid
    got = refine_peaks(total, peaks)
    for (r, c), xy in zip(peaks, got):
        assert np.allclose(xy, _refine_one_by_one(total, r, c), atol=1e-9)
        assert np.allclose(refine_peak(total, r, c), xy, atol=1e-12)
    assert np.allclose(got[3], [7.0, 7.0])  # zero window: stays on its pixel
    assert refine_peaks(total, []).shape == (0, 2)


@pytest.mark.parametrize("up", [1, 2, 3, 4])
def test_upsample_blocks_and_splat_points_equal_the_whole_grid_ops(monkeypatch, up):
    """``upsample_blocks`` gives F.interpolate's upsampled values on the blocks of given network pixels (edges
    included, any factor); ``splat_points`` of every pixel's vote equals the whole-map splat (private kernel and
    public fallback), also with non-finite offsets."""
    from bundle import decoding

    torch.manual_seed(2)
    field = torch.randn(4, 7, 9, dtype=torch.float64)
    full = F.interpolate(field[None], scale_factor=up, mode="bilinear", align_corners=False)[0]
    src_rows, src_cols = torch.tensor([0, 6, 3, 0, 6, 2, 2]), torch.tensor([0, 8, 4, 8, 0, 0, 5])  # corners, edges
    block = torch.arange(up)
    rows = (src_rows[:, None] * up + block).repeat_interleave(up, dim=1).flatten()
    cols = (src_cols[:, None] * up + block).repeat(1, up).flatten()
    got = decoding.upsample_blocks(field, src_rows, src_cols, up)
    assert got.shape == (4, 7, up * up)
    np.testing.assert_allclose(got.flatten(1).numpy(), full[:, rows, cols].numpy(), atol=1e-12)
    p = torch.rand(2, 1, 11, 8, dtype=torch.float64)
    off = torch.randn(2, 2, 11, 8, dtype=torch.float64) * 4.0
    off[0, 0, 1, 2], off[1, 1, 3, 3] = float("nan"), float("inf")
    r, c = torch.meshgrid(torch.arange(11), torch.arange(8), indexing="ij")
    x, y = c.flatten().double() + off[:, 0].flatten(1), r.flatten().double() + off[:, 1].flatten(1)
    ref = splat_votes(p, off)[:, 0]
    for private in (True, False):
        monkeypatch.setattr(decoding, "USE_PRIVATE_SPLAT", private)
        got = decoding.splat_points(p.flatten(1), x, y, (11, 8))
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-12)


def test_landing_reach_bounds_every_upsampled_vote():
    """Each target pixel's vote (upsampled offsets) lands within its network pixel's block bounds."""
    from bundle.decoding import landing_reach

    torch.manual_seed(4)
    off = torch.randn(6, 8, 10) * 5.0
    off[2, 3, 4] = float("nan")
    bounds = landing_reach(off, 4)
    up = F.interpolate(off[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(40), indexing="ij")
    x, y = cols + up[0::2], rows + up[1::2]  # (3, 32, 40)
    lo_x, hi_x, lo_y, hi_y = (b.repeat_interleave(4, 0).repeat_interleave(4, 1) for b in bounds)
    ok = lambda v, lo, hi: (~torch.isfinite(v)) | ((v >= lo - 1e-5) & (v <= hi + 1e-5))  # noqa: E731
    assert bool(ok(x, lo_x, hi_x).all()) and bool(ok(y, lo_y, hi_y).all())


@pytest.mark.parametrize("background", [0.5, 8.0])
def test_window_search_decodes_as_the_whole_target_grid(background):
    """Stride-4 outputs with clear discs, noisy logits and random background offsets (some pointing far, one
    NaN): window search gives the whole grid's keypoints (levels, classes, positions, scores), batch of 2."""
    gen = torch.Generator().manual_seed(int(background * 10))
    affine = _affine()
    outs = []
    for _ in range(2):
        size = 128
        rows = 8.0 + 21.0 * torch.arange(6) + torch.rand(6, generator=gen) * 3
        cols = 60.0 + torch.rand(6, generator=gen) * 10
        xy = torch.stack([cols, rows], 1).double()
        labels = torch.randint(0, 3, (6,), generator=gen)
        codec = _codec([DISC], network_stride=1)
        mm = pixels_to_mm(xy, affine)
        t = codec.encode({"disc": mm}, {"disc": labels}, affine, (size, size))
        logits = 8.0 * t["disc_heatmap"] - 4.0 + torch.randn(3, size, size, generator=gen)
        noise = background * torch.randn(6, size, size, generator=gen)
        offsets = torch.where(t["disc_offset_mask"] > 0, t["disc_offset"] + 0.3 * noise / background, noise)
        full = torch.cat([logits, offsets, t["disc_level"]])[None]
        outs.append(F.avg_pool2d(full, 4))
    output = torch.cat(outs)
    output[0, 5, 3, 3] = float("nan")
    window, whole = _codec([DISC], network_stride=4), _codec([DISC], network_stride=4, window_search=False)
    got, ref = window.decode(output, affine), whole.decode(output, affine)
    for g, r in zip(got, ref):
        assert [kp["level"] for kp in g["disc"]] == [kp["level"] for kp in r["disc"]] and len(r["disc"]) >= 5
        assert [kp["label"] for kp in g["disc"]] == [kp["label"] for kp in r["disc"]]
        np.testing.assert_allclose([kp["xy"] for kp in g["disc"]], [kp["xy"] for kp in r["disc"]], atol=1e-4)
        np.testing.assert_allclose([kp["score"] for kp in g["disc"]], [kp["score"] for kp in r["disc"]], rtol=1e-5)
