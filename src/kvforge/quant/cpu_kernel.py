"""Decode attention on the packed codes, compiled for the CPU with numba.

A decode step at long context reads mostly the cache. This kernel reads the bit-packed codes where they
lie (no unpacked or dequantized copy of the past), so it reads 4-8x fewer bytes than attention over a
float32 cache:

* key scores: each key group's scales are folded into the query once per group (``q_d * scale_gd``) and
  its zero points into one bias per group (``sum_d q_d * zero_gd``); a token's score is then a dot product
  of the folded query with its codes, unpacked into registers;
* values: the softmax weight of a token is multiplied into its per-group value scales, the codes are
  accumulated with that weight, and the zero points are summed once per group;
* an online softmax over blocks of one key group; the context of every (sequence, KV head) is split into
  pieces that threads take independently, merged at the end by their running maxima and sums
  (flash-decoding, Dao et al. 2023); every query head of a group reads its KV head's codes once;
* the full-precision residual window is one more piece of the same merge.

One call serves a whole batch, each sequence with its own cache and length (the server's batched decode
step): the kernel takes a table of each sequence's tensor addresses and lengths, not stacked copies.

Why numba: it ships wheels for Linux (x86-64, aarch64), macOS and Windows, so ``pip install`` gives a
working kernel with no compiler on the user's machine (a C++ extension would need one, or a wheel per
platform and torch version); it compiles on first use and caches the machine code on disk. Where it is
missing, or with ``KVFORGE_CPU_KERNEL=0``, :mod:`kvforge.quant.attention`'s PyTorch path (the reference)
runs instead. Scales and zero points stay ``float16`` in the cache; the kernel reads their bits and
converts them through a 65,536-entry table.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised where numba is missing
    numba = None

KERNEL_BITS = (2, 3, 4, 8)
# a piece of context one thread takes: at least this many tokens (rounded to whole key groups)
MIN_SPLIT = 512
RECENT_BLOCK = 32
# row table columns: addresses of k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, recent_k, recent_v,
# then quantized tokens, recent tokens, first token attended (earlier ones are outside a sliding window)
_COLS = 11
_F16 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
_BIT3 = (((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1) * 4).astype(np.float32)  # 3-bit codes' top bit


def available() -> bool:
    """True when numba is installed and ``KVFORGE_CPU_KERNEL`` is not ``0``."""
    return numba is not None and os.environ.get("KVFORGE_CPU_KERNEL", "1") != "0"


def why_not(view, query: torch.Tensor) -> str | None:
    """``None`` when the kernel can run this step, else the reason it cannot (the caller falls back)."""
    if not available():
        return "numba is not installed" if numba is None else "KVFORGE_CPU_KERNEL=0"
    cfg = view.layer.config
    if query.device.type != "cpu":
        return f"the query is on {query.device.type}, the kernel runs on the CPU"
    if query.shape[2] != 1:
        return f"{query.shape[2]} query tokens: the kernel is for single-token decode steps"
    if cfg.key_bits not in KERNEL_BITS or cfg.value_bits not in KERNEL_BITS:
        return f"K{cfg.key_bits}/V{cfg.value_bits} codes"
    if view.recent_v.shape[-1] != view.recent_k.shape[-1]:
        return "keys and values of different widths (latent caches)"
    return None


# reassociation lets LLVM vectorise the dot products; no "nnan"/"ninf": masked scores are -inf
_FAST = {"reassoc", "contract", "arcp", "nsz", "afn"}

if numba is not None:

    @intrinsic
    def _address(typingctx, addr):
        """An integer (a tensor's ``data_ptr()``) as a pointer that ``numba.carray`` can wrap."""
        if not isinstance(addr, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

        return types.voidptr(addr), codegen

    @njit(inline="always", fastmath=_FAST)
    def _unpack(codes, t0, n, bits, d, out, off, bit3):
        """Packed codes of tokens ``t0 .. t0+n`` -> ``out[off:off+n, :d]`` float32 (the layout of
        :mod:`kvforge.quant.packing`); ``bit3[byte]``: the 1-bit plane of 3-bit codes as 8 floats (0 or 4)."""
        if bits == 4:
            h = d // 2
            for tt in range(n):
                row = codes[t0 + tt]
                o = out[off + tt]
                for i in range(h):  # in float arithmetic: whole vectors, no 64-bit integer lanes
                    x = np.float32(row[i])
                    hi = np.floor(x * np.float32(0.0625))
                    o[i] = x - 16 * hi
                    o[i + h] = hi
        elif bits == 2 or bits == 3:
            h = d // 4
            for tt in range(n):
                row = codes[t0 + tt]
                o = out[off + tt]
                for i in range(h):
                    x = np.float32(row[i])
                    a = np.floor(x * np.float32(0.25))
                    b = np.floor(a * np.float32(0.25))
                    c = np.floor(b * np.float32(0.25))
                    o[i] = x - 4 * a
                    o[i + h] = a - 4 * b
                    o[i + 2 * h] = b - 4 * c
                    o[i + 3 * h] = c
                if bits == 3:  # the third bit: a 1-bit plane, bit j of byte i is channel 8i + j
                    for i in range(d // 8):
                        hi = bit3[row[h + i]]
                        for j in range(8):
                            o[8 * i + j] += hi[j]
        else:
            for tt in range(n):
                row = codes[t0 + tt]
                o = out[off + tt]
                for i in range(d):
                    o[i] = np.float32(row[i])

    @njit(inline="always", fastmath=_FAST)
    def _softmax_block(s, n, m, lsum, acc, p):
        """Online-softmax update for ``n`` scores ``s[:, :n]``: rescale the running state to the new maximum
        and leave the block's weights in ``p``. Returns False (state untouched) when all are -inf."""
        any_finite = False
        ninf = np.float32(-np.inf)
        for r in range(s.shape[0]):
            bm = ninf
            for t in range(n):
                bm = max(bm, s[r, t])
            if bm == ninf:
                for t in range(n):
                    p[r, t] = 0
                continue
            any_finite = True
            mn = max(m[r], bm)
            if m[r] != mn:
                alpha = np.exp(m[r] - mn)
                lsum[r] *= alpha
                for i in range(acc.shape[1]):
                    acc[r, i] *= alpha
                m[r] = mn
            tot = np.float32(0)
            for t in range(n):
                e = np.exp(s[r, t] - mn)
                p[r, t] = e
                tot += e
            lsum[r] += tot
        return any_finite

    @njit(inline="always", fastmath=_FAST)
    def _scores(qf, qz, kbuf, n, s, off):
        """``s[r, off + t] = qf[r] . kbuf[off + t] + qz[r]`` for ``t < n``."""
        d = kbuf.shape[1]
        for tt in range(off, off + n):
            kr = kbuf[tt]
            for r in range(qf.shape[0]):
                a = np.float32(0)
                for i in range(d):
                    a += qf[r, i] * kr[i]
                s[r, tt] = a + qz[r]

    @njit(inline="always", fastmath=_FAST)
    def _adjust(s, n, softcap, mask, b, t0, start):
        """Softcap, add the mask and set -inf before ``start``: scores ``s[:, :n]`` of tokens ``t0 ..``."""
        if softcap > 0:
            for r in range(s.shape[0]):
                for tt in range(n):
                    s[r, tt] = np.tanh(s[r, tt] / softcap) * softcap
        if mask.shape[0] > 0:
            for r in range(s.shape[0]):
                for tt in range(n):
                    s[r, tt] += mask[b, t0 + tt]
        if start > t0:
            for r in range(s.shape[0]):
                for tt in range(min(n, start - t0)):
                    s[r, tt] = -np.inf

    @njit(inline="always", fastmath=_FAST)
    def _values(buf, n, t0, p, vs, vz, f16, gv, acc):
        """``acc[r] += p[r, t] * (codes[t] * scale[t] + zero[t])`` over the block's ``n`` tokens (``buf``: their
        codes as floats, dequantized in place, a value group of ``gv`` channels at a time)."""
        r_count, d = acc.shape
        for tt in range(n):
            t = t0 + tt
            vr = buf[tt]
            for c in range(d // gv):
                sv = f16[vs[t, c]]
                zv = f16[vz[t, c]]
                for j in range(c * gv, (c + 1) * gv):
                    vr[j] = vr[j] * sv + zv
            for r in range(r_count):
                w = p[r, tt]
                a = acc[r]
                for j in range(d):
                    a[j] += w * vr[j]


    @njit(parallel=True, fastmath=_FAST, cache=True)
    def _merge(first, pm, pl, pacc, out):
        """Combine the pieces ``first[k]:first[k+1]`` of each (row, kv head) ``k`` into ``out [B*H, R, D]``."""
        r_count, d = pacc.shape[1], pacc.shape[2]
        for k in prange(first.shape[0] - 1):
            for r in range(r_count):
                mx = -np.inf
                for it in range(first[k], first[k + 1]):
                    mx = max(mx, pm[it, r])
                tot = np.float32(0)
                for i in range(d):
                    out[k, r, i] = 0
                if mx == -np.inf:
                    continue
                for it in range(first[k], first[k + 1]):
                    if pm[it, r] == -np.inf:
                        continue
                    w = np.exp(pm[it, r] - mx)
                    tot += w * pl[it, r]
                    for i in range(d):
                        out[k, r, i] += w * pacc[it, r, i]
                for i in range(d):
                    out[k, r, i] /= tot


def _build(r_count: int, d: int, g: int, gv: int, kbits: int, vbits: int):
    """The kernel for one shape: query heads per KV head, head width, group sizes and bit widths are
    compile-time constants (fixed trip counts: LLVM unrolls and vectorises the inner loops; with them as
    run-time values the same code runs 5-7x slower). Compiled on first use, cached on disk by numba."""
    kb = d * kbits // 8
    vb = d * vbits // 8
    c_count = d // gv
    blk = g * max(1, 64 // g)  # tokens per softmax block

    @njit(parallel=True, fastmath=_FAST, cache=True)
    def attend(q, rows, items, mask, f16, bit3, softcap, pm, pl, pacc):
        """Partial attention of every work item ``(row, kv head, t0, t1)``: running max ``pm``, sum ``pl`` and
        unnormalised output ``pacc`` per query head of the group. ``q [B, H, R, D]`` float32, scaled and
        rotated; ``mask [B, KV]`` additive float32 (or ``[0, 0]``: none); ``softcap`` float32 (0: none)."""
        heads = q.shape[1]
        for it in prange(items.shape[0]):
            b, h, t0, t1 = items[it, 0], items[it, 1], items[it, 2], items[it, 3]
            n_q, n_r, start = rows[b, 8], rows[b, 9], rows[b, 10]
            qv = q[b, h]
            m = np.full(r_count, -np.inf, np.float32)
            lsum = np.zeros(r_count, np.float32)
            acc = np.zeros((r_count, d), np.float32)
            s = np.empty((r_count, blk), np.float32)
            p = np.empty((r_count, blk), np.float32)
            buf = np.empty((blk, d), np.float32)
            if t0 < n_q:  # quantized past, whole key groups
                kc = numba.carray(_address(rows[b, 0]), (heads, n_q, kb), np.uint8)[h]
                ks = numba.carray(_address(rows[b, 1]), (heads, n_q // g, d), np.uint16)[h]
                kz = numba.carray(_address(rows[b, 2]), (heads, n_q // g, d), np.uint16)[h]
                vc = numba.carray(_address(rows[b, 3]), (heads, n_q, vb), np.uint8)[h]
                vs = numba.carray(_address(rows[b, 4]), (heads, n_q, c_count), np.uint16)[h]
                vz = numba.carray(_address(rows[b, 5]), (heads, n_q, c_count), np.uint16)[h]
                qf = np.empty((r_count, d), np.float32)
                qz = np.empty(r_count, np.float32)
                for base in range(t0, t1, blk):  # a block: whole key groups, one softmax update
                    n = min(blk, t1 - base)
                    if base + n <= start:
                        continue
                    for off in range(0, n, g):
                        grp = (base + off) // g
                        for r in range(r_count):
                            z = np.float32(0)
                            for i in range(d):
                                qf[r, i] = qv[r, i] * f16[ks[grp, i]]
                                z += qv[r, i] * f16[kz[grp, i]]
                            qz[r] = z
                        _unpack(kc, base + off, g, kbits, d, buf, off, bit3)
                        _scores(qf, qz, buf, g, s, off)
                    _adjust(s, n, softcap, mask, b, base, start)
                    if not _softmax_block(s, n, m, lsum, acc, p):
                        continue
                    _unpack(vc, base, n, vbits, d, buf, 0, bit3)
                    _values(buf, n, base, p, vs, vz, f16, gv, acc)
            else:  # the full-precision residual window
                rk = numba.carray(_address(rows[b, 6]), (heads, n_r, d), np.float32)[h]
                rv = numba.carray(_address(rows[b, 7]), (heads, n_r, d), np.float32)[h]
                zero = np.zeros(r_count, np.float32)
                for u0 in range(0, n_r, blk):
                    n = min(blk, n_r - u0)
                    _scores(qv, zero, rk[u0 : u0 + n], n, s, 0)
                    _adjust(s, n, softcap, mask, b, n_q + u0, start)
                    if not _softmax_block(s, n, m, lsum, acc, p):
                        continue
                    for tt in range(n):
                        vr = rv[u0 + tt]
                        for r in range(r_count):
                            w = p[r, tt]
                            for i in range(d):
                                acc[r, i] += w * vr[i]
            for r in range(r_count):
                pm[it, r] = m[r]
                pl[it, r] = lsum[r]
                for j in range(d):
                    pacc[it, r, j] = acc[r, j]

    return attend


_KERNELS: dict = {}


def _kernel(*shape: int):
    if shape not in _KERNELS:
        _KERNELS[shape] = _build(*shape)
    return _KERNELS[shape]


def _plan(quantized: list[int], recent: list[int], heads: int, group: int, threads: int):
    """Work items ``[N, 4]`` (row, head, t0, t1) and the first item of each (row, head)."""
    total = sum(quantized) * heads
    pieces = max(4 * threads, 1)
    split = max(MIN_SPLIT, -(-total // pieces)) if total else MIN_SPLIT
    split = -(-split // group) * group
    items, first = [], [0]
    for b, (nq, nr) in enumerate(zip(quantized, recent)):
        for h in range(heads):
            items.extend((b, h, t0, min(t0 + split, nq)) for t0 in range(0, nq, split))
            if nr:
                items.append((b, h, nq, nq + nr))
            first.append(len(items))
    return np.asarray(items, dtype=np.int64).reshape(-1, 4), np.asarray(first, dtype=np.int64)


def _bits16(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint16)


def decode(query: torch.Tensor, views: list, scaling: float, softcap: float | None = None,
           attention_mask: torch.Tensor | None = None, starts: list[int] | None = None) -> torch.Tensor:
    """One decode step of attention on the codes for ``B`` sequences, each with its own quantized layer.

    ``query [B, Hq, 1, D]``; ``views``: one :class:`~kvforge.quant.view.QuantizedView` per sequence (batch 1
    each, same quantization settings), or one view of batch ``B``; ``attention_mask`` ``[B, 1, 1, KV]``
    (boolean, or additive) over each sequence's ``KV`` stored tokens, or ``None``; ``starts``: per
    sequence, the first stored token it may attend to (a sliding window). Returns ``[B, 1, Hq, D]`` in the
    query's dtype. Raises ``ValueError`` when the views' settings differ.
    """
    layer = views[0].layer
    cfg = layer.config
    b, hq, _, d = query.shape
    if len(views) == 1 and b > 1:  # one cache of batch B: one table row per sequence
        v = views[0]
        parts = (v.k_codes, v.k_scale, v.k_zero, v.v_codes, v.v_scale, v.v_zero, v.recent_k, v.recent_v)
        views = [type(v)(v.layer, *(t[i : i + 1] for t in parts), sink=v.sink) for i in range(b)]
    if any(v.layer.config != cfg for v in views):
        raise ValueError("the sequences of one decode batch must share their quantization settings")
    heads = views[0].recent_k.shape[1]
    rep = hq // heads
    q = query.float().reshape(b, heads, rep, d) * scaling
    if layer.rot is not None:
        q = q @ layer.rot
    q = q.contiguous()
    keep = []  # tensors the table points into must outlive the call
    table = np.zeros((b, _COLS), dtype=np.int64)
    for i, v in enumerate(views):
        ts = [v.k_codes.contiguous(), _bits16(v.k_scale), _bits16(v.k_zero), v.v_codes.contiguous(),
              _bits16(v.v_scale), _bits16(v.v_zero), v.recent_k.float().contiguous(), v.recent_v.float().contiguous()]
        keep.append(ts)
        table[i, :8] = [t.data_ptr() for t in ts]
        table[i, 8] = v.quantized_tokens
        table[i, 9] = v.recent_k.shape[2]
        table[i, 10] = starts[i] if starts is not None else 0
    mask = np.zeros((0, 0), dtype=np.float32)
    if attention_mask is not None:
        kv = int(table[0, 8] + table[0, 9])
        am = views[0].kernel_order(attention_mask[..., -kv:]).reshape(b, kv)
        if am.dtype == torch.bool:
            am = torch.zeros(am.shape).masked_fill_(~am, -math.inf)
        mask = am.float().contiguous().numpy()
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    items, first = _plan(table[:, 8].tolist(), table[:, 9].tolist(), heads, cfg.key_group, threads)
    n = items.shape[0]
    pm = np.empty((n, rep), np.float32)
    pl = np.empty((n, rep), np.float32)
    pacc = np.empty((n, rep, d), np.float32)
    attend = _kernel(rep, d, cfg.key_group, cfg.value_group, cfg.key_bits, cfg.value_bits)
    attend(q.numpy(), table, items, mask, _F16, _BIT3, np.float32(softcap or 0.0), pm, pl, pacc)
    out = np.empty((b * heads, rep, d), np.float32)
    _merge(first, pm, pl, pacc, out)
    del keep
    o = torch.from_numpy(out)
    if layer.rotates_values:
        o = o @ layer.rot.T
    return o.reshape(b, hq, 1, d).transpose(1, 2).to(query.dtype)

