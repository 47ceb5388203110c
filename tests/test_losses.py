"""SpineOneLoss: focal heatmap term, masked L1 offset term, upsampling, objective association."""

from __future__ import annotations

import math

import pytest
import torch
from bundle.losses import SpineOneLoss, oa_weights, total_loss
from monai.data import MetaTensor
from stream_fixtures import streams


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _focal(x: float, t: int) -> float:
    p = _sig(x)
    return -((1 - p) ** 2) * math.log(p) if t else -(p**2) * math.log(1 - p)


def _focal_grad(x: float, t: int) -> float:
    """Analytic d/dx of the gamma-2 sigmoid focal loss."""
    p = _sig(x)
    if t:
        return 2 * p * (1 - p) ** 2 * math.log(p) - (1 - p) ** 3
    return -2 * p**2 * (1 - p) * math.log(1 - p) + p**3


def _targets(hm, off, mask, name="disc", level=None, level_mask=None):
    """Targets of one stream; the level map and its mask default to zeros (no level term)."""
    zeros = torch.zeros_like(hm[:, :1])
    return {
        f"{name}_heatmap": hm,
        f"{name}_offset": off,
        f"{name}_offset_mask": mask,
        f"{name}_level": zeros if level is None else level,
        f"{name}_level_mask": zeros if level_mask is None else level_mask,
    }


def _pred_1class(logits, offsets, level=None):
    """Network output for one stream with C = 1: (B, 4, H, W); the level map defaults to zeros."""
    return torch.cat([logits, offsets, torch.zeros_like(logits) if level is None else level], dim=1)


LOGITS = [[0.5, -1.0], [2.0, -0.3]]
HEAT = [[1.0, 0.0], [0.0, 1.0]]


def _heat_loss(logits: list[list[float]]) -> float:
    """Focal heatmap term of the 2x2 case by the formula: sum over pixels / 2 positives."""
    return sum(_focal(logits[a][b], int(HEAT[a][b])) for a in range(2) for b in range(2)) / 2.0


def test_focal_term_hand_computed():
    logits = torch.tensor([[LOGITS]])
    hm = torch.tensor([[HEAT]])
    zeros2 = torch.zeros(1, 2, 2, 2)
    loss = SpineOneLoss(streams(disc=1))
    total, parts = loss.loss_parts(_pred_1class(logits, zeros2), _targets(hm, zeros2, zeros2))
    expected = _heat_loss(LOGITS)
    assert parts["disc_heatmap"].item() == pytest.approx(expected, rel=1e-5)
    assert parts["disc_offset"].item() == 0.0  # empty mask -> 0 / max(1, 0)
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_focal_term_no_positive_normalises_by_one():
    logits = torch.tensor([[LOGITS]])
    zeros = torch.zeros(1, 1, 2, 2)
    zeros2 = torch.zeros(1, 2, 2, 2)
    _, parts = SpineOneLoss(streams(disc=1)).loss_parts(_pred_1class(logits, zeros2), _targets(zeros, zeros2, zeros2))
    expected = sum(_focal(LOGITS[i][j], 0) for i in range(2) for j in range(2))
    assert parts["disc_heatmap"].item() == pytest.approx(expected, rel=1e-5)


