"""bf16 against fp32 answers on small cases (issue 14's accuracy criterion, reduced for CI).

Two checks that run in seconds: (1) the decoder gives the same answers for a clear network output and for
the same output rounded to bfloat16 (what a bf16 network's last layer delivers): same level and class for
every keypoint, positions within 0.5 mm, PCK-6 and macro F1 within 0.005; (2) the untrained demo network
(ResNet-18 SpineOne) under bf16 autocast stays within a small fraction of the output spread of fp32.
The full criterion on the trained demo model and held-out phantoms is measured in docs/performance.md: a
briefly trained model (tried: 40 Adam steps at 64 x 64) has near-ties between peaks and classes that any
rounding can flip, and training a model good enough to have none takes too long for CI.
"""

from __future__ import annotations

import numpy as np
import torch
from bundle.codec import OCPCCodec
from bundle.metrics import keypoint_scores
from bundle.networks import SpineOne, fuse_for_inference
from bundle.precision import AutocastInferer
from bundle.streams import RSNA_STREAMS
from bundle.transforms import OCPCTargetsd
from monai.data import MetaTensor

SIZE, RADIUS, PIXDIM = 64, 4.0, 1.3125  # demo: radius 4 target pixels, 1.3125 mm pixels
#: five discs SIZE / 6 pixels apart (14 mm): the codec's expected level spacing says so; stride-1 output
CODEC = OCPCCodec(RSNA_STREAMS, radius=RADIUS, target_stride=1, network_stride=1, level_spacing_mm=SIZE / 6 * PIXDIM)
#: sagittal voxel (row, col, k) -> patient mm (LPS): rows run head to feet (z falls), columns along y, k along x
AFFINE = torch.tensor(
    [[0.0, 0.0, PIXDIM, 0.0], [0.0, PIXDIM, 0.0, 0.0], [-PIXDIM, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
    dtype=torch.float64,
)


def _study(gen: torch.Generator) -> dict:
    """OCPC targets of five discs down the middle of a SIZE x SIZE grid with random classes."""
    rows = (torch.arange(5) + 1) * SIZE / 6 + torch.rand(5, generator=gen) * 2 - 1
    cols = SIZE / 2 + torch.rand(5, generator=gen) * 8 - 4
    labels = torch.randint(0, 3, (5,), generator=gen)
    mm = torch.stack([torch.zeros(5), cols * PIXDIM, -rows * PIXDIM], dim=1).double()  # AFFINE at k = 0
    encode = OCPCTargetsd(CODEC)
    image = MetaTensor(torch.zeros(7, SIZE, SIZE), affine=AFFINE)
    return encode({"image": image, "disc_points": mm, "disc_labels": labels})


def _network_like_output(study: dict, gen: torch.Generator) -> torch.Tensor:
    """(10, SIZE, SIZE) logits (+-4 inside / outside the disks, with noise), offsets and level map (+ noise), stride 1."""
    logits = 8.0 * study["disc_heatmap"] - 4.0 + 0.5 * torch.randn(3, SIZE, SIZE, generator=gen)
    offsets = study["disc_offset"] + 0.3 * torch.randn(6, SIZE, SIZE, generator=gen)
    level = study["disc_level"] + 0.1 * torch.randn(1, SIZE, SIZE, generator=gen)
    return torch.cat([logits, offsets, level])


def _scores(keypoints: list[dict], studies: list[dict]) -> dict:
    pred_mm, pred_labels = np.full((len(studies) * 5, 3), np.nan), np.full((len(studies) * 5,), -1)
    for i, kp in enumerate(keypoints):
        for point in kp["disc"]:
            pred_mm[5 * i + point["level_index"]] = point["mm"]
            pred_labels[5 * i + point["level_index"]] = point["label"]
    gt_mm = np.concatenate([s["disc_points"].numpy() for s in studies])
    gt_labels = np.concatenate([s["disc_labels"].numpy() for s in studies])
    return keypoint_scores(pred_mm, pred_labels, gt_mm, gt_labels, list(RSNA_STREAMS[0].classes))


def test_decoding_answers_survive_bf16_rounding_of_the_output():
    gen = torch.Generator().manual_seed(0)
    studies = [_study(gen) for _ in range(16)]
    out = torch.stack([_network_like_output(s, gen) for s in studies])
    affine = AFFINE.unsqueeze(0).expand(len(studies), -1, -1)
    answers = {name: CODEC.decode(pred, affine) for name, pred in (("fp32", out), ("bf16", out.bfloat16().float()))}
    worst, points = 0.0, 0
    for a, b in zip(answers["fp32"], answers["bf16"]):
        ka, kb = ({k["level_index"]: k for k in x["disc"]} for x in (a, b))
        assert set(ka) == set(kb) and {ka[i]["label"] for i in ka} == {kb[i]["label"] for i in kb}
        for level in ka:
            assert ka[level]["label"] == kb[level]["label"]
            worst = max(worst, float(np.linalg.norm(np.subtract(ka[level]["mm"], kb[level]["mm"]))))
            points += 1
    assert points == 16 * 5 and worst <= 0.5
    fp32, bf16 = _scores(answers["fp32"], studies), _scores(answers["bf16"], studies)
    assert fp32["pck"]["6"] == 1.0  # the clear output is decoded right
    assert abs(fp32["pck"]["6"] - bf16["pck"]["6"]) <= 0.005
    assert abs(fp32["macro_f1"] - bf16["macro_f1"]) <= 0.005


def test_demo_network_under_bf16_stays_close_to_fp32():
    """Untrained ResNet-18 SpineOne, folded BatchNorm, channels_last (as inference runs it): the bf16 logits
    and offsets differ from fp32 by a small fraction of their spread (issue 14 measured 0.03 against 2.2)."""
    torch.manual_seed(0)
    net = fuse_for_inference(SpineOne(RSNA_STREAMS, backbone_depth=18).eval()).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for head in net.heads:  # attention on, so the PAM/CAM paths count
            head.pam.gamma.fill_(0.5)
            head.cam.gamma.fill_(0.5)
    x = torch.randn(2, 7, 96, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fp32, bf16 = AutocastInferer("fp32")(x, net), AutocastInferer("bf16")(x, net)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    spread = float(fp32.std())
    assert float((bf16 - fp32).abs().max()) < 0.05 * spread, (float((bf16 - fp32).abs().max()), spread)
