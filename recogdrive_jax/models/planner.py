"""Trajectory planners on cached VLM hidden states: the ReCogDrive diffusion planner (spec/planner.md) and the MLP
regression head (DESIGN §8.4). Both expose the same interface so stages pick one with `config.planner.kind`:

    planner = build_planner(cfg, nnx.Rngs(0))
    loss, metrics = planner.loss(batch, rng)          # batch = {'cond': cond, 'future': [B, 8, 3] (, 'future_mask')}
    traj = planner.sample(cond, rng, deterministic=False)   # [B, 8, 3] raw units (x, y, heading)
    # diffusion only (DiffGRPO); the one sampling API of the rl stage, evaluation and tests:
    out = planner.sample_with_chain(cond, rng)        # {'chain' [B, K+1, 8, 3], 'log_probs' [B, K, 8, 3], 'trajectory'}
    lp = planner.chain_log_prob(out['chain'], cond)   # [B, K, 8, 3] under the current params
    ctx = planner.encode(cond)                        # encode once per scene for its G rollouts, then
    out = planner.sample_with_chain(None, rng, ctx=repeat_context(ctx, G))   # the plain form, or (faster, same
    out = rl.grpo.group_sample(planner, ctx, rng, G)  # math) the G chains vmapped over the unbatched scene context
    lp = rl.grpo.group_log_prob(planner, out['chain'], ctx)   # = chain_log_prob(chain, None, ctx=repeat_context(..))

cond = {'vl_states': [B, L, Hv], 'status': [B, 8], 'history': [B, 4, 3], optional 'vl_mask': [B, L] bool}.
Upstream uses no VL mask (the padded sequence, pads included, is pooled and cross-attended); `use_vl_mask=True`
applies the mask in the mean pooling and the cross-attention - better for compact caches, but NOT
checkpoint-compatible with upstream weights.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recogdrive_jax.diffusion import ddim as ddim_lib
from recogdrive_jax.diffusion import flow as flow_lib
from recogdrive_jax.diffusion.schedule import make_ddim_schedule, make_ddpm_schedule
from recogdrive_jax.models.dit import LightningDiT
from recogdrive_jax.models.layers import REMAT_POLICIES, Dtype, Mlp, dense, sinusoidal_embedding, to_dtype
from recogdrive_jax.parallel.activations import constrain
from recogdrive_jax.parallel.kernels import ATTENTION_IMPLS

# VLM width by `vlm_size` (independent of the DiT size): InternVL3-8B -> 3584, 2B -> 1536.
VLM_WIDTH = {"large": 3584, "small": 1536}

# Pose normalisation to [-1, 1] (planner.py:778-790): x' = 2 (x - lo) / (hi - lo) - 1 per coordinate.
POSE_MIN = np.array([-1.57, -19.68, -1.67], np.float32)
POSE_RANGE = np.array([66.74, 42.0, 3.53], np.float32)


def normalize_pose(x: jax.Array) -> jax.Array:
    """Raw (x, y, heading) [..., 3] -> normalised [-1, 1]."""
    return 2.0 * (x - POSE_MIN) / POSE_RANGE - 1.0


def denormalize_pose(x: jax.Array) -> jax.Array:
    return (x + 1.0) / 2.0 * POSE_RANGE + POSE_MIN


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    """Planner hyper-parameters. Defaults = upstream DiT `small` with the 8B VLM (Hv 3584)."""
    kind: str = "diffusion"  # 'diffusion' (ReCogDrive DiT) | 'mlp' (regression head)
    vl_dim: int = 3584  # Hv, width of the cached VLM hidden states
    num_heads: int = 8
    head_dim: int = 48
    num_layers: int = 16
    output_dim: int = 512  # DiT output width O (decoder input)
    mlp_hidden: int = 1024  # hidden width of the his/ego encoders, the decoder and the MLP head
    horizon: int = 8
    action_dim: int = 3
    history_len: int = 4
    status_dim: int = 8
    interleave: bool = True
    attention_bias: bool = True
    rope_base: float = 1e4
    use_vl_mask: bool = False  # not checkpoint-compatible with upstream (which never masks)
    dtype: str = "float32"  # compute dtype; params are always fp32
    # how the DiT runs (parameters unchanged, except scan_layers' stacked layout: `stack_blocks`/`unstack_blocks`)
    attention_impl: str = "auto"  # layers.dot_product_attention: 'auto' | 'xla' | 'jax_nn' | 'cudnn'
    scan_layers: bool = False  # blocks stacked on a leading `layers` axis and run with lax.scan
    remat: bool = False  # checkpoint each DiT block (recompute in the backward pass)
    remat_policy: str = "full"  # what a checkpointed block keeps: layers.REMAT_POLICIES
    # diffusion
    sampling_method: str = "ddim"  # 'ddim' | 'flow'
    num_train_timesteps: int = 100
    num_inference_steps: int = 5
    denoised_clip: float | None = 1.0
    eps_clip: float | None = None
    final_clip: float | None = 1.0
    eval_min_std: float = 1e-4  # `get_action` (what upstream evaluates with)
    eval_noise_clip: float | None = 1.0
    sampling_min_std: float = 0.04  # `sample_chain` (RL rollouts, BC teacher)
    sampling_noise_clip: float | None = 5.0
    logprob_min_std: float = 0.1
    # mlp regression head
    alpha_xy: float = 2.0  # tanh output scaled by alpha on x/y (normalised space)
    beta_nav: float = 10.0
    mlp_pool: str = "last"  # 'last' ([ACT]-style last real token) | 'mean'
    hit_threshold: float = 2.0  # metres, for the `hit_rate` metric

    @property
    def embed_dim(self) -> int:
        return self.num_heads * self.head_dim

    def __post_init__(self):
        checks = [
            (self.kind in ("diffusion", "mlp"), f"kind={self.kind!r}: expected 'diffusion' or 'mlp'"),
            (self.sampling_method in ("ddim", "flow"),
             f"sampling_method={self.sampling_method!r}: expected 'ddim' or 'flow'"),
            (self.mlp_pool in ("last", "mean"), f"mlp_pool={self.mlp_pool!r}: expected 'last' or 'mean'"),
            (self.head_dim % 2 == 0, f"head_dim={self.head_dim}: must be even (RoPE)"),
            (self.embed_dim % 2 == 0, f"num_heads*head_dim={self.embed_dim}: must be even"),
            (self.num_train_timesteps % self.num_inference_steps == 0,
             f"num_train_timesteps={self.num_train_timesteps} must be a multiple of "
             f"num_inference_steps={self.num_inference_steps}"),
            (min(self.vl_dim, self.num_heads, self.num_layers, self.output_dim, self.mlp_hidden) > 0,
             "vl_dim, num_heads, num_layers, output_dim, mlp_hidden must be positive"),
            (self.attention_impl in ATTENTION_IMPLS,
             f"attention_impl={self.attention_impl!r}: expected one of {list(ATTENTION_IMPLS)}"),
            (self.remat_policy in REMAT_POLICIES,
             f"remat_policy={self.remat_policy!r}: expected one of {list(REMAT_POLICIES)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"planner config: {msg}")
        to_dtype(self.dtype)

    def replace(self, **kw) -> "PlannerConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "PlannerConfig":
        """From a dict / ml_collections ConfigDict. An optional `variant` key ('tiny', 'small', 'large') and
        `vlm_size` ('large' 8B / 'small' 2B) pick the base; other keys override. Unknown keys are an error."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        variant = d.pop("variant", None)
        vlm_size = d.pop("vlm_size", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config.planner: unknown key(s) {unknown}; allowed: {sorted(names | {'variant', 'vlm_size'})}")
        if variant is None:
            base = cls() if vlm_size is None else cls(vl_dim=_vlm_width(vlm_size))
            return base.replace(**d)
        return planner_config(variant, vlm_size=vlm_size or "large", **d)


def _vlm_width(vlm_size: str) -> int:
    if vlm_size not in VLM_WIDTH:
        raise ValueError(f"planner config: vlm_size={vlm_size!r}; expected one of {sorted(VLM_WIDTH)}")
    return VLM_WIDTH[vlm_size]


# Named variants. `small`/`large` are the upstream DiT sizes (every shipped script uses `small`); the tiny ones are
# for tests and CPU demos.
PLANNER_VARIANTS: dict[str, dict[str, Any]] = {
    "small": dict(num_heads=8, head_dim=48, num_layers=16, output_dim=512, mlp_hidden=1024),
    "large": dict(num_heads=32, head_dim=48, num_layers=16, output_dim=1536, mlp_hidden=1024),
    "tiny": dict(num_heads=2, head_dim=8, num_layers=2, output_dim=24, mlp_hidden=32, vl_dim=32),
    "tiny4": dict(num_heads=4, head_dim=8, num_layers=4, output_dim=48, mlp_hidden=64, vl_dim=48),
}


def planner_config(variant: str = "small", *, vlm_size: str = "large", **overrides) -> PlannerConfig:
    """A named variant; `vlm_size` sets Hv for small/large (tiny variants carry their own small Hv)."""
    if variant not in PLANNER_VARIANTS:
        raise ValueError(f"planner config: unknown variant {variant!r}; expected one of {sorted(PLANNER_VARIANTS)}")
    base = dict(PLANNER_VARIANTS[variant])
    base.setdefault("vl_dim", _vlm_width(vlm_size))
    base.update(overrides)
    return PlannerConfig(**base)


@functools.lru_cache(maxsize=None)
def _schedules(num_train_timesteps: int, num_inference_steps: int):
    # Cached numpy constants; kept off the module so its graphdef stays hashable.
    ddpm = make_ddpm_schedule(num_train_timesteps)
    return ddpm, make_ddim_schedule(ddpm, num_inference_steps)


# ---------------------------------------------------------------------------------------------------------------
# Shared conditioning.

def _check_cond(cond: Mapping[str, jax.Array], cfg: PlannerConfig) -> None:
    for key in ("vl_states", "status", "history"):
        if key not in cond:
            raise KeyError(f"planner cond: missing {key!r}; expected keys vl_states [B, L, Hv], status [B, 8], "
                           f"history [B, 4, 3] (+ optional vl_mask [B, L])")
    vl = cond["vl_states"]
    if vl.ndim != 3 or vl.shape[-1] != cfg.vl_dim:
        raise ValueError(f"planner cond: vl_states has shape {vl.shape}, expected [B, L, {cfg.vl_dim}]")
    if tuple(cond["status"].shape[1:]) != (cfg.status_dim,):
        raise ValueError(f"planner cond: status has shape {cond['status'].shape}, expected [B, {cfg.status_dim}]")
    if tuple(cond["history"].shape[1:]) != (cfg.history_len, cfg.action_dim):
        raise ValueError(f"planner cond: history has shape {cond['history'].shape}, "
                         f"expected [B, {cfg.history_len}, {cfg.action_dim}]")


def _vl_mask(cond: Mapping[str, jax.Array], cfg: PlannerConfig) -> jax.Array | None:
    if not cfg.use_vl_mask:
        return None
    mask = cond.get("vl_mask")
    if mask is None:
        return None
    return mask.astype(bool)


def _masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x [B, L, D] -> [B, D]; the mean over all rows (upstream) or over mask rows."""
    if mask is None:
        return jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)
    m = mask.astype(jnp.float32)[..., None]
    return (jnp.sum(x.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)).astype(x.dtype)


class ActionEncoder(nnx.Module):
    """a = fc3(SiLU(fc2([fc1(x) || tau_a]))), tau_a = [sin(t w) || cos(t w)], w_j = exp(-ln(1e4) j / (D/2))."""

    def __init__(self, action_dim: int, dim: int, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dim, self.dtype = dim, dtype
        self.fc1 = dense(action_dim, dim, (None, "embed"), **kw)
        self.fc2 = dense(2 * dim, dim, ("mlp", "embed"), **kw)
        self.fc3 = dense(dim, dim, ("embed", "embed"), **kw)

    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        """x [B, H, A]; t [B] -> [B, H, D]."""
        a0 = self.fc1(x.astype(self.dtype))
        tau = sinusoidal_embedding(t, self.dim)  # [B, D] fp32
        tau = jnp.broadcast_to(tau[:, None, :], a0.shape).astype(self.dtype)
        return self.fc3(jax.nn.silu(self.fc2(jnp.concatenate([a0, tau], axis=-1))))


class _PlannerInputs(nnx.Module):
    """The three input encoders both planner heads share (upstream names, so checkpoints convert either way):
    VL states -> memory [B, L, D] (`feature_encoder`), history -> [B, D], ego status -> [B, D]."""

    def _init_inputs(self, cfg: PlannerConfig, rngs: nnx.Rngs) -> dict:
        """Sets cfg, dtype and the encoders; returns the layer kwargs (rngs, dtype, fp32 params) for the head."""
        self.cfg, self.dtype = cfg, to_dtype(cfg.dtype)
        kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=jnp.float32)
        d = cfg.embed_dim
        self.feature_encoder = dense(cfg.vl_dim, d, (None, "embed"), **kw)
        self.his_traj_encoder = Mlp(cfg.history_len * cfg.action_dim, cfg.mlp_hidden, d, **kw)
        self.ego_status_encoder = Mlp(cfg.status_dim, cfg.mlp_hidden, d, **kw)
        return kw

    def _encode_inputs(self, cond: Mapping[str, jax.Array]):
        """cond -> (memory [B, L, D], vl mask [B, L] or None, his [B, D], ego [B, D])."""
        cfg = self.cfg
        _check_cond(cond, cfg)
        memory = self.feature_encoder(cond["vl_states"].astype(self.dtype))  # [B, L, D]
        memory = constrain(memory, ("batch", "seq", "embed"))
        b = memory.shape[0]
        his = self.his_traj_encoder(cond["history"].reshape(b, -1).astype(self.dtype))  # [B, D]
        ego = self.ego_status_encoder(cond["status"].astype(self.dtype))  # [B, D]
        return memory, _vl_mask(cond, cfg), his, ego


class DiffusionPlanner(_PlannerInputs):
    """ReCogDrive `TrajectoryHead`: encoders, fusion, LightningDiT, decoder; predicts epsilon (or flow velocity)."""

    def __init__(self, cfg: PlannerConfig, *, rngs: nnx.Rngs):
        kw = self._init_inputs(cfg, rngs)
        d, pdt = cfg.embed_dim, kw["param_dtype"]
        self.action_encoder = ActionEncoder(cfg.action_dim, d, **kw)
        self.fusion_projector = dense(3 * d, d, ("mlp", "embed"), **kw)
        self.position_embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.horizon, d), pdt), sharding=(None, "embed"))
        self.model = LightningDiT(d, cfg.num_heads, cfg.head_dim, cfg.num_layers, cfg.output_dim,
                                  interleave=cfg.interleave, attention_bias=cfg.attention_bias,
                                  rope_base=cfg.rope_base, attention_impl=cfg.attention_impl,
                                  scan_layers=cfg.scan_layers, remat=cfg.remat, remat_policy=cfg.remat_policy, **kw)
        self.action_decoder = Mlp(cfg.output_dim, cfg.mlp_hidden, cfg.action_dim, in_axis="mlp", out_axis=None, **kw)

    @property
    def ddpm_schedule(self):
        """The DDPM training schedule (numpy constants, cached per (train steps, inference steps))."""
        return _schedules(self.cfg.num_train_timesteps, self.cfg.num_inference_steps)[0]

    @property
    def ddim_schedule(self):
        """The K-step DDIM sampling schedule."""
        return _schedules(self.cfg.num_train_timesteps, self.cfg.num_inference_steps)[1]

    # -- network -----------------------------------------------------------------------------------------------
    def encode(self, cond: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Step-independent conditioning, computed once per sample and reused by every denoising step."""
        memory, mask, his, ego = self._encode_inputs(cond)
        ctx = {"memory": memory, "vl_mean": _masked_mean(memory, mask), "his": his, "ego": ego}
        if mask is not None:
            ctx["memory_mask"] = mask
        return ctx

    def predict(self, x: jax.Array, t: jax.Array, ctx: Mapping[str, jax.Array]) -> jax.Array:
        """x [B, H, A] normalised noisy poses, t [B] int timesteps -> eps (or velocity) [B, H, A] fp32."""
        h = self.cfg.horizon
        a = self.action_encoder(x, t) + self.position_embedding[...].astype(self.dtype)[None]  # [B, H, D]
        his = jnp.broadcast_to(ctx["his"][:, None, :], a.shape)
        vl = jnp.broadcast_to(ctx["vl_mean"][:, None, :], a.shape)
        u = self.fusion_projector(jnp.concatenate([his, vl, a], axis=-1))  # [B, H, D]
        u = constrain(u, ("batch", "seq", "embed"))  # the DiT input: split over the batch axes under a mesh
        y = self.model(u, t, ctx["ego"], ctx["memory"], ctx.get("memory_mask"))  # [B, H, O]
        out = self.action_decoder(y)
        assert out.shape[1] == h
        return out.astype(jnp.float32)

    def predict_noise(self, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
        """Convenience: encode + predict in one call (parity tests, debugging)."""
        return self.predict(x, t, self.encode(cond))

    def eps_fn(self, ctx: Mapping[str, jax.Array]):
        """A pure `(x, t) -> eps` closure over the current params and an encoded context (for diffusion/ddim.py)."""
        graphdef, state = nnx.split(self)

        def eps_fn(x, t):
            return nnx.merge(graphdef, state).predict(x, t, ctx)
        return eps_fn

    # -- training ----------------------------------------------------------------------------------------------
    def loss(self, batch: Mapping[str, Any], rng: jax.Array) -> tuple[jax.Array, dict]:
        """IL loss: epsilon MSE (ddim) or flow-matching MSE; batch = {'cond': cond, 'future': [B, H, 3] raw}."""
        x0 = normalize_pose(jnp.asarray(batch["future"], jnp.float32))
        ctx = self.encode(batch["cond"])
        fn = lambda x, t: self.predict(x, t, ctx)
        if self.cfg.sampling_method == "flow":
            return flow_lib.flow_loss(fn, x0, rng)
        return ddim_lib.epsilon_loss(fn, self.ddpm_schedule, x0, rng)

    # -- sampling ----------------------------------------------------------------------------------------------
    def draw_noise(self, rng: jax.Array, b: int, x_init: jax.Array | None = None,
                   step_noise: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(x_init [B, H, A], step_noise [K, B, H, A]) ~ N(0, I) from `rng`, unless given."""
        shape = (b, self.cfg.horizon, self.cfg.action_dim)
        k0, k1 = jax.random.split(rng)
        if x_init is None:
            x_init = jax.random.normal(k0, shape, jnp.float32)
        if step_noise is None:
            step_noise = jax.random.normal(k1, (self.cfg.num_inference_steps,) + shape, jnp.float32)
        return x_init, step_noise

    def sample(self, cond: Mapping[str, jax.Array], rng: jax.Array, *, deterministic: bool = False,
               x_init: jax.Array | None = None, step_noise: jax.Array | None = None) -> jax.Array:
        """Trajectories [B, H, 3] in raw units.

        deterministic=False is upstream evaluation (`get_action`): eta 1, std floor `eval_min_std`, noise clipped to
        +-`eval_noise_clip`. deterministic=True: DDIM with eta 0 and no step noise. `x_init` [B, H, A] and
        `step_noise` [K, B, H, A] replace the draws from `rng` (parity tests).
        """
        mode = "deterministic" if deterministic else "eval"
        chain = self.denoise_chain(cond, rng, mode=mode, x_init=x_init, step_noise=step_noise)
        return denormalize_pose(chain[:, -1])

    def denoise_chain(self, cond: Mapping[str, jax.Array], rng: jax.Array, *, mode: str = "eval",
                      x_init: jax.Array | None = None, step_noise: jax.Array | None = None) -> jax.Array:
        """The normalised denoising chain [B, K+1, H, A]; mode 'eval' (get_action), 'deterministic' (eta 0) or
        'rl' (sample_chain noise: std floor 0.04, clip 5)."""
        chain, _ = self._run_sampler(cond, rng, mode, x_init, step_noise)
        return jnp.moveaxis(chain, 0, 1)

    def _run_sampler(self, cond, rng, mode, x_init, step_noise, ctx=None):
        """-> (chain [K+1, B, H, A], log_probs [K, B, H, A] for mode 'rl' else None)."""
        if mode not in ("eval", "deterministic", "rl"):
            raise ValueError(f"planner sampling mode {mode!r}: expected 'eval', 'deterministic' or 'rl'")
        cfg = self.cfg
        rl = mode == "rl"
        ctx = self.encode(cond) if ctx is None else ctx
        x_init, step_noise = self.draw_noise(rng, ctx["memory"].shape[0], x_init, step_noise)
        eps_fn = self.eps_fn(ctx)
        if cfg.sampling_method == "flow":
            if rl:
                raise NotImplementedError("planner: sampling_method='flow' has no chain log-probs (upstream raises "
                                          "in p_mean_variance), so it cannot be used for RL")
            return flow_lib.flow_sample(eps_fn, x_init, num_steps=cfg.num_inference_steps,
                                        final_clip=cfg.final_clip), None
        settings = ddim_lib.SamplerSettings(
            eta=1.0, min_std=cfg.sampling_min_std if rl else cfg.eval_min_std,
            noise_clip=cfg.sampling_noise_clip if rl else cfg.eval_noise_clip,
            denoised_clip=cfg.denoised_clip, eps_clip=cfg.eps_clip, final_clip=cfg.final_clip,
            deterministic=mode == "deterministic")
        return ddim_lib.ddim_sample(eps_fn, x_init, step_noise, self.ddim_schedule, settings,
                                    logprob_min_std=cfg.logprob_min_std if rl else None)

    def sample_with_chain(self, cond: Mapping[str, jax.Array] | None, rng: jax.Array, *,
                          x_init: jax.Array | None = None, step_noise: jax.Array | None = None,
                          ctx: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
        """RL rollout (`sample_chain`): eta 1, std floor `sampling_min_std` (0.04), noise clip 5.

        Returns chain [B, K+1, H, A] (normalised; chain[:, 0] the initial noise, chain[:, K] the clipped output),
        log_probs [B, K, H, A] (std floor `logprob_min_std` = 0.1, as `chain_log_prob` recomputes them) and
        trajectory [B, H, 3] in raw units. `ctx` (from `encode`, e.g. `repeat_context`-ed G times) replaces `cond`.
        """
        chain, lps = self._run_sampler(cond, rng, "rl", x_init, step_noise, ctx)
        chain = jnp.moveaxis(chain, 0, 1)
        return {"chain": chain, "log_probs": jnp.moveaxis(lps, 0, 1), "trajectory": denormalize_pose(chain[:, -1])}

    def chain_log_prob(self, chain: jax.Array, cond: Mapping[str, jax.Array] | None, *,
                       ctx: Mapping[str, jax.Array] | None = None) -> jax.Array:
        """Per-coordinate log-probs [B, K, H, A] of a chain [B, K+1, H, A] under the current params (differentiable);
        flattening to [B*K, H, A] gives upstream's (b, k) order. No clamping here (the RL loss clamps).
        `ctx` (from `encode`) replaces `cond`."""
        cfg = self.cfg
        if cfg.sampling_method == "flow":
            raise NotImplementedError("planner: sampling_method='flow' has no chain log-probs; RL needs 'ddim'")
        k = cfg.num_inference_steps
        if chain.ndim != 4 or chain.shape[1] != k + 1:
            raise ValueError(f"chain_log_prob: chain has shape {chain.shape}, expected [B, {k + 1}, "
                             f"{cfg.horizon}, {cfg.action_dim}]")
        ctx = self.encode(cond) if ctx is None else ctx
        lps = ddim_lib.chain_log_prob(self.eps_fn(ctx), jnp.moveaxis(chain, 1, 0), self.ddim_schedule,
                                      min_std=cfg.logprob_min_std, eta=1.0, denoised_clip=cfg.denoised_clip,
                                      eps_clip=cfg.eps_clip)
        return jnp.moveaxis(lps, 0, 1)


def repeat_context(ctx: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """Each scene's encoded context repeated n times along the batch (torch `repeat_interleave`: b0 b0 .. b1 b1 ..),
    so G rollouts per scene share one encoder pass."""
    return {k: jnp.repeat(v, n, axis=0) for k, v in ctx.items()}


class RegressionPlanner(_PlannerInputs):
    """MLP regression head (DESIGN §8.4, seed 002) on the same inputs as the diffusion planner.

    Pooled VL feature ('last' token, the [ACT]-style position, or masked 'mean') || history || ego encodings ->
    3-layer MLP (GELU) -> tanh * alpha (alpha = (alpha_xy, alpha_xy, 1)) in the normalised pose space.
    Loss = beta_nav * masked MSE(tanh output, normalised target / alpha).
    """

    def __init__(self, cfg: PlannerConfig, *, rngs: nnx.Rngs):
        kw = self._init_inputs(cfg, rngs)
        d = cfg.embed_dim
        self.fc1 = dense(3 * d, cfg.mlp_hidden, ("embed", "mlp"), **kw)
        self.fc2 = dense(cfg.mlp_hidden, cfg.mlp_hidden, ("mlp", "mlp"), **kw)
        self.fc3 = dense(cfg.mlp_hidden, cfg.horizon * cfg.action_dim, ("mlp", None), **kw)

    @property
    def _alpha(self) -> np.ndarray:
        alpha = np.ones((self.cfg.action_dim,), np.float32)
        alpha[:2] = self.cfg.alpha_xy
        return alpha

    def _pool(self, memory: jax.Array, mask: jax.Array | None) -> jax.Array:
        if self.cfg.mlp_pool == "mean":
            return _masked_mean(memory, mask)
        if mask is None:
            return memory[:, -1]
        # last real token: the highest index where the mask is set (works for left or right padding).
        idx = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1])[None], 0), axis=1)
        return jnp.take_along_axis(memory, idx[:, None, None], axis=1)[:, 0]

    def forward(self, cond: Mapping[str, jax.Array]) -> jax.Array:
        """-> tanh outputs [B, H, A] in [-1, 1] (normalised pose / alpha)."""
        cfg = self.cfg
        memory, mask, his, ego = self._encode_inputs(cond)
        b = memory.shape[0]
        pooled = self._pool(memory, mask)
        z = jnp.concatenate([pooled, his, ego], axis=-1)
        z = self.fc3(jax.nn.gelu(self.fc2(jax.nn.gelu(self.fc1(z), approximate=False)), approximate=False))
        return jnp.tanh(z.astype(jnp.float32)).reshape(b, cfg.horizon, cfg.action_dim)

    def loss(self, batch: Mapping[str, Any], rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """batch = {'cond': cond, 'future': [B, H, 3] raw, optional 'future_mask': [B, H] bool (valid waypoints)}."""
        del rng  # deterministic head
        cfg = self.cfg
        future = jnp.asarray(batch["future"], jnp.float32)
        b = future.shape[0]
        mask = batch.get("future_mask")
        mask = jnp.ones(future.shape[:2], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
        pred_n = self.forward(batch["cond"])
        target_n = normalize_pose(future) / self._alpha
        m3 = mask[..., None]
        denom = jnp.maximum(jnp.sum(mask) * cfg.action_dim, 1.0)
        l_nav = jnp.sum(jnp.square(pred_n - target_n) * m3) / denom
        loss = cfg.beta_nav * l_nav
        # metrics in raw units
        pred = denormalize_pose(pred_n * self._alpha)
        se = jnp.square(pred - future) * m3
        per_dim = jnp.sum(se, axis=(0, 1)) / jnp.maximum(jnp.sum(mask), 1.0)
        last = jnp.max(jnp.where(mask > 0, jnp.arange(cfg.horizon)[None], 0), axis=1)  # last valid waypoint
        pick = lambda a: jnp.take_along_axis(a, last[:, None, None], axis=1)[:, 0]
        has = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
        epe = jnp.linalg.norm(pick(pred)[:, :2] - pick(future)[:, :2], axis=-1)
        n_has = jnp.maximum(jnp.sum(has), 1.0)
        metrics = {
            "loss": loss, "L_nav": l_nav, "mse_total": jnp.sum(se) / denom,
            "mse_x": per_dim[0], "mse_y": per_dim[1], "mse_heading": per_dim[2],
            "final_epe": jnp.sum(epe * has) / n_has,
            "hit_rate": jnp.sum((epe < cfg.hit_threshold) * has) / n_has,
            "mask_cov": jnp.sum(mask) / (b * cfg.horizon),
        }
        return loss, metrics

    def sample(self, cond: Mapping[str, jax.Array], rng: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
        """Trajectories [B, H, 3] raw units (the head is deterministic; rng/deterministic are accepted for a uniform
        interface)."""
        del rng, deterministic
        return denormalize_pose(self.forward(cond) * self._alpha)


Planner = DiffusionPlanner | RegressionPlanner


def build_planner(cfg: PlannerConfig | Mapping[str, Any], rngs: nnx.Rngs) -> Planner:
    """`cfg.kind` 'diffusion' -> DiffusionPlanner, 'mlp' -> RegressionPlanner. Accepts a PlannerConfig or a
    dict/ConfigDict (see `PlannerConfig.from_mapping`)."""
    if not isinstance(cfg, PlannerConfig):
        cfg = PlannerConfig.from_mapping(cfg)
    if cfg.kind == "mlp":
        return RegressionPlanner(cfg, rngs=rngs)
    return DiffusionPlanner(cfg, rngs=rngs)


def abstract_planner(cfg: PlannerConfig) -> Planner:
    """Planner with ShapeDtypeStruct leaves (no allocation); for checkpoint restore targets and key manifests."""
    return nnx.eval_shape(lambda: build_planner(cfg, nnx.Rngs(0)))


def planner_params(planner: Planner) -> dict:
    """The planner's parameters as a nested pure dict (what the converter writes and stages restore)."""
    return nnx.to_pure_dict(nnx.state(planner, nnx.Param))


def load_planner_params(planner: Planner, params: Mapping) -> None:
    """In-place: set the planner's parameters from a pure dict (structure must match exactly)."""
    state = nnx.state(planner, nnx.Param)
    nnx.replace_by_pure_dict(state, _int_keys(params))
    nnx.update(planner, state)


def blocks_layout(params: Mapping) -> str:
    """'scanned' or 'list': the layout of the DiT blocks in a planner parameter tree (int or digit keys under
    model/transformer_blocks = one entry per block)."""
    blocks = params["model"]["transformer_blocks"]
    return "list" if all(isinstance(k, int) or str(k).isdigit() for k in blocks) else "scanned"


def stack_blocks(params: Mapping) -> dict:
    """A planner parameter tree with list-layout blocks (`transformer_blocks.<i>.*`) -> the scanned layout (one
    stacked block, every leaf [L, ...]); other parameters untouched. Already scanned: returned as is."""
    params = _int_keys(params)
    if blocks_layout(params) == "scanned":
        return dict(params)
    blocks = params["model"]["transformer_blocks"]
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[blocks[i] for i in sorted(blocks)])
    return {**params, "model": {**params["model"], "transformer_blocks": stacked}}


def unstack_blocks(params: Mapping) -> dict:
    """The inverse of `stack_blocks`: scanned-layout blocks [L, ...] -> `transformer_blocks.<i>.*`."""
    params = _int_keys(params)
    if blocks_layout(params) == "list":
        return dict(params)
    stacked = params["model"]["transformer_blocks"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    blocks = {i: jax.tree.map(lambda a, i=i: np.asarray(a)[i], stacked) for i in range(n)}
    return {**params, "model": {**params["model"], "transformer_blocks": blocks}}


def to_layout(params: Mapping, cfg: PlannerConfig) -> dict:
    """`params` (either layout) in the block layout `cfg.scan_layers` asks for."""
    return stack_blocks(params) if cfg.scan_layers else unstack_blocks(params)


def _int_keys(tree):
    """Orbax/JSON turn nnx.List indices into strings; map digit keys back to ints."""
    if isinstance(tree, Mapping):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree

