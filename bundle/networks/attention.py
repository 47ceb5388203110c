"""DANet attention modules (Fu et al. 2019): position attention (PAM) and channel attention (CAM).

Both map a feature map ``x`` of shape (B, C, H, W) to ``gamma * attended + x`` with a learnt scalar
``gamma`` initialised to 0, so a freshly built module is the identity. MONAI's ``SpatialAttentionBlock``
is not used because it differs from DANet's PAM (no C/8 query/key reduction, no zero-init gamma,
extra GroupNorm).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PositionAttention", "ChannelAttention", "PAM_IMPLS", "blocked_attention"]

PAM_IMPLS = ("plain", "fused")
#: queries per block of :func:`blocked_attention` (64 x N energies: 4 MiB in float32 at N = 16384);
#: 64 was the fastest of 16-128 measured at N = 16384 on an AVX512-BF16 CPU, one thread
QUERY_BLOCK = 64


#: queries timed per kernel by :func:`blocked_for_bf16`'s probe (a share of the work at the real key count)
PROBE_ROWS = 256
_kernel_choices: dict[tuple[int, int, int, int], bool] = {}


def blocked_for_bf16(n: int = 16384, key_channels: int = 8, channels: int = 64) -> bool:
    """Whether CPU bfloat16 inference runs :func:`blocked_attention` rather than the SDPA flash kernel for
    ``n`` positions. With AMX (``torch.cpu.get_capabilities()``) the flash kernel's bfloat16 tiles are fast
    (0.24 s against 0.71 s in float32 and 0.72 s blocked, N = 25600, two threads): flash, no probe. Without
    AMX neither wins everywhere (AVX512-BF16, N = 16384: blocked 0.58 s against flash 0.86 s at one thread,
    but 0.69 s against 0.46 s at two, where the blocked form's small products do not scale), so a probe
    times both on :data:`PROBE_ROWS` queries against ``n`` keys, once per process, shape and thread count."""
    try:
        if torch.cpu.get_capabilities().get("amx_bf16") is True:
            return False
    except (AttributeError, RuntimeError):  # an older torch without the public query: probe
        pass
    key = (int(n), int(key_channels), int(channels), torch.get_num_threads())
    if key not in _kernel_choices:
        seconds = attention_kernel_seconds(*key[:3])
        _kernel_choices[key] = seconds["blocked"] < seconds["flash"]
    return _kernel_choices[key]


def attention_kernel_seconds(n: int, key_channels: int, channels: int, repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` seconds (after a warm-up) of :data:`PROBE_ROWS` bfloat16 queries against ``n`` keys by
    :func:`blocked_attention` and by the flash kernel (q, k zero-padded to ``channels``, as
    :meth:`PositionAttention.attend` calls it): ``{"blocked", "flash"}``."""
    rows = min(PROBE_ROWS, n)
    q = torch.randn(1, rows, key_channels, dtype=torch.bfloat16)
    k = torch.randn(1, n, key_channels, dtype=torch.bfloat16)
    v = torch.randn(1, n, channels, dtype=torch.bfloat16)
    qp, kp = (F.pad(t, (0, channels - key_channels)).unsqueeze(1) for t in (q, k))
    kernels = {
        "blocked": lambda: blocked_attention(q, k, v, torch.bfloat16),
        "flash": lambda: F.scaled_dot_product_attention(qp, kp, v.unsqueeze(1), scale=1.0),
    }
    out = {}
    with torch.no_grad():
        for name, run in kernels.items():
            run()
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - start)
            out[name] = best
    return out


def _bf16_cpu(x: torch.Tensor) -> bool:
    """True when ``x`` is a bfloat16 CPU tensor or a CPU autocast region asks for bfloat16."""
    if x.device.type != "cpu":
        return False
    return x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.bfloat16, block: int = QUERY_BLOCK
) -> torch.Tensor:
    """Exact unscaled softmax attention ``softmax(q k^T) v`` one block of queries at a time, no autograd.

    q: (B, Nq, Ck), k: (B, N, Ck), v: (B, N, C) -> (B, Nq, C) float32. Energies ``q k^T`` and their row maximum
    are computed in float32 (q, k are cast up: with Ck = C / 8 this product is cheap); ``energy - max`` (<= 0) is then
    rounded to ``dtype``, exponentiated in place and multiplied with ``v`` in ``dtype``; each row is divided
    by the sum of its rounded weights. Rounding after the max subtraction keeps the absolute error of every
    weight below ``exp(-1) 2^-9`` (bfloat16) of the largest, much as the flash kernel's own rounding of its
    probabilities. Only ``block`` x N energies exist at a time. With ``dtype=torch.float32`` it is the plain
    attention in float32 (the tests compare both).
    """
    b, n, _ = q.shape  # n queries (the keys' count may differ: k.shape[1])
    q, kt = q.float(), k.float().transpose(1, 2).contiguous()
    values = v.to(dtype)
    out = torch.empty(b, n, v.shape[-1], dtype=torch.float32, device=v.device)
    energy = torch.empty(b, min(block, n), k.shape[1], device=v.device)
    weights = torch.empty(b, min(block, n), k.shape[1], dtype=dtype, device=v.device)
    for start in range(0, n, block):
        m = min(block, n - start)
        e = torch.bmm(q[:, start : start + m], kt, out=energy[:, :m])
        w = torch.sub(e, e.amax(dim=-1, keepdim=True), out=weights[:, :m]).exp_()
        total = w.sum(dim=-1, keepdim=True, dtype=torch.float32)
        torch.div(torch.bmm(w, values), total, out=out[:, start : start + m])
    return out


