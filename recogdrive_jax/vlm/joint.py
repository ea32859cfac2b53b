"""Joint VLM + planner training without the hidden-state cache (the `il_joint` stage's library; issue 18).

Two heads (`config.joint.head`):

* `dit` — `VLMPlanner`: InternVL over the upstream driving prompt (front-camera tiles + history + command, the
  prompt `cache` builds, `vlm/hidden_states.PromptBuilder`), its final-norm hidden states of the prompt tokens (pads
  zeroed, as a compact cache reads) are the planner's `vl_states`; `config.planner` (the DiT, or kind='mlp') is
  trained on them and its loss backpropagates into the LLM. Optional auxiliary LM loss on the driving QA
  (`joint.lm_loss_weight`): the row carries prompt + trajectory answer, the causal LM's prompt states are unchanged
  by the answer after them, and next-token CE is taken on the answer.
* `opentrackvla` — `models/opentrackvla.OpenTrackVLA` (seed 002): history + current front-camera frames (rendered
  from the world's past states), coarse/fine tokens, TVI, [ACT], MLP head with masked MSE x beta_nav.

What trains: `joint.train_llm` 'all' | 'last_n' (the last `joint.last_n` decoder layers + final norm; embeddings and
lm_head frozen) | 'none'; `joint.train_vision`, `joint.train_projector`; the planner/head, TVI and [ACT] always.
Frozen parts get neither updates nor weight decay (`config.optim.freeze` patterns; a per-layer update mask for
'last_n', since the decoder layers are one stacked parameter).
"""
from __future__ import annotations

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recogdrive_jax import config_types
from recogdrive_jax.configs import ConfigError
from recogdrive_jax.convert import internvl as conv
from recogdrive_jax.data import driving_prompt as dp
from recogdrive_jax.data import planner_data
from recogdrive_jax.data.tiling import load_image
from recogdrive_jax.eval import planner_common
from recogdrive_jax.models import internvl as iv
from recogdrive_jax.models.opentrackvla import OpenTrackVLA
from recogdrive_jax.models.planner import PlannerConfig, build_planner, normalize_pose
from recogdrive_jax.sim import render, world
from recogdrive_jax.train import checkpoint as ckpt_lib
from recogdrive_jax.train.module_def import ModuleDef
from recogdrive_jax.train.optim import freeze_labels, path_str
from recogdrive_jax.train.state import make_train_step
from recogdrive_jax.vlm import hf_export, lm_loss
from recogdrive_jax.vlm.checkpoint import DTYPES, JOINT_VLM_DIR
from recogdrive_jax.vlm.hidden_states import PromptBuilder, collate, front_image

HEADS, TRAIN_LLM = config_types.JOINT_HEADS, config_types.JOINT_TRAIN_LLM
LAYERS = "vlm/language_model/model/layers/"
PLANNER_KEY = {"dit": "planner", "opentrackvla": "head"}  # the head's subtree in the joint params


def validate(config) -> config_types.RunConfig:
    """The typed config (`joint` / `prompt`: config_types.JointConfig / PromptConfig; keys il_joint does not honour
    are rejected there) + the check that needs the world; errors name the key."""
    for block in ("model", "joint", "prompt", "planner", "data", "eval"):
        if block not in config:
            raise ConfigError(f"config.{block}: missing (start from stage_configs.il_joint_stage_config())")
    config = config_types.typed(config)
    h = config.joint.history_frames
    if h >= world.NUM_HISTORY:
        raise ConfigError(f"config.joint.history_frames: must be an int in [0, {world.NUM_HISTORY - 1}] (the world "
                          f"keeps {world.NUM_HISTORY - 1} past poses), got {h!r}")
    return config


def head_config(config, vlm_cfg, train_scenes) -> PlannerConfig:
    """config.planner with vl_dim = the LLM width; the OpenTrackVLA head is the mlp head with alpha_xy from the data."""
    d = vlm_cfg.llm_config.hidden_size
    block = config.planner.to_dict()
    if not block.get("vl_dim"):
        block["vl_dim"] = d  # 0 / absent = the VLM's width
    pcfg = planner_common.planner_config(types.SimpleNamespace(planner=block))
    if pcfg.vl_dim != d:
        raise ConfigError(f"config.planner.vl_dim={pcfg.vl_dim}: must equal the VLM's hidden size {d} (the planner "
                          "reads its hidden states)")
    if config.joint.head == "opentrackvla":
        alpha = float(config.joint.alpha_xy)
        if alpha == -1:
            alpha = alpha_from_data(train_scenes.expert)
        pcfg = pcfg.replace(kind="mlp", alpha_xy=alpha)
    return pcfg


