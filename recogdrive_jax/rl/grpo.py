"""DiffGRPO (Stage 3, spec/planner.md §4): pure jitted updates of the diffusion planner from PDM rewards.

One call of the update returned by `make_update` is one upstream RL step, entirely inside one jit:

  1. G stochastic DDIM chains per scene (`sample_chain` noise: std floor 0.04, clip 5) from the current params;
  2. reward = PDM score of the G trajectories per scene (`sim/pdm.py`, vectorised over [B, G]) with upstream's RL
     weights (progress 10, TTC 5, comfort 2) — `pdms` — or the v2 `epdms`;
  3. advantages: group-normalised (`grpo`: (r - mean_G) / (std_G(N-1) + 1e-8)) or group-centred then batch-
     normalised (`reinforce_pp`), then an optional batch-quantile clamp (upstream's [0, 1] is a no-op);
  4. loss = -mean_{b,g,k}(l_k * A * gamma^(K-k-1)) with l_k = mean over 8x3 of clamp(log p, -5, 2) per
     coordinate, plus `bc_weight` * BC, BC = -mean clamp(log p) under the current policy of ONE chain per scene
     sampled by the frozen reference (`extra`);
  5. `grpo_clip`: PPO-style inner loop (lax.scan over epochs x random minibatches of the B*G pool): ratio on the
     per-sample mean log-prob, clip 0.2, advantage scaled by mean_k(w_k), optimizer step (with its global-norm
     clip) per minibatch, early stop once approx-KL = mean(old - new) > target_kl (checked on each minibatch
     before its update, from the second on; the step's remaining minibatches are then skipped).

Rewards that are not finite (a failed score, a diverged chain) are counted in `nan_reward_count`, get advantage 0,
are left out of the group statistics and the loss mean, and their chains are zeroed before the log-prob so not
even a NaN gradient can leak from them. Upstream instead scores failures 0 and trains on them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recogdrive_jax import config_types
from recogdrive_jax.models.dit import set_fold_cross
from recogdrive_jax.models.planner import DiffusionPlanner, denormalize_pose
from recogdrive_jax.sim import pdm
from recogdrive_jax.train.state import TrainState

ALGOS = ("grpo", "grpo_clip", "reinforce_pp")
REWARDS = ("pdms", "epdms")
ADV_EPS = 1e-8
# PDM outputs averaged into the metrics (ec is NaN by construction in the synthetic world: no earlier frame).
METRIC_PDM_KEYS = tuple(k for k in pdm.METRIC_KEYS if k != "ec")

# (scene batch, trajectories [B, G, T, 3] raw) -> {name: [B, G]}; must contain the configured reward key.
RewardFn = Callable[[Any, jax.Array], Mapping[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """`config.rl`. Defaults are upstream's (recogdrive_rl_algo.py, run_grpo.sh)."""
    algo: str = "grpo"  # 'grpo' (= upstream 'reinforce') | 'grpo_clip' | 'reinforce_pp'
    group_size: int = 8  # G chains per scene
    gamma: float = 0.6  # per-denoising-step discount gamma^(K-k-1); the last (t=0) step has weight 1
    logp_min: float = -5.0  # clamp of each coordinate's log-density before averaging
    logp_max: float = 2.0
    bc_weight: float = 0.1  # weight of the BC term (seed 001: low values reward-hack)
    reward: str = "pdms"  # 'pdms' (with the weights below) | 'epdms' (fixed v2 weights)
    ep_weight: float = 10.0
    ttc_weight: float = 5.0
    comfort_weight: float = 2.0
    adv_quantiles: tuple = (0.0, 1.0)  # batch-quantile clamp of A; (0, 1) = upstream = no-op
    # grpo_clip
    clip_eps: float = 0.2
    ppo_epochs: int = 2
    num_minibatches: int = 4  # per epoch; minibatch = B*G / num_minibatches (upstream: 64 / 16 per GPU)
    target_kl: float = 0.03  # early stop; 0 disables

    def __post_init__(self):
        q = tuple(float(v) for v in self.adv_quantiles)
        object.__setattr__(self, "adv_quantiles", q)
        checks = [
            (self.algo in ALGOS, "algo", f"unknown {self.algo!r}; allowed: {list(ALGOS)}"),
            (self.reward in REWARDS, "reward", f"unknown {self.reward!r}; allowed: {list(REWARDS)}"),
            (isinstance(self.group_size, int) and self.group_size >= 2, "group_size",
             f"must be an int >= 2 (group statistics), got {self.group_size!r}"),
            (0.0 < self.gamma <= 1.0, "gamma", f"must be in (0, 1], got {self.gamma!r}"),
            (self.logp_min < self.logp_max, "logp_min", f"must be < logp_max, got {self.logp_min}, {self.logp_max}"),
            (self.bc_weight >= 0.0, "bc_weight", f"must be >= 0, got {self.bc_weight!r}"),
            (min(self.ep_weight, self.ttc_weight, self.comfort_weight) >= 0
             and self.ep_weight + self.ttc_weight + self.comfort_weight > 0, "ep_weight",
             "ep/ttc/comfort weights must be >= 0 with a positive sum"),
            (len(q) == 2 and 0.0 <= q[0] <= q[1] <= 1.0, "adv_quantiles",
             f"must be (lo, hi) with 0 <= lo <= hi <= 1, got {self.adv_quantiles!r}"),
            (self.clip_eps > 0, "clip_eps", f"must be > 0, got {self.clip_eps!r}"),
            (isinstance(self.ppo_epochs, int) and self.ppo_epochs >= 1, "ppo_epochs",
             f"must be an int >= 1, got {self.ppo_epochs!r}"),
            (isinstance(self.num_minibatches, int) and self.num_minibatches >= 1, "num_minibatches",
             f"must be an int >= 1, got {self.num_minibatches!r}"),
            (self.target_kl >= 0, "target_kl", f"must be >= 0 (0 disables), got {self.target_kl!r}"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"config.rl.{key}: {msg}")

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per train step (at most; early stopping may do fewer)."""
        return self.ppo_epochs * self.num_minibatches if self.algo == "grpo_clip" else 1

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "GRPOConfig":
        """`config.rl` through the one block conversion (config_types.from_mapping: unknown keys and wrong types
        are errors naming the key)."""
        return config_types.from_mapping(cls, d, "rl")


# ---------------------------------------------------------------------------------------------------------------
# Advantage and log-prob pieces (pure, tested one by one).

def discount_weights(num_steps: int, gamma: float) -> np.ndarray:
    """w_k = gamma^(K-k-1), k = 0 the noisiest step: K=5, gamma=0.6 -> [0.1296, 0.216, 0.36, 0.6, 1]."""
    return np.asarray([gamma ** (num_steps - k - 1) for k in range(num_steps)], np.float32)


def _masked_std(x: jax.Array, mask: jax.Array, axis, keepdims: bool = False):
    """(mean, unbiased std) of x over `axis` restricted to mask; std 0 when fewer than two entries."""
    m = mask.astype(jnp.float32)
    n = jnp.sum(m, axis=axis, keepdims=True)
    mean = jnp.sum(jnp.where(mask, x, 0.0), axis=axis, keepdims=True) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.where(mask, (x - mean) ** 2, 0.0), axis=axis, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
    if not keepdims:
        mean, var = jnp.squeeze(mean, axis), jnp.squeeze(var, axis)
    return mean, jnp.sqrt(var)


def group_advantages(rewards: jax.Array, valid: jax.Array | None = None, algo: str = "grpo",
                     quantiles: tuple = (0.0, 1.0), eps: float = ADV_EPS) -> jax.Array:
    """rewards [B, G] -> advantages [B, G] (0 where not valid).

    'grpo' / 'grpo_clip': (r - mean_G) / (std_G + eps), std_G unbiased (N-1) over the valid members.
    'reinforce_pp': r - mean_G, then (A - mean) / (std + eps) over every valid sample of the batch (unbiased).
    Then the clamp to the batch quantiles `quantiles` of A (skipped for the no-op (0, 1)).
    """
    rewards = rewards.astype(jnp.float32)
    valid = jnp.isfinite(rewards) if valid is None else (valid & jnp.isfinite(rewards))
    # Shift each group by its max first (exact: the statistics are shift-invariant) so a constant group gives
    # exactly 0, not rounding noise divided by 1e-8.
    shift = jnp.max(jnp.where(valid, rewards, -jnp.inf), axis=1, keepdims=True)
    r = jnp.where(valid, rewards - jnp.where(jnp.isfinite(shift), shift, 0.0), 0.0)
    mean_g, std_g = _masked_std(r, valid, axis=1, keepdims=True)
    centred = jnp.where(valid, r - mean_g, 0.0)
    if algo == "reinforce_pp":
        mean_b, std_b = _masked_std(centred, valid, axis=(0, 1), keepdims=True)
        adv = (centred - mean_b) / (std_b + eps)
    elif algo in ("grpo", "grpo_clip"):
        adv = centred / (std_g + eps)
    else:
        raise ValueError(f"group_advantages: unknown algo {algo!r}; allowed: {list(ALGOS)}")
    lo, hi = quantiles
    if lo > 0.0 or hi < 1.0:
        masked = jnp.where(valid, adv, jnp.nan)
        adv = jnp.clip(adv, jnp.nanquantile(masked, lo), jnp.nanquantile(masked, hi))
    return jnp.where(valid, adv, 0.0)


def clamped_step_log_prob(log_probs: jax.Array, lo: float = -5.0, hi: float = 2.0) -> jax.Array:
    """Per-coordinate log-probs [..., K, H, A] -> [..., K]: clamp EACH coordinate to [lo, hi], then average."""
    return jnp.mean(jnp.clip(log_probs, lo, hi), axis=(-2, -1))


# ---------------------------------------------------------------------------------------------------------------
# Sampling and log-probs go through the planner's public API on an encoded context (`encode` once per scene):
# `sample_with_chain(None, rng, ctx=)` and `chain_log_prob(chain, None, ctx=)`, `vmap`ped over the G chains of a
# scene with the scene's context unbatched (`group_sample`, `group_log_prob`).

def shared_memory_planner(bind: Callable, params) -> DiffusionPlanner:
    """`bind(params)` with every DiT cross block on the module path (`DiTBlock.fold_cross` off).

    The folded cross-attention (models/dit.cross_attention_folded) pays off when each query row has its own long
    memory (IL training: T = 8 queries on S memory rows per sample). Here one scene's memory serves the G chains and
    the K denoising steps (`vmap` with the context unbatched), so the module path projects each scene's B*S memory
    rows to keys and values once, while the fold would average the memory for every (chain, step, head, query) row
    first: [G*K*B*H*T, D] = 10,240 x 384 at 4 scenes x G 8, vl_len 32, against 128 memory rows. Same math, fp32
    rounding (bench/RESULTS.md, GRPO step profile: 1.18x on the step)."""
    return set_fold_cross(bind(params), False)


def _ungroup(x: jax.Array) -> jax.Array:
    """[G, B, ...] -> [B*G, ...] scene-major (b0 g0, b0 g1, ..., b1 g0, ...)."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _group(x: jax.Array, b: int, axis: int = 0) -> jax.Array:
    """[..., B*G (at `axis`), ...] scene-major -> [G, ..., B, ...]: the group member first."""
    x = x.reshape(*x.shape[:axis], b, -1, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis + 1, 0)


def group_sample(planner: DiffusionPlanner, ctx: Mapping[str, jax.Array], rng: jax.Array, g: int) -> dict:
    """G rollouts per scene: `sample_with_chain` on `repeat_context(ctx, g)` (the same noise draws from `rng`,
    outputs [B*G, ...] scene-major), computed as a `vmap` over the G members with each scene's context unbatched.

    Same math as the repeated context; what depends only on the scene and the step (the memory's key projection and
    key norms in every cross block, the adaLN modulation of c = temb(t) + ego) is computed once per scene instead of
    once per chain (bench/RESULTS.md, GRPO step profile)."""
    b = ctx["memory"].shape[0]
    x_init, step_noise = planner.draw_noise(rng, b * g)  # [B*G, H, A], [K, B*G, H, A]
    out = jax.vmap(lambda x, z: planner.sample_with_chain(None, rng, x_init=x, step_noise=z, ctx=ctx))(
        _group(x_init, b), _group(step_noise, b, axis=1))
    return jax.tree.map(_ungroup, out)


def group_log_prob(planner: DiffusionPlanner, chain: jax.Array, ctx: Mapping[str, jax.Array]) -> jax.Array:
    """`chain_log_prob(chain, None, ctx=repeat_context(ctx, G))` for chains [B*G, K+1, H, A] scene-major ->
    [B*G, K, H, A], as a `vmap` over the G members with the scene's context unbatched (see `group_sample`)."""
    b = ctx["memory"].shape[0]
    lp = jax.vmap(lambda c: planner.chain_log_prob(c, None, ctx=ctx))(_group(chain, b))
    return _ungroup(lp)


def take_ctx(ctx: Mapping[str, jax.Array], idx: jax.Array) -> dict:
    """Rows `idx` of an encoded context (a minibatch's scenes)."""
    return {k: v[idx] for k, v in ctx.items()}


def pdm_reward_fn(cfg: GRPOConfig, lqr_regulariser: str = "navsim") -> RewardFn:
    """The PDM scorer with the configured (upstream RL) weights and `config.eval.pdm_regulariser` (float32: the
    reward runs inside the jitted update, so `config.eval.pdm_float64` applies to evaluation only)."""
    def fn(scene, trajectories):
        return pdm.pdm_score(scene, trajectories, ep_weight=cfg.ep_weight, ttc_weight=cfg.ttc_weight,
                             comfort_weight=cfg.comfort_weight, lqr_regulariser=lqr_regulariser)
    return fn


# ---------------------------------------------------------------------------------------------------------------
# Losses.

def _safe_mean(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def bc_loss(planner: DiffusionPlanner, ctx: Mapping[str, jax.Array], ref_chain: jax.Array, cfg: GRPOConfig,
            scene_mask: jax.Array | None = None) -> jax.Array:
    """-mean over scenes (in `scene_mask`), K, 8, 3 of clamp(log p_current(reference chain))."""
    lp = planner.chain_log_prob(ref_chain, None, ctx=ctx)
    ell = jnp.mean(clamped_step_log_prob(lp, cfg.logp_min, cfg.logp_max), -1)
    if scene_mask is None:
        return -jnp.mean(ell)
    return -_safe_mean(ell, scene_mask)


def reinforce_loss(params, bind: Callable, cond, chain: jax.Array, adv: jax.Array, valid: jax.Array,
                   ref_chain: jax.Array, cfg: GRPOConfig, weights: jax.Array) -> tuple[jax.Array, dict]:
    """`grpo` / `reinforce_pp` loss. chain [B*G, K+1, H, A] (scene-major), adv / valid [B*G], ref_chain [B, ...].

    L = -sum_{valid, k} l_k A w_k / (n_valid K) + bc_weight * BC; BC on stop_gradient(params) when its weight is 0
    (logged, never trained)."""
    planner = shared_memory_planner(bind, params)
    ctx = planner.encode(cond)
    lp = group_log_prob(planner, chain, ctx)
    ell = clamped_step_log_prob(lp, cfg.logp_min, cfg.logp_max)
    k = ell.shape[-1]
    contrib = jnp.where(valid[:, None], ell * adv[:, None] * weights[None], 0.0)  # [N, K]
    pg = -jnp.sum(contrib) / (jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0) * k)
    if cfg.bc_weight > 0:
        bc = bc_loss(planner, ctx, ref_chain, cfg)
    else:
        frozen = shared_memory_planner(bind, jax.lax.stop_gradient(params))
        bc = bc_loss(frozen, frozen.encode(cond), ref_chain, cfg)
    loss = pg + cfg.bc_weight * bc
    return loss, {"policy_loss": pg, "bc_loss": bc, "logp_mean": _safe_mean(jnp.mean(ell, -1), valid)}


def clip_loss(params, bind: Callable, cond, chain_mb: jax.Array, scene_mb: jax.Array, old_mb: jax.Array,
              adv_mb: jax.Array, valid_mb: jax.Array, ref_chain: jax.Array, cfg: GRPOConfig,
              mean_weight: float) -> tuple[jax.Array, dict]:
    """`grpo_clip` minibatch loss. chain_mb [M, K+1, H, A] with scene index scene_mb [M], old per-sample mean
    log-prob old_mb [M], advantages adv_mb [M] (scaled here by mean_k w_k); BC on the minibatch's scenes."""
    planner = shared_memory_planner(bind, params)
    ctx = planner.encode(cond)
    b = ctx["memory"].shape[0]
    lp = planner.chain_log_prob(chain_mb, None, ctx=take_ctx(ctx, scene_mb))
    ell = clamped_step_log_prob(lp, cfg.logp_min, cfg.logp_max).mean(-1)  # [M]
    log_ratio = ell - old_mb
    ratio = jnp.exp(log_ratio)
    a = adv_mb * mean_weight
    surr = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * a)
    pg = -_safe_mean(surr, valid_mb)
    present = jnp.any(scene_mb[None, :] == jnp.arange(b)[:, None], axis=1)  # [B] scenes in this minibatch
    if cfg.bc_weight > 0:
        bc = bc_loss(planner, ctx, ref_chain, cfg, present)
    else:
        frozen = shared_memory_planner(bind, jax.lax.stop_gradient(params))
        bc = bc_loss(frozen, frozen.encode(cond), ref_chain, cfg, present)
    loss = pg + cfg.bc_weight * bc
    aux = {"policy_loss": pg, "bc_loss": bc, "logp_mean": _safe_mean(ell, valid_mb),
           "approx_kl": _safe_mean(-log_ratio, valid_mb),
           "clip_frac": _safe_mean((jnp.abs(ratio - 1.0) > cfg.clip_eps).astype(jnp.float32), valid_mb),
           "ratio_mean": _safe_mean(ratio, valid_mb),
           "ratio_max_dev": jnp.max(jnp.where(valid_mb, jnp.abs(ratio - 1.0), 0.0))}
    return loss, aux


