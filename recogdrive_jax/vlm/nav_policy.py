"""The V-IRL navigation policy as the `ppo` and `eval_nav` stages (and the sft stage's V-IRL eval) build it: which
InternVL (+ tokenizer) it is, its module definitions and chat encoder, and loading its VLM weights."""
from __future__ import annotations

import dataclasses

import jax

from recogdrive_jax import config_types, configs, storage
from recogdrive_jax.data import template as tmpl
from recogdrive_jax.envs.sft_data import tokenizer_corpus
from recogdrive_jax.rl import ppo as ppo_lib
from recogdrive_jax.train import loop
from recogdrive_jax.vlm import chat
from recogdrive_jax.vlm.checkpoint import module_def, resolve_model, run_stage, save_model_files
from recogdrive_jax.vlm.tokenizer import load_or_build_tokenizer


class NavModel:
    """Which InternVL the policy is and where its trunk weights are, plus the tokenizer.

    `source` = a VLM checkpoint (see `vlm.checkpoint.resolve_model`) or a `ppo` run workdir (whole policy);
    '' = random init of `config.model.variant` (the tiny model then trains its own small tokenizer on
    navigation text, saved to WORKDIR/tokenizer)."""

    def __init__(self, config, workdir: str, source: str = ""):
        self.source = storage.abspath(source) if source else ""  # a gs:// URL stays one
        self.policy_run = bool(source) and run_stage(self.source) == "ppo"
        model_cfg = config_types.nav_model_config(config.model)
        if source:
            model_cfg = dataclasses.replace(model_cfg, init_from=self.source)
        resolved = resolve_model(model_cfg, None, workdir)
        self.cfg = resolved.cfg
        self.vlm_params_path = None if self.policy_run else resolved.params_path
        self.tokenizer = load_or_build_tokenizer(resolved, workdir, corpus=lambda: tokenizer_corpus(config.env))

    def save(self, workdir: str) -> None:
        """WORKDIR/recogdrive_internvl.json + tokenizer/: a ppo workdir describes its own model."""
        save_model_files(self.cfg, self.tokenizer, workdir)


class NavPolicy:
    """Everything both stages need to run the policy: module definitions (policy, bare VLM), chat encoder."""

    def __init__(self, config, cfg, tokenizer, answer_len: int | None = None):
        self.cfg = cfg
        self.mdef, _ = ppo_lib.policy_def(config.model, cfg)
        self.vlm_mdef = module_def(cfg, str(config.model.dtype))
        p = config.prompt
        self.layout = chat.PromptLayout(
            prompt_len=int(p.max_prompt_len), answer_len=int(answer_len or p.max_new_tokens),
            max_tiles=int(p.max_tiles), system_message=nav_system_message(config.model))
        self.encoder = chat.ChatEncoder(tokenizer, cfg, self.layout, weight_mode=str(p.weight_mode),
                                        thought_coef=float(p.thought_coef), action_coef=float(p.action_coef))


def nav_system_message(model_cfg):
    return tmpl.INTERNVL2_5_SYSTEM if config_types.nav_model_config(model_cfg).system_message else None


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
