"""bundle.precision: the precision names, the "auto" choice (CPU flags + cached probe), AutocastInferer, and
the configs' precision keys; the loss stays float32 under autocast."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from bundle import precision as P
from bundle.losses import SpineOneLoss
from bundle.precision import AutocastInferer, cpu_bf16_support, resolve_precision
from bundle.streams import RSNA_STREAMS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_auto(monkeypatch):
    """Forget the cached "auto" choice and the log-once record before and after the test."""
    P._auto_cpu.cache_clear()
    monkeypatch.setattr(P, "_logged", set())
    monkeypatch.setattr(P, "_network_choices", {})
    yield
    P._auto_cpu.cache_clear()


def test_explicit_precisions():
    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("float16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        AutocastInferer("half")


def test_cpu_flag_comes_from_torch_public_capabilities():
    caps = torch.cpu.get_capabilities()
    flag = cpu_bf16_support()
    assert flag is None or caps[flag] is True
    if flag is None:
        assert not any(caps.get(f) is True for f in P.BF16_CPU_FLAGS)


def test_auto_without_bf16_flags_is_fp32_without_probing(monkeypatch, fresh_auto, caplog):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": False})
    monkeypatch.setattr(P, "bf16_probe", lambda: pytest.fail("probe must not run without bf16 instructions"))
    with caplog.at_level(logging.INFO, logger="bundle.precision"):
        assert resolve_precision("auto", "cpu") is None
        assert resolve_precision("auto", "cpu") is None
    lines = [r.getMessage() for r in caplog.records if "precision on cpu" in r.getMessage()]
    assert lines == ["precision on cpu: fp32 (auto: the CPU reports no bfloat16 matrix instructions)"]


@pytest.mark.parametrize("speedup, expected", [(2.0, torch.bfloat16), (1.05, None), (0.3, None)])
def test_auto_follows_the_probe_once_per_process(monkeypatch, fresh_auto, speedup, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    calls = []

    def probe():
        calls.append(1)
        return {"fp32_seconds": speedup * 1e-3, "bf16_seconds": 1e-3, "speedup": speedup}

    monkeypatch.setattr(P, "bf16_probe", probe)
    assert resolve_precision("auto", "cpu") == expected
    assert AutocastInferer("auto").dtype_for("cpu") == expected
    assert len(calls) == 1  # cached: later calls (and other inferers) reuse the first answer


def test_probe_measures_both_precisions():
    probe = P.bf16_probe(n=64, side=8, channels=16, repeats=1)
    assert probe["fp32_seconds"] > 0 and probe["bf16_seconds"] > 0
    assert probe["speedup"] == pytest.approx(probe["fp32_seconds"] / probe["bf16_seconds"])


@pytest.mark.parametrize(
    "flag, speedup, expected",
    [
        (None, 5.0, None),  # no bf16 matrix instructions: fp32 whatever a probe would say (it does not run)
        ("avx512_bf16", 2.0, torch.bfloat16),
        ("amx_bf16", 1.02 / P.PROBE_MARGIN, torch.bfloat16),  # just past the noise margin
        ("avx512_bf16", 0.98 / P.PROBE_MARGIN, None),  # faster, but within the margin
        ("avx512_bf16", 0.8, None),  # slower in bf16 (the 640 network on 2 AVX512-BF16 threads)
    ],
)
def test_choose_cpu_dtype_from_injected_timings(flag, speedup, expected):
    calls = []

    def probe():
        calls.append(1)
        return {"fp32_seconds": speedup * 0.01, "bf16_seconds": 0.01, "speedup": speedup, "probe": "network"}

    dtype, reason = P.choose_cpu_dtype(flag, probe)
    assert dtype == expected
    assert len(calls) == (0 if flag is None else 1)
    assert (flag or "no bfloat16") in reason and ("network probe" in reason) == (flag is not None)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("network_speedup, op_speedup", [(0.8, 2.0), (2.0, 0.8)])
def test_auto_inference_follows_the_network_probe_once(monkeypatch, fresh_auto, network_speedup, op_speedup):
    """In eval mode "auto" asks the network probe (with the network and the input shape), once per network and
    shape across inferers; in training mode the operation probe. Timings injected."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    seen = []

    def fake_network_probe(network, shape):
        seen.append((network, shape))
        return {"fp32_seconds": network_speedup, "bf16_seconds": 1.0, "speedup": network_speedup}

    monkeypatch.setattr(P, "network_probe", fake_network_probe)
    monkeypatch.setattr(
        P, "bf16_probe", lambda: {"fp32_seconds": op_speedup, "bf16_seconds": 1.0, "speedup": op_speedup}
    )
    net, x = _Tiny().eval(), torch.randn(2, 3, 8, 8)
    for _ in range(2):
        out = AutocastInferer("auto")(x, net)
        assert out.dtype == torch.float32
    assert seen == [(net, (2, 3, 8, 8))]
    want = torch.bfloat16 if network_speedup > 1 else None
    assert AutocastInferer("auto").dtype_for("cpu", net, (2, 3, 8, 8)) == want
    assert AutocastInferer("auto").dtype_for("cpu", net.train(), (2, 3, 8, 8)) == (
        torch.bfloat16 if op_speedup > 1 else None
    )
    assert len(seen) == 1


