"""scripts/benchmark.py: one tiny --quick run writes every key with sane values; the FLOP bookkeeping is exact."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stream_fixtures import streams

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("spineone_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--size", "64", "--depth", "18", "--quick"],
        capture_output=True,
        text=True,
        cwd=str(tmp_path_factory.getbasetemp()),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_report_has_every_key(report):
    for key in (
        "matmul_gflops",
        "conv3x3_gflops",
        "network_gflop",
        "pam_attention_gflop",
        "pam_attention_gflop_useful",
        "network_gflop_useful",
        "network_seconds",
        "network_seconds_eager",
        "fraction_of_peak",
        "fraction_of_peak_useful",
        "end_to_end_seconds",
        "load_seconds",
        "preprocess_seconds",
        "end_to_end_network_seconds",
        "decode_seconds",
        "write_seconds",
        "peak_rss_mb",
    ):
        assert _positive(report[key]), (key, report.get(key))
    assert report["device"] == "cpu" and report["size"] == 64 and report["depth"] == 18
    assert isinstance(report["torch_threads"], int) and report["torch_threads"] >= 1
    assert report["torch_version"] == torch.__version__ and isinstance(report["cpu_model"], str)
    assert len(report["load_average_start"]) == 3


def test_report_values_are_consistent(report):
    # one fused PAM on the 16 x 16 grid of a 64 x 64 input: 2 N^2 (C + C) computed, 2 N^2 (C/8 + C) useful
    n, c = 16 * 16, 64
    assert report["pam_attention_gflop"] == pytest.approx(4 * n * n * c / 1e9)
    assert report["pam_attention_gflop_useful"] == pytest.approx(2 * n * n * (c // 8 + c) / 1e9)
    assert report["network_gflop_useful"] == pytest.approx(
        report["network_gflop"] - report["pam_attention_gflop"] + report["pam_attention_gflop_useful"]
    )
    assert report["conv3x3_over_matmul"] == pytest.approx(report["conv3x3_gflops"] / report["matmul_gflops"])
    assert report["fraction_of_peak"] == pytest.approx(
        report["network_gflop"] / report["network_seconds"] / report["matmul_gflops"]
    )
    parts = report["end_to_end"]
    total = sum(
        parts[k] for k in ("load_seconds", "preprocess_seconds", "network_seconds", "decode_seconds", "write_seconds")
    )
    assert report["end_to_end_seconds"] == pytest.approx(total, rel=1e-3)
    # through the configured evaluator; an untrained network's keypoints: one per level found, at most 5
    assert parts["input_shape"] == [7, 64, 64] and 0 <= parts["num_keypoints"] <= 5
    assert parts["run_seconds"] >= parts["end_to_end_seconds"] and parts["start_seconds"] > 0
    assert report["decode_fraction_of_end_to_end"] == pytest.approx(report["decode_seconds"] / total, rel=1e-3)
    assert report["inference_subprocess"]["peak_rss_mb"] >= report["inference_subprocess"]["rss_after_import_mb"]


def test_report_training(report):
    assert report["train_batches"] == [2, 3]
    for impl in ("fused", "plain"):
        small, large = report["train"][impl]["2"], report["train"][impl]["3"]
        assert "error" not in small and "error" not in large, (small, large)
        assert small["batch"] == 2 and large["batch"] == 3 and small["crop"] == large["crop"] == 64
        assert report["train_step_seconds"][impl] == pytest.approx(small["step_seconds"] / 2)
        # per sample = what the third sample adds to the peak; the whole-process figure is kept beside it
        assert report["train_peak_rss_mb"][impl] == pytest.approx(large["peak_rss_mb"] - small["peak_rss_mb"])
        assert report["train_process_peak_rss_mb_per_sample"][impl] == pytest.approx(small["peak_rss_mb"] / 2)
    # at 64 x 64 one more sample can add ~0 MB of peak RSS: then the ratio is NaN, never a division error
    fused, plain = report["train_peak_rss_mb"]["fused"], report["train_peak_rss_mb"]["plain"]
    ratio = report["train_memory_ratio_fused_over_plain"]
    assert ratio == pytest.approx(fused / plain) if plain > 0 else math.isnan(ratio)
    assert _positive(report["train_memory_ratio_whole_process"])
    assert set(report["targets"]) >= {
        "fraction_of_peak_ge_0.7",
        "inference_peak_rss_lt_2048_mb",
        "decode_le_2pct_of_end_to_end",
        "end_to_end_le_1.3x_network",
        "train_memory_fused_le_quarter_of_plain",
    }
    assert all(isinstance(v, bool) for v in report["targets"].values())


def test_training_summary_uses_the_extra_sample():
    """Per-sample memory is the batch-3 minus batch-2 peak, so fixed memory (imports, weights) cancels."""
    bench = _load_script()

    def child(batch, fixed, per_sample):
        return {
            "batch": batch,
            "peak_rss_mb": fixed + batch * per_sample,
            "rss_after_import_mb": 800.0,
            "step_seconds_per_sample": 1.0,
        }

    children = {
        "fused/2": child(2, 2000, 100),
        "fused/3": child(3, 2000, 100),
        "plain/2": child(2, 2000, 1000),
        "plain/3": child(3, 2000, 1000),
    }
    summary = bench.training_summary(children)
    assert summary["train_peak_rss_mb"] == {"fused": pytest.approx(100), "plain": pytest.approx(1000)}
    assert summary["train_memory_ratio_fused_over_plain"] == pytest.approx(0.1)
    assert summary["train_memory_ratio_whole_process"] == pytest.approx((2200 / 2) / (4000 / 2))
    assert summary["train_memory_ratio_above_import"] == pytest.approx(1400 / 3200)
    flat = bench.training_summary({**children, "plain/3": child(2, 2000, 1000) | {"batch": 3}})  # plain adds 0 MB
    assert flat["train_peak_rss_mb"]["plain"] == 0 and math.isnan(flat["train_memory_ratio_fused_over_plain"])
    missing = bench.training_summary({"fused/2": child(2, 2000, 100)})
    assert missing["train"]["plain"]["3"] == {"error": "not run"}
    assert math.isnan(missing["train_memory_ratio_fused_over_plain"])


def test_pam_flops_useful_equal_plain_bmm_count():
    """FlopCounterMode counts the fused PAM's CPU flash kernel at the padded width; the useful attention FLOPs
    are exactly what it counts for the plain PAM's two bmm calls."""
    bench = _load_script()
    from bundle.networks import SpineOne

    x = torch.randn(1, 7, 48, 64)
    fused = bench.network_flops(SpineOne(streams(disc=3), backbone_depth=18, pam_impl="fused").eval(), x)
    plain = bench.network_flops(SpineOne(streams(disc=3), backbone_depth=18, pam_impl="plain").eval(), x)
    assert plain["pam_computed"] == 0 and plain["pam_useful"] == 0
    n = 12 * 16
    assert fused["pam_computed"] == pytest.approx(2 * n * n * 64 * 2)
    # the padded kernel's work appears in the count itself (not added by hand) ...
    assert fused["counted"] - plain["counted"] == pytest.approx(fused["pam_computed"] - fused["pam_useful"])
    # ... and the useful part is the plain PAM's q^T k and v A^T products: 2 N^2 (C/8) + 2 N^2 C
    assert fused["pam_useful"] == pytest.approx(2 * n * n * 8 + 2 * n * n * 64)


