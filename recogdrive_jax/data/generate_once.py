"""Generated datasets written once per workdir: a DONE marker, written last, records what was generated, so a
partial directory (a crash mid-write) or one generated for other settings is regenerated, and a resumed run
reuses a complete one."""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable


def generate_once(out_dir: str, key: dict, build: Callable[[], dict], barrier: str, each_process: bool = False) -> dict:
    """Runs `build()` (which writes into `out_dir` and returns a JSON-able dict) on process 0 unless `out_dir`
    holds a DONE marker with this `key`; all processes then meet at `barrier` and get the marker's dict.
    `each_process`: every process has its own `out_dir` (a local scratch copy) and builds it itself, no barrier."""
    import jax
    marker = os.path.join(out_dir, "DONE.json")
    if each_process or jax.process_index() == 0:
        done = json.load(open(marker)) if os.path.isfile(marker) else None
        if done is None or done.get("key") != key:
            shutil.rmtree(out_dir, ignore_errors=True)
            result = build()
            os.makedirs(out_dir, exist_ok=True)
            with open(marker, "w") as f:
                json.dump({"key": key, **result}, f)
    if jax.process_count() > 1 and not each_process:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(barrier)
    return json.load(open(marker))
