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


import jax
import numpy as np

from recogdrive_jax import config_types, configs, storage
from recogdrive_jax.envs import navigation as nav
from recogdrive_jax.parallel import runtime as runtime_lib
from recogdrive_jax.rl import ppo as ppo_lib
from recogdrive_jax.train import loop, optim
from recogdrive_jax.train.metrics import track
from recogdrive_jax.vlm import chat, nav_eval
from recogdrive_jax.vlm.generate import Generator
from recogdrive_jax.vlm.nav_policy import NavModel, NavPolicy, load_vlm_params


def validate(config) -> config_types.RunConfig:
    """The typed config (config_types.PPOConfig, NavModelConfig, ...) + the checks spanning blocks."""
    config = configs.validate_common(config)
    req = configs._require
    p = config.prompt
    req(p.weight_mode in ("key", "reference_last5"), "prompt.weight_mode",
        f"unknown {p.weight_mode!r}; allowed: ['key', 'reference_last5']")
    for key in ("max_prompt_len", "max_new_tokens", "max_tiles"):
        req(int(p[key]) >= 1, f"prompt.{key}", f"must be >= 1, got {p[key]!r}")
    req(config.env.train_split in nav.SPLITS, "env.train_split",
        f"unknown split; allowed: {list(nav.SPLITS)}")
    req(not (config.model.init_from and config.train.init_from), "model.init_from",
        "set either config.model.init_from (a VLM: HF dir / converted dir / sft run) or config.train.init_from "
        "(a whole ppo policy), not both")
    c = config.ppo
    per_update = int(c.num_envs) * int(c.num_steps) * jax.process_count()
    req(int(config.train.batch_size) == per_update, "train.batch_size",
        f"must equal ppo.num_envs × ppo.num_steps × processes = {per_update} (one rollout buffer), got "
        f"{config.train.batch_size}")
    k = c.num_minibatches * c.minibatch_grad_accum
    req(per_update % k == 0, "ppo.num_minibatches",
        f"num_minibatches × ppo.minibatch_grad_accum = {k} must divide the {per_update}-sample buffer")
    want = c.epochs * c.num_minibatches
    req(config.optim.optimizer_steps_per_step == want, "optim.optimizer_steps_per_step",
        f"must be ppo.epochs × ppo.num_minibatches = {want} (the LR steps once per update), got "
        f"{config.optim.optimizer_steps_per_step}")
    return config


# --------------------------------------------------------------------------------------------------- rollouts

class RolloutIterator:
    """`next()` = one PPO rollout buffer from this process's envs with the current params (set via `set_params`).

    Batch leaves are [T·E, ...] (time-major): model inputs + weights, old_logp/old_values from the scoring pass,
    normalised advantages and returns from host GAE, rewards/done flags for logging.
    """

    def __init__(self, config, policy: NavPolicy, rt: runtime_lib.Runtime | None):
        c = config.ppo
        self.policy, self.rt = policy, rt
        self.num_envs, self.num_steps = int(c.num_envs), int(c.num_steps)
        self.gamma, self.lam, self.cut = float(c.gamma), float(c.lam), bool(c.cut_at_truncation)
        self.seed = int(c.env_seed) + jax.process_index() * self.num_envs
        split = str(config.env.train_split)
        self.envs = [nav.make_env_from_config(split, config.env, seed=self.seed + e) for e in range(self.num_envs)]
        self.generate = Generator(policy.vlm_mdef, policy.encoder, temperature=float(c.temperature),
                                          top_p=float(c.top_p), runtime=self._rt_if_divisible())
        self.score = ppo_lib.make_score_fn(policy.mdef, policy.layout.prompt_len, float(c.temperature))
        self.rng = jax.random.key(int(config.seed) * 1_000_003 + jax.process_index())
        self.params = None
        self.counter = 0                                  # generations so far (sampling-rng position)
        self.episodes = [0] * self.num_envs               # episode number per env (its reset seed)
        self.actions: list[list[str]] = [[] for _ in range(self.num_envs)]
        self.obs = [self._reset(e) for e in range(self.num_envs)]

    def _rt_if_divisible(self) -> runtime_lib.Runtime | None:
        if self.rt is None:
            return None
        n = self.rt.batch_shards // jax.process_count()
        return self.rt if self.num_envs % max(n, 1) == 0 else None

    def _global(self, batch):
        if self._rt_if_divisible() is None:
            return batch
        return self.rt.global_batch(batch)

    def _reset(self, e: int) -> dict:
        self.actions[e] = []
        obs, _ = self.envs[e].reset(seed=(self.seed + e) * 1_000_003 + self.episodes[e])
        return obs

    def set_params(self, params) -> None:
        self.params = params

    def __iter__(self):
        return self

    def _score(self, prompts: dict, answers: np.ndarray, amask: np.ndarray, weights: np.ndarray) -> dict:
        batch = dict(chat.join_sequences(prompts, answers, amask), weights=weights)
        out = self.score(self.params, self._global(batch))
        return {k: chat.local_rows(v) for k, v in out.items()}

    def __next__(self) -> dict:
        if self.params is None:
            raise RuntimeError("RolloutIterator: set_params() before next()")
        enc, a_len = self.policy.encoder, self.policy.layout.answer_len
        rows, rewards, term, trunc = [], [], [], []
        values = []
        for _ in track(range(self.num_steps), desc="ppo rollout", unit="steps"):  # each: num_envs env steps
            prompts = chat.stack([enc.encode_prompt(o) for o in self.obs])
            out = self.generate(self.params["vlm"], prompts, jax.random.fold_in(self.rng, self.counter))
            self.counter += 1
            decoded = [enc.decode_answer(o) for o in out]
            amask = np.stack([d[2] for d in decoded])
            weights = np.stack([d[1] for d in decoded])
            scored = self._score(prompts, out, amask, weights)
            rows.append(dict(chat.join_sequences(prompts, out, amask), weights=weights,
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
        prompts = chat.stack([enc.encode_prompt(o) for o in self.obs])
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
    config = validate(config)
    workdir = storage.abspath(workdir)  # a gs:// URL stays one: every output goes through `storage`
    storage.makedirs(workdir)
    rt = runtime_lib.from_config(config)
    model = NavModel(config, workdir, config.model.init_from or config.train.init_from)
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
        if not nav_eval.splits_of(config.eval_nav):
            return {}
        res = nav_eval.evaluate(state.params["vlm"], config, model.cfg, model.tokenizer,
                                storage.join(workdir, "eval_nav"), runtime=rt)
        return nav_eval.flat_metrics(res)

    hp = ppo_lib.PPOHParams.from_config(config.ppo)
    rollouts = RolloutIterator(config, policy, rt)
    schedule = optim.make_schedule(config.optim, int(config.train.num_steps))
    task = loop.Task(name="ppo", init_params=init_params, loss_fn=None, logical=logical, eval_fn=eval_fn,
                     train_iter=rollouts,
                     make_update=lambda tx: ppo_lib.make_ppo_update(policy.mdef, tx, hp, prompt_len,
                                                                    schedule=schedule),
                     on_state=lambda state: rollouts.set_params(state.params),
                     load_init=trunk_and_fresh_head if config.model.init_from else None)
    _, final = loop.train(config, workdir, task, runtime=rt)
    if jax.process_index() == 0 and final:
        print(f"[{task.name}] " + "  ".join(f"{k}={v:.3f}" for k, v in sorted(final.items())
                                             if k.endswith(("success_rate", "per_step_accuracy"))), flush=True)
    return final
