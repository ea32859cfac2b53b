"""Inputs of the planner stages (`il`, `rl`, `eval`): per split, the scenes (for the PDM scorer and plots),
history / status / expert future, and the VL memory — from the hidden-state cache when
`config.data.cache_dir` is set, else from the fixed scene-token encoder (`data/scene_tokens.py`).

A cache directory holds one sub-directory per split (`<cache_dir>/<split>/`, written by the `cache` stage) with the
scenes it was computed from (`scenes.npz`), so cached states and PDM scenes always belong together.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

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
    # data.vl_normalize: (mean [H], per-channel std [H] ('standardize') or whitening matrix [H, H] ('whiten')) fp32,
    # applied per read; an in-memory split (vl_states) is normalised once when loaded instead
    vl_stats: tuple[np.ndarray, np.ndarray] | None = None

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
        if self.vl_stats is not None and self.vl_states is None:
            states = normalize_states(states, mask, *self.vl_stats)
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
    (`data_cfg.source`) + fixed scene tokens, normalised by `data.vl_normalize` and then the `data.vl_features`
    control applied. `need_pdm`: the split's
    plans get scored, so NAVSIM samples need their PDM inputs (data/navsim_data.py); the synthetic world always
    has them."""
    vl_features(data_cfg)  # a bad value fails before any data is read
    normalize = vl_normalize(data_cfg)
    split_ = _load_split(data_cfg, split, vl_dim, need_pdm)
    if split_.cache is not None and bool(data_cfg.get("vl_in_memory", False)):
        _read_whole_cache(split_)
    if normalize != "none":
        split_.vl_stats = _train_statistics(data_cfg, split_, normalize)
        if split_.vl_states is not None:  # once, fp32 (4 bytes a value): a batch is then a gather, as without
            split_.vl_states = normalize_states(split_.vl_states, split_.vl_mask, *split_.vl_stats)
    return _with_features(split_, data_cfg)


VL_NORMALIZE = ("none", "standardize", "whiten")
VL_STATS_SCENES = 512  # data.vl_normalize: the statistics come from the first this many scenes of the train split
VL_STATS_TOKENS = 65536  # ... and about this many of their real tokens at most (every k-th)
WHITEN_SHRINK = 1e-3  # data.vl_normalize='whiten': eigenvalue floor, a fraction of the mean eigenvalue


def vl_normalize(data_cfg) -> str:
    """`data.vl_normalize`, validated: 'none' (upstream: the raw cached states), 'standardize' or 'whiten' (by the
    cache's train split); any other value, or a value other than 'none' without a cache, is a ConfigError."""
    from recogdrive_jax.configs import ConfigError
    mode = data_cfg.get("vl_normalize", "none") or "none"
    if mode not in VL_NORMALIZE:
        raise ConfigError(f"config.data.vl_normalize={mode!r}: expected one of {', '.join(VL_NORMALIZE)}")
    if mode != "none" and not (data_cfg.get("cache_dir", "") or ""):
        raise ConfigError(f"config.data.vl_normalize={mode!r}: needs a hidden-state cache (config.data.cache_dir); "
                          "the fixed scene tokens are not normalised")
    return mode


