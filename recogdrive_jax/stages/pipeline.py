"""Stage `pipeline`: runs several stages in order, each in `WORKDIR/<name>`, e.g. the demo's SFT → cache → IL → RL → eval.

`config.pipeline.steps` lists `name` or `name:stage` entries; `config.pipeline.configs.<name>` holds each
step's full config. String values may contain `{workdir}` (the pipeline's workdir), which is how a step points at
an earlier one's output, e.g. `train.init_from = '{workdir}/il'`. Finished steps are skipped on a rerun because
each stage resumes from its own checkpoints, so the pipeline as a whole resumes too.

Overrides. A pipeline config is built with `pipeline_config()`: besides `stage` and `pipeline`, its top level
mirrors every key any step has, as an *unset* slot (an ml_collections placeholder: None, typed like the steps'
value). `--config.train.num_steps=2` fills the slot, and the pipeline then sets that key in **every step that has
it** (wins over the step's own value, also over a `--config.pipeline.configs.<step>.` override of the same key);
a filled slot that no step being run has is an error naming the key, and a key no step has at all is not a slot,
so the flag parser rejects it. `--config.pipeline.configs.<step>.<key>=v` changes one step only. `distributed` is
process-wide, so it is a real block whose values every step gets. Slots rather than a comparison with a pristine
`get_config()`: an override equal to the top level's default would be invisible to a comparison.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping, Sequence

import ml_collections
from ml_collections.config_dict import placeholder

from recogdrive_jax import configs

# Top-level keys that are not override slots: what the pipeline itself is, and the process-wide start-up block.
NOT_SLOTS = ("stage", "pipeline")
PROCESS_WIDE = ("distributed",)
_MARK = "top_level"  # config.pipeline.top_level = 'override_slots' marks a config built by pipeline_config()


def _leaves(node: ml_collections.ConfigDict, prefix: str = ""):
    """(dotted path, value, type) of every non-ConfigDict field, depth first."""
    for key in node.keys():
        value = node[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value, node.get_type(key)


def _has(node: ml_collections.ConfigDict, path: str) -> bool:
    *parents, last = path.split(".")
    for p in parents:
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            return False
        node = node[p]
    return last in node and not isinstance(node[last], ml_collections.ConfigDict)


def _set(node: ml_collections.ConfigDict, path: str, value: Any, where: str) -> None:
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    old = node[last]
    if isinstance(old, int) and not isinstance(old, bool) and isinstance(value, float) and value.is_integer():
        value = int(value)  # a float slot (int in one step, float in another) given an integral value
    try:
        node[last] = value
    except TypeError as e:
        raise configs.ConfigError(f"config.{path}={value!r}: {where} has {path}={old!r} of another type ({e})") \
            from None


def pipeline_config(steps: Sequence[str], step_configs: Mapping[str, ml_collections.ConfigDict],
                    source: str = "pipeline") -> ml_collections.ConfigDict:
    """The config of a pipeline running `steps` (names in `step_configs`; `name:stage` allowed), with an unset
    override slot at the top level for every key of every step config (see the module docstring)."""
    steps = [s for s in steps if s]
    unknown = [s for s in steps if s.split(":")[0] not in step_configs]
    if unknown or not steps:
        raise configs.ConfigError(f"{source}: unknown step(s) {unknown or steps}; allowed: {list(step_configs)}")
    c = ml_collections.ConfigDict()
    c.stage = "pipeline"
    c.pipeline = ml_collections.ConfigDict()
    c.pipeline.steps = ",".join(steps)
    c.pipeline.configs = ml_collections.ConfigDict({k: ml_collections.ConfigDict(v.to_dict())
                                                    for k, v in step_configs.items()})
    c.pipeline[_MARK] = "override_slots"
    c.distributed = configs.base_config().distributed
    types: dict[str, type] = {}
    for sub in c.pipeline.configs.values():
        for path, _, typ in _leaves(sub):
            if path.split(".")[0] in NOT_SLOTS + PROCESS_WIDE or typ is type(None):
                continue
            seen = types.setdefault(path, typ)
            if seen is not typ and {seen, typ} == {int, float}:
                types[path] = float
    for path, typ in types.items():
        *parents, last = path.split(".")
        node = c
        for p in parents:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node = node[p]
        node[last] = placeholder(typ)
    return c


def step_names(config) -> list[str]:
    steps = config.pipeline.steps
    return [s for s in steps.split(",") if s] if isinstance(steps, str) else list(steps)


def overrides(config) -> dict[str, Any]:
    """The filled top-level slots: {'train.num_steps': 2, ...}."""
    if config.pipeline.get(_MARK) != "override_slots":
        raise configs.ConfigError("config: a pipeline config must be built with "
                                  "recogdrive_jax.stages.pipeline.pipeline_config() (its top level holds the "
                                  "override slots)")
    out = {}
    for key in config.keys():
        if key in NOT_SLOTS + PROCESS_WIDE:
            continue
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            out.update({f"{key}.{p}": v for p, v, _ in _leaves(value) if v is not None})
        elif value is not None:
            out[key] = value
    return out


def step_config(config, name: str) -> ml_collections.ConfigDict:
    """Step `name`'s own config (before top-level overrides and `{workdir}`)."""
    if name not in config.pipeline.configs:
        raise configs.ConfigError(f"config.pipeline.configs.{name}: missing; config.pipeline.steps names it")
    sub = ml_collections.ConfigDict(config.pipeline.configs[name].to_dict())
    for key in PROCESS_WIDE:
        if key in config:
            sub[key] = ml_collections.ConfigDict(config[key].to_dict())
    return sub