# ---------------------------------------------------------------------------------------------------------------
# Rollout and the update.

def rollout(params, ref_params, bind: Callable, cond, scene, rng: jax.Array, cfg: GRPOConfig,
            reward_fn: RewardFn) -> dict:
    """Samples G chains per scene (current params, no gradient), scores them, and one reference chain per scene.

    Returns chain [B*G, K+1, H, A] (invalid rows zeroed), old per-step clamped log-probs old_ell [B*G, K],
    trajectory [B, G, H, 3], scores {key: [B, G]}, reward / valid / adv [B, G], ref_chain [B, K+1, H, A]."""
    k_roll, k_ref = jax.random.split(rng)
    g = cfg.group_size
    planner = shared_memory_planner(bind, jax.lax.stop_gradient(params))
    ctx = planner.encode(cond)
    b = ctx["memory"].shape[0]
    out = group_sample(planner, ctx, k_roll, g)
    chain, lps = jax.lax.stop_gradient(out["chain"]), jax.lax.stop_gradient(out["log_probs"])
    traj = denormalize_pose(chain[:, -1]).reshape(b, g, *chain.shape[2:])  # [B, G, H, 3]
    scores = dict(reward_fn(scene, traj))
    if cfg.reward not in scores:
        raise KeyError(f"reward function returned {sorted(scores)}; config.rl.reward={cfg.reward!r} is missing")
    reward = scores[cfg.reward].astype(jnp.float32)  # [B, G]
    finite_chain = jnp.all(jnp.isfinite(chain), axis=(1, 2, 3)).reshape(b, g)
    valid = jnp.isfinite(reward) & finite_chain
    adv = group_advantages(reward, valid, cfg.algo, cfg.adv_quantiles)
    vflat = valid.reshape(-1)
    chain = jnp.where(vflat[:, None, None, None], chain, 0.0)
    old_ell = jnp.where(vflat[:, None], clamped_step_log_prob(lps, cfg.logp_min, cfg.logp_max), 0.0)
    ref = shared_memory_planner(bind, jax.lax.stop_gradient(ref_params))
    ref_chain = jax.lax.stop_gradient(ref.sample_with_chain(None, k_ref, ctx=ref.encode(cond))["chain"])
    return dict(chain=chain, old_ell=old_ell, trajectory=traj, scores=scores, reward=reward, valid=valid, adv=adv,
                ref_chain=ref_chain)


