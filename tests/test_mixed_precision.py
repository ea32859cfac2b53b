"""The mixed-precision policy (issue 17): fp32 master params and optimizer state, bf16 operands in every matmul of
the lowered train step (forward and backward), for the SFT step of InternVL and the planner's IL step."""
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import sft as bench_sft  # noqa: E402  (the SFT benchmark's batch maker and optimizer settings)
from recogdrive_jax.models import internvl as iv  # noqa: E402
from recogdrive_jax.models.planner import build_planner, planner_config  # noqa: E402
from recogdrive_jax.train import optim  # noqa: E402
from recogdrive_jax.train.module_def import ModuleDef  # noqa: E402
from recogdrive_jax.train.state import init_train_state, make_train_step  # noqa: E402
from recogdrive_jax.vlm import checkpoint as vlm_ckpt, lm_loss  # noqa: E402

DOT = re.compile(r"stablehlo\.dot_general %\S+, %\S+.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)")


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
    """Element types of both operands of every dot in the lowered module."""
    dots = DOT.findall(hlo)
    assert dots, "no dot_general in the lowered module"
    return [(a.rsplit("x", 1)[-1].rstrip(">"), b.rsplit("x", 1)[-1].rstrip(">")) for a, b in dots]


def _check(step, state, batch):
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)} == \
        {jnp.dtype("float32")}
    types = _dot_operand_types(jax.jit(step).lower(state, batch, jax.random.key(0)).as_text())
    assert all(t == ("bf16", "bf16") for t in types), sorted(set(types))
    return types


def test_sft_step_bf16_dots_fp32_master_and_adam():
    cfg = iv.get_config("tiny")
    mdef = vlm_ckpt.module_def(cfg, "bfloat16")
    oc = bench_sft.optim_cfg()
    params = jax.eval_shape(mdef.init, jax.random.key(0))
    tx = optim.make_optimizer(oc, 100, params)
    step = make_train_step(lm_loss.make_loss_fn(mdef, chunk=0, drop_path=False, grad_accum=1), tx,
                           schedule=optim.make_schedule(oc, 100))
    state = jax.eval_shape(lambda p: init_train_state(p, tx), params)
    batch = jax.tree.map(jnp.asarray, bench_sft.make_batch(cfg, 2, 64, 2))
    types = _check(step, state, batch)
    assert len(types) > 40  # ViT + projector + LLM + LM head, forward and backward


def test_planner_step_bf16_dots_fp32_master_and_adam():
    cfg = planner_config("tiny4", dtype="bfloat16")
    mdef = ModuleDef(lambda rngs: build_planner(cfg, rngs))
    params = jax.eval_shape(mdef.init, jax.random.key(0))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))

    def loss_fn(p, batch, rng):
        loss, metrics = mdef.bind(p).loss(batch, rng)
        return loss, {}

    step = make_train_step(loss_fn, tx)
    state = jax.eval_shape(lambda p: init_train_state(p, tx), params)
    g = np.random.default_rng(0)
    batch = {"cond": {"vl_states": jnp.asarray(g.normal(size=(2, 6, cfg.vl_dim)), jnp.float32),
                      "status": jnp.zeros((2, 8), jnp.float32), "history": jnp.zeros((2, 4, 3), jnp.float32)},
             "future": jnp.zeros((2, 8, 3), jnp.float32)}
    _check(step, state, batch)
