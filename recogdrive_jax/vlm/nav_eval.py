"""V-IRL evaluation of a navigation policy (spec/virl.md §3) on the in-distribution, rule-OOD and visual-OOD
splits; used by the `eval_nav` stage, by `ppo` after training and by `sft` on V-IRL data.

Every split runs its frozen episode plan (`env.episode_plan`, episode i reset with seed `eval_nav.seed + i`, so
rails and initial headings are the same for every checkpoint) with verify_iter attempts per waypoint and the
policy's raw text scored by the env (malformed output is a scored −1/−1.5 outcome, never an error). Episodes run
`eval_nav.batch_size` at a time through the batched KV-cache sampler.

Writes `OUT/<split>/metrics.json` (`success_rate`, `per_step_accuracy`, `mean_reward`, `num_routes`, `steps`),
`OUT/<split>/episodes.jsonl` (per route), `OUT/<split>/episodes/ep_<k>.png` (the first `num_render` episodes as
strips of grid images with the gt action, the parsed output and the reward) and `OUT/results.md`; OUT may be a
`gs://` URL (through `storage`).
"""
from __future__ import annotations

import json

import jax
import numpy as np
from PIL import Image, ImageDraw

from recogdrive_jax import configs, storage
from recogdrive_jax.envs import navigation as nav
from recogdrive_jax.parallel.runtime import Runtime
from recogdrive_jax.train.metrics import Progress
from recogdrive_jax.vlm import chat
from recogdrive_jax.vlm.generate import Generator
from recogdrive_jax.vlm.nav_policy import NavPolicy

METRIC_KEYS = ("success_rate", "per_step_accuracy", "mean_reward", "num_routes")


def flat_metrics(results: dict[str, dict]) -> dict[str, float]:
    """{split: metrics} → {'split/key': float} (nested per-action dicts as 'split/key/action'), for the loop's
    metric log."""
    out = {}
    for split, m in results.items():
        for k, v in m.items():
            if isinstance(v, dict):
                out.update({f"{split}/{k}/{kk}": float(vv) for kk, vv in v.items()})
            else:
                out[f"{split}/{k}"] = float(v)
    return out


def splits_of(eval_cfg) -> list[str]:
    s = eval_cfg.splits
    names = [x for x in s.split(",") if x] if isinstance(s, str) else list(s)
    bad = [x for x in names if x not in nav.SPLITS]
    if bad:
        raise configs.ConfigError(f"config.eval_nav.splits: unknown {bad}; allowed: {list(nav.SPLITS)}")
    return names


def run_split(policy, params, generator, split: str, config, out_dir: str, rng: jax.Array) -> dict:
    """Evaluates one split; returns its metrics dict (also written to out_dir/<split>/metrics.json)."""
    e = config.eval_nav
    bs = int(e.batch_size)
    envs = [nav.make_env_from_config(split, config.env, seed=int(e.seed)) for _ in range(bs)]
    plan = list(envs[0].episode_plan)
    if int(e.max_routes):
        plan = plan[:int(e.max_routes)]
    enc = generator.enc
    metrics = nav.NavMetrics()
    total_reward = 0.0
    records, frames = [], {}
    queue = list(enumerate(plan))
    slots: list[dict | None] = [None] * bs
    split_dir = storage.join(out_dir, split)
    storage.makedirs(split_dir)
    n_render = int(e.num_render)

    def start(k: int) -> dict | None:
        if not queue:
            return None
        i, route = queue.pop(0)
        obs, _ = envs[k].reset(seed=int(e.seed) + i, options={"route_idx": route})
        return {"episode": i, "route": int(route), "obs": obs, "steps": 0, "correct": 0, "reward": 0.0}

    bar = Progress(len(plan), desc=f"eval_nav {split}", unit="routes", delay_s=2)
    slots = [start(k) for k in range(bs)]
    counter = 0
    while any(s is not None for s in slots):
        live = [k for k in range(bs) if slots[k] is not None]
        encoded = {k: enc.encode_prompt(slots[k]["obs"]) for k in live}
        prompts = chat.stack([encoded[k if slots[k] is not None else live[0]] for k in range(bs)])
        out = generator(params, prompts, jax.random.fold_in(rng, counter))
        counter += 1
        for k in live:
            s = slots[k]
            text, _, _ = enc.decode_answer(out[k])
            gt = s["obs"]["oracle"]["action"]
            image = s["obs"]["image"]
            obs, r, term, trunc, info = envs[k].step(text)
            metrics.update(r, term, trunc, info, gt_action=gt)
            total_reward += r
            s["steps"] += 1
            s["correct"] += int(r == 1.0)
            s["reward"] += r
            if s["episode"] < n_render:
                frames.setdefault(s["episode"], []).append((image, gt, nav.re_match(text, "action"), r))
            s["obs"] = obs
            if term or trunc:
                success = bool(info["is_success"]) and term and not trunc
                records.append({"episode": s["episode"], "route_idx": s["route"], "success": success,
                                "steps": s["steps"], "correct": s["correct"], "reward": s["reward"],
                                "rail_length": info["rail_length"], "city": info.get("city", split)})
                bar.update(n=1)
                slots[k] = start(k)
    bar.close()
    summary = metrics.summary()
    result = {"success_rate": summary["success_rate"], "per_step_accuracy": summary["per_step_accuracy"],
              "mean_reward": total_reward / max(metrics.steps, 1), "num_routes": int(metrics.episodes),
              "steps": int(metrics.steps)}
    for key in ("accuracy_by_action", "steps_by_action"):
        if key in summary:
            result[key] = summary[key]
    if jax.process_index() == 0:
        storage.write_text(storage.join(split_dir, "metrics.json"), json.dumps(result, indent=2))
        storage.write_text(storage.join(split_dir, "episodes.jsonl"), "".join(
            json.dumps(rec) + "\n" for rec in sorted(records, key=lambda x: x["episode"])))
        for ep, fr in frames.items():
            render_strip(fr, storage.join(split_dir, "episodes", f"ep_{ep:03d}.png"))
    return result


