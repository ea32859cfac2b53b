"""The GPU-ready run options of the models (issue 17 deliverable 4), exercised on CPU: the attention kernel switch
(`attention_impl`), the remat policies (`remat_policy`) and the scanned DiT (`planner.scan_layers`) with its
checkpoint layouts. Every option leaves the numbers the same at fp32 (the parity tests' tolerances)."""
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
import test_planner_parity as planner_parity  # noqa: E402  (its torch pair and check, reused per option)
from torch_ref.planner import TorchPlanner, lightning_state_dict, randomize_  # noqa: E402

from recogdrive_jax import config_types, configs  # noqa: E402
from recogdrive_jax.convert import planner as conv  # noqa: E402
from recogdrive_jax.models import internvl as iv  # noqa: E402
from recogdrive_jax.models import layers  # noqa: E402
from recogdrive_jax.models.planner import (  # noqa: E402
    PlannerConfig, blocks_layout, build_planner, load_planner_params, planner_config, planner_params, stack_blocks,
    to_layout, unstack_blocks)
from recogdrive_jax.parallel import kernels  # noqa: E402

def _rand(g, *shape):
    return jnp.asarray(g.normal(size=shape).astype(np.float32))


# --------------------------------------------------------------------------------------------- attention_impl

# (query heads, kv heads, mask, scaling): the DiT's call (MHA, key mask [B, 1, S], divided by sqrt(hd)), the ViT's
# (MHA, no mask), Qwen2's (GQA, causal + padding [B, T, S]), MQA with a key mask and an explicit scale.
CASES = [(4, 4, "key", dict(divide_by=float(np.sqrt(8)))), (4, 4, None, dict()), (4, 2, "causal", dict()),
         (6, 1, "key", dict(scale=0.3)), (4, 4, "causal", dict())]


@pytest.mark.parametrize("impl", ["jax_nn", "chunked", "per_head"])
def test_attention_impls_match_the_einsum_path(impl, monkeypatch):
    """fp32: jax.nn's XLA path, the query-blocked path and the per-(batch row, head) forward = the einsum path (outputs
    and q/k/v gradients) for the mask forms and scalings the models use; a fully masked row (batch row 1 of the key
    mask) attends uniformly in all. 19 queries in blocks of 8: three blocks, the last padded by 5 rows, a per-query
    (causal) and a shared key mask. 'per_head' (multi-head only) takes its gradients from the einsum path."""
    monkeypatch.setattr(kernels, "CHUNK_LOGIT_BYTES", 1)  # -> MIN_CHUNK_ROWS rows a block at these tiny shapes
    assert kernels.attention_chunk_rows(2, 4, 7) == kernels.MIN_CHUNK_ROWS == 8
    g = np.random.default_rng(0)
    b, t, s, hd = 2, 19, 23, 8
    for heads, kv_heads, mask_kind, kw in CASES:
        q, k, v = _rand(g, b, t, heads, hd), _rand(g, b, s, kv_heads, hd), _rand(g, b, s, kv_heads, hd)
        mask = {None: None, "key": jnp.asarray(g.random((b, 1, s)) > 0.4).at[1].set(False),
                "causal": jnp.tril(jnp.ones((t, s), bool), k=s - t)[None] & jnp.asarray(g.random((b, 1, s)) > 0.2)
                }[mask_kind]
        cot = _rand(g, b, t, heads, hd)

        @jax.jit
        def both(q, k, v, mask=mask, kw=kw, cot=cot):
            def out(impl):
                return lambda q, k, v: layers.dot_product_attention(q, k, v, mask, impl=impl, **kw)
            return [(out(i)(q, k, v), jax.grad(lambda *a: jnp.sum(out(i)(*a) * cot), argnums=(0, 1, 2))(q, k, v))
                    for i in ("xla", impl)]

        (ref, ref_g), (got, got_g) = both(q, k, v)
        case = f"{heads}/{kv_heads} heads, mask {mask_kind}, {kw}"
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6, rtol=0, err_msg=case)
        for a, c in zip(ref_g, got_g):
            np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-6, rtol=0, err_msg=case)


