"""bench/gpu.py, the prepared GPU script: its FLOP count matches the real model, and it runs end to end (tiny, CPU)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import gpu  # noqa: E402
from recogdrive_jax.models import internvl as iv  # noqa: E402
from recogdrive_jax.vlm import checkpoint as vlm_ckpt  # noqa: E402


@pytest.mark.parametrize("variant", ["internvl3_2b", "tiny"])
def test_mfu_parameter_count_is_the_models(variant):
    """The analytic count covers every matrix that multiplies each token (embeddings, norms, biases, the patch
    convolution and position embeddings excluded), so MFU is not inflated or deflated by a wrong N."""
    cfg = iv.get_config(variant)
    abstract = vlm_ckpt.module_def(cfg, "float32").abstract_params()
    flat = {"/".join(map(str, p)): x for p, x in _leaves(abstract)}
    skip = ("embed_tokens", "position_embedding", "patch_embedding", "class_embedding", "norm", "bias", "ls1", "ls2")
    mats = sum(int(np.prod(x.shape)) for k, x in flat.items() if len(x.shape) >= 2 and not any(s in k for s in skip))
    counted = sum(gpu.matmul_params(cfg).values())
    assert abs(counted - mats) / mats < 1e-6, (counted, mats)


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix, tree


@pytest.mark.slow
def test_smoke_runs_on_cpu():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--reps", "2"], cwd=ROOT,
                         env=subprocess_env(1), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("planner_ddim5_b1_ms:", "planner_train_steps_per_s:", "# sft tiny"):
        assert name in out.stdout