def test_device_report_runs_the_gpu_measurements_on_cpu():
    """The --device cuda path (model time per exam at batches 1 and N, fused/plain training memory per
    sample) is the same code on any device; CI has no GPU, so it runs here on the CPU at a tiny size."""
    bench = _load_script()
    args = bench.parse_args(["--out", "x.json", "--size", "64", "--depth", "18", "--quick", "--exam-batches", "1", "3"])
    report = bench.device_report(args, "cpu")
    assert report["exam_batches"] == [1, 3] and set(report["exam_seconds"]) == {"1", "3"}
    assert all(_positive(v) for v in report["exam_seconds"].values())
    assert report["network_seconds"] == report["exam_seconds"]["1"]
    assert report["fraction_of_peak"] == pytest.approx(
        report["network_gflop"] / report["network_seconds"] / report["matmul_gflops"]
    )
    assert report["train_memory_measure"] == "peak_rss_mb"  # max_memory_allocated_mb on a GPU
    for impl in ("fused", "plain"):
        assert [report["train"][f"{impl}/{b}"]["batch"] for b in (2, 3)] == [2, 3]
        assert report["train_peak_memory_mb"][impl] == pytest.approx(
            report["train"][f"{impl}/3"]["peak_rss_mb"] - report["train"][f"{impl}/2"]["peak_rss_mb"]
        )
        assert _positive(report["train_step_seconds"][impl])
    # one process's lifetime RSS peak hardly moves between steps here, so the ratio may be NaN (not an error)
    plain = report["train_peak_memory_mb"]["plain"]
    ratio = report["train_memory_ratio_fused_over_plain"]
    assert ratio == pytest.approx(report["train_peak_memory_mb"]["fused"] / plain) if plain > 0 else math.isnan(ratio)


def test_cuda_device_is_refused_clearly_without_a_gpu():
    bench = _load_script()
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x.json", "--exam-batches", "0"])
    if torch.cuda.is_available():
        assert bench.parse_args(["--out", "x.json", "--device", "cuda"]).device == "cuda"
    else:
        with pytest.raises(SystemExit):
            bench.parse_args(["--out", "x.json", "--device", "cuda"])


