"""Side-by-side table of `eval_nav` runs grouped by method, mean ± sd over seeds (the SFT-vs-RL comparison).

    python -m recogdrive_jax.eval.nav_compare "SFT early=runs/eval_sft_early" \
        "PPO=runs/eval_ppo_s0,runs/eval_ppo_s1,runs/eval_ppo_s2" "SFT cont.=runs/eval_sftc_s0,..." [--out FILE]

Each path is an eval_nav workdir (or its `eval_nav/` folder); every split found in the first run is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from recogdrive_jax.eval import table_cli

METRICS = (("per_step_accuracy", "per-step acc."), ("success_rate", "success"))


def load_run(path: str) -> dict[str, dict]:
    """{split: metrics} of one eval_nav run."""
    root = path if os.path.basename(os.path.normpath(path)) == "eval_nav" else os.path.join(path, "eval_nav")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{path}: no eval_nav/ folder (is it an eval_nav workdir?)")
    out = {}
    for split in sorted(os.listdir(root)):
        f = os.path.join(root, split, "metrics.json")
        if os.path.isfile(f):
            out[split] = json.load(open(f))
    if not out:
        raise FileNotFoundError(f"{root}: no <split>/metrics.json")
    return out


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def table(groups: list[tuple[str, list[str]]], splits: list[str] | None = None) -> str:
    """Markdown: one row per group, per split the per-step accuracy and success rate in % (mean ± sd)."""
    runs = [(name, [load_run(p) for p in paths]) for name, paths in groups]
    splits = splits or list(runs[0][1][0])
    head = "| method | seeds | " + " | ".join(f"{s} {label}" for s in splits for _, label in METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(splits) * len(METRICS))]
    for name, rs in runs:
        cells = []
        for s in splits:
            missing = [i for i, r in enumerate(rs) if s not in r]
            if missing:
                raise KeyError(f"group {name!r}: run {missing[0]} has no split {s!r}")
            cells += [_cell([r[s][k] for r in rs]) for k, _ in METRICS]
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    routes = {s: runs[0][1][0][s].get("num_routes") for s in splits}
    lines.append("")
    lines.append("Routes per split: " + ", ".join(f"{s} {n}" for s, n in routes.items()) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="+", help="NAME=EVAL_WORKDIR[,EVAL_WORKDIR...] (one per seed)")
    ap.add_argument("--splits", default="", help="comma-separated splits (default: all of the first run)")
    ap.add_argument("--out", default="", help="also write the table to this file")
    args = ap.parse_args(argv)

    def make_table() -> str:
        groups = [table_cli.parse_named_dirs(g, "NAME=PATH[,PATH...]") for g in args.groups]
        return table(groups, [s for s in args.splits.split(",") if s] or None)

    return table_cli.print_table(make_table, args.out, (ValueError, KeyError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
