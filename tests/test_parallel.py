"""Mesh construction, logical→mesh rules, ZeRO-1 and FSDP specs, measured on 8 forced CPU devices."""
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from recogdrive_jax.parallel import mesh as mesh_lib
from recogdrive_jax.parallel import sharding as sh
from recogdrive_jax.train import loop, optim
from recogdrive_jax.train.state import init_train_state

import toy_task


def test_eight_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("sizes,expected", [((-1, 1, 1), (8, 1, 1)), ((2, -1, 1), (2, 4, 1)),
                                            ((1, 1, -1), (1, 1, 8)), ((2, 2, 2), (2, 2, 2))])
def test_mesh_fill(sizes, expected):
    assert mesh_lib.resolve_mesh_shape(sizes, 8) == expected


@pytest.mark.parametrize("sizes,match", [((3, -1, 1), "do not divide"), ((2, 2, 1), "multiply to 4"),
                                         ((-1, -1, 1), "only one axis"), ((0, 1, 1), "config.mesh.data")])
def test_mesh_errors(sizes, match):
    with pytest.raises(mesh_lib.MeshError, match=match):
        mesh_lib.resolve_mesh_shape(sizes, 8)


def test_logical_rules_unknown_name():
    with pytest.raises(KeyError, match="no sharding rule"):
        sh.logical_to_mesh(("embd",))


def _toy_state(mesh_sizes, zero1=True):
    config = toy_task.toy_config()
    task = toy_task.make_task(config)
    mesh = mesh_lib.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_sizes)))
    abstract_params = jax.eval_shape(task.init_params, jax.random.key(0))
    tx = optim.make_optimizer(config.optim, 10, abstract_params)
    abstract = jax.eval_shape(lambda p: init_train_state(p, tx), abstract_params)
    shardings = loop.state_shardings(abstract, task.logical, mesh, tx, zero1)
    state = jax.jit(lambda r: init_train_state(task.init_params(r), tx), out_shardings=shardings)(jax.random.key(0))
    return state, shardings


def _adam_moments(opt_state):
    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert adam
    return [(s.mu, s.nu) for s in adam]


def test_zero1_moments_sharded_params_replicated():
    state, shardings = _toy_state((8, 1, 1), zero1=True)
    moments = _adam_moments(state.opt_state)
    total = sum(x.nbytes for x in jax.tree.leaves(moments))
    per_device = sh.addressable_bytes(moments)
    # Large kernels are split 8 ways; tiny biases stay replicated (below MIN_SHARD_BYTES).
    small = sum(x.nbytes for x in jax.tree.leaves(moments) if x.nbytes < sh.MIN_SHARD_BYTES)
    assert per_device == pytest.approx((total - small) / 8 + small, rel=1e-6)
    assert per_device <= 1.01 * total / 8
    params_total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert sh.addressable_bytes(state.params) == params_total  # replicated
    kernel_spec = shardings.opt_state[1][0].mu["fc1"]["kernel"].spec
    assert "data" in jax.tree.leaves(tuple(kernel_spec))


def test_without_zero1_moments_replicated():
    state, _ = _toy_state((8, 1, 1), zero1=False)
    moments = _adam_moments(state.opt_state)
    assert sh.addressable_bytes(moments) == sum(x.nbytes for x in jax.tree.leaves(moments))


def test_fsdp_shards_params():
    state, shardings = _toy_state((1, 8, 1))
    total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    small = sum(x.nbytes for x in jax.tree.leaves(state.params) if x.nbytes < sh.MIN_SHARD_BYTES)
    assert sh.addressable_bytes(state.params) == pytest.approx((total - small) / 8 + small)
    assert shardings.params["fc1"]["kernel"].spec == P(None, ("tensor", "fsdp"))


def test_tensor_parallel_uses_logical_names():
    _, shardings = _toy_state((1, 1, 8))
    assert shardings.params["fc1"]["kernel"].spec == P(None, "tensor")  # ('embed', 'mlp')
    assert shardings.params["fc2"]["kernel"].spec == P("tensor", None)  # ('mlp', 'embed')
    assert all(e is None for e in shardings.params["fc1"]["bias"].spec)  # no logical names: replicated


def test_global_batch_sharded_over_data_and_fsdp():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    batch = sh.make_global_batch(mesh, {"x": np.arange(32, dtype=np.float32).reshape(16, 2)})
    assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
    assert len({s.device for s in batch["x"].addressable_shards}) == 8
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(32).reshape(16, 2))
