"""Does the SFT'd VLM know the trajectory? Its greedy text answer to the driving prompt, parsed, against the expert
on held-out scenes, next to constant velocity (issue 18, deliverable 1).

The synthetic SFT trajectory rows (data/scene_qa.py) ask `driving_prompt.driving_question` (front camera + the 4
past poses + the ego-status line + the navigation command) and answer `trajectory_answer(expert)`. Here the same
prompt — the same front-camera render (256 x 448) and tiling, the same system message (a `template.SampleConfig`,
what the sft stage's data keys give) — is asked on held-out scenes (the planner's eval split, never in the SFT
mixture), answered greedily in fixed-shape batches (vlm/generate.py: one compilation for every batch), parsed
strictly (`driving_prompt.parse_trajectory`; a failure is counted, never an error) and scored in xy metres:

  parse_rate             answers that parse as 8 poses
  ade, fde               the VLM on the parsed scenes (mean over scenes)
  cv_ade, cv_fde         constant velocity (sim/baselines.py) on the same parsed scenes: the paired comparison
  ade_all, fde_all       every scene, an unparsed answer replaced by the CV plan (what a fallback planner gets)
  cv_ade_all, cv_fde_all constant velocity on every scene
  linear_ade, linear_fde (with reference scenes) the history-only reference on the parsed scenes: least squares
                         from the text part of the prompt (past poses, ego status, command; no camera) to the
                         future, fitted on the SFT's training scenes — a VLM below it has not used the image
  linear_ade_all, ..._fde_all  the same reference on every scene

The sft stage runs it at each eval (`config.eval.trajectory_scenes` > 0) and writes WORKDIR/eval_trajectory/.
"""
from __future__ import annotations

import dataclasses
import json
import types

import jax
import numpy as np

from recogdrive_jax import storage
from recogdrive_jax.data import driving_prompt as dp
from recogdrive_jax.data import planner_data
from recogdrive_jax.data import template as tpl
from recogdrive_jax.data.tiling import load_image
from recogdrive_jax.parallel.runtime import Runtime
from recogdrive_jax.sim import render, world
from recogdrive_jax.sim.baselines import constant_velocity_plan
from recogdrive_jax.train.metrics import track
from recogdrive_jax.train.module_def import ModuleDef
from recogdrive_jax.vlm import chat, qa_batches
from recogdrive_jax.vlm.generate import Generator

FRONT_SIZE = (256, 448)  # (height, width): the front camera of the SFT QA rows (scene_qa.write_qa_dataset)
ANSWER_SLACK = 16  # generated tokens beyond the longest expert answer; a longer answer is cut and fails to parse


def held_out_scenes(num_scenes: int, scene_seed: int) -> world.Scene:
    """The first `num_scenes` scenes of the planner's eval split for `scene_seed` (data/planner_data.py; the SFT
    trains on the train split's scenes). reference='expert': the expert, history and status are the same, and
    PDM-Closed is not run."""
    seed = planner_data.split_seed(types.SimpleNamespace(scene_seed=int(scene_seed)), "eval")
    return world.stack_scenes(world.generate_scenes(int(num_scenes), seed=seed, reference="expert"))


def sft_train_scenes(num_scenes: int, seed: int) -> world.Scene:
    """The scenes the synthetic SFT QA of `data.synthetic_seed` is made of (qa_batches.synthetic_qa, train)."""
    return world.stack_scenes(world.generate_scenes(int(num_scenes), seed=int(seed), reference="expert"))


# ------------------------------------------------------------------------------------------------ prompts

def front_tiles(scene: world.Scene, scfg: tpl.SampleConfig) -> np.ndarray:
    """One (unbatched) scene's front camera, rendered and tiled as its SFT rows → tiles [n, S, S, 3]."""
    return load_image(np.asarray(render.render_front(scene, *FRONT_SIZE)), image_size=scfg.image_size,
                      max_num=scfg.max_dynamic_patch, min_num=scfg.min_dynamic_patch,
                      use_thumbnail=scfg.use_thumbnail, dynamic=scfg.dynamic_image_size)


