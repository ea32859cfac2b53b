"""Grain pipeline of trajectory samples (Stages 2-3): ego history/status, expert future, PDM scene arrays.

Sample (one row; a batch stacks every leaf along a new leading axis):
  index    [] int64      global row id in the source: the handle into the hidden-state cache
  history  [4, 3] f32    past ego poses (x, y, heading) at -1.5, -1.0, -0.5, 0 s (ego frame, metres / radians)
  status   [8] f32       command one-hot (4) ++ velocity (2) ++ acceleration (2)
  future   [8, 3] f32    expert poses at 0.5..4.0 s
  scene    dict          every `world.Scene` field (unbatched shapes in `world.SCENE_SCHEMA`);
                         `scene_from_batch(batch["scene"])` gives the batched `Scene` that `pdm_score` takes
"""
from __future__ import annotations

from typing import Callable, Sequence

import grain.python as gp
import numpy as np

from recogdrive_jax.data.grain_pipeline import sharded_dataset
from recogdrive_jax.sim import scene_store, world
from recogdrive_jax.sim.world import SCENE_SCHEMA, Scene


class SceneSource(gp.RandomAccessDataSource):
    """Random access over scenes: an in-memory list, a batched `Scene`, or a scene-store `.npz` path."""

    def __init__(self, scenes: str | Scene | Sequence[Scene]):
        if isinstance(scenes, str):
            scenes = scene_store.load_scenes(scenes)
        if isinstance(scenes, Scene):
            if np.ndim(scenes.command) == 0:
                scenes = world.stack_scenes([scenes])
            self._arrays = {k: np.asarray(getattr(scenes, k)) for k in SCENE_SCHEMA}
        else:
            self._arrays = {k: np.asarray(getattr(world.stack_scenes(list(scenes)), k)) for k in SCENE_SCHEMA}
        self._n = len(self._arrays["history"])

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self._n:
            raise IndexError(f"scene index {i} out of range [0, {self._n})")
        scene = {k: v[i] for k, v in self._arrays.items()}
        return dict(index=np.int64(i), history=scene["history"], status=scene["status"], future=scene["expert"],
                    scene=scene)

    def __repr__(self) -> str:
        return f"SceneSource(n={self._n})"


def scene_from_batch(scene_dict: dict) -> Scene:
    """The `scene` entry of a (batched) sample -> `Scene` pytree."""
    return Scene(**{k: scene_dict[k] for k in SCENE_SCHEMA})


def trajectory_dataset(source: str | Scene | Sequence[Scene] | gp.RandomAccessDataSource, batch_size: int,
                       *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = 1,
                       shard_options: gp.ShardOptions | None = None, drop_remainder: bool = True,
                       transform: Callable[[dict], dict] | None = None) -> gp.IterDataset:
    """Shuffled, process-sharded, batched trajectory samples as a checkpointable Grain `IterDataset`.

    `iter(ds)` yields dict batches; its `get_state()` / `set_state()` resume exactly. Each JAX process reads
    rows `shard_index::shard_count` (default `ShardByJaxProcess`); shuffling is deterministic per `seed` and
    differs per epoch; `num_epochs=None` repeats forever. `transform` maps one sample dict (e.g. attaching
    cached hidden states by `index`)."""
    # (str and list also satisfy the RandomAccessDataSource protocol, so test for what we build from first.)
    if isinstance(source, (str, Scene, list, tuple)):
        source = SceneSource(source)
    return sharded_dataset(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard_options=shard_options,
                           transform=transform, batch_size=batch_size, drop_remainder=drop_remainder)
