"""HF export without torch: the numpy writer equals the torch writer it replaced, tensor for tensor and byte for byte,
and transformers loads it."""
import os

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file as torch_save_file
from transformers import InternVLForConditionalGeneration

from recogdrive_jax.convert import internvl as cv
from recogdrive_jax.models import internvl as iv

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def torch_reference_export(params, cfg, path: str, layout: str, dtype: str) -> None:
    """The pre-numpy writer (torch `.to(dtype)` then `safetensors.torch.save_file`), one file."""
    tensors = {k: torch.from_numpy(np.array(a, np.float32)).to(TORCH_DTYPES[dtype])
               for k, a in cv.params_to_hf(params, cfg, layout)}
    torch_save_file(tensors, path, metadata={"format": "pt"})


def read_all(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def tiny_params():
    cfg = iv.get_config("tiny")
    params = cv.model_params(iv.init_model(cfg, seed=3))
    # perturb everything (zeros/ones inits would hide rounding differences)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: np.asarray(a) + rng.normal(0, 0.3, a.shape).astype(np.float32), params)
    return cfg, params


@pytest.mark.parametrize("layout,dtype", [("native", "bfloat16"), ("remote", "bfloat16"), ("native", "float16"),
                                          ("native", "float32")])
def test_numpy_export_equals_torch_export(tiny_params, tmp_path, layout, dtype):
    cfg, params = tiny_params
    files = cv.save_hf(params, cfg, str(tmp_path / "np"), layout=layout, dtype=dtype)
    assert files == ["model.safetensors"]
    ref = str(tmp_path / "ref.safetensors")
    torch_reference_export(params, cfg, ref, layout, dtype)
    got, want = read_all(str(tmp_path / "np" / "model.safetensors")), read_all(ref)
    assert list(got) == list(want) and set(got) == set(cv.expected_keys(cfg, layout))
    for k in want:
        assert got[k].dtype == want[k].dtype == TORCH_DTYPES[dtype], k
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k  # same bits (bf16 rounding)
    with open(tmp_path / "np" / "model.safetensors", "rb") as f, open(ref, "rb") as g:
        assert f.read() == g.read()  # same header, order and bytes


def test_sharded_numpy_export_loads_in_transformers(tiny_params, tmp_path):
    cfg, params = tiny_params
    out = str(tmp_path / "hf")
    files = cv.save_hf(params, cfg, out, dtype="bfloat16", max_shard_size="60KB")
    assert len(files) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    tm = InternVLForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16).eval()
    sd = tm.state_dict()
    ref = str(tmp_path / "ref.safetensors")
    torch_reference_export(params, cfg, ref, "native", "bfloat16")
    want = read_all(ref)
    assert set(sd) == set(want)
    for k, t in want.items():
        assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k].view(torch.int16), t.view(torch.int16)), k
    # and back: the torch-free reader gives the bf16 values exactly
    back = cv.hf_to_params(cv.TensorSource(out), cfg)
    emb = back["language_model"]["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(emb, want["model.language_model.embed_tokens.weight"].float().numpy())
