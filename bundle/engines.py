"""``prepare_batch`` callables for MONAI's standard ``SupervisedTrainer`` and ``SupervisedEvaluator``.

Both engines run MONAI's own iteration (so the iteration events fire, ``amp`` and gradient accumulation
work, and standard handlers such as gradient clipping attach as usual); SpineOne only chooses what goes in:

- training: the image as a plain tensor (the network needs no metadata) and the codec's target dict, which
  ``SpineOneLoss`` takes as ``loss_function(pred, targets)``;
- evaluation: the image MetaTensor (its affine gives the keypoints' mm in the postprocessing) and, as the
  ``label``, the ground truth the keypoint metric needs (``{stream}_points``, ``{stream}_labels``, ``skipped``).
  Keypoints are decoded by the evaluator's ``postprocessing`` (``bundle.transforms.KeypointsDecoded``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from bundle.codec import OCPCCodec
from bundle.skipping import SKIPPED_KEY

__all__ = ["TrainingBatch", "EvaluationBatch"]


def _to(value: torch.Tensor, device: torch.device | str | None, non_blocking: bool) -> torch.Tensor:
    return value.to(device, non_blocking=non_blocking) if device is not None else value


class TrainingBatch:
    """``prepare_batch`` of the trainer: ``(image (B, C, H, W) plain tensor, {target key: tensor})`` on ``device``.

    Example (config): ``"prepare_batch": "$bundle.TrainingBatch(@codec)"``.
    """

    def __init__(self, codec: OCPCCodec, image_key: str = "image") -> None:
        self.keys = codec.target_keys()
        self.image_key = image_key

    def __call__(
        self, batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kw
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        missing = [k for k in (self.image_key, *self.keys) if k not in batchdata]
        if missing:
            raise KeyError(f"training batch lacks {missing} (run OCPCTargetsd last in the training transforms)")
        image = batchdata[self.image_key]
        image = image.as_tensor() if hasattr(image, "as_tensor") else image  # no MetaTensor bookkeeping per op
        targets = {k: _to(torch.as_tensor(batchdata[k]), device, non_blocking) for k in self.keys}
        return _to(image, device, non_blocking), targets


class EvaluationBatch:
    """``prepare_batch`` of the evaluator: ``(image MetaTensor on device, ground truth dict)``.

    The ground truth (kept on the CPU) holds whichever of ``{stream}_points``, ``{stream}_labels`` and
    ``skipped`` the batch has; the standard evaluator puts it under ``label`` in its output.
    """

    def __init__(self, streams: OCPCCodec | Sequence, image_key: str = "image") -> None:
        specs = streams.streams if isinstance(streams, OCPCCodec) else streams
        self.keys = [f"{s.name}_{part}" for s in specs for part in ("points", "labels")] + [SKIPPED_KEY]
        self.image_key = image_key

    def __call__(
        self, batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kw
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        truth = {k: batchdata[k] for k in self.keys if k in batchdata}
        return _to(batchdata[self.image_key], device, non_blocking), truth