def _fill_workdir(node, workdir: str):
    for key in list(node.keys()):
        value = node[key]
        if isinstance(value, ml_collections.ConfigDict):
            _fill_workdir(value, workdir)
        elif isinstance(value, str) and "{workdir}" in value:
            node[key] = value.replace("{workdir}", workdir)


def resolve(config, workdir: str | None = None) -> list[tuple[str, ml_collections.ConfigDict]]:
    """[(step name, its config)] with every top-level override applied to every step having the key, `{workdir}`
    filled (when given), each validated; raises ConfigError naming a key no step being run has."""
    names = step_names(config)
    subs = [(entry.split(":")[0], step_config(config, entry.split(":")[0])) for entry in names]
    for entry, (name, sub) in zip(names, subs):
        if ":" in entry:
            sub.stage = entry.split(":", 1)[1]
    for path, value in overrides(config).items():
        hit = [name for name, sub in subs if _has(sub, path)]
        if not hit:
            has = [n for n, s in config.pipeline.configs.items() if _has(s, path)]
            raise configs.ConfigError(
                f"config.{path}: no step of this pipeline ({', '.join(n for n, _ in subs)}) has this key"
                + (f"; steps that do: {has}" if has else ""))
        for name, sub in subs:
            if name in hit:
                _set(sub, path, value, f"pipeline step {name!r}")
    for name, sub in subs:
        if workdir is not None:
            _fill_workdir(sub, workdir)
        try:
            configs.validate_common(sub)
        except configs.ConfigError as e:
            raise configs.ConfigError(f"pipeline step {name!r}: {e}") from None
    return subs


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def timing_table(rows: list[dict], total_s: float) -> str:
    """Markdown table of each step's wall time and the total."""
    lines = ["| step | stage | wall time | share |", "|---|---|---|---|"]
    for r in rows:
        share = 100.0 * r["wall_s"] / total_s if total_s > 0 else 0.0
        lines.append(f"| {r['name']} | {r['stage']} | {_fmt_s(r['wall_s'])} | {share:.0f}% |"
                     + ("" if r.get("ok", True) else " (failed)"))
    lines.append(f"| total | | {_fmt_s(total_s)} | |")
    return "\n".join(lines)


def _write_summary(workdir: str, rows: list[dict], total_s: float, failed: str | None) -> None:
    import jax
    if jax.process_index() != 0:
        return
    summary = {"total_wall_s": round(total_s, 3), "completed": failed is None, "failed_step": failed,
               "steps": [{k: r[k] for k in ("name", "stage", "wall_s", "ok")}
                         | {"metrics": r.get("metrics", {})} for r in rows]}
    with open(os.path.join(workdir, "pipeline_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"=== pipeline {'finished' if failed is None else f'stopped at step {failed!r}'} in {_fmt_s(total_s)}",
          flush=True)
    print(timing_table(rows, total_s), flush=True)


def run(config, workdir: str) -> dict:
    import jax

    from recogdrive_jax import provenance
    from recogdrive_jax.parallel import mesh as mesh_lib
    from recogdrive_jax.stages import get_stage
    workdir = os.path.abspath(workdir)
    subs = resolve(config, workdir)  # every step validated (with its mesh) before the first runs
    for name, sub in subs:
        try:
            mesh_lib.resolve_mesh_shape([sub.mesh.data, sub.mesh.fsdp, sub.mesh.tensor], jax.device_count())
        except mesh_lib.MeshError as e:
            raise configs.ConfigError(f"pipeline step {name!r}: {e}") from None
    provenance.write_config(config, workdir, extra={"overrides": overrides(config)})
    results, rows = {}, []
    t_start = time.time()
    failed = None
    try:
        for name, sub in subs:
            print(f"=== pipeline step {name} (stage {sub.stage}) -> {os.path.join(workdir, name)}", flush=True)
            t0 = time.time()
            row = {"name": name, "stage": sub.stage, "ok": False}
            rows.append(row)
            failed = name
            results[name] = get_stage(sub.stage)(sub, os.path.join(workdir, name)) or {}
            failed = None
            row.update(ok=True, metrics={m: v for m, v in results[name].items() if isinstance(v, (int, float, str))})
            row["wall_s"] = round(time.time() - t0, 3)
    finally:
        if rows and "wall_s" not in rows[-1]:
            rows[-1]["wall_s"] = round(time.time() - t0, 3)
        _write_summary(workdir, rows, time.time() - t_start, failed)
        sys.stdout.flush()
    return results
