"""`sft` / `cache` accept checkpoints written by transformers itself (`save_pretrained` of
InternVLForConditionalGeneration, tied and untied embeddings): the loaders give transformers' logits."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

from recogdrive_jax import stage_configs
from recogdrive_jax.data.tokenizer import build_tokenizer
from recogdrive_jax.parallel import mesh as mesh_lib
from recogdrive_jax.stages import cache
from recogdrive_jax.vlm import checkpoint as vlm_ckpt
from recogdrive_jax.vlm import tokenizer as vlm_tokenizer


def transformers_checkpoint(path: str, tie: bool, seed: int) -> InternVLForConditionalGeneration:
    """A tiny InternVL built and saved by transformers alone (56 px tiles, the tiny tokenizer's ids)."""
    vision = InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  image_size=[56, 56], patch_size=[14, 14], use_mean_pooling=True)
    text = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       eos_token_id=2, pad_token_id=0)  # the tiny tokenizer's <|im_end|> / <|endoftext|>
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=5, image_seq_length=4,
                            downsample_ratio=0.5, tie_word_embeddings=tie)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    tm = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():  # every parameter away from its init (zeros/ones hide mistakes)
            p.add_(0.1 * torch.randn_like(p))
    tm.save_pretrained(path)
    return tm


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_sft_and_cache_init_from_a_transformers_checkpoint(tmp_path, tokenizer, tie):
    src = str(tmp_path / "hf")
    tm = transformers_checkpoint(src, tie, seed=5 + tie)
    tokenizer.save_pretrained(src)
    from safetensors import safe_open
    with safe_open(os.path.join(src, "model.safetensors"), framework="numpy") as f:
        assert any("lm_head" in k for k in f.keys()) != tie  # tied: no head on disk
    model_cfg = stage_configs.model_block(init_from=src, dtype="float32", remat=False)
    resolved = vlm_ckpt.resolve_model(model_cfg, None, str(tmp_path / "work"))
    cfg = resolved.cfg
    assert cfg.llm_config.tie_word_embeddings is tie
    assert (cfg.image_token_id, cfg.img_start_token_id, cfg.img_end_token_id, cfg.eos_token_id,
            cfg.pad_token_id) == (5, 3, 4, 2, 0)
    tok = vlm_tokenizer.load_or_build_tokenizer(resolved, str(tmp_path / "work"))
    mdef = vlm_ckpt.module_def(resolved.cfg, "float32")
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices())
    params = cache.load_params(resolved, mdef, mesh)  # the loader `cache` and (via Orbax) `sft` use
    assert ("lm_head" in params["language_model"]) != tie
    ids = np.asarray(tok("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nturn left<|im_end|>\n")
                     .input_ids)[None]
    pv = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        want = tm(input_ids=torch.tensor(ids), pixel_values=pv).logits.numpy()
    got = mdef.bind(params)(jnp.asarray(ids), None, jnp.asarray(pv.numpy().transpose(0, 2, 3, 1)))["logits"]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
