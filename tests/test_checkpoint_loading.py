"""`load_init_params` reads every kind of checkpoint a user has, matching leaves by path: a `convert planner
--from-torch` output directory (Orbax stores nnx.List indices as '0', '1', ...; the model has ints), its inner
params/ tree, and another run's workdir (EMA or raw params, newest readable step). The stages on a converted upstream
checkpoint (eval, il and rl `init_from`, one step each) are tests/test_upstream_roundtrip.py.
"""
import os
import sys

import jax
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_ref.planner import TorchPlanner, lightning_state_dict, randomize_  # noqa: E402

from recogdrive_jax.convert import planner as conv  # noqa: E402
from recogdrive_jax.models.planner import build_planner, planner_config  # noqa: E402
from recogdrive_jax.parallel import mesh as mesh_lib  # noqa: E402
from recogdrive_jax.parallel import sharding as sh  # noqa: E402
from recogdrive_jax.train import checkpoint as ckpt_lib  # noqa: E402
from recogdrive_jax.train import loop  # noqa: E402
from recogdrive_jax.train.module_def import ModuleDef  # noqa: E402

KEY = "agent.action_head.model.transformer_blocks.1.attn.to_q.weight"  # a layer under an nnx.List index


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(convert --out dir, the torch state dict it came from)."""
    root = tmp_path_factory.mktemp("conv")
    cfg = planner_config("tiny")
    tm = TorchPlanner(vl_dim=cfg.vl_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                      output_dim=cfg.output_dim, mlp_hidden=cfg.mlp_hidden)
    randomize_(tm, 0)
    sd = lightning_state_dict(tm)
    torch.save({"state_dict": sd, "epoch": 1, "global_step": 10}, root / "stage2.ckpt")
    assert conv.main(["--from-torch", str(root / "stage2.ckpt"), "--out", str(root / "conv")]) == 0
    return str(root / "conv"), sd


def _q1(params):
    return np.asarray(params["model"]["transformer_blocks"][1]["attn"]["to_q"]["kernel"])


def _load(path, **kw):
    mdef = ModuleDef(lambda r: build_planner(planner_config("tiny"), r))
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    abstract = mdef.abstract_params()
    shardings = sh.to_shardings(mesh, sh.param_partition_specs(abstract, mdef.logical, mesh))
    return loop.load_init_params(path, abstract, shardings, **kw)


def test_converted_dir_loads_with_int_layer_keys(converted):
    path, sd = converted
    params = _load(path)
    assert 1 in params["model"]["transformer_blocks"]  # the model's own (int) structure, not Orbax's '1'
    np.testing.assert_array_equal(_q1(params), sd[KEY].numpy().T)
    # the inner params/ tree directly, too
    np.testing.assert_array_equal(_q1(_load(os.path.join(path, "params"))), sd[KEY].numpy().T)


def test_wrong_size_names_directory_and_keys(converted, tmp_path):
    path, _ = converted
    mdef = ModuleDef(lambda r: build_planner(planner_config("tiny4"), r))
    abstract = mdef.abstract_params()
    with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
        loop.load_init_params(path, abstract, _replicated(abstract))
    msg = str(e.value)
    assert path in msg and "does not match the model" in msg and "\n" not in msg and len(msg) < 1500
    with pytest.raises(ckpt_lib.CheckpointError, match="is not a parameter checkpoint"):
        _load(str(tmp_path))


def _replicated(abstract):
    s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: s, abstract)


def test_run_workdir_gives_ema_or_params_from_its_newest_readable_step(tmp_path, caplog):
    """Another run's workdir (as `init_from` / `eval.checkpoint`): its EMA or raw params; an unreadable newest step
    falls back to the one before with a warning and is left where it is (it is not this run's to move)."""
    import logging
    import toy_task
    config = toy_task.toy_config(**{"train.num_steps": 4, "train.checkpoint_every": 2, "train.async_checkpoint": False})
    task = toy_task.make_task(config)
    task.ema_decay = 0.5
    wd = str(tmp_path / "run")
    state, _ = loop.train(config, wd, task)
    abstract = jax.eval_shape(task.init_params, jax.random.key(0))
    for prefer_ema, want in ((True, state.ema_params), (False, state.params)):
        got = loop.load_init_params(wd, abstract, _replicated(abstract), prefer_ema=prefer_ema)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    os.remove(os.path.join(wd, "checkpoints", "4", "state", "_METADATA"))
    with caplog.at_level(logging.WARNING):
        older = loop.load_init_params(wd, abstract, _replicated(abstract), prefer_ema=False)
    assert any("using step 2 instead" in r.getMessage() for r in caplog.records), caplog.text
    assert not np.array_equal(np.asarray(older["fc1"]["kernel"]), np.asarray(state.params["fc1"]["kernel"]))
    assert os.path.isdir(os.path.join(wd, "checkpoints", "4"))
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(ckpt_lib.CheckpointError, match="the run has no checkpoint yet"):
        loop.load_init_params(str(empty), abstract, _replicated(abstract))
