"""Activation sharding by logical names: `constrain(x, ('batch', 'seq', 'embed'))`.

Models name the dimensions of the activations where the batch axis matters (hidden states entering a layer stack,
logits before a loss) with the same logical names their parameters use; this file maps them to the mesh through
the same rules (`sharding.LOGICAL_RULES`, or the runtime's, which `config.parallel.rules` overrides) and pins them
with `jax.lax.with_sharding_constraint`, so the batch stays split between layers whatever the parameters' layout.
`'batch'` maps to the runtime's batch axes (`data` + `fsdp`, as `sharding.batch_sharding`).

Which mesh, read while a function is traced:
* the runtime's, inside `activation_sharding(mesh, rules)` (`Runtime.activations()`; `train.loop` traces its step
  there), with the runtime's rules;
* else the mesh of `jax.set_mesh(mesh)` when it has this project's axes, with the default rules (its Auto axes);
* else none: `constrain` returns `x` itself (single device, model unit and parity tests: numerics untouched).

A mesh axis that does not divide a dimension is dropped from it (only the leading axes of a group that divide it are
kept); a named dimension left with no axis is UNCONSTRAINED (XLA chooses) rather than forced replicated. Unknown
logical names and a rank mismatch are errors with or without a mesh, so a typo fails in the unit tests.
The context is part of jit's cache key (a jax user context): a function traced with constraints is traced again
when called outside the context or under another mesh or rules.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from recogdrive_jax.parallel import mesh as mesh_lib
from recogdrive_jax.parallel import sharding as sh

# (mesh, rules as sorted items) or None. A jax user context, so it is part of jit's cache key: a function traced
# inside the context and called outside it (or under another mesh / rules) is traced again, never reused.
_ACTIVE = jax.make_user_context(default_value=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Within this context, `constrain` shards activations over `mesh` by `rules` (default `LOGICAL_RULES`)."""
    rules = sh.LOGICAL_RULES if rules is None else rules
    with _ACTIVE((mesh, tuple(sorted(dict(rules).items())))):
        yield


def _check(logical: Sequence[str | None], ndim: int, rules: Mapping[str, Any]) -> None:
    for name in logical:
        if name is not None and name not in rules:
            raise ValueError(f"constrain: logical activation axis {name!r} has no sharding rule; known: "
                             f"{sorted(rules)}")
    if len(logical) != ndim:
        raise ValueError(f"constrain: logical axes {tuple(logical)} name {len(logical)} dimensions, but the "
                         f"activation has {ndim}")


def activation_spec(logical: Sequence[str | None], shape: Sequence[int], axis_sizes: Mapping[str, int],
                    rules: Mapping[str, Any] | None = None) -> P:
    """The PartitionSpec `constrain` applies to an activation of `shape` on a mesh of `axis_sizes` (axes absent
    from `axis_sizes` are left out: size 1)."""
    rules = sh.LOGICAL_RULES if rules is None else rules
    _check(logical, len(shape), rules)
    spec = sh.logical_to_mesh(tuple(logical), dict(rules))
    out = []
    for dim, name, entry in zip(shape, logical, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if name is None:
            out.append(None)
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept, ways = [], 1
        for axis in axes:
            if axis not in axis_sizes:
                continue
            if dim % (ways * axis_sizes[axis]):
                break
            kept.append(axis)
            ways *= axis_sizes[axis]
        if not axes:
            out.append(None)  # the rules replicate this name (e.g. 'embed')
        elif not kept:
            out.append(P.UNCONSTRAINED)
        else:
            out.append(kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """`x` pinned to the active mesh by logical names (one per dimension, `None` = replicated); `x` itself when no
    mesh is active."""
    active = _ACTIVE.value
    if active is not None:
        mesh, rules = active
        spec = activation_spec(logical, x.shape, dict(mesh.shape), dict(rules))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    _check(logical, x.ndim, sh.LOGICAL_RULES)
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty:
        return x
    auto = {a: s for a, s in abstract.shape.items() if a in abstract.auto_axes}
    if not set(auto) & set(mesh_lib.MESH_AXES):  # a mesh of other axis names: not ours to constrain
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(logical, x.shape, auto))
