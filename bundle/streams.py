"""Stream specifications: which structures the network detects, their levels and classes.

A *stream* is one structure type (disc, vertebra). Each has an ordered tuple of level names
(head to feet) and an ordered tuple of class names; the network gives it ``C = len(classes)``
heatmap channels, ``2C`` offset channels and one level-map channel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from bundle.rsna_labels import CONDITIONS as RSNA_CONDITIONS
from bundle.rsna_labels import LEVELS as RSNA_LEVELS
from bundle.rsna_labels import SEVERITIES as RSNA_SEVERITIES

__all__ = [
    "StreamSpec",
    "RSNA_STREAMS",
    "RSNA_T1_STREAMS",
    "TIANCHI_STREAMS",
    "RSNA_AXIAL_STREAMS",
    "AXIAL_LEVEL",
    "STREAM_CONDITIONS",
    "parse_streams",
    "class_counts",
    "stream_channels",
    "split_output",
]


@dataclass(frozen=True)
class StreamSpec:
    """One detected structure: ``levels`` ordered head to feet, ``classes`` in channel order."""

    name: str
    levels: tuple[str, ...]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a stream needs a non-empty name")
        if len(self.levels) == 0 or len(set(self.levels)) != len(self.levels):
            raise ValueError(f"stream {self.name!r}: levels must be non-empty and unique, got {self.levels}")
        if len(self.classes) == 0 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"stream {self.name!r}: classes must be non-empty and unique, got {self.classes}")
        object.__setattr__(self, "levels", tuple(self.levels))
        object.__setattr__(self, "classes", tuple(self.classes))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_levels(self) -> int:
        return len(self.levels)


RSNA_STREAMS: tuple[StreamSpec, ...] = (StreamSpec("disc", RSNA_LEVELS, RSNA_SEVERITIES),)
#: the sagittal T1 model: neural foraminal narrowing per side (left, right)
RSNA_T1_STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("left_foramen", RSNA_LEVELS, RSNA_SEVERITIES),
    StreamSpec("right_foramen", RSNA_LEVELS, RSNA_SEVERITIES),
)

TIANCHI_DISC_LEVELS = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
TIANCHI_VERTEBRA_LEVELS = ("L1", "L2", "L3", "L4", "L5")
TIANCHI_CLASSES = ("Normal", "Degenerative")
TIANCHI_STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("disc", TIANCHI_DISC_LEVELS, TIANCHI_CLASSES),
    StreamSpec("vertebra", TIANCHI_VERTEBRA_LEVELS, TIANCHI_CLASSES),
)


def parse_streams(streams: Mapping[str, Mapping] | Sequence[StreamSpec]) -> tuple[StreamSpec, ...]:
    """Normalise the streams (a config mapping ``{name: {"levels": [...], "classes": [...]}}``, StreamSpecs or a
    codec, whose streams are taken) to a tuple of StreamSpecs. This is the one meaning of ``streams``.

    Example:
        >>> parse_streams({"disc": {"levels": ["L1/L2"], "classes": ["a", "b"]}})[0].num_classes
        2
    """
    if hasattr(streams, "streams") and not isinstance(streams, Mapping):  # an OCPCCodec
        streams = streams.streams
    if isinstance(streams, StreamSpec):
        streams = (streams,)
    if isinstance(streams, Mapping):
        out = []
        for name, spec in streams.items():
            if isinstance(spec, StreamSpec):
                out.append(spec)
                continue
            if not isinstance(spec, Mapping):
                raise ValueError(f"stream {name!r} must be {{'levels': [...], 'classes': [...]}}, got {spec!r}")
            missing = {"levels", "classes"} - set(spec)
            if missing:
                raise ValueError(f"stream {name!r} misses {sorted(missing)}")
            out.append(StreamSpec(str(name), tuple(spec["levels"]), tuple(spec["classes"])))
        specs = tuple(out)
    else:
        specs = tuple(streams)
    if not specs:
        raise ValueError("at least one stream is needed")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"stream names must be unique, got {names}")
    return specs


def class_counts(streams: Mapping[str, Mapping] | Sequence[StreamSpec]) -> dict[str, int]:
    """``{stream: number of classes}`` in stream order, from any form :func:`parse_streams` takes."""
    return {s.name: s.num_classes for s in parse_streams(streams)}


def stream_channels(streams: Mapping[str, int]) -> int:
    """Total output channels of the network: ``sum(3 * C + 1)`` over streams (see :func:`split_output`)."""
    return sum(3 * int(c) + 1 for c in streams.values())


def split_output(
    output: torch.Tensor, streams: Mapping[str, int]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Split the network's single output (B, sum (3C + 1), H, W) into
    ``{stream: (logits (B, C, H, W), offsets (B, 2C, H, W), level (B, 1, H, W))}``.

    Streams follow the mapping's order; within a stream, C heatmap logits come first, then 2C offsets
    interleaved ``(dx_0, dy_0, dx_1, dy_1, ...)`` (dx along columns, dy along rows), then one level map: the
    regressed level index (0 = the stream's first level, head to feet) of the structure under each pixel.
    """
    expected = stream_channels(streams)
    if output.ndim != 4 or output.shape[1] != expected:
        raise ValueError(f"expected output of shape (B, {expected}, H, W), got {tuple(output.shape)}")
    parts: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    start = 0
    for name, c in streams.items():
        c = int(c)
        logits = output[:, start : start + c]
        offsets = output[:, start + c : start + 3 * c]
        parts[name] = (logits, offsets, output[:, start + 3 * c : start + 3 * c + 1])
        start += 3 * c + 1
    return parts


#: the one level of an axial item: the disc its slices were chosen for (the item's ``level`` names it)
AXIAL_LEVEL = "disc"
RSNA_AXIAL_STREAMS: tuple[StreamSpec, ...] = tuple(
    StreamSpec(f"{side}_subarticular", (AXIAL_LEVEL,), RSNA_SEVERITIES) for side in ("left", "right")
)

#: RSNA condition (train.csv / submission key) of each stream of the three series models
STREAM_CONDITIONS: dict[str, str] = dict(
    zip([s.name for s in (*RSNA_STREAMS, *RSNA_T1_STREAMS, *RSNA_AXIAL_STREAMS)], RSNA_CONDITIONS)
)
