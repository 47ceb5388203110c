"""DeepLabv3+ parts (Chen et al. 2018) on torchvision's ResNet: backbone wrapper, ASPP and decoder.

MONAI has no DeepLab and its ResNet has neither dilation nor 2D ImageNet weights, so the backbone is
torchvision's ResNet (``weights=None`` unless ImageNet weights are asked for). The blocks are small
modules so that SpineOne (and ablations) can compose them:

- :class:`ResNetBackbone` (built by :func:`build_resnet_backbone`): x (B, C_in, H, W) ->
  (low (B, C_low, H/4, W/4) from layer1, high (B, C_high, H/16, W/16) from the dilated layer4).
- :class:`ASPP`: (B, C_high, h, w) -> (B, 256, h, w).
- :class:`DeepLabV3PlusDecoder`: (low, aspp) -> (B, 64, H/4, W/4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .attention import _bf16_cpu

__all__ = [
    "RESNET_DEPTHS",
    "AtrousConv2d",
    "atrous_conv3x3_gemm",
    "atrous_taps",
    "ResNetBackbone",
    "build_resnet_backbone",
    "imagenet_state_dict",
    "adapt_first_conv_weight",
    "ASPP",
    "DeepLabV3PlusDecoder",
]

#: depth -> (builder, ImageNet weights enum member, low-level channels (layer1), high-level channels (layer4))
_RESNETS = {
    18: (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 64, 512),
    34: (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1, 64, 512),
    50: (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V2, 256, 2048),
    101: (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V2, 256, 2048),
}
RESNET_DEPTHS = tuple(_RESNETS)


def atrous_taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 3 x 3 convolution's weight (Cout, Cin, 3, 3) as the tap matrices (9, Cout, Cin) in ``dtype``, contiguous:
    ``taps[3 ky + kx]`` is ``weight[:, :, ky, kx]`` (the product reads it transposed, oneDNN's fastest layout)."""
    return weight.detach().to(dtype).permute(2, 3, 0, 1).reshape(9, weight.shape[0], weight.shape[1]).contiguous()


def _tap_span(k: int, dilation: int, n: int) -> tuple[int, int]:
    """Output range [o0, o1) along an axis of length ``n`` whose tap ``k`` (0, 1, 2) reads inside the map
    (source index o + (k - 1) ``dilation`` in [0, n)); empty (o0 >= o1) when the tap reads only padding."""
    shift = (k - 1) * dilation
    return max(0, -shift), min(n, n - shift)


def atrous_conv3x3_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int, taps: torch.Tensor | None = None
) -> torch.Tensor:
    """3 x 3 convolution, stride 1, zero 'same' padding, ``dilation`` d, as one matrix product per tap.

    x (B, Cin, H, W), weight (Cout, Cin, 3, 3), bias (Cout,) or None -> (B, Cout, H, W) channels_last, in x's
    dtype; ``taps`` (9, Cout, Cin) in x's dtype (:func:`atrous_taps`) replaces ``weight`` when given. Tap (ky,
    kx) adds ``x[r + (ky - 1) d, c + (kx - 1) d] @ taps[3 ky + kx].T`` at output (r, c); each product runs
    only on the block of pixels whose source lies inside the map (the rest is zero padding, skipped: with the
    ASPP's rates on a 32 x 32 map most of a corner tap is padding), and the sum is kept in float32. Same sums
    as ``F.conv2d`` in another order; each tap's product is rounded to x's dtype before the sum.
    """
    b, cin, h, w = x.shape
    taps = atrous_taps(weight, x.dtype) if taps is None else taps
    cout = taps.shape[1]
    pixels = x.permute(0, 2, 3, 1)  # (B, H, W, Cin): a view for channels_last input
    centre = torch.matmul(pixels.reshape(b * h * w, cin), taps[4].t()).view(b, h, w, cout)  # reads the whole map
    out = centre.float() if bias is None else torch.add(centre, bias.float())  # float32, a new tensor
    for kx in range(3):
        c0, c1 = _tap_span(kx, dilation, w)
        if c0 >= c1:
            continue
        sx = (kx - 1) * dilation
        cols = pixels[:, :, c0 + sx : c1 + sx]  # the source columns of this kx, copied once for its 3 taps
        cols = cols if c1 - c0 == w else cols.contiguous()
        for ky in (0, 2) if kx == 1 else (0, 1, 2):
            r0, r1 = _tap_span(ky, dilation, h)
            if r0 < r1:
                sy = (ky - 1) * dilation
                src = cols[:, r0 + sy : r1 + sy].reshape(-1, cin)
                out[:, r0:r1, c0:c1] += torch.matmul(src, taps[3 * ky + kx].t()).view(b, r1 - r0, c1 - c0, cout)
    return out.to(x.dtype).permute(0, 3, 1, 2)  # (B, Cout, H, W), channels_last strides


