"""Bridge between Flax NNX modules and the pure parameter trees the loop, optimizer and Orbax work with.

The loop only sees nested dicts of arrays; a loss turns them back into a module with `bind` (inside jit this
is trace-time bookkeeping only). Logical axis names come from the modules' NNX metadata.
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from recogdrive_jax.parallel import sharding as sh


def _int_keys(tree):
    """Orbax/JSON turn nnx.List indices into strings; map digit keys back to ints."""
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


class ModuleDef:
    """Graph definition + parameter template of the NNX module built by `build(rngs)`."""

    def __init__(self, build: Callable[[nnx.Rngs], nnx.Module]):
        self.build = build
        abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
        self.graphdef, self.param_state, self.rest = nnx.split(abstract, nnx.Param, ...)
        if jax.tree.leaves(self.rest):
            # Non-parameter state (buffers): keep concrete values from one real build.
            _, _, self.rest = nnx.split(build(nnx.Rngs(0)), nnx.Param, ...)
        self.logical = sh.logical_specs(self.param_state)

    def init(self, rng: jax.Array) -> dict:
        """Fresh parameters as a pure dict (traceable: the loop runs it under eval_shape and jit)."""
        return nnx.state(self.build(nnx.Rngs(rng)), nnx.Param).to_pure_dict()

    def abstract_params(self) -> dict:
        return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), self.param_state.to_pure_dict())

    def bind(self, params) -> nnx.Module:
        """A module whose parameters are `params` (a pure dict with this module's structure)."""
        state = jax.tree.map(lambda x: x, self.param_state)
        nnx.replace_by_pure_dict(state, _int_keys(params))
        return nnx.merge(self.graphdef, state, self.rest)
