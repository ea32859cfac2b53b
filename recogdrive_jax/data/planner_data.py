"""Inputs of the planner stages (`il`, `rl`, `eval`): per split, the scenes (for the PDM scorer and plots),
history / status / expert future, and the VL memory — from the hidden-state cache when
`config.data.cache_dir` is set, else from the fixed scene-token encoder (`data/scene_tokens.py`).

A cache directory holds one sub-directory per split (`<cache_dir>/<split>/`, written by the `cache` stage) with the
scenes it was computed from (`scenes.npz`), so cached states and PDM scenes always belong together.
"""
from __future__ import annotations

import dataclasses
import os

import grain
import jax
import numpy as np

from recogdrive_jax.data import scene_tokens
from recogdrive_jax.data.hidden_cache import CacheError, HiddenCache
from recogdrive_jax.errors import UserError
from recogdrive_jax.sim import world

SPLITS = ("train", "eval", "test")


class TooFewSamplesError(UserError):
    """A split cannot fill one global batch."""


@dataclasses.dataclass
class PlannerSplit:
    """One split, host-side. `scenes` is a batched `world.Scene` (leading axis N)."""
    name: str
    scenes: world.Scene
    vl_states: np.ndarray | None  # [N, L, H] when held in memory (scene tokens, or a cache read whole)
    vl_mask: np.ndarray | None  # [N, L]
    cache: HiddenCache | None = None  # read per batch unless vl_states holds it (data.vl_in_memory)
    pad_to: int | None = None  # static VL length for cache reads
    rows: np.ndarray | None = None  # [N] cache row of each sample when the split is a subset of the cache
    tokens: np.ndarray | None = None  # [N] str NAVSIM sample tokens (data.source='navsim')
    features: str = "real"  # data.vl_features: 'real' | 'shuffled' | 'zeros'
    feature_perm: np.ndarray | None = None  # [N] 'shuffled': scene i reads the VL states of scene feature_perm[i]

    def __len__(self) -> int:
        return int(self.scenes.history.shape[0])

    def vl(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(states [b, L, H], mask [b, L]) of samples `idx`, after the `features` control."""
        idx = np.asarray(idx)
        src = idx if self.feature_perm is None else self.feature_perm[idx]
        if self.vl_states is not None:
            states, mask = self.vl_states[src], self.vl_mask[src]
        else:
            states, mask = self.cache.read(src if self.rows is None else self.rows[src], pad_to=self.pad_to)
        if self.features == "zeros":
            states = np.zeros_like(states)
        return states, mask

    def cond(self, idx) -> dict:
        idx = np.asarray(idx)
        states, mask = self.vl(idx)
        return {"vl_states": states.astype(np.float32), "vl_mask": mask,
                "status": self.scenes.status[idx], "history": self.scenes.history[idx]}

    def batch(self, idx) -> dict:
        """What the planner losses take: {'cond': ..., 'future': [b, 8, 3], 'index': [b]}."""
        idx = np.asarray(idx)
        return {"cond": self.cond(idx), "future": self.scenes.expert[idx], "index": idx.astype(np.int32)}

    def scene_batch(self, idx) -> world.Scene:
        idx = np.asarray(idx)
        return world.Scene(**{k: np.asarray(getattr(self.scenes, k))[idx] for k in world.SCENE_SCHEMA})


def split_seed(data_cfg, split: str) -> int:
    """Disjoint scene seeds per split: train, eval and test never share a scene."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} unknown; allowed: {list(SPLITS)}")
    return int(data_cfg.scene_seed) + 1_000_003 * SPLITS.index(split)


def num_scenes(data_cfg, split: str) -> int:
    return int(data_cfg.num_train_scenes if split == "train" else data_cfg.num_eval_scenes)


def synthetic_scenes(data_cfg, split: str) -> world.Scene:
    scenes = world.generate_scenes(num_scenes(data_cfg, split), seed=split_seed(data_cfg, split))
    return world.stack_scenes(scenes)


SOURCES = ("synthetic", "navsim")
VL_FEATURES = ("real", "shuffled", "zeros")