def test_network_probe_estimates_both_precisions_and_leaves_the_network_as_it_was(monkeypatch):
    from bundle.networks import SpineOne

    def refuse(n: int) -> None:
        raise AssertionError(f"torch.set_num_threads({n}) called by the probe")

    monkeypatch.setattr(torch, "set_num_threads", refuse)
    torch.manual_seed(0)
    net = SpineOne(RSNA_STREAMS, backbone_depth=18, in_channels=7).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    probe = P.network_probe(net, (2, 7, 96, 64), sizes=(32, 64), rows=8)
    for name in ("fp32", "bf16"):
        assert probe[f"fixed_{name}"] >= 0 and probe[f"per_pixel_{name}"] >= 0 and probe[f"attention_{name}"] > 0
        rest = probe[f"fixed_{name}"] + probe[f"per_pixel_{name}"] * 2 * 96 * 64  # B H W pixels
        assert rest > 0 and probe[f"{name}_seconds"] == pytest.approx(rest + probe[f"attention_{name}"])
    assert probe["speedup"] == pytest.approx(probe["fp32_seconds"] / probe["bf16_seconds"])
    assert not net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # no BatchNorm update
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())  # hooks removed


class _SlowOnce(torch.nn.Module):
    """Identity whose ``slow_call``-th forward sleeps ``pause`` seconds (a stand-in for another process taking
    the CPU during one probe call)."""

    def __init__(self, slow_call: int, pause: float) -> None:
        super().__init__()
        self.calls, self.slow_call, self.pause = 0, slow_call, pause

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.slow_call:
            time.sleep(self.pause)
        return x


def test_small_forward_keeps_the_best_call_so_one_slow_call_cannot_set_the_estimate():
    net = _SlowOnce(slow_call=2, pause=0.5)  # call 1 is the warm-up, call 2 the first timed one
    best, spent, _ = P._small_forward(net, torch.zeros(1, 1, 4, 4), [], repeats=3)
    assert net.calls == 4 and spent == []
    assert best < 0.25  # the 0.5 s call is not the one kept (the others take microseconds)
    assert P._small_forward(_SlowOnce(slow_call=2, pause=0.5), torch.zeros(1, 1, 4, 4), [], repeats=1)[0] >= 0.5


def test_network_probe_times_each_forward_as_the_best_of_three_by_default(monkeypatch):
    seen = []
    monkeypatch.setattr(P, "_small_forward", lambda net, x, pams, repeats: seen.append(repeats) or (1e-3, [], []))
    P.network_probe(torch.nn.Identity(), (1, 7, 64, 64), sizes=(32, 64))
    assert seen == [3, 3, 3, 3]  # two sizes, two precisions


