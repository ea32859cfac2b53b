"""The generic training loop every stage uses.

A stage supplies a `Task` (how to initialise params, their logical axes, a loss, a data iterator and an
optional evaluation) and the run's `parallel.runtime.Runtime` (mesh + sharding rules, built once); this file
owns the shardings, ZeRO-1, the jitted step, resume, checkpoints and metrics, so no stage re-implements any of
it. Resume order: this workdir's newest readable checkpoint, then `config.train.init_from` (a `convert` output, a parameter checkpoint or another run's workdir), then fresh init.
NaN guard: the loss is checked at every log and the post-update state (params, EMA, optimizer state) before every
save, so a non-finite state is never written and the newest finite checkpoint stays the one a rerun resumes from.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from recogdrive_jax import config_types, provenance, storage
from recogdrive_jax.errors import UserError
from recogdrive_jax.parallel import runtime as runtime_lib
from recogdrive_jax.parallel import sharding as sh
from recogdrive_jax.train import checkpoint as ckpt_lib
from recogdrive_jax.train import metrics as metrics_lib
from recogdrive_jax.train import optim
from recogdrive_jax.train.state import LossFn, TrainState, init_train_state, make_train_step


@dataclasses.dataclass
class Task:
    name: str
    init_params: Callable[[jax.Array], Any]  # rng -> params tree (traced: runs under eval_shape and jit)
    loss_fn: LossFn | None  # (params, batch, rng) -> (loss, metrics); None when update_fn/make_update is given
    train_iter: Any  # yields process-local numpy batch dicts; get_state()/set_state() for exact resume
    logical: Any = None  # logical specs (P of names) per param, e.g. `sharding.logical_specs(nnx_state)`
    eval_fn: Callable[[TrainState, int], dict] | None = None  # host-level evaluation, returns floats
    ema_decay: float = 0.0
    # A custom pure update `(state, batch, rng, extra) -> (state, metrics)` (e.g. DiffGRPO, PPO) built with
    # `make_optimizer(config.optim, ...)`-compatible optimizer `tx`; replaces the default loss-gradient step.
    update_fn: Callable[[TrainState, Any, jax.Array, Any], tuple[TrainState, dict]] | None = None
    make_update: Callable[[Any], Callable] | None = None  # tx -> update_fn, when the update needs the optimizer
    # Constant inputs of every step (e.g. frozen reference params); parameter-shaped trees get param shardings.
    extra: Any = None
    # Sees the state after init/restore and after every step, before the next `next(train_iter)` (e.g. a PPO
    # rollout iterator that samples with the current params).
    on_state: Callable[[TrainState], None] | None = None
    # Custom initial params `(abstract_params, param_shardings, rng) -> params` for a fresh run without
    # `train.init_from` (e.g. a pretrained trunk + a freshly initialised head).
    load_init: Callable[[Any, Any, jax.Array], Any] | None = None


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or the post-update state became NaN/inf; the newest finite checkpoint is kept."""


def local_batch_size(config) -> int:
    """This process's share of `config.train.batch_size` (the global batch)."""
    global_bs = int(config.train.batch_size)
    if global_bs % jax.process_count():
        raise ValueError(f"config.train.batch_size={global_bs} is not divisible by the {jax.process_count()} "
                         "processes")
    return global_bs // jax.process_count()


def state_shardings(abstract_state: TrainState, logical, mesh: Mesh, tx, zero1: bool,
                    runtime: runtime_lib.Runtime | None = None, what: str = "model") -> TrainState:
    """Shardings of every TrainState leaf: params by logical rules (+FSDP, checked by the runtime), optimizer state
    ZeRO-1 over data. `logical=None` is an error (`runtime.replicate_all` replicates on purpose)."""
    rt = runtime or runtime_lib.from_mesh(mesh)
    pspecs = rt.param_specs(abstract_state.params, logical, what=what)
    ospecs = sh.zero1_partition_specs(tx, abstract_state.opt_state, pspecs, abstract_state.params, mesh,
                                      enabled=zero1)
    specs = TrainState(step=P(), params=pspecs, opt_state=ospecs,
                       ema_params=None if abstract_state.ema_params is None else pspecs)
    return sh.to_shardings(mesh, specs)


