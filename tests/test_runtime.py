"""`parallel.runtime`: one mesh per run from the config (cache included), config-overridable logical rules, restores
straight onto the target shardings (no host copy), and the sharding checks (>= 1M-element parameters split under
FSDP, no silent replicate-everything)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from recogdrive_jax import configs, stage_configs
from recogdrive_jax.parallel import runtime as runtime_lib
from recogdrive_jax.parallel import sharding as sh
from recogdrive_jax.stages import cache as cache_stage
from recogdrive_jax.train import checkpoint as ckpt_lib
from recogdrive_jax.train.module_def import ModuleDef


class Wide(nnx.Module):
    """One 1M-element kernel (256 x 4096) with logical names (and small unannotated biases)."""

    def __init__(self, rngs, inp: int = 256, out: int = 4096):
        init = nnx.initializers.lecun_normal()
        self.fc = nnx.Linear(inp, out, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
        self.head = nnx.Linear(out, 8, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)


def _config(**mesh):
    c = configs.base_config()
    c.mesh.update(mesh)
    return c


class HostCopy(AssertionError):
    pass


def _no_host_copies(monkeypatch):
    """Device -> host conversion of a jax.Array raises: np.asarray / np.array / np.asanyarray of one, and
    jax.device_get (numpy arrays, e.g. the chunks TensorStore reads, pass)."""
    def refuse(*a, **k):
        raise HostCopy("a restore copied a device array to the host")

    def guarded(fn):
        def call(x, *a, **k):
            if isinstance(x, jax.Array):
                refuse()
            return fn(x, *a, **k)
        return call
    for name in ("asarray", "array", "asanyarray"):
        monkeypatch.setattr(np, name, guarded(getattr(np, name)))
    monkeypatch.setattr(jax, "device_get", refuse)


def test_restore_lands_on_fsdp8_target_shardings_without_host_copies(tmp_path, monkeypatch):
    mdef = ModuleDef(lambda rngs: Wide(rngs))
    saved = mdef.init(jax.random.key(1))
    ckpt_lib.save_params(str(tmp_path / "params"), saved)
    rt = runtime_lib.from_config(_config(data=1, fsdp=8))
    assert rt.mesh.shape["fsdp"] == 8
    targets = rt.targets(mdef.abstract_params(), mdef.logical)
    with monkeypatch.context() as m:
        _no_host_copies(m)
        with pytest.raises(HostCopy):  # the guard is live
            np.asarray(jnp.ones(2))
        restored = ckpt_lib.load_params(str(tmp_path / "params"), targets)
    flat_t = dict(jax.tree_util.tree_leaves_with_path(targets))
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
        assert leaf.sharding == flat_t[path].sharding, jax.tree_util.keystr(path)
        assert leaf.shape == flat_t[path].shape
    assert restored["fc"]["kernel"].sharding.spec != P()  # the 1M kernel is split, not replicated
    np.testing.assert_array_equal(np.asarray(restored["fc"]["kernel"]), np.asarray(saved["fc"]["kernel"]))


def test_large_parameter_that_fsdp_cannot_split_is_an_error_naming_it():
    rt = runtime_lib.from_config(_config(data=1, fsdp=8))
    ok = ModuleDef(lambda rngs: Wide(rngs))  # 256 x 4096: split over fsdp
    assert rt.param_specs(ok.abstract_params(), ok.logical)["fc"]["kernel"] != P()
    odd = ModuleDef(lambda rngs: Wide(rngs, inp=257, out=4099))  # >= 1M elements, no dim divisible by 8
    with pytest.raises(runtime_lib.ShardingError, match=r"\['fc'\]\['kernel'\] \(257, 4099\)"):
        rt.param_specs(odd.abstract_params(), odd.logical)
    runtime_lib.from_config(_config()).param_specs(odd.abstract_params(), odd.logical)  # fsdp = 1: no check


def test_missing_logical_names_are_an_error_not_replication():
    mdef = ModuleDef(lambda rngs: Wide(rngs))
    rt = runtime_lib.from_config(_config())
    with pytest.raises(runtime_lib.ShardingError, match="no logical axis names"):
        rt.param_specs(mdef.abstract_params(), None)
    explicit = rt.param_specs(mdef.abstract_params(), runtime_lib.replicate_all(mdef.abstract_params()))
    assert all(e is None for s in jax.tree.leaves(explicit, is_leaf=lambda x: isinstance(x, P)) for e in s)


def test_rules_come_from_the_config():
    assert runtime_lib.rules_block() == configs.base_config().parallel.rules.to_dict()  # one set of defaults
    c = _config(data=1, tensor=8)
    c.parallel.rules.mlp = ""  # mlp replicated instead of split over tensor
    c.parallel.rules.embed = "tensor"
    rt = runtime_lib.from_config(c)
    mdef = ModuleDef(lambda rngs: Wide(rngs))
    specs = rt.param_specs(mdef.abstract_params(), mdef.logical)
    assert specs["fc"]["kernel"] == P("tensor", None)
    assert runtime_lib.from_config(_config(data=1, tensor=8)).param_specs(
        mdef.abstract_params(), mdef.logical)["fc"]["kernel"] == P(None, "tensor")
    c.parallel.rules.batch = "data,bogus"
    with pytest.raises(runtime_lib.ShardingError, match=r"config.parallel.rules.batch=.*bogus"):
        runtime_lib.from_config(c)
    rt = runtime_lib.from_config(_config(data=2, fsdp=4))
    assert rt.global_batch({"x": np.zeros((16, 2), np.float32)})["x"].sharding.spec == P(sh.BATCH_AXES, None)


def test_cache_stage_builds_its_mesh_from_config_mesh(tmp_path, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def load_params(resolved, mdef, rt):
        seen["mesh"] = dict(rt.mesh.shape)
        raise Stop

    monkeypatch.setattr(cache_stage, "load_params", load_params)
    c = stage_configs.cache_stage_config()
    c.model.update(dict(variant="tiny", dtype="float32"))
    c.mesh.fsdp = 2
    with pytest.raises(Stop):
        cache_stage.run(c, str(tmp_path))
    assert seen["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
