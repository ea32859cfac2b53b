"""Stage `ppo`: VLM-PPO on the V-IRL navigation env (spec/virl.md §2).

Each loop step is one update: the rollout iterator steps `ppo.num_envs` envs per process for `ppo.num_steps`
steps with the current params (KV-cache sampling at T=0.2 → scoring pass for logp_old / V_old →
`env.step(text)`), computes GAE on the host and hands the fixed-shape buffer to the jitted `rl.ppo` update,
which the generic loop shards (ZeRO-1), checkpoints and resumes. The iterator state (episode seeds + the actions
of the episodes in flight + the sampling counter) is saved with each checkpoint and replayed on resume, so a
resumed run continues the very same episodes.

The policy is an InternVL model + value head. `config.model.init_from` names the trunk exactly as for the `sft`
stage (an HF directory, a `convert internvl` output, or an `sft` run workdir such as the V-IRL SFT baseline of
configs/virl/sft.py); the value head starts fresh. `config.train.init_from` instead continues a whole policy
(another `ppo` run). The SFT baseline itself is the shared `sft` stage on the expert answers
(envs/sft_data.py). After training the policy is evaluated on `eval_nav.splits` (stages/eval_nav.py).
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from recogdrive_jax import configs
from recogdrive_jax.envs import navigation as nav
from recogdrive_jax.rl import ppo as ppo_lib
from recogdrive_jax.train import loop, optim


# ----------------------------------------------------------------------------------------------- shared setup

def run_stage(path: str) -> str | None:
    """The `stage` a run workdir was written by (its config.json), None for anything else."""
    f = os.path.join(path, "config.json")
    if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(f):
        try:
            return json.load(open(f)).get("stage")
        except (OSError, ValueError):
            return None
    return None


class NavModel:
    """Which InternVL the policy is and where its trunk weights are, plus the tokenizer.

    `source` = a VLM checkpoint (see `stages.sft.resolve_model`) or a `ppo` run workdir (whole policy);
    '' = random init of `config.model.variant` (the tiny model then trains its own small tokenizer on
    navigation text, saved to WORKDIR/tokenizer)."""

    def __init__(self, config, workdir: str, source: str = ""):
        from recogdrive_jax.envs.sft_data import tokenizer_corpus
        from recogdrive_jax.stages import sft
        self.source = os.path.abspath(source) if source else ""
        self.policy_run = bool(source) and run_stage(self.source) == "ppo"
        model_cfg = config.model.to_dict()
        if source:
            model_cfg["init_from"] = self.source
        resolved = sft.resolve_model(ml_collections.ConfigDict(model_cfg), None, workdir)
        self.cfg = resolved.cfg
        self.vlm_params_path = None if self.policy_run else resolved.params_path
        self.tokenizer = sft.load_or_build_tokenizer(resolved, workdir, corpus=lambda: tokenizer_corpus(config.env))

    def save(self, workdir: str) -> None:
        """WORKDIR/recogdrive_internvl.json + tokenizer/: a ppo workdir describes its own model."""
        from recogdrive_jax.stages import sft
        sft.save_model_files(self.cfg, self.tokenizer, workdir)


class NavPolicy:
    """Everything both stages need to run the policy: module definitions (policy, bare VLM), chat encoder."""

    def __init__(self, config, cfg, tokenizer, answer_len: int | None = None):
        from recogdrive_jax.stages import sft
        self.cfg = cfg
        self.mdef, _ = ppo_lib.policy_def(config.model, cfg)
        self.vlm_mdef = sft.module_def(cfg, str(config.model.dtype))
        p = config.prompt
        self.layout = ppo_lib.PromptLayout(
            prompt_len=int(p.max_prompt_len), answer_len=int(answer_len or p.max_new_tokens),
            max_tiles=int(p.max_tiles), system_message=nav_system_message(config.model))
        self.encoder = ppo_lib.ChatEncoder(tokenizer, cfg, self.layout, weight_mode=str(p.weight_mode),
                                           thought_coef=float(p.thought_coef), action_coef=float(p.action_coef))


def nav_system_message(model_cfg):
    from recogdrive_jax.data import template as tmpl
    return tmpl.INTERNVL2_5_SYSTEM if bool(model_cfg.get("system_message", True)) else None


def load_vlm_params(model: NavModel, policy: NavPolicy, shardings):
    """The VLM subtree from `model.source` (a VLM checkpoint, or the `vlm` part of a ppo run)."""
    if model.policy_run:
        abstract = ppo_lib.str_keys(policy.mdef.abstract_params())
        any_sh = jax.tree.leaves(shardings)[0]
        full_sh = {"vlm": shardings, "value_head": jax.tree.map(lambda _: any_sh, abstract["value_head"])}
        return loop.load_init_params(model.source, abstract, full_sh, prefer_ema=False)["vlm"]
    if model.vlm_params_path is None:
        raise configs.ConfigError(f"{model.source or 'the model'} has no weights to load")
    abstract = ppo_lib.str_keys(policy.vlm_mdef.abstract_params())
    return loop.load_init_params(model.vlm_params_path, abstract, shardings, prefer_ema=False)


def validate(config) -> None:
    configs.validate_common(config)
    req = configs._require
    p = config.prompt
    req(p.weight_mode in ("key", "reference_last5"), "prompt.weight_mode",
        f"unknown {p.weight_mode!r}; allowed: ['key', 'reference_last5']")
    for key in ("max_prompt_len", "max_new_tokens", "max_tiles"):
        req(int(p[key]) >= 1, f"prompt.{key}", f"must be >= 1, got {p[key]!r}")
    req(config.env.get("train_split", "in_distribution") in nav.SPLITS, "env.train_split",
        f"unknown split; allowed: {list(nav.SPLITS)}")
    req(not (config.model.get("init_from") and config.train.get("init_from")), "model.init_from",
        "set either config.model.init_from (a VLM: HF dir / converted dir / sft run) or config.train.init_from "
        "(a whole ppo policy), not both")
    c = config.ppo
    per_update = int(c.num_envs) * int(c.num_steps) * jax.process_count()
    req(int(config.train.batch_size) == per_update, "train.batch_size",
        f"must equal ppo.num_envs × ppo.num_steps × processes = {per_update} (one rollout buffer), got "
        f"{config.train.batch_size}")
    k = int(c.num_minibatches) * int(config.optim.grad_accum)
    req(per_update % k == 0, "ppo.num_minibatches",
        f"num_minibatches × optim.grad_accum = {k} must divide the {per_update}-sample buffer")
    req(int(c.epochs) >= 1, "ppo.epochs", f"must be >= 1, got {c.epochs!r}")
    req(float(c.temperature) > 0, "ppo.temperature", f"must be > 0 (sampling), got {c.temperature!r}")
    want = int(c.epochs) * int(c.num_minibatches)
    req(int(config.optim.get("optimizer_steps_per_step", 1)) == want, "optim.optimizer_steps_per_step",
        f"must be ppo.epochs × ppo.num_minibatches = {want} (the LR steps once per update), got "
        f"{config.optim.get('optimizer_steps_per_step', 1)}")


# --------------------------------------------------------------------------------------------------- rollouts

class RolloutIterator:
    """`next()` = one PPO rollout buffer from this process's envs with the current params (set via `set_params`).

    Batch leaves are [T·E, ...] (time-major): model inputs + weights, old_logp/old_values from the scoring pass,
    normalised advantages and returns from host GAE, rewards/done flags for logging.
    """

    def __init__(self, config, policy: NavPolicy, mesh):
        c = config.ppo
        self.policy, self.mesh = policy, mesh
        self.num_envs, self.num_steps = int(c.num_envs), int(c.num_steps)
        self.gamma, self.lam, self.cut = float(c.gamma), float(c.lam), bool(c.cut_at_truncation)
        self.seed = int(c.env_seed) + jax.process_index() * self.num_envs
        split = str(config.env.get("train_split", "in_distribution"))
        self.envs = [nav.make_env_from_config(split, config.env, seed=self.seed + e) for e in range(self.num_envs)]
        self.generate = ppo_lib.Generator(policy.vlm_mdef, policy.encoder, temperature=float(c.temperature),
                                          top_p=float(c.top_p), mesh=self._mesh_if_divisible())
        self.score = ppo_lib.make_score_fn(policy.mdef, policy.layout.prompt_len, float(c.temperature))
        self.rng = jax.random.key(int(config.seed) * 1_000_003 + jax.process_index())
        self.params = None
        self.counter = 0                                  # generations so far (sampling-rng position)
        self.episodes = [0] * self.num_envs               # episode number per env (its reset seed)
        self.actions: list[list[str]] = [[] for _ in range(self.num_envs)]
        self.obs = [self._reset(e) for e in range(self.num_envs)]

    def _mesh_if_divisible(self):
        if self.mesh is None:
            return None
        n = int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp")])) // jax.process_count()
        return self.mesh if self.num_envs % max(n, 1) == 0 else None

    def _global(self, batch):
        m = self._mesh_if_divisible()
        if m is None:
            return batch
        from recogdrive_jax.parallel import sharding as sh
        return sh.make_global_batch(m, batch)

    def _reset(self, e: int) -> dict:
        self.actions[e] = []
        obs, _ = self.envs[e].reset(seed=(self.seed + e) * 1_000_003 + self.episodes[e])
        return obs

    def set_params(self, params) -> None:
        self.params = params

    def __iter__(self):
        return self

    def _score(self, prompts: dict, answers: np.ndarray, amask: np.ndarray, weights: np.ndarray) -> dict:
        batch = dict(ppo_lib.join_sequences(prompts, answers, amask), weights=weights)
        out = self.score(self.params, self._global(batch))
        return {k: ppo_lib.local_rows(v) for k, v in out.items()}

    def __next__(self) -> dict:
        if self.params is None:
            raise RuntimeError("RolloutIterator: set_params() before next()")
        enc, a_len = self.policy.encoder, self.policy.layout.answer_len
        rows, rewards, term, trunc = [], [], [], []
        values = []
        from recogdrive_jax.train.metrics import track
        for _ in track(range(self.num_steps), desc="ppo rollout", unit="steps"):  # each: num_envs env steps
            prompts = ppo_lib.stack([enc.encode_prompt(o) for o in self.obs])
            out = self.generate(self.params["vlm"], prompts, jax.random.fold_in(self.rng, self.counter))
            self.counter += 1
            decoded = [enc.decode_answer(o) for o in out]
            amask = np.stack([d[2] for d in decoded])
            weights = np.stack([d[1] for d in decoded])
            scored = self._score(prompts, out, amask, weights)
            rows.append(dict(ppo_lib.join_sequences(prompts, out, amask), weights=weights,
                             old_logp=scored["logp"].astype(np.float32),
                             old_values=scored["values"].astype(np.float32)))
            values.append(scored["values"])
            r_t, te_t, tr_t = [], [], []
            for e, (text, _, _) in enumerate(decoded):
                obs, r, te, tr, _ = self.envs[e].step(text)
                self.actions[e].append(text)
                if te or tr:
                    self.episodes[e] += 1
                    obs = self._reset(e)
                self.obs[e] = obs
                r_t.append(r), te_t.append(te), tr_t.append(tr)
            rewards.append(r_t), term.append(te_t), trunc.append(tr_t)
        prompts = ppo_lib.stack([enc.encode_prompt(o) for o in self.obs])
        empty = np.full((self.num_envs, a_len), enc.pad_id, np.int32)
        nxt = self._score(prompts, empty, np.zeros_like(empty), np.zeros(empty.shape, np.float32))["values"]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}     # [T, E, ...]
        rewards, term, trunc = (np.asarray(x, np.float32) for x in (rewards, term, trunc))
        valid = np.isfinite(batch["old_logp"])
        adv, ret = ppo_lib.rollout_advantages(rewards, np.concatenate([np.stack(values), nxt[None]]), term, trunc,
                                              gamma=self.gamma, lam=self.lam, cut_at_truncation=self.cut,
                                              valid=valid)
        batch.update(advantages=adv, returns=ret, rewards=rewards, terminated=term, truncated=trunc,
                     sample_mask=valid.astype(np.float32))
        return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}

    # ---- exact resume: replay the episodes in flight ----
    def get_state(self) -> dict:
        return {"counter": self.counter, "episodes": list(self.episodes), "actions": [list(a) for a in self.actions]}

    def set_state(self, state: dict) -> None:
        if len(state.get("episodes", [])) != self.num_envs:
            raise ValueError(f"rollout state holds {len(state.get('episodes', []))} envs, config.ppo.num_envs is "
                             f"{self.num_envs}")
        self.counter, self.episodes = int(state["counter"]), [int(x) for x in state["episodes"]]
        for e in range(self.num_envs):
            obs = self._reset(e)
            for text in state["actions"][e]:
                obs, *_ = self.envs[e].step(text)
            self.actions[e] = list(state["actions"][e])
            self.obs[e] = obs


# ---------------------------------------------------------------------------------------------------- the run

def run(config, workdir: str) -> dict:
    from recogdrive_jax.parallel import mesh as mesh_lib
    from recogdrive_jax.stages import eval_nav
    validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh_lib.make_mesh(config.get("mesh"))
    model = NavModel(config, workdir, config.model.get("init_from") or config.train.get("init_from") or "")
    model.save(workdir)
    policy = NavPolicy(config, model.cfg, model.tokenizer)
    prompt_len = policy.layout.prompt_len
    logical = ppo_lib.str_keys(policy.mdef.logical)

    def init_params(rng):
        return ppo_lib.str_keys(policy.mdef.init(rng))

    def trunk_and_fresh_head(abstract, shardings, rng):
        """A pretrained VLM trunk (`config.model.init_from`) + a freshly initialised value head."""
        head = jax.jit(lambda r: init_params(r)["value_head"], out_shardings=shardings["value_head"])(rng)
        return {"vlm": load_vlm_params(model, policy, shardings["vlm"]), "value_head": head}

    def eval_fn(state, step):
        if not eval_nav.splits_of(config.eval_nav):
            return {}
        res = eval_nav.evaluate(state.params["vlm"], config, model.cfg, model.tokenizer,
                                os.path.join(workdir, "eval_nav"), mesh=mesh)
        return eval_nav.flat_metrics(res)

    hp = ppo_lib.PPOHParams.from_config(config.ppo, int(config.optim.grad_accum))
    rollouts = RolloutIterator(config, policy, mesh)
    schedule = optim.make_schedule(config.optim, int(config.train.num_steps))
    task = loop.Task(name="ppo", init_params=init_params, loss_fn=None, logical=logical, eval_fn=eval_fn,
                     train_iter=rollouts,
                     make_update=lambda tx: ppo_lib.make_ppo_update(policy.mdef, tx, hp, prompt_len,
                                                                    schedule=schedule),
                     on_state=lambda state: rollouts.set_params(state.params),
                     load_init=trunk_and_fresh_head if config.model.get("init_from") else None)
    _, final = loop.train(config, workdir, task, mesh=mesh)
    if jax.process_index() == 0 and final:
        print(f"[{task.name}] " + "  ".join(f"{k}={v:.3f}" for k, v in sorted(final.items())
                                             if k.endswith(("success_rate", "per_step_accuracy"))), flush=True)
    return final
