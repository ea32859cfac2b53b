"""The config a `python -m recogdrive_jax.main ...` command line resolves to, parsed in-process by the same
ml_collections flag machinery as main.py (so a test sees exactly what the command would run)."""
from absl import flags
from ml_collections import config_flags


def parse_config(*args: str):
    """`parse_config('--config=configs/demo.py:il', '--config.train.num_steps=2')` → the locked ConfigDict."""
    argv = ["prog", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
    rest = fv(argv, known_only=True)[1:]
    unknown = [a for a in rest if not a.startswith("--workdir")]
    if unknown:
        raise ValueError(f"unknown command-line arguments {unknown}")
    return fv["config"].value