class PositionAttention(nn.Module):
    """DANet position attention module (PAM) on a (B, C, H, W) map, N = H * W positions.

    ``Q = query(x)``, ``K = key(x)`` (C // 8 channels each), ``V = value(x)`` (C channels), all 1x1
    convolutions with bias, flattened to (B, ., N). ``energy = Q^T K`` (B, N, N), unscaled;
    ``A = softmax(energy)`` over keys (last dim); ``out = V A^T`` (B, C, N); result ``gamma * out + x``.

    Args:
        channels: C, the input and output channels (at least 8).
        impl: ``"plain"`` materialises the N x N attention (O(N^2) memory: 1 GiB in float32 at 128 x 128);
            ``"fused"`` calls ``scaled_dot_product_attention(q, k, v, scale=1.0)`` with q and k zero-padded
            from C // 8 to C channels (q . k is unchanged, and equal head widths let a fused flash /
            memory-efficient kernel run), so the N x N matrix is never stored. Both agree to ~1e-5 in float32.
            Under CPU bfloat16 (autocast or bfloat16 input) without gradients on a CPU without AMX, ``"fused"``
            runs :func:`blocked_attention` instead where a one-off probe finds it faster than the flash kernel
            at that size and thread count (:func:`blocked_for_bf16`).

    Example:
        >>> pam = PositionAttention(64)
        >>> x = torch.randn(2, 64, 16, 12)
        >>> bool(torch.equal(pam(x), x))  # gamma starts at 0
        True
    """

    def __init__(self, channels: int, impl: str = "fused") -> None:
        super().__init__()
        if channels < 8:
            raise ValueError(f"PositionAttention needs channels >= 8 (query/key use channels // 8), got {channels}")
        if impl not in PAM_IMPLS:
            raise ValueError(f"impl must be one of {PAM_IMPLS}, got {impl!r}")
        self.channels = int(channels)
        self.key_channels = int(channels) // 8
        self.impl = impl
        self.query = nn.Conv2d(channels, self.key_channels, kernel_size=1)
        self.key = nn.Conv2d(channels, self.key_channels, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        n = h * w
        q = self.query(x).reshape(b, self.key_channels, n)
        k = self.key(x).reshape(b, self.key_channels, n)
        v = self.value(x).reshape(b, c, n)
        out = self.attend(q, k, v)
        # gamma in the branch's dtype: a float32 gamma would promote a bfloat16 map to float32
        return self.gamma.to(out.dtype) * out.reshape(b, c, h, w) + x

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``V softmax(Q^T K)^T`` for queries q (B, C // 8, Nq), keys k (B, C // 8, N), values v (B, C, N)
        -> (B, C, Nq), by the kernel ``impl`` and the precision select (Nq = N in :meth:`forward`; fewer
        queries time a share of the work, as :func:`bundle.precision.network_probe` does)."""
        if not torch.jit.is_scripting():  # not compiled by TorchScript: exports keep the SDPA path
            if (
                self.impl == "fused"
                and not torch.is_grad_enabled()
                and _bf16_cpu(v)
                and blocked_for_bf16(k.shape[-1], k.shape[1], v.shape[1])
            ):
                # (B, N, .) views of q, k, v are copy-free for channels_last maps
                attended = blocked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), torch.bfloat16)
                return attended.to(v.dtype).transpose(1, 2)  # (B, C, Nq)
        if self.impl == "fused":
            # (B, 1, N, C) layout for SDPA; the fused kernels need stride 1 on the last dim, hence the pad
            # (which copies) for q, k and .contiguous() for v.
            pad = v.shape[1] - self.key_channels
            qp = F.pad(q.transpose(1, 2), (0, pad)).unsqueeze(1)
            kp = F.pad(k.transpose(1, 2), (0, pad)).unsqueeze(1)
            vt = v.transpose(1, 2).contiguous().unsqueeze(1)
            out = F.scaled_dot_product_attention(qp, kp, vt, scale=1.0)  # (B, 1, Nq, C)
            return out.squeeze(1).transpose(1, 2)  # (B, C, Nq)
        energy = torch.bmm(q.transpose(1, 2), k)  # (B, Nq, N): energy[i, j] = q_i . k_j
        attention = torch.softmax(energy, dim=-1)
        return torch.bmm(v, attention.transpose(1, 2))  # (B, C, Nq): out[:, i] = sum_j A[i, j] v_j

    def extra_repr(self) -> str:
        return f"channels={self.channels}, impl={self.impl!r}"


class ChannelAttention(nn.Module):
    """DANet channel attention module (CAM), parameter-free apart from ``gamma``.

    With ``X`` = x flattened to (B, C, N): ``energy = X X^T`` (B, C, C),
    ``energy_new = max(energy, dim=-1) - energy``, ``A = softmax(energy_new, dim=-1)``,
    ``out = A X`` reshaped to (B, C, H, W); result ``gamma * out + x``.

    Example:
        >>> cam = ChannelAttention()
        >>> x = torch.randn(2, 64, 16, 12)
        >>> bool(torch.equal(cam(x), x))  # gamma starts at 0
        True
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W), always in float32 (also under autocast)."""
        if not torch.jit.is_scripting():  # TorchScript has no autocast with a run-time device
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.float())
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 throughout: the energies are sums of N squares, too large for bfloat16's 8-bit mantissa
        # once ``max - energy`` is taken; the C x C products are a negligible share of the network's work
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        energy = torch.bmm(flat, flat.transpose(1, 2))  # (B, C, C)
        energy_new = torch.amax(energy, dim=-1, keepdim=True) - energy
        attention = torch.softmax(energy_new, dim=-1)
        out = torch.bmm(attention, flat).reshape(b, c, h, w)
        return self.gamma * out + x
