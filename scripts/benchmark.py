#!/usr/bin/env python
"""Measure SpineOne's speed and memory on this machine against its own fp32 matrix-multiply rate.

One run writes a JSON file (atomically) with the machine's ``torch.mm`` throughput, the network's FLOPs
and forward time (``fraction_of_peak``), one study's end-to-end time from DICOM folder to
``keypoints.json`` split into load / preprocess / network / decode / write, the peak resident memory of
inference (fresh subprocess) and the time and memory of one training step per sample for the fused and
the plain PAM (fresh subprocesses at batches 2 and 3: the third sample's extra peak is a sample's memory).
With ``--device cuda``: model time per exam at batches 1 and 16 and GPU training memory instead.
The ``precision`` section (``scripts/bench_precision.py``; ``--no-precision`` skips it) compares fp32 with bf16.
docs/performance.md explains the keys and records results.

Examples (from the repository root):
    python scripts/benchmark.py --out /tmp/bench_640.json --size 640 --depth 50
    python scripts/benchmark.py --out /tmp/bench_tiny.json --size 64 --depth 18 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: make `bundle` importable
sys.path.insert(0, str(ROOT / "scripts"))  # and the precision section, also when imported from a file path

import torch  # noqa: E402
from bench_precision import precision_report  # noqa: E402
from bundle.handlers import atomic_write_text  # noqa: E402
from bundle.losses import SpineOneLoss  # noqa: E402
from bundle.networks import PositionAttention, SpineOne, fuse_for_inference  # noqa: E402
from bundle.precision import best_seconds  # noqa: E402
from bundle.streams import RSNA_STREAMS  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

STREAMS = RSNA_STREAMS  # one stream (disc), 3 severities
INFERENCE_CONFIG = ROOT / "configs" / "inference.json"
#: training batches measured per PAM implementation: 2 is the smallest BatchNorm allows; the third sample's
#: extra peak RSS is the memory one sample costs, free of the fixed part (imports, weights, Adam state)
TRAIN_BATCHES = (2, 3)
PAM_IMPLS = ("fused", "plain")


_best = best_seconds  # smallest wall time (s) of ``repeats`` calls of ``fn``


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN where the denominator is not positive (a memory difference can be 0
    or negative when allocator noise outweighs a tiny measurement, e.g. ``--quick``)."""
    return numerator / denominator if denominator > 0 else float("nan")


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall time covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info() -> dict[str, Any]:
    """CPU model, logical CPUs, torch version and build facts, load average."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "mkl": bool(torch.backends.mkl.is_available()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def matmul_gflops(n: int, repeats: int, device: torch.device | None = None) -> float:
    """fp32 ``torch.mm`` of two n x n matrices: best rate in GFLOP/s (2 n^3 FLOPs per product)."""
    device = torch.device("cpu") if device is None else device
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)

    def product() -> None:
        torch.mm(a, b, out=out)
        _synchronize(device)

    product()  # warm-up
    return 2.0 * n**3 / _best(product, repeats) / 1e9


def conv3x3_gflops(side: int, repeats: int, channels: int = 256) -> float:
    """fp32 rate (GFLOP/s, direct-convolution count ``2 C^2 9 side^2``) of one 3 x 3 ``channels`` ->
    ``channels`` convolution on a ``side`` x ``side`` channels_last map, as the decoder runs them: oneDNN's
    convolutions can exceed the ``torch.mm`` rate, which is a reference, not a ceiling."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, channels, side, side).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        conv(x)
        seconds = _best(lambda: conv(x), repeats)
    return 2.0 * channels * channels * 9 * side * side / seconds / 1e9


