"""Parity against the upstream ReCogDrive planner itself (fp32, max abs error <= 1e-5).

The fixture in tests/fixtures/upstream_planner/ was made by the upstream code (liu-s-q19/recogdrive, commit in
UPSTREAM.json) with tests/fixtures/make_upstream_planner.py: a tiny `ReCogDriveDiffusionPlanner` inside upstream's
`AgentLightningModule`, saved by `pl.Trainer.save_checkpoint`, and the outputs of its IL forward, `get_action`
(deterministic and the agent's stochastic evaluation) and `sample_chain` / `get_logprobs`, with the noise upstream
drew. Nothing here uses tests/torch_ref. The key manifests in third_party/ come from the same script (upstream's
`make_recogdrive_config`); they are checked against the spec table, the converter and the fixture checkpoint.
"""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from recogdrive_jax.convert import planner as conv
from recogdrive_jax.diffusion import ddim as ddim_lib
from recogdrive_jax.models.planner import (build_planner, load_planner_params, normalize_pose, planner_config)
from upstream_buffers import assert_entry_equal

FIXTURE = Path(__file__).parent / "fixtures" / "upstream_planner"
THIRD_PARTY = Path(__file__).resolve().parents[1] / "third_party"
TOL = 1e-5
# What `pl.Trainer.save_checkpoint` writes after a fit with an optimizer, a scheduler and a ModelCheckpoint callback.
LIGHTNING_KEYS = {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops", "callbacks",
                  "optimizer_states", "lr_schedulers"}
POSE_MIN = np.array([-1.57, -19.68, -1.67])
POSE_RANGE = np.array([66.74, 42.0, 3.53])


def _norm(traj) -> np.ndarray:
    """Raw poses -> [-1, 1] in float64 (trajectories are compared where the sampler works)."""
    return 2.0 * (np.asarray(traj, np.float64) - POSE_MIN) / POSE_RANGE - 1.0


