"""Numeric precision of the network's forward pass: ``"auto"``, ``"fp32"``, ``"bf16"`` or (CUDA only) ``"fp16"``.

The configs' ``precision`` (inference, validation) and ``train_precision`` (training) name one of these;
:class:`AutocastInferer` runs the wrapped inferer under ``torch.autocast`` with the resolved dtype and
returns float32, so decoding (Hough voting, peaks, refinement) and the loss always see float32.

``"auto"`` on a CPU picks bfloat16 only where the CPU has bfloat16 matrix instructions (AMX-BF16 or
AVX512-BF16 on x86, BF16 on ARM, as ``torch.cpu.get_capabilities()`` reports them) *and* a short probe
runs faster in bfloat16 than in float32; float32 otherwise. For inference (the network in eval mode)
:class:`AutocastInferer` probes the network it runs, at the input's size (:func:`network_probe`: the
network at a small size plus a share of each position attention's work at the real size); elsewhere the
probe is a matrix product and a 3 x 3 convolution (:func:`bf16_probe`). Each probe runs once per process
(per network and input shape). On CUDA ``"auto"`` picks bfloat16 where the GPU supports it. The choice is
logged once per process and device kind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.inferers import Inferer, SimpleInferer

__all__ = [
    "PRECISIONS",
    "AutocastInferer",
    "best_seconds",
    "bf16_probe",
    "choose_cpu_dtype",
    "cpu_bf16_support",
    "network_probe",
    "precision_name",
    "resolve_precision",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: CPU capability flags (``torch.cpu.get_capabilities()``) that mean bfloat16 matrix instructions
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")
#: bf16 must beat fp32 by this factor in the probe to be chosen (noise margin on a shared machine)
PROBE_MARGIN = 0.9
_logged: set[tuple[str, str]] = set()
#: ``"auto"`` choices from network probes, by :func:`_network_key`: one probe per process, architecture and shape
_network_choices: dict[tuple, tuple[torch.dtype | None, str]] = {}


def precision_name(dtype: torch.dtype | None) -> str:
    """``"fp32"`` for None (no autocast), else ``"bf16"`` / ``"fp16"``."""
    return next(name for name, value in _DTYPES.items() if value == dtype)


def cpu_bf16_support() -> str | None:
    """The first CPU flag of :data:`BF16_CPU_FLAGS` that ``torch.cpu.get_capabilities()`` reports, or None."""
    try:
        caps: Mapping[str, Any] = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # an older torch without the public query: assume none
        return None
    return next((flag for flag in BF16_CPU_FLAGS if caps.get(flag) is True), None)


def best_seconds(fn: Callable[[], Any], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Smallest time (s on ``clock``: wall by default, ``time.process_time`` for this process's CPU time) of
    ``repeats`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def bf16_probe(n: int = 384, side: int = 32, channels: int = 64, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` seconds of an n x n matrix product and a 3 x 3 ``channels`` convolution on a
    ``side`` x ``side`` channels_last map, in float32 and in bfloat16, at the process's thread count (a library
    call never changes it: concurrent requests of a server share it): about 1 ms each.

    Returns ``{"fp32_seconds", "bf16_seconds", "speedup"}`` (sums over the two operations; speedup = fp32 / bf16).
    """
    seconds = _probe_seconds(n, side, channels, repeats)  # at the process's thread count: never changes it
    return {
        "fp32_seconds": seconds["fp32"],
        "bf16_seconds": seconds["bf16"],
        "speedup": seconds["fp32"] / seconds["bf16"],
    }


