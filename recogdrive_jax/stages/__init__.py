"""Registry of stages: `config.stage` names one; each module defines `run(config, workdir) -> dict`.

Modules are imported lazily so `--config.stage=il` does not import the VLM stack.
"""
import importlib

from recogdrive_jax.configs import STAGE_NAMES, step_names
from recogdrive_jax import storage
from recogdrive_jax.errors import UserError

# name -> module defining `run(config, workdir)`; the names are configs.STAGE_NAMES (what validation accepts).
STAGES = {name: f"recogdrive_jax.stages.{name}" for name in STAGE_NAMES}


# Stages whose every output goes through `storage`, so a `gs://`/`s3://` workdir reaches the object store (a
# pipeline runs each step in WORKDIR/<step> and checks its steps against this list before the first one runs); the
# others still write with local-only libraries and refuse a remote workdir at start-up (`remote_workdir_error`)
# rather than create a local `gs:` directory.
REMOTE_WORKDIR_STAGES = ("sft", "cache", "il", "rl", "eval", "ppo", "eval_nav", "pipeline")


class UnknownStageError(UserError):
    pass


class RemoteWorkdirError(UserError):
    pass


def remote_workdir_error(stage: str, workdir: str, config=None) -> str | None:
    """The one-line refusal of a remote `workdir` for `stage` (None when the stage supports it or it is local);
    with the `config` of a pipeline, the first of its steps (`name` or `name:stage`) whose stage refuses it."""
    if stage == "pipeline" and config is not None and storage.is_remote(workdir):
        for entry in step_names(config):
            name, _, step_stage = entry.partition(":")
            if not step_stage and name in config.pipeline.configs:
                step_stage = config.pipeline.configs[name].stage
            refusal = remote_workdir_error(step_stage, storage.join(workdir, name))
            if refusal:
                return f"pipeline step {name!r}: {refusal}"
        return None
    if not storage.is_remote(workdir) or stage in REMOTE_WORKDIR_STAGES or stage not in STAGES:
        return None
    ok = ", ".join(REMOTE_WORKDIR_STAGES)
    return (f"--workdir={workdir}: stage {stage!r} writes local files only; a remote workdir works for the stages "
            f"{ok} (run {stage} on a local or mounted directory)")


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
