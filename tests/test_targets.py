"""OCPC targets: hand-checked disks, offsets, masks, geometry (oblique affine, stride) and collation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bundle.codec import OCPCCodec, encode_ocpc, image_to_target, mm_to_pixels, pixels_to_mm, target_to_image
from bundle.errors import BundleInputError
from bundle.streams import StreamSpec
from bundle.transforms import KeypointsToArraysd, OCPCTargetsd
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Flipd

NAN = float("nan")
SPEC = StreamSpec("disc", ("a", "b", "c"), ("n", "m", "s"))


def _image(h: int, w: int, affine: torch.Tensor | None = None) -> MetaTensor:
    return MetaTensor(torch.zeros(2, h, w), affine=torch.eye(4, dtype=torch.float64) if affine is None else affine)


def _mm_identity(points_xy) -> torch.Tensor:
    """Identity affine: mm = (row, col, 0) = (y, x, 0); None -> NaN."""
    return torch.tensor([[NAN] * 3 if p is None else [p[1], p[0], 0.0] for p in points_xy], dtype=torch.float64)


def _targetsd(streams, radius: float = 6.0, stride: int = 1) -> OCPCTargetsd:
    return OCPCTargetsd(OCPCCodec(streams, radius=radius, target_stride=stride, network_stride=4))


def _targets(points_xy, labels, h=9, w=11, radius=2.0, stride=1, spec=SPEC):
    t = _targetsd([spec], radius=radius, stride=stride)
    data = {"image": _image(h, w), "disc_points": _mm_identity(points_xy), "disc_labels": torch.tensor(labels)}
    return t(data)


def test_disk_membership_includes_boundary_and_offsets():
    out = _targets([(5.0, 4.0), None, None], [1, -1, -1], radius=2.0)
    hm, off, mask = out["disc_heatmap"], out["disc_offset"], out["disc_offset_mask"]
    assert hm.shape == (3, 9, 11) and off.shape == (6, 9, 11) and mask.shape == (6, 9, 11)
    assert hm.dtype == off.dtype == mask.dtype == torch.float32
    # radius 2 around an integer pixel: 13 pixels (distances 0, 1, sqrt 2, 2); (2, 1) at sqrt 5 is out
    assert hm[1].sum() == 13 and hm[0].sum() == 0 and hm[2].sum() == 0
    assert hm[1, 4, 7] == 1 and hm[1, 2, 5] == 1 and hm[1, 6, 5] == 1 and hm[1, 4, 3] == 1  # boundary, d = 2
    assert hm[1, 5, 7] == 0 and hm[1, 3, 3] == 0  # d = sqrt 5
    # offsets = keypoint minus pixel centre, (dx, dy) on channels (2, 3) of class 1
    assert off[2, 3, 4] == 1.0 and off[3, 3, 4] == 1.0  # pixel (row 3, col 4) -> keypoint (5, 4)
    assert off[2, 4, 7] == -2.0 and off[3, 4, 7] == 0.0
    assert off[[0, 1, 4, 5]].abs().sum() == 0
    assert torch.equal(mask[2], hm[1]) and torch.equal(mask[3], hm[1]) and mask[[0, 1, 4, 5]].sum() == 0
    assert (off[2:4] * (1 - mask[2:4])).abs().sum() == 0


def test_subpixel_keypoint_disk_and_offsets():
    hm, off, mask = encode_ocpc(torch.tensor([[5.5, 4.0]]), torch.tensor([0]), 2, (9, 11), radius=1.0)
    # pixels at distance <= 1 from (5.5, 4): (4, 5) and (4, 6) at 0.5; (3|5, 5|6) at sqrt(1.25) are out
    assert hm[0].nonzero().tolist() == [[4, 5], [4, 6]]
    assert off[0, 4, 5] == 0.5 and off[0, 4, 6] == -0.5 and off[1, 4, 5] == 0.0
    assert mask[:2].sum() == 4 and mask[2:].sum() == 0


def test_overlap_nearest_keypoint_wins():
    out = _targets([(3.0, 4.0), (6.0, 4.0), None], [0, 2, -1], radius=2.0)
    hm, off = out["disc_heatmap"], out["disc_offset"]
    assert hm.sum(0).max() == 1  # each pixel owned by at most one keypoint
    assert hm[0, 4, 4] == 1 and hm[2, 4, 4] == 0 and off[0, 4, 4] == -1.0  # d=1 to A, 2 to B
    assert hm[2, 4, 5] == 1 and hm[0, 4, 5] == 0 and off[4, 4, 5] == 1.0  # d=2 to A, 1 to B
    assert off[0, 4, 5] == 0 and off[5, 4, 5] == 0
    # pixel (row 3, col 5): d^2 = 5 to A (out anyway), 2 to B -> B
    assert hm[2, 3, 5] == 1 and off[4, 3, 5] == 1.0 and off[5, 3, 5] == 1.0
    assert hm[0].sum() + hm[2].sum() < 26  # overlap removed some pixels from the two 13-pixel disks


def test_outside_keypoints_dropped_and_unknown_label_not_drawn():
    out = _targets([(-3.0, 4.0), (10.6, 4.0), (5.0, 4.0)], [0, 1, -1], radius=4.0)
    assert out["disc_heatmap"].sum() == 0 and out["disc_offset_mask"].sum() == 0
    px = out["disc_points_px"]
    assert px.shape == (3, 2) and px.dtype == torch.float32
    assert torch.isnan(px[:2]).all() and px[2].tolist() == [5.0, 4.0]
    # just inside the last column's pixel: drawn
    out = _targets([(10.4, 4.0), None, None], [1, -1, -1], radius=1.5)
    # (4, 10) at 0.4, (4, 9) at 1.4, (3|5, 10) at sqrt(1.16); (3|5, 9) at sqrt(2.96) is out
    assert out["disc_heatmap"][1].nonzero().tolist() == [[3, 10], [4, 9], [4, 10], [5, 10]]


def test_stride_two_target_grid():
    assert image_to_target(3.5, 2) == 1.5 and target_to_image(1.5, 2) == 3.5
    out = _targets([(3.5, 1.5), None, None], [2, -1, -1], h=9, w=11, radius=1.0, stride=2)
    hm, off = out["disc_heatmap"], out["disc_offset"]
    assert hm.shape == (3, 4, 5)
    # target position (1.5, 0.5): the four pixels rows 0-1, cols 1-2, each at distance sqrt(0.5)
    assert hm[2].nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    assert off[4, 0, 1] == 0.5 and off[4, 0, 2] == -0.5 and off[5, 0, 1] == 0.5 and off[5, 1, 1] == -0.5
    assert out["disc_points_px"][0].tolist() == [3.5, 1.5]  # image grid, not target grid
    # image pixels [8, 9) fall outside the 4 x 5 target grid: a keypoint at row 8.2 is dropped
    out = _targets([(3.0, 8.2), None, None], [0, -1, -1], h=9, w=11, radius=1.0, stride=2)
    assert out["disc_heatmap"].sum() == 0 and out["disc_points_px"][0].tolist() == pytest.approx([3.0, 8.2])


def _dicom_affine(iop, spacing, ipp, slice_gap):
    """Affine per the project convention, from DICOM-like tags."""
    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    a = np.eye(4)
    a[:3, 0] = spacing[0] * col_dir  # IOP[3:6]: direction of increasing row index
    a[:3, 1] = spacing[1] * row_dir  # IOP[0:3]: direction of increasing column index
    a[:3, 2] = np.cross(row_dir, col_dir) * slice_gap
    a[:3, 3] = ipp
    return torch.tensor(a)


def _oblique_affine():
    th, ph = math.radians(17.0), math.radians(-9.0)
    # sagittal-ish orientation, rotated in plane and tilted out of plane
    r = np.array([math.sin(ph), math.cos(th) * math.cos(ph), -math.sin(th) * math.cos(ph)])
    c = np.array([0.0, math.sin(th), math.cos(th)])
    c = c - r * (r @ c)
    c = -c / np.linalg.norm(c)  # rows go towards the feet (decreasing z)
    return _dicom_affine(list(r) + list(c), (0.8, 0.6), [-12.0, -80.5, 110.25], 4.4)


def test_mm_to_grid_with_oblique_affine():
    aff = _oblique_affine()
    h, w = 40, 48
    xy = np.array([[10.25, 5.5], [30.0, 20.75], [47.2, 39.4]])
    ps, iop = (0.8, 0.6), aff[:3, :2].numpy()  # independent DICOM formula: IPP + x*PS[1]*IOP[0:3] + y*PS[0]*IOP[3:6]
    col_dir, row_dir = iop[:, 1] / ps[1], iop[:, 0] / ps[0]
    mm = aff[:3, 3].numpy() + xy[:, :1] * ps[1] * col_dir + xy[:, 1:] * ps[0] * row_dir
    normal = aff[:3, 2].numpy()
    mm[1] += 0.37 * normal  # off the plane: the out-of-plane index is ignored
    spec = StreamSpec("disc", ("a", "b", "c"), ("n", "d"))
    t = _targetsd([spec], radius=1.5)
    out = t({"image": _image(h, w, aff), "disc_points": torch.tensor(mm), "disc_labels": torch.tensor([0, 1, 1])})
    np.testing.assert_allclose(out["disc_points_px"].numpy(), xy, atol=1e-4)
    hm = out["disc_heatmap"]
    assert hm[0, 6, 10] == 1 and hm[1, 21, 30] == 1 and hm[1, 39, 47] == 1
    np.testing.assert_allclose(pixels_to_mm(torch.tensor(xy[:1]), aff).numpy(), mm[:1], atol=1e-9)
    np.testing.assert_allclose(mm_to_pixels(torch.tensor(mm), aff).numpy(), xy, atol=1e-9)


def test_points_follow_a_monai_flip():
    spec = StreamSpec("disc", ("a",), ("n", "d"))
    aff = _oblique_affine()
    img = MetaTensor(torch.zeros(1, 20, 24), affine=aff)
    img[0, 7, 5] = 1.0
    mm = pixels_to_mm(torch.tensor([[5.0, 7.0]]), aff)
    data = Flipd("image", spatial_axis=1)({"image": img, "disc_points": mm, "disc_labels": torch.tensor([1])})
    out = _targetsd([spec], radius=1.0)(data)
    bright = out["image"][0].nonzero().tolist()
    assert bright == [[7, 18]]
    assert out["disc_points_px"][0].tolist() == pytest.approx([18.0, 7.0], abs=1e-4)
    assert out["disc_heatmap"][1, 7, 18] == 1


def test_keypoints_to_arrays_and_collate():
    streams = {
        "disc": {"levels": ["a", "b", "c"], "classes": ["n", "d"]},
        "vertebra": {"levels": ["x"], "classes": ["n", "d"]},
    }
    t = KeypointsToArraysd(streams=streams)
    item = {
        "study_id": "s1",
        "keypoints": {
            "disc": {"mm": [[1, 2, 3], None, [4.5, 5, 6]], "label": [1, 0, -1]},
            "vertebra": {"mm": [None], "label": [-1]},
        },
    }
    out = t(item)
    assert "keypoints" not in out
    p, lab = out["disc_points"], out["disc_labels"]
    assert p.dtype == torch.float64 and p.shape == (3, 3) and lab.dtype == torch.int64
    assert p[0].tolist() == [1, 2, 3] and torch.isnan(p[1]).all() and lab.tolist() == [1, 0, -1]
    assert torch.isnan(out["vertebra_points"]).all() and out["vertebra_labels"].tolist() == [-1]
    # the whole chain collates into a batch
    pipe = _targetsd(streams, radius=2.0)
    batch = [pipe({**t(item), "image": _image(16, 16)}) for _ in range(2)]
    coll = list_data_collate(batch)
    assert coll["disc_heatmap"].shape == (2, 2, 16, 16) and coll["disc_points_px"].shape == (2, 3, 2)
    assert coll["vertebra_offset"].shape == (2, 4, 16, 16) and coll["disc_labels"].shape == (2, 3)


def test_keypoints_to_arrays_errors_name_the_stream():
    t = KeypointsToArraysd(streams=[SPEC])
    with pytest.raises(BundleInputError, match="'disc'.*expected 3 levels"):
        t({"study_id": "7", "keypoints": {"disc": {"mm": [None, None], "label": [0, 0, 0]}}})
    with pytest.raises(BundleInputError, match="label 3"):
        t({"keypoints": {"disc": {"mm": [None] * 3, "label": [0, 3, 0]}}})
    with pytest.raises(BundleInputError, match="'disc'"):
        t({"keypoints": {"vertebra": {"mm": [None], "label": [0]}}})
    with pytest.raises(KeyError):
        t({"image": "x"})
    assert KeypointsToArraysd(streams=[SPEC], allow_missing_keys=True)({"image": "x"}) == {"image": "x"}


def test_targets_argument_checks():
    with pytest.raises(ValueError, match="radius"):
        _targetsd([SPEC], radius=0)
    with pytest.raises(ValueError, match="stride"):
        _targetsd([SPEC], stride=0)
    with pytest.raises(TypeError, match="OCPCCodec"):
        OCPCTargetsd([SPEC])
    t = _targetsd([SPEC])
    with pytest.raises(ValueError, match="MetaTensor"):
        t({"image": torch.zeros(1, 4, 4), "disc_points": torch.zeros(3, 3), "disc_labels": torch.zeros(3)})
    with pytest.raises(KeyError, match="disc_points"):
        t({"image": _image(4, 4)})


def test_level_end_points_extrapolate_one_level_beyond_each_end():
    from bundle.codec import level_end_points

    ends = level_end_points(torch.tensor([[10.0, 20.0], [12.0, 30.0], [15.0, 41.0]]))
    assert ends.tolist() == [[8.0, 10.0], [18.0, 52.0]]  # 2 p0 - p1 and 2 p2 - p1
    ends = level_end_points(torch.tensor([[NAN, NAN], [12.0, 30.0], [15.0, 41.0]]))
    assert torch.isnan(ends[0]).all() and ends[1].tolist() == [18.0, 52.0]  # a missing end: nothing above it
    assert torch.isnan(level_end_points(torch.tensor([[3.0, 4.0]]))).all()  # one level: no direction


@pytest.mark.parametrize("ends", [True, False])
def test_level_map_marks_the_neighbours_of_the_first_and_last_levels(ends):
    """With ``level_ends`` the level map reads -1 one level above the first keypoint and K one below the last
    (the network learns that T12/L1 is not L1/L2); without, those pixels stay unsupervised (mask 0)."""
    codec = OCPCCodec([SPEC], radius=1.5, target_stride=1, network_stride=4, level_ends=ends)
    mm = _mm_identity([(5, 8), (5, 14), (5, 20)])  # x = 5, rows 8, 14, 20: ends at rows 2 and 26 (outside)
    t = codec.encode({"disc": mm}, {"disc": torch.tensor([0, 1, 2])}, torch.eye(4, dtype=torch.float64), (24, 11))
    level, mask = t["disc_level"][0], t["disc_level_mask"][0]
    assert [level[r, 5].item() for r in (8, 14, 20)] == [0.0, 1.0, 2.0] and mask[[8, 14, 20], 5].tolist() == [1] * 3
    assert mask[2, 5].item() == float(ends) and level[2, 5].item() == (-1.0 if ends else 0.0)
    assert mask[23, 5].item() == 0.0  # the lower end (row 26) lies outside the grid: not drawn
    assert codec.level_ends is ends
