"""`python -m recogdrive_jax.convert <command> ...`: checkpoint and cache conversion commands.

  planner              Lightning/PyTorch diffusion-planner checkpoint <-> Orbax (`--from-torch` / `--to-torch`)
  internvl             HF InternVL directory (native or remote-code layout) <-> Orbax (`--from-hf` / `--to-hf`)
  navsim-metric-cache  NAVSIM metric cache (pickles; needs the optional navsim install) -> npz scene store
  navsim-logs          NAVSIM/OpenScene log pickles + sensor blobs -> samples.npz (numpy only; runs in a NAVSIM env)
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "planner": "recogdrive_jax.convert.planner",
    "internvl": "recogdrive_jax.convert.internvl",
    "navsim-metric-cache": "recogdrive_jax.convert.navsim_metric_cache",
    "navsim-logs": "recogdrive_jax.convert.navsim_logs",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; allowed: {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