@pytest.fixture(scope="module")
def fx():
    meta = json.loads((FIXTURE / "UPSTREAM.json").read_text())
    with np.load(FIXTURE / "upstream_outputs.npz", allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    sd = conv.load_torch_file(FIXTURE / "planner.ckpt")  # torch.load(weights_only=True): no arbitrary unpickling
    cfg = conv.infer_config_from_state_dict(sd)
    params = conv.torch_state_dict_to_params(sd, cfg, verbose=False)
    planner = build_planner(cfg, nnx.Rngs(0))
    load_planner_params(planner, params)
    cond = dict(vl_states=jnp.asarray(out["vl"]), status=jnp.asarray(out["status"]),
                history=jnp.asarray(out["history"]))
    return dict(meta=meta, out=out, sd=sd, cfg=cfg, params=params, planner=planner, cond=cond)


def test_fixture_is_a_lightning_checkpoint(fx):
    meta = fx["meta"]
    assert len(meta["commit"]) == 40 and meta["repo"] == "liu-s-q19/recogdrive"
    raw = torch.load(FIXTURE / "planner.ckpt", map_location="cpu", weights_only=True)
    assert LIGHTNING_KEYS <= set(raw), sorted(raw)
    assert raw["global_step"] > 0 and raw["optimizer_states"] and raw["lr_schedulers"]
    assert all(k.startswith("agent.action_head.") for k in raw["state_dict"])
    # the generator asserts no navsim/nuplan stand-in ran during the passes; the record says so
    assert meta["stand_in_calls"]["forward/ddim/logprob/lightning fit"] == []
    # the converter infers upstream's tiny size: this port's tiny4 with the 2B VLM width
    assert fx["cfg"] == planner_config("tiny4", vl_dim=1536)


def test_noise_prediction_and_il_loss(fx):
    o, m, cfg = fx["out"], fx["planner"], fx["cfg"]
    eps = nnx.jit(lambda m, x, t, c: m.predict_noise(x, t, c))(m, jnp.asarray(o["il_x_t"]),
                                                                 jnp.asarray(o["il_t"], jnp.int32), fx["cond"])
    assert np.abs(o["il_eps"]).max() > 0.1
    np.testing.assert_allclose(np.asarray(eps), o["il_eps"], atol=TOL, rtol=0)
    # the noisy input upstream built from the expert future: pose normalisation + DDPM schedule
    x_t = ddim_lib.q_sample(m.ddpm_schedule, normalize_pose(jnp.asarray(o["future"])), jnp.asarray(o["il_t"]),
                            jnp.asarray(o["il_noise"]))
    np.testing.assert_allclose(np.asarray(x_t), o["il_x_t"], atol=TOL, rtol=0)
    np.testing.assert_allclose(float(np.mean((np.asarray(eps) - o["il_noise"]) ** 2)), float(o["il_loss"]),
                               atol=TOL, rtol=0)
    assert cfg.num_inference_steps == o["eval_step_noise"].shape[0]


def test_get_action_deterministic_and_stochastic(fx):
    o, m = fx["out"], fx["planner"]

    @nnx.jit
    def run(m, cond, x_init, z_det, z_eval):
        det = m.sample(cond, jax.random.key(0), deterministic=True, x_init=x_init, step_noise=z_det)
        ev = m.sample(cond, jax.random.key(0), deterministic=False, x_init=x_init, step_noise=z_eval)
        return det, ev

    det, ev = run(m, fx["cond"], jnp.asarray(o["x_init"]), jnp.asarray(o["det_step_noise"]),
                  jnp.asarray(o["eval_step_noise"]))
    np.testing.assert_allclose(_norm(det), _norm(o["det_traj"]), atol=TOL, rtol=0)
    np.testing.assert_allclose(_norm(ev), _norm(o["eval_traj"]), atol=TOL, rtol=0)
    # the stochastic evaluation really differs from the deterministic one (not a clipped, saturated output)
    assert np.abs(_norm(o["eval_traj"]) - _norm(o["det_traj"])).max() > 0.05
    assert np.mean(np.abs(_norm(o["eval_traj"])) > 0.9999) < 0.1


def test_sample_chain_and_log_probs(fx):
    o, m = fx["out"], fx["planner"]
    b, k = o["rl_chain"].shape[:2]

    @nnx.jit
    def run(m, cond, x_init, z, chain):
        return m.sample_with_chain(cond, jax.random.key(0), x_init=x_init, step_noise=z), m.chain_log_prob(chain, cond)

    rl, lp = run(m, fx["cond"], jnp.asarray(o["x_init"]), jnp.asarray(o["rl_step_noise"]), jnp.asarray(o["rl_chain"]))
    np.testing.assert_allclose(np.asarray(rl["chain"]), o["rl_chain"], atol=TOL, rtol=0)
    np.testing.assert_allclose(_norm(rl["trajectory"]), _norm(o["rl_traj"]), atol=TOL, rtol=0)
    # upstream's get_logprobs is [B*K, 8, 3] in (b, k) order
    np.testing.assert_allclose(np.asarray(lp).reshape(b * (k - 1), 8, 3), o["rl_log_probs"], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(rl["log_probs"]).reshape(b * (k - 1), 8, 3), o["rl_log_probs"],
                               atol=TOL, rtol=0)


def test_to_torch_export_equals_upstream_state_dict(fx):
    """Every entry upstream saved (params, eta, schedule buffers, RoPE frequencies) comes back bit for bit (the
    buffers of torch's sqrt/log within 2 ulps: tests/upstream_buffers.py), so the export loads strictly into upstream's
    planner."""
    sd = fx["sd"]
    back = conv.params_to_torch_state_dict(fx["params"], fx["cfg"])
    assert set(back) == set(sd)
    for key, v in sd.items():
        assert_entry_equal(key, back[key], v)


# ---------------------------------------------------------------------------------------------------------------
# Key manifests (third_party/), derived from upstream's module by the fixture script.

def _spec_manifest(d, hv, o, layers=16, hd=48, hidden=1024):
    """The key table of spec/planner.md §1, expanded (written from the spec, not from any module)."""
    rows = {"feature_encoder.weight": (d, hv), "feature_encoder.bias": (d,),
            "fusion_projector.weight": (d, 3 * d), "fusion_projector.bias": (d,),
            "position_embedding.weight": (8, d),
            "action_encoder.fc1.weight": (d, 3), "action_encoder.fc1.bias": (d,),
            "action_encoder.fc2.weight": (d, 2 * d), "action_encoder.fc2.bias": (d,),
            "action_encoder.fc3.weight": (d, d), "action_encoder.fc3.bias": (d,),
            "model.timestep_encoder.timestep_embedder.linear_1.weight": (d, 256),
            "model.timestep_encoder.timestep_embedder.linear_1.bias": (d,),
            "model.timestep_encoder.timestep_embedder.linear_2.weight": (d, d),
            "model.timestep_encoder.timestep_embedder.linear_2.bias": (d,),
            "model.rotary_embedder.inv_freq": (hd // 2,),
            "model.final_layer.norm_final.weight": (d,), "model.final_layer.linear.weight": (o, d),
            "model.final_layer.linear.bias": (o,), "model.final_layer.modulation_proj.1.weight": (2 * d, d),
            "model.final_layer.modulation_proj.1.bias": (2 * d,), "eta.eta_logit": (1,)}
    for name, i in (("his_traj_encoder", 12), ("ego_status_encoder", 8), ("action_decoder", o)):
        out = 3 if name == "action_decoder" else d
        rows.update({f"{name}.fc1.weight": (hidden, i), f"{name}.fc1.bias": (hidden,),
                     f"{name}.norm.weight": (hidden,), f"{name}.norm.bias": (hidden,),
                     f"{name}.fc2.weight": (out, hidden), f"{name}.fc2.bias": (out,)})
    for layer in range(layers):
        p = f"model.transformer_blocks.{layer}."
        rows.update({p + "norm1.weight": (d,), p + "norm2.weight": (d,), p + "attn.q_norm.weight": (hd,),
                     p + "attn.k_norm.weight": (hd,), p + "attn.to_out.0.weight": (d, d),
                     p + "attn.to_out.0.bias": (d,),
                     p + "ffn.w12.weight": (2 * d, d), p + "ffn.w12.bias": (2 * d,), p + "ffn.w3.weight": (d, d),
                     p + "ffn.w3.bias": (d,), p + "adaLN_modulation.1.weight": (6 * d, d),
                     p + "adaLN_modulation.1.bias": (6 * d,)})
        for x in "qkv":
            rows.update({p + f"attn.to_{x}.weight": (d, d), p + f"attn.to_{x}.bias": (d,)})
    for b in ["betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
              "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "var",
              "logvar_clipped", "mu_coef1", "mu_coef2"]:
        rows[f"ddpm_{b}"] = (100,)
    for b in ["t_schedule", "t", "alphas", "alphas_sqrt", "alphas_prev", "sqrt_one_minus_alphas", "sigmas"]:
        rows[f"ddim_{b}"] = (5,)
    return {("agent.action_head." + k, v) for k, v in rows.items()}


def _int64_keys(keys):
    return {k for k in keys if k.endswith(("ddim_t", "ddim_t_schedule"))}


@pytest.mark.parametrize("size,d,o", [("small", 384, 512), ("large", 1536, 1536)])
def test_key_manifests(size, d, o, fx):
    text = (THIRD_PARTY / f"recogdrive_planner_keys_{size}.txt").read_text()
    rows = [line.split("\t") for line in text.strip().split("\n")]
    assert len(rows) == 347
    file_set = {(k, tuple(int(x) for x in s.split(","))) for k, s, _ in rows}
    assert file_set == _spec_manifest(d, 3584, o)
    assert {k for k, _, dt in rows if dt == "int64"} == _int64_keys(k for k, _, _ in rows)
    assert {dt for _, _, dt in rows} == {"float32", "int64"}
    # the converter expects exactly this layout
    assert set(conv.expected_manifest(planner_config(size))) == file_set
    # and the upstream-written checkpoint has the same keys (4 of the 16 blocks) and dtypes
    sd = fx["sd"]
    keep = {k for k, _, _ in rows if ".transformer_blocks." not in k or int(k.split(".")[4]) < 4}
    assert set(sd) == keep
    assert {k for k, v in sd.items() if v.dtype == torch.int64} == _int64_keys(sd)
    assert {k: tuple(v.shape) for k, v in sd.items()} == dict(conv.expected_manifest(fx["cfg"]))
