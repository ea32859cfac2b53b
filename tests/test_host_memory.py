"""config.host.malloc: 'reuse' keeps XLA CPU's per-execution temporaries mapped between steps (host_memory.py)."""
import json
import subprocess
import sys
import textwrap

import pytest

from recogdrive_jax import config_types as ct
from recogdrive_jax import configs, host_memory

# A jitted program whose temporaries (a [3000, 3000] fp32 product, 36 MB, above glibc's largest mmap threshold)
# are allocated and freed by XLA's CPU runtime on every call; minor page faults per call after the first.
_PROBE = textwrap.dedent("""
    import json, os, resource, sys
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core: threads interleave alike every run
    from recogdrive_jax import host_memory
    applied = host_memory.apply_malloc_policy(sys.argv[1])
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: (jnp.sin(x[:, None] * x[None, :]) @ x).sum())
    x = jnp.linspace(0.0, 1.0, 3000)
    for _ in range(20):  # with 2+ threads the heap settles after a few calls (a temporary freed after the next
        f(x).block_until_ready()  # call's is allocated cannot be reused until freed neighbours coalesce)
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        f(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 10
    print(json.dumps({"applied": applied, "faults_per_call": faults}))
""")


def _probe(policy: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, policy], capture_output=True, text=True, timeout=300,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._libc() is None, reason="glibc only")
def test_reuse_keeps_temporaries_mapped():
    system, reuse = _probe("system"), _probe("reuse")
    assert not system["applied"] and reuse["applied"]
    # glibc's defaults: the 36 MB temporary is mmapped and faulted in again on every call (~8,800 4 KB pages)
    assert system["faults_per_call"] > 5000, system
    # reuse: the same pages come back from the heap
    assert reuse["faults_per_call"] < 200, reuse


def test_policy_names_checked():
    with pytest.raises(ValueError, match="malloc policy 'fast'"):
        host_memory.apply_malloc_policy("fast")
    c = configs.base_config()
    c.host.malloc = "fast"
    with pytest.raises(ct.ConfigError, match=r"config\.host\.malloc: unknown 'fast'"):
        ct.typed(c)


def test_pipeline_steps_get_the_process_wide_host_block():
    steps = {"il": configs.planner_stage_config("il"), "rl": configs.planner_stage_config("rl")}
    c = configs.pipeline_config(["il", "rl"], steps)
    assert c.host.malloc == "system"
    c.host.malloc = "reuse"
    assert "host.malloc" not in configs.overrides(c)  # process-wide, not an override slot
    for name in configs.step_names(c):
        assert configs.step_config(c, name).host.malloc == "reuse"


@pytest.mark.parametrize("policy,applied", [("reuse", "reuse"), ("system", None)])
def test_command_line_sets_the_policy_before_jax(policy, applied):
    """`python -m recogdrive_jax.main` applies config.host.malloc (after checking the config) in `_process_setup`;
    `run()`, the notebook API, leaves the process's allocator alone."""
    code = textwrap.dedent(f"""
        from recogdrive_jax import configs, host_memory, main
        c = configs.planner_stage_config("il")
        c.host.malloc = {policy!r}
        main._process_setup(c)
        print(repr(host_memory._applied))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    expected = applied if host_memory._libc() is not None else None
    assert out.stdout.strip().splitlines()[-1] == repr(expected)
