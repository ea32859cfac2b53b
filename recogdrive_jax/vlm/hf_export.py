"""The HF export of fp32 InternVL params: a complete transformers directory (no torch needed)."""
from __future__ import annotations

import os
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils

from recogdrive_jax.convert import hf_processor
from recogdrive_jax.convert import internvl as conv


def export_hf(params, cfg, tok, out_dir: str, export_cfg) -> None:
    """A complete transformers directory from fp32 params: config.json + safetensors, tokenizer, chat template,
    processor / preprocessor / generation configs (`AutoProcessor.from_pretrained(out_dir)` works)."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.tree.map(np.asarray, jax.device_get(params))
    if jax.process_index() != 0:
        return
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    conv.save_hf(params, cfg, tmp, layout=export_cfg.get("layout", "native"), dtype=export_cfg.get("dtype", "bfloat16"),
                 max_shard_size=export_cfg.get("max_shard_size", "5GB"))
    hf_processor.write_processor_files(tmp, cfg, tok)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
