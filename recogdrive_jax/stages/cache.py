"""Stage `cache`: the (fine-tuned) VLM's last hidden states of every trajectory sample, per split, for the planner.

Upstream (`run_caching_recogdrive_hidden_state.sh`) runs ReCogDrive's InternVL over each NAVSIM sample's driving
prompt — driving system message, front-camera image, the 4 past ego poses as text, the navigation command — and
stores `hidden_states[-1]` left-padded to 2800 tokens in fp32. Here the samples are the synthetic world's scenes
of each split (the same seeds `data/planner_data.py` uses), the prompt is `data/driving_prompt.py`, and the
states go to a `HiddenCache` at `WORKDIR/<split>/` with the split's `scenes.npz` next to it. With
`config.data.source='navsim'` the samples are converted NAVSIM logs (data/navsim_data.py): their CAM_F0 JPEGs, the
same prompt plus the ego-status line (`config.cache.ego_status_text`), and their tokens stored in `scenes.npz`:

* `config.cache.layout='compact'` (default): bf16, only the real tokens, their count in `lengths`;
* `'upstream_compatible'`: fp32, left-padded to `config.cache.max_len` (2800), as upstream.

`config.cache.tokens='all'` (default, as upstream) stores every prompt position; `'image'` only the <IMG_CONTEXT>
positions (the camera's tokens), a shorter planner memory that makes each IL step cheaper.

Resumable: rows whose `lengths` entry is written are skipped, so a killed run continues where it stopped. Each
JAX process computes and writes its own rows (i % process_count == process_index) on its local devices, with no
cross-host collectives. The `il` stage then reads it with `--config.data.cache_dir=WORKDIR`.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from jax.experimental import multihost_utils

from recogdrive_jax import config_types, configs, provenance, storage
from recogdrive_jax.data import navsim_data, planner_data
from recogdrive_jax.data.hidden_cache import LAYOUTS, HiddenCache
from recogdrive_jax.parallel import runtime as runtime_lib
from recogdrive_jax.sim import scene_store, world
from recogdrive_jax.train import checkpoint as ckpt_lib
from recogdrive_jax.train.metrics import Progress, track
from recogdrive_jax.vlm import checkpoint as vlm_ckpt
from recogdrive_jax.vlm.checkpoint import load_params
from recogdrive_jax.vlm.hidden_states import PromptBuilder, collate, front_image, make_forward
from recogdrive_jax.vlm.tokenizer import load_or_build_tokenizer

UPSTREAM_MAX_LEN = 2800


def validate(config) -> config_types.RunConfig:
    """The typed config (types, ranges and unknown keys: config_types.CacheConfig) + the checks needing the data
    library."""
    def req(cond, key, msg):
        if not cond:
            raise configs.ConfigError(f"config.{key}: {msg}")
    for block in ("model", "data", "cache"):
        req(block in config, block, "missing (start from stage_configs.cache_stage_config())")
    config = config_types.typed(config)
    c = config.cache
    req(c.layout in LAYOUTS, "cache.layout", f"unknown {c.layout!r}; allowed: {list(LAYOUTS)}")
    splits = [s for s in c.splits.split(",") if s]
    req(bool(splits), "cache.splits", "empty")
    for s in splits:
        req(s in planner_data.SPLITS, "cache.splits", f"unknown split {s!r}; allowed: {list(planner_data.SPLITS)}")
    source = config.data.source
    req(source in planner_data.SOURCES, "data.source", f"unknown {source!r}; allowed: {list(planner_data.SOURCES)}")
    return config


# --------------------------------------------------------------------------------------------------- stage

def cache_split(split: str, scenes, builder: PromptBuilder, forward, params, out_dir: str, cache_cfg,
                hidden_size: int, t_pad: int, m_pad: int, max_len: int, pad_id: int,
                prompt_ids: list[np.ndarray] | None = None, images=None, tokens=None) -> dict:
    """Writes (resuming) one split's cache; returns counts. `prompt_ids[i]`: scene i's prompt, if known.
    `images[i]`: scene i's front-camera file (NAVSIM samples), else the synthetic render; `tokens` [N]: NAVSIM
    sample tokens, stored in scenes.npz (the planner stages match the metric cache by them)."""
    n = int(scenes.history.shape[0])
    scenes_path = storage.join(out_dir, "scenes.npz")
    if storage.exists(scenes_path):
        old = scene_store.load_scenes(scenes_path)
        old_tokens = scene_store.load_tokens(scenes_path)
        same_tokens = (old_tokens is None) == (tokens is None) and (
            tokens is None or (old_tokens.shape == np.shape(tokens) and np.array_equal(old_tokens, tokens)))
        if (np.asarray(old.seed).shape != np.asarray(scenes.seed).shape or not np.array_equal(old.seed, scenes.seed)
                or not same_tokens):
            raise ValueError(f"{scenes_path}: the cached scenes differ from config.data's {split} scenes "
                             "(other scene_seed / num_*_scenes); use another workdir or delete it")
    cache = HiddenCache.create(out_dir, n, max_len, hidden_size, layout=cache_cfg.layout)
    if jax.process_index() == 0 and not storage.exists(scenes_path):
        scene_store.save_scenes(scenes_path, scenes,
                                extra=None if tokens is None else {"tokens": np.asarray(tokens, dtype=str)})
    mine = np.arange(jax.process_index(), n, jax.process_count())
    todo = cache.pending(mine)
    bs = int(cache_cfg.batch_size)
    ndev = len(jax.local_devices())
    bs_pad = -(-bs // ndev) * ndev

    def prepare(idx):  # host side: render, tile, tokenize (overlaps the previous batch's forward)
        samples = []
        for i in idx:
            scene = world.index_scene(scenes, int(i))
            pv = builder.tiles(front_image(scene) if images is None else images[int(i)])
            ids = prompt_ids[int(i)] if prompt_ids is not None and len(pv) == m_pad else builder.ids(scene, len(pv))
            samples.append((ids, pv))
        return collate(samples, t_pad, m_pad, builder.cfg.force_image_size, pad_id, bs_pad)

    t0, done = time.time(), 0
    chunks = [todo[s:s + bs] for s in range(0, len(todo), bs)]
    with ThreadPoolExecutor(1) as pool, Progress(len(todo), desc=f"cache {split}", unit="rows", delay_s=2) as bar:
        nxt = pool.submit(prepare, chunks[0]) if chunks else None
        for k, idx in enumerate(chunks):
            batch = nxt.result()
            nxt = pool.submit(prepare, chunks[k + 1]) if k + 1 < len(chunks) else None
            hidden = forward(params, batch)[:len(idx)]
            cache.write(idx, hidden, stored_mask(batch, cache_cfg.tokens, builder.cfg.image_token_id)[:len(idx)])
            done += len(idx)
            bar.update(done=done)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"cache_{split}_done")
    finished = int(cache.done_mask().sum())
    return {"num_samples": n, "computed": done, "skipped": len(mine) - len(todo), "finished": finished,
            "seconds": time.time() - t0}


def run(config, workdir: str) -> dict:
    config = validate(config)
    workdir = storage.abspath(workdir)
    storage.makedirs(workdir)
    provenance.write_config(config, workdir, extra={"model_source": ckpt_lib.checkpoint_ref(config.model.init_from)})
    c = config.cache
    resolved = vlm_ckpt.resolve_model(config.model, None, workdir)
    cfg = resolved.cfg
    tok = load_or_build_tokenizer(resolved, workdir)
    mdef = vlm_ckpt.module_def(cfg, config.model.dtype)
    # config.mesh over this process's devices: each process caches its own rows, no cross-host collectives.
    rt = runtime_lib.from_config(config, devices=jax.local_devices())
    params = load_params(resolved, mdef, rt)
    forward = make_forward(mdef, rt)
    navsim = config.data.source == "navsim"
    ego_status = c.ego_status_text != "off"  # auto = on: the prompt the SFT trajectory QA asks
    builder = PromptBuilder(cfg, tok, c, ego_status=ego_status)
    splits = [s for s in c.splits.split(",") if s]
    images, tokens = {s: None for s in splits}, {s: None for s in splits}
    if navsim:  # converted NAVSIM samples: camera files + tokens; PDM inputs are attached when the planner reads
        nd = {s: navsim_data.load_navsim_split(config.data, s, need_pdm=False) for s in splits}
        scenes = {s: v.scenes for s, v in nd.items()}
        images = {s: [str(p) for p in v.cameras] for s, v in nd.items()}
        tokens = {s: v.tokens for s, v in nd.items()}
    else:
        scenes = {s: planner_data.synthetic_scenes(config.data, s) for s in splits}

    # One static shape for every split: the longest prompt and the most tiles (the synthetic images all have one
    # size; NAVSIM front cameras have one size per dataset, so the first is probed and the others must match).
    probe = world.index_scene(scenes[splits[0]], 0)
    m_pad = len(builder.tiles(front_image(probe) if images[splits[0]] is None else images[splits[0]][0]))
    prompt_ids = {s: [builder.ids(world.index_scene(sc, i), m_pad)
                      for i in track(range(len(sc.history)), desc=f"cache {s} prompts", unit="prompts")]
                  for s, sc in scenes.items()}
    lengths = {s: np.array([int(stored_mask({"input_ids": x, "attention_mask": np.ones_like(x)}, c.tokens,
                                            cfg.image_token_id).sum()) for x in v])
               for s, v in prompt_ids.items()}  # the tokens stored per row
    if c.tokens == "image" and any(int(v.min(initial=1)) == 0 for v in lengths.values()):
        raise configs.ConfigError("config.cache.tokens='image': a driving prompt has no image tokens "
                                  f"(<IMG_CONTEXT> id {cfg.image_token_id})")
    longest = int(max(int(v.max()) for v in lengths.values()))
    max_len = int(c.max_len) or (UPSTREAM_MAX_LEN if c.layout == "upstream_compatible" else longest)
    if longest > max_len:
        raise configs.ConfigError(f"config.cache.max_len={max_len}: the longest driving prompt has {longest} tokens")
    t_pad = -(-int(max(len(x) for v in prompt_ids.values() for x in v)) // 8) * 8
    results = {}
    for s in splits:
        r = cache_split(s, scenes[s], builder, forward, params, storage.join(workdir, s), c, cfg.llm_config.hidden_size,
                        t_pad, m_pad, max_len, tok.pad_token_id, prompt_ids[s], images=images[s], tokens=tokens[s])
        results[s] = r
        if jax.process_index() == 0:
            print(f"[cache] {s}: {r['finished']}/{r['num_samples']} rows done ({r['computed']} computed now, "
                  f"{r['skipped']} already cached) in {r['seconds']:.1f}s; prompt {int(lengths[s].min())}-"
                  f"{int(lengths[s].max())} tokens stored ({c.tokens}), layout {c.layout}", flush=True)
    info = {"hidden_size": cfg.llm_config.hidden_size, "max_len": max_len, "layout": c.layout, "tokens": c.tokens,
            "model": config.model.init_from or f"random {config.model.variant}", "splits": results,
            "bytes_per_sample": cache_bytes_per_sample(workdir, splits)}
    if jax.process_index() == 0:
        storage.write_text(storage.join(workdir, "cache_info.json"), json.dumps(info, indent=2))
    return {"hidden_size": info["hidden_size"], "max_len": max_len,
            "bytes_per_sample": info["bytes_per_sample"],
            **{f"{s}_finished": r["finished"] for s, r in results.items()}}


def stored_mask(batch: dict, tokens: str, image_token_id: int) -> np.ndarray:
    """[b, t] bool: the positions of a collated batch whose states the cache stores (config.cache.tokens): every
    real token ('all'), or only the image tokens ('image')."""
    mask = np.asarray(batch["attention_mask"]).astype(bool)
    return mask & (np.asarray(batch["input_ids"]) == image_token_id) if tokens == "image" else mask


def cache_bytes_per_sample(workdir: str, splits) -> float:
    """On-disk bytes of the hidden-state arrays per sample (compressed chunks), over `splits`."""
    total, n = 0, 0
    for s in splits:
        total += storage.tree_size(storage.join(workdir, s, "hidden"))
        meta = storage.join(workdir, s, "meta.json")
        if storage.exists(meta):
            n += json.loads(storage.read_text(meta))["num_samples"]
    return total / max(n, 1)