def build_inference_network(depth: int, channels_last: bool = True) -> torch.nn.Module:
    """Untrained SpineOne (RSNA streams, fused PAM) with BatchNorm folded, optionally channels_last."""
    net = fuse_for_inference(SpineOne(STREAMS, backbone_depth=depth, pam_impl="fused"), inplace=True)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _cpu_flash_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's own SDPA FLOP formula (``2 N^2 d_qk + 2 N^2 d_v`` per head) for the CPU flash kernel."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: FlopCounterMode registers its SDPA formula for the CUDA kernels only; the fused PAM runs this CPU one.
SDPA_CPU_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flop}


def network_flops(net: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """FLOPs of one forward pass counted by ``torch.utils.flop_counter.FlopCounterMode``.

    Returns ``counted`` (all FLOPs, with torch's SDPA formula also applied to the CPU flash kernel),
    ``pam_computed`` (the part done by fused-PAM attention: per PAM and image ``2 N^2 C + 2 N^2 C``, q and k
    padded to the value width C as the kernel runs them) and ``pam_useful`` (the same attention at the real
    query/key width C // 8: ``2 N^2 C/8 + 2 N^2 C``, the work a plain PAM's two bmm calls do).
    """
    shapes: list[tuple[str, int, int, int, int]] = []
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out: shapes.append(
                (mod.impl, inp[0].shape[0], mod.channels, mod.key_channels, inp[0].shape[-2] * inp[0].shape[-1])
            )
        )
        for m in net.modules()
        if isinstance(m, PositionAttention)
    ]
    try:
        with FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter, torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    computed = useful = 0.0
    for impl, b, c, ck, n in shapes:
        if impl == "fused":
            computed += b * (2.0 * n * n * c + 2.0 * n * n * c)
            useful += b * (2.0 * n * n * ck + 2.0 * n * n * c)
    return {"counted": float(counter.get_total_flops()), "pam_computed": computed, "pam_useful": useful}


def _generate_study(root: Path, seed: int) -> Path:
    from bundle.phantoms import generate_phantoms

    return Path(generate_phantoms(root, layout="rsna", studies=1, seed=seed))


def _timed(transform: Callable, name: str, seconds: dict[str, float]) -> Callable:
    def run(data: Any) -> Any:  # ``transform``, adding its run time to ``seconds[name]``
        start = time.perf_counter()
        out = transform(data)
        seconds[name] += time.perf_counter() - start
        return out

    return run


def _configured_evaluator(size: int, depth: int, data_dir: Path, out_dir: Path, channels_last: bool, precision: str):
    """configs/inference.json's evaluator (input ``size``, ResNet-``depth``, ``precision``, an untrained checkpoint)
    on ``data_dir``."""
    from monai.bundle import ConfigParser

    parser, ckpt_dir = ConfigParser(), out_dir.parent / "models"
    parser.read_config(str(INFERENCE_CONFIG))
    parser.update(dict(input_size=size, backbone_depth=depth, dataset_dir=str(data_dir), num_workers=0))
    parser.update({"precision": precision})
    parser.update({"output_dir": str(out_dir), "ckpt_dir": str(ckpt_dir), "device": "$torch.device('cpu')"})
    for handler in parser["handlers"]:
        if handler["_target_"] == "bundle.InferenceOptimizer":
            handler["channels_last"] = channels_last
    if not (ckpt_dir / "model.pt").is_file():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content("network_def#network").state_dict(), ckpt_dir / "model.pt")
    return parser.get_parsed_content("evaluator")


