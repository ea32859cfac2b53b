"""Orbax checkpoints of the train state plus each process's data-iterator state, and parameter loading.

Layout of `WORKDIR/checkpoints/`:
  <step>/state/...            Orbax PyTree of `TrainState` (async, atomic: a killed run leaves at most a
                              `<step>.orbax-checkpoint-tmp-*` directory, which is never listed as a step)
  data/<step>/process_<i>.json  the iterator state of JAX process i after `step` batches; written (atomically)
                              *before* the Orbax save starts, so every committed step has its data state.
  corrupt/<step>              a step that could not be read, moved aside (never deleted) on resume.

Every restore matches leaves by path ('params/model/transformer_blocks/0/attn/kernel'), never by tree structure:
Orbax reads nnx.List indices back as string keys and a converted checkpoint is a bare dict, so only paths and
shapes are compared. Arrays land straight on the target shardings, so a checkpoint written on one mesh restores
onto another. A mismatch (another model size) is one error line naming the directory and a few keys; an
unreadable newest step (truncated chunk, missing metadata) falls back to the newest readable one with a warning.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from recogdrive_jax import storage
from recogdrive_jax.errors import CheckpointKeyError, UserError
from recogdrive_jax.train.optim import path_str

STATE_ITEM = "state"
CORRUPT_DIR = "corrupt"
TMP_MARK = ".orbax-checkpoint-tmp"
COMMIT_FILE = "commit_success.txt"  # on gs:// Orbax saves in place and marks a finished step with this file


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked; the message is one line naming the directory."""


class CheckpointMismatchError(CheckpointError, CheckpointKeyError):
    """The checkpoint's keys or shapes are not the model's (e.g. another model size)."""


def _one_line(e: BaseException, limit: int = 240) -> str:
    """The innermost cause (e.g. TensorStore's 'OUT_OF_RANGE: Error reading "params.fc1.kernel/0.0" ...'), on one
    line: Orbax's own wrappers print kilobytes of spec."""
    while (e.__cause__ or e.__context__) is not None and len(str(e.__cause__ or e.__context__)) > 0:
        e = e.__cause__ or e.__context__
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def flat_by_path(tree) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def attach_shardings(abstract, shardings):
    """ShapeDtypeStructs of `abstract` carrying the sharding at the same path of `shardings` (key types may
    differ: int list indices on one side, strings on the other)."""
    by_path = flat_by_path(shardings)
    return jax.tree_util.tree_map_with_path(
        lambda p, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=by_path[path_str(p)]), abstract)


def _read_metadata(item_dir: str):
    # The handler, not a Checkpointer: an item directory has no step-level metadata to warn about.
    meta = ocp.PyTreeCheckpointHandler().metadata(storage.as_path(item_dir))
    return getattr(meta, "tree", meta)


def _mismatch(got: dict[str, tuple], want: dict[str, tuple], limit: int = 4) -> str | None:
    def order(k):  # the params first: they say "another model size" most directly
        return (not k.startswith("params/"), k)

    missing, unexpected = sorted(set(want) - set(got), key=order), sorted(set(got) - set(want), key=order)
    bad = sorted((k for k in set(got) & set(want) if tuple(got[k]) != tuple(want[k])), key=order)
    if not (missing or unexpected or bad):
        return None

    def some(keys, fmt=str):
        more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(fmt(k) for k in keys[:limit]) + more

    parts = [f"{len(bad)} shape mismatch(es): " + some(bad, lambda k: f"{k} {tuple(got[k])} vs model "
                                                         f"{tuple(want[k])}")] if bad else []
    parts += [f"{len(missing)} missing: {some(missing)}"] if missing else []
    parts += [f"{len(unexpected)} unexpected: {some(unexpected)}"] if unexpected else []
    return "; ".join(parts) + _layer_layout_hint(missing, unexpected)


