"""Tests for bundle.networks: DANet PAM/CAM, DeepLabv3+ parts and the SpineOne network."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from bundle.networks import (
    ASPP,
    ChannelAttention,
    DeepLabV3PlusDecoder,
    PositionAttention,
    SpineOne,
    StreamHead,
    adapt_first_conv_weight,
    build_resnet_backbone,
)
from bundle.networks import deeplab as deeplab_module
from bundle.streams import split_output
from stream_fixtures import streams
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randomise(module: torch.nn.Module, seed: int = 0, gamma: float = 0.7) -> torch.nn.Module:
    """Random weights everywhere and a non-zero gamma so the attention branches matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.fill_(gamma)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


# ---------------------------------------------------------------- attention: literal references


def _pam_reference(pam: PositionAttention, x: torch.Tensor) -> torch.Tensor:
    """DANet PAM with explicit loops over batch and query positions."""
    b, c, h, w = x.shape
    n = h * w
    flat = x.reshape(b, c, n)

    def conv1x1(conv: torch.nn.Conv2d) -> torch.Tensor:
        weight = conv.weight[:, :, 0, 0]
        return torch.einsum("oc,bcn->bon", weight, flat) + conv.bias[None, :, None]

    q, k, v = conv1x1(pam.query), conv1x1(pam.key), conv1x1(pam.value)
    out = torch.zeros_like(flat)
    for bi in range(b):
        for i in range(n):
            energy = torch.stack([torch.dot(q[bi, :, i], k[bi, :, j]) for j in range(n)])  # unscaled
            attn = torch.exp(energy - energy.max())
            attn = attn / attn.sum()
            out[bi, :, i] = (v[bi] * attn[None, :]).sum(dim=1)
    return pam.gamma * out.reshape(b, c, h, w) + x


