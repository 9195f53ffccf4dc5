"""KIVI-layout affine quantization: keys per channel over groups of tokens, values per token over
groups of channels. Scales and zero points are stored in ``float16``; codes are bit-packed (see
:mod:`kvforge.quant.packing`). Optional orthogonal rotations spread outlier channels before quantizing.
"""

from __future__ import annotations

import math

import torch

from .packing import pack, unpack

_EPS = 1e-6


# range shrink factors tried per group by the clipping search (1.0 = plain min/max)
CLIP_RATIOS = (1.0, 0.92, 0.85, 0.78, 0.71, 0.64, 0.57)


def _affine(x: torch.Tensor, dim: int, bits: int, scale_dtype: torch.dtype, clip: bool = False):
    """Codes, scale, zero for ``x`` reduced over ``dim`` (kept as size 1).

    With ``clip``, each group's range is shrunk around its midpoint by the factor in ``CLIP_RATIOS`` that
    gives the smallest squared error (outliers are clamped instead of stretching every step); at 2-3
    bits this removes much of the error of min/max scaling.
    """
    qmax = (1 << bits) - 1
    lo = x.amin(dim, keepdim=True)
    hi = x.amax(dim, keepdim=True)
    if clip:
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        best_err, best_lo, best_hi = None, lo, hi
        for r in CLIP_RATIOS:
            clo, chi = mid - r * half, mid + r * half
            sc = ((chi - clo) / qmax).clamp_min(_EPS)
            err = (((x - clo) / sc).round().clamp(0, qmax) * sc + clo - x).square().sum(dim, keepdim=True)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, clo, best_lo), torch.where(better, chi, best_hi)
        lo, hi = best_lo, best_hi
    scale = ((hi - lo) / qmax).clamp_min(_EPS).to(scale_dtype)
    zero = lo.to(scale_dtype)
    codes = ((x - zero.float()) / scale.float()).round_().clamp_(0, qmax).to(torch.uint8)
    return codes, scale, zero


def quantize_keys(k: torch.Tensor, bits: int, group: int, scale_dtype=torch.float16, clip: bool = False):
    """``k [B, H, N, D]`` with ``N % group == 0`` -> packed codes ``[B, H, N, P]``, scale/zero ``[B, H, N/group, D]``."""
    b, h, n, d = k.shape
    kg = k.float().reshape(b, h, n // group, group, d)
    codes, scale, zero = _affine(kg, 3, bits, scale_dtype, clip)
    return pack(codes.reshape(b, h, n, d), bits), scale.squeeze(3), zero.squeeze(3)


def dequantize_keys(packed, scale, zero, bits: int, group: int, dim: int, dtype=torch.float32):
    b, h, n, _ = packed.shape
    codes = unpack(packed, bits, dim).reshape(b, h, n // group, group, dim).float()
    return (codes * scale.float()[:, :, :, None] + zero.float()[:, :, :, None]).reshape(b, h, n, dim).to(dtype)


def quantize_values(v: torch.Tensor, bits: int, group: int, scale_dtype=torch.float16, clip: bool = False):
    """``v [B, H, N, D]`` with ``D % group == 0`` -> packed codes ``[B, H, N, P]``, scale/zero ``[B, H, N, D/group]``."""
    b, h, n, d = v.shape
    vg = v.float().reshape(b, h, n, d // group, group)
    codes, scale, zero = _affine(vg, 4, bits, scale_dtype, clip)
    return pack(codes.reshape(b, h, n, d), bits), scale.squeeze(4), zero.squeeze(4)


def dequantize_values(packed, scale, zero, bits: int, group: int, dim: int, dtype=torch.float32):
    b, h, n, _ = packed.shape
    codes = unpack(packed, bits, dim).reshape(b, h, n, dim // group, group).float()
    return (codes * scale.float()[..., None] + zero.float()[..., None]).reshape(b, h, n, dim).to(dtype)


def rotation(dim: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal ``dim x dim`` matrix: the normalised Walsh-Hadamard matrix when ``dim`` is a power of
    two, otherwise a fixed random orthogonal matrix (QR of a seeded Gaussian)."""
    if dim & (dim - 1) == 0:
        h = torch.ones(1, 1)
        while h.shape[0] < dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / math.sqrt(dim)
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()
