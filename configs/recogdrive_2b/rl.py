"""ReCogDrive-2B `rl` stage with upstream's recipe: see `recogdrive_jax/recipes.py` for the values and commands."""
from recogdrive_jax import recipes


def get_config():
    return recipes.rl("2b")
