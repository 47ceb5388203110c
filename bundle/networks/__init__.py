"""SpineOne network: DeepLabv3+ backbone on torchvision ResNet, DANet attention and per-stream heads."""

from .attention import PAM_IMPLS, ChannelAttention, PositionAttention
from .deeplab import (
    ASPP,
    RESNET_DEPTHS,
    DeepLabV3PlusDecoder,
    ResNetBackbone,
    adapt_first_conv_weight,
    build_resnet_backbone,
    imagenet_state_dict,
)
from .fusion import fuse_for_inference
from .spineone import ATTENTION_MODULES, HEATMAP_PRIOR, OUTPUT_STRIDE, SpineOne, StreamHead

__all__ = [
    "ASPP",
    "ATTENTION_MODULES",
    "ChannelAttention",
    "DeepLabV3PlusDecoder",
    "HEATMAP_PRIOR",
    "OUTPUT_STRIDE",
    "PAM_IMPLS",
    "PositionAttention",
    "RESNET_DEPTHS",
    "ResNetBackbone",
    "SpineOne",
    "StreamHead",
    "adapt_first_conv_weight",
    "build_resnet_backbone",
    "fuse_for_inference",
    "imagenet_state_dict",
]