def prompt_ids(scene: world.Scene, tok, scfg: tpl.SampleConfig, num_tiles: int) -> np.ndarray:
    """The prompt of the scene's SFT trajectory row (system, user turn with `num_tiles` image tiles), ending in the
    assistant prefix → ids [t]."""
    text = dp.driving_prompt(scene.history, dp.scene_command(scene), [num_tiles], scfg.num_image_token,
                             system_message=scfg.system_message, status=scene.status)
    return np.asarray(tok(text, add_special_tokens=False).input_ids, np.int32)


def decode(tok, ids: np.ndarray, eos_id: int) -> str:
    """Generated ids [A] → the answer text (up to the first EOS)."""
    ids = [int(t) for t in ids]
    if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------------------ metrics

def parse_answers(texts: list[str], num_poses: int = world.NUM_PLAN_POSES) -> tuple[np.ndarray, list[str | None]]:
    """Answer texts → poses [N, num_poses, 3] (NaN rows where an answer does not parse) and the parse errors
    (None where it parsed)."""
    poses = np.full((len(texts), num_poses, 3), np.nan)
    errors: list[str | None] = []
    for i, t in enumerate(texts):
        try:
            poses[i] = dp.parse_trajectory(t, num_poses)
            errors.append(None)
        except dp.TrajectoryParseError as e:
            errors.append(str(e))
    return poses, errors


