"""Which quantization levers matter, measured by simulation before building them (issue 17, second round).

Simulated ("fake-quant") variants of kvforge's quantized layer on the dense path: group metadata in 8 bits
(scales rounded up to 2^(n/8), zero points as int8 multiples of the scale), a residual window stored in
8-bit integers or float8, attention-sink tokens kept exact. Decode-faithful perplexity on the calibration
parts of the given texts (never the evaluation parts), the windows each text has room for, up to N.
Sizes are the analytical ratio against float16 at 2,048 tokens (sink and window at the window's precision).

    python benchmarks/quant_levers.py pydoc,licenses,kjv 8 benchmarks/results/quant-levers_smollm2-135m_cal8_r1/v3.json

The variants file maps a name to {"cfg": QuantConfig fields, "meta": fp16|log8|z8|log8z8, "win8": true (int8
window) or a float8 dtype name, "sink": N, "sinkx": true (sinks left out of the group ranges)}. Prints one
line per variant; the runs of the second round are saved beside their variants files. The levers that won
(an int8 window, sinks) are now real settings (QuantConfig.residual_bits, QuantConfig.sink).
"""
import json
import math
import sys
import time

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvforge.models import load_model
from kvforge.quant import kivi
from kvforge.quant import layer as qlayer
from kvforge.quant.cache import QuantizedKVCache
from kvforge.quant.config import QuantConfig
from kvforge.quant.layer import QuantizedLayer
from kvforge.run import token_windows, window_nll
from kvforge.texts import load_text

META = {"mode": "fp16"}
_plain_affine = kivi._affine


def _affine(x, dim, bits, scale_dtype, clip=False):
    """kivi._affine, then the group metadata rounded the way an 8-bit format would store it."""
    codes, scale, zero = _plain_affine(x, dim, bits, scale_dtype, clip)
    mode = META["mode"]
    if mode == "fp16":
        return codes, scale, zero
    qmax = (1 << bits) - 1
    lo, s = zero.float(), scale.float()
    if mode in ("log8", "log8z8"):  # scale rounded up to 2^(n/8)
        s = torch.exp2(torch.ceil(torch.log2(s.clamp_min(1e-8)) * 8) / 8)
    if mode in ("z8", "log8z8"):  # zero point an int8 multiple of the scale; the scale widened where it saturates
        bad = (torch.round(lo / s) < -128) | (torch.round(lo / s) > 127)
        s = torch.where(bad, torch.maximum(s, lo.abs() / 127 + 1e-8), s)
        if mode == "log8z8":
            s = torch.exp2(torch.ceil(torch.log2(s.clamp_min(1e-8)) * 8) / 8)
        z = torch.round(lo / s).clamp(-128, 127) * s
    else:
        z = lo.to(torch.float16).float()
    c = ((x - z) / s).round().clamp(0, qmax)
    return c.to(torch.uint8), s.to(torch.float32), z.to(torch.float32)


kivi._affine = _affine  # the dequantizers read scale.float(): float32 scales pass through
qlayer.quantize_keys, qlayer.quantize_values = kivi.quantize_keys, kivi.quantize_values


