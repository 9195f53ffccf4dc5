"""Run with TRITON_INTERPRET=1 (tests/test_triton.py does): the fused Triton decode kernel against the
PyTorch attention on the same quantized views. Prints one line per case; exits non-zero on a mismatch."""

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"

import torch  # noqa: E402

from kvforge.quant import QuantConfig, QuantizedLayer  # noqa: E402
from kvforge.quant.attention import quantized_attention  # noqa: E402
from kvforge.quant.triton_decode import fused_decode, supports  # noqa: E402

CASES = [  # (config, batch, kv heads, query heads per kv head, head_dim, tokens)
    (QuantConfig(4, 4, key_group=32, value_group=32, residual_length=32), 2, 3, 3, 64, 150),
    (QuantConfig(2, 2, key_group=16, value_group=32, residual_length=32, rotate="both"), 1, 1, 4, 64, 100),
    (QuantConfig(8, 4, key_group=16, value_group=16, residual_length=16, rotate="none"), 1, 2, 2, 32, 70),
]
bad = 0
torch.manual_seed(0)
for cfg, b, h, rep, d, n in CASES:
    layer = QuantizedLayer(cfg, fused=True)
    layer.update(torch.randn(b, h, n, d), torch.randn(b, h, n, d))
    view, _ = layer.update(torch.randn(b, h, 1, d), torch.randn(b, h, 1, d))
    q = torch.randn(b, h * rep, 1, d)
    assert supports(view, q, None)
    ref, _ = quantized_attention(q, view, None, d**-0.5)
    out = fused_decode(q, view, d**-0.5, block_n=32)
    err = (out - ref).abs().max().item()
    print(f"K{cfg.key_bits}/V{cfg.value_bits} b={b} h={h} rep={rep} d={d} n={n}: max error {err:.2e}")
    bad += err > 1e-4
sys.exit(1 if bad else 0)