def displacement(plans: np.ndarray, expert: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-scene ADE and FDE [N] (xy metres) of plans [N, T, 3] against the expert [N, T, 3]."""
    err = np.linalg.norm(np.asarray(plans, np.float64)[..., :2] - np.asarray(expert, np.float64)[..., :2], axis=-1)
    return err.mean(-1), err[:, -1]


def fit_linear_reference(scenes: world.Scene, ridge: float = 1e-3):
    """The history-only reference: least squares (ridge) from [history (4x3), status (8), 1] to the expert future,
    fitted on `scenes`; returns `predict(scenes) -> [N, 8, 3]`."""
    def features(s):
        n = len(s.history)
        return np.concatenate([np.asarray(s.history, np.float64).reshape(n, -1),
                               np.asarray(s.status, np.float64).reshape(n, -1), np.ones((n, 1))], 1)
    x = features(scenes)
    y = np.asarray(scenes.expert, np.float64).reshape(len(x), -1)
    if ridge > 0:  # (the command one-hot sums to the bias column and the t=0 pose is 0: lstsq, not solve)
        x_fit = np.concatenate([x, np.sqrt(ridge * len(x)) * np.eye(x.shape[1])])
        y_fit = np.concatenate([y, np.zeros((x.shape[1], y.shape[1]))])
    else:
        x_fit, y_fit = x, y
    w = np.linalg.lstsq(x_fit, y_fit, rcond=None)[0]
    shape = np.asarray(scenes.expert).shape[1:]
    return lambda s: (features(s) @ w).reshape(-1, *shape)


def score(texts: list[str], scenes: world.Scene, reference=None) -> tuple[dict[str, float], list[dict]]:
    """Answer texts of `scenes` (batched, N) → (metrics as in the module docstring, one record per scene).
    `reference`: a `fit_linear_reference` predictor (None: no linear_* keys)."""
    expert = np.asarray(scenes.expert, np.float64)
    n = len(expert)
    if len(texts) != n:
        raise ValueError(f"score: {len(texts)} answers for {n} scenes")
    poses, errors = parse_answers(texts, expert.shape[1])
    ok = np.array([e is None for e in errors], bool)
    cv = constant_velocity_plan(scenes.status, scenes.history)
    cv_ade, cv_fde = displacement(cv, expert)
    ade_all, fde_all = displacement(np.where(ok[:, None, None], poses, cv), expert)

    def mean(v):
        return float(np.mean(v)) if len(v) else float("nan")

    m = {"num_scenes": float(n), "parse_rate": float(ok.mean()) if n else float("nan"),
         "ade": mean(ade_all[ok]), "fde": mean(fde_all[ok]), "cv_ade": mean(cv_ade[ok]), "cv_fde": mean(cv_fde[ok]),
         "ade_all": mean(ade_all), "fde_all": mean(fde_all), "cv_ade_all": mean(cv_ade), "cv_fde_all": mean(cv_fde)}
    lin_ade = None
    if reference is not None:
        lin_ade, lin_fde = displacement(reference(scenes), expert)
        m.update(linear_ade=mean(lin_ade[ok]), linear_fde=mean(lin_fde[ok]), linear_ade_all=mean(lin_ade),
                 linear_fde_all=mean(lin_fde))
    records = [{"index": i, "answer": texts[i], "parsed": bool(ok[i]), "error": errors[i],
                "ade": float(ade_all[i]) if ok[i] else None, "cv_ade": float(cv_ade[i]),
                **({"linear_ade": float(lin_ade[i])} if lin_ade is not None else {})} for i in range(n)]
    return m, records


def summary_line(m: dict[str, float]) -> str:
    """One line for the log: parse rate, the VLM's ADE/FDE next to CV's (and the linear reference's)."""
    line = (f"text waypoints on {int(m['num_scenes'])} held-out scenes: parsed {100 * m['parse_rate']:.1f}%, "
            f"ADE {m['ade']:.3f} m FDE {m['fde']:.3f} m vs constant velocity ADE {m['cv_ade']:.3f} m "
            f"FDE {m['cv_fde']:.3f} m")
    if "linear_ade" in m:
        line += f", history-only linear ADE {m['linear_ade']:.3f} m"
    line += f" (all scenes, CV where unparsed: ADE {m['ade_all']:.3f} m vs CV {m['cv_ade_all']:.3f} m"
    return line + (f", linear {m['linear_ade_all']:.3f} m)" if "linear_ade_all" in m else ")")


# ------------------------------------------------------------------------------------------------ the eval

@dataclasses.dataclass
class TrajectoryEval:
    """Greedy text-waypoint answers of an InternVL (`vlm_mdef`, the bare module) on `scenes` (batched) and their
    scores. Prompt ids are built once; the prompt and answer lengths are fixed by the scenes, so repeated calls
    (every sft eval) reuse one compilation."""
    scenes: world.Scene
    tok: object
    cfg: object  # InternVLConfig
    scfg: tpl.SampleConfig
    batch_size: int
    reference: object = None  # fit_linear_reference predictor

    def __post_init__(self):
        self.n = int(len(self.scenes.history))
        if self.n < 1:
            raise ValueError("TrajectoryEval: no scenes")
        self.max_tiles = len(front_tiles(world.index_scene(self.scenes, 0), self.scfg))  # one render size
        self.ids = [prompt_ids(world.index_scene(self.scenes, i), self.tok, self.scfg, self.max_tiles)
                    for i in range(self.n)]
        self.prompt_len = -(-max(len(x) for x in self.ids) // 8) * 8
        expert = max(len(self.tok(dp.trajectory_answer(e), add_special_tokens=False).input_ids)
                     for e in np.asarray(self.scenes.expert))
        self.answer_len = expert + 1 + ANSWER_SLACK  # + EOS
        # the longest SFT trajectory row of these scenes: prompt + answer + '<|im_end|>' + '\n' (template.build_sample)
        self.row_len = max(len(x) for x in self.ids) + expert + 2

    def _prompts(self, idx: np.ndarray) -> dict:
        p, s = self.prompt_len, self.scfg.image_size
        out = {"prompt_ids": np.full((len(idx), p), int(self.cfg.pad_token_id), np.int32),
               "prompt_mask": np.zeros((len(idx), p), np.int32),
               "pixel_values": np.zeros((len(idx), self.max_tiles, s, s, 3), np.float32),
               "image_flags": np.ones((len(idx), self.max_tiles), np.int32)}
        for r, i in enumerate(idx):
            tiles = front_tiles(world.index_scene(self.scenes, int(i)), self.scfg)
            if len(tiles) != self.max_tiles:
                raise ValueError(f"scene {int(i)}: its front camera gives {len(tiles)} tiles, scene 0 "
                                 f"{self.max_tiles}; every render has one size")
            ids = self.ids[int(i)]
            out["prompt_ids"][r, p - len(ids):], out["prompt_mask"][r, p - len(ids):] = ids, 1
            out["pixel_values"][r] = tiles
        return out

    def answers(self, vlm_params, vlm_mdef: ModuleDef, runtime: Runtime | None = None) -> list[str]:
        """Greedy answers, one per scene. With `runtime` (one process) the batch is split over its batch axes
        (the batch is rounded up to a multiple of them); a short last batch is padded with copies of its first row."""
        rt = runtime if runtime is not None and jax.process_count() == 1 else None  # as vlm/nav_eval.py
        shards = rt.batch_shards if rt is not None else 1
        bs = -(-int(self.batch_size) // shards) * shards
        layout = chat.PromptLayout(prompt_len=self.prompt_len, answer_len=self.answer_len, max_tiles=self.max_tiles)
        enc = chat.ChatEncoder(self.tok, self.cfg, layout)
        gen = Generator(vlm_mdef, enc, temperature=0.0, runtime=rt)
        texts: list[str] = []
        starts = range(0, self.n, bs)
        for start in track(starts, total=len(starts), desc="trajectory eval", unit="batches"):
            idx = np.arange(start, min(start + bs, self.n))
            padded = np.concatenate([idx, np.full(bs - len(idx), idx[0])])
            out = gen(vlm_params, self._prompts(padded), jax.random.key(0))
            texts += [decode(self.tok, out[r], enc.eos_id) for r in range(len(idx))]
        return texts

    def __call__(self, vlm_params, vlm_mdef: ModuleDef, runtime: Runtime | None = None,
                 out_dir: str | None = None, step: int | None = None) -> dict[str, float]:
        """Answers, scores; with `out_dir` writes metrics.json and answers.jsonl there (process 0). Returns the
        metrics (`score`)."""
        texts = self.answers(vlm_params, vlm_mdef, runtime)
        m, records = score(texts, self.scenes, self.reference)
        if out_dir is not None and jax.process_index() == 0:
            storage.makedirs(out_dir)
            storage.write_text(storage.join(out_dir, "metrics.json"),
                               json.dumps({**m, "step": step, "line": summary_line(m)}, indent=2))
            storage.write_text(storage.join(out_dir, "answers.jsonl"),
                               "".join(json.dumps(r) + "\n" for r in records))
        return m


def from_sft_config(eval_cfg, data_cfg, cfg, tok) -> TrajectoryEval | None:
    """The sft stage's eval: `eval.trajectory_scenes` held-out scenes (the planner's eval split of
    `data.synthetic_seed`) asked the SFT trajectory rows' prompt (the run's system message and tiling:
    `qa_batches.sample_cfg`); the history-only linear reference is fitted on the synthetic SFT scenes (none with a
    meta JSON). None when `eval.trajectory_scenes` is 0."""
    if not eval_cfg.trajectory_scenes:
        return None
    ref = None
    if data_cfg.synthetic_scenes and not data_cfg.meta_path:
        ref = fit_linear_reference(sft_train_scenes(data_cfg.synthetic_scenes, data_cfg.synthetic_seed))
    ev = TrajectoryEval(held_out_scenes(eval_cfg.trajectory_scenes, data_cfg.synthetic_seed), tok, cfg,
                        qa_batches.sample_cfg(cfg, data_cfg), int(eval_cfg.trajectory_batch_size), reference=ref)
    if not data_cfg.meta_path and ev.row_len > int(data_cfg.max_seq_length) and jax.process_index() == 0:
        print(f"[sft] warning: a trajectory row is up to {ev.row_len} tokens and data.max_seq_length "
              f"{int(data_cfg.max_seq_length)} cuts it: the model is never taught the end of the waypoint list (nor "
              f"to stop), so its answers will rarely parse; raise data.max_seq_length to >= {ev.row_len}",
              flush=True)
    return ev
