"""`il_joint` (vlm/joint.py): the planner loss reaches the LLM; what trains follows joint.train_llm; the auxiliary LM
loss leaves the planner's prompt states unchanged; a tiny run's checkpoint is scored by `eval` on a cache made from it."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recogdrive_jax import stage_configs
from recogdrive_jax.data import planner_data
from recogdrive_jax.sim import world
from recogdrive_jax.train import optim
from recogdrive_jax.train.optim import path_str
from recogdrive_jax.train.state import init_train_state
from recogdrive_jax.vlm import checkpoint as vlm_ckpt
from recogdrive_jax.vlm import joint
from recogdrive_jax.vlm.tokenizer import load_or_build_tokenizer


def _config(**joint_kw):
    c = stage_configs.il_joint_stage_config(variant="tiny", planner_variant="tiny")
    c.model.dtype, c.model.remat = "float32", False
    c.prompt.update(dict(max_dynamic_patch=1, use_thumbnail=False, system_message=""))
    c.joint.update(joint_kw)
    c.train.batch_size = 2
    return c


def _random_params(mdef, seed=0):
    """Random numpy params of the module's shapes (norm scales 1, the rest N(0, 0.02)): no init compilation."""
    rng = np.random.default_rng(seed)

    def one(path, a):
        name = path_str(path)
        if "norm" in name and name.endswith(("scale", "weight")):
            return jnp.ones(a.shape, a.dtype)
        return jnp.asarray(rng.normal(0.0, 0.02, a.shape), a.dtype)
    return jax.tree_util.tree_map_with_path(one, mdef.abstract_params())


@pytest.fixture(scope="module")
def setup():
    """One tiny config / tokenizer / 2-scene split / module shared by every test of the file."""
    c = joint.validate(_config(train_llm="last_n", last_n=1, lm_loss_weight=0.1))
    resolved = vlm_ckpt.resolve_model(c.model, None, "/nonexistent")
    cfg = resolved.cfg
    tok = load_or_build_tokenizer(resolved, "")
    scenes = world.stack_scenes(world.generate_scenes(2, seed=11, reference="expert"))
    split = planner_data.PlannerSplit("train", scenes, None, None)
    pcfg = joint.head_config(c, cfg, scenes)
    mdef = joint.module_def(c, cfg, pcfg)
    return c, cfg, tok, split, mdef


@pytest.fixture(scope="module")
def stepped(setup):
    """One compiled joint step (last_n=1 + LM auxiliary), run once; its before/after params serve every assertion."""
    c, cfg, tok, split, mdef = setup
    inputs = joint.JointInputs(c, cfg, tok, [split])
    batch = jax.tree.map(jnp.asarray, inputs.batch(split, np.arange(2)))
    frozen = joint.freeze_patterns(c, cfg)
    config = c.with_values({"optim.freeze": frozen})
    params = _random_params(mdef)
    tx = optim.make_optimizer(config.optim, 10, params)
    step = joint.make_update(config, joint.make_loss_fn(config, mdef, frozen), cfg, 0.0, None)(tx)
    new, metrics = jax.jit(step)(init_train_state(params, tx), batch, jax.random.key(1), None)
    return inputs, batch, params, new.params, metrics


def _leaf(tree, prefix):
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree) if path_str(p).startswith(prefix)}


def test_planner_loss_reaches_the_llm_and_last_n_masks_the_rest(stepped):
    inputs, _, params, new_params, metrics = stepped
    assert inputs.t_pad > inputs.t_vl  # prompt + trajectory answer (the LM auxiliary)
    assert np.isfinite(float(metrics["lm_loss"])) and float(metrics["lm_loss"]) > 0
    layers = _leaf(params, joint.LAYERS)
    new_layers = _leaf(new_params, joint.LAYERS)
    assert layers
    for k, v in layers.items():  # 2 stacked layers: only the last trains
        np.testing.assert_array_equal(np.asarray(new_layers[k][0]), np.asarray(v[0]), err_msg=k)
    moved = [k for k, v in layers.items() if not np.array_equal(np.asarray(new_layers[k][1]), np.asarray(v[1]))]
    assert len(moved) > len(layers) // 2, moved  # the planner's gradient reached the LLM's last layer
    for prefix in ("vlm/vision_model/", "vlm/language_model/model/embed_tokens/"):  # frozen
        for k, v in _leaf(params, prefix).items():
            np.testing.assert_array_equal(np.asarray(_leaf(new_params, prefix)[k]), np.asarray(v), err_msg=k)
    for prefix in ("planner/", "vlm/mlp1/", "vlm/language_model/model/norm/"):  # trained
        assert any(not np.array_equal(np.asarray(_leaf(new_params, prefix)[k]), np.asarray(v))
                   for k, v in _leaf(params, prefix).items()), prefix