def load_init_params(path: str, abstract_params, param_shardings, prefer_ema: bool = True):
    """Params from `path`, placed on `param_shardings`: a run workdir (its newest readable checkpoint's EMA params
    when present and `prefer_ema`, else its params), a `convert planner|internvl` output directory, or a tree
    written by `checkpoint.save_params`. Leaves are matched by path, so int and str list indices both work."""
    return ckpt_lib.load_params(path, ckpt_lib.attach_shardings(abstract_params, param_shardings),
                                prefer_ema=prefer_ema)


def _all_finite(tree) -> jax.Array:
    """One boolean: every float leaf of `tree` is finite (the NaN guard reads it before each save)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train(config, workdir: str, task: Task, mesh: Mesh | None = None,
          runtime: runtime_lib.Runtime | None = None,
          derived: Mapping[str, Any] | None = None) -> tuple[TrainState, dict]:
    """Runs (or resumes) `task` for `config.train.num_steps` steps on `runtime` (default: built from the config,
    or over `mesh` when given). Returns the final state and last eval.

    `derived`: values the stage computed at run time ({'train.num_steps': 3000, 'optim.grad_accum': 2, ...}, e.g.
    sft's config_types.derive_steps_and_accum); they win over the config's and are recorded under `derived` in
    config.json next to the config as given."""
    tcfg = config_types.from_mapping(config_types.TrainConfig, config.train, "train")
    ocfg = config_types.from_mapping(config_types.OptimConfig, config.optim, "optim")
    if derived:
        values = config_types.typed(config).with_values(derived)
        tcfg, ocfg = values.train, values.optim
    if runtime is None:
        runtime = runtime_lib.from_config(config) if mesh is None else runtime_lib.from_mesh(mesh, config)
    mesh = runtime.mesh
    num_steps = int(tcfg.num_steps)
    storage.makedirs(workdir)  # nothing on gs:// (no directories there)
    provenance.write_config(config, workdir, extra={"derived": dict(derived)} if derived else None)

    rng = jax.random.key(int(config.seed))
    init_rng, step_rng = jax.random.split(rng)
    abstract_params = jax.eval_shape(task.init_params, init_rng)
    tx = optim.make_optimizer(ocfg, num_steps, abstract_params)
    schedule = optim.make_schedule(ocfg, num_steps)
    ema = float(task.ema_decay) > 0
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, tx, ema), abstract_params)
    shardings = state_shardings(abstract_state, task.logical, mesh, tx, runtime.zero1, runtime, what=task.name)

    ckpt = ckpt_lib.Checkpointer(workdir, keep=int(tcfg.keep_checkpoints),
                                 async_save=tcfg.async_checkpoint)
    latest, state = ckpt.restore_latest(ckpt_lib.attach_shardings(abstract_state, shardings))
    if latest is not None:
        logging.info("resuming %s from %s step %d", task.name, ckpt.dir, latest)
        data_state = ckpt.data_state(latest)
        if data_state is not None and hasattr(task.train_iter, "set_state"):
            task.train_iter.set_state(data_state)
        elif hasattr(task.train_iter, "set_state"):
            logging.warning("checkpoint %d has no data-iterator state; data restarts from the beginning", latest)
    else:
        init_from = tcfg.init_from
        if init_from or task.load_init is not None:
            params = (load_init_params(init_from, abstract_params, shardings.params) if init_from
                      else task.load_init(abstract_params, shardings.params, init_rng))
            state = jax.jit(lambda p: init_train_state(p, tx, ema), out_shardings=shardings)(params)
        else:
            state = jax.jit(lambda r: init_train_state(task.init_params(r), tx, ema),
                            out_shardings=shardings)(init_rng)

    if task.on_state is not None:
        task.on_state(state)
    if task.make_update is not None:
        step_fn = task.make_update(tx)
    elif task.update_fn is not None:
        step_fn = task.update_fn
    else:
        inner = make_train_step(task.loss_fn, tx, grad_accum=ocfg.grad_accum,
                                ema_decay=float(task.ema_decay), schedule=schedule)
        step_fn = lambda state, batch, rng, extra: inner(state, batch, rng)  # noqa: E731

    def guarded_step(state, batch, rng, extra):
        """The step plus one all-finite reduction over the new state, fused into the same program."""
        new, metrics = step_fn(state, batch, rng, extra)
        return new, (metrics, _all_finite(new))

    repl = sh.replicated(mesh)
    extra = task.extra
    extra_sh = None
    if extra is not None:
        same = jax.tree.structure(extra) == jax.tree.structure(abstract_state.params)
        extra_sh = shardings.params if same else jax.tree.map(lambda _: repl, extra)
        extra = jax.device_put(extra, extra_sh)
    jitted = None

    writer = metrics_lib.MetricWriter(workdir, tensorboard=tcfg.tensorboard)
    acc = metrics_lib.MetricAccumulator()
    start = int(jax.device_get(state.step))
    progress = metrics_lib.Progress(num_steps, start, task.name)
    log_every, eval_every, ckpt_every = tcfg.log_every, tcfg.eval_every, tcfg.checkpoint_every
    last_eval: dict = {}
    t_last, steps_since = time.time(), 0
    pending = []
    state_finite = None  # device bool of the newest step's post-update state

    def non_finite(what: str) -> NonFiniteLossError:
        ckpt.wait()  # the newest save may still be in flight: name the step that is really kept
        kept = ckpt.latest_step()
        where = (f"the newest finite checkpoint, step {kept} in {ckpt.dir}, is kept and a rerun resumes from it"
                 if kept is not None else f"no checkpoint was saved in {ckpt.dir}; a rerun starts afresh")
        return NonFiniteLossError(f"{task.name}: {what}; {where} (lower config.optim.lr or check the data)")

    def check_finite(step, values):
        if not np.isfinite(values["loss"]):
            raise non_finite(f"loss became {values['loss']} at step {step}")

    def check_state_finite(step):
        """Before every save: a state with a NaN/inf param, EMA or optimizer leaf is never written."""
        if state_finite is not None and not bool(jax.device_get(state_finite)):
            raise non_finite(f"the params / EMA / optimizer state after step {step} are not finite (not saved)")

    def flush(step):
        nonlocal t_last, steps_since, pending
        for m in jax.device_get(pending):
            acc.add(m)
        pending = []
        values = acc.compute_and_reset()
        values["steps_per_sec"] = steps_since / max(time.time() - t_last, 1e-9)
        if "tokens" in values:  # stages that count tokens per step (SFT) get throughput for free
            values["tokens_per_sec"] = values["tokens"] * values["steps_per_sec"]
        check_finite(step, values)
        writer.write(step, "train", values)
        progress.log(step, "train", values)
        t_last, steps_since = time.time(), 0

    try:
        for step in range(start, num_steps):
            local = next(task.train_iter)
            batch = runtime.global_batch(local)
            if jitted is None:
                batch_sh = jax.tree.map(lambda x: runtime.batch_sharding(x.ndim), batch)
                jitted = jax.jit(guarded_step, in_shardings=(shardings, batch_sh, repl, extra_sh),
                                 out_shardings=(shardings, repl), donate_argnums=(0,))
            with runtime.activations():  # traced here: the models' constrain() calls shard on the runtime's mesh
                state, (metrics, state_finite) = jitted(state, batch, jax.random.fold_in(step_rng, step), extra)
            pending.append(metrics)
            if task.on_state is not None:
                task.on_state(state)
            steps_since += 1
            done = step + 1
            progress.update(done)
            save = bool(ckpt_every and done % ckpt_every == 0) or done == num_steps
            if done % log_every == 0 or done == num_steps or (save and pending):
                flush(done)
            if save:
                check_state_finite(done)
            if task.eval_fn is not None and ((eval_every and done % eval_every == 0) or done == num_steps):
                last_eval = {k: float(v) for k, v in task.eval_fn(state, done).items()}
                writer.write(done, "eval", last_eval)
                progress.log(done, "eval", last_eval)
            if save:
                data_state = task.train_iter.get_state() if hasattr(task.train_iter, "get_state") else None
                ckpt.save(done, state, data_state, force=done == num_steps)
        if start >= num_steps and task.eval_fn is not None:
            last_eval = {k: float(v) for k, v in task.eval_fn(state, num_steps).items()}
    finally:
        progress.close()
        writer.close()
        ckpt.close()
    return state, last_eval
