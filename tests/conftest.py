import os
import sys

# Tests run with 8 forced host devices (the Makefile sets this too; this keeps a bare `pytest` equivalent).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import recogdrive_jax  # noqa: E402,F401  (flax config before any model is built)
