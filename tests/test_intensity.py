"""Exact percentiles by counting, and the percentile scaling the configs run, against numpy and MONAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bundle.intensity import ScaleIntensityPercentilesd, percentiles
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRangePercentilesd

QS = (0.0, 0.5, 37.3, 50.0, 99.5, 100.0)


@pytest.mark.parametrize("seed", range(4))
def test_integer_images_give_numpy_percentiles(seed):
    rng = np.random.default_rng(seed)
    image = rng.gamma(2.0, 150.0, size=(3, 37, 41)).astype(np.int32).astype(np.float32) - 1024 * (seed % 2)
    assert percentiles(image, QS) == pytest.approx(np.percentile(image, QS), abs=1e-9)
    assert percentiles(torch.from_numpy(image), QS) == pytest.approx(np.percentile(image, QS), abs=1e-9)


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(5).normal(size=(2, 9, 7)),  # fractions: numpy's own path
        np.array([[7.0]]),  # one value
        np.full((4, 4), 3.0),  # constant
        np.array([0.0, 2.0**21, 1.0]),  # integer but too wide for counting
        np.array([1, 5, 2, 9], dtype=np.uint16),  # an integer dtype
    ],
)
def test_any_image_gives_numpy_percentiles(image):
    assert percentiles(image, QS) == pytest.approx(np.percentile(image, QS), rel=1e-6, abs=1e-9)


def test_bad_percentiles_and_empty_images_are_refused():
    with pytest.raises(ValueError, match="in \\[0, 100\\]"):
        percentiles(np.ones(3), (50.0, 101.0))
    with pytest.raises(ValueError, match="empty"):
        percentiles(np.ones(0), (50.0,))


@pytest.mark.parametrize("channel_wise, relative", [(False, False), (True, False), (False, True)])
def test_drop_in_for_monai_percentile_scaling(channel_wise, relative):
    rng = np.random.default_rng(1)
    image = MetaTensor(torch.from_numpy(rng.integers(0, 4000, size=(3, 20, 24)).astype(np.float32)))
    args = dict(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    args.update(channel_wise=channel_wise, relative=relative)
    ours = ScaleIntensityPercentilesd(**args)({"image": image.clone()})["image"]
    monai = ScaleIntensityRangePercentilesd(**args)({"image": image.clone()})["image"]
    assert isinstance(ours, MetaTensor) and ours.dtype == monai.dtype
    assert torch.allclose(ours, monai, atol=1e-6)