def vl_features(data_cfg) -> str:
    """`config.data.vl_features`, validated ('real' when the key is absent)."""
    value = data_cfg.get("vl_features", "real") or "real"
    if value not in VL_FEATURES:
        from recogdrive_jax.configs import ConfigError
        raise ConfigError(f"config.data.vl_features: unknown {value!r}; allowed: {list(VL_FEATURES)}")
    return value


def feature_permutation(n: int, seed: int, split: str) -> np.ndarray:
    """A fixed derangement of n scenes (no scene keeps its own features when n > 1), per split and seed."""
    order = np.random.default_rng([int(seed), SPLITS.index(split)]).permutation(n)
    perm = np.empty(n, np.int64)
    perm[order] = np.roll(order, -1)  # each scene in the random cycle reads the next one's features
    return perm


def _with_features(split: PlannerSplit, data_cfg) -> PlannerSplit:
    features = vl_features(data_cfg)
    split.features = features
    if features == "shuffled":
        split.feature_perm = feature_permutation(len(split), int(data_cfg.get("vl_shuffle_seed", 0)), split.name)
    return split


def load_split(data_cfg, split: str, vl_dim: int, need_pdm: bool = False) -> PlannerSplit:
    """The split from the cache (when `data_cfg.cache_dir`), else the synthetic world or converted NAVSIM samples
    (`data_cfg.source`) + fixed scene tokens, with the `data.vl_features` control applied. `need_pdm`: the split's
    plans get scored, so NAVSIM samples need their PDM inputs (data/navsim_data.py); the synthetic world always
    has them."""
    vl_features(data_cfg)  # a bad value fails before any data is read
    split_ = _load_split(data_cfg, split, vl_dim, need_pdm)
    if split_.cache is not None and bool(data_cfg.get("vl_in_memory", False)):
        _read_whole_cache(split_)
    return _with_features(split_, data_cfg)


def _read_whole_cache(split: PlannerSplit) -> None:
    """`data.vl_in_memory`: the split's cached states read once, kept in their stored dtype (bf16 for a compact
    cache: N x max_len x H x 2 bytes) and gathered per batch from memory, instead of one TensorStore read per
    sample and step. Batches are bitwise the same (`cond` widens to fp32 either way)."""
    rows = np.arange(len(split)) if split.rows is None else split.rows
    split.vl_states, split.vl_mask = split.cache.read(rows, pad_to=split.pad_to, dtype=split.cache.stored_dtype)


def _load_split(data_cfg, split: str, vl_dim: int, need_pdm: bool) -> PlannerSplit:
    source = data_cfg.get("source", "synthetic") or "synthetic"
    if source not in SOURCES:
        from recogdrive_jax.configs import ConfigError
        raise ConfigError(f"config.data.source: unknown {source!r}; allowed: {list(SOURCES)}")
    cache_dir = data_cfg.get("cache_dir", "") or ""
    if cache_dir and source == "navsim":
        return _navsim_cached_split(data_cfg, split, vl_dim, need_pdm)
    if source == "navsim":
        from recogdrive_jax.data import navsim_data
        nd = navsim_data.load_navsim_split(data_cfg, split, need_pdm)
        tokens, mask = scene_tokens.scene_tokens(nd.scenes, vl_dim, seed=int(data_cfg.get("token_seed", 0)))
        return PlannerSplit(split, nd.scenes, tokens, mask, tokens=nd.tokens)
    if cache_dir:
        from recogdrive_jax.sim import scene_store
        path = os.path.join(cache_dir, split)
        cache = HiddenCache.open(path)
        cache.check_hidden_size(vl_dim)
        scenes = scene_store.load_scenes(os.path.join(path, "scenes.npz"))
        if len(scenes.history) != cache.num_samples:
            raise CacheError(f"{path}: scenes.npz has {len(scenes.history)} scenes but the cache {cache.num_samples}")
        pad = data_cfg.get("vl_pad_to", 0) or cache.max_len
        return PlannerSplit(split, scenes, None, None, cache=cache, pad_to=int(pad))
    scenes = synthetic_scenes(data_cfg, split)
    tokens, mask = scene_tokens.scene_tokens(scenes, vl_dim, seed=int(data_cfg.get("token_seed", 0)))
    return PlannerSplit(split, scenes, tokens, mask)


