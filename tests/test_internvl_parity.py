"""InternVL3 Flax port vs transformers `InternVLForConditionalGeneration` on tiny random configs at fp32."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import InternVLConfig as HFConfig
from transformers import InternVLForConditionalGeneration

from recogdrive_jax.convert import internvl as cv
from recogdrive_jax.models import internvl as iv
from recogdrive_jax.models.internvit import InternViTConfig
from recogdrive_jax.models.layers import token_logprobs

TOL = 1e-4
IMG = 5  # <IMG_CONTEXT> id in the tiny config
K = 4  # image tokens per tile in the tiny config


def hf_model(cfg, seed=0):
    """Random HF model for `cfg` with every parameter perturbed (HF inits cls/pos to 0, norms to 1)."""
    d = iv.config_to_hf(cfg, "native")
    hc = HFConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    hc._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = InternVLForConditionalGeneration(hc).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            base = 1.0 if p.dim() == 1 and ("norm" in name or "lambda" in name) else 0.0
            p.copy_(base + 0.1 * torch.randn_like(p))
    return m


def flax_from(tm, cfg, dtype=jnp.float32):
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    return cv.load_hf_model(sd, cfg, layout="native", dtype=dtype)


def nhwc(pv):
    return jnp.asarray(pv.numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def pair():
    cfg = iv.get_config("tiny")
    tm = hf_model(cfg)
    return cfg, tm, flax_from(tm, cfg)


def batch_two_rows():
    """Row 0: left-padded, one image of 2 tiles; row 1: two images (1 tile each). Tiles: 4 real + 1 dummy."""
    r0 = [0, 0, 0, 1, 7, 3] + [IMG] * (2 * K) + [4, 9, 10, 11, 2]
    r1 = [1, 8, 3] + [IMG] * K + [4, 12, 3] + [IMG] * K + [4, 13, 14, 15]
    t = max(len(r0), len(r1))
    ids = np.array([[0] * (t - len(r0)) + r0, [0] * (t - len(r1)) + r1], np.int64)
    mask = np.ones_like(ids)
    mask[0, :3 + t - len(r0)] = 0
    mask[1, :t - len(r1)] = 0
    return ids, mask


def hf_positions(mask):
    pos = np.cumsum(mask, -1) - 1
    pos[mask == 0] = 1
    return torch.tensor(pos)


def test_vision_and_projector(pair):
    cfg, tm, jm = pair
    torch.manual_seed(1)
    pv = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        vt = tm.model.vision_tower(pixel_values=pv).last_hidden_state.numpy()
        proj = tm.model.get_image_features(pixel_values=pv).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(jm.vision_model(nhwc(pv))), vt, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(jm.extract_feature(nhwc(pv))), proj, atol=TOL, rtol=0)


def test_vit_6b_style_variant():
    """qk RMSNorm over the whole width, rms_norm blocks, no qkv bias (InternViT-6B)."""
    vis = InternViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          image_size=56, patch_size=14, qkv_bias=False, qk_normalization=True, norm_type="rms_norm")
    cfg = dataclasses.replace(iv.get_config("tiny"), vision_config=vis)
    tm = hf_model(cfg, seed=3)
    jm = flax_from(tm, cfg)
    pv = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        proj = tm.model.get_image_features(pixel_values=pv).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(jm.extract_feature(nhwc(pv))), proj, atol=TOL, rtol=0)


def test_logits_hidden_left_padding_multi_image(pair):
    cfg, tm, jm = pair
    ids, mask = batch_two_rows()
    torch.manual_seed(2)
    pv = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        o = tm(input_ids=torch.tensor(ids), pixel_values=pv, attention_mask=torch.tensor(mask),
               position_ids=hf_positions(mask), output_hidden_states=True)
    # a dummy (flag 0) tile in the middle must be skipped
    pv_j = jnp.concatenate([nhwc(pv)[:2], jnp.zeros((1, 56, 56, 3)), nhwc(pv)[2:]])
    flags = jnp.array([1, 1, 0, 1, 1])
    out = jm(jnp.asarray(ids), jnp.asarray(mask), pv_j, flags)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out["logits"])[real], o.logits.numpy()[real], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out["hidden_states"])[real], o.hidden_states[-1].numpy()[real],
                               atol=TOL, rtol=0)
    # PPO log-probs of the given next tokens
    lp = np.asarray(token_logprobs(out["logits"][:, :-1], jnp.asarray(ids[:, 1:])))
    ref = torch.log_softmax(o.logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:, None]))[..., 0].numpy()
    np.testing.assert_allclose(lp[real[:, 1:]], ref[real[:, 1:]], atol=TOL, rtol=0)
    lp2 = np.asarray(iv.target_logprobs(jm, jnp.asarray(ids), jnp.asarray(mask), pv_j, flags))
    np.testing.assert_allclose(lp2[real[:, 1:]], ref[real[:, 1:]], atol=TOL, rtol=0)


def test_greedy_16_tokens_match_hf(pair):
    cfg, tm, jm = pair
    ids, mask = batch_two_rows()
    torch.manual_seed(2)
    pv = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        ref = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=pv,
                          max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    ref = ref[:, ids.shape[1]:].numpy()
    got = iv.generate(jm, jnp.asarray(ids), jnp.asarray(mask), nhwc(pv), jnp.ones(4, jnp.int32),
                      max_new_tokens=16, eos_token_id=-1)
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_cache_decode_matches_full_forward(pair):
    """prefill + decode_step logits equal the full forward on the extended sequence (right padding too)."""
    cfg, _, jm = pair
    ids = jnp.array([[1, 20, 21, 22, 23, 24], [1, 30, 31, 0, 0, 0]])
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    new = jnp.array([[40, 41, 42], [50, 51, 52]])
    cache = iv.init_cache(cfg, 2, 9)
    cache, lg = jax.jit(lambda c: iv.prefill(jm, c, ids, mask))(cache)
    step = jax.jit(lambda c, t: iv.decode_step(jm, c, t))
    logits = [lg]
    for k in range(3):
        cache, lg = step(cache, new[:, k])
        logits.append(lg)
    for row, n in ((0, 6), (1, 3)):
        full_ids = jnp.concatenate([ids[row, :n], new[row]])[None]
        full = jm(full_ids)["logits"][0]
        for k in range(4):
            np.testing.assert_allclose(np.asarray(logits[k][row]), np.asarray(full[n - 1 + k]), atol=TOL, rtol=0)


def test_sampling_modes(pair):
    cfg, _, jm = pair
    ids = jnp.array([[1, 20, 21, 22]])
    greedy = iv.generate(jm, ids, max_new_tokens=6, eos_token_id=-1)
    nucleus_tiny = iv.generate(jm, ids, max_new_tokens=6, temperature=1.0, top_p=1e-6, eos_token_id=-1,
                               rng=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(nucleus_tiny))  # top-p → top-1
    a = iv.generate(jm, ids, max_new_tokens=6, temperature=1.0, top_p=0.9, eos_token_id=-1, rng=jax.random.key(1))
    b = iv.generate(jm, ids, max_new_tokens=6, temperature=1.0, top_p=0.9, eos_token_id=-1, rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (1, 6) and int(a.max()) < cfg.llm_config.vocab_size
    # EOS stops a row and pads after it
    first = int(greedy[0, 0])
    stopped = iv.generate(jm, ids, max_new_tokens=6, eos_token_id=first, pad_token_id=0)
    assert int(stopped[0, 0]) == first and np.all(np.asarray(stopped[0, 1:]) == 0)


def test_remat_bf16_and_logical_axes(pair):
    cfg, tm, jm = pair
    ids = jnp.array([[1, 3] + [IMG] * K + [4, 9, 10]])
    pv = jax.random.normal(jax.random.key(0), (1, 56, 56, 3))
    labels = jnp.where(ids == IMG, -100, ids)

    def loss_fn(model):
        return iv.lm_loss(model(ids, None, pv)["logits"], labels)[0]

    rm = flax_from(tm, dataclasses.replace(cfg, remat=True))
    l0, g0 = nnx.jit(nnx.value_and_grad(loss_fn))(jm)
    l1, g1 = nnx.jit(nnx.value_and_grad(loss_fn))(rm)
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # bf16 compute with fp32 params
    bm = flax_from(tm, cfg, dtype=jnp.bfloat16)
    out = bm(ids, None, pv)
    assert out["hidden_states"].dtype == jnp.bfloat16 and out["logits"].dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bm, nnx.Param)))
    assert np.isfinite(np.asarray(out["logits"])).all()
    # logical axis names
    specs = jax.tree.map(lambda v: tuple(v.get_value()), nnx.get_partition_spec(nnx.state(jm, nnx.Param)),
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    lm = specs["language_model"]["model"]
    assert lm["layers"]["self_attn"]["q_proj"]["kernel"] == ("layers", "embed", "heads")
    assert lm["layers"]["self_attn"]["k_proj"]["kernel"] == ("layers", "embed", "kv")
    assert lm["layers"]["mlp"]["down_proj"]["kernel"] == ("layers", "mlp", "embed")
    assert lm["embed_tokens"]["embedding"] == ("vocab", "embed")
    assert specs["language_model"]["lm_head"]["kernel"] == ("embed", "vocab")
    assert specs["vision_model"]["layers"]["mlp"]["fc1"]["kernel"] == ("layers", "embed", "mlp")


def test_tied_embeddings_match_hf():
    cfg = iv.get_config("tiny")
    cfg = dataclasses.replace(cfg, llm_config=dataclasses.replace(cfg.llm_config, tie_word_embeddings=True))
    tm = hf_model(cfg, seed=5)
    jm = flax_from(tm, cfg)
    assert not hasattr(jm.language_model, "lm_head")
    ids = torch.tensor([[1, 20, 21, 22, 23]])
    with torch.no_grad():
        ref = tm(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(np.asarray(jm(jnp.asarray(ids.numpy()))["logits"]), ref, atol=TOL, rtol=0)


def test_vit_drop_path():
    cfg = iv.get_config("tiny")
    vis = dataclasses.replace(cfg.vision_config, num_hidden_layers=3)
    cfg = dataclasses.replace(cfg, vision_config=vis)
    sd = {k: v.detach().numpy() for k, v in hf_model(cfg, seed=4).state_dict().items()}
    jm = cv.load_hf_model(sd, dataclasses.replace(cfg, vision_config=dataclasses.replace(vis, drop_path_rate=0.5)))
    pv = jax.random.normal(jax.random.key(0), (8, 56, 56, 3))
    det = np.asarray(jm.vision_model(pv))
    sto = np.asarray(jm.vision_model(pv, rng=jax.random.key(1)))
    assert np.isfinite(sto).all()
    changed = np.abs(sto - det).max(axis=(1, 2)) > 1e-6  # whole samples are dropped or rescaled
    assert changed.any()
