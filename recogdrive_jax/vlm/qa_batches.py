"""SFT data: a QA mixture (meta JSON with `repeat_time`, or synthetic driving QA generated once into WORKDIR/qa)
as length-grouped, statically shaped batches (`data/length_grouping.GroupedBatches`)."""
from __future__ import annotations

import logging
import os

import jax
import numpy as np

from recogdrive_jax import storage
from recogdrive_jax.data import length_grouping as lg
from recogdrive_jax.data import qa as qa_index
from recogdrive_jax.data import qa_records as qa_lib
from recogdrive_jax.data import template as tpl
from recogdrive_jax.data.generate_once import generate_once
from recogdrive_jax.data import scene_qa as sim_qa

EVAL_QA_SEED = 5_000_011  # disjoint from the planner splits' scene seeds (scene_seed + k * 1_000_003, k < 3)


def sample_cfg(model_cfg, data_cfg):
    sysmsg = data_cfg.system_message
    return tpl.sample_config(model_cfg, max_seq_length=int(data_cfg.max_seq_length), pad_to_max_length=False,
                             system_message=tpl.INTERNVL2_5_SYSTEM if sysmsg == "__default__" else (sysmsg or None))


def default_tile_buckets(cfg) -> tuple[int, ...]:
    top = cfg.max_dynamic_patch + (1 if cfg.use_thumbnail and cfg.max_dynamic_patch > 1 else 0)
    out, b = [], 1
    while b < top:
        out.append(b)
        b *= 2
    return tuple(out) + (top,)


def synthetic_qa(data_cfg, workdir: str, split: str) -> str:
    """Generates the synthetic driving QA of `split` (data/scene_qa.py) into WORKDIR/qa/<split> once; returns its meta JSON.

    The train QA comes from the planner's train scenes (`synthetic_seed` = `data.scene_seed` of the planner
    stages, like upstream's SFT on navtrain QA); the eval QA from scenes no planner split uses. On a remote
    workdir (`gs://...`) the QA goes to a local scratch directory of each process instead (`storage.local_scratch`):
    it is a pure function of (scenes, seed), so a rerun regenerates it, and the readers (PIL, the JSONL index) take
    local paths.
    """
    n = int(data_cfg.synthetic_scenes if split == "train" else data_cfg.synthetic_eval_scenes)
    seed = int(data_cfg.synthetic_seed) + (0 if split == "train" else EVAL_QA_SEED)
    remote = storage.is_remote(workdir)
    out = storage.local_scratch(workdir, "qa", split, process=jax.process_index()) if remote else \
        os.path.join(workdir, "qa", split)
    done = generate_once(out, {"num_scenes": n, "seed": seed},
                         lambda: {"meta": os.path.abspath(sim_qa.write_qa_dataset(out, num_scenes=n, seed=seed))},
                         barrier=f"sft_synthetic_qa_{split}", each_process=remote)
    return done["meta"]


def build_batches(meta_path: str, tok, cfg, data_cfg, *, global_batch: int, seed: int, for_eval: bool = False):
    """The QA mixture of `meta_path` (validated rows after repeat_time, `data/qa.build_index`) as a
    `GroupedBatches` plan."""
    scfg = sample_cfg(cfg, data_cfg)
    records, stats = qa_index.build_index(meta_path, seed=seed, skip_bad_rows=bool(data_cfg.skip_bad_rows))
    if stats.bad_rows and jax.process_index() == 0:
        logging.warning("%s: skipped %d bad rows, e.g. %s", meta_path, stats.bad_rows, stats.bad_reasons[:3])
    if not records:
        raise qa_index.QADataError(f"{meta_path}: the mixture is empty")
    lengths, tiles = qa_lib.estimate_lengths(records, tok, scfg)

    def load(i: int) -> dict:
        r = records[i]
        with qa_index.row_errors(r, skip_bad_rows=bool(data_cfg.skip_bad_rows)):  # names the JSONL file:line
            return tpl.build_sample(r["conversations"], r["image_paths"], tok, scfg)

    buckets = tuple(data_cfg.length_buckets) or lg.default_buckets(int(data_cfg.max_seq_length))
    tile_buckets = tuple(data_cfg.tile_buckets) or default_tile_buckets(cfg)
    return lg.GroupedBatches(load, np.minimum(lengths, max(buckets)), tiles, global_batch=global_batch,
                             process_index=jax.process_index(), process_count=jax.process_count(),
                             buckets=buckets, tile_buckets=tile_buckets, image_size=cfg.force_image_size,
                             pad_token_id=tok.pad_token_id, seed=seed, pack=bool(data_cfg.pack) and not for_eval,
                             source=meta_path, group_tile_buckets=tuple(data_cfg.group_tile_buckets))