def test_auto_on_cpu_and_names_are_checked():
    """CPU 'auto': fp32 grouped-query attention over many queries in query blocks, over few (decode) through jax.nn
    (the faster there), the einsum path for the rest (multi-head attention; bf16, whose dots keep bf16 operands only
    on the einsum path). Block rows: a power of two whose fp32 logits fit CHUNK_LOGIT_BYTES, at least 8."""
    assert kernels.attention_chunk_rows(2, 4, 1048) == 32  # the PPO bench's update micro-batch: 1 MiB a block
    assert kernels.attention_chunk_rows(64, 14, 4096) == kernels.MIN_CHUNK_ROWS
    for dt in (jnp.float32, jnp.bfloat16):
        assert kernels.attention_impl("auto", dt) == "xla"
    assert kernels.attention_impl("auto", jnp.float32, grouped=True) == "jax_nn"
    assert kernels.attention_impl("auto", jnp.float32, grouped=True, queries=1) == "jax_nn"  # a decode step
    assert kernels.attention_impl("auto", jnp.float32, grouped=True, queries=1024) == "chunked"  # prefill, training
    assert kernels.attention_impl("auto", jnp.float32, queries=1024) == "per_head"  # multi-head, many queries: ViT
    assert kernels.attention_impl("auto", jnp.float32, queries=8) == "xla"  # multi-head, few queries: the DiT
    assert kernels.attention_impl("auto", jnp.bfloat16, grouped=True, queries=1024) == "xla"
    assert kernels.attention_impl("jax_nn", jnp.float32) == "jax_nn"
    with pytest.raises(ValueError, match="attention_impl 'flash'"):
        kernels.attention_impl("flash", jnp.float32)
    # the config's copies of the names and defaults agree with the library's
    assert config_types.ATTENTION_IMPLS == kernels.ATTENTION_IMPLS
    assert config_types.REMAT_POLICIES == layers.REMAT_POLICIES
    assert {k: getattr(PlannerConfig(), k) for k in configs.PLANNER_RUN_OPTIONS} == configs.PLANNER_RUN_OPTIONS
    c = configs.planner_stage_config("il", variant="tiny")
    c.lock()
    c.planner.scan_layers, c.planner.remat_policy = True, "dots_saveable"  # reachable by --config.planner.<key>
    assert PlannerConfig.from_mapping(c.planner) == planner_config("tiny", scan_layers=True,
                                                                   remat_policy="dots_saveable")


def test_vit_per_head_forward_equals_the_einsum_path_and_keeps_its_gradients(monkeypatch):
    """The tiny InternViT (17 tokens a tile) with 'auto' picking 'per_head' (threshold lowered to 1): features within
    1e-6 of the einsum path's, and its parameter gradients bitwise the einsum path's (the custom VJP is that path)."""
    monkeypatch.setattr(kernels, "PER_HEAD_MIN_QUERIES", 1)
    cfg = iv.get_config("tiny")
    models = {impl: iv.init_model(dataclasses.replace(cfg, attention_impl=impl), seed=1) for impl in ("xla", "auto")}
    pv = _rand(np.random.default_rng(2), 3, 56, 56, 3)

    def run(m):
        graphdef, state = nnx.split(m.vision_model)
        f = lambda st: jnp.sum(nnx.merge(graphdef, st)(pv) ** 2)  # noqa: E731
        return jax.jit(lambda st: nnx.merge(graphdef, st)(pv))(state), jax.jit(jax.grad(f))(state)

    (ref, ref_g), (got, got_g) = run(models["xla"]), run(models["auto"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6, rtol=0)
    for a, c in zip(jax.tree.leaves(ref_g), jax.tree.leaves(got_g)):
        np.testing.assert_array_equal(np.asarray(c), np.asarray(a))


# 'auto' (the default) is what the existing parity tests run; here every model on the jax.nn kernel.
@pytest.mark.slow  # the kernel equality above at fp32 carries it into the default suite
def test_planner_torch_parity_with_jax_nn_attention():
    planner_parity._check(planner_config("tiny", attention_impl="jax_nn"), 0)  # a self and a cross block


@pytest.mark.slow  # the default parity tests run Qwen2 on jax.nn ('auto' at fp32); here the ViT too
def test_internvl_hf_parity_with_jax_nn_attention():
    """Bidirectional ViT (MHA) and the causal, left-padded GQA LLM through the same transformers parity as
    test_internvl_parity, with jax.nn's kernel."""
    impl = "jax_nn"
    import test_internvl_parity as ivp
    cfg = iv.get_config("tiny")
    tm = ivp.hf_model(cfg)
    jm = ivp.flax_from(tm, dataclasses.replace(cfg, attention_impl=impl))
    ids, mask = ivp.batch_two_rows()
    torch.manual_seed(2)
    pv = torch.randn(5, 3, 56, 56)
    flags = np.array([1, 1, 1, 1, 0])
    with torch.no_grad():
        ref = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=pv[:4],
                 position_ids=ivp.hf_positions(mask)).logits.numpy()
    out = jm(jnp.asarray(ids), jnp.asarray(mask), ivp.nhwc(pv), image_flags=jnp.asarray(flags))["logits"]
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=ivp.TOL, rtol=0)


