"""Device mesh from config, and multi-host start-up.

The mesh always has the three axes `('data', 'fsdp', 'tensor')` so sharding rules never depend on which
kind of parallelism a run uses; a single device is simply the mesh (1, 1, 1).
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from recogdrive_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(UserError):
    pass


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills one `-1` entry so the product equals `num_devices`; errors name `config.mesh.<axis>`."""
    sizes = [int(s) for s in sizes]
    for axis, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise MeshError(f"config.mesh.{axis}={s}: sizes must be positive or -1 (fill)")
    fills = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    if len(fills) > 1:
        raise MeshError(f"config.mesh: only one axis may be -1, got {fills}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if fills:
        if num_devices % known:
            raise MeshError(
                f"config.mesh: the fixed sizes {dict(zip(MESH_AXES, sizes))} (product {known}) do not divide "
                f"the {num_devices} available devices")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise MeshError(
            f"config.mesh: sizes {dict(zip(MESH_AXES, sizes))} multiply to {int(np.prod(sizes))}, but "
            f"{num_devices} devices are available; use -1 on one axis to fill")
    return tuple(sizes)


def make_mesh(mesh_config=None, devices=None) -> Mesh:
    """Builds the global mesh from `config.mesh.{data,fsdp,tensor}` (defaults: data=-1)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = (-1, 1, 1) if mesh_config is None else (
        mesh_config.get("data", -1), mesh_config.get("fsdp", 1), mesh_config.get("tensor", 1))
    shape = resolve_mesh_shape(sizes, len(devices))
    # Process-major order: each host's devices are contiguous along the data axis, so per-host batches are
    # contiguous slices of the global batch.
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def initialize_distributed(dist_config=None) -> None:
    """Starts `jax.distributed` for multi-host runs.

    Reads `config.distributed.{coordinator_address,num_processes,process_id}` or, when those are unset, the
    standard environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, or SLURM/K8s
    auto-detection when `config.distributed.auto=True`). Single-process runs do nothing.
    """
    cfg = dict(dist_config or {})
    addr = cfg.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    nproc = cfg.get("num_processes") or os.environ.get("JAX_NUM_PROCESSES")
    pid = cfg.get("process_id")
    if pid is None or pid < 0:
        pid = os.environ.get("JAX_PROCESS_ID")
    if addr and nproc:
        kwargs = dict(coordinator_address=addr, num_processes=int(nproc), process_id=int(pid or 0))
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            kwargs["initialization_timeout"] = int(cfg.get("timeout_s", 300))
        logging.info("jax.distributed.initialize(%s)", kwargs)
        jax.distributed.initialize(**kwargs)
    elif cfg.get("auto"):
        jax.distributed.initialize()
