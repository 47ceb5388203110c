"""The precision part of scripts/benchmark.py: fp32 against bf16 on this CPU (issue 14).

``precision_report`` measures, in one run: the fp32 and bf16 ``torch.mm`` and 3 x 3 convolution rates, the
network's forward time in both precisions (bf16 = ``torch.autocast``, as ``bundle.AutocastInferer`` runs it)
with per-part times (backbone, ASPP, decoder, PAM, CAM, head convolutions), the bf16 / fp32 speed-up,
``fraction_of_peak`` against the matmul rate of the precision ``"auto"`` picks, one study end to end through
``AutocastInferer("auto")``, and a training step in both precisions at the demo's settings
(``configs/demo.json``). On a CPU without bfloat16 matrix instructions the bf16 part is skipped and the
report says so. docs/performance.md explains the keys.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from bundle.losses import SpineOneLoss
from bundle.networks import SpineOne
from bundle.precision import AutocastInferer
from bundle.precision import best_seconds as precision_best_seconds
from bundle.precision import bf16_probe, cpu_bf16_support, network_probe, precision_name, resolve_precision
from bundle.streams import RSNA_STREAMS

ROOT = Path(__file__).resolve().parents[1]
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


def best_seconds(fn: Callable[[], Any], repeats: int, clock: str = "wall") -> float:
    """Smallest time of ``repeats`` calls of ``fn`` on ``clock`` ("wall" or "process": CPU time of this
    process, all threads; with one thread it leaves out time the process waited for a core)."""
    return precision_best_seconds(fn, repeats, CLOCKS[clock])


def _autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()


def rates(n: int, side: int, repeats: int, dtype: torch.dtype, clock: str, channels: int = 256) -> dict[str, float]:
    """GFLOP/s of an n x n ``torch.mm`` (2 n^3) and of a 3 x 3 ``channels`` convolution on a ``side`` x ``side``
    channels_last map (2 C^2 9 side^2), both in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(dtype=dtype)
    conv = conv.eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, channels, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.mm(a, b), conv(x)  # noqa: B018 (warm-up)
        mm = best_seconds(lambda: torch.mm(a, b), repeats, clock)
        cv = best_seconds(lambda: conv(x), repeats, clock)
    return {"matmul_gflops": 2.0 * n**3 / mm / 1e9, "conv3x3_gflops": 2.0 * channels**2 * 9 * side**2 / cv / 1e9}


def part_seconds(net: SpineOne, x: torch.Tensor, dtype: torch.dtype | None, repeats: int, clock: str) -> dict:
    """Forward time of the whole ``net`` and of each part on its real input, under ``dtype`` autocast (None:
    fp32): ``backbone``, ``aspp``, ``decoder``, and per stream head ``pam``, ``cam``, ``head_convs`` (the 3 x 3
    convolutions and the 1 x 1 outputs). Parts are timed one by one, so they need not add up to ``network``."""
    head = net.heads[0]
    with torch.inference_mode(), _autocast(dtype):
        net(x)  # warm-up: oneDNN primitives and weight reorders for this dtype
        low, high = net.backbone(x)
        aspp = net.aspp(high)
        features = net.decoder(low, aspp)
        mixed = features
        if head.pam is not None:
            mixed = head.pam(features) + (head.cam(features) if head.cam is not None else 0)

        def convs() -> torch.Tensor:
            y = head.convs(mixed)
            return torch.cat([head.heatmap(y), head.offset(y)], dim=1)

        parts = {
            "network": lambda: net(x),
            "backbone": lambda: net.backbone(x),
            "aspp": lambda: net.aspp(high),
            "decoder": lambda: net.decoder(low, aspp),
            "pam": (lambda: head.pam(features)) if head.pam is not None else None,
            "cam": (lambda: head.cam(features)) if head.cam is not None else None,
            "head_convs": convs,
        }
        return {name: best_seconds(fn, repeats, clock) for name, fn in parts.items() if fn is not None}


def demo_train_settings() -> dict[str, Any]:
    """Backbone depth, crop (H, W) and batch of configs/demo.json: the demo's training step."""
    demo = json.loads((ROOT / "configs" / "demo.json").read_text())
    return {"depth": int(demo["backbone_depth"]), "crop": list(demo["crop_size"]), "batch": int(demo["batch_size"])}


def train_step_seconds(
    settings: dict[str, Any], targets: dict[str, torch.Tensor], precision: str, repeats: int, clock: str
) -> float:
    """Best time of one training step (AutocastInferer forward at ``precision``, fp32 SpineOneLoss, backward,
    Adam) on a random batch with ``targets`` (the benchmark's synthetic disks)."""
    torch.manual_seed(0)
    h, w = settings["crop"]
    net = SpineOne(RSNA_STREAMS, backbone_depth=settings["depth"]).train()
    loss_fn, inferer = SpineOneLoss(RSNA_STREAMS), AutocastInferer(precision)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-4)
    x = torch.randn(settings["batch"], 7, h, w)

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        total = loss_fn(inferer(x, net), targets)
        total.backward()
        optimizer.step()

    step()  # warm-up: Adam state, oneDNN primitives
    return best_seconds(step, repeats, clock)


