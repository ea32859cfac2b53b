"""PyTorch reference of the ReCogDrive diffusion planner, written from spec/planner.md (not copied from upstream).

Module and parameter names reproduce the upstream state dict exactly (spec §1): under `agent.action_head.` in a
Lightning checkpoint, 347 keys including `model.rotary_embedder.inv_freq`, `eta.eta_logit` and the 19 schedule
buffers. Used by the parity tests, the converter tests (as a checkpoint producer) and bench/planner.py.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PREFIX = "agent.action_head."
POSE_MIN = torch.tensor([-1.57, -19.68, -1.67])
POSE_RANGE = torch.tensor([66.74, 42.0, 3.53])

SIZES = {
    "small": dict(num_heads=8, head_dim=48, num_layers=16, output_dim=512, mlp_hidden=1024),
    "large": dict(num_heads=32, head_dim=48, num_layers=16, output_dim=1536, mlp_hidden=1024),
}


class Mlp(nn.Module):
    """timm Mlp with norm_layer: fc1 -> GELU(erf) -> LayerNorm -> fc2."""

    def __init__(self, i, h, o):
        super().__init__()
        self.fc1 = nn.Linear(i, h)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(h, eps=1e-5)
        self.fc2 = nn.Linear(h, o)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x))))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class RotaryEmbedder(nn.Module):
    def __init__(self, head_dim, base=10000.0, max_len=64):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=True)
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, n):
        return self.cos_cached[:n], self.sin_cached[:n]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim, nh, hd):
        super().__init__()
        self.nh, self.hd = nh, hd
        self.to_q = nn.Linear(dim, nh * hd)
        self.to_k = nn.Linear(dim, nh * hd)
        self.to_v = nn.Linear(dim, nh * hd)
        self.q_norm = RMSNorm(hd)
        self.k_norm = RMSNorm(hd)
        self.to_out = nn.ModuleList([nn.Linear(nh * hd, dim), nn.Dropout(0.0)])

    def forward(self, x, context, cos, sin):
        b, t, _ = x.shape
        is_self = context is None
        ctx = x if is_self else context
        q = self.to_q(x).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.to_k(ctx).view(b, ctx.shape[1], self.nh, self.hd).transpose(1, 2)
        v = self.to_v(ctx).view(b, ctx.shape[1], self.nh, self.hd).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        if is_self:
            k = k * cos + rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        o = o.transpose(1, 2).reshape(b, t, self.nh * self.hd)
        return self.to_out[1](self.to_out[0](o))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    def __init__(self, dim, nh, hd, cross):
        super().__init__()
        self.cross = cross
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, nh, hd)
        self.norm2 = RMSNorm(dim)
        self.ffn = SwiGLU(dim, dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, u, c, memory, cos, sin):
        sa, ca, ga, sf, cf, gf = self.adaLN_modulation(c).chunk(6, dim=-1)
        n = modulate(self.norm1(u), sa, ca)
        o = self.attn(n, memory if self.cross else None, cos, sin)
        u = u + ga.unsqueeze(1) * o
        n = modulate(self.norm2(u), sf, cf)
        return u + gf.unsqueeze(1) * self.ffn(n)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class TimestepEncoder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(dim)

    def forward(self, t):
        # diffusers Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
        half = 128
        exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1.0)
        args = t.float()[:, None] * torch.exp(exponent)[None]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        return self.timestep_embedder(emb)


class FinalLayer(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, out)
        self.modulation_proj = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, u, c):
        shift, scale = self.modulation_proj(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(u), shift, scale))


class DiT(nn.Module):
    def __init__(self, dim, nh, hd, layers, out):
        super().__init__()
        self.timestep_encoder = TimestepEncoder(dim)
        self.rotary_embedder = RotaryEmbedder(hd)
        self.transformer_blocks = nn.ModuleList([Block(dim, nh, hd, cross=(i % 2 == 1)) for i in range(layers)])
        self.final_layer = FinalLayer(dim, out)

    def forward(self, u, t, ego, memory):
        c = self.timestep_encoder(t) + ego
        cos, sin = self.rotary_embedder(u.shape[1])
        for blk in self.transformer_blocks:
            u = blk(u, c, memory, cos, sin)
        return self.final_layer(u, c)


class ActionEncoder(nn.Module):
    def __init__(self, a, dim):
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(a, dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.fc3 = nn.Linear(dim, dim)

    def forward(self, x, t):
        a0 = self.fc1(x)
        half = self.dim // 2
        exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half
        args = t.float()[:, None] * torch.exp(exponent)[None]
        tau = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)[:, None].expand(-1, x.shape[1], -1)
        return self.fc3(F.silu(self.fc2(torch.cat([a0, tau], dim=-1))))


class Eta(nn.Module):
    def __init__(self):
        super().__init__()
        self.eta_logit = nn.Parameter(torch.full((1,), float("inf")), requires_grad=False)

    def forward(self):
        return torch.sigmoid(self.eta_logit)  # +inf -> 1


def cosine_betas(T=100, s=0.008):
    steps = T + 1
    x = np.linspace(0, steps, steps)
    ac = np.cos(((x / steps) + s) / (1 + s) * np.pi * 0.5) ** 2
    ac = ac / ac[0]
    return torch.tensor(np.clip(1 - ac[1:] / ac[:-1], 0, 0.999), dtype=torch.float32)


class TorchPlanner(nn.Module):
    """The `action_head` module. `vl_dim` = Hv; sizes from SIZES or explicit kwargs."""

    def __init__(self, vl_dim=3584, num_heads=8, head_dim=48, num_layers=16, output_dim=512, mlp_hidden=1024,
                 horizon=8, T=100, K=5):
        super().__init__()
        d = num_heads * head_dim
        self.horizon, self.K = horizon, K
        self.feature_encoder = nn.Linear(vl_dim, d)
        self.his_traj_encoder = Mlp(12, mlp_hidden, d)
        self.ego_status_encoder = Mlp(8, mlp_hidden, d)
        self.action_encoder = ActionEncoder(3, d)
        self.fusion_projector = nn.Linear(3 * d, d)
        self.position_embedding = nn.Embedding(horizon, d)
        self.model = DiT(d, num_heads, head_dim, num_layers, output_dim)
        self.action_decoder = Mlp(output_dim, mlp_hidden, 3)
        self.eta = Eta()
        b = cosine_betas(T)
        a = 1.0 - b
        ac = torch.cumprod(a, dim=0)
        acp = torch.cat([torch.ones(1), ac[:-1]])
        var = b * (1.0 - acp) / (1.0 - ac)
        bufs = dict(betas=b, alphas=a, alphas_cumprod=ac, alphas_cumprod_prev=acp, sqrt_alphas_cumprod=ac.sqrt(),
                    sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(), sqrt_recip_alphas_cumprod=(1.0 / ac).sqrt(),
                    sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1).sqrt(), var=var,
                    logvar_clipped=torch.log(torch.clamp(var, min=1e-20)),
                    mu_coef1=b * acp.sqrt() / (1.0 - ac), mu_coef2=(1.0 - acp) * a.sqrt() / (1.0 - ac))
        for k, v in bufs.items():
            self.register_buffer(f"ddpm_{k}", v)
        ratio = T // K
        ts = torch.arange(0, K) * ratio
        da = ac[ts].clone()
        dap = torch.cat([torch.tensor([1.0]), ac[ts[:-1]]])
        sig = 0.0 * ((1 - dap) / (1 - da) * (1 - da / dap)) ** 0.5
        self.register_buffer("ddim_t_schedule", ts.clone())
        self.register_buffer("ddim_t", torch.flip(ts, [0]))
        self.register_buffer("ddim_alphas", torch.flip(da, [0]))
        self.register_buffer("ddim_alphas_sqrt", torch.flip(da.sqrt(), [0]))
        self.register_buffer("ddim_alphas_prev", torch.flip(dap, [0]))
        self.register_buffer("ddim_sqrt_one_minus_alphas", torch.flip((1.0 - da) ** 0.5, [0]))
        self.register_buffer("ddim_sigmas", torch.flip(sig, [0]))

    # -- network ---------------------------------------------------------------------------------------------
    def encode(self, vl, his, st):
        V = self.feature_encoder(vl)
        return dict(V=V, vbar=V.mean(dim=1), h=self.his_traj_encoder(his.reshape(his.shape[0], -1)),
                    e=self.ego_status_encoder(st))

    def predict_noise(self, x, t, ctx):
        a = self.action_encoder(x, t) + self.position_embedding.weight[None]
        h = ctx["h"][:, None].expand_as(a)
        v = ctx["vbar"][:, None].expand_as(a)
        u = self.fusion_projector(torch.cat([h, v, a], dim=-1))
        return self.action_decoder(self.model(u, t, ctx["e"], ctx["V"]))

    def loss(self, x0_norm, t, noise, ctx):
        xt = self.ddpm_sqrt_alphas_cumprod[t][:, None, None] * x0_norm + \
            self.ddpm_sqrt_one_minus_alphas_cumprod[t][:, None, None] * noise
        return F.mse_loss(self.predict_noise(xt, t, ctx), noise)

    # -- DDIM --------------------------------------------------------------------------------------------------
    def p_mean_variance(self, x, i, ctx, eta, denoised_clip=1.0):
        t = torch.full((x.shape[0],), int(self.ddim_t[i]), dtype=torch.long)
        eps = self.predict_noise(x, t, ctx)
        alpha, alpha_prev = self.ddim_alphas[i], self.ddim_alphas_prev[i]
        som = self.ddim_sqrt_one_minus_alphas[i]
        x0 = (x - som * eps) / alpha ** 0.5
        x0 = x0.clamp(-denoised_clip, denoised_clip)
        eps = (x - alpha ** 0.5 * x0) / som
        sigma = (eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)) ** 0.5).clamp(min=1e-10)
        dir_coef = (1.0 - alpha_prev - sigma ** 2).clamp(min=0).sqrt()
        mu = alpha_prev ** 0.5 * x0 + dir_coef * eps
        logvar = torch.log(sigma ** 2 + 1e-20)
        return mu, logvar

    @torch.no_grad()
    def sample_chain(self, ctx, x_init, step_noise, *, deterministic=False, min_std=0.04, noise_clip=5.0,
                     final_clip=1.0):
        """x_init [B, 8, 3], step_noise [K, B, 8, 3] -> chain [B, K+1, 8, 3]."""
        eta = 0.0 if deterministic else float(self.eta())
        x = x_init
        chain = [x]
        for i in range(self.K):
            mu, logvar = self.p_mean_variance(x, i, ctx, eta)
            if deterministic:
                x = mu
            else:
                std = torch.exp(0.5 * logvar).clamp(min=min_std)
                x = mu + std * step_noise[i].clamp(-noise_clip, noise_clip)
            if i == self.K - 1:
                x = x.clamp(-final_clip, final_clip)
            chain.append(x)
        return torch.stack(chain, dim=1)

    def get_logprobs(self, ctx, chain, min_std=0.1):
        """chain [B, K+1, 8, 3] -> log-probs [B*K, 8, 3] in (b, k) order."""
        eta = float(self.eta())
        out = []
        for i in range(self.K):
            mu, logvar = self.p_mean_variance(chain[:, i], i, ctx, eta)
            std = torch.exp(0.5 * logvar).clamp(min=min_std)
            out.append(torch.distributions.Normal(mu, std).log_prob(chain[:, i + 1]))
        return torch.stack(out, dim=1).reshape(-1, *chain.shape[2:])


def normalize(x):
    return 2 * (x - POSE_MIN) / POSE_RANGE - 1


def denormalize(x):
    return (x + 1) / 2 * POSE_RANGE + POSE_MIN


def randomize_(model: TorchPlanner, seed: int, scale: float = 1.0) -> TorchPlanner:
    """Random weights for parity tests: default-like uniform(+-1/sqrt(fan_in)) for linears, 1 + 0.1 N for norms,
    N(0, 0.5) for the position embedding (upstream zero-inits adaLN; random here so every path is exercised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "eta.eta_logit":
                continue
            if p.ndim == 2 and "position_embedding" not in name:
                bound = scale / math.sqrt(p.shape[1])
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "position_embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def lightning_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v for k, v in model.state_dict().items()}
