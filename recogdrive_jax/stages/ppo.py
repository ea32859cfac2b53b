"""Stage `ppo`: VLM-PPO on the V-IRL navigation env (spec/virl.md §2), and its SFT baseline (`config.algo='sft'`).

PPO: each loop step is one update — the rollout iterator steps `ppo.num_envs` envs per process for
`ppo.num_steps` steps with the current params (KV-cache sampling at T=0.2 → scoring pass for logp_old / V_old →
`env.step(text)`), computes GAE on the host and hands the fixed-shape buffer to the jitted `rl.ppo` update,
which the generic loop shards (ZeRO-1), checkpoints and resumes. The iterator state (episode seeds + the actions
of the episodes in flight + the sampling counter) is saved with each checkpoint and replayed on resume, so a
resumed run continues the very same episodes.

SFT (until the shared `sft` stage covers this data): masked token CE on expert (oracle) answers of the training
routes, single-turn, on the same prompt|answer layout and the same policy tree (the value head is untouched), so
a PPO run starts from it with `train.init_from=<sft workdir>`.

After training both evaluate on `eval_nav.splits` (stages/eval_nav.py) into `WORKDIR/eval_nav/`.
"""
from __future__ import annotations

import logging
import os
import shutil

import jax
import numpy as np

from recogdrive_jax import configs
from recogdrive_jax.envs import navigation as nav
from recogdrive_jax.envs.sft_data import expert_rollout
from recogdrive_jax.rl import ppo as ppo_lib
from recogdrive_jax.train import loop, optim

ALGOS = ("ppo", "sft")


# ----------------------------------------------------------------------------------------------- shared setup

def env_kwargs(env_cfg) -> dict:
    """`config.env` → keyword arguments of `navigation.make_env`."""
    kw = dict(city_seed=int(env_cfg.city_seed), city_size_m=float(env_cfg.city_size_m),
              n_train_routes=int(env_cfg.n_train_routes), n_eval_routes=int(env_cfg.n_eval_routes),
              routes_per_style=int(env_cfg.routes_per_style), view_size=int(env_cfg.view_size),
              verify_iter=int(env_cfg.verify_iter), view_layout=str(env_cfg.view_layout),
              full_oracle=bool(env_cfg.full_oracle), wrap_relative=bool(env_cfg.wrap_relative))
    if env_cfg.get("route_file"):
        if not os.path.exists(env_cfg.route_file):
            raise FileNotFoundError(f"config.env.route_file={env_cfg.route_file!r} does not exist")
        kw["route_file"] = str(env_cfg.route_file)
    return kw


def tokenizer_corpus(env_cfg, num_routes: int = 24) -> list[str]:
    """Text the small navigation tokenizer is trained on: expert prompts/answers with both action spaces, the
    retry messages and the chat template (byte-level BPE, so any other text still encodes)."""
    kw = env_kwargs(env_cfg)
    kw.pop("route_file", None)
    kw.update(n_train_routes=min(num_routes, int(env_cfg.n_train_routes)), view_size=8)
    texts = []
    for split in ("in_distribution", "rule_ood"):
        env = nav.make_env(split, seed=0, **kw)
        for r in range(len(env.routes)):
            for obs, ans in expert_rollout(env, r, rail_seed=r):
                texts += [obs["prompt"], ans]
    texts += [nav.FAILED_PREFIX + m for m in (nav.MSG_WRONG_ACTION, nav.MSG_AT_INTERSECTION,
                                              nav.MSG_NOT_AT_INTERSECTION)]
    from recogdrive_jax.data import template as tmpl
    texts += [tmpl.INTERNVL2_5_SYSTEM] * 20 + list(tmpl.ROLE_PREFIX.values()) * 20
    return texts