def test_config_keys_are_validated_naming_them():
    with pytest.raises(config_types.ConfigError, match="config.model.remat_policy"):
        config_types.from_mapping(config_types.ModelConfig, {"remat_policy": "some"}, "model")
    with pytest.raises(config_types.ConfigError, match="config.model.attention_impl"):
        config_types.from_mapping(config_types.ModelConfig, {"attention_impl": "flash"}, "model")
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        PlannerConfig.from_mapping({"variant": "tiny", "attention_impl": "flash"})
    with pytest.raises(ValueError, match="remat_policy='some'"):
        PlannerConfig.from_mapping({"variant": "tiny", "remat_policy": "some"})
    with pytest.raises(ValueError, match="remat_policy 'some'"):
        iv.get_config("tiny", remat_policy="some")


# --------------------------------------------------------------------------------------------- scanned DiT

def _cond(cfg, g, b=2, length=6):
    return dict(vl_states=_rand(g, b, length, cfg.vl_dim), status=_rand(g, b, 8), history=_rand(g, b, 4, 3))


@pytest.mark.parametrize("layers_,interleave", [(3, True), pytest.param(2, False, marks=pytest.mark.slow)],
                         ids=["pairs-then-odd-self", "all-cross"])
def test_scanned_dit_equals_the_block_list(layers_, interleave):
    """Forward and parameter gradients of the scanned layout equal the list layout's (same weights) to 1e-6."""
    cfg = planner_config("tiny", num_layers=layers_, interleave=interleave)
    listed = build_planner(cfg, nnx.Rngs(0))
    scanned = build_planner(cfg.replace(scan_layers=True), nnx.Rngs(1))
    p = planner_params(listed)
    assert blocks_layout(p) == "list"
    load_planner_params(scanned, stack_blocks(p))
    assert blocks_layout(planner_params(scanned)) == "scanned"
    g = np.random.default_rng(3)
    cond, x, t = _cond(cfg, g), _rand(g, 2, 8, 3), jnp.array([3, 71])
    models = [nnx.split(listed), nnx.split(scanned)]

    @jax.jit
    def both(states):  # one compiled function for both layouts
        return [jax.value_and_grad(lambda s, gd=gd: jnp.mean(jnp.square(nnx.merge(gd, s).predict_noise(x, t, cond))))(
            st) for (gd, _), st in zip(models, states)]

    (l0, g0), (l1, g1) = both([st for _, st in models])
    g0, g1 = nnx.to_pure_dict(g0), nnx.to_pure_dict(g1)
    assert abs(float(l0) - float(l1)) <= 1e-6 * max(1.0, abs(float(l0)))
    g1 = unstack_blocks(g1)
    flat0, flat1 = conv._flatten(g0), conv._flatten(g1)
    assert flat0.keys() == flat1.keys()
    for key in flat0:
        np.testing.assert_allclose(np.asarray(flat1[key]), np.asarray(flat0[key]), atol=1e-6, rtol=0,
                                   err_msg=str(key))
    # the stacked parameters carry the `layers` logical axis in front
    specs = nnx.get_partition_spec(nnx.state(scanned, nnx.Param))
    q_spec = specs["model"]["transformer_blocks"]["attn"]["to_q"]["kernel"]
    assert tuple(q_spec.get_value()) == ("layers", "embed", "heads")


