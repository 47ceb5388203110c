"""The sagittal T1 model's spine window (bundle.io.CropAroundCentred): validation and study inference crop the
training crop's size around the spinal-canal points; the crop is a plain window of the full image whose affine
keeps every pixel at its patient mm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bundle.codec import mm_to_pixels_np, pixels_to_mm_np
from bundle.io import CropAroundCentred, build_rsna_t1_datalist
from bundle.phantoms import generate_phantoms
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose


def _image(rows: int = 40, cols: int = 30) -> MetaTensor:
    affine = torch.tensor([[0.0, 0.0, 1.0, 5.0], [0.7, 0.0, 0.0, -3.0], [0.0, -0.5, 0.0, 2.0], [0, 0, 0, 1]])
    return MetaTensor(torch.rand(2, rows, cols, generator=torch.Generator().manual_seed(0)), affine=affine.double())


def _offset(full: MetaTensor, crop: MetaTensor) -> tuple[int, int]:
    """(row, col) of the crop's first pixel in the full image, through the two affines (mm of pixel (0, 0))."""
    x, y = mm_to_pixels_np(pixels_to_mm_np([[0.0, 0.0]], crop.affine), full.affine)[0]
    return int(round(y)), int(round(x))


@pytest.mark.parametrize("at, start", [((10.0, 20.0), (4, 12)), ((0.0, 0.0), (0, 0)), ((39.0, 29.0), (28, 14))])
def test_window_is_centred_on_the_point_inside_the_image_and_keeps_pixels_at_their_mm(at, start):
    image = _image()
    row, col = at
    image.meta["canal_centre_mm"] = pixels_to_mm_np([[col, row]], image.affine)[0].tolist()
    out = CropAroundCentred("image", (12, 16))({"image": image})["image"]
    assert tuple(out.shape) == (2, 12, 16)
    assert _offset(image, out) == start  # centred where the image allows, clamped at its edges
    r, c = start
    assert torch.equal(out.as_tensor(), image.as_tensor()[:, r : r + 12, c : c + 16])


def test_no_centre_or_a_small_image_is_not_cropped():
    image = _image()
    assert CropAroundCentred("image", (12, 16))({"image": image})["image"] is image  # no canal points given
    image.meta["canal_centre_mm"] = pixels_to_mm_np([[15.0, 20.0]], image.affine)[0].tolist()
    out = CropAroundCentred("image", (64, 16))({"image": image})["image"]
    assert tuple(out.shape) == (2, 40, 16)  # rows shorter than the window: all kept
    with pytest.raises(ValueError, match="roi_size"):
        CropAroundCentred("image", (12,))


def test_t1_validation_and_inference_see_the_training_crop_around_the_canal(tmp_path):
    data = generate_phantoms(tmp_path / "rsna", "rsna", studies=1, seed=3, min_size=256, max_size=512)
    item = build_rsna_t1_datalist(data)[0]
    parser = ConfigParser()
    parser.read_config(["configs/train.json", "configs/sagittal_t1.json"])
    parser["bundle_root"] = "."
    parser.get_parsed_content("imports")
    full = Compose(parser.get_parsed_content("preprocessing_transforms"))(dict(item))["image"]
    window = parser.get_parsed_content("validate#preprocessing")(dict(item))["image"]
    assert tuple(full.shape[1:]) == (640, 640) and tuple(window.shape[1:]) == tuple(
        parser.get_parsed_content("crop_size")
    )
    r, c = _offset(full, window)
    assert torch.equal(window.as_tensor(), full.as_tensor()[:, r : r + 512, c : c + 512])
    canal = np.mean([p for p in item["canal_mm"] if p is not None], axis=0)
    x, y = mm_to_pixels_np(canal, window.affine)[0]
    assert 0 < x < 512 and 0 < y < 512  # the canal inside the window
    unlocated = parser.get_parsed_content("validate#preprocessing")({**item, "canal_mm": None})["image"]
    assert tuple(unlocated.shape[1:]) == (640, 640)  # without canal points: the whole field of view
