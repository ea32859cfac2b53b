"""Every stage that takes a planner checkpoint accepts a `convert planner --from-torch` output directory.

The checkpoint comes from the converter's CLI on a Lightning-layout `.ckpt` built from `tests/torch_ref`; each
consumer (eval stage, il `init_from`, rl `init_from` + its frozen reference) runs one step on it, and the loaded
params equal the PyTorch weights.
"""
import dataclasses
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_ref.planner import TorchPlanner, lightning_state_dict, randomize_  # noqa: E402

from recogdrive_jax import configs  # noqa: E402
from recogdrive_jax.convert import planner as conv  # noqa: E402
from recogdrive_jax.models.planner import build_planner, planner_config  # noqa: E402
from recogdrive_jax.parallel import mesh as mesh_lib  # noqa: E402
from recogdrive_jax.parallel import sharding as sh  # noqa: E402
from recogdrive_jax.rl import grpo  # noqa: E402
from recogdrive_jax.train import checkpoint as ckpt_lib  # noqa: E402
from recogdrive_jax.train import loop  # noqa: E402
from recogdrive_jax.train.metrics import read_metrics  # noqa: E402
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


def test_eval_stage_scores_converted_checkpoint(converted, tmp_path):
    from recogdrive_jax.stages import eval as eval_stage
    path, _ = converted
    c = configs.planner_stage_config("eval", variant="tiny")
    del c["train"], c["optim"]
    c.data.num_eval_scenes = 8
    c.eval.update(dict(checkpoint=path, batch_size=8, num_plots=0, use_ema=True))
    out = eval_stage.run(c, str(tmp_path / "ev"))
    assert out["num_scenes"] == 8 and 0.0 <= out["pdms"] <= 1.0


def test_il_init_from_converted_checkpoint(converted, tmp_path):
    from test_il_stage import tiny_il

    from recogdrive_jax.stages import il as il_stage
    path, sd = converted
    c = tiny_il(num_steps=1)
    c.train.init_from = path
    c.optim.lr = 0.0  # the one step leaves the params where init_from put them
    c.eval.num_plots = 0
    out = il_stage.run(c, str(tmp_path / "il"))
    assert np.isfinite(out["pdms"])
    state = ckpt_lib.load_params(str(tmp_path / "il"), _with_abstract(), prefer_ema=False)
    np.testing.assert_array_equal(_q1(state), sd[KEY].numpy().T)


def _with_abstract():
    mdef = ModuleDef(lambda r: build_planner(planner_config("tiny"), r))
    abstract = mdef.abstract_params()
    return ckpt_lib.attach_shardings(abstract, _replicated(abstract))


def test_rl_init_from_converted_checkpoint(converted, tmp_path):
    from recogdrive_jax.stages import rl as rl_stage
    path, sd = converted
    c = configs.planner_stage_config("rl", variant="tiny")
    c.rl = ml_collections.ConfigDict(dataclasses.asdict(grpo.GRPOConfig(group_size=2)))
    c.data.num_train_scenes = 8
    c.data.num_eval_scenes = 8
    c.train.update(dict(batch_size=8, num_steps=1, log_every=1, eval_every=0, checkpoint_every=1, ema_decay=0.0,
                        init_from=path, async_checkpoint=False, tensorboard=False))
    c.optim.update(dict(lr=1e-4, warmup_ratio=0.0, min_lr_ratio=0.0))
    c.eval.update(dict(batch_size=8, num_plots=0, use_ema=False))
    work = tmp_path / "rl"
    out = rl_stage.run(c, str(work))
    assert 0.0 <= out["pdms"] <= 1.0
    assert [r["step"] for r in read_metrics(str(work), "train")] == [1]
    ref = ckpt_lib.load_params(str(work / rl_stage.REFERENCE_DIR), _with_abstract())
    np.testing.assert_array_equal(_q1(ref), sd[KEY].numpy().T)
