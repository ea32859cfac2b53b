import os
import sys

# Tests run with 8 forced host devices and XLA's backend optimisation off (compile time; see the Makefile's
# TEST_XLA_FLAGS, which sets the same; this keeps a bare `pytest` equivalent).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import recogdrive_jax  # noqa: E402,F401  (flax config before any model is built)


def subprocess_env(devices: int = 8, **extra) -> dict:
    """The environment for a test's `python -m recogdrive_jax...` subprocess: `devices` forced host CPU devices and
    the same backend optimisation level as the suite (compile time)."""
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)
