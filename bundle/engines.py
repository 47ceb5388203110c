"""Iteration functions for MONAI's SupervisedTrainer / SupervisedEvaluator (``iteration_update``).

The trainer step computes SpineOne's loss parts (and objective association inside the loss); the
evaluation step runs the network and decodes keypoints with Hough voting, in patient mm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from bundle.decoding import decode_keypoints
from bundle.streams import StreamSpec, parse_streams, split_output
from ignite.engine import Engine

__all__ = ["TARGET_SUFFIXES", "target_keys", "SpineOneTrainStep", "SpineOneEvalStep"]

TARGET_SUFFIXES = ("heatmap", "offset", "offset_mask")


def target_keys(streams: Mapping[str, Mapping] | Sequence[StreamSpec]) -> list[str]:
    """Batch keys the loss needs: ``{stream}_heatmap``, ``{stream}_offset``, ``{stream}_offset_mask``."""
    return [f"{s.name}_{suffix}" for s in parse_streams(streams) for suffix in TARGET_SUFFIXES]


def _to_device(engine: Engine, value: torch.Tensor) -> torch.Tensor:
    return value.to(engine.state.device, non_blocking=getattr(engine, "non_blocking", False))


def _plain(image: torch.Tensor) -> torch.Tensor:
    """The network needs no metadata: a plain tensor skips MetaTensor's per-operation bookkeeping."""
    return image.as_tensor() if hasattr(image, "as_tensor") else image


class SpineOneTrainStep:
    """One training iteration: forward, SpineOne loss (all parts), backward, optimizer step.

    Returns the batch decollated as MONAI's trainers do, a list with one ``{"image", "pred", "loss", "losses"}``
    per sample, where ``loss`` (the batch total) and ``losses`` (every loss part and ``total``, floats) repeat:
    ``from_engine(["loss"], first=True)`` and ``from_engine(["losses"], first=True)`` read them, as MONAI's
    default handlers (StatsHandler, MLflow tracking) expect.
    """

    def __init__(self, streams: Mapping[str, Mapping] | Sequence[StreamSpec]) -> None:
        self.keys = target_keys(streams)

    def __call__(self, engine: Engine, batch: dict[str, Any]) -> list[dict[str, Any]]:
        image = _to_device(engine, batch["image"])
        targets = {key: _to_device(engine, batch[key]) for key in self.keys}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=getattr(engine, "optim_set_to_none", False))
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            with torch.autocast(device_type=image.device.type):
                pred = engine.inferer(_plain(image), engine.network)
            total, parts = engine.loss_function(pred.float(), targets)
            engine.scaler.scale(total).backward()
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            pred = engine.inferer(_plain(image), engine.network)
            total, parts = engine.loss_function(pred, targets)
            total.backward()
            engine.optimizer.step()
        losses = {name: float(value.detach()) for name, value in parts.items()}
        losses["total"] = float(total.detach())
        loss = total.detach()
        pred = pred.detach()
        return [{"image": image[i], "pred": pred[i], "loss": loss, "losses": losses} for i in range(image.shape[0])]


class SpineOneEvalStep:
    """One evaluation iteration: forward without gradients, then Hough-voting decoding per stream.

    Returns ``{"image", "pred", "keypoints", "batch"}``: ``keypoints`` is a list over the batch of
    ``{stream: [keypoint dict, ...]}`` as ``bundle.decoding.decode_keypoints`` returns them, with ``mm``
    in patient coordinates through the image affine; ``batch`` is the input batch (ground truth and meta).
    """

    def __init__(
        self,
        streams: Mapping[str, Mapping] | Sequence[StreamSpec],
        radius: float = 6.0,
        stride: int = 1,
        network_stride: int = 4,
    ) -> None:
        self.specs = parse_streams(streams)
        self.classes = {s.name: s.num_classes for s in self.specs}
        self.radius = float(radius)
        self.stride = int(stride)
        self.upsample = float(network_stride) / float(stride)

    def __call__(self, engine: Engine, batch: dict[str, Any]) -> dict[str, Any]:
        image = _to_device(engine, batch["image"])
        engine.network.eval()
        with torch.inference_mode():
            pred = engine.inferer(_plain(image), engine.network)
            affine = getattr(image, "affine", None)
            if affine is not None and affine.ndim == 2:
                affine = affine.unsqueeze(0).expand(image.shape[0], -1, -1)
            keypoints = decode_keypoints(
                split_output(torch.as_tensor(pred).float(), self.classes),
                self.specs,
                radius=self.radius,
                upsample=self.upsample,
                stride=self.stride,
                affine=None if affine is None else affine.detach().cpu().double(),
            )
        return {"image": image, "pred": pred, "keypoints": keypoints, "batch": batch}
