"""The fused Triton decode kernel, checked on the CPU with the Triton interpreter (no GPU needed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_fused_decode_kernel_matches_the_pytorch_path():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_check.py"))], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("max error") == 3


def test_kernel_is_not_used_on_cpu_without_the_interpreter():
    from kvforge.quant import triton_decode

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter forced on")
    import torch

    assert not triton_decode.available(torch.device("cpu"))
