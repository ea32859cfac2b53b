"""The InternVL port under FSDP + tensor parallelism on 8 host devices gives the unsharded logits."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recogdrive_jax.convert import internvl as cv
from recogdrive_jax.models import internvl as iv
from recogdrive_jax.parallel import sharding as shd
from recogdrive_jax.parallel.mesh import make_mesh
from test_internvl_parity import hf_model


def test_fsdp_tensor_parallel_forward_matches():
    cfg = iv.get_config("tiny")
    sd = {k: v.detach().numpy() for k, v in hf_model(cfg, seed=11).state_dict().items()}
    jm = cv.load_hf_model(sd, cfg)
    ids = jnp.array([[1, 3] + [5] * 4 + [4, 9, 10, 11]] * 4)
    pv = jax.random.normal(jax.random.key(0), (4, 56, 56, 3))
    want = np.asarray(jm(ids, None, pv)["logits"])

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, params = nnx.split(jm, nnx.Param)
    specs = shd.param_partition_specs(nnx.to_pure_dict(params), shd.logical_specs(params), mesh, fsdp=True)
    # tensor parallelism really applies to the LLM projections
    assert "tensor" in str(specs["language_model"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"])
    assert "tensor" in str(specs["language_model"]["lm_head"]["kernel"])
    sharded = jax.device_put(nnx.to_pure_dict(params), shd.to_shardings(mesh, specs))

    @jax.jit
    def fwd(p, ids, pv):
        st = nnx.state(nnx.merge(graphdef, params))
        nnx.replace_by_pure_dict(st, p)
        return nnx.merge(graphdef, st)(ids, None, pv)["logits"]

    got = fwd(sharded, jax.device_put(ids, shd.batch_sharding(mesh, 2)), pv)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
