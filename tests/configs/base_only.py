"""The common keys alone, to exercise the CLI's validation."""
from recogdrive_jax import configs


def get_config():
    return configs.base_config()