class _Recorder(torch.nn.Module):
    """A 1x1 convolution that records the dtype it computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.conv(x)
        self.seen.append(y.dtype)
        return {"pred": y, "index": torch.arange(2)}


@pytest.mark.parametrize("name, inside", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_inferer_runs_the_network_at_precision_and_returns_float32(name, inside):
    net = _Recorder()
    x = torch.randn(2, 3, 5, 5)
    out = AutocastInferer(name)(x, net)
    assert net.seen == [inside]
    assert out["pred"].dtype == torch.float32 and out["index"].dtype == torch.int64
    torch.testing.assert_close(out["pred"], net.conv(x), atol=0.05, rtol=0.02)


def test_autocast_inferer_trains_with_float32_gradients():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 9, 3, padding=1)
    pred = AutocastInferer("bf16")(torch.randn(2, 3, 8, 8), net)
    pred.square().mean().backward()
    assert net.weight.grad is not None and net.weight.grad.dtype == torch.float32
    assert float(net.weight.grad.abs().sum()) > 0


def test_loss_is_float32_under_autocast_and_for_bf16_predictions():
    torch.manual_seed(0)
    loss = SpineOneLoss(RSNA_STREAMS, oa_enabled=True)
    pred = torch.randn(2, 10, 4, 4)
    targets = {
        "disc_heatmap": (torch.rand(2, 3, 8, 8) > 0.8).float(),
        "disc_offset": torch.randn(2, 6, 8, 8),
        "disc_offset_mask": (torch.rand(2, 6, 8, 8) > 0.5).float(),
        "disc_level": 4 * torch.rand(2, 1, 8, 8),
        "disc_level_mask": (torch.rand(2, 1, 8, 8) > 0.5).float(),
    }
    ref_total, ref_parts = loss.loss_parts(pred.bfloat16().float(), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = loss.loss_parts(pred.bfloat16(), targets)
        assert loss(pred.bfloat16(), targets).dtype == torch.float32  # the trainer's call, a scalar tensor
    assert total.dtype == torch.float32 and all(p.dtype == torch.float32 for p in parts.values())
    torch.testing.assert_close(total, ref_total)
    for key in ref_parts:
        torch.testing.assert_close(parts[key], ref_parts[key])


def test_configs_name_the_precision_and_wrap_their_inferers():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    assert parser["precision"] == "auto"
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, AutocastInferer) and inferer.precision == "auto"
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in ("train.json", "demo.json")])
    parser["precision"] = "fp32"
    parser["train_precision"] = "bf16"
    assert parser.get_parsed_content("train#inferer").precision == "bf16"
    assert parser.get_parsed_content("validate#inferer").precision == "fp32"
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    assert parser["train_precision"] == "@precision"  # training follows `precision` unless set apart


def test_probe_never_changes_the_thread_count(monkeypatch):
    def refuse(n: int) -> None:  # process-wide state: a server's concurrent requests share it
        raise AssertionError(f"torch.set_num_threads({n}) called by the probe")

    monkeypatch.setattr(torch, "set_num_threads", refuse)
    probe = P.bf16_probe(n=32, side=4, channels=8, repeats=1)
    assert probe["fp32_seconds"] > 0 and probe["bf16_seconds"] > 0


def _fake_evaluation(folder: Path, points: list[tuple[str, int, list[float]]], f1: float) -> Path:
    import json

    (folder / "predictions" / "s1").mkdir(parents=True)
    keypoints = [
        {"stream": "disc", "level": level, "label_index": label, "position_mm": mm} for level, label, mm in points
    ]
    (folder / "predictions" / "s1" / "keypoints.json").write_text(
        json.dumps({"study_id": "s1", "keypoints": keypoints})
    )
    metrics = {"streams": {"disc": {"pck": {"6": 1.0}, "macro_f1": f1}}, "rsna": {"score": 0.1}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_compare_precision_script(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_precision", ROOT / "scripts" / "compare_precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    a = _fake_evaluation(tmp_path / "a", [("L1/L2", 0, [0.0, 0.0, 0.0]), ("L2/L3", 1, [0.0, 0.0, 10.0])], 0.9)
    b = _fake_evaluation(tmp_path / "b", [("L1/L2", 0, [0.0, 0.3, 0.4]), ("L3/L4", 1, [0.0, 0.0, 20.0])], 0.91)
    result = module.compare(a, b)
    assert result["only_in_one"] == 2 and result["same_level_and_class_fraction"] == pytest.approx(1 / 3)
    assert result["max_position_difference_mm"] == pytest.approx(0.5)
    assert result["metric_differences"]["disc_macro_f1"] == pytest.approx(0.01)
    assert result["criterion_met"] == {
        "same_level_and_class_ge_0.99": False,
        "positions_within_0.5_mm": True,
        "metrics_within_0.005": False,
    }


def test_loss_curve_script_records_every_iteration_loss_parts(tmp_path):
    """scripts/loss_curves.py's run: the loss parts of every iteration and the per-epoch means (tiny demo)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "loss_curves", Path(__file__).parents[1] / "scripts" / "loss_curves.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tiny = {"phantom_studies": 4, "input_size": 64, "crop_size": [64, 64], "pixdim": 4.0, "batch_size": 2}
    run = script.train_curve(tmp_path, "fp32", 0, 1, overrides=tiny)
    assert run["iterations_per_epoch"] >= 1 and len(run["iteration_total"]) == run["iterations_per_epoch"]
    assert {"total", "disc_heatmap", "disc_offset"} <= set(run["epoch_mean"])
    assert all(torch.isfinite(torch.tensor(run["iteration_total"]))) and len(run["epoch_seconds"]) == 1
