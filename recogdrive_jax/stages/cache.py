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

Resumable: rows whose `lengths` entry is written are skipped, so a killed run continues where it stopped. Each
JAX process computes and writes its own rows (i % process_count == process_index) on its local devices, with no
cross-host collectives. The `il` stage then reads it with `--config.data.cache_dir=WORKDIR`.
"""
from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np

from recogdrive_jax import configs
from recogdrive_jax.stages import sft as sft_stage

UPSTREAM_MAX_LEN = 2800


def cache_stage_config() -> ml_collections.ConfigDict:
    c = configs.base_config()
    c.stage = "cache"
    for key in ("train", "optim"):  # not a training stage
        del c[key]
    c.model = sft_stage.model_block(init_from="", remat=False)
    c.data = configs.planner_data_block()  # which scenes: the same keys the planner stages read
    c.cache = ml_collections.ConfigDict(dict(
        splits="train,eval",
        layout="compact",  # or 'upstream_compatible'
        max_len=0,  # stored length; 0 = longest prompt (compact) / 2800 (upstream_compatible)
        batch_size=8,  # per process, per forward
        max_dynamic_patch=12,  # upstream caches with load_image(max_num=12)
        min_dynamic_patch=1,
        use_thumbnail=True,
        system_message="__driving__",  # '__driving__' = data/driving_prompt.DRIVING_SYSTEM
        ego_status_text="auto",  # the ego-status line in the prompt: 'auto' = on for data.source='navsim' (the
        # upstream NAVSIM prompt), off for the synthetic world (its SFT data has none); or 'on' / 'off'
    ))
    return c


def validate(config) -> None:
    from recogdrive_jax.data import planner_data
    from recogdrive_jax.data.hidden_cache import LAYOUTS

    def req(cond, key, msg):
        if not cond:
            raise configs.ConfigError(f"config.{key}: {msg}")
    for block in ("model", "data", "cache"):
        req(block in config, block, "missing (start from stages.cache.cache_stage_config())")
    c = config.cache
    req(c.layout in LAYOUTS, "cache.layout", f"unknown {c.layout!r}; allowed: {list(LAYOUTS)}")
    splits = [s for s in c.splits.split(",") if s]
    req(bool(splits), "cache.splits", "empty")
    for s in splits:
        req(s in planner_data.SPLITS, "cache.splits", f"unknown split {s!r}; allowed: {list(planner_data.SPLITS)}")
    req(isinstance(c.batch_size, int) and c.batch_size >= 1, "cache.batch_size", f"must be an int >= 1, got {c.batch_size!r}")
    req(isinstance(c.max_len, int) and c.max_len >= 0, "cache.max_len", f"must be an int >= 0, got {c.max_len!r}")
    req(c.get("ego_status_text", "auto") in ("auto", "on", "off"), "cache.ego_status_text",
        f"must be 'auto', 'on' or 'off', got {c.get('ego_status_text')!r}")
    source = config.data.get("source", "synthetic")
    req(source in planner_data.SOURCES, "data.source", f"unknown {source!r}; allowed: {list(planner_data.SOURCES)}")


# ------------------------------------------------------------------------------------------------- samples

def front_image(scene) -> np.ndarray:
    """Front-camera RGB uint8 [H, W, 3] of one (unbatched) scene."""
    from recogdrive_jax.sim import render
    return np.asarray(render.render_front(scene))


class PromptBuilder:
    """Scene → (input_ids [t], pixel_values [n, S, S, 3]) with the driving prompt, as the VLM is queried upstream.
    `ego_status`: add the ego-status line (velocity, acceleration) to the prompt (NAVSIM data)."""

    def __init__(self, cfg, tok, cache_cfg, ego_status: bool = False):
        self.ego_status = bool(ego_status)
        from recogdrive_jax.data import driving_prompt as dp
        self.cfg, self.tok = cfg, tok
        self.max_num, self.min_num = int(cache_cfg.max_dynamic_patch), int(cache_cfg.min_dynamic_patch)
        self.use_thumbnail = bool(cache_cfg.use_thumbnail)
        sm = cache_cfg.get("system_message", "__driving__")
        self.system = dp.DRIVING_SYSTEM if sm == "__driving__" else (sm or None)

    def tiles(self, image: np.ndarray) -> np.ndarray:
        from recogdrive_jax.data.tiling import load_image
        return load_image(image, image_size=self.cfg.force_image_size, max_num=self.max_num, min_num=self.min_num,
                          use_thumbnail=self.use_thumbnail)

    def ids(self, scene, num_tiles: int) -> np.ndarray:
        from recogdrive_jax.data import driving_prompt as dp
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


# ------------------------------------------------------------------------------------------------- forward

def make_forward(mdef, mesh):
    """Jitted `(params, batch) -> hidden [b, T, D] fp32` (after the final RMSNorm = HF hidden_states[-1])."""
    import jax
    import jax.numpy as jnp

    from recogdrive_jax.parallel import sharding as sh

    def fwd(params, batch):
        model = mdef.bind(params)
        b, m = batch["image_flags"].shape
        pv = batch["pixel_values"].reshape(b * m, *batch["pixel_values"].shape[2:]).astype(model.dtype)
        out = model(batch["input_ids"], batch["attention_mask"], pv, batch["image_flags"].reshape(-1),
                    compute_logits=False)
        return out["hidden_states"].astype(jnp.float32)

    jitted = jax.jit(fwd)

    def forward(params, local_batch) -> np.ndarray:
        batch = jax.tree.map(lambda x: jax.device_put(x, sh.batch_sharding(mesh, x.ndim)), local_batch)
        return np.asarray(jax.device_get(jitted(params, batch)))

    return forward


def load_params(resolved, mdef, mesh):
    """Parameters replicated on this process's mesh, from the resolved `config.model.init_from`."""
    import jax

    from recogdrive_jax.parallel import sharding as sh
    from recogdrive_jax.train import loop
    specs = sh.param_partition_specs(mdef.abstract_params(), mdef.logical, mesh)
    shardings = sh.to_shardings(mesh, specs)
    if resolved.params_path is None:
        return jax.jit(mdef.init, out_shardings=shardings)(jax.random.key(0))
    return loop.load_init_params(resolved.params_path, mdef.abstract_params(), shardings, prefer_ema=True)


