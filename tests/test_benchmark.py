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
        capture_output=True, text=True, cwd=str(tmp_path_factory.getbasetemp()), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_report_has_every_key(report):
    for key in ("matmul_gflops", "network_gflop", "network_gflop_counted", "pam_attention_gflop_added",
                "network_gflop_useful", "network_seconds", "network_seconds_eager", "fraction_of_peak",
                "fraction_of_peak_useful", "end_to_end_seconds", "load_seconds", "preprocess_seconds",
                "end_to_end_network_seconds", "decode_seconds", "write_seconds", "peak_rss_mb"):
        assert _positive(report[key]), (key, report.get(key))
    assert report["device"] == "cpu" and report["size"] == 64 and report["depth"] == 18
    assert isinstance(report["torch_threads"], int) and report["torch_threads"] >= 1
    assert report["torch_version"] == torch.__version__ and isinstance(report["cpu_model"], str)
    assert len(report["load_average_start"]) == 3


def test_report_values_are_consistent(report):
    # one fused PAM on the 16 x 16 grid of a 64 x 64 input: 2 N^2 (C + C) computed, 2 N^2 (C/8 + C) useful
    n, c = 16 * 16, 64
    assert report["pam_attention_gflop_added"] == pytest.approx(4 * n * n * c / 1e9)
    assert report["pam_attention_gflop_useful"] == pytest.approx(2 * n * n * (c // 8 + c) / 1e9)
    assert report["network_gflop"] == pytest.approx(report["network_gflop_counted"] + report["pam_attention_gflop_added"])
    assert report["fraction_of_peak"] == pytest.approx(
        report["network_gflop"] / report["network_seconds"] / report["matmul_gflops"])
    parts = report["end_to_end"]
    total = sum(parts[k] for k in ("load_seconds", "preprocess_seconds", "network_seconds", "decode_seconds",
                                   "write_seconds"))
    assert report["end_to_end_seconds"] == pytest.approx(total, rel=1e-3)
    assert parts["input_shape"] == [7, 64, 64] and parts["num_keypoints"] == 5
    assert report["decode_fraction_of_end_to_end"] == pytest.approx(report["decode_seconds"] / total, rel=1e-3)
    assert report["inference_subprocess"]["peak_rss_mb"] >= report["inference_subprocess"]["rss_after_import_mb"]


def test_report_training(report):
    for impl in ("fused", "plain"):
        train = report["train"][impl]
        assert "error" not in train, train
        assert train["batch"] == 2 and train["crop"] == 64
        assert report["train_step_seconds"][impl] == pytest.approx(train["step_seconds"] / 2)
        assert report["train_peak_rss_mb"][impl] == pytest.approx(train["peak_rss_mb"] / 2)
    assert _positive(report["train_memory_ratio_fused_over_plain"])
    assert set(report["targets"]) >= {"fraction_of_peak_ge_0.7", "inference_peak_rss_lt_2048_mb",
                                      "decode_le_2pct_of_end_to_end", "end_to_end_le_1.3x_network",
                                      "train_memory_fused_le_quarter_of_plain"}
    assert all(isinstance(v, bool) for v in report["targets"].values())


def test_pam_flops_by_hand_equal_plain_bmm_count():
    """The hand-added useful attention FLOPs are what FlopCounterMode counts for the plain PAM's two bmm calls."""
    bench = _load_script()
    from bundle.networks import SpineOne

    x = torch.randn(1, 7, 48, 64)
    fused = bench.network_flops(SpineOne({"disc": 3}, backbone_depth=18, pam_impl="fused").eval(), x)
    plain = bench.network_flops(SpineOne({"disc": 3}, backbone_depth=18, pam_impl="plain").eval(), x)
    assert plain["pam_computed"] == 0 and plain["pam_useful"] == 0
    assert plain["counted"] - fused["counted"] == pytest.approx(fused["pam_useful"])
    n = 12 * 16
    assert fused["pam_computed"] == pytest.approx(2 * n * n * 64 * 2)


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
