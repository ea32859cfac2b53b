"""Comparing an exported planner state dict with upstream's, entry by entry.

Schedule buffers that upstream computes with torch's sqrt / log: torch's vectorised CPU kernels round them by the
machine (correctly rounded on an AVX-512 host; up to an ulp off on the machine that made the upstream fixture; the
mu_coef* buffers multiply two such values), so the export, which recomputes them with torch ops on the running
machine, may sit 1-2 fp32 ulps from the fixture's. Every other entry must come back bit for bit."""
import numpy as np
import torch

TORCH_MATH_BUFFERS = ("sqrt", "logvar", "mu_coef")


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    x, y = (t.numpy().astype(np.float32).view(np.int32).astype(np.int64) for t in (a, b))
    return int(np.max(np.abs(x - y))) if x.size else 0


def assert_entry_equal(key: str, got: torch.Tensor, want: torch.Tensor, where=None) -> None:
    tag = key if where is None else (where, key)
    assert got.dtype == want.dtype and got.shape == want.shape, tag
    if any(m in key.rsplit(".", 1)[-1] for m in TORCH_MATH_BUFFERS):
        assert ulps(got, want) <= 2, tag
    else:
        assert torch.equal(got, want), tag
