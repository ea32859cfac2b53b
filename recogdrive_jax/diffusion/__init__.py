"""Diffusion machinery for the planner: cosine DDPM schedule, epsilon loss, DDIM samplers with chain log-probs,
flow matching, parameter EMA. Pure functions of an `eps_fn(x, t)` closure."""
from recogdrive_jax.diffusion.ddim import (SamplerSettings, chain_log_prob, ddim_mean_logvar, ddim_sample,
                                           epsilon_loss, gaussian_log_prob, q_sample)
from recogdrive_jax.diffusion.ema import ema_init, ema_update
from recogdrive_jax.diffusion.flow import flow_loss, flow_sample
from recogdrive_jax.diffusion.schedule import (DDIMSchedule, DDPMSchedule, cosine_beta_schedule, make_ddim_schedule,
                                               make_ddpm_schedule, schedule_buffers)
