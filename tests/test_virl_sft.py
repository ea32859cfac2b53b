"""V-IRL SFT through the shared `sft` stage: the tokens it trains on are exactly the ones the PPO policy
samples and scores, and a PPO run started from the SFT workdir carries its trunk (fresh value head)."""
import json
import os

import jax
import numpy as np

from recogdrive_jax import configs
from recogdrive_jax.data import template as tpl
from recogdrive_jax.envs import navigation as nav
from recogdrive_jax.envs.sft_data import expert_rollout, tokenizer_corpus
from recogdrive_jax.rl import ppo as ppo_lib
from recogdrive_jax.train import loop
from recogdrive_jax.train.metrics import read_metrics
from recogdrive_jax.vlm import checkpoint as vlm_ckpt
from recogdrive_jax.vlm import nav_policy, qa_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, **over):
    mod = configs.load_config_file(os.path.join(ROOT, "configs", "virl", f"{name}.py"))
    c = mod.get_config("tiny")
    c.env.n_train_routes, c.env.n_eval_routes = 4, 2
    c.model.value_hidden = (16, 8)
    c.eval_nav.splits = ""
    if "train" in c:
        c.train.async_checkpoint = False
    return configs.set_dotted(c, over)


def test_sft_samples_equal_policy_prompt_and_answer_tokens(tmp_path):
    from recogdrive_jax.data import tokenizer as tok_lib
    from recogdrive_jax.stages import sft
    from recogdrive_jax.vlm.nav_policy import NavPolicy
    c = _config("sft")
    tok = tok_lib.build_tokenizer(vocab_size=int(c.model.llm.vocab_size), corpus=tokenizer_corpus(c.env))
    cfg = vlm_ckpt.resolve_model(c.model, c.data, str(tmp_path)).cfg
    scfg = qa_batches.sample_cfg(cfg, c.data)
    enc = NavPolicy(c, cfg, tok).encoder
    env = nav.make_env_from_config("in_distribution", c.env)
    checked = 0
    for obs, ans in list(expert_rollout(env, 1, rail_seed=5))[:4]:
        s = tpl.build_sample([{"from": "human", "value": "<image>\n" + obs["prompt"]}, {"from": "gpt", "value": ans}],
                             [obs["image"]], tok, scfg)
        p = enc.encode_prompt(obs)
        a_ids, a_mask = enc.encode_answer(ans)
        prompt = p["prompt_ids"][p["prompt_mask"] > 0]
        answer = a_ids[a_mask > 0]                                         # ends with EOS
        n = len(prompt) + len(answer)
        np.testing.assert_array_equal(s["input_ids"][:n], np.concatenate([prompt, answer]))
        labelled = s["input_ids"][s["labels"] != -100]
        np.testing.assert_array_equal(labelled, answer)                     # loss on answer + EOS only
        np.testing.assert_array_equal(s["pixel_values"], p["pixel_values"][:s["pixel_values"].shape[0]])
        checked += 1
    assert checked == 4


def test_sft_stage_then_ppo_starts_from_its_trunk(tmp_path):
    from recogdrive_jax.stages import eval_nav, ppo, sft
    sft_wd = str(tmp_path / "sft")
    c = _config("sft", **{"train.num_steps": 2, "train.batch_size": 8, "train.checkpoint_every": 2,
                          "virl_sft.num_routes": 2, "virl_sft.rail_redraws": 1})
    sft.run(c, sft_wd)
    rows = read_metrics(sft_wd, "train")
    assert rows and rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss"])
    meta = json.load(open(os.path.join(sft_wd, "virl_sft", "meta.json")))
    assert meta["virl_sft"]["length"] >= 8
    for f in ("recogdrive_internvl.json", "tokenizer"):
        assert os.path.exists(os.path.join(sft_wd, f))

    # PPO from the SFT run with the trunk frozen: after one update it is the SFT model, bit for bit.
    ppo_wd = str(tmp_path / "ppo")
    pc = _config("ppo", **{"model.init_from": sft_wd, "train.num_steps": 1, "optim.freeze": ("^vlm/",),
                           "prompt.max_new_tokens": 8})
    pc.ppo.num_envs, pc.ppo.num_steps, pc.ppo.epochs, pc.ppo.num_minibatches = 8, 1, 1, 1
    pc.train.batch_size, pc.ppo.minibatch_grad_accum, pc.optim.optimizer_steps_per_step = 8, 1, 1
    ppo.run(pc, ppo_wd)
    model = nav_policy.NavModel(pc, ppo_wd)
    policy = nav_policy.NavPolicy(pc, model.cfg, model.tokenizer)
    rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    vlm_abs = ppo_lib.str_keys(policy.vlm_mdef.abstract_params())
    sft_params = loop.load_init_params(sft_wd, vlm_abs, jax.tree.map(lambda _: rep, vlm_abs), prefer_ema=False)
    ppo_vlm = nav_policy.load_vlm_params(nav_policy.NavModel(pc, str(tmp_path / "x"), source=ppo_wd), policy,
                                  jax.tree.map(lambda _: rep, vlm_abs))
    for a, b in zip(jax.tree.leaves(sft_params), jax.tree.leaves(ppo_vlm)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert json.load(open(os.path.join(ppo_wd, "config.json")))["stage"] == "ppo"

    # eval_nav reads either kind of run.
    ec = _config("eval_nav", **{"eval_nav.checkpoint": sft_wd, "eval_nav.splits": "rule_ood",
                                "eval_nav.max_routes": 1, "eval_nav.max_new_tokens": 8, "eval_nav.num_render": 0})
    res = eval_nav.run(ec, str(tmp_path / "eval"))
    assert res["rule_ood/num_routes"] == 1 and res["rule_ood/per_step_accuracy"] == 0.0
