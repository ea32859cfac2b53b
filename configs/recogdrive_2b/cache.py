"""ReCogDrive-2B `cache` stage with upstream's recipe: see `recogdrive_jax/recipes.py` for the values and commands."""
from recogdrive_jax import recipes


def get_config():
    return recipes.cache("2b")
