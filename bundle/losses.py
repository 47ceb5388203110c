"""SpineOne training loss (paper eq. 4-7): focal heatmap loss, L1 offset loss, objective association.

Per stream with ``C`` classes the network predicts ``C`` heatmap logits and ``2C`` offsets on the
network grid (stride ``OUTPUT_STRIDE``; layout: :func:`bundle.streams.split_output`). Both are upsampled bilinearly to the
target grid (the paper's ``B(.)``) and compared with the OCPC targets:

- heatmap: sigmoid focal loss (gamma 2), summed over pixels and classes of the batch and divided by
  the number of positive target pixels (target > 0.5) of that stream in the batch, at least 1. Optional
  ``class_weights`` (an addition to the paper, default off) multiply the loss of class ``c``'s positive pixels
  by ``w_c`` (negatives keep weight 1): the per-pixel optimum of the sigmoid moves from the class posterior
  ``q`` to ``w q / (w q + 1 - q)``, so a rare, heavily scored class (RSNA Severe, sample weight 4) is not
  drowned by the frequent one;
- offset: L1 inside the disks, summed over the masked elements and divided by their number (each of
  dx, dy counts once), at least 1. So the offset term is the mean absolute error in target-grid
  pixels per masked coordinate, independent of the number of keypoints and of the batch size.

- level map (an addition to the paper, see :mod:`bundle.levels`): L1 between the regressed and the target
  level index inside the disks of every labelled keypoint, divided by the number of those pixels, at least 1.

Total = sum of all terms of all streams, no weights between the terms.

Objective association (OA): ``g = dL_heatmap / dh`` with ``h`` the upsampled heatmap logits,
detached; weights ``w = 1 + minmax(clip(g, -100, 100))`` per sample and channel, repeated onto the
(dx, dy) pair of each class; the offset loss becomes ``|w * o_hat - o|`` ("paper", as eq. 7 writes it)
or ``w * |o_hat - o|`` ("weighted_error"). ``g`` is computed on a detached copy of the logits, so OA
works under ``torch.no_grad()`` (evaluation) as in training, and only changes the offset term's gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from bundle.streams import StreamSpec, class_counts, split_output
from monai.data import MetaTensor
from monai.losses import FocalLoss
from torch import nn

__all__ = ["OA_MODES", "SpineOneLoss", "oa_weights", "positive_class_weights", "total_loss"]

OA_MODES = ("paper", "weighted_error")
OA_CLIP = 100.0


def total_loss(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Plain sum of the loss parts (the paper's total, no weights)."""
    if not parts:
        raise ValueError("no loss parts to sum")
    return torch.stack([p.reshape(()) for p in parts.values()]).sum()


def oa_weights(grad: torch.Tensor, clip: float = OA_CLIP) -> torch.Tensor:
    """Objective-association weights from the heatmap-loss gradient.

    Args:
        grad: (B, C, H, W) gradient of the heatmap loss with respect to the heatmap logits.
        clip: gradients are clipped to [-clip, clip] first.

    Returns:
        (B, 2C, H, W) weights in [1, 2]: ``1 + (g - min) / (max - min)`` per sample and channel
        (a constant channel gives 1), class channel c copied to offset channels 2c (dx) and 2c + 1 (dy).

    Example:
        >>> g = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
        >>> oa_weights(g)[0, :, 0, 1].tolist()
        [1.25, 1.25]
    """
    if grad.ndim != 4:
        raise ValueError(f"expected a gradient of shape (B, C, H, W), got {tuple(grad.shape)}")
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    g = grad.detach().clamp(-clip, clip)
    low = g.amin(dim=(2, 3), keepdim=True)
    span = g.amax(dim=(2, 3), keepdim=True) - low
    norm = torch.where(span > 0, (g - low) / span.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g))
    return (1.0 + norm).repeat_interleave(2, dim=1)


def positive_class_weights(
    streams: Mapping[str, int], class_weights: Mapping[str, Sequence[float]] | Sequence[float] | None
) -> dict[str, torch.Tensor]:
    """Per-stream class weights (C,) float32 from ``class_weights``; streams without weights are absent.

    Args:
        streams: ``{stream: number of classes}`` (:func:`bundle.streams.class_counts`).
        class_weights: None (no weighting), one sequence for every stream (its length must be each stream's
            number of classes), or ``{stream: sequence}`` for some streams. Weights must be positive.

    Example:
        >>> positive_class_weights({"a": 3, "b": 2}, {"a": [1, 2, 4]})["a"].tolist()
        [1.0, 2.0, 4.0]
    """
    if class_weights is None:
        return {}
    if isinstance(class_weights, Mapping):
        unknown = sorted(set(class_weights) - set(streams))
        if unknown:
            raise ValueError(f"class_weights name unknown streams {unknown}; streams: {list(streams)}")
        given = {name: class_weights[name] for name in streams if name in class_weights}
    else:
        given = {name: class_weights for name in streams}
    out = {}
    for name, w in given.items():
        t = torch.as_tensor([float(v) for v in w], dtype=torch.float32)
        if t.numel() != streams[name] or not bool((t > 0).all()):
            raise ValueError(
                f"class_weights of stream {name!r} must be {streams[name]} positive numbers, got {list(w)}"
            )
        out[name] = t
    return out