def resolve_tokenizer(config, workdir: str):
    """`model.tokenizer` (a directory) if set; else the tokenizer of the `train.init_from` run; else this
    workdir's; else a small BPE trained on navigation text (saved to WORKDIR/tokenizer for later stages)."""
    from recogdrive_jax.data.tokenizer import build_tokenizer, load_tokenizer
    mine = os.path.join(workdir, "tokenizer")
    path = str(config.model.get("tokenizer", "") or "")
    if path:
        return load_tokenizer(path)
    init_from = str(config.get("train", {}).get("init_from", "") or "")
    src = os.path.join(init_from, "tokenizer") if init_from else ""
    if src and os.path.isdir(src):
        if jax.process_index() == 0 and not os.path.isdir(mine):
            shutil.copytree(src, mine)
        return load_tokenizer(src)
    if os.path.isdir(mine):
        return load_tokenizer(mine)
    if str(config.model.variant) != "tiny":
        raise configs.ConfigError(f"config.model.tokenizer: set it to the {config.model.variant} tokenizer "
                                  "directory (only the tiny model builds its own small tokenizer)")
    tok = build_tokenizer(None, vocab_size=int(config.model.llm.vocab_size), corpus=tokenizer_corpus(config.env))
    if jax.process_index() == 0:
        tok.save_pretrained(mine)
    return tok


class NavPolicy:
    """Everything both stages need to run the policy: module definition, InternVL config, chat encoder."""

    def __init__(self, config, tokenizer, answer_len: int | None = None):
        self.mdef, self.cfg = ppo_lib.policy_def(config.model)
        p = config.prompt
        self.layout = ppo_lib.PromptLayout(
            prompt_len=int(p.max_prompt_len), answer_len=int(answer_len or p.max_new_tokens),
            max_tiles=int(p.max_tiles),
            system_message=nav_system_message(config.model))
        self.encoder = ppo_lib.ChatEncoder(tokenizer, self.cfg, self.layout, weight_mode=str(p.weight_mode),
                                           thought_coef=float(p.thought_coef), action_coef=float(p.action_coef))


def nav_system_message(model_cfg):
    from recogdrive_jax.data import template as tmpl
    return tmpl.INTERNVL2_5_SYSTEM if bool(model_cfg.get("system_message", True)) else None