def rollout_metrics(ro: dict, scene) -> dict:
    """Reward / PDM sub-metric means over valid rollouts, advantage stats, NaN count and hacking diagnostics."""
    valid = ro["valid"]
    mean, std = _masked_std(ro["reward"], valid, axis=(0, 1))
    out = {"reward_mean": mean, "reward_std": std,
           "nan_reward_count": jnp.sum((~valid).astype(jnp.float32)),
           "valid_frac": jnp.mean(valid.astype(jnp.float32))}
    for k in METRIC_PDM_KEYS:
        if k in ro["scores"]:
            out[f"pdm/{k}"] = _safe_mean(ro["scores"][k].astype(jnp.float32), valid)
    adv = ro["adv"]
    a_mean, a_std = _masked_std(adv, valid, axis=(0, 1))
    out.update({"adv_mean": a_mean, "adv_std": a_std, "adv_min": jnp.min(jnp.where(valid, adv, jnp.inf)),
                "adv_max": jnp.max(jnp.where(valid, adv, -jnp.inf))})
    traj = jnp.where(valid[..., None, None], ro["trajectory"], 0.0)  # [B, G, H, 3]
    expert = jnp.asarray(scene.expert, jnp.float32)[:, None]
    err = jnp.linalg.norm(traj[..., :2] - expert[..., :2], axis=-1)  # [B, G, H]
    out["rollout/ade"] = _safe_mean(jnp.mean(err, -1), valid)
    out["rollout/fde"] = _safe_mean(err[..., -1], valid)
    out["rollout/end_reverse_frac"] = _safe_mean(end_reverse(traj).astype(jnp.float32), valid)
    return out