def end_to_end_once(
    size: int, depth: int, data_dir: Path, out_dir: Path, channels_last: bool, precision: str = "fp32"
) -> dict:
    """One study from DICOM folder to keypoints.json + overlay.png through the configured evaluator, seconds per
    part: load (the loader transform), preprocess (the other transforms), network (prepare_batch + forward),
    decode (decollation + postprocessing), write (the writers); start_seconds (checkpoint, BatchNorm folding)
    and run_seconds (the whole run) lie outside the sum."""
    from ignite.engine import Events
    from monai.engines.utils import IterationEvents
    from monai.transforms import Compose

    evaluator = _configured_evaluator(size, depth, data_dir, out_dir, channels_last, precision)
    seconds, stamps, dataset = {"load": 0.0, "preprocess": 0.0}, {}, evaluator.data_loader.dataset
    first, *rest = dataset.transform.transforms
    dataset.transform = Compose([_timed(first, "load", seconds), _timed(Compose(rest), "preprocess", seconds)])
    events = {"iteration": Events.ITERATION_STARTED, "forward": IterationEvents.FORWARD_COMPLETED}
    events.update(decoded=IterationEvents.MODEL_COMPLETED, written=Events.ITERATION_COMPLETED)  # attached last
    for name, event in events.items():
        evaluator.add_event_handler(event, lambda e, name=name: stamps.__setitem__(name, time.perf_counter()))
    evaluator.add_event_handler(Events.GET_BATCH_STARTED, lambda e: stamps.setdefault("fetch", time.perf_counter()))
    t0 = time.perf_counter()
    evaluator.run()
    parts = {"load_seconds": seconds["load"], "preprocess_seconds": seconds["preprocess"]}
    parts["network_seconds"] = stamps["forward"] - stamps["iteration"]
    parts["decode_seconds"] = stamps["decoded"] - stamps["forward"]
    parts["write_seconds"] = stamps["written"] - stamps["decoded"]
    return {
        **parts,
        "end_to_end_seconds": sum(parts.values()),
        "start_seconds": stamps["fetch"] - t0,
        "run_seconds": time.perf_counter() - t0,
        "input_shape": list(evaluator.state.batch[0]["image"].shape),  # one study: the last iteration's
        "num_keypoints": sum(len(v) for v in evaluator.state.output[0]["keypoints"].values()),
    }


