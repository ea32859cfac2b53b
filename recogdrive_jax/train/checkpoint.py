"""Orbax checkpoints of the train state plus each process's data-iterator state.

Layout of `WORKDIR/checkpoints/`:
  <step>/state/...            Orbax PyTree of `TrainState` (async, atomic: a killed run never leaves a
                              half-written step that looks complete)
  data/<step>/process_<i>.json  the iterator state of JAX process i after `step` batches; written (atomically)
                              *before* the Orbax save starts, so every committed step has its data state.
Restoring passes abstract arrays carrying the *target* shardings, so a checkpoint written on one mesh
restores onto another.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    pass


def _encode_state(state) -> Any:
    if isinstance(state, bytes):
        return {"__bytes__": state.decode("utf-8")}
    return state


def _decode_state(state) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return state["__bytes__"].encode("utf-8")
    return state


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.data_dir = os.path.join(self.dir, "data")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=("state",))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state=None, force: bool = False):
        if data_state is not None:
            d = os.path.join(self.data_dir, str(step))
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, f"process_{jax.process_index()}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(_encode_state(data_state), f)
            os.replace(path + ".tmp", path)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)
        self._prune_data_states()

    def _prune_data_states(self):
        if jax.process_index() != 0 or not os.path.isdir(self.data_dir):
            return
        keep = {str(s) for s in self.manager.all_steps()}
        # The step being saved asynchronously is not listed yet: keep anything newer than the latest listed.
        latest = max([int(s) for s in keep], default=-1)
        for name in os.listdir(self.data_dir):
            if name.isdigit() and name not in keep and int(name) < latest:
                shutil.rmtree(os.path.join(self.data_dir, name), ignore_errors=True)

    def restore(self, step: int, abstract_state):
        """`abstract_state`: a TrainState of `jax.ShapeDtypeStruct`s with target shardings."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:  # Orbax raises many types; say which checkpoint and why.
            raise CheckpointError(f"cannot restore {self.dir}/{step}: {type(e).__name__}: {e}") from e
        return out["state"]

    def data_state(self, step: int):
        path = os.path.join(self.data_dir, str(step), f"process_{jax.process_index()}.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return _decode_state(json.load(f))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(path: str, params) -> None:
    """Writes a bare parameter tree (e.g. a converted PyTorch checkpoint) that stages can start from."""
    path = os.path.abspath(path)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, params, force=True)
    ckptr.wait_until_finished()


def load_params(path: str, abstract_params=None):
    """Reads a tree written by `save_params`; with `abstract_params` (ShapeDtypeStructs with shardings) the
    arrays land directly on the target shardings and shapes are checked."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"parameter checkpoint {path!r} does not exist")
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(path, abstract_params) if abstract_params is not None else ckptr.restore(path)
    except Exception as e:
        raise CheckpointError(f"cannot load parameters from {path!r}: {type(e).__name__}: {e}") from e
