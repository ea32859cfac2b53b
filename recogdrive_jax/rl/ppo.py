"""VLM-PPO for the V-IRL navigation task (spec/virl.md §2): policy + value head, scoring and the jitted update
(the chat encoding of env observations into fixed-shape inputs is `vlm/chat.py`).

The policy is one parameter tree `{'vlm': InternVL, 'value_head': ValueHead}`; the value head reads the final
(post-norm) hidden state of the **last prompt token**. Every sample has the same static layout

    input_ids [N, P + A]:  prompt left-padded to P  |  answer (generated tokens incl. EOS) right-padded to A

so the value token is always column P−1 and the logits that predict the answer are columns P−1 … P+A−2 (only
those A columns go through `lm_head`). The sequence log-prob is Σ_i w_i·log softmax(logits_i / T)[out_i] with
the weights of `ppo_loss.answer_token_weights` (0.5 thought, 1.0 action, 0 for out[0..1] and padding).

`make_ppo_update` is the pure `(state, batch, rng, extra) -> (state, metrics)` the generic loop jits with ZeRO-1
shardings: epochs × minibatches × micro-batches are `lax.scan`s (one optimizer step per minibatch, gradients
averaged over its micro-batches), each epoch a fresh permutation of the buffer. GAE runs on the host per rollout
buffer (`rollout_advantages`), as upstream does per process before its PPO epochs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recogdrive_jax import config_types
from recogdrive_jax.models import internvl as ivl
from recogdrive_jax.models.heads import ValueHead
from recogdrive_jax.models.layers import token_logprobs
from recogdrive_jax.rl import advantages as adv_lib
from recogdrive_jax.rl import ppo_loss
from recogdrive_jax.train.module_def import ModuleDef
from recogdrive_jax.train.state import TrainState

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------------------------- the policy

class PolicyWithValue(nnx.Module):
    """InternVL chat model + value head: one module, one parameter tree, shared trunk."""

    def __init__(self, cfg: ivl.InternVLConfig, value_hidden: Sequence[int] = (1024, 512), *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.vlm = ivl.InternVLModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.value_head = ValueHead(cfg.llm_config.hidden_size, tuple(value_hidden), dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)


def vlm_config(model_cfg) -> ivl.InternVLConfig:
    """`config.model` → InternVLConfig of a random-init variant with its `llm.*` / `vit.*` overrides."""
    model_cfg = config_types.model_config(model_cfg)
    return ivl.with_field_overrides(ivl.get_config(model_cfg.variant), model_cfg.llm, model_cfg.vit)


def str_keys(tree):
    """Integer dict keys (nnx.List indices, e.g. the value head's layers) as strings: the form Orbax restores,
    so init, restore and the jitted shardings all see one tree structure (`ModuleDef.bind` maps them back)."""
    if isinstance(tree, dict):
        return {str(k): str_keys(v) for k, v in tree.items()}
    return tree


def policy_def(model_cfg, cfg: ivl.InternVLConfig | None = None) -> tuple[ModuleDef, ivl.InternVLConfig]:
    """The policy module definition over `cfg` (default: `vlm_config(model_cfg)`, a random-init variant)."""
    cfg = vlm_config(model_cfg) if cfg is None else cfg
    model_cfg = config_types.nav_model_config(model_cfg)
    dtype = _DTYPES[model_cfg.dtype]
    hidden = model_cfg.value_hidden
    return ModuleDef(lambda rngs: PolicyWithValue(cfg, hidden, dtype=dtype, rngs=rngs)), cfg


# ---------------------------------------------------------------------------------------------------- scoring

def _forward(policy: PolicyWithValue, batch: dict, prompt_len: int):
    """→ (answer logits [B, A, V] fp32, values [B]) for the static prompt|answer layout."""
    ids = batch["input_ids"]                                                    # [B, P + A]
    b = ids.shape[0]
    pv = batch["pixel_values"]                                                  # [B, nt, S, S, 3]
    pv = pv.reshape(b * pv.shape[1], *pv.shape[2:])
    flags = batch["image_flags"].reshape(-1)
    vlm = policy.vlm
    # Image features go only into the prompt's <IMG_CONTEXT> slots: a sampled <IMG_CONTEXT> id in the answer
    # keeps its token embedding, as during generation (decode_step embeds tokens only).
    emb = vlm.language_model.model.embed_tokens(ids)
    prompt_only = ids.at[:, prompt_len:].set(vlm.cfg.pad_token_id)
    emb = ivl.merge_image_embeds(emb, prompt_only, vlm.extract_feature(pv), vlm.cfg.image_token_id, flags)
    out = vlm(ids, batch["attention_mask"], inputs_embeds=emb, compute_logits=False)
    hidden = out["hidden_states"]                                               # [B, P + A, D]
    values = policy.value_head.from_hidden(hidden[:, prompt_len - 1])           # [B]
    h_ans = hidden[:, prompt_len - 1:-1]                                        # [B, A, D] predicts out[0..A)
    logits = policy.vlm.language_model.logits(h_ans).astype(jnp.float32)
    return logits, values


def answer_tokens(batch: dict, prompt_len: int) -> jax.Array:
    return batch["input_ids"][:, prompt_len:]                                   # [B, A]


def score(policy: PolicyWithValue, batch: dict, prompt_len: int, temperature: float) -> dict:
    """Weighted sequence log-prob [B] of the answers (logits / temperature, fp32 log_softmax), per-token
    log-probs [B, A] and values [B]."""
    logits, values = _forward(policy, batch, prompt_len)
    tlp = token_logprobs(logits, answer_tokens(batch, prompt_len), temperature)
    return {"logp": ppo_loss.sequence_logprob(tlp, batch["weights"]), "token_logp": tlp, "values": values}


def make_score_fn(mdef: ModuleDef, prompt_len: int, temperature: float):
    """Jitted `(params, batch) -> {'logp', 'values'}`: the no-grad scoring pass of the rollout (logp_old,
    V_old) — the same computation the update differentiates."""
    @jax.jit
    def fn(params, batch):
        out = score(mdef.bind(params), batch, prompt_len, temperature)
        return {"logp": out["logp"], "values": out["values"]}
    return fn


# ----------------------------------------------------------------------------------------------------- update

@dataclasses.dataclass(frozen=True)
class PPOHParams:
    """The `config.ppo` knobs the update needs (spec §2 table)."""
    epochs: int = 4
    num_minibatches: int = 2          # optimizer steps per epoch
    grad_accum: int = 128             # micro-batches per optimizer step (config.ppo.minibatch_grad_accum)
    clip_param: float = 0.1
    value_clip: float = 0.1
    value_coef: float = 0.5
    ratio_cap: float = 10.0
    use_clipped_value_loss: bool = True
    temperature: float = 0.2
    shuffle: bool = True

    @classmethod
    def from_config(cls, ppo_cfg) -> "PPOHParams":
        """From the typed `config.ppo` block (config_types.PPOConfig)."""
        return cls(epochs=int(ppo_cfg.epochs), num_minibatches=int(ppo_cfg.num_minibatches),
                   grad_accum=int(ppo_cfg.minibatch_grad_accum), clip_param=float(ppo_cfg.clip_param),
                   value_clip=float(ppo_cfg.value_clip), value_coef=float(ppo_cfg.value_coef),
                   ratio_cap=float(ppo_cfg.ratio_cap), use_clipped_value_loss=bool(ppo_cfg.use_clipped_value_loss),
                   temperature=float(ppo_cfg.temperature), shuffle=bool(ppo_cfg.shuffle))

    @property
    def optimizer_steps_per_update(self) -> int:
        return self.epochs * self.num_minibatches


_UPDATE_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_flags", "weights", "old_logp", "old_values",
                "advantages", "returns", "sample_mask")


def ppo_minibatch_loss(params, mdef: ModuleDef, batch: dict, prompt_len: int, hp: PPOHParams):
    """Clipped policy + value loss of one micro-batch (means over its valid samples)."""
    out = score(mdef.bind(params), batch, prompt_len, hp.temperature)
    mask = batch["sample_mask"] * jnp.isfinite(batch["old_logp"])
    old_logp = jnp.where(jnp.isfinite(batch["old_logp"]), batch["old_logp"], 0.0)
    loss, metrics = ppo_loss.ppo_loss(
        out["logp"], old_logp, batch["advantages"], out["values"], batch["old_values"], batch["returns"],
        clip_param=hp.clip_param, value_clip=hp.value_clip, value_coef=hp.value_coef, ratio_cap=hp.ratio_cap,
        use_clipped_value_loss=hp.use_clipped_value_loss, sample_mask=mask)
    metrics["value_mean"] = jnp.sum(mask * out["values"]) / jnp.maximum(mask.sum(), 1.0)
    return loss, metrics


def make_ppo_update(mdef: ModuleDef, tx: optax.GradientTransformation, hp: PPOHParams, prompt_len: int,
                    schedule: optax.Schedule | None = None):
    """The pure PPO update over one rollout buffer of N samples (leading dim of every batch leaf).

    N must be divisible by num_minibatches × grad_accum. Metrics are means over all minibatches, plus
    `first_*` of the very first minibatch (where the policy still equals the rollout policy, so its ratio is 1)
    and, when the buffer carries them, rollout statistics (`rollout_reward`, `rollout_accuracy`).
    `schedule` (the optimizer's, counted in optimizer steps) only adds the `lr` metric.
    """
    grad_fn = jax.value_and_grad(lambda p, mb: ppo_minibatch_loss(p, mdef, mb, prompt_len, hp), has_aux=True)
    m, k = hp.num_minibatches, hp.grad_accum

    def minibatch_step(carry, mb):
        params, opt_state = carry                                               # mb leaves [k, micro, ...]

        def micro(acc, x):
            (loss, metrics), grads = grad_fn(params, x)
            return jax.tree.map(jnp.add, acc, (loss, metrics, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: (lambda r: (r[0][0], r[0][1], r[1]))(grad_fn(params, jax.tree.map(lambda x: x[0], mb)))))
        (loss, metrics, grads), _ = jax.lax.scan(micro, zeros, mb)
        loss, metrics, grads = jax.tree.map(lambda v: v / k, (loss, metrics, grads))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        return (params, opt_state), metrics

    def update(state: TrainState, batch: dict, rng: jax.Array, extra: Any = None):
        stats = {}
        if "rewards" in batch:
            stats = {"rollout_reward": batch["rewards"].mean(),
                     "rollout_accuracy": (batch["rewards"] == 1.0).mean(),
                     "rollout_episodes": jnp.sum(jnp.maximum(batch["terminated"], batch["truncated"])),
                     "rollout_answer_tokens": batch["attention_mask"][:, prompt_len:].sum(-1).mean()}
        batch = {key: batch[key] for key in _UPDATE_KEYS}
        n = batch["input_ids"].shape[0]
        if n % (m * k):
            raise ValueError(f"PPO buffer of {n} samples is not divisible by ppo.num_minibatches × "
                             f"ppo.minibatch_grad_accum = {m} × {k}")

        def epoch(carry, key):
            perm = jax.random.permutation(key, n) if hp.shuffle else jnp.arange(n)
            shuffled = jax.tree.map(lambda x: x[perm].reshape(m, k, n // (m * k), *x.shape[1:]), batch)
            return jax.lax.scan(minibatch_step, carry, shuffled)

        (params, opt_state), per = jax.lax.scan(epoch, (state.params, state.opt_state),
                                                jax.random.split(rng, hp.epochs))   # per: leaves [E, M]
        metrics = {key: v.mean() for key, v in per.items()}
        for key in ("ratio_mean", "clip_fraction", "approx_kl", "policy_loss"):
            metrics[f"first_{key}"] = per[key][0, 0]
        metrics["param_norm"] = optax.global_norm(params)
        metrics.update(stats)
        if schedule is not None:
            metrics["lr"] = schedule(state.step * hp.optimizer_steps_per_update)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                          ema_params=state.ema_params), metrics

    return update


def rollout_advantages(rewards: np.ndarray, values: np.ndarray, terminated: np.ndarray, truncated: np.ndarray, *,
                       gamma: float, lam: float, cut_at_truncation: bool = False, normalize: bool = True,
                       valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Host-side GAE over one buffer: rewards/terminated/truncated [T, E], values [T+1, E] (bootstrap last) →
    (advantages [T, E] normalised over the buffer's valid samples, returns [T, E] = raw A + V)."""
    a, r = adv_lib.gae(rewards, values, terminated, truncated, gamma=gamma, lam=lam,
                       cut_at_truncation=cut_at_truncation)
    a, r = np.asarray(a), np.asarray(r)
    if normalize:
        sel = np.ones_like(a, bool) if valid is None else valid.astype(bool)
        mu, sd = a[sel].mean(), a[sel].std(ddof=1) if sel.sum() > 1 else 0.0
        a = (a - mu) / (sd + 1e-5)
    return a.astype(np.float32), r.astype(np.float32)


__all__ = ["PolicyWithValue", "vlm_config", "str_keys", "policy_def", "score", "make_score_fn", "PPOHParams",
           "ppo_minibatch_loss", "make_ppo_update", "rollout_advantages"]
