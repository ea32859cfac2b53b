"""Batched KV-cache sampling of InternVL answers to encoded chat prompts (`vlm/chat.py`), optionally with the
batch sharded over a mesh's batch axes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from recogdrive_jax.models import internvl as ivl
from recogdrive_jax.parallel.runtime import Runtime
from recogdrive_jax.train.module_def import ModuleDef
from recogdrive_jax.vlm.chat import ChatEncoder, local_rows


class Generator:
    """Batched KV-cache sampling with the InternVL port (`internvl.generate`) on VLM params (the policy's
    `vlm` subtree, or an SFT run's params); `vlm_mdef` is the bare InternVL module (`vlm.checkpoint.module_def`)."""

    def __init__(self, vlm_mdef: ModuleDef, encoder: ChatEncoder, *, temperature: float, top_p: float = 1.0,
                 runtime: Runtime | None = None):
        """`runtime`: shard the prompts' batch over its batch axes (None: one device, host arrays)."""
        self.mdef, self.enc, self.temperature, self.top_p, self.rt = vlm_mdef, encoder, temperature, top_p, runtime

    def _global(self, x: np.ndarray):
        if self.rt is None:
            return jnp.asarray(x)
        return self.rt.global_batch(x)

    def __call__(self, vlm_params, prompts: dict, rng: jax.Array, temperature: float | None = None) -> np.ndarray:
        """prompts: stacked encode_prompt dicts (B rows) → generated ids [B, A] (pad after EOS)."""
        b = prompts["prompt_ids"].shape[0]
        vlm = self.mdef.bind(vlm_params)
        pv = prompts["pixel_values"].reshape(b * self.enc.layout.max_tiles, *prompts["pixel_values"].shape[2:])
        out = ivl.generate(vlm, self._global(prompts["prompt_ids"]), self._global(prompts["prompt_mask"]),
                           self._global(pv), self._global(prompts["image_flags"].reshape(-1)),
                           max_new_tokens=self.enc.layout.answer_len,
                           temperature=self.temperature if temperature is None else float(temperature),
                           top_p=self.top_p, rng=rng)
        return local_rows(out).astype(np.int32)
