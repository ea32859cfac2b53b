"""tests/torch_ref's planner equals the upstream ReCogDrive planner (fp32, max abs error <= 1e-5).

Loads upstream's own Lightning checkpoint (tests/fixtures/upstream_planner, made by the upstream code) strictly into
`torch_ref.planner.TorchPlanner` and compares its IL forward, DDIM sampling (deterministic, the agent's stochastic
evaluation, the RL chain) and chain log-probs with what upstream computed from the same noise. This is what makes
torch_ref a legitimate baseline for bench/planner.py where the upstream source is not at hand (issue 17).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_ref.planner import PREFIX, TorchPlanner, denormalize, normalize

FIXTURE = Path(__file__).parent / "fixtures" / "upstream_planner"
TOL = 1e-5


@pytest.fixture(scope="module")
def up():
    meta = json.loads((FIXTURE / "UPSTREAM.json").read_text())
    with np.load(FIXTURE / "upstream_outputs.npz", allow_pickle=False) as z:
        out = {k: torch.from_numpy(z[k]) for k in z.files}
    raw = torch.load(FIXTURE / "planner.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    pc = meta["planner_config"]
    tm = TorchPlanner(vl_dim=pc["vl_dim"], num_heads=pc["num_heads"], head_dim=pc["head_dim"],
                      num_layers=pc["num_layers"], output_dim=pc["output_dim"], mlp_hidden=pc["mlp_hidden"])
    tm.load_state_dict({k[len(PREFIX):]: v for k, v in raw.items()}, strict=True)  # every key, both ways
    tm.eval()
    with torch.no_grad():
        ctx = tm.encode(out["vl"], out["history"], out["status"])
    return tm, ctx, out


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=TOL, rtol=0)


def test_il_forward_equals_upstream(up):
    tm, ctx, o = up
    with torch.no_grad():
        eps = tm.predict_noise(o["il_x_t"], o["il_t"], ctx)
        loss = tm.loss(normalize(o["future"]), o["il_t"], o["il_noise"], ctx)
    _close(eps, o["il_eps"])
    _close(loss, o["il_loss"])


def test_sampling_and_log_probs_equal_upstream(up):
    tm, ctx, o = up
    det = tm.sample_chain(ctx, o["x_init"], o["det_step_noise"], deterministic=True)[:, -1]
    ev = tm.sample_chain(ctx, o["x_init"], o["eval_step_noise"], min_std=1e-4, noise_clip=1.0)[:, -1]
    _close(normalize(denormalize(det)), normalize(o["det_traj"]))
    _close(normalize(denormalize(ev)), normalize(o["eval_traj"]))
    chain = tm.sample_chain(ctx, o["x_init"], o["rl_step_noise"], min_std=0.04, noise_clip=5.0)
    _close(chain, o["rl_chain"])
    with torch.no_grad():
        _close(tm.get_logprobs(ctx, o["rl_chain"]), o["rl_log_probs"])