class AtrousConv2d(nn.Conv2d):
    """``nn.Conv2d`` for ASPP's dilated 3 x 3 convolutions (stride 1, no groups, 'same' padding): under CPU
    bfloat16 without gradients it runs :func:`atrous_conv3x3_gemm`, since oneDNN's bfloat16 convolution with
    dilation falls back to a kernel slower than float32 (measured on AMX, 640 x 640 input, 40 x 40 map, 2048
    -> 256 channels: 48-60 ms per convolution against 28-43 ms in float32). The bfloat16 tap matrices are
    kept between calls (re-made when the weight changes: another tensor or an in-place update, e.g.
    ``load_state_dict``; an update through ``weight.data`` is not seen), about 9 Cin Cout x 2 bytes (9.4 MB
    for 2048 -> 256); re-making them each call was most of the time (a strided copy of the whole weight).
    Elsewhere (float32, training, TorchScript) it is ``nn.Conv2d``; parameters and state dict are the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if _bf16_cpu(x) and not torch.is_grad_enabled() and self.groups == 1 and self.stride == (1, 1):
                if self.kernel_size == (3, 3) and self.dilation[0] == self.dilation[1] == self.padding[0]:
                    return self._forward_bf16(x)
        return self._conv_forward(x, self.weight, self.bias)

    def __getstate__(self) -> dict:
        """Pickling and deepcopy leave the cached tap matrices out (they are re-made on the next call)."""
        state = super().__getstate__()
        state.pop("_bf16_taps", None)
        return state

    @torch.jit.unused
    def _forward_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """The product form in bfloat16 with the cached tap matrices; x (B, Cin, H, W) -> (B, Cout, H, W)."""
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.device)
        cached = self.__dict__.get("_bf16_taps")
        if cached is None or cached[0] != key:
            cached = (key, atrous_taps(weight, torch.bfloat16))
            self.__dict__["_bf16_taps"] = cached  # a plain attribute: not in the state dict
        with torch.autocast("cpu", enabled=False):
            return atrous_conv3x3_gemm(x.to(torch.bfloat16), weight, self.bias, self.dilation[0], cached[1])


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding; :class:`AtrousConv2d` when dilated) + BatchNorm + ReLU."""
    padding = dilation * (kernel_size - 1) // 2
    conv = AtrousConv2d if dilation > 1 else nn.Conv2d
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def imagenet_state_dict(depth: int) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict for ResNet-``depth`` (downloaded once into the torch hub cache).

    Raises:
        RuntimeError: when the file is neither cached nor downloadable (e.g. offline), saying where torch
            hub caches it and how to pre-download it or use ``pretrained=False``.
    """
    if depth not in _RESNETS:
        raise ValueError(f"backbone depth must be one of {RESNET_DEPTHS}, got {depth}")
    weights = _RESNETS[depth][1]
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except OSError as err:  # urllib's URLError/HTTPError and socket errors are OSErrors
        cache_dir = f"{torch.hub.get_dir()}/checkpoints"
        raise RuntimeError(
            f"could not download the ImageNet weights of ResNet-{depth} ({weights}) from {weights.url}: {err}. "
            f"torch hub caches them in {cache_dir} (set TORCH_HOME to move it). Pre-download them on a machine "
            f'with network access, e.g. `python -c "import torchvision; torchvision.models.resnet{depth}'
            f"(weights='{weights.name}')\"`, and copy the file into that folder; or build the network "
            f"with pretrained=False."
        ) from err


def adapt_first_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt an RGB first-conv weight (O, 3, k, k) to ``in_channels`` inputs: the mean over RGB, repeated.

    A 3-channel input keeps the RGB filters unchanged.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a conv weight (O, I, k, k), got shape {tuple(weight.shape)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if in_channels == weight.shape[1]:
        return weight.clone()
    return weight.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)


def _dilate_basic_last_stage(layer: nn.Sequential, dilation: int = 2) -> None:
    """Turn the stride-2 last stage of a BasicBlock ResNet into a stride-1 stage with dilated 3x3 convs."""
    for block in layer:
        for conv in (block.conv1, block.conv2):
            conv.stride = (1, 1)
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class ResNetBackbone(nn.Module):
    """torchvision ResNet stem and four stages without pooling/fc, output stride 16.

    ``forward(x)``: x (B, C_in, H, W) -> ``(low, high)``: low (B, low_channels, H/4, W/4) from layer1,
    high (B, high_channels, H/16, W/16) from layer4 (dilation 2 instead of stride 2).
    Build it with :func:`build_resnet_backbone`.
    """

    def __init__(self, resnet: torchvision.models.ResNet, low_channels: int, high_channels: int) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.low_channels = int(low_channels)
        self.high_channels = int(high_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return low, high


def build_resnet_backbone(depth: int = 50, in_channels: int = 7, pretrained: bool = False) -> ResNetBackbone:
    """ResNet-``depth`` (18, 34, 50, 101) backbone with output stride 16 and ``in_channels`` inputs.

    ``pretrained=True`` loads torchvision's ImageNet weights (see :func:`imagenet_state_dict`) and adapts the
    first conv with :func:`adapt_first_conv_weight`.

    Example:
        >>> low, high = build_resnet_backbone(18, in_channels=7)(torch.zeros(1, 7, 64, 64))
        >>> tuple(low.shape), tuple(high.shape)
        ((1, 64, 16, 16), (1, 512, 4, 4))
    """
    if depth not in _RESNETS:
        raise ValueError(f"backbone depth must be one of {RESNET_DEPTHS}, got {depth}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    builder, _, low_channels, high_channels = _RESNETS[depth]
    if depth >= 50:
        resnet = builder(weights=None, replace_stride_with_dilation=[False, False, True])
    else:
        resnet = builder(weights=None)
        # torchvision's BasicBlock refuses dilation > 1, so the last stage is dilated by hand.
        _dilate_basic_last_stage(resnet.layer4)
    if pretrained:
        state = {k: v for k, v in imagenet_state_dict(depth).items() if not k.startswith("fc.")}
        resnet.fc = nn.Identity()
        resnet.load_state_dict(state, strict=True)
    old = resnet.conv1
    if in_channels != old.in_channels:
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        if pretrained:
            with torch.no_grad():
                new.weight.copy_(adapt_first_conv_weight(old.weight, in_channels))
        resnet.conv1 = new
    return ResNetBackbone(resnet, low_channels, high_channels)


class _ImagePooling(nn.Module):
    """ASPP image-level branch: global average pool, 1x1 conv + BN + ReLU, broadcast back to (h, w)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = _conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.pool(x))
        # bilinear upsampling of a 1x1 map is a broadcast; expand avoids the interpolation kernel
        out = y.expand(-1, -1, x.shape[-2], x.shape[-1])
        # an expanded map has no memory format, and with it ASPP's concatenation (and its projection) fell
        # back to NCHW: a channels_last input gets a channels_last copy (B x C x h x w, small)
        if x.is_contiguous(memory_format=torch.channels_last):
            return out.contiguous(memory_format=torch.channels_last)
        return out


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: (B, in_channels, h, w) -> (B, out_channels, h, w).

    Branches (each ``out_channels`` wide, BN + ReLU): a 1x1 conv, one 3x3 conv per atrous rate, and image
    pooling; concatenated and projected by a 1x1 conv + BN + ReLU, then dropout (``dropout=0`` disables it).
    Note: the image-pooling BatchNorm sees one value per channel and sample, so training needs batch > 1.

    Example:
        >>> ASPP(512)(torch.randn(2, 512, 8, 8)).shape
        torch.Size([2, 256, 8, 8])
    """

    def __init__(
        self, in_channels: int, out_channels: int = 256, rates: Sequence[int] = (6, 12, 18), dropout: float = 0.1
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be >= 1, got in={in_channels}, out={out_channels}")
        if any(int(r) < 1 for r in rates):
            raise ValueError(f"atrous rates must be >= 1, got {tuple(rates)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        branches: list[nn.Module] = [_conv_bn_relu(in_channels, out_channels, 1)]
        branches += [_conv_bn_relu(in_channels, out_channels, 3, dilation=int(r)) for r in rates]
        branches.append(_ImagePooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = _conv_bn_relu(len(branches) * out_channels, out_channels, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_channels = int(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [branch(x) for branch in self.branches]
        return self.dropout(self.project(torch.cat(feats, dim=1)))


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLabv3+ decoder: ``forward(low, aspp)`` -> (B, out_channels, h_low, w_low).

    ``low`` (B, low_channels, h_low, w_low) is projected by 1x1 conv + BN + ReLU to ``low_proj_channels``
    (48); ``aspp`` (B, aspp_channels, h, w) is bilinearly upsampled to (h_low, w_low); both are concatenated
    and passed through 3x3 conv (``mid_channels``) + BN + ReLU and 3x3 conv (``out_channels``) + BN + ReLU.

    Example:
        >>> DeepLabV3PlusDecoder(64)(torch.randn(1, 64, 16, 16), torch.randn(1, 256, 4, 4)).shape
        torch.Size([1, 64, 16, 16])
    """

    def __init__(
        self,
        low_channels: int,
        aspp_channels: int = 256,
        low_proj_channels: int = 48,
        mid_channels: int = 256,
        out_channels: int = 64,
    ) -> None:
        super().__init__()
        if min(low_channels, aspp_channels, low_proj_channels, mid_channels, out_channels) < 1:
            raise ValueError("all decoder channel counts must be >= 1")
        self.low_proj = _conv_bn_relu(low_channels, low_proj_channels, 1)
        self.fuse = nn.Sequential(
            _conv_bn_relu(low_proj_channels + aspp_channels, mid_channels, 3),
            _conv_bn_relu(mid_channels, out_channels, 3),
        )
        self.out_channels = int(out_channels)

    def forward(self, low: torch.Tensor, aspp: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(aspp, size=[low.shape[-2], low.shape[-1]], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([self.low_proj(low), up], dim=1))
