"""One runtime per run: the mesh built from `config.mesh`, the logical→mesh rules (`config.parallel.rules`
overrides `sharding.LOGICAL_RULES`), parameter shardings checked once, and batch placement.

Every stage builds it once (`from_config`) and hands it to the loop and to its loaders; this package is the only
place a mesh is made (a test checks it). Restores go straight onto the target shardings: `targets()` gives
`ShapeDtypeStruct`s carrying them, which `train.checkpoint.load_params` hands to Orbax (no host copy of the
tree). Checks, so a sharding mistake fails at start-up instead of as an OOM on the 8B model:

* a parameter tree without logical axis names is an error (replicating everything must be asked for with
  `replicate_all`);
* with `mesh.fsdp > 1`, every parameter of >= `MIN_FSDP_ELEMENTS` elements must end up split over some mesh axis
  (else an error names the parameter and its shape).

Activations: `activations()` is the context in which the models' logical `activations.constrain` calls shard the
batch axis (and any other named dimension) over this mesh by the same rules.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from recogdrive_jax.errors import UserError
from recogdrive_jax.parallel import activations as act
from recogdrive_jax.parallel import mesh as mesh_lib
from recogdrive_jax.parallel import sharding as sh

MIN_FSDP_ELEMENTS = 1 << 20


class ShardingError(UserError):
    """Parameter shardings that would silently replicate what should be split; the message names the parameter."""


def rules_from_config(rules_cfg) -> dict[str, Any]:
    """`config.parallel.rules` ({logical name: 'axis' | 'axis1,axis2' | ''}) over the default rules."""
    rules = dict(sh.LOGICAL_RULES)
    for name, value in dict(rules_cfg or {}).items():
        if name not in rules:
            raise ShardingError(f"config.parallel.rules.{name}: unknown logical axis; known: {sorted(rules)}")
        axes = tuple(a.strip() for a in str(value or "").split(",") if a.strip())
        bad = [a for a in axes if a not in mesh_lib.MESH_AXES]
        if bad:
            raise ShardingError(f"config.parallel.rules.{name}={value!r}: unknown mesh axis {bad}; allowed: "
                                f"{list(mesh_lib.MESH_AXES)} (comma-separated, '' = replicated)")
        rules[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return rules


def rules_block() -> dict[str, str]:
    """The default rules in `config.parallel.rules` form (every logical name a key, so each can be overridden)."""
    def fmt(axes):
        return "" if axes is None else axes if isinstance(axes, str) else ",".join(axes)
    return {name: fmt(axes) for name, axes in sh.LOGICAL_RULES.items()}


def replicate_all(abstract_params):
    """Logical specs replicating every parameter: the explicit form of "no logical annotation"."""
    return jax.tree.map(lambda _: P(), abstract_params)


def _is_spec(x) -> bool:
    return isinstance(x, P)


@dataclasses.dataclass(frozen=True)
class Runtime:
    mesh: Mesh
    rules: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(sh.LOGICAL_RULES))
    zero1: bool = True

    @property
    def batch_axes(self) -> tuple[str, ...]:
        axes = self.rules.get("batch", sh.BATCH_AXES)
        return (axes,) if isinstance(axes, str) else tuple(axes or ())

    @property
    def batch_shards(self) -> int:
        """How many ways the global batch is split (the product of the batch axes' sizes)."""
        n = 1
        for a in self.batch_axes:
            n *= self.mesh.shape[a]
        return n

    # ---- parameters ----
    def param_specs(self, abstract_params, logical, *, what: str = "model"):
        """Mesh PartitionSpecs of a parameter tree from its logical specs (+ FSDP), checked (module docstring)."""
        if logical is None:
            raise ShardingError(f"{what}: no logical axis names for its parameters (pass the module's "
                                "`ModuleDef.logical`, or `runtime.replicate_all(params)` to replicate on purpose)")
        specs = sh.param_partition_specs(abstract_params, logical, self.mesh, rules=self.rules)
        if self.mesh.shape["fsdp"] > 1:
            check_fsdp_coverage(abstract_params, specs, self.mesh, what=what)
        return specs

    def param_shardings(self, abstract_params, logical, *, what: str = "model"):
        return sh.to_shardings(self.mesh, self.param_specs(abstract_params, logical, what=what))

    def targets(self, abstract_params, logical, *, what: str = "model"):
        """`ShapeDtypeStruct`s carrying their target shardings: what a restore fills in place."""
        shardings = self.param_shardings(abstract_params, logical, what=what)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params,
                            shardings)

    def init_params(self, init_fn: Callable[[jax.Array], Any], abstract_params, logical, rng: jax.Array):
        """Fresh parameters created directly on their shardings (never materialised on one device)."""
        return jax.jit(init_fn, out_shardings=self.param_shardings(abstract_params, logical))(rng)

    # ---- batches ----
    def batch_sharding(self, ndim: int = 1) -> NamedSharding:
        return sh.batch_sharding(self.mesh, ndim, self.batch_axes)

    def global_batch(self, local_batch):
        """Process-local numpy rows → global arrays sharded over the batch axes."""
        return sh.make_global_batch(self.mesh, local_batch, self.batch_axes)

    def put_batch(self, local_batch):
        """A batch of this process only (no cross-host array): `device_put` over the batch axes."""
        return jax.tree.map(lambda x: jax.device_put(x, self.batch_sharding(x.ndim)), local_batch)

    def replicated(self) -> NamedSharding:
        return sh.replicated(self.mesh)

    # ---- activations ----
    def activations(self):
        """Context in which the models' `activations.constrain(x, logical)` calls shard over this mesh by this
        runtime's rules; jit re-traces a function called inside it (`train.loop` runs its step there)."""
        return act.activation_sharding(self.mesh, self.rules)


