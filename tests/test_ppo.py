"""VLM-PPO update, value-head placement, PPO/SFT stage runs with resume, eval_nav outputs, malformed outputs."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import subprocess_env

from recogdrive_jax import configs
from recogdrive_jax.envs import navigation as nav
from recogdrive_jax.rl import ppo as ppo_lib
from recogdrive_jax.train.metrics import read_metrics
from recogdrive_jax.train.state import init_train_state
from recogdrive_jax.vlm import chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P_LEN, A_LEN, V = 24, 8, 512


def _load_config(name, arg="tiny"):
    mod = configs.load_config_file(os.path.join(ROOT, "configs", "virl", f"{name}.py"))
    return mod.get_config(arg)


def _model_cfg():
    return ml_collections.ConfigDict(dict(variant="tiny", dtype="float32", llm=dict(vocab_size=V), vit={},
                                          value_hidden=(16, 8)))


HP = ppo_lib.PPOHParams(epochs=1, num_minibatches=2, grad_accum=2)


@pytest.fixture(scope="module")
def policy():
    """Tiny policy + the jitted scoring, hidden-state and update functions, compiled once for the module."""
    mdef, cfg = ppo_lib.policy_def(_model_cfg())
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-4, eps=1e-7))
    fns = dict(score=ppo_lib.make_score_fn(mdef, P_LEN, HP.temperature),
               update=jax.jit(ppo_lib.make_ppo_update(mdef, tx, HP, P_LEN)), tx=tx)

    @jax.jit
    def hidden(params, b):
        pol = mdef.bind(params)
        pv = b["pixel_values"].reshape(-1, *b["pixel_values"].shape[2:])
        h = pol.vlm(b["input_ids"], b["attention_mask"], pv, b["image_flags"].reshape(-1))["hidden_states"]
        return h, pol.value_head.from_hidden(h[:, P_LEN - 1])

    fns["hidden"] = hidden
    return mdef, cfg, mdef.init(jax.random.key(0)), fns


def _batch(cfg, n=8, seed=0):
    """Left-padded prompts with 4 image tokens, random answers with an EOS; fixed P|A layout."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, P_LEN + A_LEN), np.int32)
    mask = np.zeros_like(ids)
    weights = np.zeros((n, A_LEN), np.float32)
    for i in range(n):
        plen = int(rng.integers(10, P_LEN + 1))
        prompt = [cfg.img_start_token_id] + [cfg.image_token_id] * cfg.num_image_token + [cfg.img_end_token_id]
        prompt += list(rng.integers(12, V, plen - len(prompt)))
        alen = int(rng.integers(3, A_LEN + 1))
        ans = list(rng.integers(12, V, alen - 1)) + [cfg.eos_token_id]
        ids[i, P_LEN - plen:P_LEN], mask[i, P_LEN - plen:P_LEN] = prompt, 1
        ids[i, P_LEN:P_LEN + alen], mask[i, P_LEN:P_LEN + alen] = ans, 1
        weights[i, 2:alen - 2], weights[i, max(alen - 2, 1):alen] = 0.5, 1.0
    s = cfg.force_image_size
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": rng.normal(size=(n, 1, s, s, 3)).astype(np.float32),
            "image_flags": np.ones((n, 1), np.int32), "weights": weights}


def _rollout_batch(policy, advantages, seed=0):
    mdef, cfg, params, fns = policy
    b = _batch(cfg, len(advantages), seed)
    scored = fns["score"](params, b)
    values = np.array(scored["values"])
    adv = np.asarray(advantages, np.float32)
    return dict(b, old_logp=np.array(scored["logp"]), old_values=values, advantages=adv, returns=values + adv,
                sample_mask=np.ones(len(adv), np.float32))


def _update(policy, batch):
    mdef, cfg, params, fns = policy
    return fns["update"](init_train_state(params, fns["tx"]), batch, jax.random.key(1))


def test_first_minibatch_ratio_one_and_clip_zero(policy):
    batch = _rollout_batch(policy, np.random.default_rng(3).normal(size=8))
    state, m = _update(policy, batch)
    assert abs(float(m["first_ratio_mean"]) - 1.0) < 1e-5
    assert float(m["first_clip_fraction"]) == 0.0
    assert abs(float(m["first_approx_kl"])) < 1e-6
    assert int(state.step) == 1 and np.isfinite(float(m["loss"]))
    # The second minibatch sees moved params: the mean over both is no longer exactly 1.
    assert abs(float(m["ratio_mean"]) - 1.0) > 1e-7


