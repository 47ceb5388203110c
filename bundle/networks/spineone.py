"""SpineOne network (He et al. 2021, Fig. 2-3): DeepLabv3+ features, then one attention head per stream.

Output layout (one tensor, stride-4 grid): per stream in mapping order, C heatmap logits, 2C offsets
interleaved ``(dx_0, dy_0, dx_1, dy_1, ...)``, then one level map (the regressed level index of the
structure under each pixel, an addition to the paper that keeps level names right when a structure is
missed); :meth:`SpineOne.split` (``bundle.streams.split_output``) separates them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..streams import StreamSpec, class_counts, split_output, stream_channels
from .attention import ChannelAttention, PositionAttention
from .deeplab import ASPP, DeepLabV3PlusDecoder, build_resnet_backbone

__all__ = ["SpineOne", "StreamHead", "ATTENTION_MODULES", "HEATMAP_PRIOR"]

ATTENTION_MODULES = ("pam", "cam")
#: prior foreground probability of the heatmap logits at initialisation (focal-loss convention)
HEATMAP_PRIOR = 0.01
FEATURE_CHANNELS = 64
OUTPUT_STRIDE = 4
INPUT_MULTIPLE = 16


def _normalise_attention(attention: Sequence[str] | str | None) -> tuple[str, ...]:
    if attention is None:
        return ()
    names = (attention,) if isinstance(attention, str) else tuple(attention)
    unknown = [a for a in names if a not in ATTENTION_MODULES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"attention must be distinct names among {ATTENTION_MODULES}, got {names}")
    return names


class StreamHead(nn.Module):
    """One stream: ``U = PAM(x) + CAM(x)`` (only the modules named in ``attention``; none gives ``U = x``),
    Conv(64, 32, 3) + BN + ReLU, Conv(32, 32, 3) + BN + ReLU, then a 1x1 heatmap head (C logits, bias
    ``-log((1 - 0.01) / 0.01)``), a 1x1 offset head (2C) and a 1x1 level head (1: the level index, in levels).

    ``forward(x)``: x (B, channels, h, w) -> (B, 3C + 1, h, w) = [C logits, 2C offsets, level].

    Example:
        >>> StreamHead(3)(torch.randn(1, 64, 16, 16)).shape
        torch.Size([1, 10, 16, 16])
    """

    def __init__(
        self,
        num_classes: int,
        channels: int = FEATURE_CHANNELS,
        attention: Sequence[str] = ATTENTION_MODULES,
        pam_impl: str = "fused",
        hidden_channels: int = 32,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        names = _normalise_attention(attention)
        self.pam = PositionAttention(channels, impl=pam_impl) if "pam" in names else None
        self.cam = ChannelAttention() if "cam" in names else None
        self.convs = nn.Sequential(
            nn.Conv2d(channels, hidden_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
        )
        self.heatmap = nn.Conv2d(hidden_channels, num_classes, 1)
        self.offset = nn.Conv2d(hidden_channels, 2 * num_classes, 1)
        self.level = nn.Conv2d(hidden_channels, 1, 1)
        nn.init.constant_(self.heatmap.bias, -math.log((1.0 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x
        if self.pam is not None:
            u = self.pam(x)
            if self.cam is not None:
                u = u + self.cam(x)
        elif self.cam is not None:
            u = self.cam(x)
        if not torch.jit.is_scripting():  # TorchScript has no autocast with a run-time device
            # the head's convolutions and outputs in float32 also under autocast: their rounding to bfloat16
            # moved decoded peaks by a pixel; they are ~1% of the network's work
            with torch.autocast(u.device.type, enabled=False):
                return self._outputs(u.float())
        return self._outputs(u)

    def _outputs(self, u: torch.Tensor) -> torch.Tensor:
        y = self.convs(u)
        return torch.cat([self.heatmap(y), self.offset(y), self.level(y)], dim=1)


class SpineOne(nn.Module):
    """SpineOne: DeepLabv3+ (ResNet backbone, output stride 16, 64-channel stride-4 features) + stream heads.

    Args:
        streams: the codec's streams (``"@codec"``, StreamSpecs or ``{name: {levels, classes}}``);
            each stream with C classes gets a head of 3C + 1 output channels.
        backbone_depth: ResNet depth, 18, 34, 50 or 101.
        in_channels: input channels (7 slices of the 2.5D input).
        attention: DANet modules in each stream head, a subset of ``("pam", "cam")``; empty for none.
        pam_impl: ``"fused"`` (SDPA, no N x N matrix) or ``"plain"``; see :class:`PositionAttention`.
        pretrained: load torchvision's ImageNet weights (needs network or the torch hub cache) and average
            the first conv's RGB filters over ``in_channels``.

    ``forward(x)``: x (B, in_channels, H, W), H and W multiples of 16, B >= 2 in training mode ->
    (B, out_channels, H/4, W/4) with ``out_channels = sum (3C + 1)``; per stream C heatmap logits, 2C offsets
    ``(dx_0, dy_0, ...)`` and the level map. ``split(output)`` gives ``{stream: (logits, offsets, level)}``.

    Example:
        >>> net = SpineOne([StreamSpec("disc", ("L4/L5", "L5/S1"), ("a", "b", "c"))], backbone_depth=18).eval()
        >>> out = net(torch.zeros(1, 7, 64, 64))
        >>> out.shape, net.split(out)["disc"][1].shape
        (torch.Size([1, 10, 16, 16]), torch.Size([1, 6, 16, 16]))
    """

    def __init__(
        self,
        streams: Mapping[str, Mapping] | Sequence[StreamSpec],
        backbone_depth: int = 50,
        in_channels: int = 7,
        attention: Sequence[str] | None = ATTENTION_MODULES,
        pam_impl: str = "fused",
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        self.streams = class_counts(streams)
        self.input_multiple = INPUT_MULTIPLE
        self.out_channels = stream_channels(self.streams)
        self.in_channels = int(in_channels)
        self.attention = _normalise_attention(attention)
        self.backbone = build_resnet_backbone(backbone_depth, in_channels, pretrained)
        self.aspp = ASPP(self.backbone.high_channels, 256)
        self.decoder = DeepLabV3PlusDecoder(self.backbone.low_channels, 256, 48, 256, FEATURE_CHANNELS)
        self.heads = nn.ModuleList(
            [StreamHead(c, FEATURE_CHANNELS, self.attention, pam_impl) for c in self.streams.values()]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                "SpineOne expects input (B, " + str(self.in_channels) + ", H, W), got " + str(list(x.shape))
            )
        if x.shape[2] % self.input_multiple != 0 or x.shape[3] % self.input_multiple != 0:
            raise ValueError(
                "SpineOne input H and W must be multiples of "
                + str(self.input_multiple)
                + " (output stride of the backbone), got "
                + str(x.shape[2])
                + " x "
                + str(x.shape[3])
                + "; pad or crop the image"
            )
        if self.training and x.shape[0] < 2:
            raise ValueError(
                "SpineOne in training mode needs a batch of at least 2 (BatchNorm of the ASPP image-pooling branch"
                " sees one value per channel and sample); use batch_size >= 2 with drop_last=True, or net.eval()"
            )
        low, high = self.backbone(x)
        features = self.decoder(low, self.aspp(high))
        return torch.cat([head(features) for head in self.heads], dim=1)

    @torch.jit.unused
    def split(self, output: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Split ``forward``'s output into ``{stream: (logits (B, C, h, w), offsets (B, 2C, h, w), level (B, 1, h, w))}``."""
        return split_output(output, self.streams)