def synthetic_targets(batch: int, size: int) -> dict:
    """Loss targets (``codec.encode`` of configs/train.json's codec: the RSNA stream, its radius and target
    stride) on a ``size`` x ``size`` image: one disk per level along the middle column, classes cycling."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    codec = parser.get_parsed_content("codec")
    (spec,) = codec.streams
    levels, classes = spec.num_levels, spec.num_classes
    mm = torch.tensor([[(level + 1) * size / (levels + 1), size / 2.0, 0.0] for level in range(levels)])  # identity
    items = [
        codec.encode({"disc": mm}, {"disc": (b + torch.arange(levels)) % classes}, torch.eye(4), (size, size))
        for b in range(batch)
    ]
    return {k: torch.stack([item[k] for item in items]) for k in codec.target_keys()}


def train_step(depth: int, crop: int, impl: str, repeats: int, batch: int = 2, device: str = "cpu") -> dict[str, float]:
    """One SGD step (forward, SpineOneLoss, backward, Adam) at a ``crop`` x ``crop`` batch of ``batch``.

    On a GPU also ``max_memory_allocated_mb``: the allocator's peak over model build and steps (torch's own
    measure, not RSS); on the CPU the process's peak RSS is the measure (run each call in a fresh process).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    net = SpineOne(STREAMS, backbone_depth=depth, pam_impl=impl).train().to(dev)
    loss_fn = SpineOneLoss(STREAMS)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(batch, 7, crop, crop, device=dev)
    targets = {k: v.to(dev) for k, v in synthetic_targets(batch, crop).items()}

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)  # SupervisedTrainer's default
        total = loss_fn(net(x), targets)
        total.backward()
        optimizer.step()
        _synchronize(dev)

    step()  # warm-up: Adam state, oneDNN primitives / cuDNN algorithms
    seconds = _best(step, repeats)
    peak = _peak_rss_mb()
    result = {
        "batch": batch,
        "crop": crop,
        "step_seconds": seconds,
        "step_seconds_per_sample": seconds / batch,
        "peak_rss_mb": peak,
        "peak_rss_mb_per_sample": peak / batch,
    }
    if dev.type == "cuda":
        result["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return result


def exam_seconds(
    net: torch.nn.Module, size: int, batches: tuple[int, ...], device: torch.device, repeats: int
) -> dict[str, float]:
    """Model time per exam (one 7-slice ``size`` x ``size`` input) at each batch: best batch time / batch."""
    out = {}
    for batch in batches:
        x = torch.randn(batch, 7, size, size, device=device).contiguous(memory_format=torch.channels_last)

        def forward() -> None:
            net(x)
            _synchronize(device)

        with torch.inference_mode():
            forward()  # warm-up
            out[str(batch)] = _best(forward, repeats) / batch
    return out


def device_report(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The accelerator measurements the issue asks of a GPU, run in this process on ``device``.

    ``exam_seconds``: model time per exam at ``--size`` for batches ``--exam-batches`` (folded BatchNorm,
    channels_last, fused PAM, inference_mode, synchronised); ``train``: fused and plain training steps at
    ``TRAIN_BATCHES`` with the allocator's peak memory (``train_peak_memory_mb``: what one more sample adds).
    Written for ``cuda``. On the CPU the same code runs (the test does), but its memory figures are then this
    process's lifetime RSS peak, not per-step measures: CPU memory is what the default benchmark measures.
    """
    dev = torch.device(device)
    net = build_inference_network(args.depth).to(dev)
    report: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else machine_info()["cpu_model"],
        "matmul_gflops": matmul_gflops(args.matmul_n, args.repeats, dev),
        "exam_batches": list(args.exam_batches),
        "exam_seconds": exam_seconds(net, args.size, tuple(args.exam_batches), dev, args.repeats),
    }
    if dev.type == "cuda":  # TF32 changes what "fp32" means on Ampere and later: record the switches
        report["allow_tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        report["allow_tf32_cudnn"] = bool(torch.backends.cudnn.allow_tf32)
    x = torch.randn(1, 7, args.size, args.size, device=dev).contiguous(memory_format=torch.channels_last)
    flops = network_flops(net, x)
    report["network_gflop"] = flops["counted"] / 1e9
    # at the first (smallest) batch: per-exam time there is the forward time of one exam
    report["network_seconds"] = report["exam_seconds"][str(args.exam_batches[0])]
    report["fraction_of_peak"] = flops["counted"] / report["network_seconds"] / 1e9 / report["matmul_gflops"]
    del net
    if not args.no_train:
        train = {
            f"{impl}/{b}": train_step(args.depth, args.train_size, impl, args.train_repeats, b, device)
            for impl in PAM_IMPLS
            for b in TRAIN_BATCHES
        }
        key = "max_memory_allocated_mb" if dev.type == "cuda" else "peak_rss_mb"
        small, large = TRAIN_BATCHES[0], TRAIN_BATCHES[-1]
        per_sample = {
            impl: (train[f"{impl}/{large}"][key] - train[f"{impl}/{small}"][key]) / (large - small)
            for impl in PAM_IMPLS
        }
        report.update(
            {
                "train": train,
                "train_memory_measure": key,
                "train_step_seconds": {impl: train[f"{impl}/{small}"]["step_seconds_per_sample"] for impl in PAM_IMPLS},
                "train_peak_memory_mb": per_sample,
                "train_memory_ratio_fused_over_plain": _ratio(per_sample["fused"], per_sample["plain"]),
            }
        )
    return report


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """Work done in a fresh subprocess so that ru_maxrss is this measurement's peak only."""
    rss_import = _current_rss_mb()
    if args.child == "inference":
        with tempfile.TemporaryDirectory() as out:
            parts = end_to_end_once(
                args.size, args.depth, Path(args.data_dir), Path(out) / "out", not args.no_channels_last
            )
        return {
            "peak_rss_mb": _peak_rss_mb(),
            "rss_after_import_mb": rss_import,
            "end_to_end_seconds": parts["end_to_end_seconds"],
        }
    result = train_step(args.depth, args.train_size, args.impl, args.train_repeats, args.batch)
    result["rss_after_import_mb"] = rss_import
    return result


def _child_command(args: argparse.Namespace, *extra: str) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--size",
        str(args.size),
        "--depth",
        str(args.depth),
        "--threads",
        str(args.threads),
        "--train-size",
        str(args.train_size),
        "--train-repeats",
        str(args.train_repeats),
        *extra,
    ]
    return cmd + (["--no-channels-last"] if args.no_channels_last else [])


def _run_children(commands: dict[str, list[str]], concurrent: bool) -> dict[str, dict[str, Any]]:
    """Run each command in a fresh process (one after the other unless ``concurrent``); parse its last
    stdout line as JSON, or report ``{"error": ...}`` (e.g. a process killed for memory)."""

    def collect(proc: subprocess.Popen) -> dict[str, Any]:
        stdout, stderr = proc.communicate()
        lines = stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            return {"error": f"exit status {proc.returncode}: {stderr.strip()[-500:]}"}
        return json.loads(lines[-1])

    def start(cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    if concurrent:  # --quick smoke test: overlap the imports; timings are then not meaningful
        procs = {name: start(cmd) for name, cmd in commands.items()}
        return {name: collect(proc) for name, proc in procs.items()}
    return {name: collect(start(cmd)) for name, cmd in commands.items()}


def training_summary(children: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-sample training figures from the ``"{impl}/{batch}"`` subprocess results.

    ``train_peak_rss_mb[impl]``: peak RSS that one more sample adds (batch 3 minus batch 2), the memory a
    sample costs; ``train_step_seconds[impl]``: batch-2 step time / 2. The whole-process figures (peak RSS
    of the batch-2 process / 2, also above the import footprint) are kept for comparison.
    """
    nan = float("nan")
    small, large = TRAIN_BATCHES[0], TRAIN_BATCHES[-1]
    train = {
        impl: {str(b): children.get(f"{impl}/{b}", {"error": "not run"}) for b in TRAIN_BATCHES} for impl in PAM_IMPLS
    }
    peak = {impl: {b: train[impl][str(b)].get("peak_rss_mb", nan) for b in TRAIN_BATCHES} for impl in PAM_IMPLS}
    per_sample = {impl: (peak[impl][large] - peak[impl][small]) / (large - small) for impl in PAM_IMPLS}
    whole = {impl: peak[impl][small] / small for impl in PAM_IMPLS}
    above = {
        impl: (peak[impl][small] - train[impl][str(small)].get("rss_after_import_mb", nan)) / small
        for impl in PAM_IMPLS
    }
    return {
        "train": train,
        "train_batches": list(TRAIN_BATCHES),
        "train_step_seconds": {impl: train[impl][str(small)].get("step_seconds_per_sample", nan) for impl in PAM_IMPLS},
        "train_peak_rss_mb": per_sample,
        "train_memory_ratio_fused_over_plain": _ratio(per_sample["fused"], per_sample["plain"]),
        "train_process_peak_rss_mb_per_sample": whole,
        "train_memory_ratio_whole_process": _ratio(whole["fused"], whole["plain"]),
        "train_peak_rss_above_import_mb": above,
        "train_memory_ratio_above_import": _ratio(above["fused"], above["plain"]),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON content."""
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "size": args.size,
        "depth": args.depth,
        "quick": bool(args.quick),
        "channels_last": not args.no_channels_last,
        "load_average_start": list(os.getloadavg()),
        **machine_info(),
    }
    result["matmul_n"] = args.matmul_n
    if args.device != "cpu":  # GPU: model time per exam and training memory (no DICOM pass, no RSS)
        result.update(device_report(args, args.device))
        result["load_average_end"] = list(os.getloadavg())
        return result
    result["matmul_gflops"] = matmul_gflops(args.matmul_n, args.repeats)

    channels_last = not args.no_channels_last
    net = build_inference_network(args.depth, channels_last)
    x = torch.randn(1, 7, args.size, args.size)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    flops = network_flops(net, x)
    with torch.inference_mode():
        net(x)  # warm-up: oneDNN primitives and weight reorders
        seconds = _best(partial(net, x), args.repeats)
    # the fused PAM alone on the stride-4 feature map: how close the attention kernel itself gets to peak
    pam = PositionAttention(64, impl="fused").eval()
    feats = torch.randn(1, 64, args.size // 4, args.size // 4).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        pam(feats)
        pam_seconds = _best(lambda: pam(feats), args.repeats)
    result["conv3x3_gflops"] = conv3x3_gflops(args.size // 4, args.repeats)
    result["conv3x3_over_matmul"] = result["conv3x3_gflops"] / result["matmul_gflops"]
    eager = SpineOne(STREAMS, backbone_depth=args.depth, pam_impl="fused").eval()
    x_eager = x.contiguous()
    with torch.no_grad():  # as the standard evaluator runs an unprepared model: no folding, NCHW, no_grad
        eager(x_eager)
        eager_seconds = _best(partial(eager, x_eager), args.repeats)
    del eager
    computed = flops["counted"]  # includes the fused PAM attention at the width the kernel computes
    useful = computed - flops["pam_computed"] + flops["pam_useful"]
    result.update(
        {
            "network_gflop": computed / 1e9,
            "network_gflop_useful": useful / 1e9,
            "pam_attention_gflop": flops["pam_computed"] / 1e9,
            "pam_attention_gflop_useful": flops["pam_useful"] / 1e9,
            "network_seconds": seconds,
            "network_seconds_eager": eager_seconds,
            "fraction_of_peak": computed / seconds / 1e9 / result["matmul_gflops"],
            "fraction_of_peak_useful": useful / seconds / 1e9 / result["matmul_gflops"],
            "pam_seconds": pam_seconds,
            "pam_fraction_of_peak": flops["pam_computed"] / len(STREAMS) / pam_seconds / 1e9 / result["matmul_gflops"],
        }
    )

    with tempfile.TemporaryDirectory(prefix="spineone_bench_") as tmp:
        data_dir = _generate_study(Path(tmp) / "phantom", args.seed)
        passes = [
            end_to_end_once(args.size, args.depth, data_dir, Path(tmp) / "out", channels_last)
            for _ in range(1 + args.repeats)
        ]
        first, best = passes[0], min(passes[1:], key=lambda p: p["end_to_end_seconds"])
        result["end_to_end_first_seconds"] = first["end_to_end_seconds"]
        result["end_to_end"] = best
        for key in ("end_to_end_seconds", "load_seconds", "preprocess_seconds", "decode_seconds", "write_seconds"):
            result[key] = best[key]
        result["end_to_end_network_seconds"] = best["network_seconds"]
        if not args.no_precision:  # issue 14: fp32 against bf16, end to end with precision "auto"
            e2e = partial(end_to_end_once, args.size, args.depth, data_dir, Path(tmp) / "out", channels_last, "auto")
            result["precision"] = precision_report(args, net, x, computed / 1e9, e2e, synthetic_targets)
        del net
        commands = {"inference": _child_command(args, "--child", "inference", "--data-dir", str(data_dir))}
        if not args.no_train:
            for impl in PAM_IMPLS:
                for batch in TRAIN_BATCHES:
                    commands[f"{impl}/{batch}"] = _child_command(
                        args, "--child", "train", "--impl", impl, "--batch", str(batch)
                    )
        children = _run_children(commands, concurrent=args.quick)
    inference = children.pop("inference")
    result["inference_subprocess"] = inference
    result["peak_rss_mb"] = inference.get("peak_rss_mb", float("nan"))
    if children:
        result.update(training_summary(children))
    e2e = result["end_to_end_seconds"]
    result["decode_fraction_of_end_to_end"] = result["decode_seconds"] / e2e
    result["end_to_end_over_network"] = e2e / result["end_to_end_network_seconds"]  # parts of the same pass
    result["end_to_end_over_best_network"] = e2e / seconds
    result["targets"] = {
        "fraction_of_peak_ge_0.7": result["fraction_of_peak"] >= 0.7,
        "inference_peak_rss_lt_2048_mb": result["peak_rss_mb"] < 2048,
        "decode_le_2pct_of_end_to_end": result["decode_fraction_of_end_to_end"] <= 0.02,
        "end_to_end_le_1.3x_network": result["end_to_end_over_network"] <= 1.3,
    }
    if "train_memory_ratio_fused_over_plain" in result:
        result["targets"]["train_memory_fused_le_quarter_of_plain_whole_process"] = (
            result["train_memory_ratio_whole_process"] <= 0.25
        )
        result["targets"]["train_memory_fused_le_quarter_of_plain"] = (
            result["train_memory_ratio_fused_over_plain"] <= 0.25
        )
    result["load_average_end"] = list(os.getloadavg())
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON file to write (required except in --child mode)")
    p.add_argument("--size", type=int, default=640, help="input H = W in pixels (multiple of 16; default 640)")
    p.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101), help="ResNet depth (default 50)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="one repeat, small matmul, training at --size: a smoke test")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (best is kept); default 5, 1 with --quick")
    p.add_argument("--train-size", type=int, default=None, help="training crop (default 512, --size with --quick)")
    p.add_argument("--train-repeats", type=int, default=None, help="timed training steps (default 2, 1 with --quick)")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul size (default 4096, 512 with --quick)")
    p.add_argument("--no-train", action="store_true", help="skip the training measurements")
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cpu: the full CPU benchmark (default); " "cuda: model time per exam and training memory on the GPU",
    )
    p.add_argument(
        "--exam-batches",
        type=int,
        nargs="+",
        default=[1, 16],
        help="with --device cuda: batches for the model time per exam (default 1 16)",
    )
    p.add_argument("--no-channels-last", action="store_true", help="run inference in NCHW instead of channels_last")
    p.add_argument("--no-precision", action="store_true", help="skip the fp32-against-bf16 section")
    p.add_argument(
        "--no-precision-train",
        action="store_true",
        help="skip the precision section's training steps (demo settings); --no-train does not skip them",
    )
    p.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "process"),
        help="clock of the precision section: wall, or process CPU time (use with --threads 1 on a busy machine)",
    )
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    p.add_argument("--child", choices=("inference", "train"), help=argparse.SUPPRESS)
    p.add_argument("--impl", default="fused", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=TRAIN_BATCHES[0], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size < 16 or args.size % 16:
        p.error(f"--size must be a positive multiple of 16, got {args.size}")
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.train_repeats = args.train_repeats or (1 if args.quick else 2)
    args.matmul_n = args.matmul_n or (512 if args.quick else 4096)
    args.train_size = args.train_size or (args.size if args.quick else 512)
    if args.train_size < 16 or args.train_size % 16:
        p.error(f"--train-size must be a positive multiple of 16, got {args.train_size}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if any(b < 1 for b in args.exam_batches):
        p.error(f"--exam-batches must be positive, got {args.exam_batches}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    if args.child is None and not args.out:
        p.error("--out is required")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_child(args)))
        return
    result = run(args)
    out = Path(args.out)
    atomic_write_text(out, json.dumps(result, indent=4) + "\n")
    keys = (
        "matmul_gflops",
        "network_gflop",
        "network_seconds",
        "fraction_of_peak",
        "end_to_end_seconds",
        "peak_rss_mb",
    )
    summary = {k: result[k] for k in keys if k in result}
    if "precision" in result:
        keys = ("auto_precision", "bf16_speedup", "fraction_of_peak", "train_bf16_speedup")
        summary["precision"] = {k: result["precision"].get(k) for k in keys}
    print(json.dumps(summary, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
