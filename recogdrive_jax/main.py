"""Entry point: `python -m recogdrive_jax.main --config=configs/<name>.py[:arg] [--config.a.b=v] --workdir=DIR`.

Dispatches `config.stage` through the registry in `stages/`. User mistakes (unknown stage, bad key or
type, unwritable workdir) end with one line naming the problem and exit status 2, never a traceback.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (`path.py[:arg]`).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")

def _user_errors():
    from recogdrive_jax.errors import UserError
    from recogdrive_jax.train.checkpoint import CheckpointError
    from recogdrive_jax.train.loop import NonFiniteLossError
    return (UserError, CheckpointError, NonFiniteLossError, FileNotFoundError)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_workdir(workdir: str | None) -> str:
    if not workdir:
        fail("--workdir is required")
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        fail(f"--workdir={workdir!r} is not writable: {e.strerror or e}")
    return workdir


def run(config, workdir: str) -> dict:
    """Validates, initialises multi-host JAX, and runs the configured stage. Importable from a notebook."""
    from recogdrive_jax import configs
    from recogdrive_jax.parallel import mesh as mesh_lib
    from recogdrive_jax.stages import get_stage
    configs.validate_common(config)
    mesh_lib.initialize_distributed(config.get("distributed"))
    import jax
    mesh_lib.resolve_mesh_shape([config.mesh.data, config.mesh.fsdp, config.mesh.tensor], jax.device_count())
    return get_stage(config.stage)(config, workdir)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; use --config.<key>=<value> to override config values")
    workdir = check_workdir(_WORKDIR.value)
    logging.set_verbosity(logging.INFO if os.environ.get("RECOGDRIVE_VERBOSE") else logging.WARNING)
    try:
        run(_CONFIG.value, workdir)
    except _user_errors() as e:
        fail(str(e))


def _flags_parser(argv):
    """absl's default parser prints a traceback-free message but exits 1; normalise it to one line, exit 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a key the config lacks.
        text = re.sub(r"\\n|\n", " ", str(e.args[0] if e.args else e))
        text = re.sub(r"[\\'\"]", "", text).strip()
        key = text.split()[0] if text else "?"
        bad = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        fail(f"unknown config key in {bad[0] if bad else 'a --config override'}: {text}")


if __name__ == "__main__":
    app.run(main, flags_parser=_flags_parser)
