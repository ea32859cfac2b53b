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

DEFAULT_CONFIG = "configs/demo.py"
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file (`path.py[:arg]`).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")

def _user_errors():
    from recogdrive_jax.errors import UserError
    from recogdrive_jax.train.checkpoint import CheckpointError
    from recogdrive_jax.train.loop import NonFiniteLossError
    return (UserError, CheckpointError, NonFiniteLossError, FileNotFoundError)


def fail(msg: str) -> None:
    """One `error:` line (a multi-line message is joined), exit status 2."""
    msg = " ".join(line.strip() for line in str(msg).splitlines() if line.strip())
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_workdir(workdir: str | None, stage: str | None = None, config=None) -> str:
    """The absolute workdir (a URL stays a URL), after writing and deleting a marker there: an unwritable local
    directory, an unreachable `gs://`/`s3://` URL or a remote one for a stage (or pipeline step) that writes local
    files only fails here, within seconds, naming it."""
    if not workdir:
        fail("--workdir is required")
    from recogdrive_jax import storage
    from recogdrive_jax.stages import remote_workdir_error  # the stages that write through `storage`
    refusal = remote_workdir_error(stage, workdir, config) if stage else None  # (a pipeline: each of its steps)
    if refusal:
        fail(refusal)
    try:
        return storage.check_writable(workdir)
    except storage.StorageError as e:
        fail(f"--workdir={e}")


def run(config, workdir: str) -> dict:
    """Validates, initialises multi-host JAX, and runs the configured stage. Importable from a notebook; the
    process-wide host malloc policy (config.host) is the command line's to set (`main`), or call
    `host_memory.apply_malloc_policy()` before JAX starts."""
    from recogdrive_jax import configs
    from recogdrive_jax.parallel import mesh as mesh_lib
    from recogdrive_jax.stages import get_stage
    configs.validate_common(config)
    mesh_lib.initialize_distributed(config.get("distributed"))
    import jax
    if config.stage != "pipeline":  # a pipeline checks each step's mesh before its first step runs
        mesh_lib.resolve_mesh_shape([config.mesh.data, config.mesh.fsdp, config.mesh.tensor], jax.device_count())
    return get_stage(config.stage)(config, workdir)


def _process_setup(config) -> None:
    """What the command line sets for the whole process before JAX starts its threads: the host malloc policy
    (`config.host.malloc`, host_memory.py; a pipeline's top-level `host` block), after the config is checked."""
    from recogdrive_jax import config_types, configs, host_memory
    configs.validate_common(config)
    host_memory.apply_malloc_policy(config.host.malloc if "host" in config else config_types.HostConfig.malloc)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; use --config.<key>=<value> to override config values")
    workdir = check_workdir(_WORKDIR.value, _CONFIG.value.get("stage"), _CONFIG.value)
    logging.set_verbosity(logging.INFO if os.environ.get("RECOGDRIVE_VERBOSE") else logging.WARNING)
    try:
        _process_setup(_CONFIG.value)
        run(_CONFIG.value, workdir)
    except _user_errors() as e:
        fail(str(e))


def _config_arg(argv) -> str:
    """The `--config` value as given (`path.py[:arg]`), for messages."""
    for k, a in enumerate(argv[1:], 1):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and k + 1 < len(argv):
            return argv[k + 1]
    return DEFAULT_CONFIG


def _config_file_error(text: str) -> str:
    """The exception at the end of the traceback that ml_collections embeds when a config file's `get_config`
    raises (absl keeps only the first line, "Error whilst parsing config file:"), plus where it was raised."""
    tb = text.rsplit("Traceback (most recent call last):", 1)[-1]
    lines = tb.splitlines()
    frames = [m for m in (re.match(r'\s*File "([^"]+)", line (\d+)', l) for l in lines) if m]
    body = [l for l in lines if l.strip() and not l.startswith(" ")]
    exc = " ".join(l.strip() for l in body) or "unknown error"
    name, _, msg = exc.partition(": ")
    if name == "ValueError" or name.startswith("recogdrive_jax."):  # a user error: its message says it all
        return msg or exc
    where = f" ({frames[-1][1]}:{frames[-1][2]})" if frames else ""
    return exc + where


def _flags_parser(argv):
    """absl's default parser prints a traceback-free message but exits 1; normalise it to one line, exit 2.

    Config-file faults end here too: a missing file (ml_collections defers it to the first access of the config),
    a `get_config` that raises (its message, not absl's cut-off first line) and a syntax error."""
    cfg = _config_arg(argv)
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        text = str(e)
        if "Error whilst parsing config file" in text:
            fail(f"--config={cfg}: {_config_file_error(text)}")
        fail(text.splitlines()[0] if text else type(e).__name__)
    except OSError as e:  # an override applied to a config file that failed to load
        if "earlier failure to load" not in str(e):
            raise
        fail(_config_load_error(cfg, e))
    except SyntaxError as e:
        fail(f"--config={cfg}: syntax error in {e.filename}:{e.lineno}: {e.msg}")
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a key the config lacks.
        text = re.sub(r"\\n|\n", " ", str(e.args[0] if e.args else e))
        text = re.sub(r"[\\'\"]", "", text).strip()
        key = text.split()[0] if text else "?"
        bad = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        fail(f"unknown config key in {bad[0] if bad else 'a --config override'}: {text}")
    try:  # ml_collections keeps a config file that failed to load as a placeholder raising on first access
        flags.FLAGS["config"].value.get("stage")
    except OSError as e:
        fail(_config_load_error(cfg, e))
    return rest


def _config_load_error(cfg: str, e: OSError) -> str:
    cause = e.__cause__ or e
    detail = [l.strip() for l in str(cause).splitlines() if l.strip()]
    return f"--config={cfg}: cannot load the config file: {detail[-1] if detail else cause} (cwd {os.getcwd()})"


if __name__ == "__main__":
    app.run(main, flags_parser=_flags_parser)