def vl_statistics(cache: HiddenCache, mode: str = "standardize", max_scenes: int = VL_STATS_SCENES,
                  max_tokens: int = VL_STATS_TOKENS, chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(mean [H], scale) fp32 from the real tokens of the first `max_scenes` rows of `cache` (every k-th token, k
    chosen so that at most about `max_tokens` are used), read `chunk` rows at a time into float64 sums.
    'standardize': scale = the per-channel std [H], floored at 1% of its median over channels (and 1e-6), so a
    (near-)constant channel is not blown up into rounding noise. 'whiten': scale = the ZCA matrix [H, H]
    V diag(1 / sqrt(max(lambda, WHITEN_SHRINK * mean(lambda)))) V^T of the token covariance: every direction of the
    states gets unit variance however small its share of the total, except directions below the floor (bf16
    rounding noise in directions of ~zero variance is not blown up)."""
    if mode not in ("standardize", "whiten"):
        raise ValueError(f"vl_statistics: mode={mode!r}: expected 'standardize' or 'whiten'")
    n = min(cache.num_samples, int(max_scenes))
    stride = max(1, -(-n * cache.max_len // int(max_tokens)))
    h = cache.hidden_size
    total, count = np.zeros(h), 0
    second = np.zeros((h, h)) if mode == "whiten" else np.zeros(h)  # sum of x x^T, or of x^2 per channel
    for lo in range(0, n, chunk):
        states, mask = cache.read(np.arange(lo, min(lo + chunk, n)))
        tok = states[mask.astype(bool)][::stride].astype(np.float64)  # [n_tok, H]
        total += tok.sum(0)
        second += tok.T @ tok if mode == "whiten" else np.square(tok).sum(0)
        count += len(tok)
    if count == 0:
        raise CacheError(f"{cache.path}: config.data.vl_normalize: no real tokens in the first {n} rows to take "
                         "the statistics from")
    mean = total / count
    if mode == "standardize":
        std = np.sqrt(np.maximum(second / count - np.square(mean), 0.0))
        return mean.astype(np.float32), np.maximum(std, max(1e-2 * float(np.median(std)), 1e-6)).astype(np.float32)
    lam, vec = np.linalg.eigh(second / count - np.outer(mean, mean))  # [H], [H, H]
    lam = np.maximum(lam, max(WHITEN_SHRINK * float(lam.clip(0).mean()), 1e-12))
    return mean.astype(np.float32), ((vec / np.sqrt(lam)) @ vec.T).astype(np.float32)


def normalize_states(states: np.ndarray, mask: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """`data.vl_normalize`: (states - mean) / std per channel, or (states - mean) @ the whitening matrix; fp32,
    padding positions stay zero. Runs on the host per batch: whitening costs H^2 multiply-adds per token, nothing
    for the tiny VLM's 64 channels (the demo), seconds per 16-sample batch of 2800 x 3584-wide upstream states
    (use 'standardize' there, H per token)."""
    centred = states.astype(np.float32) - mean
    out = centred / scale if scale.ndim == 1 else centred @ scale
    return np.where(np.asarray(mask, bool)[..., None], out, np.float32(0.0))


def _train_statistics(data_cfg, split: PlannerSplit, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The `vl_statistics` of the cache's train split, whichever split is loaded: train, eval and test states are
    normalised alike (by what the planner trains on), and before the `data.vl_features` control, so the shuffled
    and zeroed controls get the same transform as the real states."""
    if split.name == "train":
        return vl_statistics(split.cache, mode)
    path = os.path.join(data_cfg.cache_dir, "train")
    try:
        cache = HiddenCache.open(path)
    except CacheError as e:
        raise CacheError(f"config.data.vl_normalize: the statistics come from the cache's train split: {e}") from e
    cache.check_hidden_size(split.cache.hidden_size, key=f"the {split.name} split's hidden size")
    return vl_statistics(cache, mode)


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


def index_batches(split: PlannerSplit, local_batch_size: int, seed: int,
                  make_batch: Callable[[np.ndarray], dict], prefetch: int = 0) -> Iterator[dict]:
    """Endless shuffled index batches of this process's share, mapped by `make_batch(idx)`; a checkpointable Grain
    iterator (get_state/set_state). The one batching path of the planner stages: `train_iterator` (IL),
    `rl_iterator` (RL) and `vlm/joint.py` (VLM + planner batches) differ only in `make_batch`. Batches gather from
    the split's arrays in one indexing op (the per-sample `data/trajectory.py` pipeline stacks row dicts, which costs
    more per step for in-memory splits). `prefetch` > 0 bounds the batches made ahead (Grain's default read-ahead is
    500: too many for batches of camera frames). Raises TooFewSamplesError when the split cannot fill one global
    batch."""
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
    return index_batches(split, local_batch_size, seed, split.batch)


def _rl_batch(split: PlannerSplit, idx) -> dict:
    """{'cond', 'scene', 'index'}: the planner inputs plus the scenes' PDM arrays, so the reward is computed inside
    the jitted RL step. int64 scene fields become int32 (jax default precision; only `seed` is int64)."""
    idx = np.asarray(idx)
    scene = split.scene_batch(idx)
    scene = world.Scene(**{k: (v.astype(np.int32) if v.dtype == np.int64 else v) for k, v in vars(scene).items()})
    return {"cond": split.cond(idx), "scene": scene, "index": idx.astype(np.int32)}


def rl_iterator(split: PlannerSplit, local_batch_size: int, seed: int):
    """RL batches (`_rl_batch`), shuffled and checkpointable like `train_iterator`."""
    return index_batches(split, local_batch_size, seed, lambda idx: _rl_batch(split, idx))