def alpha_from_data(expert: np.ndarray, q: float = 95.0) -> float:
    """The seed's alpha_xy: the q-th percentile of |x|, |y| of the training futures, here in the mlp head's
    normalised pose space (tanh x alpha covers all but the top 5 %)."""
    n = np.abs(np.asarray(normalize_pose(jnp.asarray(expert, jnp.float32)))[..., :2])
    return float(max(np.percentile(n, q), 1e-3))


# ----------------------------------------------------------------------------------------------------- model

class VLMPlanner(nnx.Module):
    """InternVL + planner; params {'vlm': InternVL's tree, 'planner': the planner's tree (what `il` writes)}."""

    def __init__(self, vlm_cfg, pcfg: PlannerConfig, *, dtype, rngs: nnx.Rngs):
        self.vlm = iv.InternVLModel(vlm_cfg, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.planner = build_planner(pcfg, rngs)

    def hidden(self, batch) -> jax.Array:
        b, m = batch["image_flags"].shape
        pv = batch["pixel_values"].reshape(b * m, *batch["pixel_values"].shape[2:]).astype(self.vlm.dtype)
        out = self.vlm(batch["input_ids"], batch["attention_mask"], pv, batch["image_flags"].reshape(-1),
                       compute_logits=False)
        return out["hidden_states"]  # [B, T, D]

    def cond(self, batch, hidden=None) -> dict:
        """The planner's cond: prompt states [B, Tv, D] fp32 with pads (and any answer tokens) zeroed."""
        hidden = self.hidden(batch) if hidden is None else hidden
        vm = batch["vl_mask"]
        vl = hidden[:, :vm.shape[1]].astype(jnp.float32) * vm[..., None].astype(jnp.float32)
        return {"vl_states": vl, "vl_mask": vm, "status": batch["status"], "history": batch["history"]}

    def sample(self, batch, rng, *, deterministic: bool = True):
        return self.planner.sample(self.cond(batch), rng, deterministic=deterministic)


def module_def(config, vlm_cfg, pcfg: PlannerConfig) -> ModuleDef:
    dtype = DTYPES[config.model.dtype]
    j = config.joint
    if j.head == "opentrackvla":
        return ModuleDef(lambda rngs: OpenTrackVLA(vlm_cfg, pcfg, history_frames=int(j.history_frames),
                                                   coarse_tokens=int(j.coarse_tokens), fine_tokens=int(j.fine_tokens),
                                                   dtype=dtype, rngs=rngs))
    return ModuleDef(lambda rngs: VLMPlanner(vlm_cfg, pcfg, dtype=dtype, rngs=rngs))


def detach_frozen(params, frozen: tuple[str, ...]):
    """`params` with the leaves matching the `frozen` regexes (config.optim.freeze) under stop_gradient: no weight
    gradient is formed for them and no part of the graph that only they feed is differentiated — with the ViT frozen
    its forward keeps no activations for a backward pass (the optimizer masks them as well)."""
    if not frozen:
        return params
    labels = freeze_labels(params, frozen)
    return jax.tree.map(lambda lab, x: jax.lax.stop_gradient(x) if lab == "frozen" else x, labels, params)


def make_loss_fn(config, mdef: ModuleDef, frozen: tuple[str, ...] = ()):
    """(params, batch, rng) -> (loss, metrics): the planner's (or head's) loss + lm_loss_weight x answer CE.
    `frozen`: the run's freeze patterns (config.optim.freeze + freeze_patterns), detached (`detach_frozen`)."""
    w, chunk = float(config.joint.lm_loss_weight), int(config.model.loss_chunk)

    def loss_fn(params, batch, rng):
        model = mdef.bind(detach_frozen(params, tuple(frozen)))
        if isinstance(model, OpenTrackVLA):
            return model.loss(batch, rng)
        hidden = model.hidden(batch)
        loss, metrics = model.planner.loss({"cond": model.cond(batch, hidden), "future": batch["future"]}, rng)
        metrics = dict(metrics, planner_loss=loss)
        if w > 0:
            nll, correct, count = lm_loss.chunked_ce(model.vlm.language_model, hidden, batch["labels"], chunk)
            n = jnp.maximum(count, 1).astype(jnp.float32)
            metrics.update(lm_loss=nll / n, lm_token_acc=correct / n)
            loss = loss + w * nll / n
        return loss, metrics
    return loss_fn


# ------------------------------------------------------------------------------------------ trainable parts

def freeze_patterns(config, vlm_cfg) -> tuple[str, ...]:
    """Regexes (config.optim.freeze) of the VLM parts that do not train."""
    j, pats = config.joint, []
    if not j.train_vision:
        pats.append(r"^vlm/vision_model/")
    if not j.train_projector:
        pats.append(r"^vlm/mlp1/")
    if j.train_llm == "none":
        pats.append(r"^vlm/language_model/")
    else:
        if j.train_llm == "last_n":
            pats.append(r"^vlm/language_model/model/embed_tokens/")
        if j.train_llm == "last_n" or float(j.lm_loss_weight) == 0:  # no loss reaches an untied lm_head
            pats.append(r"^vlm/language_model/lm_head/")
    return tuple(pats)


def mask_layers(tree, num_layers: int, last_n: int):
    """Zeroes the leading (layer) slices < num_layers - last_n of the stacked decoder-layer leaves."""
    def one(path, x):
        if not path_str(path).startswith(LAYERS):
            return x
        keep = (jnp.arange(x.shape[0]) >= num_layers - last_n).astype(x.dtype)
        return x * keep.reshape((-1,) + (1,) * (x.ndim - 1))
    return jax.tree_util.tree_map_with_path(one, tree)


def layer_masked(tx: optax.GradientTransformation, num_layers: int, last_n: int) -> optax.GradientTransformation:
    """`tx` with the frozen layers' gradients and updates zeroed (same state structure as `tx`, so checkpoints and
    the loop's state shardings are unchanged)."""
    def update(grads, state, params=None):
        updates, state = tx.update(mask_layers(grads, num_layers, last_n), state, params)
        return mask_layers(updates, num_layers, last_n), state
    return optax.GradientTransformation(tx.init, update)


def make_update(config, loss_fn, vlm_cfg, ema_decay: float, schedule):
    """The loop's `make_update`: the generic step, with the 'last_n' layer mask when asked."""
    j = config.joint

    def build(tx):
        if j.train_llm == "last_n":
            n = vlm_cfg.llm_config.num_hidden_layers
            if j.last_n > n:
                raise ConfigError(f"config.joint.last_n={j.last_n}: the LLM has {n} layers")
            tx = layer_masked(tx, n, int(j.last_n))
        step = make_train_step(loss_fn, tx, grad_accum=int(config.optim.grad_accum), ema_decay=ema_decay,
                               schedule=schedule)
        return lambda state, batch, rng, extra: step(state, batch, rng)
    return build


# ------------------------------------------------------------------------------------------------- inputs

class JointInputs:
    """Scenes -> statically shaped joint batches (rendered on the host; a scene's sample is kept once made while
    the memo stays under `joint.memo_mb`). Shapes are fixed from all splits' longest prompt at construction."""

    def __init__(self, config, vlm_cfg, tok, splits):
        j = config.joint
        self.head, self.tok, self.cfg = j.head, tok, vlm_cfg
        self.lm = float(j.lm_loss_weight) > 0
        self.history_frames = int(j.history_frames)
        self.builder = PromptBuilder(vlm_cfg, tok, config.prompt, ego_status=config.prompt.ego_status_text == "on")
        self.memo, self.memo_bytes, self.memo_cap = {}, 0, float(j.memo_mb) * 2 ** 20
        self.prefetch = int(j.prefetch)
        probe = world.index_scene(splits[0].scenes, 0)
        if self.head == "dit":
            self.m_pad = len(self.builder.tiles(front_image(probe)))
        lens = [(len(self._text_ids(world.index_scene(s.scenes, i))), len(self._answer_ids(s, i)))
                for s in splits for i in range(len(s))]
        self.t_vl = max(a for a, _ in lens)  # = the compact cache's max_len over the same scenes
        self.t_pad = self.t_vl + (max(b for _, b in lens) if self.lm else 0)

    def _text_ids(self, scene) -> np.ndarray:
        if self.head == "dit":
            return self.builder.ids(scene, self.m_pad)
        status = scene.status if self.builder.ego_status else None
        text = dp.driving_question(scene.history, dp.scene_command(scene), status).replace("<image>\n", "")
        return np.asarray(self.tok(text, add_special_tokens=False).input_ids, np.int32)

    def _answer_ids(self, split, i) -> np.ndarray:
        if not self.lm:
            return np.zeros((0,), np.int32)
        text = dp.trajectory_answer(split.scenes.expert[i]) + "<|im_end|>"
        return np.asarray(self.tok(text, add_special_tokens=False).input_ids, np.int32)

    def _sample(self, split, i: int):
        key = (split.name, int(i))
        if key in self.memo:
            return self.memo[key]
        scene = world.index_scene(split.scenes, int(i))
        ids = self._text_ids(scene)
        if self.head == "dit":
            out = (ids, self.builder.tiles(front_image(scene)), self._answer_ids(split, i))
        else:
            size = self.cfg.force_image_size
            frames = render.render_frames(scene, self.history_frames)
            out = (ids, np.concatenate([load_image(f, image_size=size, max_num=1, min_num=1, use_thumbnail=False)
                                        for f in frames]), None)
        nbytes = sum(a.nbytes for a in out if a is not None)
        if self.memo_bytes + nbytes <= self.memo_cap:
            self.memo[key], self.memo_bytes = out, self.memo_bytes + nbytes
        return out

    def batch(self, split, idx) -> dict:
        idx = np.asarray(idx)
        samples = [self._sample(split, i) for i in idx]
        out = {"status": split.scenes.status[idx], "history": split.scenes.history[idx],
               "future": split.scenes.expert[idx], "index": idx.astype(np.int32)}
        if self.head == "opentrackvla":
            ids = np.zeros((len(idx), self.t_vl), np.int32)
            mask = np.zeros((len(idx), self.t_vl), np.int32)
            for r, (t, _, _) in enumerate(samples):
                ids[r, :len(t)], mask[r, :len(t)] = t, 1
            return {**out, "text_ids": ids, "text_mask": mask, "frames": np.stack([f for _, f, _ in samples])}
        rows = [(np.concatenate([t, a]), pv) for t, pv, a in samples]
        vb = collate(rows, self.t_pad, self.m_pad, self.cfg.force_image_size, self.tok.pad_token_id, len(idx))
        vl_mask = np.zeros((len(idx), self.t_vl), bool)
        for r, (t, _, _) in enumerate(samples):
            vl_mask[r, :len(t)] = True
        out.update(vb, vl_mask=vl_mask)
        if self.lm:
            labels = np.full((len(idx), self.t_pad), -100, np.int32)
            for r, (t, _, a) in enumerate(samples):
                labels[r, len(t):len(t) + len(a)] = a
            out["labels"] = labels
        return out

    def train_iterator(self, split, local_batch_size: int, seed: int):
        """Shuffled, checkpointable (Grain) batches, as the `il` stage's; at most `joint.prefetch` made ahead."""
        return planner_data.index_batches(split, local_batch_size, seed, lambda idx: self.batch(split, idx),
                                          prefetch=self.prefetch)


def make_sampler(mdef: ModuleDef):
    """jit(params, batch, rng) -> plans [B, 8, 3] (deterministic protocol: DDIM eta 0 / the regression head)."""
    @jax.jit
    def sample(params, batch, rng):
        return mdef.bind(params).sample(batch, rng, deterministic=True)
    return sample


def plan_split(sampler, params, inputs: JointInputs, split, rng, batch_size: int) -> np.ndarray:
    """Plans for every scene of `split` in fixed-size batches (the last one padded with its final scene), as
    `eval/planner_eval.plan_split` does for cached states."""
    n = len(split)
    bs = min(batch_size, n)
    outs = []
    for start in range(0, n, bs):
        idx = np.arange(start, min(start + bs, n))
        pad = np.concatenate([idx, np.full(bs - len(idx), idx[-1])])
        traj = sampler(params, jax.tree.map(jnp.asarray, inputs.batch(split, pad)), jax.random.fold_in(rng, start))
        outs.append(np.asarray(jax.device_get(traj))[: len(idx)])
    return np.concatenate(outs)


PLANNER_DIR = "planner"  # WORKDIR/planner: the dit head's planner tree (what `eval` / `rl` load, as an il workdir's)


def export_parts(state, config, vlm_cfg, tok, workdir: str) -> dict:
    """At the end of a run: WORKDIR/vlm (a `convert internvl --from-hf` layout + tokenizer: what `cache`/`sft` start
    from, also via `model.init_from=WORKDIR`), WORKDIR/planner (dit head: a bare planner tree for `eval.checkpoint`
    / rl's `train.init_from`) and WORKDIR/hf_export (`export.at_end`, as an sft run). EMA params when kept."""
    params = state.ema_params if state.ema_params is not None else state.params
    out = {"vlm": os.path.join(workdir, JOINT_VLM_DIR)}
    conv.save_params(params["vlm"], vlm_cfg, out["vlm"])
    if jax.process_index() == 0:
        tok.save_pretrained(out["vlm"])
    if config.joint.head == "dit":
        out["planner"] = os.path.join(workdir, PLANNER_DIR)
        ckpt_lib.save_params(out["planner"], params["planner"])
    if config.export.at_end:
        out["hf_export"] = os.path.join(workdir, "hf_export")
        hf_export.export_hf(params["vlm"], vlm_cfg, tok, out["hf_export"], config.export)
    return out
