"""Cosine DDPM schedule and its DDIM sub-schedule, exactly as the upstream buffers (spec/planner.md §3).

All values are fp32 numpy constants (the schedule is not a parameter); beta comes from float64 and is cast to
fp32, everything else is derived in fp32 like the torch buffers.
"""
from __future__ import annotations

import dataclasses

import numpy as np

F32 = np.float32


def cosine_beta_schedule(num_timesteps: int = 100, s: float = 0.008) -> np.ndarray:
    """beta_t = clip(1 - abar_{t+1}/abar_t, 0, 0.999) with abar(x) = cos^2(((x/steps)+s)/(1+s) * pi/2).

    Upstream quirk kept on purpose: x = linspace(0, steps, steps) with steps = T + 1 (spacing (T+1)/T, not 1).
    """
    steps = num_timesteps + 1
    x = np.linspace(0, steps, steps)
    abar = np.cos(((x / steps) + s) / (1 + s) * np.pi * 0.5) ** 2
    abar = abar / abar[0]
    betas = 1 - (abar[1:] / abar[:-1])
    return np.clip(betas, a_min=0, a_max=0.999).astype(F32)


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
    """The 12 `ddpm_*` buffers, each [T] fp32."""
    betas: np.ndarray
    alphas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    var: np.ndarray
    logvar_clipped: np.ndarray
    mu_coef1: np.ndarray
    mu_coef2: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def make_ddpm_schedule(num_timesteps: int = 100) -> DDPMSchedule:
    betas = cosine_beta_schedule(num_timesteps)
    alphas = (F32(1.0) - betas).astype(F32)
    # torch.cumprod on fp32 accumulates in double; match it so exported buffers are bit-identical.
    abar = np.cumprod(alphas.astype(np.float64)).astype(F32)
    abar_prev = np.concatenate([np.ones(1, F32), abar[:-1]]).astype(F32)
    one = F32(1.0)
    var = (betas * (one - abar_prev) / (one - abar)).astype(F32)
    return DDPMSchedule(
        betas=betas, alphas=alphas, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar).astype(F32),
        sqrt_one_minus_alphas_cumprod=np.sqrt(one - abar).astype(F32),
        sqrt_recip_alphas_cumprod=np.sqrt(one / abar).astype(F32),
        sqrt_recipm1_alphas_cumprod=np.sqrt(one / abar - one).astype(F32),
        var=var,
        logvar_clipped=np.log(np.maximum(var, F32(1e-20))).astype(F32),
        mu_coef1=(betas * np.sqrt(abar_prev) / (one - abar)).astype(F32),
        mu_coef2=((one - abar_prev) * np.sqrt(alphas) / (one - abar)).astype(F32),
    )


@dataclasses.dataclass(frozen=True)
class DDIMSchedule:
    """DDIM sub-schedule in *sampling order* (noisiest first), each [K]."""
    t: np.ndarray  # int64 [80, 60, 40, 20, 0]
    t_schedule: np.ndarray  # int64 [0, 20, 40, 60, 80] (ascending, as the `ddim_t_schedule` buffer)
    alphas: np.ndarray  # abar_t
    alphas_sqrt: np.ndarray
    alphas_prev: np.ndarray  # abar of the next (less noisy) step; 1 after t = 0
    sqrt_one_minus_alphas: np.ndarray
    sigmas: np.ndarray  # eta = 0 buffer (all zero); the sampler recomputes sigma with its own eta

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0])


def make_ddim_schedule(ddpm: DDPMSchedule, num_steps: int = 5) -> DDIMSchedule:
    step_ratio = ddpm.num_timesteps // num_steps
    t_asc = (np.arange(0, num_steps, dtype=np.int64) * step_ratio).astype(np.int64)
    alphas = ddpm.alphas_cumprod[t_asc].astype(F32)
    alphas_prev = np.concatenate([np.ones(1, F32), ddpm.alphas_cumprod[t_asc[:-1]]]).astype(F32)
    one = F32(1.0)
    sigmas = (F32(0.0) * np.sqrt((one - alphas_prev) / (one - alphas) * (one - alphas / alphas_prev))).astype(F32)
    flip = lambda a: np.ascontiguousarray(a[::-1])
    return DDIMSchedule(
        t=flip(t_asc), t_schedule=t_asc, alphas=flip(alphas), alphas_sqrt=flip(np.sqrt(alphas).astype(F32)),
        alphas_prev=flip(alphas_prev), sqrt_one_minus_alphas=flip(np.sqrt(one - alphas).astype(F32)),
        sigmas=flip(sigmas))


def schedule_buffers(num_timesteps: int = 100, num_steps: int = 5) -> dict[str, np.ndarray]:
    """The 19 upstream buffers by state-dict name (`ddpm_*`, `ddim_*`), for checkpoint export."""
    ddpm = make_ddpm_schedule(num_timesteps)
    ddim = make_ddim_schedule(ddpm, num_steps)
    out = {f"ddpm_{f.name}": getattr(ddpm, f.name) for f in dataclasses.fields(ddpm)}
    out.update({
        "ddim_t_schedule": ddim.t_schedule, "ddim_t": ddim.t, "ddim_alphas": ddim.alphas,
        "ddim_alphas_sqrt": ddim.alphas_sqrt, "ddim_alphas_prev": ddim.alphas_prev,
        "ddim_sqrt_one_minus_alphas": ddim.sqrt_one_minus_alphas, "ddim_sigmas": ddim.sigmas,
    })
    return out


SCHEDULE_BUFFER_NAMES = tuple(schedule_buffers().keys())
