"""Scene storage without pickle: the arrays the PDM scorer needs (NAVSIM's metric cache role) as `.npz`.

A file holds either one scene (fields shaped as `world.SCENE_SCHEMA`) or a batch (every field with a leading
axis N). Loading uses `allow_pickle=False` and validates every field's presence, shape, dtype and finiteness,
raising `SceneStoreError` that names the file and field.
"""
from __future__ import annotations

import io
import zipfile
from typing import Sequence

import numpy as np

from recogdrive_jax.sim import scene_format, world  # noqa: F401  (world registers Scene as a jax pytree)
from recogdrive_jax.sim.scene_format import FORMAT_VERSION, SCENE_SCHEMA, Scene
from recogdrive_jax import storage
from recogdrive_jax.errors import UserError


class SceneStoreError(UserError):
    pass


def save_scenes(path: str, scenes: Scene | Sequence[Scene], extra: dict | None = None) -> str:
    """Writes one scene or a list/batch of scenes to `path` (.npz, compressed); returns the path. `extra`: more
    plain arrays stored beside the scene fields (e.g. NAVSIM `tokens` [N] str; `load_scenes` ignores them).
    The writer itself is numpy-only (`scene_format.save_scene_arrays`), shared with the NAVSIM converter."""
    with storage.staged_file(path) as local:  # a gs:// file is written locally, then uploaded
        scene_format.save_scene_arrays(local, scenes, extra)
    return path


def _npz_source(path: str):
    """What `np.load` reads: the local path, or a remote file's bytes."""
    return io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path


def load_scenes(path: str) -> Scene:
    """Loads and validates a scene file; the result is batched iff the file is."""
    try:
        data = np.load(_npz_source(path), allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise SceneStoreError(f"{path}: not a readable scene .npz ({e})") from e
    with data:
        if "__format_version__" not in data.files:
            raise SceneStoreError(f"{path}: missing field '__format_version__' (not a scene store file)")
        version = int(data["__format_version__"])
        if version != FORMAT_VERSION:
            raise SceneStoreError(f"{path}: format version {version}, expected {FORMAT_VERSION}")
        fields = {}
        lead = None
        for name, (shape, dtype) in SCENE_SCHEMA.items():
            if name not in data.files:
                raise SceneStoreError(f"{path}: missing field '{name}'")
            try:
                arr = data[name]
            except ValueError as e:  # object arrays need pickle: refuse
                raise SceneStoreError(f"{path}: field '{name}' is not a plain array ({e})") from e
            if arr.dtype != dtype:
                raise SceneStoreError(f"{path}: field '{name}' has dtype {arr.dtype}, expected {dtype}")
            extra = arr.ndim - len(shape)
            if extra not in (0, 1) or tuple(arr.shape[extra:]) != shape:
                raise SceneStoreError(f"{path}: field '{name}' has shape {arr.shape}, expected {shape} or (N,)+{shape}")
            this_lead = arr.shape[0] if extra else None
            if lead is None and name == "history":
                lead = this_lead
            elif this_lead != lead:
                raise SceneStoreError(f"{path}: field '{name}' has leading size {this_lead}, expected {lead}")
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise SceneStoreError(f"{path}: field '{name}' contains NaN or Inf")
            fields[name] = arr
    return Scene(**fields)


def load_tokens(path: str) -> np.ndarray | None:
    """The `tokens` [N] str field of a scene file (NAVSIM sample tokens), or None when it has none."""
    try:
        with np.load(_npz_source(path), allow_pickle=False) as data:
            if "tokens" not in data.files:
                return None
            tokens = data["tokens"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise SceneStoreError(f"{path}: not a readable scene .npz ({e})") from e
    if tokens.dtype.kind != "U" or tokens.ndim != 1:
        raise SceneStoreError(f"{path}: field 'tokens' has dtype {tokens.dtype} shape {tokens.shape}, expected [N] str")
    return tokens