def test_value_head_reads_last_prompt_token(policy):
    mdef, cfg, params, fns = policy
    b = _batch(cfg, 8)
    values = np.asarray(fns["score"](params, b)["values"])
    _, direct = fns["hidden"](params, b)
    np.testing.assert_allclose(values, direct, rtol=1e-5, atol=1e-6)
    # The answer never changes the value; the last prompt token does.
    other = dict(b, input_ids=b["input_ids"].copy())
    other["input_ids"][:, P_LEN:] = (other["input_ids"][:, P_LEN:] + 7) % V
    np.testing.assert_allclose(fns["score"](params, other)["values"], values, rtol=1e-5, atol=1e-6)
    other["input_ids"][:, P_LEN - 1] = (other["input_ids"][:, P_LEN - 1] + 7) % V
    assert not np.allclose(fns["score"](params, other)["values"], values)
    # The value head gets gradient from the value loss inside the update (same tree as the VLM).
    batch = _rollout_batch(policy, np.zeros(8))
    batch["returns"] = batch["old_values"] + 1.0
    state, _ = _update(policy, batch)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params["value_head"], params["value_head"])
    assert max(jax.tree.leaves(moved)) > 0


def test_positive_advantage_action_logprob_rises(policy):
    mdef, cfg, params, fns = policy
    adv = np.array([1.0, -1.0] * 4, np.float32)
    batch = _rollout_batch(policy, adv)
    state, m = _update(policy, batch)
    delta = np.asarray(fns["score"](state.params, batch)["logp"]) - batch["old_logp"]
    assert np.all(delta[adv > 0] > 0), delta
    assert np.all(delta[adv < 0] < 0), delta


def test_nan_logprob_samples_are_skipped(policy):
    batch = _rollout_batch(policy, np.ones(8))
    batch["old_logp"][0] = np.nan
    state, m = _update(policy, batch)
    assert np.isfinite(float(m["loss"])) and float(m["skipped_fraction"]) > 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_rollout_advantages_normalised_and_bootstrapped():
    r = np.array([[1.0], [-1.0], [1.0]], np.float32)
    v = np.array([[0.5], [0.2], [0.1], [0.3]], np.float32)
    z = np.zeros_like(r)
    a, ret = ppo_lib.rollout_advantages(r, v, z, z, gamma=0.9, lam=0.95)
    assert abs(a.mean()) < 1e-6 and abs(a.std(ddof=1) - 1) < 1e-3
    d2 = 1.0 + 0.9 * 0.3 - 0.1
    np.testing.assert_allclose(ret[2, 0], d2 + 0.1, rtol=1e-6)


def test_malformed_output_is_scored():
    from recogdrive_jax.data.tokenizer import build_tokenizer
    tok = build_tokenizer(vocab_size=V)
    mdef, cfg = ppo_lib.policy_def(_model_cfg())
    enc = chat.ChatEncoder(tok, cfg, chat.PromptLayout(prompt_len=4096, answer_len=16, system_message=None))
    env = nav.make_env("in_distribution", seed=0, city_size_m=800.0, n_train_routes=4, view_size=28)
    obs, _ = env.reset(seed=0)
    p = enc.encode_prompt(obs)
    assert p["prompt_mask"].sum() > 100 and p["image_flags"].sum() == 1
    garbage = np.random.default_rng(0).integers(6, V, 16).astype(np.int32)      # no EOS, not the format
    text, w, mask = enc.decode_answer(garbage)
    assert mask.sum() == 16 and w[0] == 0 and w[-1] == 1.0
    obs, r, term, trunc, _ = env.step(text)
    assert r in (-1.0, -1.5) and not term
    assert len(obs["messages"]) == 3 and obs["messages"][1]["content"] == text
    p2 = enc.encode_prompt(obs)                        # the retry conversation carries the malformed text
    assert p2["prompt_mask"].sum() > p["prompt_mask"].sum()


def _tiny_stage_config(tmp_path, **over):
    c = _load_config("ppo")
    c.ppo.num_envs, c.ppo.num_steps, c.ppo.epochs, c.ppo.num_minibatches = 8, 1, 1, 1
    c.train.batch_size, c.train.num_steps = 8, 1
    c.ppo.minibatch_grad_accum, c.optim.optimizer_steps_per_step = 1, 1
    c.optim.lr, c.optim.clip_norm = 1e-4, 1.0
    c.model.value_hidden = (16, 8)
    c.prompt.max_new_tokens = 12                 # a fresh tiny model never finishes the format: malformed output
    c.prompt.max_prompt_len = 1024
    c.env.n_train_routes, c.env.n_eval_routes = 4, 2
    c.eval_nav.splits = ""
    c.train.async_checkpoint = False
    return configs.set_dotted(c, over)


