"""The VLM's hidden states of driving prompts (the `cache` stage's per-sample work): a scene → the upstream driving
prompt (front camera tiles + 4 past poses + command, optionally the ego-status line) → right-padded batches →
the final-norm hidden states of the InternVL."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from recogdrive_jax.data import driving_prompt as dp
from recogdrive_jax.data.tiling import load_image
from recogdrive_jax.sim import render


def front_image(scene) -> np.ndarray:
    """Front-camera RGB uint8 [H, W, 3] of one (unbatched) scene."""
    return np.asarray(render.render_front(scene))


class PromptBuilder:
    """Scene → (input_ids [t], pixel_values [n, S, S, 3]) with the driving prompt, as the VLM is queried upstream.
    `ego_status`: add the ego-status line (velocity, acceleration) to the prompt; None = `cache_cfg.ego_status_text`
    ('auto' / 'on': yes, as upstream's NAVSIM prompt and the synthetic SFT trajectory QA; 'off': no)."""

    def __init__(self, cfg, tok, cache_cfg, ego_status: bool | None = None):
        if ego_status is None:
            ego_status = cache_cfg.ego_status_text != "off"
        self.ego_status = bool(ego_status)
        self.cfg, self.tok = cfg, tok
        self.max_num, self.min_num = int(cache_cfg.max_dynamic_patch), int(cache_cfg.min_dynamic_patch)
        self.use_thumbnail = bool(cache_cfg.use_thumbnail)
        sm = cache_cfg.system_message
        self.system = dp.DRIVING_SYSTEM if sm == "__driving__" else (sm or None)

    def tiles(self, image: np.ndarray) -> np.ndarray:
        return load_image(image, image_size=self.cfg.force_image_size, max_num=self.max_num, min_num=self.min_num,
                          use_thumbnail=self.use_thumbnail)

    def ids(self, scene, num_tiles: int) -> np.ndarray:
        text = dp.driving_prompt(scene.history, dp.scene_command(scene), [num_tiles], self.cfg.num_image_token,
                                 system_message=self.system, status=scene.status if self.ego_status else None)
        return np.asarray(self.tok(text, add_special_tokens=False).input_ids, np.int32)

    def sample(self, scene, image=None) -> tuple[np.ndarray, np.ndarray]:
        pv = self.tiles(front_image(scene) if image is None else image)
        return self.ids(scene, len(pv)), pv


def collate(samples, t: int, m: int, image_size: int, pad_id: int, batch: int) -> dict:
    """Right-padded [batch, t] ids/mask and [batch, m] tiles (rows beyond len(samples) are empty)."""
    out = {"input_ids": np.full((batch, t), pad_id, np.int32), "attention_mask": np.zeros((batch, t), np.int32),
           "pixel_values": np.zeros((batch, m, image_size, image_size, 3), np.float32),
           "image_flags": np.zeros((batch, m), np.int32)}
    for r, (ids, pv) in enumerate(samples):
        out["input_ids"][r, :len(ids)] = ids
        out["attention_mask"][r, :len(ids)] = 1
        out["pixel_values"][r, :len(pv)] = pv
        out["image_flags"][r, :len(pv)] = 1
    return out


def make_forward(mdef, rt):
    """Jitted `(params, batch) -> hidden [b, T, D] fp32` (after the final RMSNorm = HF hidden_states[-1]); batches
    are placed over the batch axes of the runtime `rt` (this process's devices)."""
    def fwd(params, batch):
        model = mdef.bind(params)
        b, m = batch["image_flags"].shape
        pv = batch["pixel_values"].reshape(b * m, *batch["pixel_values"].shape[2:]).astype(model.dtype)
        out = model(batch["input_ids"], batch["attention_mask"], pv, batch["image_flags"].reshape(-1),
                    compute_logits=False)
        return out["hidden_states"].astype(jnp.float32)

    jitted = jax.jit(fwd)

    def forward(params, local_batch) -> np.ndarray:
        with rt.activations():  # traced here: the model's constrain() calls split the batch over the mesh
            out = jitted(params, rt.put_batch(local_batch))
        return np.asarray(jax.device_get(out))

    return forward