def test_lm_answer_after_the_prompt_leaves_the_prompt_states_unchanged(setup, stepped):
    """The causal LM's prompt states do not see the answer: the prompt-only row (right-padded to the same width,
    so one compiled forward serves both) gives the planner the same states."""
    c, cfg, tok, split, mdef = setup
    _, batch, params, _, _ = stepped
    plain = joint.JointInputs(joint.validate(_config()), cfg, tok, [split])
    pb = plain.batch(split, np.arange(2))
    assert plain.t_pad == plain.t_vl < batch["input_ids"].shape[1]
    width = batch["input_ids"].shape[1] - pb["input_ids"].shape[1]
    pb["input_ids"] = np.pad(pb["input_ids"], ((0, 0), (0, width)), constant_values=tok.pad_token_id)
    pb["attention_mask"] = np.pad(pb["attention_mask"], ((0, 0), (0, width)))
    assert not (np.asarray(pb["input_ids"]) == np.asarray(batch["input_ids"])).all()  # the answer tokens differ
    cond_fn = jax.jit(lambda p, b: mdef.bind(p).cond(b)["vl_states"])
    pb = {k: jnp.asarray(v) for k, v in pb.items() if k in batch}
    np.testing.assert_allclose(np.asarray(cond_fn(params, batch)), np.asarray(cond_fn(params, pb)), atol=2e-5)


@pytest.mark.parametrize("train_llm,llm_moves", [("all", True), ("none", False)])
def test_train_llm_all_updates_the_llm_and_none_freezes_it(setup, train_llm, llm_moves):
    c, cfg, _, _, mdef = setup
    config = joint.validate(_config(train_llm=train_llm))
    config = config.with_values({"optim.freeze": joint.freeze_patterns(config, cfg)})
    params = mdef.abstract_params()
    params = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), params)
    grads = jax.tree.map(jnp.ones_like, params)  # what any loss would send back
    tx = optim.make_optimizer(config.optim, 10, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    llm = _leaf(updates, "vlm/language_model/model/layers/")
    assert llm and all(bool(jnp.any(u != 0)) == llm_moves for u in llm.values())
    assert all(bool(jnp.any(u != 0)) for u in _leaf(updates, "planner/").values())


def test_frozen_parts_get_no_gradient_in_the_loss(setup, stepped):
    """joint.detach_frozen: the frozen ViT / embeddings / lm_head get exactly zero gradient (no backward through
    them); the trained parts get theirs."""
    c, cfg, _, _, _ = setup
    params = stepped[2]
    frozen = joint.freeze_patterns(c, cfg)
    g = jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(joint.detach_frozen(p, frozen))))(params)
    labels = optim.freeze_labels(params, frozen)
    flat = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(g)}
    lab = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(labels)}
    assert {k for k, v in lab.items() if v == "frozen"} >= set(_leaf(params, "vlm/vision_model/"))
    for k, x in flat.items():
        assert bool(np.asarray(x).any()) == (lab[k] == "train"), k


@pytest.mark.slow
def test_tiny_run_checkpoint_feeds_cache_and_eval(tmp_path):
    """il_joint (2 steps) -> cache from its workdir -> eval of WORKDIR/planner on that cache."""
    from recogdrive_jax import configs
    from recogdrive_jax.stages import get_stage
    c = _config()
    c.data.update(dict(num_train_scenes=8, num_eval_scenes=4))
    c.train.update(dict(num_steps=2, batch_size=8, log_every=1, checkpoint_every=2))
    c.eval.update(dict(batch_size=4, num_plots=0))
    c.planner.use_vl_mask = True
    jw = str(tmp_path / "joint")
    out = get_stage("il_joint")(c, jw)
    assert np.isfinite(out["pdms"]) and os.path.isdir(os.path.join(jw, "planner"))
    assert os.path.isfile(os.path.join(jw, "hf_export", "config.json"))
    cc = stage_configs.cache_stage_config()
    cc.model.init_from, cc.model.dtype = jw, "float32"
    cc.data.update(dict(num_train_scenes=8, num_eval_scenes=4))
    cc.cache.update(dict(batch_size=4, max_dynamic_patch=1, use_thumbnail=False, system_message=""))
    cw = str(tmp_path / "cache")
    get_stage("cache")(cc, cw)
    ec = configs.planner_stage_config("eval", variant="tiny")
    ec.planner.update(dict(vl_dim=64, use_vl_mask=True))
    ec.data.update(dict(num_train_scenes=8, num_eval_scenes=4, cache_dir=cw))
    ec.eval.update(dict(checkpoint=os.path.join(jw, "planner"), batch_size=4, num_plots=0))
    res = get_stage("eval")(ec, str(tmp_path / "eval"))
    metrics = json.load(open(tmp_path / "eval" / "eval" / "eval" / "metrics.json"))
    assert metrics["num_scenes"] == 4 and np.isfinite(res["pdms"]) and np.isfinite(metrics["ade"])