def validate(config) -> None:
    configs.validate_common(config)
    req = configs._require
    req(config.get("algo", "ppo") in ALGOS, "algo", f"unknown {config.get('algo')!r}; allowed: {list(ALGOS)}")
    p = config.prompt
    req(p.weight_mode in ("key", "reference_last5"), "prompt.weight_mode",
        f"unknown {p.weight_mode!r}; allowed: ['key', 'reference_last5']")
    for key in ("max_prompt_len", "max_new_tokens", "max_tiles"):
        req(int(p[key]) >= 1, f"prompt.{key}", f"must be >= 1, got {p[key]!r}")
    req(config.env.get("train_split", "in_distribution") in nav.SPLITS, "env.train_split",
        f"unknown split; allowed: {list(nav.SPLITS)}")
    if config.get("algo", "ppo") == "ppo":
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
        self.envs = [nav.make_env(split, seed=self.seed + e, **env_kwargs(config.env)) for e in range(self.num_envs)]
        self.generate = ppo_lib.Generator(policy.mdef, policy.encoder, temperature=float(c.temperature),
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
        for _ in range(self.num_steps):
            prompts = ppo_lib.stack([enc.encode_prompt(o) for o in self.obs])
            out = self.generate(self.params, prompts, jax.random.fold_in(self.rng, self.counter))
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


# -------------------------------------------------------------------------------------------------------- SFT

class SFTIterator:
    """Expert (oracle) answers of the training routes, single-turn, as fixed-shape batches; shuffled per epoch."""

    def __init__(self, config, policy: NavPolicy, batch_size: int):
        c = config.sft
        env = nav.make_env(str(config.env.get("train_split", "in_distribution")), seed=int(c.seed),
                           **env_kwargs(config.env))
        n_routes = int(c.num_routes) or len(env.routes)
        enc = policy.encoder
        rows, skipped = [], 0
        for r in range(min(n_routes, len(env.routes))):
            for d in range(int(c.rail_redraws)):
                for obs, ans in expert_rollout(env, r, rail_seed=int(c.seed) * 1_000_003 + r * 1_009 + d):
                    try:
                        p = enc.encode_prompt(obs)
                        ids, mask = enc.encode_answer(ans)
                    except ppo_lib.PromptTooLong:
                        skipped += 1
                        continue
                    rows.append(dict(ppo_lib.join_sequences({k: v[None] for k, v in p.items()}, ids[None],
                                                            mask[None]), answer_mask=mask[None]))
        if skipped:
            logging.warning("sft: skipped %d of %d expert samples longer than config.prompt.max_prompt_len / "
                            "max_new_tokens", skipped, skipped + len(rows))
        if not rows:
            raise ValueError("config.sft: no SFT sample fits config.prompt.max_prompt_len")
        self.data = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        self.n = len(rows)
        if self.n < batch_size:
            raise ValueError(f"config.sft: {self.n} SFT samples < batch size {batch_size}; add routes/redraws")
        self.batch_size, self.seed, self.position = batch_size, int(c.seed), 0
        self.pi, self.pc = jax.process_index(), jax.process_count()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        per_epoch = self.n // self.batch_size
        epoch, k = divmod(self.position, per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        idx = perm[k * self.batch_size:(k + 1) * self.batch_size]
        local = len(idx) // self.pc
        idx = idx[self.pi * local:(self.pi + 1) * local]
        self.position += 1
        return {key: v[idx] for key, v in self.data.items()}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


# ---------------------------------------------------------------------------------------------------- the run

def run(config, workdir: str) -> dict:
    from recogdrive_jax.parallel import mesh as mesh_lib
    from recogdrive_jax.stages import eval_nav
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh_lib.make_mesh(config.get("mesh"))
    tokenizer = resolve_tokenizer(config, workdir)
    policy = NavPolicy(config, tokenizer)
    algo = str(config.get("algo", "ppo"))
    prompt_len = policy.layout.prompt_len
    logical = ppo_lib.str_keys(policy.mdef.logical)

    def init_params(rng):
        return ppo_lib.str_keys(policy.mdef.init(rng))

    def eval_fn(state, step):
        if not eval_nav.splits_of(config.eval_nav):
            return {}
        res = eval_nav.evaluate(state.params, config, tokenizer, os.path.join(workdir, "eval_nav"), mesh=mesh)
        return {f"{s}/{k}": v for s, m in res.items() for k, v in m.items()}

    if algo == "sft":
        def loss_fn(params, batch, rng):
            return ppo_lib.sft_loss(policy.mdef.bind(params), batch, prompt_len)
        task = loop.Task(name="virl_sft", init_params=init_params, loss_fn=loss_fn, logical=logical, eval_fn=eval_fn,
                         train_iter=SFTIterator(config, policy, int(config.train.batch_size)))
    else:
        hp = ppo_lib.PPOHParams.from_config(config.ppo, int(config.optim.grad_accum))
        rollouts = RolloutIterator(config, policy, mesh)
        schedule = optim.make_schedule(config.optim, int(config.train.num_steps))
        task = loop.Task(name="ppo", init_params=init_params, loss_fn=None, logical=logical, eval_fn=eval_fn,
                         train_iter=rollouts,
                         make_update=lambda tx: ppo_lib.make_ppo_update(policy.mdef, tx, hp, prompt_len,
                                                                        schedule=schedule),
                         on_state=lambda state: rollouts.set_params(state.params))
    _, final = loop.train(config, workdir, task, mesh=mesh)
    if jax.process_index() == 0 and final:
        print(f"[{task.name}] " + "  ".join(f"{k}={v:.3f}" for k, v in sorted(final.items())
                                             if k.endswith(("success_rate", "per_step_accuracy"))), flush=True)
    return final