# --------------------------------------------------------------------------------------------------- stage

def cache_split(split: str, scenes, builder: PromptBuilder, forward, params, out_dir: str, cache_cfg,
                hidden_size: int, t_pad: int, m_pad: int, max_len: int, pad_id: int,
                prompt_ids: list[np.ndarray] | None = None, images=None, tokens=None) -> dict:
    """Writes (resuming) one split's cache; returns counts. `prompt_ids[i]`: scene i's prompt, if known.
    `images[i]`: scene i's front-camera file (NAVSIM samples), else the synthetic render; `tokens` [N]: NAVSIM
    sample tokens, stored in scenes.npz (the planner stages match the metric cache by them)."""
    from concurrent.futures import ThreadPoolExecutor

    import jax

    from recogdrive_jax.data.hidden_cache import HiddenCache
    from recogdrive_jax.sim import scene_store
    from recogdrive_jax.sim import world
    n = int(scenes.history.shape[0])
    scenes_path = os.path.join(out_dir, "scenes.npz")
    if os.path.exists(scenes_path):
        old = scene_store.load_scenes(scenes_path)
        old_tokens = scene_store.load_tokens(scenes_path)
        same_tokens = (old_tokens is None) == (tokens is None) and (
            tokens is None or (old_tokens.shape == np.shape(tokens) and np.array_equal(old_tokens, tokens)))
        if (np.asarray(old.seed).shape != np.asarray(scenes.seed).shape or not np.array_equal(old.seed, scenes.seed)
                or not same_tokens):
            raise ValueError(f"{scenes_path}: the cached scenes differ from config.data's {split} scenes "
                             "(other scene_seed / num_*_scenes); use another workdir or delete it")
    cache = HiddenCache.create(out_dir, n, max_len, hidden_size, layout=cache_cfg.layout)
    if jax.process_index() == 0 and not os.path.exists(scenes_path):
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

    from recogdrive_jax.train.metrics import Progress
    t0, done = time.time(), 0
    chunks = [todo[s:s + bs] for s in range(0, len(todo), bs)]
    with ThreadPoolExecutor(1) as pool, Progress(len(todo), desc=f"cache {split}", unit="rows", delay_s=2) as bar:
        nxt = pool.submit(prepare, chunks[0]) if chunks else None
        for k, idx in enumerate(chunks):
            batch = nxt.result()
            nxt = pool.submit(prepare, chunks[k + 1]) if k + 1 < len(chunks) else None
            hidden = forward(params, batch)[:len(idx)]
            cache.write(idx, hidden, batch["attention_mask"][:len(idx)])
            done += len(idx)
            bar.update(done=done)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"cache_{split}_done")
    finished = int(cache.done_mask().sum())
    return {"num_samples": n, "computed": done, "skipped": len(mine) - len(todo), "finished": finished,
            "seconds": time.time() - t0}


