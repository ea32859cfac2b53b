"""InternVL3 (InternViT + pixel shuffle + mlp1 + Qwen2) in Flax NNX, with jittable KV-cache generation.

Spec: `spec/internvl.md`. Attribute names mirror the original remote-code checkpoint (`vision_model`, `mlp1`,
`language_model`) so conversion is a rename + transpose. Everything is static-shape: image features are merged
at `<IMG_CONTEXT>` positions with a cumsum gather (no boolean indexing), tiles are padded to a fixed count and
filtered with `image_flags`, and generation uses a fixed-size cache with a `lax.while_loop` decode.

Conventions: `pixel_values` [N_tiles, H, W, 3] NHWC, ImageNet-normalised; `input_ids`/`attention_mask` [B, T].
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from recogdrive_jax.models.internvit import InternViT, InternViTConfig, pixel_shuffle_v2
from recogdrive_jax.models.layers import NEG_INF, REMAT_POLICIES, dense, first_argmax, token_logprobs
from recogdrive_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM, attention_mask_2d_to_3d, positions_from_mask
from recogdrive_jax.parallel.activations import constrain
from recogdrive_jax.parallel.kernels import ATTENTION_IMPLS

Dtype = Any
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    """Chat-model config: the original `InternVLChatConfig` fields plus the token ids the model needs."""

    vision_config: InternViTConfig = dataclasses.field(default_factory=InternViTConfig)
    llm_config: Qwen2Config = dataclasses.field(default_factory=Qwen2Config)
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    template: str = "internvl2_5"
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    projector_layer_norm_eps: float = 1e-5
    # Qwen vocabulary ids (spec §3); the tiny config uses the ids of `data/tokenizer.py`.
    image_token_id: int = 151667  # <IMG_CONTEXT>
    img_start_token_id: int = 151665
    img_end_token_id: int = 151666
    eos_token_id: int = 151645  # <|im_end|>
    pad_token_id: int = 151643  # <|endoftext|>
    remat: bool = False  # per-layer activation checkpointing in both towers
    remat_policy: str = "full"  # what a checkpointed layer keeps (layers.REMAT_POLICIES)
    attention_impl: str = "auto"  # both towers' attention kernel (layers.dot_product_attention)

    def __post_init__(self):
        if self.ps_version != "v2":
            raise ValueError(f"config: ps_version {self.ps_version!r}; only 'v2' is supported")
        if self.select_layer != -1:
            raise ValueError(f"config: select_layer {self.select_layer}; only -1 (last layer) is supported")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"config: remat_policy {self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"config: attention_impl {self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        s = 1 / self.downsample_ratio
        if abs(s - round(s)) > 1e-6 or self.vision_config.grid_size % round(s):
            raise ValueError(f"config: downsample_ratio {self.downsample_ratio} must be 1/k with k dividing the "
                             f"{self.vision_config.grid_size}-patch grid")

    @property
    def force_image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def num_image_token(self) -> int:
        """Tokens per tile: int((448 // 14)² · 0.5²) = 256 (spec §3)."""
        return int(self.vision_config.grid_size ** 2 * self.downsample_ratio ** 2)

    @property
    def projector_in(self) -> int:
        return self.vision_config.hidden_size * int(round(1 / self.downsample_ratio)) ** 2


_VIT_300M = InternViTConfig()

VARIANTS: dict[str, InternVLConfig] = {
    "internvl3_1b": InternVLConfig(
        _VIT_300M, Qwen2Config(vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2,
                               rope_scaling={"type": "dynamic", "factor": 2.0})),
    # Standard Qwen2.5-1.5B shape; spec §1 says to check against the real config.json (no copy was found).
    "internvl3_2b": InternVLConfig(
        _VIT_300M, Qwen2Config(vocab_size=151674, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2,
                               rope_scaling={"type": "dynamic", "factor": 2.0})),
    "internvl3_8b": InternVLConfig(
        _VIT_300M, Qwen2Config(vocab_size=151674, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                               num_attention_heads=28, num_key_value_heads=4,
                               rope_scaling={"type": "dynamic", "factor": 2.0})),
    # Tiny: 56 px tiles (4x4 patches -> 4 image tokens), vocabulary and ids of data/tokenizer.py.
    "tiny": InternVLConfig(
        InternViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        image_size=56, patch_size=14),
        Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
        max_dynamic_patch=6, image_token_id=5, img_start_token_id=3, img_end_token_id=4, eos_token_id=2,
        pad_token_id=0),
}


def get_config(name: str, **overrides) -> InternVLConfig:
    """A named variant (`internvl3_1b`, `internvl3_2b`, `internvl3_8b`, `tiny`) with top-level overrides."""
    if name not in VARIANTS:
        raise KeyError(f"InternVL variant {name!r} unknown; known: {sorted(VARIANTS)}")
    return dataclasses.replace(VARIANTS[name], **overrides)


def with_field_overrides(cfg: InternVLConfig, llm: dict | None = None, vit: dict | None = None) -> InternVLConfig:
    """`config.model.llm.*` / `vit.*` field overrides of the LLM / ViT configs (e.g. the vocabulary of a small
    generated tokenizer), checked by name."""
    from recogdrive_jax.errors import UserError
    llm, vit = dict(llm or {}), dict(vit or {})
    for block, sub, name in ((llm, cfg.llm_config, "llm"), (vit, cfg.vision_config, "vit")):
        known = sorted(f.name for f in dataclasses.fields(sub))
        bad = sorted(set(block) - set(known))
        if bad:
            raise UserError(f"config.model.{name}: unknown field(s) {bad}; allowed: {known}")
    return dataclasses.replace(cfg, llm_config=dataclasses.replace(cfg.llm_config, **llm),
                               vision_config=dataclasses.replace(cfg.vision_config, **vit))


# --------------------------------------------------------------------------------------------- HF config I/O

def _pick(d: dict, cls, renames: dict[str, str] | None = None, where: str = "") -> dict:
    """Fields of dataclass `cls` found in `d` (after `renames` hf_name -> field)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for k, v in d.items():
        k = (renames or {}).get(k, k)
        if k in names:
            out[k] = v
    return out


def _scalar(v):
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


def _llm_from_dict(d: dict) -> Qwen2Config:
    d = dict(d)
    arch = d.get("architectures") or ["Qwen2ForCausalLM"]
    if d.get("model_type", "qwen2") not in ("qwen2",) or arch[0] not in ("Qwen2ForCausalLM", "Qwen2Model"):
        raise ValueError(f"llm_config: model_type {d.get('model_type')!r} / architectures {arch}: only Qwen2 "
                         "(InternVL3, InternVL2.5-1B) is supported")
    rp = d.get("rope_parameters") or {}
    if "rope_theta" not in d and "rope_theta" in rp:
        d["rope_theta"] = rp["rope_theta"]
    if d.get("rope_scaling") is None and rp.get("rope_type", "default") != "default":
        d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return Qwen2Config(**_pick(d, Qwen2Config))


def config_from_hf(d: dict, **overrides) -> InternVLConfig:
    """InternVLConfig from a config.json dict: native HF (`text_config`) or remote code (`llm_config`)."""
    if "vision_config" not in d or not ({"text_config", "llm_config"} & d.keys()):
        raise ValueError("config.json: expected 'vision_config' and 'text_config' (transformers-native) or "
                         f"'llm_config' (remote code); got keys {sorted(d)}")
    v = dict(d["vision_config"])
    if "text_config" in d:  # transformers-native
        v = {"hidden_size": v.get("hidden_size", 1024), **v}
        vis = InternViTConfig(**_pick(
            {**v, "image_size": _scalar(v.get("image_size", 448)), "patch_size": _scalar(v.get("patch_size", 14))},
            InternViTConfig, {"attention_bias": "qkv_bias", "use_qk_norm": "qk_normalization",
                              "layer_scale_init_value": "initializer_factor"}))
        llm = _llm_from_dict({**d["text_config"], "tie_word_embeddings": native_tie_flag(d)})
        top = {k: v for k, v in _pick(d, InternVLConfig).items() if k not in ("vision_config", "llm_config")}
        top.update(downsample_ratio=d.get("downsample_ratio", 0.5), select_layer=d.get("vision_feature_layer", -1),
                   image_token_id=d.get("image_token_id", 151667))
        for k in ("eos_token_id", "pad_token_id"):  # transformers keeps them in text_config
            if k not in top and isinstance(d["text_config"].get(k), int):
                top[k] = d["text_config"][k]
        if d.get("vision_feature_select_strategy", "default") != "default":
            raise ValueError("config.json: vision_feature_select_strategy must be 'default' (drop CLS)")
    else:  # remote code (InternVLChatConfig)
        vis = InternViTConfig(**_pick({**v, "image_size": _scalar(d.get("force_image_size") or
                                                                  v.get("image_size", 448)),
                                       "patch_size": _scalar(v.get("patch_size", 14))}, InternViTConfig))
        # remote code forces both flags False (spec §1); only this project's own config (an export of a tied
        # model: convert/internvl.CONFIG_NAME, an sft workdir) sets them True
        tie = bool(d.get("tie_word_embeddings", False)) and bool(d["llm_config"].get("tie_word_embeddings", False))
        llm = _llm_from_dict({**d["llm_config"], "tie_word_embeddings": tie})
        top = _pick(d, InternVLConfig)
        top = {k: v for k, v in top.items() if k not in ("vision_config", "llm_config")}
    # Neither transformers nor remote code store <img> / </img> ids; InternVL adds <img>, </img>, <IMG_CONTEXT>
    # consecutively (151665-151667; the tiny tokenizer's 3-5), and the tokenizer check in sft confirms them.
    ctx = int(top.get("image_token_id", InternVLConfig.image_token_id))
    top.setdefault("img_start_token_id", ctx - 2)
    top.setdefault("img_end_token_id", ctx - 1)
    return InternVLConfig(vision_config=vis, llm_config=llm, **{**top, **overrides})


def _major(version) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def native_tie_flag(d: dict) -> bool:
    """Whether a transformers-native InternVL config.json ties lm_head to embed_tokens.

    Where transformers reads the flag depends on its major version (the config records it as
    `transformers_version`): 5.x ties on the top-level `tie_word_embeddings` (InternVLConfig default True, always
    written by save_pretrained); 4.x on `text_config.tie_word_embeddings` (Qwen2Config default False). Without a
    version the top-level flag wins, then text_config's, then 5.x's default.
    """
    top, text = d.get("tie_word_embeddings"), d["text_config"].get("tie_word_embeddings")
    major = _major(d["transformers_version"]) if "transformers_version" in d else None
    if major is not None and major < 5:
        return bool(text) if text is not None else False
    if top is not None:
        return bool(top)
    return bool(text) if text is not None else True


def load_hf_config(path: str, **overrides) -> InternVLConfig:
    """From a checkpoint directory (or a config.json path)."""
    p = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no config.json")
    with open(p) as f:
        return config_from_hf(json.load(f), **overrides)


def _llm_to_dict(c: Qwen2Config, native: bool) -> dict:
    d = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=c.vocab_size,
             hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
             num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
             num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
             rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
             tie_word_embeddings=c.tie_word_embeddings, initializer_range=c.initializer_range,
             attention_dropout=c.attention_dropout, use_sliding_window=False, sliding_window=None)
    rs = dict(c.rope_scaling or ())
    if native:  # transformers >= 5: rope_parameters
        d["rope_parameters"] = {"rope_type": "default", **rs, "rope_theta": c.rope_theta}
    else:
        d["rope_theta"] = c.rope_theta
        d["rope_scaling"] = {**rs, "type": rs["rope_type"]} if rs else None
    return d


def config_to_hf(cfg: InternVLConfig, layout: str = "native") -> dict:
    """config.json dict for `layout` 'native' (InternVLForConditionalGeneration) or 'remote' (InternVLChatModel).

    The tie flag is written where every transformers major reads it (native: top level and text_config). A 'remote'
    dict of a tied model is only this project's own config (remote code forces the flag False: an export for it
    unties first, `convert.internvl.untied`).
    """
    v = cfg.vision_config
    # Fields transformers does not use but a round trip needs (tiling, template, token ids); HF keeps extra keys.
    extra = dict(template=cfg.template, dynamic_image_size=cfg.dynamic_image_size, use_thumbnail=cfg.use_thumbnail,
                 min_dynamic_patch=cfg.min_dynamic_patch, max_dynamic_patch=cfg.max_dynamic_patch,
                 img_start_token_id=cfg.img_start_token_id, img_end_token_id=cfg.img_end_token_id,
                 eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    if layout == "native":
        return dict(**extra,
            architectures=["InternVLForConditionalGeneration"], model_type="internvl",
            downsample_ratio=cfg.downsample_ratio, image_token_id=cfg.image_token_id,
            image_seq_length=cfg.num_image_token, projector_hidden_act="gelu", vision_feature_layer=-1,
            vision_feature_select_strategy="default", tie_word_embeddings=cfg.llm_config.tie_word_embeddings,
            text_config=_llm_to_dict(cfg.llm_config, True),
            vision_config=dict(
                model_type="internvl_vision", hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
                num_attention_heads=v.num_attention_heads, intermediate_size=v.intermediate_size,
                attention_bias=v.qkv_bias, use_qk_norm=v.qk_normalization, norm_type=v.norm_type,
                layer_norm_eps=v.layer_norm_eps, image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2,
                num_channels=v.num_channels, layer_scale_init_value=v.initializer_factor, hidden_act="gelu",
                initializer_range=v.initializer_range, use_mean_pooling=True))
    if layout == "remote":
        return dict(
            **extra, architectures=["InternVLChatModel"], model_type="internvl_chat",
            downsample_ratio=cfg.downsample_ratio, ps_version=cfg.ps_version, select_layer=cfg.select_layer,
            force_image_size=v.image_size, image_token_id=cfg.image_token_id,
            use_backbone_lora=0, use_llm_lora=0, tie_word_embeddings=cfg.llm_config.tie_word_embeddings,
            llm_config=_llm_to_dict(cfg.llm_config, False),
            vision_config=dict(
                architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=v.hidden_size,
                num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                intermediate_size=v.intermediate_size, qkv_bias=v.qkv_bias, qk_normalization=v.qk_normalization,
                norm_type=v.norm_type, layer_norm_eps=v.layer_norm_eps, image_size=v.image_size,
                patch_size=v.patch_size, num_channels=v.num_channels, initializer_factor=v.initializer_factor,
                initializer_range=v.initializer_range, drop_path_rate=v.drop_path_rate, hidden_act="gelu",
                use_flash_attn=False))
    raise ValueError(f"layout {layout!r}; expected 'native' or 'remote'")


# --------------------------------------------------------------------------------------------------- modules

class Projector(nnx.Module):
    """mlp1: LayerNorm(4096, eps 1e-5) → Linear → exact GELU → Linear (keys mlp1.0 / .1 / .3)."""

    def __init__(self, din: int, dout: int, eps: float, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.layer_norm = nnx.LayerNorm(
            din, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
            scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=nnx.initializers.normal(0.02))
        self.linear_1 = dense(din, dout, ("mlp", "embed"), **kw)
        self.linear_2 = dense(dout, dout, (None, "embed"), **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(self.layer_norm(x)), approximate=False))


def merge_image_embeds(inputs_embeds: jax.Array, input_ids: jax.Array, image_embeds: jax.Array,
                       image_token_id: int, image_flags: jax.Array | None = None) -> jax.Array:
    """Writes image features at `<IMG_CONTEXT>` positions, row-major over (batch, position), static shapes.

    inputs_embeds [B, T, D], input_ids [B, T], image_embeds [N, K, D] (N tiles padded to a static count),
    image_flags [N] (1 = real tile). Real tiles are consumed in order; flag-0 tiles are skipped, as upstream's
    `vit_embeds[image_flags == 1]`. Surplus context tokens (more than real features) read the last feature:
    validate counts on the host (`data/template.py` does).
    """
    b, t, d = inputs_embeds.shape
    n, k, _ = image_embeds.shape
    if image_flags is not None:  # stable: real tiles first, in their original order
        order = jnp.argsort(jnp.asarray(image_flags) <= 0, stable=True)
        image_embeds = image_embeds[order]
    feats = image_embeds.reshape(n * k, d).astype(inputs_embeds.dtype)
    sel = (input_ids == image_token_id).reshape(-1)  # [B*T]
    idx = jnp.clip(jnp.cumsum(sel) - 1, 0, n * k - 1)
    out = jnp.where(sel[:, None], feats[idx], inputs_embeds.reshape(b * t, d))
    return out.reshape(b, t, d)


class InternVLModel(nnx.Module):
    """InternVL chat model. `model(input_ids, attention_mask, pixel_values, image_flags)` → dict (see __call__)."""

    def __init__(self, cfg: InternVLConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        run = dict(remat=cfg.remat, remat_policy=cfg.remat_policy, attention_impl=cfg.attention_impl)
        self.vision_model = InternViT(cfg.vision_config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **run)
        self.mlp1 = Projector(cfg.projector_in, cfg.llm_config.hidden_size, cfg.projector_layer_norm_eps,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.language_model = Qwen2ForCausalLM(cfg.llm_config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                               **run)

    def vision_features(self, pixel_values: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """[N, H, W, 3] → pixel-shuffled ViT features [N, K, 4·D_vit] (before mlp1)."""
        x = self.vision_model(pixel_values, rng=rng)[:, 1:]  # drop CLS: [N, h*w, D]
        n, hw, d = x.shape
        g = int(round(hw ** 0.5))
        x = pixel_shuffle_v2(x.reshape(n, g, g, d), self.cfg.downsample_ratio)
        return x.reshape(n, -1, x.shape[-1])

    def extract_feature(self, pixel_values: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """[N, H, W, 3] → image embeddings [N, num_image_token, D_llm]."""
        return self.mlp1(self.vision_features(pixel_values, rng=rng))

    def embed_inputs(self, input_ids, pixel_values=None, image_flags=None, *, rng=None):
        emb = self.language_model.model.embed_tokens(input_ids)  # [B, T, D]
        image_embeds = None
        if pixel_values is not None:
            image_embeds = self.extract_feature(pixel_values, rng=rng)
            emb = merge_image_embeds(emb, input_ids, image_embeds, self.cfg.image_token_id, image_flags)
        return emb, image_embeds

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 pixel_values: jax.Array | None = None, image_flags: jax.Array | None = None,
                 positions: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 compute_logits: bool = True, rng: jax.Array | None = None) -> dict:
        """Full-sequence forward (training, scoring, hidden-state caching).

        input_ids [B, T]; attention_mask [B, T] (1 = real; left or right padding); pixel_values [N, H, W, 3];
        image_flags [N]; positions [B, T] (default cumsum(mask) - 1); inputs_embeds replaces the embedding +
        merge step when given; rng enables ViT drop path.
        Returns {'logits' [B, T, V] fp32 (if compute_logits), 'hidden_states' [B, T, D] (after the final RMSNorm,
        = HF hidden_states[-1]), 'inputs_embeds' [B, T, D], 'image_embeds' [N, K, D] (if pixel_values)}.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        image_embeds = None
        if inputs_embeds is None:
            inputs_embeds, image_embeds = self.embed_inputs(input_ids, pixel_values, image_flags, rng=rng)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        hidden, _ = self.language_model.model(inputs_embeds, positions, attention_mask_2d_to_3d(attention_mask))
        out = {"hidden_states": hidden, "inputs_embeds": inputs_embeds}
        if image_embeds is not None:
            out["image_embeds"] = image_embeds
        if compute_logits:
            out["logits"] = constrain(self.language_model.logits(hidden), ("batch", "seq", "vocab"))
        return out