def _ways(spec: P, mesh: Mesh) -> int:
    """Into how many shards `spec` splits an array on `mesh` (1 = replicated, e.g. only size-1 axes named)."""
    n = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else tuple(entry or ()):
            n *= mesh.shape[axis]
    return n


def check_fsdp_coverage(abstract_params, specs, mesh: Mesh, *, what: str = "model",
                        min_elements: int = MIN_FSDP_ELEMENTS):
    """Every parameter of >= `min_elements` elements is split over the mesh (called when fsdp > 1)."""
    spec_by_path = dict(jax.tree_util.tree_leaves_with_path(specs, is_leaf=_is_spec))
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        spec = spec_by_path[path]
        size = 1
        for d in leaf.shape:
            size *= int(d)
        if size >= min_elements and _ways(spec, mesh) == 1:
            raise ShardingError(
                f"{what}: parameter {jax.tree_util.keystr(path)} {tuple(leaf.shape)} ({size} elements) would be "
                f"replicated on every device although mesh.fsdp > 1: no dimension is divisible by the fsdp size "
                f"and no logical rule splits it (change config.mesh or config.parallel.rules)")


def from_config(config, *, devices=None) -> Runtime:
    """The run's runtime: `config.mesh` over `devices` (default all), `config.parallel.{zero1,rules}`."""
    par = (config["parallel"] if "parallel" in config else None) or {}  # a ConfigDict or a typed RunConfig
    mesh = mesh_lib.make_mesh(config["mesh"] if "mesh" in config else None, devices=devices)
    return Runtime(mesh=mesh, rules=rules_from_config(par.get("rules")), zero1=bool(par.get("zero1", True)))


def from_mesh(mesh: Mesh, config=None) -> Runtime:
    """A runtime over a mesh a caller already has (tests, notebooks), rules/zero1 from `config` when given."""
    par = (config["parallel"] if config is not None and "parallel" in config else None) or {}
    return Runtime(mesh=mesh, rules=rules_from_config(par.get("rules")), zero1=bool(par.get("zero1", True)))