def run(config, workdir: str) -> dict:
    import jax

    from recogdrive_jax.data import planner_data
    from recogdrive_jax.parallel import mesh as mesh_lib
    from recogdrive_jax import provenance
    validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    provenance.write_config(config, workdir, extra={"model_source": provenance.checkpoint_ref(
        config.model.get("init_from", "") or "")})
    c = config.cache
    resolved = sft_stage.resolve_model(config.model, None, workdir)
    cfg = resolved.cfg
    tok = sft_stage.load_or_build_tokenizer(resolved, workdir)
    mdef = sft_stage.module_def(cfg, config.model.dtype)
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices())
    params = load_params(resolved, mdef, mesh)
    forward = make_forward(mdef, mesh)
    navsim = config.data.get("source", "synthetic") == "navsim"
    ego_status = {"auto": navsim, "on": True, "off": False}[c.get("ego_status_text", "auto")]
    builder = PromptBuilder(cfg, tok, c, ego_status=ego_status)
    splits = [s for s in c.splits.split(",") if s]
    images, tokens = {s: None for s in splits}, {s: None for s in splits}
    if navsim:  # converted NAVSIM samples: camera files + tokens; PDM inputs are attached when the planner reads
        from recogdrive_jax.data import navsim_data
        nd = {s: navsim_data.load_navsim_split(config.data, s, need_pdm=False) for s in splits}
        scenes = {s: v.scenes for s, v in nd.items()}
        images = {s: [str(p) for p in v.cameras] for s, v in nd.items()}
        tokens = {s: v.tokens for s, v in nd.items()}
    else:
        scenes = {s: planner_data.synthetic_scenes(config.data, s) for s in splits}

    # One static shape for every split: the longest prompt and the most tiles (the synthetic images all have one
    # size; NAVSIM front cameras have one size per dataset, so the first is probed and the others must match).
    from recogdrive_jax.sim import world
    probe = world.index_scene(scenes[splits[0]], 0)
    m_pad = len(builder.tiles(front_image(probe) if images[splits[0]] is None else images[splits[0]][0]))
    from recogdrive_jax.train.metrics import track
    prompt_ids = {s: [builder.ids(world.index_scene(sc, i), m_pad)
                      for i in track(range(len(sc.history)), desc=f"cache {s} prompts", unit="prompts")]
                  for s, sc in scenes.items()}
    lengths = {s: np.array([len(x) for x in v]) for s, v in prompt_ids.items()}
    longest = int(max(int(v.max()) for v in lengths.values()))
    max_len = int(c.max_len) or (UPSTREAM_MAX_LEN if c.layout == "upstream_compatible" else longest)
    if longest > max_len:
        raise configs.ConfigError(f"config.cache.max_len={max_len}: the longest driving prompt has {longest} tokens")
    t_pad = -(-longest // 8) * 8
    results = {}
    for s in splits:
        r = cache_split(s, scenes[s], builder, forward, params, os.path.join(workdir, s), c, cfg.llm_config.hidden_size,
                        t_pad, m_pad, max_len, tok.pad_token_id, prompt_ids[s], images=images[s], tokens=tokens[s])
        results[s] = r
        if jax.process_index() == 0:
            print(f"[cache] {s}: {r['finished']}/{r['num_samples']} rows done ({r['computed']} computed now, "
                  f"{r['skipped']} already cached) in {r['seconds']:.1f}s; prompt {int(lengths[s].min())}-"
                  f"{int(lengths[s].max())} tokens, layout {c.layout}", flush=True)
    info = {"hidden_size": cfg.llm_config.hidden_size, "max_len": max_len, "layout": c.layout,
            "model": config.model.init_from or f"random {config.model.variant}", "splits": results,
            "bytes_per_sample": cache_bytes_per_sample(workdir, splits)}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "cache_info.json"), "w") as f:
            json.dump(info, f, indent=2)
    return {"hidden_size": info["hidden_size"], "max_len": max_len,
            "bytes_per_sample": info["bytes_per_sample"],
            **{f"{s}_finished": r["finished"] for s, r in results.items()}}


def cache_bytes_per_sample(workdir: str, splits) -> float:
    """On-disk bytes of the hidden-state arrays per sample (compressed chunks), over `splits`."""
    total, n = 0, 0
    for s in splits:
        d = os.path.join(workdir, s, "hidden")
        for root, _, files in os.walk(d):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        meta = os.path.join(workdir, s, "meta.json")
        if os.path.exists(meta):
            n += json.load(open(meta))["num_samples"]
    return total / max(n, 1)
