"""NAVSIM's PDM-score result CSV, as NAVSIM v1.1 writes it, so results can go where NAVSIM's would.

Source: autonomousvision/navsim, tag v1.1, navsim/planning/script/run_pdm_score.py (main): one row per token,
`{"token", "valid", **asdict(PDMResults)}` (PDMResults: navsim/common/dataclasses.py v1.1), collected in a pandas
DataFrame, then an average row (`token="average"`, each metric the mean over rows skipping NaN, `valid` = all rows
valid) appended at index len(df), written with `df.to_csv(path)` — so the first column is pandas' unnamed index.
NAVSIM names the file `<output_dir>/<%Y.%m.%d.%H.%M.%S>.csv`; here it is `navsim_pdm_score.csv` next to metrics.json.
"""
from __future__ import annotations

import csv
import io
import math

import numpy as np

from recogdrive_jax import storage

# The header exactly as v1.1's to_csv writes it ('' = the unnamed index column).
COLUMNS = ("", "token", "valid", "no_at_fault_collisions", "drivable_area_compliance", "ego_progress",
           "time_to_collision_within_bound", "comfort", "driving_direction_compliance", "score")
# NAVSIM PDMResults field -> this project's per-scene metric key (eval/planner_eval.py).
METRIC_KEYS = {"no_at_fault_collisions": "nc", "drivable_area_compliance": "dac", "ego_progress": "ep",
               "time_to_collision_within_bound": "ttc", "comfort": "comfort",
               "driving_direction_compliance": "ddc", "score": "pdms"}
FILE_NAME = "navsim_pdm_score.csv"


def _cell(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    v = float(v)
    return "" if math.isnan(v) else repr(v)  # pandas: na_rep='' and repr of float64


def rows(tokens, per_scene: dict) -> list[list[str]]:
    """Per-token rows + the average row (NAVSIM's mean skips NaN; a row is valid when its score is finite)."""
    metrics = [c for c in COLUMNS if c in METRIC_KEYS]
    vals = {c: np.asarray(per_scene[METRIC_KEYS[c]], np.float64) for c in metrics}
    valid = np.isfinite(vals["score"])
    out = []
    for i, tok in enumerate(tokens):
        out.append([str(i), str(tok), _cell(valid[i])] + [_cell(vals[c][i]) for c in metrics])
    avg = [float(np.nanmean(vals[c])) if np.isfinite(vals[c]).any() else float("nan") for c in metrics]
    out.append([str(len(out)), "average", _cell(valid.all())] + [_cell(a) for a in avg])
    return out


def write_csv(out_dir: str, tokens, per_scene: dict) -> str:
    """Writes `out_dir/navsim_pdm_score.csv`; returns its path."""
    path = storage.join(out_dir, FILE_NAME)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(rows(tokens, per_scene))
    storage.write_text(path, buf.getvalue())
    return path