def _navsim_cached_split(data_cfg, split: str, vl_dim: int, need_pdm: bool) -> PlannerSplit:
    """A cache written from NAVSIM samples: its scenes.npz carries the tokens; PDM inputs are attached by token."""
    from recogdrive_jax.data import navsim_data
    from recogdrive_jax.sim import scene_store
    path = os.path.join(data_cfg.cache_dir, split)
    cache = HiddenCache.open(path)
    cache.check_hidden_size(vl_dim)
    scenes_file = os.path.join(path, "scenes.npz")
    scenes = scene_store.load_scenes(scenes_file)
    tokens = scene_store.load_tokens(scenes_file)
    if tokens is None:
        raise CacheError(f"{scenes_file}: no NAVSIM tokens: this cache was not written with config.data.source='navsim'")
    if len(tokens) != cache.num_samples:
        raise CacheError(f"{path}: scenes.npz has {len(tokens)} scenes but the cache {cache.num_samples}")
    mc = navsim_data.metric_cache_path(data_cfg, split) if (data_cfg.get("navsim_metric_cache", "") or
                                                             data_cfg.get("navsim_dir", "")) else None
    scenes, has = navsim_data.attach_pdm(scenes, tokens, mc)
    nd = navsim_data.NavsimSplit(scenes, tokens, np.array([""] * len(tokens)), has)
    rows = None
    if need_pdm:
        nd = navsim_data.require_pdm(nd, split)
        rows = None if nd.has_pdm.size == len(tokens) else np.flatnonzero(has)
    pad = data_cfg.get("vl_pad_to", 0) or cache.max_len
    return PlannerSplit(split, nd.scenes, None, None, cache=cache, pad_to=int(pad), rows=rows, tokens=nd.tokens)


def _index_batches(split: PlannerSplit, local_batch_size: int, seed: int, make_batch, prefetch: int = 0):
    """Endless shuffled index batches of this process's share, mapped by `make_batch(idx)`; a checkpointable Grain
    iterator (get_state/set_state). Batches gather from the split's arrays in one indexing op (the per-sample
    `data/trajectory.py` pipeline stacks row dicts, which costs more per step for in-memory splits). `prefetch` > 0
    bounds the batches made ahead (Grain's default read-ahead is 500: too many for batches of camera frames)."""
    if len(split) < local_batch_size * jax.process_count():
        source = (f"the cache {split.cache.path}" if split.cache is not None
                  else f"config.data.num_{'train' if split.name == 'train' else 'eval'}_scenes")
        raise TooFewSamplesError(
            f"split {split.name!r} ({source}) has {len(split)} samples, fewer than one global batch of "
            f"{local_batch_size * jax.process_count()} (config.train.batch_size); add scenes or lower "
            "config.train.batch_size")
    ds = grain.MapDataset.range(len(split)).shuffle(seed=seed).repeat(None)
    ds = ds[jax.process_index()::jax.process_count()]
    ds = ds.batch(local_batch_size, drop_remainder=True).map(make_batch)
    if prefetch > 0:
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)))
    return iter(ds)


def train_iterator(split: PlannerSplit, local_batch_size: int, seed: int):
    """IL batches (`PlannerSplit.batch`)."""
    return _index_batches(split, local_batch_size, seed, split.batch)


def _rl_batch(split: PlannerSplit, idx) -> dict:
    """{'cond', 'scene', 'index'}: the planner inputs plus the scenes' PDM arrays, so the reward is computed inside
    the jitted RL step. int64 scene fields become int32 (jax default precision; only `seed` is int64)."""
    idx = np.asarray(idx)
    scene = split.scene_batch(idx)
    scene = world.Scene(**{k: (v.astype(np.int32) if v.dtype == np.int64 else v) for k, v in vars(scene).items()})
    return {"cond": split.cond(idx), "scene": scene, "index": idx.astype(np.int32)}


def rl_iterator(split: PlannerSplit, local_batch_size: int, seed: int):
    """RL batches (`_rl_batch`), shuffled and checkpointable like `train_iterator`."""
    return _index_batches(split, local_batch_size, seed, lambda idx: _rl_batch(split, idx))
