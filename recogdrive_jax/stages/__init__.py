"""Registry of stages: `config.stage` names one; each module defines `run(config, workdir) -> dict`.

Modules are imported lazily so `--config.stage=il` does not import the VLM stack.
"""
import importlib
from recogdrive_jax.errors import UserError

# name -> module defining `run(config, workdir)`.
STAGES = {
        "pipeline": "recogdrive_jax.stages.pipeline",
        "sft": "recogdrive_jax.stages.sft",
        "cache": "recogdrive_jax.stages.cache",
        "il": "recogdrive_jax.stages.il",
        "rl": "recogdrive_jax.stages.rl",
        "eval": "recogdrive_jax.stages.eval",
        "ppo": "recogdrive_jax.stages.ppo",
        "eval_nav": "recogdrive_jax.stages.eval_nav",
        "navsim_convert": "recogdrive_jax.stages.navsim_convert",
}


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
