"""The OpenTrackVLA recipe (seed 002) on this project's InternVL: the LLM as a feature encoder over continuous
embeddings, a learned [ACT] query token, and an MLP regression head on its last hidden state.

    seq  = [text embeddings] + [TVI(t_0, coarse), 4 coarse tokens of history frame 0, TVI(t_1, coarse), ...]
           + [TVI(t_H, fine), 64 fine tokens of the current frame] + [ACT]
    h    = LLM(inputs_embeds=seq)[:, -1]                  # the [ACT] position (always the last slot)
    traj = tanh(MLP3(h)) * alpha                          # `ActHead`, loss = beta_nav * masked MSE

Frame features: the seed precomputes DINO+SigLIP features per frame; here the project's **InternViT stands in** — its
pixel-shuffled patch grid (the features InternVL's `mlp1` projects) is average-pooled to `coarse_tokens` (2x2) per
history frame and `fine_tokens` (8x8) for the current frame, and `mlp1` is the seed's CrossModalityProjector. TVI
(time/view) embeddings are learned: one token = time_emb[t] + kind_emb[kind] (kind 0 coarse, 1 fine) inserted
before each frame's tokens. Text and frame tokens sit in one right-padded row whose pads are masked out, so [ACT]
is always the last slot (as the seed's `last_hidden_state[:, -1]`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recogdrive_jax.models.internvl import InternVLModel
from recogdrive_jax.models.layers import dense, to_dtype
from recogdrive_jax.models.planner import PlannerConfig, RegressionPlanner
from recogdrive_jax.models.qwen2 import attention_mask_2d_to_3d, positions_from_mask

# Slot kinds of `token_layout` (what each position of the sequence is).
TEXT, TVI, COARSE, FINE, ACT = 0, 1, 2, 3, 4


class ActHead(RegressionPlanner):
    """The seed's PlannerHead3L: 3-layer MLP (GELU) on the [ACT] hidden state only -> tanh -> x alpha. Extends the
    `planner.kind=mlp` head: its masked-MSE x beta_nav loss, alpha scaling, metrics and `sample` are reused; only the
    input differs (cond['vl_states'][:, -1] = h_act, no history / ego-status encoders)."""

    def __init__(self, cfg: PlannerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = to_dtype(cfg.dtype)
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=jnp.float32)
        self.fc1 = dense(cfg.vl_dim, cfg.mlp_hidden, ("embed", "mlp"), **kw)
        self.fc2 = dense(cfg.mlp_hidden, cfg.mlp_hidden, ("mlp", "mlp"), **kw)
        self.fc3 = dense(cfg.mlp_hidden, cfg.horizon * cfg.action_dim, ("mlp", None), **kw)

    def forward(self, cond: Mapping[str, jax.Array]) -> jax.Array:
        """cond['vl_states'] [B, L, D] (its last row is h_act) -> tanh outputs [B, H, A]."""
        h = cond["vl_states"][:, -1].astype(self.dtype)  # [B, D]
        z = self.fc3(jax.nn.gelu(self.fc2(jax.nn.gelu(self.fc1(h), approximate=False)), approximate=False))
        return jnp.tanh(z.astype(jnp.float32)).reshape(h.shape[0], self.cfg.horizon, self.cfg.action_dim)


def token_layout(text_len: int, history_frames: int, coarse_tokens: int, fine_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(kind [T], time [T]) of every slot: TEXT x text_len, then per history frame t: TVI, COARSE x coarse_tokens,
    then TVI, FINE x fine_tokens for the current frame (time = history_frames), then ACT. time = -1 for text/ACT."""
    kinds, times = [TEXT] * text_len, [-1] * text_len
    for t in range(history_frames):
        kinds += [TVI] + [COARSE] * coarse_tokens
        times += [t] * (1 + coarse_tokens)
    kinds += [TVI] + [FINE] * fine_tokens + [ACT]
    times += [history_frames] * (1 + fine_tokens) + [-1]
    return np.asarray(kinds, np.int32), np.asarray(times, np.int32)


def _pool_grid(x: jax.Array, out_tokens: int) -> jax.Array:
    """x [N, K, C] on a sqrt(K) grid -> [N, out_tokens, C] average-pooled to a sqrt(out_tokens) grid."""
    n, k, c = x.shape
    g, o = math.isqrt(k), math.isqrt(out_tokens)
    if g * g != k or o * o != out_tokens or g % o:
        raise ValueError(f"opentrackvla: cannot pool a {g}x{g} feature grid ({k} tokens) to {out_tokens} tokens "
                         "(needs square counts and a grid divisible by the output side)")
    r = g // o
    return x.reshape(n, o, r, o, r, c).astype(jnp.float32).mean(axis=(2, 4)).reshape(n, o * o, c).astype(x.dtype)