def init_model(cfg: InternVLConfig, *, seed: int = 0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> InternVLModel:
    """Randomly initialised model; the initialisers run in one jitted call (eager init dispatches op by op)."""
    def make():
        return InternVLModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))

    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.state(make()))()
    return nnx.merge(graphdef, state)


def abstract_model(cfg: InternVLConfig, *, dtype: Dtype = jnp.float32,
                   param_dtype: Dtype = jnp.float32) -> InternVLModel:
    """Shape-only model (no memory), for restoring checkpoints into."""
    return nnx.eval_shape(lambda: InternVLModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


# ------------------------------------------------------------------------------------------- losses, logprobs

def lm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shifted next-token cross-entropy averaged over labels != -100. Returns (loss, n_tokens)."""
    lg, tg = logits[:, :-1], labels[:, 1:]
    valid = tg != IGNORE_INDEX
    lp = token_logprobs(lg, jnp.where(valid, tg, 0))
    n = jnp.sum(valid)
    return -jnp.sum(jnp.where(valid, lp, 0.0)) / jnp.maximum(n, 1), n


def target_logprobs(model: InternVLModel, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                    pixel_values: jax.Array | None = None, image_flags: jax.Array | None = None, *,
                    temperature: float = 1.0) -> jax.Array:
    """log p(input_ids[:, t] | input_ids[:, <t], images) for t ≥ 1 → [B, T-1] fp32 (PPO ratios; mask outside):
    the forward pass, then `layers.token_logprobs` on the shifted logits."""
    logits = model(input_ids, attention_mask, pixel_values, image_flags)["logits"]
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)


# ------------------------------------------------------------------------------------------------ generation

def init_cache(cfg: InternVLConfig, batch: int, max_len: int, dtype: Dtype = jnp.float32) -> dict:
    """Fixed-size decode state: k/v [L, B, S, KV, hd], key_valid [B, S], index (next slot), next_pos [B]."""
    c = cfg.llm_config
    shape = (c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "key_valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32),
            "next_pos": jnp.zeros((batch,), jnp.int32)}


def prefill(model: InternVLModel, cache: dict, input_ids: jax.Array, attention_mask: jax.Array,
            pixel_values: jax.Array | None = None, image_flags: jax.Array | None = None) -> tuple[dict, jax.Array]:
    """Runs the prompt [B, T] into an empty cache; returns (cache, logits [B, V] at each row's last real token)."""
    b, t = input_ids.shape
    s = cache["k"].shape[2]
    emb, _ = model.embed_inputs(input_ids, pixel_values, image_flags)
    am = attention_mask.astype(bool)
    key_valid = jax.lax.dynamic_update_slice(cache["key_valid"], am, (0, 0))
    causal = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]  # [T, S]
    mask = causal[None] & key_valid[:, None, :]
    hidden, kv = model.language_model.model(emb, positions_from_mask(attention_mask), mask,
                                            {"k": cache["k"], "v": cache["v"]}, jnp.zeros((), jnp.int32))
    last = t - 1 - jnp.argmax(am[:, ::-1], axis=1)  # last real token (left or right padding)
    h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    new = {**kv, "key_valid": key_valid, "index": jnp.asarray(t, jnp.int32),
           "next_pos": jnp.sum(am, axis=1).astype(jnp.int32)}
    return new, model.language_model.logits(h_last)


def decode_step(model: InternVLModel, cache: dict, tokens: jax.Array,
                layer_states: tuple | None = None) -> tuple[dict, jax.Array]:
    """Feeds one token per row [B] at slot `cache['index']`; returns (cache, logits [B, V]).

    Inside a decode loop pass `layer_states = model.language_model.model.layer_states()`, taken once before the
    loop: the layers then read their weights in place instead of copying a slice of the stacked weights every
    token (the same math)."""
    s = cache["k"].shape[2]
    idx = cache["index"]
    emb = model.language_model.model.embed_tokens(tokens[:, None])
    key_valid = jax.lax.dynamic_update_slice(cache["key_valid"], jnp.ones((tokens.shape[0], 1), bool), (0, idx))
    mask = ((jnp.arange(s) <= idx)[None, :] & key_valid)[:, None, :]  # [B, 1, S]
    hidden, kv = model.language_model.model(emb, cache["next_pos"][:, None], mask,
                                            {"k": cache["k"], "v": cache["v"]}, idx, layer_states=layer_states)
    new = {**kv, "key_valid": key_valid, "index": idx + 1, "next_pos": cache["next_pos"] + 1}
    return new, model.language_model.logits(hidden[:, 0])


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling. logits [B, V] → [B]."""
    if temperature == 0.0:
        return first_argmax(logits)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        keep = (cum - probs) < top_p  # always keeps the top token
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p", "cache_dtype"))
def _generate(graphdef, state, input_ids, attention_mask, pixel_values, image_flags, rng, eos_token_id,
              pad_token_id, *, max_new_tokens, temperature, top_p, cache_dtype):
    model = nnx.merge(graphdef, state)
    b, t = input_ids.shape
    cache = init_cache(model.cfg, b, t + max_new_tokens, cache_dtype)
    cache, logits = prefill(model, cache, input_ids, attention_mask, pixel_values, image_flags)
    out = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)
    done = jnp.zeros((b,), bool)
    layer_states = model.language_model.model.layer_states()  # sliced once, read in place by every step

    def cond(c):
        return (c["step"] < max_new_tokens) & ~jnp.all(c["done"])

    def body(c):
        key, sub = jax.random.split(c["rng"])
        tok = sample_token(c["logits"], sub, temperature, top_p)
        tok = jnp.where(c["done"], pad_token_id, tok)
        out = c["out"].at[:, c["step"]].set(tok)
        done = c["done"] | (tok == eos_token_id)
        cache, logits = decode_step(model, c["cache"], tok, layer_states)
        return {"cache": cache, "logits": logits, "out": out, "done": done, "step": c["step"] + 1, "rng": key}

    c = jax.lax.while_loop(cond, body, {"cache": cache, "logits": logits, "out": out, "done": done,
                                        "step": jnp.zeros((), jnp.int32), "rng": rng})
    return c["out"]


def generate(model: InternVLModel, input_ids: jax.Array, attention_mask: jax.Array | None = None,
             pixel_values: jax.Array | None = None, image_flags: jax.Array | None = None, *,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: int | None = None, pad_token_id: int | None = None, rng: jax.Array | None = None,
             cache_dtype: Dtype | None = None) -> jax.Array:
    """Jitted prefill + `lax.while_loop` decode → new tokens [B, max_new_tokens] (pad after EOS).

    Stops early when every row has emitted `eos_token_id` (default cfg.eos_token_id; pass -1 for never).
    """
    cfg = model.cfg
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, jnp.asarray(input_ids), jnp.asarray(attention_mask), pixel_values,
                     image_flags, rng, jnp.int32(eos), jnp.int32(pad), max_new_tokens=int(max_new_tokens),
                     temperature=float(temperature), top_p=float(top_p),
                     cache_dtype=jnp.dtype(cache_dtype or model.dtype))
