"""Logical-axis rules and the shardings of parameters, optimizer state and batches.

Models name their parameter dimensions logically (`embed`, `mlp`, `heads`, ...). This file is the only
place those names meet the mesh axes `('data', 'fsdp', 'tensor')`:

* tensor parallelism: `mlp`, `heads`, `kv`, `vocab` → `tensor` (a no-op when `mesh.tensor == 1`);
* FSDP / ZeRO-3: each parameter is additionally split over `fsdp` along its largest divisible dimension;
* ZeRO-1 (upstream's DeepSpeed setting): parameters stay replicated over `data`, while the Adam moments
  (every optimizer-state leaf shaped like a parameter) are split over `data` as well. XLA then computes the
  update on the shard and all-gathers the new parameters because the optimizer state has its own
  out_shardings — no hand-written collectives. Parameters are always kept in fp32, so the fp32 master copy
  *is* the parameter tree.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical name -> mesh axis (or None). Unknown names are an error, so a typo in a model cannot silently replicate.
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": None,
    "mlp": "tensor",
    "heads": "tensor",
    "kv": "tensor",
    "head_dim": None,
    "vocab": "tensor",
    "layers": None,
    "norm": None,
    "time": None,
    "seq": None,
}

BATCH_AXES = ("data", "fsdp")
# Parameters smaller than this stay replicated under FSDP/ZeRO: splitting them costs more than it saves.
MIN_SHARD_BYTES = 4 * 1024


def logical_to_mesh(logical: Sequence[str | None] | None, rules: dict[str, Any] | None = None) -> P:
    """Maps a tuple of logical names to a mesh PartitionSpec through `rules`."""
    rules = LOGICAL_RULES if rules is None else rules
    if logical is None:
        return P()
    out, used = [], set()
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        axes = rules[name]
        names = set((axes,) if isinstance(axes, str) else (axes or ()))
        if names & used:  # e.g. ('mlp', 'mlp'): a mesh axis can split only one dimension
            axes = None
        used |= names if axes is not None else set()
        out.append(axes)
    return P(*out)


def _spec_axes(spec: P) -> set[str]:
    used = set()
    for entry in spec:
        if entry is None:
            continue
        used.update((entry,) if isinstance(entry, str) else entry)
    return used


def _axis_size(mesh: Mesh, axis) -> int:
    names = (axis,) if isinstance(axis, str) else tuple(axis or ())
    return int(np.prod([mesh.shape[a] for a in names])) if names else 1


def _drop_unusable(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide a dimension (e.g. a 3-wide output over tensor=2)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        out.append(entry if entry is not None and dim % _axis_size(mesh, entry) == 0 else None)
    return P(*out)


def add_axis_on_largest_dim(spec: P, shape: Sequence[int], mesh: Mesh, axis: str,
                            min_bytes: int = MIN_SHARD_BYTES, itemsize: int = 4) -> P:
    """Splits the largest dimension that `axis` divides (and that is not yet sharded) over `axis`."""
    size = mesh.shape[axis]
    if size == 1 or axis in _spec_axes(spec) or int(np.prod(shape or (1,))) * itemsize < min_bytes:
        return spec
    entries = list(tuple(spec) + (None,) * (len(shape) - len(spec)))
    for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if entries[d] is None and shape[d] % size == 0:
            entries[d] = axis
            return P(*entries)
        if entries[d] is not None and shape[d] % (_axis_size(mesh, entries[d]) * size) == 0:
            cur = (entries[d],) if isinstance(entries[d], str) else tuple(entries[d])
            entries[d] = cur + (axis,)
            return P(*entries)
    return spec


def logical_specs(state: nnx.State):
    """Pure-dict tree of `P(<logical names>)` per parameter, read from NNX sharding metadata."""
    def names(var):
        meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
        n = meta.get("out_sharding", meta.get("sharding_names", meta.get("sharding")))
        return P(*n) if n else P()
    root: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = names(var)
    return root


def _is_spec(x) -> bool:
    return isinstance(x, P)


def param_partition_specs(abstract_params, logical, mesh: Mesh, *, fsdp: bool | None = None,
                          rules: dict[str, Any] | None = None):
    """Mesh PartitionSpecs for a parameter tree given its logical specs (same structure, `P` leaves).

    With `fsdp` (default: when the mesh's fsdp axis is > 1) every large parameter is also split over `fsdp`
    along its largest divisible dimension.
    """
    fsdp = mesh.shape["fsdp"] > 1 if fsdp is None else fsdp

    def one(names: P, leaf):
        spec = _drop_unusable(logical_to_mesh(tuple(names), rules), leaf.shape, mesh)
        if fsdp:
            spec = add_axis_on_largest_dim(spec, leaf.shape, mesh, "fsdp", itemsize=leaf.dtype.itemsize)
        return spec

    return jax.tree.map(one, logical, abstract_params, is_leaf=_is_spec)


def zero1_partition_specs(tx, abstract_opt_state, param_specs, abstract_params, mesh: Mesh, enabled: bool = True):
    """Optimizer-state specs: parameter-shaped leaves follow their parameter, plus `data` under ZeRO-1.

    A leaf is parameter-shaped when its key path ends with a parameter's path and the shapes agree (this
    holds inside `multi_transform`/`chain`/`MaskedNode` wrappers too); other leaves (step counts) replicate.
    """
    del tx
    by_path = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        by_path[tuple(path)] = (leaf, None)
    spec_leaves = jax.tree_util.tree_leaves_with_path(param_specs, is_leaf=_is_spec)
    for path, spec in spec_leaves:
        by_path[tuple(path)] = (by_path[tuple(path)][0], spec)
    max_len = max((len(p) for p in by_path), default=0)

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        for n in range(min(len(path), max_len), 0, -1):
            hit = by_path.get(tuple(path[-n:]))
            if hit is not None and tuple(hit[0].shape) == tuple(shape):
                spec = hit[1]
                return add_axis_on_largest_dim(spec, shape, mesh, "data") if enabled else spec
        return P()

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def to_shardings(mesh: Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def batch_sharding(mesh: Mesh, ndim: int = 1, axes=BATCH_AXES) -> NamedSharding:
    """Leading (batch) dimension split over `axes` (default `('data', 'fsdp')`); other dims replicated."""
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch_size(local_batch_size: int) -> int:
    return local_batch_size * jax.process_count()


def make_global_batch(mesh: Mesh, local_batch, axes=BATCH_AXES):
    """Process-local numpy batch (this host's rows) → global `jax.Array`s sharded over the batch axes."""
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, axes), x)
    return jax.tree.map(one, local_batch)


def addressable_bytes(tree) -> int:
    """Bytes this process's first device holds of a tree of jax.Arrays (to check ZeRO/FSDP savings)."""
    dev = jax.local_devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == dev:
                total += shard.data.nbytes
    return total