class OpenTrackVLA(nnx.Module):
    """InternVL (vision tower + mlp1 projector + LLM) + TVI embeddings + [ACT] token + `ActHead`.

    batch = {'text_ids' [B, Tt], 'text_mask' [B, Tt] (right-padded), 'frames' [B, H+1, S, S, 3] (oldest history frame
    first, the current frame last), 'future' [B, 8, 3] (+ optional 'future_mask' [B, 8])}.
    """

    def __init__(self, vlm_cfg, head_cfg: PlannerConfig, *, history_frames: int, coarse_tokens: int = 4,
                 fine_tokens: int = 64, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        d = vlm_cfg.llm_config.hidden_size
        if head_cfg.vl_dim != d:
            raise ValueError(f"opentrackvla: head vl_dim={head_cfg.vl_dim} must equal the LLM width {d}")
        self.history_frames, self.coarse_tokens, self.fine_tokens = int(history_frames), int(coarse_tokens), int(fine_tokens)
        self.vlm = InternVLModel(vlm_cfg, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.tvi_time = nnx.Param(init(rngs.params(), (self.history_frames + 1, d), jnp.float32), sharding=(None, "embed"))
        self.tvi_kind = nnx.Param(init(rngs.params(), (2, d), jnp.float32), sharding=(None, "embed"))
        self.act_token = nnx.Param(init(rngs.params(), (d,), jnp.float32), sharding=("embed",))
        self.head = ActHead(head_cfg, rngs=rngs)

    def frame_tokens(self, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
        """frames [B, H+1, S, S, 3] -> (coarse [B, H, c, D], fine [B, f, D]) projected by mlp1."""
        b, f = frames.shape[:2]
        if f != self.history_frames + 1:
            raise ValueError(f"opentrackvla: {f} frames, expected {self.history_frames} history + 1 current")
        feats = self.vlm.vision_features(frames.reshape(b * f, *frames.shape[2:]).astype(self.vlm.dtype))
        feats = feats.reshape(b, f, *feats.shape[1:])  # [B, F, K, C]
        coarse = _pool_grid(feats[:, :-1].reshape(b * (f - 1), *feats.shape[2:]), self.coarse_tokens)
        fine = _pool_grid(feats[:, -1], self.fine_tokens)
        return self.vlm.mlp1(coarse).reshape(b, f - 1, self.coarse_tokens, -1), self.vlm.mlp1(fine)

    def tvi(self, t: int, kind: int) -> jax.Array:
        return self.tvi_time[...][t] + self.tvi_kind[...][kind]  # [D]

    def sequence(self, text_ids: jax.Array, text_mask: jax.Array, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (inputs_embeds [B, T, D], attention mask [B, T]) laid out as `token_layout(Tt, H, c, f)`."""
        emb = self.vlm.language_model.model.embed_tokens(text_ids)  # [B, Tt, D]
        coarse, fine = self.frame_tokens(frames)
        b, dt = emb.shape[0], emb.dtype
        one = lambda v: jnp.broadcast_to(v.astype(dt)[None, None], (b, 1, v.shape[-1]))  # noqa: E731
        parts = [emb]
        for t in range(self.history_frames):
            parts += [one(self.tvi(t, 0)), coarse[:, t].astype(dt)]
        parts += [one(self.tvi(self.history_frames, 1)), fine.astype(dt), one(self.act_token[...])]
        seq = jnp.concatenate(parts, axis=1)
        mask = jnp.concatenate([text_mask.astype(jnp.int32),
                                jnp.ones((b, seq.shape[1] - emb.shape[1]), jnp.int32)], axis=1)
        return seq, mask

    def act_hidden(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """The LLM's final-norm hidden state at [ACT] (the last slot): [B, D] fp32."""
        seq, mask = self.sequence(batch["text_ids"], batch["text_mask"], batch["frames"])
        hidden, _ = self.vlm.language_model.model(seq, positions_from_mask(mask), attention_mask_2d_to_3d(mask))
        return hidden[:, -1].astype(jnp.float32)

    def _cond(self, batch) -> dict:
        return {"vl_states": self.act_hidden(batch)[:, None]}

    def loss(self, batch: Mapping[str, Any], rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """beta_nav x masked MSE of the head (`RegressionPlanner.loss`), on h_act."""
        sub = {"cond": self._cond(batch), "future": batch["future"]}
        if "future_mask" in batch:
            sub["future_mask"] = batch["future_mask"]
        return self.head.loss(sub, rng)

    def sample(self, batch: Mapping[str, Any], rng: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
        """Trajectories [B, 8, 3] raw units (one forward: the head is deterministic)."""
        return self.head.sample(self._cond(batch), rng, deterministic=deterministic)
