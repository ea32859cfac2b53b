"""The "planners that see" evidence table (issue 18): rows × seeds of `il` / `il_joint` / `eval` runs, mean ± sd of
PDMS, EPDMS, ADE, wall-clock per row, and paired differences with the 2-sd "beats" rule.

    python -m recogdrive_jax.eval.evidence "CV=runs/see/cv" "scene-token IL=runs/see/s0/il_tokens,runs/see/s1/..." \
        "cache-IL=..." "cache-IL, shuffled=..." "joint IL=runs/see/joint_s0,..." [--out FILE]

Each path is a run workdir holding `eval/<split>/metrics.json` (what `il`, `il_joint` and `eval` write). Seeds pair
by the `seed` in each run's config.json (by position when a run has none); a row whose one run is a deterministic
baseline (`eval.baseline` set: constant velocity) pairs with every seed. "Beats" (issue 18): the paired mean difference of PDMS over seeds
exceeds 2 sd of those differences (needs ≥ 2 pairs). The margin column is (row − CV) / (scene-token IL − CV) of the
mean PDMS: the fraction of the scene-token planner's margin over constant velocity a row recovers (none when
scene-token IL is not above CV).

Wall-clock of a run: the `wall_s` of its step in the pipeline summaries of the folder above it
(`pipeline_summary*.json`; the largest of the finished entries, so a later rerun that only resumed does not hide the
real run), else `wall_s` in the run's own `wall.json` (configs/see/evidence.sh writes it for stand-alone stages).
`--upstream "ROW=sft,cache"` adds those pipeline steps' wall time of each seed to ROW's (what a cache row also costs).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

from recogdrive_jax.eval import table_cli

METRICS = (("pdms", "PDMS", 3), ("epdms", "EPDMS", 3), ("ade", "ADE (m)", 2))
# comparison columns: (label, the row compared against); rows named so in the table get them
CV, TOKENS, CACHE, SHUFFLED = "CV", "scene-token IL", "cache-IL", "cache-IL, shuffled"
COMPARE = ((CV, "vs CV"), (SHUFFLED, "vs shuffled"), (CACHE, "vs cache-IL"))


class EvidenceError(ValueError):
    """A run folder or argument the table cannot use (the message names it)."""


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EvidenceError(f"{path}: not JSON ({e})") from None


def load_run(path: str, split: str = "eval") -> dict:
    """{'metrics': eval metrics, 'seed': int | None, 'wall_s': float | None, 'path'} of one run workdir."""
    f = os.path.join(path, "eval", split, "metrics.json")
    if not os.path.isfile(f):
        raise EvidenceError(f"{path}: no eval/{split}/metrics.json (an il / il_joint / eval workdir?)")
    metrics = _read_json(f)
    missing = [k for k, _, _ in METRICS if k not in metrics]
    if missing:
        raise EvidenceError(f"{f}: missing {missing}")
    # the run's saved config.json as plain JSON (a finished run's record, possibly of an older version: keys may lack)
    saved = _read_json(os.path.join(path, "config.json")) if os.path.isfile(os.path.join(path, "config.json")) else {}
    seed = saved["seed"] if "seed" in saved else None
    baseline = saved["eval"].get("baseline") if isinstance(saved.get("eval"), dict) else None
    return {"path": path, "metrics": metrics, "seed": None if seed is None else int(seed),
            "baseline": bool(baseline), "wall_s": wall_seconds(path)}


def step_wall_seconds(pipeline_dir: str, step: str) -> float | None:
    """The largest `wall_s` of a finished `step` in `pipeline_dir`'s pipeline_summary*.json files."""
    walls = []
    for f in sorted(glob.glob(os.path.join(pipeline_dir, "pipeline_summary*.json"))):
        for s in _read_json(f).get("steps", []):
            if s.get("name") == step and s.get("ok") and s.get("wall_s") is not None:
                walls.append(float(s["wall_s"]))
    return max(walls) if walls else None


def wall_seconds(path: str) -> float | None:
    path = os.path.normpath(path)
    wall = step_wall_seconds(os.path.dirname(path), os.path.basename(path))
    own = os.path.join(path, "wall.json")
    if wall is None and os.path.isfile(own):
        wall = float(_read_json(own)["wall_s"])
    return wall


def _pairs(a: list[dict], b: list[dict], names: tuple[str, str]) -> list[tuple[dict, dict]]:
    """Runs of two rows paired by seed; a deterministic baseline (`eval.baseline`, e.g. CV) pairs with every run."""
    if len(b) == 1 and b[0]["baseline"]:
        return [(r, b[0]) for r in a]
    if len(a) == 1 and a[0]["baseline"]:
        return [(a[0], r) for r in b]
    if all(r["seed"] is not None for r in a + b):
        by_seed = {r["seed"]: r for r in b}
        return [(r, by_seed[r["seed"]]) for r in a if r["seed"] in by_seed]
    if len(a) != len(b):
        raise EvidenceError(f"rows {names[0]!r} ({len(a)} runs) and {names[1]!r} ({len(b)} runs) cannot be paired "
                            "by position; give every run a config.json with its seed")
    return list(zip(a, b))


