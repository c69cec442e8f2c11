"""Where the Triton kernel tests run: a GPU, or the CPU through the Triton interpreter (TRITON_INTERPRET=1)."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
if INTERPRETED and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture(autouse=True)
def use_triton(monkeypatch):
    """Route the halrp ops to the Triton provider, with IEEE fp32 products (no TF32)."""
    monkeypatch.setenv("HALRP_FAST_BACKEND", "triton")
    torch.backends.cuda.matmul.allow_tf32 = False
