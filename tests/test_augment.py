"""Field-of-view augmentation (bundle.RandFieldOfViewd): cuts lie beyond the keypoints' margins, in mm."""

from __future__ import annotations

import pytest
import torch
from bundle.augment import RandFieldOfViewd
from monai.data import MetaTensor

NAN = float("nan")


def _image(rows: int = 60, mm_per_row: float = 2.0) -> MetaTensor:
    affine = torch.eye(4, dtype=torch.float64)
    affine[0, 0] = mm_per_row  # rows 2 mm apart along patient x
    return MetaTensor(torch.linspace(1.0, 2.0, rows).view(1, rows, 1).repeat(2, 1, 5), affine=affine)


def _kept_rows(out: torch.Tensor) -> tuple[int, int]:
    kept = (out[0, :, 0] > 1.0).nonzero()[:, 0]  # the minimum (1.0, row 0) marks cut rows
    return int(kept.min()), int(kept.max())


def test_cuts_keep_the_margins_around_the_keypoints_in_mm():
    """Keypoints at rows 20 and 40 (40 and 80 mm), margins 10 mm above and 20 mm below: every cut keeps rows
    15..50, and over many draws both ends vary (they are random), on every channel alike."""
    points = {
        "disc_points": torch.tensor([[40.0, 1.0, 0.0], [NAN, NAN, NAN]]),
        "v_points": torch.tensor([[80.0, 1, 0]]),
    }
    fov = RandFieldOfViewd("image", ["disc_points", "v_points"], above_mm=10.0, below_mm=20.0, prob=1.0)
    tops, bottoms = set(), set()
    for seed in range(40):
        fov.set_random_state(seed)
        out = fov({"image": _image(), **points})["image"]
        top, bottom = _kept_rows(out)
        assert 1 <= top <= 15 and 50 <= bottom <= 59
        assert torch.equal(out[0], out[1]) and isinstance(out, MetaTensor)
        tops.add(top)
        bottoms.add(bottom)
    assert len(tops) > 5 and len(bottoms) > 3


def test_no_keypoints_or_no_draw_leaves_the_image_alone():
    image = _image()
    fov = RandFieldOfViewd("image", ["disc_points"], prob=1.0)
    out = fov({"image": image, "disc_points": torch.full((5, 3), NAN)})["image"]
    assert torch.equal(out, image)
    never = RandFieldOfViewd("image", ["disc_points"], prob=0.0)
    assert torch.equal(never({"image": image, "disc_points": torch.tensor([[40.0, 1, 0]])})["image"], image)


def test_argument_and_input_checks():
    with pytest.raises(ValueError, match="points_keys"):
        RandFieldOfViewd("image", [])
    with pytest.raises(ValueError, match="above_mm"):
        RandFieldOfViewd("image", ["p"], above_mm=-1.0)
    with pytest.raises(TypeError, match="MetaTensor"):
        RandFieldOfViewd("image", ["p"], prob=1.0)({"image": torch.zeros(1, 4, 4), "p": torch.zeros(1, 3)})
