"""Refuse weights that do not fit the configured network, before anything is served.

MONAI Label's bundle app loads ``models/model.pt`` with ``strict=False``: a checkpoint of another
architecture only warns, then every request fails. ``configs/inference.json`` therefore builds its
``network_def`` through :func:`checked_network`, which compares the checkpoint's keys and shapes with the
network when the config is parsed (MONAI Label's start-up, ``python -m monai.bundle run``, ``ckpt_export``)
and stops with one line naming the differences and the config overrides that would fit the weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from bundle.errors import BundleInputError
from torch import nn

__all__ = ["checked_network", "checkpoint_mismatch", "guess_spineone_settings", "load_state_dict"]

_EXAMPLES = 2  # keys named per kind of difference in the one-line message


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network weights in ``path``: a state dict, or a dict holding it under ``"model"`` (both as MONAI's
    ``CheckpointLoader`` and MONAI Label read them). Loaded on the CPU with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling or a truncated file: name the file, keep the cause
        raise BundleInputError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleInputError(f"{path}: not a state dict of tensors (nor a dict holding one under 'model')")
    return dict(state)


def checkpoint_mismatch(network: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Differences between ``network.state_dict()`` and ``state`` (empty when a strict load would succeed):
    one phrase each for missing keys, unexpected keys and shape mismatches, naming the first few."""
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and expected[k] != given[k]]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} network keys missing from the checkpoint (e.g. {', '.join(missing[:_EXAMPLES])})"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} checkpoint keys unknown to the network (e.g. {', '.join(unexpected[:_EXAMPLES])})"
        )
    if shapes:
        named = ", ".join(f"{k} {given[k]} in the checkpoint, {expected[k]} in the network" for k in shapes[:_EXAMPLES])
        problems.append(f"{len(shapes)} shape mismatches (e.g. {named})")
    return problems


def _same_layout(network: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    return not checkpoint_mismatch(network, state)


def guess_spineone_settings(state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """Config values (``backbone_depth``, ``num_slices``, ``attention``, ``dataset_format``) of a ``SpineOne``
    whose state dict has exactly the keys and shapes of ``state``; None when no such network exists.

    The input channels and per-stream class counts are read from the first conv and the heatmap heads; the
    backbone depth by building each candidate network on the ``meta`` device (no memory, no weights).
    """
    from bundle.networks.deeplab import RESNET_DEPTHS
    from bundle.networks.spineone import ATTENTION_MODULES, SpineOne
    from bundle.streams import class_counts
    from bundle.workflow import DATASET_FORMATS, default_streams

    conv1 = state.get("backbone.conv1.weight")
    counts, head = [], 0
    while f"heads.{head}.heatmap.weight" in state:
        counts.append(int(state[f"heads.{head}.heatmap.weight"].shape[0]))
        head += 1
    if conv1 is None or conv1.ndim != 4 or not counts:
        return None
    formats = [f for f in DATASET_FORMATS if list(class_counts(default_streams(f)).values()) == counts]
    if not formats:
        return None
    streams = default_streams(formats[0])
    attention = [a for a in ATTENTION_MODULES if any(k.startswith(f"heads.0.{a}.") for k in state)]
    for depth in RESNET_DEPTHS:
        with torch.device("meta"):
            candidate = SpineOne(streams, backbone_depth=depth, in_channels=int(conv1.shape[1]), attention=attention)
        if _same_layout(candidate, state):
            return {
                "backbone_depth": depth,
                "num_slices": int(conv1.shape[1]),
                "attention": attention,
                "dataset_format": formats[0],
            }
    return None


def _override(key: str, value: Any) -> str:
    """``--key value`` as the bundle CLI takes it (a list quoted, an empty list as None)."""
    if isinstance(value, list):
        return f'--{key} "{value}"' if value else f"--{key} None"
    return f"--{key} {value}"


def checked_network(network: nn.Module, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """Return ``network`` unchanged when ``checkpoint`` is absent or loads into it strictly; raise otherwise.

    Only the check: the weights are loaded by whoever serves or runs the network (``CheckpointLoader``,
    MONAI Label). A missing file passes (``verify_net_in_out`` builds the network without weights).

    Raises:
        BundleInputError: one line naming the checkpoint, the differing keys or shapes and, when the weights
            are those of another ``SpineOne`` configuration, the overrides that fit them.
    """
    if checkpoint is None or not os.path.isfile(checkpoint):
        return network
    state = load_state_dict(checkpoint)
    problems = checkpoint_mismatch(network, state)
    if not problems:
        return network
    fits = guess_spineone_settings(state)
    configured = guess_spineone_settings(network.state_dict()) or {}
    if fits:
        changes = [_override(k, v) for k, v in fits.items() if configured.get(k) != v]
        hint = f"overrides that probably fit these weights: {' '.join(changes) or '(none found)'}"
    else:
        hint = "these weights are not those of any SpineOne configuration"
    raise BundleInputError(
        f"{checkpoint}: the weights do not fit the configured network, refusing to serve them: "
        f"{'; '.join(problems)}; {hint} (the CPU demo model's are in configs/demo.json; "
        "scripts/package_bundle.py --demo writes them into a copy's inference.json)"
    )
