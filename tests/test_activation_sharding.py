"""Activation sharding constraints (`parallel/activations.constrain`): under the runtime's mesh (data=2, fsdp=4 on the
8 test devices) the planner's and the VLM's hidden states and logits are split over the batch axes in the compiled
train step / forward, by the same (config-overridable) rules as the parameters; without a mesh the helper is the
identity (no constraint in the program), and an unknown logical name is an error naming it."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from recogdrive_jax import configs
from recogdrive_jax.models import internvit as internvit_lib
from recogdrive_jax.models import internvl as iv
from recogdrive_jax.models import planner as planner_lib
from recogdrive_jax.models import qwen2 as qwen2_lib
from recogdrive_jax.parallel import activations as act
from recogdrive_jax.parallel import runtime as runtime_lib
from recogdrive_jax.train import loop
from recogdrive_jax.train.module_def import ModuleDef
from recogdrive_jax.train.state import init_train_state, make_train_step
from recogdrive_jax.vlm import lm_loss

SIZES = {"data": 2, "fsdp": 4, "tensor": 1}
B = 8  # = data * fsdp: one row per device


def _runtime(**rules):
    c = configs.base_config()
    c.mesh.update(SIZES)
    c.parallel.rules.update(rules)
    return runtime_lib.from_config(c)


def _recording(monkeypatch, *modules):
    """Wraps each module's `constrain` so the sharding XLA gives every constrained activation is recorded at
    compile time (`jax.debug.inspect_array_sharding`): [(module, logical, global shape, shard shape)]."""
    seen = []

    def wrap(module):
        def constrain(x, logical):
            y = act.constrain(x, logical)
            where, names, shape = module.__name__.rsplit(".", 1)[-1], tuple(logical), y.shape
            jax.debug.inspect_array_sharding(
                y, callback=lambda s: seen.append((where, names, shape, s.shard_shape(shape))))
            return y
        return constrain
    for m in modules:
        monkeypatch.setattr(m, "constrain", wrap(m))
    return seen


def _batch_split(seen, module):
    """The recorded activations of `module`: each split 8 ways on its leading (batch) dim, whole elsewhere."""
    rows = [r for r in seen if r[0] == module]
    assert rows, f"no constrained activation recorded in {module}"
    for _, names, shape, shard in rows:
        assert names[0] == "batch"
        assert shard == (shape[0] // B,) + tuple(shape[1:]), (module, names, shape, shard)
    return rows


def test_activation_spec_maps_logical_names_through_the_rules():
    sizes = dict(SIZES)
    assert act.activation_spec(("batch", "seq", "embed"), (8, 5, 4), sizes) == P(("data", "fsdp"), None, None)
    assert act.activation_spec(("batch", "seq", "embed"), (2, 5, 4), sizes) == P("data", None, None)
    assert act.activation_spec(("batch", "seq", "embed"), (3, 5, 4), sizes) == P(P.UNCONSTRAINED, None, None)
    rules = runtime_lib.rules_from_config({"batch": "data", "embed": "fsdp"})
    assert act.activation_spec(("batch", "seq", "embed"), (8, 5, 4), sizes, rules) == P("data", None, "fsdp")
    assert act.activation_spec(("batch", "seq", "vocab"), (8, 5, 6), {**sizes, "tensor": 2}) == P(
        ("data", "fsdp"), None, "tensor")


def test_constrain_is_the_identity_without_a_mesh():
    x = jnp.arange(24.0).reshape(4, 3, 2)
    assert act.constrain(x, ("batch", "seq", "embed")) is x
    jaxpr = jax.make_jaxpr(lambda v: act.constrain(v, ("batch", "seq", "embed")) * 2)(x)
    assert "sharding_constraint" not in str(jaxpr)
    # a mesh of other axis names (a notebook's) is not ours to constrain
    other = jax.sharding.Mesh(np.asarray(jax.devices()), ("x",))
    with jax.set_mesh(other):
        assert "sharding_constraint" not in str(jax.make_jaxpr(lambda v: act.constrain(v, ("batch", None, None)))(x))


def test_unknown_logical_name_raises_naming_it():
    x = jnp.zeros((8, 2))
    with pytest.raises(ValueError, match="'bacth'"):
        act.constrain(x, ("bacth", "embed"))
    with _runtime().activations(), pytest.raises(ValueError, match="'bacth'"):
        jax.jit(lambda v: act.constrain(v, ("bacth", "embed")))(x)
    with pytest.raises(ValueError, match="name 3 dimensions, but the activation has 2"):
        act.constrain(x, ("batch", "seq", "embed"))


def test_jax_mesh_context_constrains_with_the_default_rules():
    rt = _runtime()
    x = jnp.zeros((8, 3, 2))
    with jax.set_mesh(rt.mesh):
        text = jax.jit(lambda v: act.constrain(v, ("batch", "seq", "embed")) + 1).lower(x).as_text()
    assert "sharding_constraint" in text or "@Sharding" in text


def test_the_context_is_part_of_the_jit_key():
    rt, x = _runtime(), jnp.zeros((8, 3))
    f = jax.jit(lambda v: act.constrain(v, ("batch", "embed")) + 1)
    with rt.activations():
        assert f(x).sharding.shard_shape(x.shape) == (1, 3)  # traced with the constraint
    out = f(jnp.zeros((8, 3)))  # outside: traced again, no constraint
    assert "sharding_constraint" not in str(jax.make_jaxpr(f)(x)) and len(out.sharding.device_set) == 1


def test_planner_train_step_splits_hidden_states_over_the_batch_axes(monkeypatch):
    """The jitted train step (FSDP params, ZeRO-1 moments) constrains the VL memory and the DiT input to the batch
    axes, forward and backward; compiled, those activations hold one batch row per device (8 test devices)."""
    rt = _runtime()
    cfg = planner_lib.planner_config("tiny")
    mdef = ModuleDef(lambda rngs: planner_lib.build_planner(cfg, rngs))
    tx = optax.adam(1e-3)
    abstract = jax.eval_shape(lambda: init_train_state(mdef.init(jax.random.key(0)), tx))
    shardings = loop.state_shardings(abstract, mdef.logical, rt.mesh, tx, rt.zero1, rt)
    # FSDP really splits the planner's large kernels, so the activations' layout is not implied by replicated params
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(shardings.params))
    loss_fn = lambda p, b, r: mdef.bind(p).loss(b, r)  # noqa: E731
    rng = np.random.default_rng(0)
    batch = {"cond": {"vl_states": rng.normal(size=(B, 4, cfg.vl_dim)).astype(np.float32),
                      "status": rng.normal(size=(B, cfg.status_dim)).astype(np.float32),
                      "history": rng.normal(size=(B, cfg.history_len, 3)).astype(np.float32)},
             "future": rng.normal(size=(B, cfg.horizon, 3)).astype(np.float32)}
    batch_sh = jax.tree.map(lambda x: rt.batch_sharding(x.ndim), batch)
    step = jax.jit(make_train_step(loss_fn, tx), in_shardings=(shardings, batch_sh, rt.replicated()))
    with rt.activations():
        text = step.lower(abstract, batch, jax.random.key(1)).as_text()
    shapes = [re.search(r"tensor<(\d+(?:x\d+)*)x\w+>", line).group(1) for line in text.splitlines()
              if "sharding_constraint" in line and '{"data", "fsdp"}' in line]
    memory, dit_input = f"{B}x4x{cfg.embed_dim}", f"{B}x{cfg.horizon}x{cfg.embed_dim}"
    assert sorted(shapes) == sorted([memory, dit_input] * 2), shapes  # each value and its cotangent

    seen = _recording(monkeypatch, planner_lib)  # what XLA makes of them (the loss compiles in a fraction of the step)
    loss = jax.jit(loss_fn, in_shardings=(shardings.params, batch_sh, rt.replicated()))
    with rt.activations():
        loss.lower(abstract.params, batch, jax.random.key(1)).compile()
    rows = _batch_split(seen, "planner")
    assert {r[2] for r in rows} == {(B, 4, cfg.embed_dim), (B, cfg.horizon, cfg.embed_dim)}


def test_vlm_forward_splits_tiles_hidden_states_and_logits_over_the_batch_axes(monkeypatch):
    seen = _recording(monkeypatch, internvit_lib, qwen2_lib, iv, lm_loss)
    rt = _runtime()
    cfg = iv.get_config("tiny")
    mdef = ModuleDef(lambda rngs: iv.InternVLModel(cfg, rngs=rngs))
    params = mdef.abstract_params()
    pshard = rt.param_shardings(params, mdef.logical)
    t, m, side = 8, 1, cfg.vision_config.image_size
    ids = np.full((B, t), 7, np.int32)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": np.ones((B, t), np.int32),
             "positions": np.tile(np.arange(t, dtype=np.int32), (B, 1)), "segment_ids": np.ones((B, t), np.int32),
             "pixel_values": np.zeros((B, m, side, side, 3), np.float32), "image_flags": np.ones((B, m), np.int32)}
    batch_sh = jax.tree.map(lambda x: rt.batch_sharding(x.ndim), batch)

    def sft_forward(p, b):
        return lm_loss.forward_sums(mdef.bind(p), b, None, chunk=4, drop_path=False)

    def lm_logits(p, b):
        return mdef.bind(p)(b["input_ids"], b["attention_mask"])["logits"]

    with rt.activations():  # one compile for both
        jax.jit(lambda p, b: (sft_forward(p, b), lm_logits(p, b)), in_shardings=(pshard, batch_sh)).lower(
            params, batch).compile()
    _batch_split(seen, "internvit")  # patch embeddings [tiles, N, D]: tiles are the ViT's batch
    assert {r[2] for r in _batch_split(seen, "qwen2")} == {(B, t, cfg.llm_config.hidden_size)}
    assert {r[2] for r in _batch_split(seen, "lm_loss")} == {(B, 4, cfg.llm_config.vocab_size)}  # chunked CE
    assert {r[2] for r in _batch_split(seen, "internvl")} == {(B, t, cfg.llm_config.vocab_size)}  # logits
