"""A checkpoint written by the upstream code goes through every planner stage and back.

tests/fixtures/upstream_planner/planner.ckpt (upstream's `AgentLightningModule` saved by `pl.Trainer.save_checkpoint`,
see tests/fixtures/make_upstream_planner.py): `convert planner --from-torch` -> the upstream numbers -> the `eval`
stage with `eval.checkpoint=conv` (both evaluation protocols) -> `il` with `train.init_from=conv` -> `rl` with
`train.init_from=conv` -> `convert planner --to-torch` of the converted dir and of the il / rl workdirs, which give
back upstream's state dict (bit for bit where no training changed it).
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from recogdrive_jax import configs
from recogdrive_jax.configs import ConfigError
from recogdrive_jax.convert import planner as conv
from recogdrive_jax.eval import planner_eval
from recogdrive_jax.rl import grpo

from test_upstream_planner import FIXTURE, TOL, _norm
from upstream_buffers import assert_entry_equal

SCENES = dict(num_train_scenes=16, num_eval_scenes=8)


def _planner_cfg(c):
    c.planner.vl_dim = 1536  # the fixture's upstream tiny planner: this port's tiny4 with the 2B VLM width
    c.data.update(SCENES)
    c.eval.update(dict(batch_size=8, num_plots=0))
    return c


def _train(c, init_from, **train):
    c.train.update(dict(batch_size=8, num_steps=1, log_every=1, eval_every=0, checkpoint_every=1,
                        init_from=init_from, async_checkpoint=False, tensorboard=False, **train))
    return c


def _state_dict(path):
    return torch.load(str(path), map_location="cpu", weights_only=True)["state_dict"]


def test_upstream_checkpoint_through_every_stage(tmp_path, capsys):
    from recogdrive_jax.stages import eval as eval_stage
    from recogdrive_jax.stages import il as il_stage
    from recogdrive_jax.stages import rl as rl_stage

    with np.load(FIXTURE / "upstream_outputs.npz", allow_pickle=False) as z:
        o = {k: z[k] for k in z.files}
    upstream_sd = _state_dict(FIXTURE / "planner.ckpt")
    conv_dir = str(tmp_path / "conv")
    assert conv.main(["--from-torch", str(FIXTURE / "planner.ckpt"), "--out", conv_dir]) == 0

    # the converted directory computes upstream's numbers (noise prediction; the agent's stochastic get_action)
    planner = conv.restore_planner(conv_dir)
    cond = dict(vl_states=jnp.asarray(o["vl"]), status=jnp.asarray(o["status"]), history=jnp.asarray(o["history"]))
    eps, traj = nnx.jit(lambda m, c: (m.predict_noise(jnp.asarray(o["il_x_t"]), jnp.asarray(o["il_t"]), c),
                                      m.sample(c, jax.random.key(0), x_init=jnp.asarray(o["x_init"]),
                                               step_noise=jnp.asarray(o["eval_step_noise"]))))(planner, cond)
    np.testing.assert_allclose(np.asarray(eps), o["il_eps"], atol=TOL, rtol=0)
    np.testing.assert_allclose(_norm(traj), _norm(o["eval_traj"]), atol=TOL, rtol=0)

    # eval stage on the converted dir, scored under both protocols on the same seeded noise
    c = _planner_cfg(configs.planner_stage_config("eval", variant="tiny4"))
    del c["train"], c["optim"]
    c.eval.update(dict(checkpoint=conv_dir, protocol="upstream,deterministic"))
    out = eval_stage.run(c, str(tmp_path / "ev"))
    report = json.loads((tmp_path / "ev" / "eval" / "eval" / "metrics.json").read_text())
    assert out["num_scenes"] == 8 and report["protocol"] == "upstream"
    assert 0.0 <= report["pdms"] <= 1.0 and 0.0 <= report["deterministic/pdms"] <= 1.0
    table = (tmp_path / "ev" / "eval" / "eval" / "metrics.md").read_text()
    assert "planner (upstream)" in table and "planner (deterministic)" in table

    # il from the converted dir: one step at lr 0 keeps the weights, so the workdir exports upstream's state dict
    c = _train(_planner_cfg(configs.planner_stage_config("il", variant="tiny4")), conv_dir, ema_decay=0.5)
    c.optim.lr = 0.0
    c.eval.protocol = "upstream"
    assert np.isfinite(il_stage.run(c, str(tmp_path / "il"))["pdms"])

    # rl from the converted dir: one DiffGRPO step; its frozen reference is the upstream policy
    c = _planner_cfg(configs.planner_stage_config("rl", variant="tiny4"))
    # BC weight 0 keeps the update graph small (compile time); the reference is still loaded, saved and scored
    c.rl = ml_collections.ConfigDict(dataclasses.asdict(grpo.GRPOConfig(group_size=2, bc_weight=0.0)))
    c = _train(c, conv_dir, ema_decay=0.0)
    c.optim.update(dict(lr=1e-3, warmup_ratio=0.0, min_lr_ratio=0.0))
    c.eval.update(dict(use_ema=False, protocol="upstream"))
    assert 0.0 <= rl_stage.run(c, str(tmp_path / "rl"))["pdms"] <= 1.0

    # --to-torch: the converted dir, the il workdir (EMA and raw params) and the rl reference give upstream's state
    # dict bit for bit; the trained rl policy has the same layout, changed weights and upstream's buffers
    exports = {"conv": [conv_dir], "il": [str(tmp_path / "il")], "il_raw": [str(tmp_path / "il"), "--no-ema"],
               "rl_ref": [str(tmp_path / "rl" / rl_stage.REFERENCE_DIR)], "rl": [str(tmp_path / "rl")]}
    for name, args in exports.items():
        if name == "rl_ref":  # a bare parameter tree has no config: re-wrap it as a convert directory
            cfg, _ = conv.load_planner_checkpoint(conv_dir)
            from recogdrive_jax.train import checkpoint as ckpt_lib
            conv.save_planner_checkpoint(tmp_path / "rl_ref", ckpt_lib.load_params(args[0]), cfg)
            args = [str(tmp_path / "rl_ref")]
        assert conv.main(["--to-torch", args[0], "--out", str(tmp_path / f"{name}.ckpt"), *args[1:]]) == 0, name
        back = _state_dict(tmp_path / f"{name}.ckpt")
        assert set(back) == set(upstream_sd), name
        for k, v in upstream_sd.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape, (name, k)
            if name != "rl" or not v.is_floating_point() or "ddpm_" in k or "ddim_" in k or k.endswith(
                    ("inv_freq", "eta_logit")):
                assert_entry_equal(k, back[k], v, name)  # schedule buffers of torch's sqrt/log: within 2 ulps
    rl_sd = _state_dict(tmp_path / "rl.ckpt")
    changed = [k for k in upstream_sd if not torch.equal(rl_sd[k], upstream_sd[k])]
    assert any("transformer_blocks" in k for k in changed)
    capsys.readouterr()


def test_eval_protocol_is_validated(tmp_path):
    assert planner_eval.eval_protocols(ml_collections.ConfigDict(dict(protocol="upstream"))) == ("upstream",)
    assert planner_eval.eval_protocols(ml_collections.ConfigDict(dict(protocol="deterministic, upstream"))) == (
        "deterministic", "upstream")
    for bad in ("stochastic", "", "upstream,upstream"):
        with pytest.raises(ConfigError, match="config.eval.protocol"):
            planner_eval.eval_protocols(ml_collections.ConfigDict(dict(protocol=bad)))
    # the eval stage refuses before loading anything
    from recogdrive_jax.stages import eval as eval_stage
    c = configs.planner_stage_config("eval", variant="tiny4")
    del c["train"], c["optim"]
    c.eval.update(dict(checkpoint=str(tmp_path / "nowhere"), protocol="eta1"))
    with pytest.raises(ConfigError, match="config.eval.protocol='eta1'"):
        eval_stage.run(c, str(tmp_path / "ev"))
