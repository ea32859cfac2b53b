"""The HF export of fp32 InternVL params: a complete transformers directory (no torch needed), in a local directory
or under an object-store URL (`gs://...`, through `storage`)."""
from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np
from jax.experimental import multihost_utils

from recogdrive_jax import config_types, storage
from recogdrive_jax.convert import hf_processor
from recogdrive_jax.convert import internvl as conv


def export_hf(params, cfg, tok, out_dir: str, export_cfg) -> None:
    """A complete transformers directory from fp32 params: config.json + safetensors, tokenizer, chat template,
    processor / preprocessor / generation configs (`AutoProcessor.from_pretrained(out_dir)` works).

    Local: written beside `out_dir` and renamed into place. Remote (no rename there): written locally, the old export
    deleted, then uploaded with config.json last, so an export whose config.json exists is complete."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.tree.map(np.asarray, jax.device_get(params))
    if jax.process_index() != 0:
        return
    export_cfg = config_types.from_mapping(config_types.ExportConfig, export_cfg, "export")

    def write(tmp: str) -> None:
        conv.save_hf(params, cfg, tmp, layout=export_cfg.layout, dtype=export_cfg.dtype,
                     max_shard_size=export_cfg.max_shard_size)
        hf_processor.write_processor_files(tmp, cfg, tok)

    if storage.is_remote(out_dir):
        with tempfile.TemporaryDirectory(prefix="recogdrive_export_") as tmp:
            write(tmp)
            storage.rmtree(out_dir)
            names = sorted(os.listdir(tmp), key=lambda n: (n == "config.json", n))  # config.json last
            for name in names:
                if os.path.isdir(os.path.join(tmp, name)):
                    storage.upload_tree(os.path.join(tmp, name), storage.join(out_dir, name))
                    continue
                with open(os.path.join(tmp, name), "rb") as f, \
                        storage.open_file(storage.join(out_dir, name), "wb") as g:  # streamed: shards are GBs
                    shutil.copyfileobj(f, g, 16 << 20)
        return
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
