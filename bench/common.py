"""Helpers every benchmark shares: call timing and the small InternVL shape the VLM benchmarks compare on."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np


def time_call(fn: Callable[[], object], reps: int, reduce: str = "median") -> float:
    """Seconds per call of `fn` (which must block until its work is done), after one warm-up/compile call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.min(ts) if reduce == "min" else np.median(ts))


def small_internvl_config():
    """ViT 128x4 at 112 px (16 tokens a tile), LLM 256x6, vocab 4096: big enough that compute, not Python, dominates."""
    from recogdrive_jax.models import internvl as iv
    from recogdrive_jax.models.internvit import InternViTConfig
    from recogdrive_jax.models.qwen2 import Qwen2Config
    return dataclasses.replace(
        iv.get_config("tiny"),
        vision_config=InternViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=512, image_size=112, patch_size=14),
        llm_config=Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096))