def precision_support(net: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """The CPU's bfloat16 flag, both probes' figures (the operation probe, and the network probe of ``net`` at
    ``x``'s shape with its own cost in seconds) and the precision ``"auto"`` resolves to for inference (the
    network probe, as ``AutocastInferer`` runs it) and without a network (the operation probe)."""
    flag = cpu_bf16_support()
    report: dict[str, Any] = {"bf16_cpu_flag": flag, "bf16_supported": flag is not None}
    if flag is not None:
        report["probe"] = bf16_probe()
        start = time.perf_counter()
        report["network_probe"] = network_probe(net, tuple(x.shape))
        report["network_probe"]["cost_seconds"] = time.perf_counter() - start
    report["auto_precision"] = precision_name(AutocastInferer("auto").dtype_for("cpu", net, tuple(x.shape)))
    report["auto_precision_op_probe"] = precision_name(resolve_precision("auto", "cpu"))
    return report


def _end_to_end_auto(end_to_end: Callable[[], dict], repeats: int) -> dict:
    """Best (by total) of ``repeats`` passes, after a warm-up, of ``end_to_end``: configs/inference.json's
    evaluator with ``precision`` "auto" (its ``AutocastInferer``)."""
    passes = [end_to_end() for _ in range(1 + repeats)][1:]
    best = min(passes, key=lambda p: p["end_to_end_seconds"])
    best["end_to_end_over_network"] = best["end_to_end_seconds"] / best["network_seconds"]
    best["decode_fraction_of_end_to_end"] = best["decode_seconds"] / best["end_to_end_seconds"]
    return best


def precision_report(
    args: Any,
    net: SpineOne,
    x: torch.Tensor,
    gflop: float,
    end_to_end: Callable[[], dict],
    targets: Callable[[int, int], dict[str, torch.Tensor]],
) -> dict[str, Any]:
    """fp32 against bf16 (see the module docstring). ``net``: the prepared inference network, ``x`` its input,
    ``gflop`` its FLOPs (as ``network_gflop``), ``end_to_end()`` one study's pass with its parts (precision "auto"),
    ``targets(batch, size)`` square synthetic loss targets (cropped to the demo's H x W).
    ``args``: the benchmark's (matmul_n, size, repeats, train_repeats, clock, no_precision_train, quick)."""
    clock, repeats = args.clock, args.repeats
    report = precision_support(net, x)
    dtypes = {"fp32": None, "bf16": torch.bfloat16} if report["bf16_supported"] else {"fp32": None}
    if not report["bf16_supported"]:
        report["bf16_skipped"] = "the CPU reports no bfloat16 matrix instructions: bf16 part not measured"
    for name, dtype in dtypes.items():
        rate = rates(args.matmul_n, args.size // 4, repeats, dtype or torch.float32, clock)
        report[f"matmul_gflops_{name}"], report[f"conv3x3_gflops_{name}"] = (
            rate["matmul_gflops"],
            rate["conv3x3_gflops"],
        )
        report[f"parts_seconds_{name}"] = part_seconds(net, x, dtype, repeats, clock)
        report[f"network_seconds_{name}"] = report[f"parts_seconds_{name}"]["network"]
        report[f"fraction_of_peak_{name}"] = gflop / report[f"network_seconds_{name}"] / report[f"matmul_gflops_{name}"]
    if "bf16" in dtypes:
        report["bf16_speedup"] = report["network_seconds_fp32"] / report["network_seconds_bf16"]
        report["bf16_speedup_parts"] = {
            part: report["parts_seconds_fp32"][part] / seconds for part, seconds in report["parts_seconds_bf16"].items()
        }
    auto = report["auto_precision"]
    report["fraction_of_peak"] = report[f"fraction_of_peak_{auto}"]  # against the precision actually used
    report["end_to_end_auto"] = _end_to_end_auto(end_to_end, repeats)
    if not args.no_precision_train:
        settings = demo_train_settings()
        if args.quick:  # smoke test: the demo's network at --size, batch 2
            settings.update(crop=[args.size, args.size], batch=2)
        h, w = settings["crop"]
        batch_targets = {k: v[..., :h, :w].contiguous() for k, v in targets(settings["batch"], max(h, w)).items()}
        report["train_settings"] = settings
        report["train_step_seconds"] = {
            name: train_step_seconds(settings, batch_targets, name, args.train_repeats, clock) for name in dtypes
        }
        if "bf16" in dtypes:
            steps = report["train_step_seconds"]
            report["train_bf16_speedup"] = steps["fp32"] / steps["bf16"]
    return report
