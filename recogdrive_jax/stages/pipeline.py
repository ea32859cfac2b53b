"""Stage `pipeline`: runs several stages in order, each in `WORKDIR/<name>`, e.g. the demo's SFT → cache → IL → RL → eval.

`config.pipeline.steps` lists `name` or `name:stage` entries; `config.pipeline.configs.<name>` holds each
step's full config. String values may contain `{workdir}` (the pipeline's workdir), which is how a step points at
an earlier one's output, e.g. `train.init_from = '{workdir}/il'`. Finished steps are skipped on a rerun because
each stage resumes from its own checkpoints, so the pipeline as a whole resumes too. WORKDIR may be a `gs://` URL
when every step's stage writes through `storage` (`stages.REMOTE_WORKDIR_STAGES`; checked before the first step);
`{workdir}` then fills in the URL, e.g. `model.init_from = gs://.../sft` for the cache step.

Overrides. A pipeline config is built with `configs.pipeline_config()` (configs.py holds the override machinery,
so config files need no stage import): besides `stage` and `pipeline`, its top level
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
import sys
import time

import jax

from recogdrive_jax import configs, provenance, storage
from recogdrive_jax.configs import (NOT_SLOTS, PROCESS_WIDE, overrides, pipeline_config, resolve,  # noqa: F401
                                    step_config, step_names)
from recogdrive_jax import stages  # get_stage via the module: tests wrap it
from recogdrive_jax.parallel import mesh as mesh_lib



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
    if jax.process_index() != 0:
        return
    summary = {"total_wall_s": round(total_s, 3), "completed": failed is None, "failed_step": failed,
               "steps": [{k: r[k] for k in ("name", "stage", "wall_s", "ok")}
                         | {"metrics": r.get("metrics", {})} for r in rows]}
    storage.write_text(storage.join(workdir, "pipeline_summary.json"), json.dumps(summary, indent=2))
    print(f"=== pipeline {'finished' if failed is None else f'stopped at step {failed!r}'} in {_fmt_s(total_s)}",
          flush=True)
    print(timing_table(rows, total_s), flush=True)


def run(config, workdir: str) -> dict:
    workdir = storage.abspath(workdir)
    subs = resolve(config, workdir)  # every step validated (with its mesh) before the first runs
    for name, sub in subs:
        refusal = stages.remote_workdir_error(sub.stage, storage.join(workdir, name))
        if refusal:
            raise stages.RemoteWorkdirError(f"pipeline step {name!r}: {refusal}")
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
            print(f"=== pipeline step {name} (stage {sub.stage}) -> {storage.join(workdir, name)}", flush=True)
            t0 = time.time()
            row = {"name": name, "stage": sub.stage, "ok": False}
            rows.append(row)
            failed = name
            results[name] = stages.get_stage(sub.stage)(sub, storage.join(workdir, name)) or {}
            failed = None
            row.update(ok=True, metrics={m: v for m, v in results[name].items() if isinstance(v, (int, float, str))})
            row["wall_s"] = round(time.time() - t0, 3)
    finally:
        if rows and "wall_s" not in rows[-1]:
            rows[-1]["wall_s"] = round(time.time() - t0, 3)
        _write_summary(workdir, rows, time.time() - t_start, failed)
        sys.stdout.flush()
    return results