def _cam_reference(cam: ChannelAttention, x: torch.Tensor) -> torch.Tensor:
    """DANet CAM with explicit loops over channel pairs."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    out = torch.zeros_like(flat)
    for bi in range(b):
        energy = torch.empty(c, c, dtype=x.dtype)
        for i in range(c):
            for j in range(c):
                energy[i, j] = (flat[bi, i] * flat[bi, j]).sum()
        for i in range(c):
            e_new = energy[i].max() - energy[i]
            attn = torch.exp(e_new - e_new.max())
            attn = attn / attn.sum()
            out[bi, i] = (attn[:, None] * flat[bi]).sum(dim=0)
    return cam.gamma * out.reshape(b, c, h, w) + x


@pytest.mark.parametrize("impl", ["plain", "fused"])
def test_pam_matches_literal_reference(impl):
    torch.manual_seed(0)
    pam = _randomise(PositionAttention(16, impl=impl), seed=1, gamma=0.8)
    assert pam.query.out_channels == 2 and pam.key.out_channels == 2 and pam.value.out_channels == 16
    assert pam.query.bias is not None and tuple(pam.gamma.shape) == (1,)
    x = torch.randn(2, 16, 5, 3)
    with torch.no_grad():
        got, ref = pam(x), _pam_reference(pam, x)
    assert not torch.allclose(ref, x, atol=1e-2)  # the attention branch contributes
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_cam_matches_literal_reference():
    torch.manual_seed(0)
    cam = ChannelAttention()
    with torch.no_grad():
        cam.gamma.fill_(0.6)
    x = torch.randn(2, 6, 4, 5) * 0.5
    with torch.no_grad():
        got, ref = cam(x), _cam_reference(cam, x)
    assert not torch.allclose(ref, x, atol=1e-2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_gamma_zero_is_identity():
    x = torch.randn(2, 64, 6, 10)
    for module in (PositionAttention(64, "fused"), PositionAttention(64, "plain"), ChannelAttention()):
        assert float(module.gamma.detach()) == 0.0
        assert torch.equal(module(x), x)


@pytest.mark.parametrize("shape", [(1, 64, 8, 8), (2, 32, 7, 13), (1, 64, 24, 40), (3, 16, 1, 9)])
def test_fused_pam_equals_plain(shape):
    torch.manual_seed(0)
    plain = _randomise(PositionAttention(shape[1], "plain"), seed=2, gamma=1.3)
    fused = PositionAttention(shape[1], "fused")
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), atol=1e-4, rtol=1e-4)


def test_fused_pam_gradients_equal_plain():
    torch.manual_seed(0)
    plain = _randomise(PositionAttention(32, "plain"), seed=3, gamma=0.9)
    fused = PositionAttention(32, "fused")
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 32, 6, 9)
    weight = torch.randn(2, 32, 6, 9)
    grads = {}
    for name, module in (("plain", plain), ("fused", fused)):
        xi = x.clone().requires_grad_(True)
        (module(xi) * weight).sum().backward()
        grads[name] = [xi.grad] + [p.grad for p in module.parameters()]
    for g_fused, g_plain in zip(grads["fused"], grads["plain"]):
        assert g_plain is not None and g_fused is not None
        assert float(g_plain.abs().max()) > 0
        torch.testing.assert_close(g_fused, g_plain, atol=1e-4, rtol=1e-4)


def test_fused_pam_runs_a_fused_cpu_kernel():
    """With only the flash backend allowed, SDPA raises unless the fused CPU kernel accepts the inputs."""
    pam = _randomise(PositionAttention(64, "fused"), seed=4)
    x = torch.randn(1, 64, 16, 12)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = pam(x)
    with torch.no_grad(), torch.profiler.profile() as prof:
        pam(x)
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops and "aten::bmm" not in ops
    assert out.shape == x.shape


def test_fused_pam_does_not_materialise_attention():
    """128 x 128 map: N = 16384, the N x N float32 attention alone would be 1 GiB; fused must stay far below."""
    script = textwrap.dedent("""
        import resource, torch
        from bundle.networks.attention import PositionAttention
        torch.set_num_threads(2)
        pam = PositionAttention(64, impl="fused")
        with torch.no_grad():
            pam.gamma.fill_(0.5)
            x = torch.randn(1, 64, 128, 128)
            pam(x[:, :, :16, :16])
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out = pam(x)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024.0, bool(torch.isfinite(out).all()))
        """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    delta_mib, finite = res.stdout.split()[-2:]
    print(f"fused PAM 1x64x128x128: peak RSS increase {float(delta_mib):.0f} MiB")
    assert finite == "True"
    assert float(delta_mib) < 256.0, f"fused PAM raised peak RSS by {delta_mib} MiB (N x N would be 1024 MiB)"


def test_attention_argument_checks():
    with pytest.raises(ValueError, match="impl"):
        PositionAttention(64, impl="flash")
    with pytest.raises(ValueError, match="channels >= 8"):
        PositionAttention(4)


# ---------------------------------------------------------------- DeepLabv3+ parts


@pytest.mark.parametrize("depth,low_c,high_c", [(18, 64, 512), (34, 64, 512), (50, 256, 2048)])
def test_backbone_output_strides(depth, low_c, high_c):
    backbone = build_resnet_backbone(depth, in_channels=7).eval()
    assert backbone.conv1.in_channels == 7
    with torch.no_grad():
        low, high = backbone(torch.randn(1, 7, 64, 96))
    assert tuple(low.shape) == (1, low_c, 16, 24)  # stride 4
    assert tuple(high.shape) == (1, high_c, 4, 6)  # stride 16: last stage dilated, not strided
    assert (backbone.low_channels, backbone.high_channels) == (low_c, high_c)
    last = backbone.layer4[-1]
    last_3x3 = last.conv2
    assert last_3x3.dilation == (2, 2) and last_3x3.stride == (1, 1)


def test_backbone_101_builds():
    backbone = build_resnet_backbone(101, in_channels=7)
    assert len(backbone.layer3) == 23 and backbone.layer4[0].conv2.stride == (1, 1)
    assert 42e6 < _n_params(backbone) < 43e6  # torchvision's ResNet-101 without fc: 42.5 M
    with pytest.raises(ValueError, match="depth"):
        build_resnet_backbone(152)


def test_aspp_structure_and_shape():
    aspp = ASPP(64, 32, rates=(6, 12, 18), dropout=0.0).eval()
    convs = [branch[0] for branch in aspp.branches[:4]]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (3, 3), (3, 3)]
    assert [c.dilation[0] for c in convs[1:]] == [6, 12, 18]
    assert [c.padding[0] for c in convs[1:]] == [6, 12, 18]
    assert aspp.project[0].in_channels == 5 * 32  # four conv branches + image pooling
    x = torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        y = aspp(x)
        pooled = aspp.branches[4](x)
    assert tuple(y.shape) == (2, 32, 5, 7)
    # the image-pooling branch is constant over the map
    assert torch.equal(pooled, pooled[:, :, :1, :1].expand_as(pooled))


def test_decoder_shape():
    decoder = DeepLabV3PlusDecoder(64, aspp_channels=32, low_proj_channels=48, mid_channels=40, out_channels=64)
    assert decoder.low_proj[0].out_channels == 48 and decoder.fuse[0][0].in_channels == 48 + 32
    y = decoder(torch.randn(2, 64, 16, 20), torch.randn(2, 32, 4, 5))
    assert tuple(y.shape) == (2, 64, 16, 20)


def test_adapt_first_conv_weight():
    w = torch.randn(4, 3, 2, 2)
    adapted = adapt_first_conv_weight(w, 7)
    assert tuple(adapted.shape) == (4, 7, 2, 2)
    for c in range(7):
        torch.testing.assert_close(adapted[:, c], (w[:, 0] + w[:, 1] + w[:, 2]) / 3)
    assert torch.equal(adapt_first_conv_weight(w, 3), w)


def test_pretrained_adapts_first_conv_with_fake_state_dict(monkeypatch):
    fake = torchvision.models.resnet18(weights=None).state_dict()  # random stand-in for ImageNet weights
    calls = []

    def fake_state_dict(depth):
        calls.append(depth)
        return {k: v.clone() for k, v in fake.items()}

    monkeypatch.setattr(deeplab_module, "imagenet_state_dict", fake_state_dict)
    net = SpineOne(streams(disc=3), backbone_depth=18, in_channels=7, pretrained=True)
    assert calls == [18]
    conv1 = net.backbone.conv1.weight
    assert tuple(conv1.shape) == (64, 7, 7, 7)
    expected = fake["conv1.weight"].mean(dim=1, keepdim=True).repeat(1, 7, 1, 1)
    torch.testing.assert_close(conv1, expected)
    assert torch.equal(net.backbone.layer4[1].conv2.weight, fake["layer4.1.conv2.weight"])
    assert torch.equal(net.backbone.bn1.running_var, fake["bn1.running_var"])
    rgb = build_resnet_backbone(18, in_channels=3, pretrained=True)
    assert torch.equal(rgb.conv1.weight, fake["conv1.weight"])


def test_pretrained_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (network disabled in this test)")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # offline even where the machine has network
    with pytest.raises(RuntimeError) as info:
        SpineOne(streams(disc=3), backbone_depth=18, pretrained=True)
    message = str(info.value)
    assert "could not download" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "pretrained=False" in message and "resnet18" in message
    assert not list((tmp_path / "hub" / "checkpoints").glob("*.pth"))


# ---------------------------------------------------------------- SpineOne


def test_spineone_shapes_and_attributes():
    net = SpineOne(streams(disc=2, vertebra=2), backbone_depth=18).eval()
    assert net.streams == {"disc": 2, "vertebra": 2} and list(net.streams) == ["disc", "vertebra"]
    assert net.out_channels == 14
    with torch.no_grad():
        out = net(torch.randn(2, 7, 64, 96))
    assert tuple(out.shape) == (2, 14, 16, 24)
    parts = net.split(out)
    assert list(parts) == ["disc", "vertebra"]
    assert tuple(parts["vertebra"][0].shape) == (2, 2, 16, 24) and tuple(parts["vertebra"][1].shape) == (2, 4, 16, 24)
    assert tuple(parts["vertebra"][2].shape) == (2, 1, 16, 24)


def test_spineone_r50_parameter_count():
    net = SpineOne(streams(disc=2, vertebra=2), backbone_depth=50)
    assert 38e6 < _n_params(net) < 44e6


def test_output_layout_per_stream():
    """Zero the head weights and give biases known values: each channel of the output names its source."""
    net = SpineOne(streams(disc=3, vertebra=2), backbone_depth=18).eval()
    prior_bias = -math.log((1 - 0.01) / 0.01)
    with torch.no_grad():
        for s, head in enumerate(net.heads):
            torch.testing.assert_close(head.heatmap.bias, torch.full_like(head.heatmap.bias, prior_bias))
            head.heatmap.weight.zero_()
            head.offset.weight.zero_()
            head.heatmap.bias.copy_(100.0 * s + torch.arange(head.num_classes))
            head.offset.bias.copy_(100.0 * s + 10.0 + torch.arange(2 * head.num_classes))
            head.level.weight.zero_()
            head.level.bias.fill_(100.0 * s + 50.0)
        out = net(torch.randn(1, 7, 32, 48))
    channel_values = out[0, :, 0, 0].tolist()
    assert channel_values == [0, 1, 2, 10, 11, 12, 13, 14, 15, 50, 100, 101, 110, 111, 112, 113, 150]
    parts = net.split(out)
    assert torch.equal(parts["disc"][1][:, 4], out[:, 7])  # disc class 2 dx
    assert parts["vertebra"][1][0, :, 3, 5].tolist() == [110, 111, 112, 113]
    assert parts["disc"][2][0, 0, 3, 5].item() == 50 and parts["vertebra"][2][0, 0, 3, 5].item() == 150
    reference = split_output(out, {"disc": 3, "vertebra": 2})
    assert all(torch.equal(reference[k][i], parts[k][i]) for k in parts for i in range(3))


def test_stream_head_attention_options():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 8, 8)
    full = StreamHead(2, attention=("pam", "cam"))
    assert isinstance(full.pam, PositionAttention) and isinstance(full.cam, ChannelAttention)
    assert full.pam.impl == "fused"
    bare = StreamHead(2, attention=())
    assert bare.pam is None and bare.cam is None
    bare.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(("pam.", "cam."))})
    full.eval()
    bare.eval()
    with torch.no_grad():
        # gamma = 0: PAM(x) + CAM(x) = 2x, while no attention passes x itself
        torch.testing.assert_close(full(x / 2), bare(x))
        pam_only = StreamHead(2, attention=["pam"], pam_impl="plain")
        assert pam_only.cam is None and pam_only.pam.impl == "plain"
        with pytest.raises(ValueError, match="attention"):
            StreamHead(2, attention=("pam", "sam"))


def test_spineone_input_and_argument_checks():
    net = SpineOne(streams(disc=3), backbone_depth=18)
    with pytest.raises(ValueError, match="batch of at least 2"):
        net(torch.randn(1, 7, 64, 64))
    assert tuple(net(torch.randn(2, 7, 64, 64)).shape) == (2, 10, 16, 16)  # training mode, batch 2
    net.eval()
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.randn(1, 7, 40, 64))
    with pytest.raises(ValueError, match="expects input"):
        net(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="at least one stream"):
        SpineOne({}, backbone_depth=18)
    with pytest.raises(ValueError, match="levels"):  # streams have one meaning: {name: {levels, classes}}
        SpineOne({"disc": 3}, backbone_depth=18)
    with pytest.raises(ValueError, match="depth"):
        SpineOne(streams(disc=3), backbone_depth=42)


def test_scripted_equals_eager():
    torch.manual_seed(0)
    net = SpineOne(streams(disc=2, vertebra=2), backbone_depth=18)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (PositionAttention, ChannelAttention)):
                module.gamma.fill_(0.5)
    net.eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 7, 64, 64)
    with torch.no_grad():
        eager, script_out = net(x), scripted(x)
    assert tuple(script_out.shape) == (1, 14, 16, 16)
    torch.testing.assert_close(script_out, eager, atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception, match="multiples of 16"):
        scripted(torch.randn(1, 7, 48, 40))


# ---------------------------------------------------------------- attention under bfloat16


def test_blocked_attention_in_float32_equals_plain_softmax_attention():
    """Blocks of queries (also a ragged last block) give exactly the one-shot softmax(q k^T) v."""
    from bundle.networks.attention import blocked_attention

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 70, c, generator=gen) for c in (4, 4, 32))
    ref = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v)
    for block in (1, 16, 64, 70, 128):
        torch.testing.assert_close(blocked_attention(q, k, v, torch.float32, block), ref, atol=1e-5, rtol=1e-5)


def test_fused_pam_under_bf16_autocast_runs_blocked_and_stays_close_to_fp32(monkeypatch):
    """Under CPU bf16 autocast without gradients, where the kernel probe finds it faster, the fused PAM uses the
    blocked attention (no flash kernel, no N x N matrix); it stays as close to the float32 plain PAM as the flash
    kernel's own bf16 path, which gradient mode keeps. (Most of the difference is the bf16 rounding of q, k and v
    by the 1x1 convolutions.)"""
    from bundle.networks import attention

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    monkeypatch.setattr(attention, "_kernel_choices", {})  # a probe that finds the blocked form faster
    monkeypatch.setattr(attention, "attention_kernel_seconds", lambda *shape: {"blocked": 0.1, "flash": 0.2})
    plain = _randomise(PositionAttention(64, "plain"), seed=6, gamma=1.1)
    fused = PositionAttention(64, "fused")
    fused.load_state_dict(plain.state_dict())
    # bfloat16 input, as the decoder hands it over under autocast; the reference sees the same values
    x = (0.3 * torch.randn(1, 64, 24, 20)).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = plain(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
            got = fused(x)
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in ops and "aten::bmm" in ops
    assert got.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
        flash = fused(x)
        flash.float().sum().backward()
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in {event.key for event in prof.key_averages()}
    err, err_flash = float((got.float() - ref).abs().max()), float((flash.detach().float() - ref).abs().max())
    assert err < 0.05 * float(ref.std()) and err <= 1.5 * err_flash + 1e-3, (err, err_flash)


def test_cam_stays_float32_under_bf16_autocast():
    cam = ChannelAttention()
    with torch.no_grad():
        cam.gamma.fill_(0.6)
    x = torch.randn(2, 8, 6, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = cam(x.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, cam(x.bfloat16().float()), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl, bf16", [("plain", False), ("fused", False), ("fused", True)])
def test_pam_attend_on_a_share_of_the_queries_equals_those_rows(monkeypatch, impl, bf16):
    """``attend`` on the first rows of the queries (as the precision probe times it) gives exactly those
    columns of the full attention, on each kernel path (plain, SDPA, blocked under bf16 autocast)."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})  # no AMX: blocked in bf16
    pam = PositionAttention(32, impl)
    gen = torch.Generator().manual_seed(7)
    q, k = (torch.randn(1, 4, 90, generator=gen) for _ in range(2))
    v = torch.randn(1, 32, 90, generator=gen)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), context:
        full, part = pam.attend(q, k, v), pam.attend(q[:, :, :20], k, v)
    assert tuple(part.shape) == (1, 32, 20)
    torch.testing.assert_close(part, full[:, :, :20], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "dilation, shape",
    [(1, (2, 16, 9, 7)), (2, (1, 16, 9, 7)), (6, (2, 8, 10, 12)), (12, (1, 8, 5, 6)), (4, (2, 8, 5, 9))],
)
def test_atrous_gemm_equals_conv2d(dilation, shape):
    """One product per tap on the pixels it reads inside the map gives F.conv2d's dilated 3 x 3 'same'
    convolution, also when a tap reaches past the map on one axis only or wholly (taps in the padding), for
    channels_last and NCHW input, without a bias, and with precomputed tap matrices."""
    from bundle.networks.deeplab import atrous_conv3x3_gemm, atrous_taps

    gen = torch.Generator().manual_seed(dilation)
    x = torch.randn(shape, generator=gen)
    weight, bias = torch.randn(5, shape[1], 3, 3, generator=gen), torch.randn(5, generator=gen)
    for b in (bias, None):
        ref = F.conv2d(x, weight, b, padding=dilation, dilation=dilation)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            got = atrous_conv3x3_gemm(inp, weight, b, dilation)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        taps = atrous_taps(weight, torch.float32)
        assert tuple(taps.shape) == (9, 5, shape[1]) and torch.equal(taps[5], weight[:, :, 1, 2])
        torch.testing.assert_close(atrous_conv3x3_gemm(x, weight * 0, b, dilation, taps), ref, atol=1e-5, rtol=1e-5)