def test_l1_term_hand_computed_with_mask():
    offsets = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.5], [0.0, 2.0]]]])
    target = torch.tensor([[[[0.0, 2.5], [9.0, 1.0]], [[1.0, 0.5], [5.0, -2.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]])
    zeros = torch.zeros(1, 1, 2, 2)
    _, parts = SpineOneLoss(streams(disc=1)).loss_parts(_pred_1class(zeros, offsets), _targets(zeros, target, mask))
    # masked |diff|: 1, 0.5, 3 (dx) and 2, 4 (dy) -> 10.5 over 5 elements
    assert parts["disc_offset"].item() == pytest.approx(10.5 / 5)


def test_upsampling_path_half_size_prediction():
    torch.manual_seed(0)
    pred = torch.randn(2, 10 + 7, 4, 4)
    counts = {"disc": 3, "vertebra": 2}
    targets = {}
    for name, c in counts.items():
        targets.update(
            _targets(
                (torch.rand(2, c, 8, 8) > 0.8).float(),
                torch.randn(2, 2 * c, 8, 8),
                (torch.rand(2, 2 * c, 8, 8) > 0.5).float(),
                name,
            )
        )
    loss = SpineOneLoss(streams(**counts))
    total, parts = loss.loss_parts(pred, targets)
    assert list(parts) == [f"{s}_{p}" for s in ("disc", "vertebra") for p in ("heatmap", "level", "offset")]
    assert torch.allclose(total, sum(parts.values()))
    assert torch.allclose(total, total_loss(parts))
    # reference: upsample first, then the same loss on full-size predictions
    up = torch.nn.functional.interpolate(pred, size=(8, 8), mode="bilinear", align_corners=False)
    total_up, parts_up = loss.loss_parts(up, targets)
    for k in parts:
        assert torch.allclose(parts[k], parts_up[k], atol=1e-6), k
    # a nearest-neighbour upsampling gives different values (bilinear is really used)
    near = torch.nn.functional.interpolate(pred, size=(8, 8), mode="nearest")
    assert not torch.allclose(loss.loss_parts(near, targets)[0], total)


def test_no_offset_loss_switch():
    torch.manual_seed(1)
    pred = torch.randn(1, 4, 4, 4)
    t = _targets((torch.rand(1, 1, 4, 4) > 0.5).float(), torch.randn(1, 2, 4, 4), torch.ones(1, 2, 4, 4))
    total, parts = SpineOneLoss(streams(disc=1), use_offset_loss=False).loss_parts(pred, t)
    assert parts["disc_offset"].item() == 0.0
    assert total.item() == pytest.approx(parts["disc_heatmap"].item())


def test_target_validation():
    loss = SpineOneLoss(streams(disc=1))
    partial = {"disc_heatmap": torch.zeros(1, 1, 2, 2), "disc_offset": torch.zeros(1, 2, 2, 2)}
    with pytest.raises(KeyError, match="disc_offset_mask"):
        loss.loss_parts(torch.zeros(1, 4, 2, 2), partial)
    bad = _targets(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="disc_offset"):
        loss.loss_parts(torch.zeros(1, 4, 2, 2), bad)


def test_oa_mode_validation():
    with pytest.raises(ValueError, match="oa_mode"):
        SpineOneLoss(streams(disc=1), oa_mode="bogus")
    loss = SpineOneLoss(streams(disc=1))
    loss.oa_mode = "weighted_error"
    assert loss.oa_mode == "weighted_error"
    with pytest.raises(ValueError, match="oa_mode"):
        loss.oa_mode = "prediction"


def test_oa_weights_hand_computed():
    g = torch.tensor(
        [
            [
                [[-200.0, 0.0], [50.0, 100.0]],  # clipped to -100 -> (g + 100) / 200
                [[3.0, 3.0], [3.0, 3.0]],  # constant channel -> weight 1
            ]
        ]
    )
    w = oa_weights(g)
    assert w.shape == (1, 4, 2, 2)
    first = torch.tensor([[1.0, 1.5], [1.75, 2.0]])
    assert torch.allclose(w[0, 0], first) and torch.allclose(w[0, 1], first)
    assert torch.equal(w[0, 2], torch.ones(2, 2)) and torch.equal(w[0, 3], torch.ones(2, 2))
    # clipping at +100 too: 300 and 100 are the same after clipping
    g2 = torch.tensor([[[[300.0, 100.0], [0.0, -100.0]]]])
    assert torch.allclose(oa_weights(g2)[0, 0], torch.tensor([[2.0, 2.0], [1.5, 1.0]]))
    with pytest.raises(ValueError):
        oa_weights(torch.zeros(2, 2, 2))


def test_oa_gradient_matches_analytic_focal_gradient():
    logits = torch.tensor([[LOGITS]])
    hm = torch.tensor([[HEAT]])
    loss = SpineOneLoss(streams(disc=1))
    g = loss.heatmap_gradient(logits, hm)
    grads = [[_focal_grad(LOGITS[i][j], int(HEAT[i][j])) / 2.0 for j in range(2)] for i in range(2)]
    expected = torch.tensor([[grads]])
    assert torch.allclose(g, expected, atol=1e-6)
    # finite differences of the whole heatmap term, in double precision arithmetic of the formula
    h = 1e-4
    for i in range(2):
        for j in range(2):
            plus = [row[:] for row in LOGITS]
            minus = [row[:] for row in LOGITS]
            plus[i][j] += h
            minus[i][j] -= h
            fd = (_heat_loss(plus) - _heat_loss(minus)) / (2 * h)
            assert g[0, 0, i, j].item() == pytest.approx(fd, abs=1e-5)
    # the OA weights built from it: min-max of the analytic gradient, plus one
    flat = expected.flatten()
    w = oa_weights(g)
    assert torch.allclose(w[0, 0], 1 + (expected[0, 0] - flat.min()) / (flat.max() - flat.min()), atol=1e-5)


@pytest.mark.parametrize("mode", ["paper", "weighted_error"])
def test_oa_offset_loss_hand_computed(mode):
    logits = torch.tensor([[LOGITS]])
    hm = torch.tensor([[HEAT]])
    offsets = torch.tensor([[[[1.0, 2.0], [3.0, -4.0]], [[0.5, 0.0], [1.0, 2.0]]]])
    target = torch.tensor([[[[0.5, 0.0], [0.0, -1.0]], [[1.0, 0.0], [0.0, 1.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]])
    grads = [[_focal_grad(LOGITS[i][j], int(HEAT[i][j])) / 2.0 for j in range(2)] for i in range(2)]
    lo, hi = min(min(r) for r in grads), max(max(r) for r in grads)
    w = [[1 + (grads[i][j] - lo) / (hi - lo) for j in range(2)] for i in range(2)]
    err = 0.0
    for ch in range(2):
        for i, j in ((0, 0), (1, 1)):
            o_hat, o = offsets[0, ch, i, j].item(), target[0, ch, i, j].item()
            err += abs(w[i][j] * o_hat - o) if mode == "paper" else w[i][j] * abs(o_hat - o)
    loss = SpineOneLoss(streams(disc=1), oa_enabled=True, oa_mode=mode)
    _, parts = loss.loss_parts(_pred_1class(logits, offsets), _targets(hm, target, mask))
    assert parts["disc_offset"].item() == pytest.approx(err / 4, rel=1e-5)
    # works without a graph (evaluation): same value under no_grad
    with torch.no_grad():
        _, parts_ng = loss.loss_parts(_pred_1class(logits, offsets), _targets(hm, target, mask))
    assert parts_ng["disc_offset"].item() == pytest.approx(err / 4, rel=1e-5)


@pytest.mark.parametrize("mode", ["paper", "weighted_error"])
def test_oa_changes_only_offset_gradient(mode):
    torch.manual_seed(2)
    targets = _targets(
        (torch.rand(2, 2, 16, 16) > 0.8).float(),
        3 * torch.randn(2, 4, 16, 16),
        (torch.rand(2, 4, 16, 16) > 0.3).float(),
    )
    base = torch.randn(2, 7, 8, 8)
    grads = {}
    for oa in (False, True):
        pred = base.clone().requires_grad_(True)
        total, parts = SpineOneLoss(streams(disc=2), oa_enabled=oa, oa_mode=mode).loss_parts(pred, targets)
        total.backward()
        grads[oa] = pred.grad
        if oa:
            assert parts["disc_heatmap"].requires_grad
    assert torch.equal(grads[False][:, :2], grads[True][:, :2])  # heatmap logits: identical
    assert not torch.allclose(grads[False][:, 2:6], grads[True][:, 2:6])  # offsets: different
    assert torch.equal(grads[False][:, 6:], grads[True][:, 6:])  # level map: identical


def test_oa_switch_at_run_time():
    torch.manual_seed(3)
    pred = torch.randn(1, 4, 8, 8)
    t = _targets((torch.rand(1, 1, 8, 8) > 0.7).float(), 2 * torch.randn(1, 2, 8, 8), torch.ones(1, 2, 8, 8))
    loss = SpineOneLoss(streams(disc=1))
    off = loss.loss_parts(pred, t)[1]["disc_offset"]
    loss.oa_enabled = True
    on = loss.loss_parts(pred, t)[1]["disc_offset"]
    assert not torch.allclose(off, on)


def test_metatensor_inputs_give_plain_tensors_and_gradients():
    torch.manual_seed(4)
    pred = MetaTensor(torch.randn(1, 4, 4, 4)).requires_grad_(True)
    plain = _targets(torch.ones(1, 1, 8, 8), torch.ones(1, 2, 8, 8), torch.ones(1, 2, 8, 8))
    t = {k: MetaTensor(v) for k, v in plain.items()}
    total, parts = SpineOneLoss(streams(disc=1), oa_enabled=True).loss_parts(pred, t)
    assert type(total) is torch.Tensor and all(type(v) is torch.Tensor for v in parts.values())
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_forward_returns_the_total_and_keeps_the_parts_for_logging():
    """MONAI's trainer takes ``loss_function(pred, targets)`` as one tensor; the parts are logged from ``logged_parts``."""
    torch.manual_seed(3)
    loss = SpineOneLoss(streams(disc=1))
    pred = torch.randn(2, 4, 4, 4)
    t = _targets((torch.rand(2, 1, 8, 8) > 0.7).float(), torch.randn(2, 2, 8, 8), torch.ones(2, 2, 8, 8))
    total = loss(pred, t)
    ref_total, ref_parts = loss.loss_parts(pred, t)
    assert total.ndim == 0 and torch.equal(total, ref_total)
    logged = loss.logged_parts()
    assert set(logged) == {"disc_heatmap", "disc_offset", "disc_level", "total"}
    assert logged["total"] == pytest.approx(float(ref_total))
    assert logged["disc_offset"] == pytest.approx(float(ref_parts["disc_offset"]))


def test_level_loss_is_the_masked_mean_absolute_level_error():
    """Hand case: inside the mask the level map is off by 0.5 and 1.5 levels; outside, errors do not count."""
    level = torch.tensor([[[[0.5, 2.5], [9.0, 9.0]]]])
    target = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert SpineOneLoss.level_loss(level, target, mask).item() == pytest.approx(1.0)
    loss = SpineOneLoss(streams(disc=1))
    hm = torch.zeros(1, 1, 2, 2)
    t = _targets(hm, torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), level=target, level_mask=mask)
    total, parts = loss.loss_parts(_pred_1class(torch.full_like(hm, -9.0), torch.zeros(1, 2, 2, 2), level), t)
    assert parts["disc_level"].item() == pytest.approx(1.0)
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()))


def test_class_weights_scale_only_the_positive_pixels_of_their_class():
    """Two classes on a 2x2 grid: class 0 positive at (0, 0), class 1 at (1, 1); weights (1, 4) multiply only
    class 1's positive pixel, the divisor stays the 2 positives, and its gradient is 4 times the unweighted one."""
    logits = torch.tensor([[LOGITS, [[-0.7, 0.2], [1.1, -1.5]]]], requires_grad=True)
    heat = [[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]]
    hm = torch.tensor([heat])
    zeros = torch.zeros(1, 4, 2, 2)
    pred = torch.cat([logits, zeros, torch.zeros(1, 1, 2, 2)], dim=1)
    weighted = SpineOneLoss(streams(disc=2), class_weights={"disc": [1.0, 4.0]})
    plain = SpineOneLoss(streams(disc=2))
    terms = [
        [_focal(float(logits[0, c, a, b]), int(heat[c][a][b])) for a in range(2) for b in range(2)] for c in (0, 1)
    ]
    expected = (sum(terms[0]) + sum(terms[1]) + 3.0 * terms[1][3]) / 2.0
    _, parts = weighted.loss_parts(pred, _targets(hm, zeros, zeros))
    assert parts["disc_heatmap"].item() == pytest.approx(expected, rel=1e-5)
    (g_w,) = torch.autograd.grad(parts["disc_heatmap"], logits)
    (g_p,) = torch.autograd.grad(plain.loss_parts(pred, _targets(hm, zeros, zeros))[1]["disc_heatmap"], logits)
    assert g_w[0, 1, 1, 1].item() == pytest.approx(4.0 * g_p[0, 1, 1, 1].item(), rel=1e-5)
    assert g_w[0, 1, 0, 0].item() == pytest.approx(g_p[0, 1, 0, 0].item(), rel=1e-6)  # a negative: unchanged
    assert torch.allclose(g_w[0, 0], g_p[0, 0], rtol=1e-6)  # class 0 has weight 1


def test_class_weights_one_list_for_all_streams_and_validation():
    loss = SpineOneLoss(streams(left=3, right=3), class_weights=(1, 2, 4))
    assert {k: v.tolist() for k, v in loss.class_weights.items()} == {"left": [1, 2, 4], "right": [1, 2, 4]}
    assert SpineOneLoss(streams(left=3)).class_weights == {}
    with pytest.raises(ValueError, match="stream 'left' must be 3 positive"):
        SpineOneLoss(streams(left=3), class_weights=[1, 2])
    with pytest.raises(ValueError, match="stream 'left' must be 3 positive"):
        SpineOneLoss(streams(left=3), class_weights=[1, 0, 4])
    with pytest.raises(ValueError, match="unknown streams \\['disc'\\]"):
        SpineOneLoss(streams(left=3), class_weights={"disc": [1, 2, 4]})
