"""The planner's IL loss and gradients on a tensor-parallel mesh equal the single-device ones, with the DiT's folded
cross-attention (`dit.cross_attention_folded` reads `to_v`'s kernel as [D, H, hd] while it is head-sharded) and
with the module path; the CPU attention paths that loop inside the jit on a split batch and split heads; 8 forced
CPU devices (conftest)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recogdrive_jax.models import dit
from recogdrive_jax.models.planner import build_planner, planner_config
from recogdrive_jax.parallel import activations as act
from recogdrive_jax.parallel import mesh as mesh_lib
from recogdrive_jax.parallel import sharding as sh
from recogdrive_jax.train.module_def import ModuleDef


def _batch(cfg, b=4, n=6, seed=0):
    g = np.random.default_rng(seed)
    mask = np.ones((b, n), bool)
    mask[1, 4:] = False  # a padded VL row
    return {"cond": {"vl_states": jnp.asarray(g.normal(size=(b, n, cfg.vl_dim)), jnp.float32),
                     "vl_mask": jnp.asarray(mask),
                     "status": jnp.asarray(g.normal(size=(b, 8)), jnp.float32),
                     "history": jnp.asarray(g.normal(size=(b, 4, 3)), jnp.float32)},
            "future": jnp.asarray(g.normal(size=(b, 8, 3)) * [10, 2, 0.2] + [15, 0, 0], jnp.float32)}


def _loss_and_grads(mdef, params, batch, fold: bool):
    def loss(p):
        m = dit.set_fold_cross(mdef.bind(p), fold)
        return m.loss(batch, jax.random.key(3))[0]
    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("fold", [True, False])
def test_planner_loss_and_grads_on_a_tensor_parallel_mesh_equal_one_device(fold, monkeypatch):
    taken = []
    folded = dit.cross_attention_folded
    monkeypatch.setattr(dit, "cross_attention_folded", lambda *a, **k: taken.append(folded(*a, **k)) or taken[-1])
    cfg = planner_config("tiny4")  # 4 heads: head-sharded 4 ways
    mdef = ModuleDef(lambda r: build_planner(cfg, r))
    params = mdef.init(jax.random.key(0))
    batch = _batch(cfg)
    ref_loss, ref_grads = jax.jit(lambda p, b: _loss_and_grads(mdef, p, b, fold))(params, batch)

    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    specs = sh.param_partition_specs(mdef.abstract_params(), mdef.logical, mesh)
    shardings = sh.to_shardings(mesh, specs)
    to_v = [s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)
            if "to_v" in jax.tree_util.keystr(p) and "kernel" in jax.tree_util.keystr(p)]
    assert to_v and all("tensor" in str(s) for s in to_v), to_v  # the value heads are split over the mesh
    sharded = jax.device_put(params, shardings)
    sbatch = jax.device_put(batch, sh.batch_sharding(mesh))
    with act.activation_sharding(mesh):
        fn = jax.jit(lambda p, b: _loss_and_grads(mdef, p, b, fold), out_shardings=(sh.replicated(mesh), shardings))
        loss, grads = fn(sharded, sbatch)
    assert any(t is not None for t in taken) == fold  # the folded path ran (or the module path did)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("impl,heads,kv_heads", [("per_head", 4, 4), ("chunked", 4, 2)])
def test_blocked_attention_on_a_sharded_batch_equals_one_device(impl, heads, kv_heads):
    """The CPU attention paths that loop over (batch row, head) or query blocks inside the jit ('per_head', and
    'chunked' whose no-gradient forward is per head) give one device's output and gradients with the batch split over
    `data` and the heads over `tensor` (8 forced CPU devices)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from recogdrive_jax.models import layers
    g = np.random.default_rng(0)
    b, t, hd = 4, 19, 8
    q = jnp.asarray(g.normal(size=(b, t, heads, hd)), jnp.float32)
    k, v = (jnp.asarray(g.normal(size=(b, t, kv_heads, hd)), jnp.float32) for _ in range(2))
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & jnp.asarray(g.random((b, 1, t)) > 0.2)
    cot = jnp.asarray(g.normal(size=q.shape), jnp.float32)

    def fn(q, k, v, mask):
        out = layers.dot_product_attention(q, k, v, mask, impl=impl)
        grads = jax.grad(lambda *a: jnp.sum(layers.dot_product_attention(*a, mask, impl=impl) * cot),
                         argnums=(0, 1, 2))(q, k, v)
        return out, grads

    ref = jax.jit(fn)(q, k, v, mask)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    heads_spec = NamedSharding(mesh, P("data", None, "tensor" if kv_heads % 4 == 0 else None, None))
    qs = jax.device_put(q, NamedSharding(mesh, P("data", None, "tensor", None)))
    ks, vs = (jax.device_put(x, heads_spec) for x in (k, v))
    got = jax.jit(fn)(qs, ks, vs, jax.device_put(mask, NamedSharding(mesh, P("data"))))
    # rtol: dK/dV sum the R query heads of a kv head, which the head split puts on different devices (another order)
    for a, c in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-6, rtol=1e-6)