def _layer_layout_hint(missing: list[str], unexpected: list[str]) -> str:
    """When the only difference is per-layer keys (`.../blocks/3/w`) against one stacked entry (`.../blocks/w`):
    the same model saved with the other layer layout (e.g. `planner.scan_layers` differs)."""
    def strip(keys):
        return {re.sub(r"/\d+(?=/)", "", k) for k in keys}

    if not (missing and unexpected) or strip(missing) != strip(unexpected):
        return ""
    saved = "one entry per layer" if any(re.search(r"/\d+/", k) for k in unexpected) else "stacked layers"
    return (f" (the checkpoint stores {saved}, the model the other layout: a `scan_layers` option differs from the "
            "run that wrote it, e.g. config.planner.scan_layers; convert with models/planner.to_layout)")


def restore_tree(item_dir: str, target, *, subtree: str | None = None, what: str | None = None):
    """Restores `target` (ShapeDtypeStructs with shardings, the model's structure) from the Orbax PyTree in
    `item_dir` (or its `subtree`, e.g. 'ema_params'), matching leaves by path. Returns `target`'s structure."""
    what = what or item_dir
    if not storage.isfile(storage.join(item_dir, "_METADATA")):  # else Orbax guesses a partial tree from shards
        raise CheckpointError(f"cannot read {what}: {storage.join(item_dir, '_METADATA')} is missing")
    try:
        meta = _read_metadata(item_dir)
    except Exception as e:  # noqa: BLE001  (Orbax raises many types: say which checkpoint, in one line)
        raise CheckpointError(f"cannot read {what}: {_one_line(e)}") from None
    if subtree is not None:
        if not isinstance(meta, dict) or meta.get(subtree) is None:
            raise CheckpointError(f"{what} has no {subtree!r}")
        meta = meta[subtree]
    want = flat_by_path(target)
    got_meta = flat_by_path(meta)
    problem = _mismatch({k: tuple(getattr(m, "shape", ())) for k, m in got_meta.items()},
                        {k: tuple(a.shape) for k, a in want.items()})
    if problem:
        raise CheckpointMismatchError(f"{what} does not match the model: {problem}")
    item = jax.tree_util.tree_map_with_path(lambda p, _: want[path_str(p)], meta)
    if subtree is not None:
        item = {subtree: item}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=subtree is not None)
    try:
        out = ocp.PyTreeCheckpointHandler().restore(storage.as_path(item_dir), args=args)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read {what}: {_one_line(e)}") from None
    got = flat_by_path(out[subtree] if subtree is not None else out)
    return jax.tree_util.tree_map_with_path(lambda p, _: got[path_str(p)], target)


