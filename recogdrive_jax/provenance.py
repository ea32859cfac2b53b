"""What produced a run: the git commit, package versions and devices, recorded in every `WORKDIR/config.json`.

Every stage that writes its config calls `write_config`, so a number in a report can be traced to the code, the
libraries and the hardware that made it. Nothing here may fail a run: outside a git checkout the commit is None,
a missing package's version is None.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import subprocess
import sys
from typing import Any, Mapping

from recogdrive_jax import storage

# Distributions whose versions change numbers or checkpoint formats.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore", "transformers", "numpy",
            "ml_collections")


def _git(*args: str) -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        r = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_info() -> dict[str, Any]:
    """{'commit': sha or None, 'dirty': bool or None} of the checkout this package is imported from."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict[str, Any]:
    import jax
    devices = jax.devices()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "device_count": len(devices),
            "local_device_count": jax.local_device_count(), "process_count": jax.process_count()}


def provenance() -> dict[str, Any]:
    """The block `config.json` carries under the key `provenance`."""
    return {"git": git_info(), "packages": package_versions(), "devices": device_info(),
            "python": sys.version.split()[0], "argv": list(sys.argv)}


def write_config(config, workdir: str, extra: Mapping[str, Any] | None = None) -> str:
    """Writes WORKDIR/config.json: the resolved config, `provenance`, and `extra` keys (e.g. the checkpoint an eval
    scored). Process 0 only; returns the path."""
    import jax
    path = storage.join(workdir, "config.json")
    if jax.process_index() != 0:
        return path
    data = json.loads(config.to_json_best_effort())
    data["provenance"] = provenance()
    for key, value in (extra or {}).items():
        data[key] = value
    storage.write_text(path, json.dumps(data, indent=2, default=str))  # atomic, local or remote
    return path


def read_config(workdir: str) -> dict:
    return json.loads(storage.read_text(storage.join(workdir, "config.json")))