def end_reverse(traj: jax.Array, tol: float = 0.05) -> jax.Array:
    """[..., H, 3] -> [...] bool: the last pose lies behind the one before it along that pose's heading (the
    'reverse at the final waypoint' hack seed 001 reports)."""
    d = traj[..., -1, :2] - traj[..., -2, :2]
    h = traj[..., -2, 2]
    return d[..., 0] * jnp.cos(h) + d[..., 1] * jnp.sin(h) < -tol


def _tree_where(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _apply(state: TrainState, grads, tx) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def make_update(bind: Callable, cfg: GRPOConfig, tx: optax.GradientTransformation, *, num_denoise_steps: int,
                reward_fn: RewardFn | None = None, schedule: optax.Schedule | None = None,
                ema_decay: float = 0.0) -> Callable:
    """The pure update `(state, batch, ref_params) -> (state, metrics)` for `loop.Task.make_update`.

    bind(params) -> DiffusionPlanner (e.g. `ModuleDef.bind`); batch = {'cond': planner cond [B, ...], 'scene':
    batched `world.Scene` [B, ...], ...}; `extra` = the frozen reference params. `tx` steps once per optimizer
    update (grpo_clip: up to ppo_epochs * num_minibatches per call, so its schedule should span that many);
    `schedule` (optional) reports the lr of the first update as `lr`."""
    reward_fn = reward_fn or pdm_reward_fn(cfg)
    weights = jnp.asarray(discount_weights(num_denoise_steps, cfg.gamma))
    mean_weight = float(np.mean(discount_weights(num_denoise_steps, cfg.gamma)))

    def finish(state: TrainState, old_step, metrics: dict, opt_count0) -> tuple[TrainState, dict]:
        ema = state.ema_params
        if ema is not None:
            ema = optax.incremental_update(state.params, ema, step_size=1.0 - ema_decay)
        state = state.replace(step=old_step + 1, ema_params=ema)
        metrics["param_norm"] = optax.global_norm(state.params)
        if schedule is not None:
            metrics["lr"] = schedule(opt_count0)
        return state, metrics

    def update_reinforce(state: TrainState, batch, rng, ref_params):
        ro = rollout(state.params, ref_params, bind, batch["cond"], batch["scene"], rng, cfg, reward_fn)
        metrics = rollout_metrics(ro, batch["scene"])
        grad_fn = jax.value_and_grad(reinforce_loss, has_aux=True)
        (loss, aux), grads = grad_fn(state.params, bind, batch["cond"], ro["chain"], ro["adv"].reshape(-1),
                                     ro["valid"].reshape(-1), ro["ref_chain"], cfg, weights)
        new = _apply(state, grads, tx)
        metrics.update(aux, loss=loss, grad_norm=optax.global_norm(grads), clip_frac=jnp.zeros(()),
                       num_updates=jnp.ones(()))
        return finish(new, state.step, metrics, state.step)

    def update_clip(state: TrainState, batch, rng, ref_params):
        k_ro, k_mb = jax.random.split(rng)
        ro = rollout(state.params, ref_params, bind, batch["cond"], batch["scene"], k_ro, cfg, reward_fn)
        metrics = rollout_metrics(ro, batch["scene"])
        b, g = ro["reward"].shape
        n = b * g
        if n % cfg.num_minibatches:
            raise ValueError(f"config.rl.num_minibatches={cfg.num_minibatches} must divide the {n} rollouts "
                             f"(batch {b} x group_size {g})")
        m = n // cfg.num_minibatches
        perms = jnp.stack([jax.random.permutation(jax.random.fold_in(k_mb, e), n) for e in range(cfg.ppo_epochs)])
        mb_idx = perms.reshape(cfg.ppo_epochs * cfg.num_minibatches, m)
        old = jnp.mean(ro["old_ell"], -1)  # [N] per-sample mean over K (actor at rollout time)
        adv, valid = ro["adv"].reshape(-1), ro["valid"].reshape(-1)
        grad_fn = jax.value_and_grad(clip_loss, has_aux=True)
        aux_keys = ("policy_loss", "bc_loss", "logp_mean", "approx_kl", "clip_frac", "ratio_mean", "ratio_max_dev")

        def run(st, i, idx):
            (loss, aux), grads = grad_fn(st.params, bind, batch["cond"], ro["chain"][idx], idx // g, old[idx],
                                         adv[idx], valid[idx], ro["ref_chain"], cfg, mean_weight)
            # The first minibatch sits at the rollout params (KL 0 up to rounding): always applied.
            stop = ((i > 0) & (aux["approx_kl"] > cfg.target_kl)) if cfg.target_kl > 0 else jnp.zeros((), bool)
            new = _tree_where(stop, st, _apply(st, grads, tx))
            out = {k: aux[k] for k in aux_keys}
            out.update(loss=loss, grad_norm=optax.global_norm(grads), evaluated=jnp.ones(()),
                       applied=1.0 - stop.astype(jnp.float32))
            return new, stop, out

        def skip(st, i, idx):
            zeros = {k: jnp.zeros(()) for k in aux_keys + ("loss", "grad_norm", "evaluated", "applied")}
            return st, jnp.ones((), bool), zeros

        def body(carry, xs):
            st, stopped = carry
            st, stop, out = jax.lax.cond(stopped, skip, run, st, *xs)
            return (st, stopped | stop), out

        (new, stopped), outs = jax.lax.scan(body, (state, jnp.zeros((), bool)),
                                              (jnp.arange(mb_idx.shape[0]), mb_idx))
        ev = outs["evaluated"]
        n_ev = jnp.maximum(jnp.sum(ev), 1.0)
        for k in aux_keys + ("loss", "grad_norm"):
            metrics[k] = jnp.sum(outs[k] * ev) / n_ev
        metrics["ratio_max_dev"] = jnp.max(outs["ratio_max_dev"])
        metrics.update(ratio_first=outs["ratio_mean"][0], ratio_max_dev_first=outs["ratio_max_dev"][0],
                       clip_frac_first=outs["clip_frac"][0], num_updates=jnp.sum(outs["applied"]),
                       early_stop=stopped.astype(jnp.float32))
        count0 = state.step * cfg.updates_per_step
        return finish(new, state.step, metrics, count0)

    return update_clip if cfg.algo == "grpo_clip" else update_reinforce