def paired_difference(a: list[dict], b: list[dict], key: str = "pdms",
                      names: tuple[str, str] = ("a", "b")) -> dict:
    """Mean and sd (ddof 1) of a − b over paired seeds, and whether a beats b: mean > 2 sd with ≥ 2 pairs (for ADE,
    lower is better, so the difference is b − a)."""
    sign = -1.0 if key == "ade" else 1.0
    d = np.array([sign * (x["metrics"][key] - y["metrics"][key]) for x, y in _pairs(a, b, names)], np.float64)
    if d.size == 0:
        return {"n": 0, "mean": float("nan"), "sd": float("nan"), "beats": None}
    sd = float(np.std(d, ddof=1)) if d.size > 1 else float("nan")
    beats = None if d.size < 2 else bool(d.mean() > 2.0 * sd)
    return {"n": int(d.size), "mean": float(d.mean()), "sd": sd, "beats": beats}


def _mean_sd(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _diff_cell(d: dict) -> str:
    if d["n"] == 0:
        return "–"
    mark = {True: " **beats**", False: " no", None: " (n=1)"}[d["beats"]]
    sd = "" if np.isnan(d["sd"]) else f" ± {d['sd']:.3f}"
    return f"{d['mean']:+.3f}{sd}{mark}"


def table(rows: list[tuple[str, list[str]]], split: str = "eval",
          upstream: dict[str, list[str]] | None = None) -> str:
    """Markdown table: one line per row (mean ± sd over its runs), PDMS differences vs CV / shuffled / cache-IL."""
    upstream = upstream or {}
    unknown = sorted(set(upstream) - {n for n, _ in rows})
    if unknown:
        raise EvidenceError(f"--upstream names rows that are not in the table: {unknown}")
    runs = {name: [load_run(p, split) for p in paths] for name, paths in rows}
    for name, steps in upstream.items():
        for r in runs[name]:
            extra = [step_wall_seconds(os.path.dirname(os.path.normpath(r["path"])), s) for s in steps]
            r["upstream_s"] = None if None in extra else float(sum(extra))
    scenes = sorted({int(r["metrics"].get("num_scenes", -1)) for rs in runs.values() for r in rs})
    if len(scenes) != 1:
        raise EvidenceError(f"the runs were scored on different numbers of scenes {scenes}; every row must use the "
                            "same held-out scenes")
    head = ["row", "n"] + [label for _, label, _ in METRICS] + ["wall (min)"] + [c for _, c in COMPARE]
    head += ["of scene-token margin"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    tok_margin = None
    if CV in runs and TOKENS in runs:
        tok_margin = np.mean([r["metrics"]["pdms"] for r in runs[TOKENS]]) - np.mean(
            [r["metrics"]["pdms"] for r in runs[CV]])
    for name, rs in runs.items():
        cells = [name, str(len(rs))]
        cells += [_mean_sd([r["metrics"][k] for r in rs], digits) for k, _, digits in METRICS]
        walls = [r["wall_s"] for r in rs]
        wall = "–" if None in walls else _mean_sd([w / 60 for w in walls], 1)
        if name in upstream:
            ups = [r.get("upstream_s") for r in rs]
            wall += "" if None in ups else f" (+{np.mean(ups) / 60:.1f} {'+'.join(upstream[name])})"
        cells.append(wall)
        for other, _ in COMPARE:
            cells.append("–" if other == name or other not in runs or name == CV
                         else _diff_cell(paired_difference(rs, runs[other], "pdms", (name, other))))
        if tok_margin is None or name in (CV, TOKENS) or tok_margin <= 0:
            cells.append("–")
        else:
            own = np.mean([r["metrics"]["pdms"] for r in rs]) - np.mean([r["metrics"]["pdms"] for r in runs[CV]])
            cells.append(f"{own / tok_margin:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if tok_margin is not None and tok_margin <= 0:
        lines.append(f"Scene-token IL is not above CV ({tok_margin:+.3f} PDMS): no margin to recover.")
    lines.append(f"{scenes[0]} held-out scenes (split `{split}`) per run; PDMS differences are paired over seeds, "
                 "mean ± sd; **beats** = mean > 2 sd.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="+", help="NAME=RUN_DIR[,RUN_DIR...] (one run per seed)")
    ap.add_argument("--split", default="eval", help="the eval split every run was scored on")
    ap.add_argument("--upstream", action="append", default=[],
                    help="ROW=STEP[,STEP...]: add these pipeline steps' wall time (same pipeline) to ROW's")
    ap.add_argument("--out", default="", help="also write the table to this file")
    args = ap.parse_args(argv)

    def make_table() -> str:
        upstream = dict(table_cli.parse_named_dirs(u, "ROW=STEP[,STEP...]", EvidenceError) for u in args.upstream)
        rows = [table_cli.parse_named_dirs(r, "NAME=RUN_DIR[,RUN_DIR...]", EvidenceError) for r in args.rows]
        return table(rows, args.split, upstream)

    return table_cli.print_table(make_table, args.out, (EvidenceError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
