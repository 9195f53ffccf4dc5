"""A fused Triton decode kernel: read the bit-packed codes, dequantize in registers, attend.

One program per (sequence, KV head) walks the quantized past in blocks of ``BLOCK_N`` tokens with an
online softmax (flash-decoding style); the few full-precision recent tokens are merged in PyTorch with
the kernel's running max and sum. Used on GPUs for single-token decode steps without padding; its
correctness is tested on the CPU with ``TRITON_INTERPRET=1``. 3-bit codes (two bit planes) and padded
batches use the PyTorch path in :mod:`kvforge.quant.attention`.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: GPUs, or the CPU interpreter in tests
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None

KERNEL_BITS = (2, 4, 8)


def available(device: torch.device) -> bool:
    """True where the kernel can run: triton installed and a CUDA device, or the interpreter forced on."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _codes(ptr, rows, row_stride, D: tl.constexpr, W: tl.constexpr, nmask):
        """[BLOCK_N, D] codes of ``W``-bit values packed as 8/W contiguous channel slices per byte."""
        PER: tl.constexpr = 8 // W
        N: tl.constexpr = D // PER
        d = tl.arange(0, D)
        byte = tl.load(ptr + rows[:, None] * row_stride + (d % N)[None, :], mask=nmask[:, None], other=0)
        return ((byte.to(tl.int32) >> ((d // N) * W)[None, :]) & ((1 << W) - 1)).to(tl.float32)

    @triton.jit
    def _decode_kernel(Q, KC, KS, KZ, VC, VS, VZ, OUT, MX, LX, T, M,
                       D: tl.constexpr, KW: tl.constexpr, VW: tl.constexpr, G: tl.constexpr, GV: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        bh = tl.program_id(0)
        KB: tl.constexpr = D * KW // 8
        VB: tl.constexpr = D * VW // 8
        C: tl.constexpr = D // GV
        offs_m = tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        mmask = offs_m < M
        q = tl.load(Q + bh * M * D + offs_m[:, None] * D + d[None, :], mask=mmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        ngroups = T // G
        for start in range(0, T, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            nmask = rows < T
            kc = _codes(KC + bh * T * KB, rows, KB, D, KW, nmask)
            g = rows // G
            sidx = bh * ngroups * D + g[:, None] * D + d[None, :]
            ks = tl.load(KS + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
            kz = tl.load(KZ + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
            k = kc * ks + kz  # [BLOCK_N, D]
            s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N]
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vc = _codes(VC + bh * T * VB, rows, VB, D, VW, nmask)
            vidx = bh * T * C + rows[:, None] * C + (d // GV)[None, :]
            vs = tl.load(VS + vidx, mask=nmask[:, None], other=0.0).to(tl.float32)
            vz = tl.load(VZ + vidx, mask=nmask[:, None], other=0.0).to(tl.float32)
            v = vc * vs + vz
            acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new
        tl.store(OUT + bh * M * D + offs_m[:, None] * D + d[None, :], acc, mask=mmask[:, None])
        tl.store(MX + bh * M + offs_m, m_i, mask=mmask)
        tl.store(LX + bh * M + offs_m, l_i, mask=mmask)


def supports(view, query: torch.Tensor, attention_mask) -> bool:
    cfg = view.layer.config
    d = query.shape[-1]
    return (query.shape[2] == 1 and cfg.key_bits in KERNEL_BITS and cfg.value_bits in KERNEL_BITS
            and view.quantized_tokens > 0 and d >= 16 and d & (d - 1) == 0
            and (attention_mask is None or bool(attention_mask.all())) and available(query.device))


def fused_decode(query: torch.Tensor, view, scaling: float, block_n: int = 64) -> torch.Tensor:
    """One decode step, ``query [B, Hq, 1, D]`` -> ``[B, 1, Hq, D]``, exact up to float rounding."""
    layer = view.layer
    cfg = layer.config
    b, hq, _, d = query.shape
    h = view.recent_k.shape[1]
    m = hq // h
    q = query.float().reshape(b, h, m, d) * scaling
    if layer.rot is not None:
        q = q @ layer.rot
    t = view.quantized_tokens
    block_n = max(16, min(block_n, triton.next_power_of_2(t)))
    q = q.contiguous()
    out = torch.empty(b, h, m, d, device=q.device, dtype=torch.float32)
    mx = torch.empty(b, h, m, device=q.device, dtype=torch.float32)
    lx = torch.empty_like(mx)
    _decode_kernel[(b * h,)](
        q, view.k_codes.contiguous(), view.k_scale.contiguous(), view.k_zero.contiguous(), view.v_codes.contiguous(),
        view.v_scale.contiguous(), view.v_zero.contiguous(), out, mx, lx, t, m,
        D=d, KW=cfg.key_bits, VW=cfg.value_bits, G=cfg.key_group, GV=cfg.value_group, BLOCK_N=block_n,
        BLOCK_M=max(16, triton.next_power_of_2(m)))
    # merge the full-precision recent tokens
    s = q @ view.recent_k.float().transpose(-1, -2)  # [B, H, M, R]
    m_all = torch.maximum(mx, s.amax(-1))
    a = torch.exp(mx - m_all)
    p = torch.exp(s - m_all[..., None])
    o = (out * a[..., None] + p @ view.recent_v.float()) / (lx * a + p.sum(-1))[..., None]
    if layer.rotates_values:
        o = o @ layer.rot.T
    return o.reshape(b, hq, 1, d).transpose(1, 2).to(query.dtype)
