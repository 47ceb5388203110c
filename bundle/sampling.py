"""Training-set sampling by severity: studies with a rare, heavily scored grade drawn more often.

An addition to the paper (off by default, ``oversample_by_severity`` in ``configs/train.json``). The RSNA metric
weighs Severe 4 and Moderate 2, but Severe is 4-5% of the labels (``docs/README.md``), so a model sees few of
them per epoch. Each training item is drawn with probability proportional to the largest class weight among its
labelled points (the same ``class_weights`` as the loss's), with replacement, as many draws per epoch as there are
items. Written here because torch's ``WeightedRandomSampler`` takes the weights but nothing derives them from a
keypoint datalist.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import WeightedRandomSampler

__all__ = ["item_severity_weight", "severity_sampler", "refuse_in_distributed"]


def _stream_weights(
    class_weights: Mapping[str, Sequence[float]] | Sequence[float], stream: str
) -> Sequence[float] | None:
    if isinstance(class_weights, Mapping):
        return class_weights.get(stream)
    return class_weights


def item_severity_weight(
    item: Mapping[str, Any], class_weights: Mapping[str, Sequence[float]] | Sequence[float]
) -> float:
    """The sampling weight of one datalist item: the largest ``class_weights[label]`` over its labelled points.

    Args:
        item: a datalist item with ``keypoints`` ``{stream: {"label": [class index, or -1 when unlabelled]}}``.
        class_weights: one weight per class for every stream, or ``{stream: weights}`` (streams absent weigh 1).

    Returns:
        the weight (1.0 for an item without labelled points or without weighted streams).

    Raises:
        ValueError: a label outside its stream's weights, or a weight that is not positive.

    Example:
        >>> item = {"keypoints": {"left": {"label": [0, 2, -1]}, "right": {"label": [1, 0, 0]}}}
        >>> item_severity_weight(item, [1.0, 2.0, 4.0])
        4.0
    """
    weight = 1.0
    for stream, points in (item.get("keypoints") or {}).items():
        weights = _stream_weights(class_weights, stream)
        if weights is None:
            continue
        if any(w <= 0 for w in weights):
            raise ValueError(f"class_weights must be positive, got {list(weights)} for stream {stream!r}")
        for label in points.get("label", []):
            if label is None or int(label) < 0:
                continue
            if int(label) >= len(weights):
                raise ValueError(
                    f"study {item.get('study_id', '?')}: label {label} of stream {stream!r} has no class weight "
                    f"(class_weights has {len(weights)})"
                )
            weight = max(weight, float(weights[int(label)]))
    return weight


def severity_sampler(
    items: Sequence[Mapping[str, Any]],
    class_weights: Mapping[str, Sequence[float]] | Sequence[float] | None,
    enabled: bool = True,
    generator: torch.Generator | None = None,
) -> WeightedRandomSampler | None:
    """A sampler drawing ``len(items)`` items per epoch with replacement, each in proportion to
    :func:`item_severity_weight`; ``None`` (plain shuffling) when not ``enabled``.

    Raises:
        ValueError: ``enabled`` without ``class_weights``, or an empty datalist.

    Example:
        >>> items = [{"keypoints": {"s": {"label": [0]}}}, {"keypoints": {"s": {"label": [2]}}}]
        >>> severity_sampler(items, [1.0, 2.0, 4.0]).weights.tolist()
        [1.0, 4.0]
    """
    if not enabled:
        return None
    if class_weights is None:
        raise ValueError("oversample_by_severity needs class_weights (one weight per class, e.g. [1.0, 2.0, 4.0])")
    if not items:
        raise ValueError("severity_sampler got an empty datalist")
    weights = [item_severity_weight(item, class_weights) for item in items]
    return WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=generator)


def refuse_in_distributed(oversample_by_severity: bool) -> None:
    """Stop a multi-GPU run asked to oversample: its ``DistributedSampler`` shards the plain datalist, so the
    option would pass silently.

    Raises:
        ValueError: ``oversample_by_severity`` is true.
    """
    if oversample_by_severity:
        raise ValueError(
            "oversample_by_severity is not supported with configs/multi_gpu_train.json (DistributedSampler shards "
            "the plain datalist); train on one device, or leave it false"
        )