def _probe_seconds(n: int, side: int, channels: int, repeats: int) -> dict[str, float]:
    with torch.inference_mode():
        seconds = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(n, n, dtype=dtype)
            conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(dtype=dtype)
            conv = conv.to(memory_format=torch.channels_last)
            x = torch.randn(1, channels, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
            _ = a @ a, conv(x)  # warm-up: oneDNN primitive creation, weight reorders
            seconds[name] = best_seconds(lambda: a @ a, repeats) + best_seconds(lambda: conv(x), repeats)
    return seconds


def _autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _small_forward(network: torch.nn.Module, x: torch.Tensor, pams: list, repeats: int) -> tuple[float, list, list]:
    """Best-of-``repeats`` seconds of ``network(x)`` after a warm-up, with the seconds spent in each module of
    ``pams`` during that run and the (H, W) map each saw."""
    stamps: dict[int, float] = {}
    spent, shapes = [0.0] * len(pams), [(0, 0)] * len(pams)

    def enter(i: int) -> Callable:
        return lambda module, args: stamps.__setitem__(i, time.perf_counter())

    def leave(i: int) -> Callable:
        def hook(module, args, output) -> None:
            spent[i] += time.perf_counter() - stamps[i]
            shapes[i] = tuple(args[0].shape[-2:])

        return hook

    handles = [p.register_forward_pre_hook(enter(i)) for i, p in enumerate(pams)]
    handles += [p.register_forward_hook(leave(i)) for i, p in enumerate(pams)]
    try:
        network(x)  # warm-up: oneDNN primitives, weight reorders
        best, best_spent = float("inf"), list(spent)
        for _ in range(repeats):
            spent[:] = [0.0] * len(pams)
            start = time.perf_counter()
            network(x)
            if time.perf_counter() - start < best:
                best, best_spent = time.perf_counter() - start, list(spent)
    finally:
        for handle in handles:
            handle.remove()
    return best, best_spent, shapes


def _attention_share(pam: torch.nn.Module, n: int, rows: int, dtype: torch.dtype, repeats: int) -> float:
    """Seconds of ``pam.attend`` for ``rows`` queries against ``n`` keys in ``dtype`` (channels_last-like
    (B, ., N) views, as the network's 1 x 1 convolutions give them), best of ``repeats`` after a warm-up."""
    q = torch.randn(1, rows, pam.key_channels, dtype=dtype).transpose(1, 2)
    k = torch.randn(1, n, pam.key_channels, dtype=dtype).transpose(1, 2)
    v = torch.randn(1, n, pam.channels, dtype=dtype).transpose(1, 2)
    pam.attend(q, k, v)
    return best_seconds(lambda: pam.attend(q, k, v), repeats)


def network_probe(
    network: torch.nn.Module,
    shape: tuple[int, ...],
    sizes: tuple[int, int] = (64, 128),
    rows: int = 512,
    repeats: int = 3,
) -> dict[str, Any]:
    """Estimated forward seconds of ``network`` (eval mode) on a (B, C, H, W) ``shape`` input, in float32 and
    under bfloat16 autocast, at the process's thread count (never changed).

    The network runs on 1 x C x s x s inputs for both ``sizes`` s (capped at H, W; best of ``repeats`` after a
    warm-up). Its time outside the position attention modules (:class:`bundle.networks.PositionAttention`)
    is fitted as a fixed cost per forward (autocast's weight casts, per-operation overheads) plus a cost per
    pixel, and extrapolated to B x H x W pixels. The attention, whose work grows with N^2, is timed at the
    real N (positions of its map at H x W) for ``rows`` queries (enough blocks for every thread of the
    kernels) and scaled by B N / rows. Every timing is the best of ``repeats`` after a warm-up: the fit
    extrapolates the difference between the two sizes' times (about 21x from 64 and 128 to 512 x 512), so one
    slow call (another process on a 2-core machine) taken alone could flip the choice. Cost: 16 small forwards
    and 16 attention shares, a one-off of about 0.6 s for SpineOne R50 at 512 x 512 on a quiet 2-core AMX
    machine (see docs/performance.md).

    Returns ``{"fp32_seconds", "bf16_seconds", "speedup", "probe": "network"}`` and the parts of each estimate
    (``fixed_*``, ``per_pixel_*``, ``attention_*``).
    """
    b, c, h, w = shape
    from bundle.networks.attention import PositionAttention  # a network fact, read where it is defined

    pams = [m for m in network.modules() if isinstance(m, PositionAttention)]
    sides = sorted({(min(s, h), min(s, w)) for s in sizes})
    out: dict[str, Any] = {"probe": "network"}
    with torch.inference_mode():
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            with _autocast(dtype):
                rests, maps = [], []
                for side in sides:
                    x = torch.randn(1, c, *side).contiguous(memory_format=torch.channels_last)
                    total, spent, maps = _small_forward(network, x, pams, repeats)
                    rests.append(total - sum(spent))
                pixels = [sh * sw for sh, sw in sides]
                per_pixel = rests[-1] / pixels[-1]
                if len(sides) > 1:
                    per_pixel = max((rests[-1] - rests[0]) / (pixels[-1] - pixels[0]), 0.0)
                fixed = max(rests[-1] - per_pixel * pixels[-1], 0.0)
                attention = 0.0
                for pam, (mh, mw) in zip(pams, maps):  # maps seen at the largest side
                    n = max(1, round(mh * mw * h * w / pixels[-1]))
                    share = _attention_share(pam, n, min(rows, n), dtype or torch.float32, repeats)
                    attention += b * share * n / min(rows, n)
            out[f"fixed_{name}"], out[f"per_pixel_{name}"], out[f"attention_{name}"] = fixed, per_pixel, attention
            out[f"{name}_seconds"] = fixed + per_pixel * b * h * w + attention
    out["speedup"] = out["fp32_seconds"] / out["bf16_seconds"]
    return out


def choose_cpu_dtype(flag: str | None, probe: Callable[[], Mapping[str, float]]) -> tuple[torch.dtype | None, str]:
    """The issue's rule for ``"auto"`` on a CPU: bfloat16 only with a bfloat16 matrix ``flag`` (see
    :func:`cpu_bf16_support`) *and* a ``probe()`` speed-up (fp32 / bf16 seconds) above 1 / :data:`PROBE_MARGIN`;
    the probe runs only when the flag is there. Returns the dtype (None: float32) and the reason, for the log."""
    if flag is None:
        return None, "the CPU reports no bfloat16 matrix instructions"
    result = probe()
    what = result.get("probe", "op")
    if result["speedup"] * PROBE_MARGIN > 1.0:
        return torch.bfloat16, f"{flag} present and the {what} probe ran bf16 {result['speedup']:.2f}x faster than fp32"
    return None, f"{flag} present but the {what} probe ran bf16 only {result['speedup']:.2f}x as fast as fp32"


@functools.lru_cache(maxsize=None)
def _auto_cpu() -> tuple[torch.dtype | None, str]:
    """The ``"auto"`` dtype on this CPU by the operation probe, and the reason (cached: once per process)."""
    return choose_cpu_dtype(cpu_bf16_support(), bf16_probe)


def _auto_cpu_network(key: tuple, probe: Callable[[], Mapping[str, float]]) -> tuple[torch.dtype | None, str]:
    """The ``"auto"`` dtype by a network probe, cached under ``key``."""
    if key not in _network_choices:
        _network_choices[key] = choose_cpu_dtype(cpu_bf16_support(), probe)
    return _network_choices[key]


def _log_once(device_type: str, name: str, reason: str) -> None:
    if (device_type, name) not in _logged:
        _logged.add((device_type, name))
        logger.info(f"precision on {device_type}: {name} ({reason})")


def resolve_precision(
    precision: str,
    device: torch.device | str = "cpu",
    probe: Callable[[], Mapping[str, float]] | None = None,
    probe_key: tuple | None = None,
) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: None means float32 (no autocast).

    ``"auto"`` on a CPU runs ``probe`` (returning at least ``speedup``; cached per ``probe_key``) or, without
    one, :func:`bf16_probe` (cached), and applies :func:`choose_cpu_dtype`.

    Raises ValueError for an unknown name and for ``"fp16"`` off CUDA (CPU float16 matrix units are not
    targeted here: use ``"bf16"`` or ``"auto"``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device_type = torch.device(device).type
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device, got {device_type!r}: use 'bf16' or 'auto'")
    if precision != "auto":
        _log_once(device_type, precision, "configured")
        return _DTYPES[precision]
    if device_type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        reason = "the GPU supports bf16" if dtype is not None else "the GPU lacks bf16"
    elif device_type == "cpu":
        dtype, reason = _auto_cpu() if probe is None else _auto_cpu_network(probe_key or (id(probe),), probe)
    else:
        dtype, reason = None, f"no automatic choice for {device_type!r}"
    _log_once(device_type, precision_name(dtype), "auto: " + reason)
    return dtype


def _to_float(value: Any) -> Any:
    """Floating-point tensors (also inside mappings, lists and tuples) cast to float32; the rest unchanged."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return type(value)({k: _to_float(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float(v) for v in value)
    return value


def _network_key(network: torch.nn.Module, shape: tuple[int, ...]) -> tuple:
    """Cache key of a network probe: the network's class, parameter count and the input shape (a new
    evaluator on the same model, e.g. one per run, reuses the first probe's answer)."""
    return type(network).__qualname__, sum(p.numel() for p in network.parameters()), tuple(shape)


class AutocastInferer(Inferer):
    """Run ``inferer`` (default ``SimpleInferer``) under ``torch.autocast`` at ``precision``; outputs in float32.

    The dtype is resolved on the first call from the input's device (``"auto"``: see :func:`resolve_precision`)
    and kept. Autocast is entered around the network call only, so gradients flow as usual in training
    (backward runs outside the autocast region, as torch recommends) and whatever follows the inferer, the
    loss or the decoding, runs in float32.

    Example:
        >>> inferer = AutocastInferer("bf16")
        >>> out = inferer(torch.ones(1, 4), torch.nn.Linear(4, 2))
        >>> out.dtype
        torch.float32
    """

    def __init__(self, precision: str = "auto", inferer: Inferer | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.inferer = SimpleInferer() if inferer is None else inferer
        self._dtypes: dict[str, torch.dtype | None] = {}

    def dtype_for(
        self, device: torch.device | str, network: Any = None, shape: tuple[int, ...] | None = None
    ) -> torch.dtype | None:
        """The autocast dtype used on ``device`` (None: float32). ``"auto"`` on a CPU with an eval-mode
        ``network`` module and the input ``shape`` probes that network (:func:`network_probe`); otherwise
        (training: the attention runs the same kernel in both precisions there) the operation probe."""
        device_type = torch.device(device).type
        if device_type not in self._dtypes:
            probe, key = None, None
            use_network = isinstance(network, torch.nn.Module) and not network.training and shape is not None
            if self.precision == "auto" and device_type == "cpu" and use_network:
                probe, key = functools.partial(network_probe, network, tuple(shape)), _network_key(network, shape)
            self._dtypes[device_type] = resolve_precision(self.precision, device_type, probe, key)
        return self._dtypes[device_type]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``inputs`` (B, C, H, W) on the network's device -> the wrapped inferer's output, float32."""
        dtype = self.dtype_for(inputs.device, network, tuple(inputs.shape))
        if dtype is None:
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast(device_type=inputs.device.type, dtype=dtype):
            out = self.inferer(inputs, network, *args, **kwargs)
        return _to_float(out)