def test_scanned_layout_converts_both_ways_and_round_trips(tmp_path, capsys):
    cfg = planner_config("tiny4")
    tm = TorchPlanner(vl_dim=cfg.vl_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                      output_dim=cfg.output_dim, mlp_hidden=cfg.mlp_hidden)
    randomize_(tm, 5)
    sd = lightning_state_dict(tm)
    scfg = cfg.replace(scan_layers=True)
    params = conv.torch_state_dict_to_params(sd, scfg, verbose=False)
    assert blocks_layout(params) == "scanned"
    assert params["model"]["transformer_blocks"]["attn"]["to_q"]["kernel"].shape == (4, 32, 32)
    back = conv.params_to_torch_state_dict(params, scfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    listed_params = conv.torch_state_dict_to_params(sd, cfg, verbose=False)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                    jax.tree.leaves(stack_blocks(listed_params))))
    # CLI: --from-torch --scan-layers writes the stacked layout (and says so in planner_config.json); --to-torch
    # gives the upstream state dict back bit for bit
    src = tmp_path / "in.pt"
    conv.save_torch_file(sd, src)
    assert conv.main(["--from-torch", str(src), "--out", str(tmp_path / "orbax"), "--scan-layers"]) == 0
    assert json.loads((tmp_path / "orbax" / "planner_config.json").read_text())["scan_layers"] is True
    loaded_cfg, loaded = conv.load_planner_checkpoint(tmp_path / "orbax")
    assert loaded_cfg == scfg and blocks_layout(loaded) == "scanned"
    assert conv.main(["--to-torch", str(tmp_path / "orbax"), "--out", str(tmp_path / "out.pt")]) == 0
    out = conv.load_torch_file(tmp_path / "out.pt")
    assert set(out) == set(sd) and all(torch.equal(out[k], v) for k, v in sd.items())
    # either layout's params load into either planner through to_layout
    listed = build_planner(cfg, nnx.Rngs(0))
    load_planner_params(listed, to_layout(loaded, cfg))
    np.testing.assert_array_equal(np.asarray(listed.model.transformer_blocks[3].attn.to_q.kernel[...]),
                                  sd["agent.action_head.model.transformer_blocks.3.attn.to_q.weight"].numpy().T)
    capsys.readouterr()


# --------------------------------------------------------------------------------------------- remat policies

def _checkpoint_policies(jaxpr) -> list:
    """The `policy` of every jax.checkpoint (remat) equation in a closed jaxpr, nested ones included."""
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
                found.append(eqn.params.get("policy"))
            for p in eqn.params.values():
                for x in (p if isinstance(p, (tuple, list)) else (p,)):
                    if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                        walk(x.jaxpr)
                    elif hasattr(x, "eqns"):
                        walk(x)
    walk(jaxpr.jaxpr)
    return found


def _forward_jaxpr(module, fn):
    graphdef, state = nnx.split(module)
    return jax.make_jaxpr(lambda s: fn(nnx.merge(graphdef, s)))(state)