def _agree(ok: bool) -> bool:
    """True on every process only if `ok` on every process (so all of them restore the same step)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _step_dirs(ckpt_dir: str) -> list[int]:
    """Committed steps, newest first (Orbax renames `<step>.orbax-checkpoint-tmp-*` to `<step>` on commit; on gs://
    it writes `<step>/` in place and adds `commit_success.txt` last)."""
    in_place = storage.scheme(ckpt_dir) == "gs"
    steps = [int(n) for n in storage.listdir(ckpt_dir) if n.isdigit() and storage.isdir(storage.join(ckpt_dir, n))
             and (not in_place or storage.exists(storage.join(ckpt_dir, n, COMMIT_FILE)))]
    return sorted(steps, reverse=True)


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
        self.dir = storage.join(storage.abspath(workdir), "checkpoints")
        self.data_dir = storage.join(self.dir, "data")
        # Leftover `*.orbax-checkpoint-tmp-*` dirs (a save cut short) are left alone: nothing is ever deleted.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=False)
        self.manager = ocp.CheckpointManager(storage.as_path(self.dir), options=options, item_names=(STATE_ITEM,))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state=None, force: bool = False):
        if data_state is not None:  # atomic (tmp + rename locally; an object appears whole)
            storage.write_text(storage.join(self.data_dir, str(step), f"process_{jax.process_index()}.json"),
                               json.dumps(_encode_state(data_state)))
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)
        self._prune_data_states()

    def _prune_data_states(self):
        if jax.process_index() != 0 or not storage.isdir(self.data_dir):
            return
        keep = {str(s) for s in self.manager.all_steps()}
        # The step being saved asynchronously is not listed yet: keep anything newer than the latest listed.
        latest = max([int(s) for s in keep], default=-1)
        for name in storage.listdir(self.data_dir):
            if name.isdigit() and name not in keep and int(name) < latest:
                try:
                    storage.rmtree(storage.join(self.data_dir, name))
                except OSError:
                    pass

    def restore(self, step: int, abstract_state):
        """`abstract_state`: a TrainState of `jax.ShapeDtypeStruct`s with target shardings."""
        return restore_tree(storage.join(self.dir, str(step), STATE_ITEM), abstract_state,
                            what=f"checkpoint {self.dir}/{step}")

    def restore_latest(self, abstract_state) -> tuple[int | None, Any]:
        """(step, state) of the newest readable step, or (None, None) when there is none yet. Unreadable newer
        steps are moved to `corrupt/` (so later saves can reuse their numbers) with a one-line warning; a step
        that does not match the model is an error, since an older one of the same run would not match either."""
        bad: list[tuple[int, str]] = []
        for step in _step_dirs(self.dir):
            try:
                state, reason = self.restore(step, abstract_state), None
            except CheckpointMismatchError as e:
                raise CheckpointMismatchError(f"{e} (another model size, optimizer or EMA setting than the run's "
                                              "own config? resume with that config or use a new --workdir)") from None
            except CheckpointError as e:
                state, reason = None, str(e)
            if not _agree(reason is None):
                bad.append((step, reason or f"checkpoint {self.dir}/{step} is unreadable on another process"))
                continue
            if bad:
                self._set_aside(bad, step)
            self._note_unfinished(step)
            return step, state
        if bad:
            raise CheckpointError(f"no checkpoint in {self.dir} can be read (" + "; ".join(r for _, r in bad)
                                  + "); move the directory away to start afresh")
        return None, None

    def _set_aside(self, bad: list[tuple[int, str]], good: int) -> None:
        """Process 0 moves each unreadable step to corrupt/<step>[.n]; every process then re-lists the steps."""
        if jax.process_index() == 0:
            moved = []
            for step, _ in bad:
                dst, n = storage.join(self.dir, CORRUPT_DIR, str(step)), 1
                while storage.exists(dst):
                    dst, n = storage.join(self.dir, CORRUPT_DIR, f"{step}.{n}"), n + 1
                storage.move(storage.join(self.dir, str(step)), dst)
                moved.append(dst)
            logging.warning("%s; moved to %s; resuming from step %d", "; ".join(r for _, r in bad),
                            ", ".join(moved), good)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("recogdrive_checkpoint_set_aside")
        self.manager.reload()

    def _note_unfinished(self, step: int) -> None:
        """A save cut short leaves `<step>.orbax-checkpoint-tmp-*`: never a step, never deleted, named once."""
        names = storage.listdir(self.dir)
        left = sorted(n for n in names if TMP_MARK in n and n.split(".")[0].isdigit() and int(n.split(".")[0]) > step)
        if storage.scheme(self.dir) == "gs":  # in-place saves: a newer step directory without its commit file
            left += [n for n in names if n.isdigit() and int(n) > step
                     and not storage.exists(storage.join(self.dir, n, COMMIT_FILE))]
        if left and jax.process_index() == 0:
            logging.warning("ignoring unfinished save(s) %s in %s (interrupted run; delete to free disk); resuming "
                            "from step %d", ", ".join(left), self.dir, step)

    def data_state(self, step: int):
        path = storage.join(self.data_dir, str(step), f"process_{jax.process_index()}.json")
        if not storage.exists(path):
            return None
        return _decode_state(json.loads(storage.read_text(path)))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(path: str, params) -> None:
    """Writes a bare parameter tree (e.g. a converted PyTorch checkpoint) that stages can start from."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(storage.as_path(path), params, force=True)
    ckptr.wait_until_finished()


def _is_tree(path: str) -> bool:
    return storage.isfile(storage.join(path, "_METADATA"))


