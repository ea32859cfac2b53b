"""Registry of stages: `config.stage` names one; each module defines `run(config, workdir) -> dict`.

Modules are imported lazily so `--config.stage=il` does not import the VLM stack.
"""
import importlib

from recogdrive_jax.configs import STAGE_NAMES
from recogdrive_jax.errors import UserError

# name -> module defining `run(config, workdir)`; the names are configs.STAGE_NAMES (what validation accepts).
STAGES = {name: f"recogdrive_jax.stages.{name}" for name in STAGE_NAMES}


class UnknownStageError(UserError):
    pass


def get_stage(name: str):
    """Returns the `run` function of stage `name`."""
    if name not in STAGES:
        raise UnknownStageError(f"config.stage: unknown stage {name!r}; allowed: {sorted(STAGES)}")
    try:
        module = importlib.import_module(STAGES[name])
    except ModuleNotFoundError as e:
        if e.name == STAGES[name]:
            raise UnknownStageError(f"config.stage: stage {name!r} is not implemented yet in this build") from None
        raise
    return module.run