POLICY_FNS = {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable,
              "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _check_policies(found, policy, n):
    assert len(found) == n, (policy, len(found))
    if policy in POLICY_FNS:
        assert all(f is POLICY_FNS[policy] for f in found), policy
    else:  # save_attention_out: a names policy
        assert all(f is not None and f not in POLICY_FNS.values() for f in found), policy


def test_each_remat_policy_reaches_jax_checkpoint():
    """The configured policy is the one on every checkpoint in the traced forward: the planner's blocks (list: one
    per block; scanned: one per block kind in the scan body) and both InternVL towers' scan bodies."""
    cfg = planner_config("tiny", num_layers=3)
    g = np.random.default_rng(6)
    cond, x, t = _cond(cfg, g), _rand(g, 2, 8, 3), jnp.array([1, 2])
    ids = jnp.array([[1, 3] + [5] * 4 + [4, 9, 10]])
    pv = jax.random.normal(jax.random.key(0), (1, 56, 56, 3))
    for scan in (False, True):
        base = build_planner(cfg.replace(scan_layers=scan), nnx.Rngs(0))
        assert _checkpoint_policies(_forward_jaxpr(base, lambda m: m.predict_noise(x, t, cond))) == []
        for policy in layers.REMAT_POLICIES:
            m = build_planner(cfg.replace(scan_layers=scan, remat=True, remat_policy=policy), nnx.Rngs(0))
            # scanned, 3 blocks: (self, cross) in the scan body + the odd last self block
            _check_policies(_checkpoint_policies(_forward_jaxpr(m, lambda m: m.predict_noise(x, t, cond))), policy, 3)
    for policy in layers.REMAT_POLICIES:
        m = iv.InternVLModel(iv.get_config("tiny", remat=True, remat_policy=policy), rngs=nnx.Rngs(0))
        _check_policies(_checkpoint_policies(_forward_jaxpr(m, lambda m: m(ids, None, pv)["logits"])), policy, 2)


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["scanned", "list"])
def test_planner_gradients_identical_across_remat_policies(scan):
    """Loss and parameter gradients without remat and under every policy (fp32, tiny; one compiled function)."""
    cfg = planner_config("tiny", scan_layers=scan)
    g = np.random.default_rng(6)
    cond, x, t = _cond(cfg, g), _rand(g, 2, 8, 3), jnp.array([3, 71])
    base = build_planner(cfg, nnx.Rngs(0))
    variants = [(p, nnx.graphdef(build_planner(cfg.replace(remat=True, remat_policy=p), nnx.Rngs(0))))
                for p in layers.REMAT_POLICIES]
    graphdef, state = nnx.split(base)

    @jax.jit
    def all_grads(state):
        def loss(gd):
            return lambda s: jnp.mean(jnp.square(nnx.merge(gd, s).predict_noise(x, t, cond)))
        return [jax.value_and_grad(loss(gd))(state) for gd in [graphdef] + [gd for _, gd in variants]]

    (l0, g0), *rest = all_grads(state)
    for (policy, _), (l1, g1) in zip(variants, rest):
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6, err_msg=policy)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0, err_msg=policy)


@pytest.mark.slow
def test_internvl_gradients_identical_across_remat_policies():
    """Both towers' gradients unchanged by each policy (fp32, tiny; the default suite has 'full' in
    test_internvl_parity.test_remat_bf16_and_logical_axes)."""
    cfg = iv.get_config("tiny")
    ids = jnp.array([[1, 3] + [5] * 4 + [4, 9, 10]])
    pv = jax.random.normal(jax.random.key(0), (1, 56, 56, 3))
    labels = jnp.where(ids == 5, -100, ids)

    def loss_fn(model):
        return iv.lm_loss(model(ids, None, pv)["logits"], labels)[0]

    base = iv.InternVLModel(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(base, nnx.Param)
    l0, g0 = nnx.jit(nnx.value_and_grad(loss_fn))(base)
    for policy in layers.REMAT_POLICIES:
        m = iv.InternVLModel(dataclasses.replace(cfg, remat=True, remat_policy=policy), rngs=nnx.Rngs(0))
        nnx.update(m, params)
        l1, g1 = nnx.jit(nnx.value_and_grad(loss_fn))(m)
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0, err_msg=policy)


def test_orbax_params_of_the_other_layout_fail_naming_scan_layers(tmp_path):
    """An Orbax parameter tree written with one block layout, restored onto a planner of the other: one error that
    says which layout the checkpoint has and names the key (either way round)."""
    from recogdrive_jax.models.planner import abstract_planner
    from recogdrive_jax.train import checkpoint as ckpt_lib

    cfg = planner_config("tiny")
    params = planner_params(build_planner(cfg, nnx.Rngs(0)))
    path = str(tmp_path / "params")
    ckpt_lib.save_params(path, jax.tree.map(jnp.asarray, params))  # the list layout
    scanned = planner_params(abstract_planner(cfg.replace(scan_layers=True)))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match="stores one entry per layer.*config.planner.scan_layers"):
        ckpt_lib.load_params(path, ckpt_lib.attach_shardings(scanned, jax.tree.map(lambda _: one, scanned)))
    shapes = lambda tree: {k: tuple(np.shape(v)) for k, v in ckpt_lib.flat_by_path(tree).items()}  # noqa: E731
    assert "stores stacked layers" in ckpt_lib._mismatch(shapes(stack_blocks(params)), shapes(params))
    assert "scan_layers" not in (ckpt_lib._mismatch(shapes(params), shapes(planner_params(
        abstract_planner(planner_config("tiny4"))))) or "")  # another model size: no layout hint