def test_ppo_stage_runs_resumes_and_eval_nav_writes_metrics(tmp_path):
    from recogdrive_jax.stages import eval_nav as eval_stage
    from recogdrive_jax.stages import ppo as ppo_stage
    wd = str(tmp_path / "ppo")
    ppo_stage.run(_tiny_stage_config(tmp_path), wd)
    rows = read_metrics(wd, "train")
    assert [r["step"] for r in rows] == [1]
    r0 = rows[0]
    # Untrained policy: malformed answers are scored (−1 or −1.5), never a crash.
    assert -1.5 <= r0["rollout_reward"] <= -1.0 and r0["rollout_accuracy"] == 0.0
    assert abs(r0["first_ratio_mean"] - 1.0) < 1e-4 and r0["first_clip_fraction"] == 0.0
    state1 = json.load(open(os.path.join(wd, "checkpoints", "data", "1", "process_0.json")))
    assert state1["counter"] == 1 and len(state1["actions"]) == 8
    # Resume: a second invocation with more updates continues from step 1 and replays the episodes in flight.
    ppo_stage.run(_tiny_stage_config(tmp_path, **{"train.num_steps": 2}), wd)
    assert [r["step"] for r in read_metrics(wd, "train")] == [1, 2]
    assert os.path.isdir(os.path.join(wd, "tokenizer"))

    ev = _load_config("eval_nav")
    ev.eval_nav.checkpoint = wd
    ev.eval_nav.max_routes, ev.eval_nav.max_new_tokens, ev.eval_nav.num_render = 1, 12, 1
    ev.model.value_hidden = (16, 8)
    ev.prompt.max_prompt_len = 1024
    ev.env.n_train_routes, ev.env.n_eval_routes = 4, 2
    out = str(tmp_path / "eval")
    res = eval_stage.run(ev, out)
    for split in ("in_distribution", "rule_ood", "visual_ood"):
        m = json.load(open(os.path.join(out, "eval_nav", split, "metrics.json")))
        assert set(eval_stage.METRIC_KEYS) <= set(m) and m["num_routes"] == 1
        assert 0.0 <= m["per_step_accuracy"] <= 1.0 and m["mean_reward"] <= 1.0
        assert res[f"{split}/num_routes"] == 1
        assert os.path.exists(os.path.join(out, "eval_nav", split, "episodes", "ep_000.png"))
    table = open(os.path.join(out, "eval_nav", "results.md")).read()
    assert "| rule_ood |" in table and "per-step accuracy" in table


def test_stage_config_errors_name_the_key(tmp_path):
    from recogdrive_jax.configs import ConfigError
    from recogdrive_jax.stages import ppo as ppo_stage
    c = _tiny_stage_config(tmp_path)
    c.train.batch_size = 16
    with pytest.raises(ConfigError, match="train.batch_size"):
        ppo_stage.validate(c)
    c = _tiny_stage_config(tmp_path)
    c.prompt.weight_mode = "last3"
    with pytest.raises(ConfigError, match="prompt.weight_mode"):
        ppo_stage.validate(c)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_rollouts(tmp_path):
    """2 processes on 127.0.0.1 (jax.distributed): each steps its own envs (seeds offset by process), the
    update sees the global buffer, and each process saves the state of its own episodes."""
    import subprocess
    import sys
    wd = str(tmp_path / "ppo2")
    port = _free_port()
    flags = ["--config=" + os.path.join(ROOT, "configs", "virl", "ppo.py") + ":tiny", "--workdir=" + wd,
             "--config.ppo.num_envs=2", "--config.ppo.num_steps=2", "--config.ppo.epochs=1",
             "--config.ppo.num_minibatches=1", "--config.train.batch_size=8", "--config.train.num_steps=1",
             "--config.ppo.minibatch_grad_accum=1", "--config.optim.optimizer_steps_per_step=1",
             "--config.model.value_hidden=(16, 8)", "--config.prompt.max_new_tokens=8",
             "--config.env.n_train_routes=4", "--config.env.n_eval_routes=2", "--config.eval_nav.splits="]
    procs = []
    for pid in range(2):
        env = subprocess_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                             JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, "-m", "recogdrive_jax.main", *flags], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    rows = read_metrics(wd, "train")
    assert [r["step"] for r in rows] == [1]
    assert -1.5 <= rows[0]["rollout_reward"] <= 1.0
    states = [json.load(open(os.path.join(wd, "checkpoints", "data", "1", f"process_{p}.json"))) for p in (0, 1)]
    assert all(len(s["actions"]) == 2 and s["counter"] == 2 for s in states)