def test_synthetic_targets_feed_the_loss():
    bench = _load_script()
    t = bench.synthetic_targets(2, 64)
    assert t["disc_heatmap"].shape == (2, 3, 64, 64) and t["disc_offset_mask"].shape == (2, 6, 64, 64)
    # 5 disks per image, each with the same pixel count, and the mask marks both offset channels of each disk
    per_image = t["disc_heatmap"].sum(dim=(1, 2, 3))
    assert torch.equal(per_image[0], per_image[1]) and per_image[0] > 0
    assert torch.equal(t["disc_offset_mask"].sum(), 2 * t["disc_heatmap"].sum())
    # offsets point from each pixel to its disk centre: first disk of image 0 has class 0, centre (x, y) = (32, 64/6)
    assert t["disc_heatmap"][0, 0, 11, 30] == 1
    assert t["disc_offset"][0, 0, 11, 30] == pytest.approx(2.0)
    assert t["disc_offset"][0, 1, 11, 30] == pytest.approx(64 / 6 - 11)


def test_parse_args_rejects_bad_sizes():
    bench = _load_script()
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x.json", "--size", "50"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--size", "64"])  # --out missing
    args = bench.parse_args(["--out", "x.json", "--size", "64", "--quick"])
    assert args.repeats == 1 and args.train_size == 64 and args.matmul_n == 512


def test_report_precision_section(report):
    """fp32 and bf16 rates, network and part times, the speed-up, fraction_of_peak against the precision
    "auto" picked, end to end through AutocastInferer("auto") and the demo-setting training steps."""
    prec = report["precision"]
    names = ["fp32", "bf16"] if prec["bf16_supported"] else ["fp32"]
    assert prec["auto_precision"] in names and prec["auto_precision_op_probe"] in names
    if prec["bf16_supported"]:  # the network probe "auto" uses for inference, with its own cost
        probe = prec["network_probe"]
        assert probe["probe"] == "network"
        assert all(_positive(probe[k]) for k in ("fp32_seconds", "bf16_seconds", "attention_bf16", "cost_seconds"))
        assert probe["speedup"] == pytest.approx(probe["fp32_seconds"] / probe["bf16_seconds"])
    for name in names:
        for key in ("matmul_gflops", "conv3x3_gflops", "network_seconds", "fraction_of_peak"):
            assert _positive(prec[f"{key}_{name}"]), (key, name)
        parts = prec[f"parts_seconds_{name}"]
        assert set(parts) == {"network", "backbone", "aspp", "decoder", "pam", "cam", "head_convs"}
        assert all(_positive(v) for v in parts.values())
        assert prec[f"fraction_of_peak_{name}"] == pytest.approx(
            report["network_gflop"] / prec[f"network_seconds_{name}"] / prec[f"matmul_gflops_{name}"]
        )
        assert _positive(prec["train_step_seconds"][name])
    assert prec["fraction_of_peak"] == prec[f"fraction_of_peak_{prec['auto_precision']}"]
    if prec["bf16_supported"]:
        assert prec["bf16_speedup"] == pytest.approx(prec["network_seconds_fp32"] / prec["network_seconds_bf16"])
        assert prec["train_bf16_speedup"] == pytest.approx(
            prec["train_step_seconds"]["fp32"] / prec["train_step_seconds"]["bf16"]
        )
    else:
        assert "bf16_skipped" in prec and "network_seconds_bf16" not in prec
    e2e = prec["end_to_end_auto"]
    assert 0 <= e2e["num_keypoints"] <= 5 and e2e["end_to_end_over_network"] > 1  # untrained: levels may be absent
    assert prec["train_settings"] == {"depth": 18, "crop": [64, 64], "batch": 2}  # --quick: the demo net at --size


def test_precision_report_skips_bf16_without_cpu_support(monkeypatch):
    bench = _load_script()
    import bench_precision as bp  # importable once the benchmark script is loaded
    from bundle import precision

    precision._auto_cpu.cache_clear()
    monkeypatch.setattr(precision, "_logged", set())
    monkeypatch.setattr(precision, "_network_choices", {})
    monkeypatch.setattr(precision, "network_probe", lambda *a, **k: pytest.fail("no probe without bf16 support"))
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    monkeypatch.setattr(bp, "cpu_bf16_support", precision.cpu_bf16_support)
    try:
        args = bench.parse_args(["--out", "x.json", "--size", "32", "--depth", "18", "--quick", "--no-precision-train"])
        from bundle.networks import SpineOne
        from bundle.streams import RSNA_STREAMS

        net = SpineOne(RSNA_STREAMS, backbone_depth=18).eval()
        fake = {"network_seconds": 1.0, "decode_seconds": 0.01, "end_to_end_seconds": 1.2}
        rep = bp.precision_report(args, net, torch.randn(1, 7, 32, 32), 1.0, lambda: dict(fake), None)
    finally:
        precision._auto_cpu.cache_clear()
    assert rep["bf16_supported"] is False and rep["auto_precision"] == "fp32" and "bf16_skipped" in rep
    assert rep["auto_precision_op_probe"] == "fp32" and "network_probe" not in rep
    assert not any(key.endswith("_bf16") for key in rep) and "bf16_speedup" not in rep
    assert rep["fraction_of_peak"] == rep["fraction_of_peak_fp32"]
    assert rep["end_to_end_auto"]["end_to_end_over_network"] == pytest.approx(1.2)
