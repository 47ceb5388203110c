"""Inference speed-ups keep behaviour: BatchNorm folding, decoding under inference_mode, max filter, loader meta."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle.codec import OCPCCodec  # noqa: E402
from bundle.decoding import hough_voting, max_filter  # noqa: E402
from bundle.io import load_sagittal_series  # noqa: E402
from bundle.io.pixels import read_dicom_pixels  # noqa: E402
from bundle.networks import SpineOne, fuse_for_inference  # noqa: E402
from bundle.streams import RSNA_STREAMS  # noqa: E402
from dicom_fixtures import slice_pattern, write_series  # noqa: E402
from stream_fixtures import streams  # noqa: E402

CODEC = OCPCCodec(RSNA_STREAMS, network_stride=4)


def _randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics/affine and attention gammas, so folding and attention matter."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
        if hasattr(m, "gamma"):
            m.gamma.data.fill_(0.7)
    return net.eval()


@pytest.mark.parametrize("depth", [18, 50])
def test_fuse_for_inference_matches_eager(depth):
    torch.manual_seed(depth)
    net = _randomise(SpineOne(streams(disc=3, vertebra=2), backbone_depth=depth))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    fused = fuse_for_inference(net)
    assert fused is not net and sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == n_bn  # the original is untouched
    x = torch.randn(2, 7, 64, 48)
    with torch.no_grad():
        ref = net(x)
        assert torch.allclose(fused(x), ref, atol=1e-4, rtol=1e-4)
        cl = fuse_for_inference(net).to(memory_format=torch.channels_last)
        assert torch.allclose(cl(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-4, rtol=1e-4)
    assert not fused.training


def test_fuse_for_inference_pairs_only():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.ReLU())
    _randomise(seq)
    fused = fuse_for_inference(seq)
    # the leading BatchNorm has no conv before it and stays; the conv + BatchNorm pair is folded
    assert isinstance(fused[0], nn.BatchNorm2d) and isinstance(fused[2], nn.Identity)
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        assert torch.allclose(fused(x), seq(x), atol=1e-5)
    same = fuse_for_inference(seq, inplace=True)
    assert same is seq and isinstance(seq[2], nn.Identity)
    with pytest.raises(ValueError, match="torch.nn.Module"):
        fuse_for_inference("model")


def test_decoding_under_inference_mode_equals_no_grad():
    torch.manual_seed(1)
    pred = torch.randn(2, 10, 20, 24) * 3
    affine = torch.eye(4, dtype=torch.float64)
    with torch.no_grad():
        ref = CODEC.decode(pred, affine)
    with torch.inference_mode():
        out = CODEC.decode(pred, affine)
    assert out == ref and len(out[0]["disc"]) >= 1


def test_hough_voting_matches_autograd_splat():
    """The direct backward-kernel call equals autograd.grad of grid_sample (the brute-force adjoint)."""
    torch.manual_seed(2)
    p = torch.rand(1, 2, 7, 9)
    off = torch.randn(1, 4, 7, 9) * 4
    off[0, 0, 1, 1] = float("nan")
    canvas = torch.zeros(2, 1, 7, 9, requires_grad=True)
    cols, rows = torch.arange(9.0), torch.arange(7.0).view(7, 1)
    o = off.reshape(2, 2, 7, 9)
    grid = torch.stack(
        [(o[:, 0] + cols) * (2.0 / 9) + (1.0 / 9 - 1.0), (o[:, 1] + rows) * (2.0 / 7) + (1.0 / 7 - 1.0)], -1
    )
    grid = torch.nan_to_num(grid, nan=-3.0).clamp(-3.0, 3.0)
    sampled = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    (ref,) = torch.autograd.grad(sampled, canvas, grad_outputs=p.reshape(2, 1, 7, 9))
    assert torch.equal(hough_voting(p, off, radius=1.5), ref.view(1, 2, 7, 9) / (torch.pi * 1.5**2))


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_max_filter_equals_max_pool(kernel):
    torch.manual_seed(kernel)
    score = torch.rand(13, 17)
    score[score < 0.6] = 0.0
    score[4, 5:8] = 2.0  # a plateau
    ref = F.max_pool2d(score[None, None], kernel, stride=1, padding=kernel // 2)[0, 0]
    assert torch.equal(max_filter(score, kernel), ref)
    stack = torch.stack([score, -score, score.flip(0)])[None]  # leading dimensions (1, 3): one pass
    assert torch.equal(max_filter(stack, kernel), F.max_pool2d(stack[0], kernel, stride=1, padding=kernel // 2)[None])


def test_loader_meta_names_middle_file(tmp_path):
    """KeypointsWriter draws the overlay on the middle instance: the loader records its file."""
    paths = write_series(tmp_path / "s", n_slices=6, seed=4)  # spatial order, shuffled instance numbers
    img = load_sagittal_series(tmp_path / "s", 3)
    middle = Path(img.meta["middle_filename"])
    assert middle == paths[2]
    # the middle slice (index (6 - 1) // 2 = 2 after spatial sorting) sits in channel (3 - 1) // 2 = 1
    assert (read_dicom_pixels(middle) == slice_pattern(2, 32, 40)).all()
    assert (img[1].numpy() == slice_pattern(2, 32, 40)).all()


def test_decoding_leaves_the_thread_count_alone():
    """No library call changes process-wide state (concurrent MONAI Label requests share it)."""
    torch.manual_seed(3)
    pred = torch.randn(1, 10, 24, 20) * 3
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = CODEC.decode(pred)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one = CODEC.decode(pred)
        assert torch.get_num_threads() == 1
        assert [[kp["level"] for kp in o["disc"]] for o in one] == [[kp["level"] for kp in o["disc"]] for o in two]
    finally:
        torch.set_num_threads(before)