def test_atrous_conv_bf16_taps_follow_the_weight():
    """The cached bf16 tap matrices are not state, are left out of copies, and are re-made after an in-place
    update of the weight and after load_state_dict: the bf16 path keeps following F.conv2d."""
    import copy

    from bundle.networks.deeplab import AtrousConv2d

    torch.manual_seed(3)
    conv = AtrousConv2d(16, 8, 3, padding=2, dilation=2, bias=False).eval()
    x = torch.randn(1, 16, 9, 10).contiguous(memory_format=torch.channels_last)

    def bf16_error() -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = conv(x)
        ref = F.conv2d(x, conv.weight.detach(), None, padding=2, dilation=2)
        return float((got.float() - ref).abs().max() / ref.abs().max())

    assert bf16_error() < 0.02 and "_bf16_taps" in conv.__dict__
    assert set(conv.state_dict()) == {"weight"} and "_bf16_taps" not in copy.deepcopy(conv).__dict__
    with torch.no_grad():
        conv.weight.mul_(-3.0)
    assert bf16_error() < 0.02
    conv.load_state_dict({"weight": torch.randn(8, 16, 3, 3)})
    assert bf16_error() < 0.02


def test_aspp_concatenation_keeps_channels_last():
    """The image-pooling branch hands a channels_last map on for channels_last input (an expanded 1 x 1 map
    has no memory format and turned the concatenation, and the projection's input, into NCHW)."""
    aspp = ASPP(16, 8).eval()
    x = torch.randn(2, 16, 6, 5)
    with torch.no_grad():
        ref = aspp(x)
        xc = x.contiguous(memory_format=torch.channels_last)
        pooled = aspp.branches[-1](xc)
        feats = torch.cat([branch(xc) for branch in aspp.branches], dim=1)
        got = aspp(xc)
    assert pooled.is_contiguous(memory_format=torch.channels_last) and tuple(pooled.shape) == (2, 8, 6, 5)
    assert feats.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_atrous_conv_bf16_path_and_folding():
    """AtrousConv2d is Conv2d in float32; under CPU bf16 inference it runs the product form (no oneDNN
    convolution) within the bf16 convolution's own error; BatchNorm folding keeps the class."""
    from bundle.networks import fuse_for_inference
    from bundle.networks.deeplab import ASPP, AtrousConv2d

    torch.manual_seed(8)
    conv = AtrousConv2d(32, 16, 3, padding=3, dilation=3, bias=True).eval()
    x = torch.randn(1, 32, 14, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = F.conv2d(x, conv.weight, conv.bias, padding=3, dilation=3)
        torch.testing.assert_close(conv(x), ref)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
            got = conv(x)
            plain_bf16 = F.conv2d(x, conv.weight, conv.bias, padding=3, dilation=3)
    assert got.dtype == torch.bfloat16 and tuple(got.shape) == tuple(ref.shape)
    assert sum(e.count for e in prof.key_averages() if e.key == "aten::convolution") == 1  # the reference only
    err, err_conv = float((got.float() - ref).abs().max()), float((plain_bf16.float() - ref).abs().max())
    assert err <= 2.0 * err_conv + 1e-3, (err, err_conv)
    aspp = ASPP(32, 16).eval()
    folded = fuse_for_inference(aspp)
    assert isinstance(folded.branches[1][0], AtrousConv2d) and isinstance(folded.branches[1][1], torch.nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), aspp(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("blocked_seconds", [0.1, 0.3])
def test_fused_pam_keeps_the_flash_kernel_in_bf16_with_amx(monkeypatch, blocked_seconds):
    """With AMX the bf16 flash kernel is the fast one: inference under bf16 autocast keeps SDPA (no blocked
    attention, no probe); without AMX the kernel the probe times faster runs. Both stay within the blocked
    form's tolerance of the fp32 plain PAM."""
    from bundle.networks import attention

    plain = _randomise(PositionAttention(64, "plain"), seed=6, gamma=1.1)
    fused = PositionAttention(64, "fused")
    fused.load_state_dict(plain.state_dict())
    x = (0.3 * torch.randn(1, 64, 24, 20)).bfloat16().contiguous(memory_format=torch.channels_last)
    probed = []

    def kernel_seconds(*shape):
        probed.append(shape)
        return {"blocked": blocked_seconds, "flash": 0.2}

    monkeypatch.setattr(attention, "attention_kernel_seconds", kernel_seconds)
    monkeypatch.setattr(attention, "_kernel_choices", {})
    for caps, blocked in (({"amx_bf16": True}, False), ({"avx512_bf16": True}, blocked_seconds < 0.2)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert attention.blocked_for_bf16(24 * 20, 8, 64) is blocked
        assert len(probed) == (0 if "amx_bf16" in caps else 1)  # AMX: no probe; else one, cached
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
            got = fused(x)
        flash = "aten::_scaled_dot_product_flash_attention_for_cpu" in {e.key for e in prof.key_averages()}
        assert flash is not blocked and got.dtype == torch.bfloat16
        with torch.no_grad():
            ref = plain(x.float())
        assert float((got.float() - ref).abs().max()) < 0.05 * float(ref.std())


def test_attention_kernel_probe_times_both_kernels_and_is_cached_per_thread_count(monkeypatch):
    from bundle.networks import attention

    seconds = attention.attention_kernel_seconds(300, 8, 64, repeats=1)
    assert set(seconds) == {"blocked", "flash"} and all(0 < v < 5 for v in seconds.values())
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    monkeypatch.setattr(attention, "_kernel_choices", {})
    calls = []
    monkeypatch.setattr(attention, "attention_kernel_seconds", lambda *a: calls.append(a) or {"blocked": 1, "flash": 2})
    assert attention.blocked_for_bf16(300, 8, 64) and attention.blocked_for_bf16(300, 8, 64) and len(calls) == 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        attention.blocked_for_bf16(300, 8, 64)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 2  # another thread count: probed again
