"""Severity oversampling of the training set (bundle.sampling, train.json ``oversample_by_severity``)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from bundle.sampling import item_severity_weight, refuse_in_distributed, severity_sampler
from torch.utils.data import WeightedRandomSampler

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WEIGHTS = [1.0, 2.0, 4.0]


def _item(study: str, **labels: list[int]) -> dict:
    return {"study_id": study, "keypoints": {s: {"mm": [None] * len(v), "label": v} for s, v in labels.items()}}


def test_item_weight_is_the_largest_weight_of_its_labelled_points():
    assert item_severity_weight(_item("a", left=[0, 0, -1], right=[0, 1, 0]), WEIGHTS) == 2.0
    assert item_severity_weight(_item("b", left=[0, 2, 1], right=[-1, -1, -1]), WEIGHTS) == 4.0
    assert item_severity_weight(_item("c", left=[-1, -1], right=[-1]), WEIGHTS) == 1.0  # nothing labelled
    assert item_severity_weight({"study_id": "d"}, WEIGHTS) == 1.0
    # per-stream weights: a stream without weights does not count
    assert item_severity_weight(_item("e", left=[2], right=[1]), {"right": [1.0, 3.0, 5.0]}) == 3.0


def test_item_weight_names_the_study_of_a_label_without_weight():
    with pytest.raises(ValueError, match=r"study x: label 3 of stream 'left'"):
        item_severity_weight(_item("x", left=[3]), WEIGHTS)
    with pytest.raises(ValueError, match="positive"):
        item_severity_weight(_item("y", left=[0]), [1.0, 0.0, 4.0])


def test_sampler_draws_items_in_proportion_to_their_weights():
    items = [_item("n", s=[0, 0]), _item("m", s=[1, 0]), _item("s", s=[0, 2])]
    sampler = severity_sampler(items, WEIGHTS, generator=torch.Generator().manual_seed(0))
    assert isinstance(sampler, WeightedRandomSampler) and len(sampler) == 3
    counts = collections.Counter(i for _ in range(3000) for i in sampler)
    total = sum(counts.values())
    for index, expected in enumerate((1 / 7, 2 / 7, 4 / 7)):
        assert abs(counts[index] / total - expected) < 0.02
    again = severity_sampler(items, WEIGHTS, generator=torch.Generator().manual_seed(0))
    first = severity_sampler(items, WEIGHTS, generator=torch.Generator().manual_seed(0))
    assert list(again) == list(first)  # seeded: the same draws


def test_sampler_off_or_misconfigured():
    items = [_item("a", s=[0])]
    assert severity_sampler(items, WEIGHTS, enabled=False) is None
    assert severity_sampler(items, None, enabled=False) is None
    with pytest.raises(ValueError, match="needs class_weights"):
        severity_sampler(items, None)
    with pytest.raises(ValueError, match="empty"):
        severity_sampler([], WEIGHTS)
    refuse_in_distributed(False)
    with pytest.raises(ValueError, match="multi_gpu_train"):
        refuse_in_distributed(True)


def _train_dataloader(*series_configs: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in ("train.json", *series_configs)])
    streams = [s.name for s in parser.get_parsed_content("codec").streams]
    items = [_item(str(i), **{s: [0, 0, 2 if i == 0 else 0, 0, 0] for s in streams}) for i in range(20)]
    parser["train#datalist"] = items
    parser["train#dataset"] = "@train#datalist"
    parser["num_workers"] = 0
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content("train#dataloader")


def test_train_config_uses_the_sampler_only_when_asked():
    plain = _train_dataloader()
    assert not isinstance(plain.sampler, WeightedRandomSampler)
    assert isinstance(plain.sampler, torch.utils.data.RandomSampler)  # shuffle stays on
    loader = _train_dataloader(oversample_by_severity=True, class_weights=WEIGHTS)
    assert isinstance(loader.sampler, WeightedRandomSampler)
    assert loader.sampler.weights.tolist() == [4.0] + [1.0] * 19
    with pytest.raises(Exception) as failed:  # MONAI's ConfigExpression error, caused by ours
        _train_dataloader(oversample_by_severity=True)
    assert "needs class_weights" in str(failed.value.__cause__)


def test_series_configs_that_replace_the_imports_still_reach_the_sampler():
    """configs/sagittal_t1.json replaces train.json's ``imports``: the sampler must still be importable there."""
    loader = _train_dataloader("sagittal_t1.json", oversample_by_severity=True)  # it sets class_weights 1, 2, 4
    assert loader.sampler.weights.tolist() == [4.0] + [1.0] * 19
    assert isinstance(_train_dataloader("axial_t2.json").sampler, torch.utils.data.RandomSampler)
