"""Numeric precision of the network's forward pass: ``"auto"``, ``"fp32"``, ``"bf16"`` or (CUDA only) ``"fp16"``.

The configs' ``precision`` (inference, validation) and ``train_precision`` (training) name one of these;
:class:`AutocastInferer` runs the wrapped inferer under ``torch.autocast`` with the resolved dtype and
returns float32, so decoding (Hough voting, peaks, refinement) and the loss always see float32.

``"auto"`` on a CPU picks bfloat16 only where the CPU has bfloat16 matrix instructions (AMX-BF16 or
AVX512-BF16 on x86, BF16 on ARM, as ``torch.cpu.get_capabilities()`` reports them) *and* a short probe
(a matrix product and a 3 x 3 convolution, a few milliseconds each, once per process) runs faster in
bfloat16 than in float32; float32 otherwise. On CUDA ``"auto"`` picks bfloat16 where the GPU supports it.
The choice is logged once per process and device kind.
"""

from __future__ import annotations

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
    "cpu_bf16_support",
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


@functools.lru_cache(maxsize=None)
def _auto_cpu() -> tuple[torch.dtype | None, str]:
    """The ``"auto"`` dtype on this CPU and the reason (cached: the probe runs once per process)."""
    flag = cpu_bf16_support()
    if flag is None:
        return None, "the CPU reports no bfloat16 matrix instructions"
    probe = bf16_probe()
    if probe["speedup"] * PROBE_MARGIN > 1.0:
        return torch.bfloat16, f"{flag} present and the probe ran bf16 {probe['speedup']:.2f}x faster than fp32"
    return None, f"{flag} present but the probe ran bf16 only {probe['speedup']:.2f}x as fast as fp32"


def _log_once(device_type: str, name: str, reason: str) -> None:
    if (device_type, name) not in _logged:
        _logged.add((device_type, name))
        logger.info(f"precision on {device_type}: {name} ({reason})")


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: None means float32 (no autocast).

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
        dtype, reason = _auto_cpu()
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

    def dtype_for(self, device: torch.device | str) -> torch.dtype | None:
        """The autocast dtype used on ``device`` (None: float32)."""
        device_type = torch.device(device).type
        if device_type not in self._dtypes:
            self._dtypes[device_type] = resolve_precision(self.precision, device_type)
        return self._dtypes[device_type]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``inputs`` (B, C, H, W) on the network's device -> the wrapped inferer's output, float32."""
        dtype = self.dtype_for(inputs.device)
        if dtype is None:
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast(device_type=inputs.device.type, dtype=dtype):
            out = self.inferer(inputs, network, *args, **kwargs)
        return _to_float(out)
