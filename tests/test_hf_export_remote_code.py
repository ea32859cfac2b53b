"""A checkpoint written by OpenGVLab's own remote code (`InternVLChatModel.save_pretrained`, bf16, remote-code
layout; tests/fixtures/internvl_remote/regenerate.py records the upstream commit): the converter reads it, our model
gives its logits and greedy tokens, and `sft` / `cache` take it as `init_from`."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recogdrive_jax import stage_configs
from recogdrive_jax.convert import internvl as cv
from recogdrive_jax.data.tokenizer import build_tokenizer
from recogdrive_jax.models import internvl as iv
from recogdrive_jax.parallel import mesh as mesh_lib
from recogdrive_jax.stages import cache
from recogdrive_jax.vlm import checkpoint as vlm_ckpt
from recogdrive_jax.vlm import tokenizer as vlm_tokenizer

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "internvl_remote")


@pytest.fixture(scope="module")
def reference():
    ref = dict(np.load(os.path.join(FIXTURE, "reference.npz")))
    ref["pixel_values_nhwc"] = ref["pixel_values"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    return ref


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory):
    """The fixture with the tokenizer of its vocabulary next to it, as a real checkpoint ships it."""
    d = str(tmp_path_factory.mktemp("remote") / "ckpt")
    shutil.copytree(FIXTURE, d)
    build_tokenizer().save_pretrained(d)
    return d


def test_fixture_comes_from_upstream_code():
    with open(os.path.join(FIXTURE, "SOURCE.json")) as f:
        src = json.load(f)
    assert src["repository"] == "OpenGVLab/InternVL" and len(src["commit"]) == 40 and src["stand_ins_called"] == []
    with open(os.path.join(FIXTURE, "config.json")) as f:
        assert json.load(f)["architectures"] == ["InternVLChatModel"]


def test_remote_code_checkpoint_gives_its_logits_and_greedy_tokens(reference, remote_dir, tmp_path):
    src = cv.TensorSource(remote_dir)
    assert src.layout == "remote"
    assert cv.main(["--from-hf", remote_dir, "--out", str(tmp_path / "conv")]) == 0  # bf16 on disk, exact in fp32
    cfg, params = cv.load_params(str(tmp_path / "conv"))
    assert src.keys() == set(cv.expected_keys(cfg, "remote"))
    assert not cfg.llm_config.tie_word_embeddings and cfg.num_image_token == 4 and cfg.force_image_size == 56
    # remote-code configs carry no token ids: taken from the tokenizer, as upstream's chat() does
    assert (cfg.image_token_id, cfg.img_start_token_id, cfg.img_end_token_id, cfg.eos_token_id,
            cfg.pad_token_id) == (5, 3, 4, 2, 0)
    model = cv.model_from_params(cfg, params)
    ids, pv = jnp.asarray(reference["input_ids"]), jnp.asarray(reference["pixel_values_nhwc"])
    logits = np.asarray(model(ids, None, pv)["logits"])
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-4, rtol=0)
    want = reference["tokens"][0]
    assert len(set(want.tolist())) >= 6  # greedy tokens vary between positions
    got = np.asarray(iv.generate(model, ids, pixel_values=pv, max_new_tokens=len(want)))[0]
    np.testing.assert_array_equal(got, want)


def test_sft_and_cache_init_from_the_remote_code_checkpoint(reference, remote_dir, tmp_path):
    resolved = vlm_ckpt.resolve_model(stage_configs.model_block(init_from=remote_dir, dtype="float32", remat=False), None,
                                 str(tmp_path / "work"))
    vlm_tokenizer.load_or_build_tokenizer(resolved, str(tmp_path / "work"))
    mdef = vlm_ckpt.module_def(resolved.cfg, "float32")
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices())
    params = cache.load_params(resolved, mdef, mesh)
    logits = mdef.bind(params)(jnp.asarray(reference["input_ids"]), None,
                               jnp.asarray(reference["pixel_values_nhwc"]))["logits"]
    np.testing.assert_allclose(np.asarray(logits), reference["logits"], atol=1e-4, rtol=0)