def load_params(path: str, target=None, *, prefer_ema: bool = True):
    """Parameters from any directory a user has:
      - a bare tree written by `save_params` (or any Orbax PyTree directory);
      - a `convert planner|internvl --from-...` output directory (its `params/` tree);
      - a run workdir (its newest readable checkpoint: EMA params when present and `prefer_ema`, else params).
    With `target` (ShapeDtypeStructs with shardings) leaves are matched by path, shapes checked and arrays placed
    on the target shardings; without it the bare tree is returned as stored."""
    path = storage.abspath(path)
    if not storage.isdir(path):
        raise CheckpointError(f"parameter checkpoint {path!r} does not exist")
    if target is None:
        try:
            inner = storage.join(path, "params")
            return ocp.StandardCheckpointer().restore(
                storage.as_path(inner if not _is_tree(path) and _is_tree(inner) else path))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot load parameters from {path!r}: {_one_line(e)}") from None
    if _is_tree(path):
        return restore_tree(path, target, what=f"parameter checkpoint {path}")
    if _is_tree(storage.join(path, "params")):
        return restore_tree(storage.join(path, "params"), target, what=f"converted checkpoint {path}/params")
    ckpt_dir = storage.join(path, "checkpoints")
    if storage.isdir(ckpt_dir):
        return _load_run_params(path, ckpt_dir, target, prefer_ema)
    raise CheckpointError(f"{path!r} is not a parameter checkpoint: expected a run workdir (checkpoints/), a "
                          "`convert ... --out` directory (params/) or an Orbax tree (_METADATA)")


# run workdir (absolute) -> the step `load_params` last loaded from it in this process (after any fallback past
# unreadable newer steps): what `checkpoint_ref` reports as scored.
_LOADED_STEPS: dict[str, int] = {}


def loaded_step(path: str) -> int | None:
    """The step `load_params` last loaded from run workdir `path` in this process, or None."""
    return _LOADED_STEPS.get(storage.abspath(path))


def _load_run_params(path: str, ckpt_dir: str, target, prefer_ema: bool):
    """Another run's params: its newest readable step (older ones on failure, with a warning; nothing moved)."""
    bad = []
    for step in _step_dirs(ckpt_dir):
        item = storage.join(ckpt_dir, str(step), STATE_ITEM)
        what = f"run checkpoint {ckpt_dir}/{step}"
        try:
            meta = _read_metadata(item)
            has_ema = isinstance(meta, dict) and bool(jax.tree.leaves(meta.get("ema_params")))
            params, reason = restore_tree(item, target, subtree="ema_params" if prefer_ema and has_ema
                                          else "params", what=what), None
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001  (unreadable metadata or arrays: try the next older step)
            params, reason = None, str(e) if isinstance(e, CheckpointError) else f"cannot read {what}: {_one_line(e)}"
        if _agree(reason is None):
            if bad:
                logging.warning("%s; using step %d instead", "; ".join(bad), step)
            _LOADED_STEPS[path] = step
            return params
        bad.append(reason or f"{what} is unreadable on another process")
    if bad:
        raise CheckpointError(f"no checkpoint of {path} can be read: " + "; ".join(bad))
    raise CheckpointError(f"{path}: the run has no checkpoint yet")


def checkpoint_ref(path: str) -> dict:
    """{'path': absolute path, 'step': the step of a run workdir that was loaded from it in this process (after a
    fallback past unreadable newer steps), else its latest checkpoint's (None for a bare parameter or HF
    directory)}: what an evaluation scored."""
    if not path:
        return {"path": "", "step": None}
    path = storage.abspath(path)
    step = None
    if storage.isdir(storage.join(path, "checkpoints")):
        step = loaded_step(path)
        if step is not None:
            return {"path": path, "step": int(step)}
        ckptr = Checkpointer(path, async_save=False)
        try:
            step = ckptr.latest_step()
        finally:
            ckptr.close()
    return {"path": path, "step": None if step is None else int(step)}