def render_strip(frames: list, path: str, size: int = 160) -> None:
    """One PNG per episode: each step's grid image with gt action, parsed output action and reward below."""
    cap = 40
    strip = Image.new("RGB", (size * len(frames), size + cap), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, (image, gt, act, r) in enumerate(frames):
        if image is not None:
            strip.paste(Image.fromarray(image).resize((size, size), Image.NEAREST), (i * size, 0))
        color = (0, 128, 0) if r == 1.0 else (200, 0, 0)
        draw.text((i * size + 2, size + 2), f"gt {gt}"[:30], fill=(0, 0, 0))
        draw.text((i * size + 2, size + 14), f"out {act}"[:30], fill=color)
        draw.text((i * size + 2, size + 26), f"r={r:+.1f}", fill=color)
    with storage.staged_file(path) as local:
        strip.save(local)


def write_table(results: dict, path: str, title: str = "") -> None:
    lines = [f"### {title}" if title else "", "",
             "| split | routes | success rate | per-step accuracy | mean reward |", "|---|---|---|---|---|"]
    for split, m in results.items():
        lines.append(f"| {split} | {m['num_routes']} | {100 * m['success_rate']:.1f}% | "
                     f"{100 * m['per_step_accuracy']:.1f}% | {m['mean_reward']:+.3f} |")
    storage.write_text(path, "\n".join(lines).lstrip() + "\n")


def evaluate(vlm_params, config, cfg, tokenizer, out_dir: str, runtime: Runtime | None = None) -> dict[str, dict]:
    """All `eval_nav.splits` for `vlm_params` (InternVL params `cfg`: an SFT model or a policy's `vlm`
    subtree) → {split: metrics}; writes files under out_dir. With `runtime` the episodes' batch is sharded over
    its batch axes (single process, when they divide `eval_nav.batch_size`)."""
    e = config.eval_nav
    policy = NavPolicy(config, cfg, tokenizer, answer_len=int(e.max_new_tokens))
    bs = int(e.batch_size)
    n_batch = runtime.batch_shards if runtime is not None else 1
    generator = Generator(policy.vlm_mdef, policy.encoder, temperature=float(e.temperature), top_p=float(e.top_p),
                          runtime=runtime if runtime is not None and bs % n_batch == 0 and jax.process_count() == 1
                          else None)
    rng = jax.random.key(int(e.seed))
    results = {}
    for split in splits_of(e):
        results[split] = run_split(policy, vlm_params, generator, split, config, out_dir, rng)
    if jax.process_index() == 0:
        write_table(results, storage.join(out_dir, "results.md"), str(e.title))
    return results
