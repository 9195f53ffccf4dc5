"""Bit packing of quantization codes into bytes.

Codes of ``bits`` in {1, 2, 3, 4, 8} are stored as *bit planes*: 8 -> one byte per code; 4, 2, 1 -> two,
four, eight codes per byte; 3 -> a 2-bit plane plus a 1-bit plane (exactly 3 bits per code, no waste).
A 4- or 2-bit plane packs along the last dimension by slicing it into ``8 // width`` contiguous parts
(unpacking is a few shift/and ops over whole tensors plus one concatenation); a 1-bit plane packs 8
neighbouring channels per byte and unpacks with one lookup in a 256-entry table. No Python loop over
tokens or groups.
"""

from __future__ import annotations

import torch

_PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
_BIT_TABLES: dict[str, torch.Tensor] = {}


def _bit_table(device) -> torch.Tensor:
    """``[256, 8]`` uint8: the 8 bits of every byte value, least significant first."""
    key = str(device)
    if key not in _BIT_TABLES:
        b = torch.arange(256, dtype=torch.int32)
        _BIT_TABLES[key] = torch.stack([(b >> j) & 1 for j in range(8)], -1).to(torch.uint8).to(device)
    return _BIT_TABLES[key]
SUPPORTED_BITS = (2, 3, 4, 8)


def planes(bits: int) -> tuple[int, ...]:
    if bits not in _PLANES:
        raise ValueError(f"{bits}-bit codes are not supported; choose one of {', '.join(map(str, sorted(_PLANES)))}")
    return _PLANES[bits]


def check_packable(dim: int, bits: int, what: str = "last dimension") -> None:
    for w in planes(bits):
        per_byte = 8 // w
        if dim % per_byte:
            raise ValueError(f"cannot pack {bits}-bit codes: the {what} ({dim}) is not a multiple of {per_byte}")


def packed_size(dim: int, bits: int) -> int:
    """Bytes per row of ``dim`` codes."""
    return sum(dim // (8 // w) for w in planes(bits))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., dim]`` (each < 2**bits) -> uint8 ``[..., packed_size(dim, bits)]``."""
    check_packable(codes.shape[-1], bits)
    out, shift = [], 0
    for w in planes(bits):
        plane = (codes >> shift) & ((1 << w) - 1) if bits != w else codes
        shift += w
        k = 8 // w
        if k == 1:
            out.append(plane)
            continue
        if w == 1:  # bit j of byte i holds channel 8*i + j: unpacked by one table lookup
            bits8 = plane.reshape(*plane.shape[:-1], -1, 8)
            out.append((bits8 << _BIT_SHIFTS.to(bits8.device)).sum(-1, dtype=torch.uint8))
            continue
        parts = plane.chunk(k, dim=-1)
        byte = parts[0].clone()
        for j in range(1, k):
            byte |= parts[j] << (j * w)
        out.append(byte)
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., packed_size]`` -> uint8 codes ``[..., dim]``."""
    ws = planes(bits)
    if len(ws) == 1 and ws[0] == 8:
        return packed
    codes, start, shift = None, 0, 0
    for w in ws:
        k = 8 // w
        n = dim // k
        byte = packed[..., start : start + n]
        start += n
        mask = (1 << w) - 1
        if w == 1:
            plane = _bit_table(byte.device).index_select(0, byte.reshape(-1).int()).reshape(*byte.shape[:-1], dim)
            plane = plane << shift if shift else plane
            codes = plane if codes is None else codes | plane
            shift += w
            continue
        plane = torch.cat([(byte >> (j * w)) & mask if j else byte & mask for j in range(k)], dim=-1)
        plane = plane << shift if shift else plane
        codes = plane if codes is None else codes | plane
        shift += w
    return codes