class SpineOneLoss(nn.Module):
    """Sum over streams of the focal heatmap loss and the (OA-weighted) L1 offset loss.

    Args:
        streams: the codec's streams (``"@codec"``, StreamSpecs or the config mapping), in output order.
        gamma: focal loss exponent (paper: 2).
        oa_enabled: apply objective association; an event handler may switch it at run time.
        oa_mode: "paper" (``|w * o_hat - o|``) or "weighted_error" (``w * |o_hat - o|``).
        use_offset_loss: False drops the offset terms (ablation); their parts are then 0.
        class_weights: weights of the positive heatmap pixels per class (:func:`positive_class_weights`:
            None = off, one list for all streams, or ``{stream: list}``), e.g. the RSNA sample weights (1, 2, 4).

    ``loss_parts(pred, targets)``: ``pred`` (B, sum (3C + 1), h, w) raw network output; ``targets`` holds per
    stream ``{name}_heatmap`` (B, C, H, W) in {0, 1}, ``{name}_offset`` (B, 2C, H, W) in target-grid
    pixels, ``{name}_offset_mask`` (B, 2C, H, W) in {0, 1}, ``{name}_level`` and ``{name}_level_mask``
    (B, 1, H, W). Returns ``(total, parts)`` with ``parts = {f"{name}_heatmap": t, f"{name}_offset": t,
    f"{name}_level": t}`` (scalars) and ``total == sum(parts.values())``.
    ``forward`` (the trainer's ``loss_function``) returns ``total`` and keeps the parts in ``last_parts``.

    Example:
        >>> loss = SpineOneLoss({"disc": {"levels": ["L4/L5", "L5/S1"], "classes": ["a", "b", "c"]}})
        >>> t = {"disc_heatmap": torch.zeros(1, 3, 8, 8), "disc_offset": torch.zeros(1, 6, 8, 8),
        ...      "disc_offset_mask": torch.zeros(1, 6, 8, 8), "disc_level": torch.zeros(1, 1, 8, 8),
        ...      "disc_level_mask": torch.zeros(1, 1, 8, 8)}
        >>> total, parts = loss.loss_parts(torch.zeros(1, 10, 4, 4), t)
        >>> sorted(parts)
        ['disc_heatmap', 'disc_level', 'disc_offset']
    """

    def __init__(
        self,
        streams: Mapping[str, Mapping] | Sequence[StreamSpec],
        gamma: float = 2.0,
        oa_enabled: bool = False,
        oa_mode: str = "paper",
        use_offset_loss: bool = True,
        class_weights: Mapping[str, Sequence[float]] | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.streams = class_counts(streams)
        self.last_parts: dict[str, torch.Tensor] = {}
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.oa_enabled = bool(oa_enabled)
        self.oa_mode = oa_mode
        self.use_offset_loss = bool(use_offset_loss)
        self.class_weights = positive_class_weights(self.streams, class_weights)
        # reduction="none" then an explicit sum: MONAI's reduction="sum" first averages over the
        # spatial dimensions, which is not the pixel sum the normalisation by positives assumes.
        self.focal = FocalLoss(use_softmax=False, gamma=self.gamma, alpha=None, reduction="none")

    @property
    def oa_mode(self) -> str:
        return self._oa_mode

    @oa_mode.setter
    def oa_mode(self, mode: str) -> None:
        if mode not in OA_MODES:
            raise ValueError(f"oa_mode must be one of {OA_MODES}, got {mode!r}")
        self._oa_mode = mode

    def heatmap_loss(
        self, logits: torch.Tensor, heatmap: torch.Tensor, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Focal loss summed over (B, C, H, W), divided by max(1, #pixels with heatmap > 0.5).

        ``class_weights`` (C,): the loss of a pixel with target ``t`` is multiplied by ``1 + (w_c - 1) * t``
        (``w_c`` on the positives of class ``c``, 1 on the negatives); the divisor stays the plain count.
        """
        positive = heatmap > 0.5
        num_pos = positive.sum().clamp_min(1).to(torch.float32)
        loss = self.focal(logits, heatmap)
        if class_weights is not None:
            w = class_weights.to(device=loss.device, dtype=loss.dtype).view(1, -1, 1, 1)
            loss = loss * (1 + (w - 1) * heatmap)
        return loss.sum() / num_pos

    def heatmap_gradient(
        self, logits: torch.Tensor, heatmap: torch.Tensor, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Detached ``d heatmap_loss / d logits`` (B, C, H, W), computed on a detached leaf copy.

        The copy makes OA independent of whether ``logits`` carries a graph (``torch.no_grad()``).
        """
        leaf = logits.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.heatmap_loss(leaf, heatmap, class_weights), leaf)
        return grad.detach()

    def offset_loss(
        self, offsets: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Masked L1 in target-grid pixels, divided by max(1, #masked elements); optional OA weights (B, 2C, H, W)."""
        m = (mask > 0.5).to(offsets.dtype)
        if weights is None:
            err = (offsets - target).abs()
        elif self.oa_mode == "paper":
            err = (weights * offsets - target).abs()
        else:
            err = weights * (offsets - target).abs()
        return (err * m).sum() / m.sum().clamp_min(1)

    @staticmethod
    def level_loss(level: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked L1 of the level map (B, 1, H, W) in level units, divided by max(1, #masked pixels)."""
        m = (mask > 0.5).to(level.dtype)
        return ((level - target).abs() * m).sum() / m.sum().clamp_min(1)

    def forward(self, pred: torch.Tensor, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The total loss (scalar), as MONAI's ``SupervisedTrainer`` expects; the parts stay in ``last_parts``."""
        total, parts = self.loss_parts(pred, targets)
        self.last_parts = {name: value.detach() for name, value in parts.items()}
        self.last_parts["total"] = total.detach()
        return total

    def logged_parts(self, output: object = None) -> dict[str, float]:
        """Every part of the last ``forward`` and ``total`` as floats; a handler's ``output_transform``
        (``"$@loss.logged_parts"``: StatsHandler, TensorBoard and MLflow then log each part)."""
        return {name: float(value) for name, value in self.last_parts.items()}

    def loss_parts(
        self, pred: torch.Tensor, targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, parts)``; always in float32, also inside an autocast region or with a bfloat16 ``pred``."""
        if isinstance(pred, MetaTensor):
            pred = pred.as_tensor()
        with torch.autocast(pred.device.type, enabled=False):
            return self._loss_parts(pred.float(), targets)

    def _loss_parts(
        self, pred: torch.Tensor, targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        for name, (logits, offsets, level) in split_output(pred, self.streams).items():
            c = self.streams[name]
            heatmap, offset, mask, level_target, level_mask = self._stream_targets(targets, name, c, pred.shape[0])
            size = heatmap.shape[-2:]
            if logits.shape[-2:] != size:
                logits, offsets, level = (
                    F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (logits, offsets, level)
                )
            weights_c = self.class_weights.get(name)
            parts[f"{name}_heatmap"] = self.heatmap_loss(logits, heatmap, weights_c)
            parts[f"{name}_level"] = self.level_loss(level, level_target, level_mask)
            if not self.use_offset_loss:
                parts[f"{name}_offset"] = torch.zeros((), dtype=parts[f"{name}_heatmap"].dtype, device=pred.device)
                continue
            weights = oa_weights(self.heatmap_gradient(logits, heatmap, weights_c)) if self.oa_enabled else None
            parts[f"{name}_offset"] = self.offset_loss(offsets, offset, mask, weights)
        return total_loss(parts), parts

    @staticmethod
    def _stream_targets(targets: Mapping[str, torch.Tensor], name: str, c: int, batch: int) -> tuple[torch.Tensor, ...]:
        """``(heatmap, offset, offset_mask, level, level_mask)`` of one stream as float32 plain tensors."""
        keys = tuple(f"{name}_{suffix}" for suffix in ("heatmap", "offset", "offset_mask", "level", "level_mask"))
        missing = [k for k in keys if k not in targets]
        if missing:
            raise KeyError(f"targets miss {missing} for stream {name!r}; got keys {sorted(targets)}")
        # plain tensors: MetaTensor targets would turn the loss values into MetaTensors
        heatmap, offset, mask, level, level_mask = (
            (t.as_tensor() if isinstance(t, MetaTensor) else t).float() for t in (targets[k] for k in keys)
        )
        if heatmap.ndim != 4 or tuple(heatmap.shape[:2]) != (batch, c):
            raise ValueError(f"{keys[0]} must be (B={batch}, C={c}, H, W), got {tuple(heatmap.shape)}")
        expected = (batch, 2 * c, *heatmap.shape[-2:])
        for key, t in ((keys[1], offset), (keys[2], mask)):
            if tuple(t.shape) != expected:
                raise ValueError(f"{key} must be {expected}, got {tuple(t.shape)}")
        for key, t in ((keys[3], level), (keys[4], level_mask)):
            if tuple(t.shape) != (batch, 1, *heatmap.shape[-2:]):
                raise ValueError(f"{key} must be {(batch, 1, *heatmap.shape[-2:])}, got {tuple(t.shape)}")
        return heatmap, offset, mask, level, level_mask