def fq8(x, group=32):
    """Per-token 8-bit quantization over groups of channels, dequantized."""
    b, h, n, d = x.shape
    g = x.float().reshape(b, h, n, d // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((hi - lo) / 255).clamp_min(1e-8)
    return (((g - lo) / s).round() * s + lo).reshape(b, h, n, d).to(x.dtype)


class Simulated(QuantizedLayer):
    """A quantized layer (full-precision window, no sinks of its own) with the simulated levers on top."""

    sink, sinkx, win8 = 0, False, False

    def update(self, k, v, *a, **kw):
        if self.total == 0 and self.sink:
            self._sk, self._sv = k[:, :, : self.sink].clone(), v[:, :, : self.sink].clone()
            if self.win8 is True:
                self._sk, self._sv = fq8(self._sk), fq8(self._sv)
        out = super().update(k, v, *a, **kw)
        n = min(k.shape[2], self.res_k.shape[2])
        if self.win8 and n:  # the window's new tokens as the simulated storage would give them back
            f = fq8 if self.win8 is True else (lambda x: x.to(getattr(torch, self.win8)).float())
            self.res_k[:, :, -n:] = f(self.res_k[:, :, -n:].float()).to(self.res_k.dtype)
            self.res_v[:, :, -n:] = f(self.res_v[:, :, -n:].float()).to(self.res_v.dtype)
        return out

    def _append_quantized(self, k, v):
        if self.sink and self.sinkx and self.quantized_tokens == 0:  # sinks left out of the group ranges
            k, v = k.clone(), v.clone()
            k[:, :, : self.sink] = k[:, :, self.sink : self.sink + 1]
            v[:, :, : self.sink] = v[:, :, self.sink : self.sink + 1]
        super()._append_quantized(k, v)

    def _dense(self, *args, **kw):
        k, v = super()._dense(*args, **kw)
        if self.sink and k.shape[2] >= self.sink and self.total >= self.sink:
            k, v = k.clone(), v.clone()
            k[:, :, : self.sink], v[:, :, : self.sink] = self._sk.to(k.dtype), self._sv.to(v.dtype)
        return k, v


def factory(cfg, n_layers, sink=0, sinkx=False, win8=False, protect=()):
    def make(model):
        cache = QuantizedKVCache([cfg] * n_layers, fused=False)
        for i in range(n_layers):
            layer = DynamicLayer() if i in protect else Simulated(cfg)
            layer.sink, layer.sinkx, layer.win8 = sink, sinkx, win8
            cache.layers[i] = layer
        return cache
    return make


def bits(cfg, meta, sink, win8, n=2048):
    """Bits per number at ``n`` tokens: codes and metadata, window and sinks at the window's precision."""
    mb = {"fp16": 32, "log8": 24, "z8": 24, "log8z8": 16}[meta]
    body = (cfg.key_bits + mb / cfg.key_group + cfg.value_bits + mb / cfg.value_group) / 2
    rb = 8.5 if win8 is True else 8 if win8 else 16
    r = cfg.residual_length
    return (body * (n - r - sink) + rb * (r + sink)) / n


def main():
    texts, n_windows, variants = sys.argv[1].split(","), int(sys.argv[2]), json.loads(open(sys.argv[3]).read())
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    n_layers = model.config.num_hidden_layers
    wins = {}
    for t in texts:
        text = load_text(t, "calibration")
        wins[t] = token_windows(tok, text, min(n_windows, len(tok(text).input_ids) // 1024), 1024)
    print({t: len(w) for t, w in wins.items()}, flush=True)

    def run(make):
        out = {}
        for t, ws in wins.items():
            tot, cnt = 0.0, 0
            for ids in ws:
                nll, k, _ = window_nll(model, ids, make(model), 512, 32)
                tot, cnt = tot + nll, cnt + k
            out[t] = tot / cnt
        return out

    with torch.inference_mode():
        base = run(lambda m: DynamicCache())
        print("base", {t: round(math.exp(x), 3) for t, x in base.items()}, flush=True)
        for name, v in variants.items():
            t0 = time.time()
            META["mode"] = v.get("meta", "fp16")
            cfg = QuantConfig(**v["cfg"])
            r = run(factory(cfg, n_layers, v.get("sink", 0), v.get("sinkx", False), v.get("win8", False),
                            tuple(v.get("protect", ()))))
            d = {t: 100 * (math.exp(r[t] - base[t]) - 1) for t in texts}
            b = bits(cfg, META["mode"], v.get("sink", 0), v.get("win8", False))
            print(f"{name:28s} x{16 / b:.2f} " + " ".join(f"{t}={d[t]:+.2f}" for t in texts)
                  + f" mean={sum(d.values()) / len(d):+.2f} worst={max(d.values()):+.2f} ({time.time() - t0:.0f}s)",
                  flush=True)


if __name__ == "__main__":
    main()
