"""PyTorch parity of the diffusion planner (fp32, max abs error <= 1e-5): converted weights give the same noise
prediction, the same 5-step DDIM chains from the same noise, and the same chain log-probs."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from torch_ref.planner import Block, TorchPlanner, lightning_state_dict, randomize_  # noqa: E402

from recogdrive_jax.convert.planner import _flatten, _torch_key, torch_state_dict_to_params  # noqa: E402
from recogdrive_jax.models.dit import DiTBlock  # noqa: E402
from recogdrive_jax.models.layers import rope_cos_sin  # noqa: E402
from recogdrive_jax.models.planner import build_planner, load_planner_params, planner_config  # noqa: E402

TOL = 1e-5
torch.set_num_threads(1)


def _pair(cfg, seed):
    tm = TorchPlanner(vl_dim=cfg.vl_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                      output_dim=cfg.output_dim, mlp_hidden=cfg.mlp_hidden)
    randomize_(tm, seed)
    jm = build_planner(cfg, nnx.Rngs(seed))
    load_planner_params(jm, torch_state_dict_to_params(lightning_state_dict(tm), cfg, verbose=False))
    return tm, jm


def _inputs(cfg, seed, b=3, length=7):
    g = np.random.default_rng(100 + seed)
    f = lambda *s: g.normal(size=s).astype(np.float32)
    return dict(vl=f(b, length, cfg.vl_dim), st=f(b, 8), his=f(b, 4, 3), x=f(b, 8, 3), x_init=f(b, 8, 3),
                z=f(5, b, 8, 3), t=g.integers(0, 100, size=b))


@nnx.jit
def _jax_all(m, cond, x, t, x_init, z, torch_chain):
    eps = m.predict_noise(x, t, cond)
    det = m.denoise_chain(cond, jax.random.key(0), mode="deterministic", x_init=x_init, step_noise=z)
    ev = m.denoise_chain(cond, jax.random.key(0), mode="eval", x_init=x_init, step_noise=z)
    rl = m.sample_with_chain(cond, jax.random.key(0), x_init=x_init, step_noise=z)
    return eps, det, ev, rl, m.chain_log_prob(torch_chain, cond)


def _check(cfg, seed):
    tm, jm = _pair(cfg, seed)
    d = _inputs(cfg, seed)
    T = lambda a: torch.from_numpy(np.asarray(a))
    cond = dict(vl_states=jnp.asarray(d["vl"]), status=jnp.asarray(d["st"]), history=jnp.asarray(d["his"]))
    with torch.no_grad():
        ctx = tm.encode(T(d["vl"]), T(d["his"]), T(d["st"]))
        eps_t = tm.predict_noise(T(d["x"]), T(d["t"]), ctx).numpy()
        det_t = tm.sample_chain(ctx, T(d["x_init"]), T(d["z"]), deterministic=True).numpy()
        ev_t = tm.sample_chain(ctx, T(d["x_init"]), T(d["z"]), min_std=1e-4, noise_clip=1.0).numpy()
        rl_t = tm.sample_chain(ctx, T(d["x_init"]), T(d["z"]), min_std=0.04, noise_clip=5.0).numpy()
        lp_t = tm.get_logprobs(ctx, T(rl_t), min_std=0.1).numpy()  # [B*K, 8, 3]
    eps, det, ev, rl, lp = _jax_all(jm, cond, d["x"], d["t"], d["x_init"], d["z"], jnp.asarray(rl_t))
    assert np.abs(eps_t).max() > 0.1  # not a trivially small signal
    np.testing.assert_allclose(np.asarray(eps), eps_t, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(det), det_t, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ev), ev_t, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(rl["chain"]), rl_t, atol=TOL, rtol=0)
    # log-probs of the torch chain recomputed under the converted params, and those returned with the JAX chain
    np.testing.assert_allclose(np.asarray(lp).reshape(-1, 8, 3), lp_t, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(rl["log_probs"]).reshape(-1, 8, 3), lp_t, atol=TOL, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_tiny(seed):
    _check(planner_config("tiny4"), seed)  # 4 blocks: self, cross, self, cross


def test_parity_tiny_2layer():
    _check(planner_config("tiny"), 7)


def test_parity_small():
    _check(planner_config("small", vlm_size="small"), 3)


def _copy_block(jblock, tblock):
    pure = nnx.to_pure_dict(nnx.state(jblock, nnx.Param))
    sd = tblock.state_dict()
    flat = {}
    for path in _flatten(pure):
        key, transpose = _torch_key(path)
        v = sd[key].numpy()
        flat[path] = v.T if transpose else v
    state = nnx.state(jblock, nnx.Param)
    from recogdrive_jax.convert.planner import _unflatten
    nnx.replace_by_pure_dict(state, _unflatten(flat))
    nnx.update(jblock, state)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("seed", [0, 1])
def test_block_parity_self_and_cross(cross, seed):
    d, nh, hd = 32, 4, 8
    torch.manual_seed(seed)
    tb = Block(d, nh, hd, cross=cross)
    with torch.no_grad():
        for p in tb.parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if p.ndim == 2 else 0.1))
    jb = DiTBlock(d, nh, hd, cross_attention=cross, rngs=nnx.Rngs(0))
    _copy_block(jb, tb)
    g = np.random.default_rng(seed)
    u, c, mem = (g.normal(size=s).astype(np.float32) for s in [(2, 8, d), (2, d), (2, 11, d)])
    cos, sin = rope_cos_sin(jnp.arange(8), hd)
    out = jb(jnp.asarray(u), jnp.asarray(c), jnp.asarray(mem), rope=(cos, sin))
    with torch.no_grad():
        tcos, tsin = torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin))
        ref = tb(torch.from_numpy(u), torch.from_numpy(c), torch.from_numpy(mem), tcos, tsin).numpy()
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)
    # the memory matters only for cross blocks
    out2 = jb(jnp.asarray(u), jnp.asarray(c), jnp.asarray(mem) * 2.0, rope=(cos, sin))
    assert (float(jnp.abs(out2 - out).max()) > 1e-3) == cross
