"""Expert (ground-truth) trajectories as InternVL chat SFT data (spec/virl.md §4 "SFT data").

Every waypoint of a rail gives one **single-turn** pair (no verification turns, App. C.1): the 2×2 grid PNG and
`"<image>\\n" + Q_VIRL_VL` (absolute action space) → `ResponseVIRL` with the oracle observation, the gt sentence
and the gt action. Output layout (upstream InternVL format, DESIGN.md §5):

    out_dir/images/<name>_<k>.png
    out_dir/<name>.jsonl     {"id", "image": "images/<name>_<k>.png", "conversations": [human, gpt]}
    out_dir/meta.json        {name: {"root": out_dir, "annotation": out_dir/<name>.jsonl, "repeat_time": 1,
                                     "length": n}}
"""
from __future__ import annotations

import json
import os

from PIL import Image

from recogdrive_jax.envs import navigation as nav
from recogdrive_jax.envs.navigation import MultiCityEnv, NavigationEnv, expert_answer


def expert_rollout(env: NavigationEnv | MultiCityEnv, route_idx: int, rail_seed: int):
    """Yield (obs, answer) for every waypoint of one rail, stepping the env with the expert answer."""
    obs, _ = env.reset(seed=rail_seed, options={"route_idx": route_idx})
    while True:
        ans = expert_answer(obs)
        yield obs, ans
        obs, reward, terminated, truncated, info = env.step(ans)
        if reward != 1.0:
            raise RuntimeError(f"expert answer scored {reward} on route {route_idx} (rail seed {rail_seed}): "
                               f"{info['Verify Info']}")
        if terminated or truncated:
            return


def write_sft_dataset(env: NavigationEnv | MultiCityEnv, out_dir: str, *, name: str = "virl_sft",
                      rail_redraws: int = 5, route_indices: list[int] | None = None, seed: int = 0,
                      max_samples: int | None = None) -> dict:
    """Roll out the expert over `route_indices` (default: all routes) with `rail_redraws` rail/heading draws per
    route and write images + JSONL + meta JSON. Returns the meta dict. ≥15k pairs: 1k routes × 5 redraws."""
    if not env.routes:
        raise ValueError("env has no routes")
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    ann_path = os.path.join(out_dir, f"{name}.jsonl")
    routes = list(range(len(env.routes))) if route_indices is None else list(route_indices)
    def pairs():
        for r in routes:
            for d in range(rail_redraws):
                rail_seed = seed * 1_000_003 + r * 1_009 + d
                for obs, ans in expert_rollout(env, r, rail_seed):
                    yield r, rail_seed, obs, ans

    k = 0
    with open(ann_path, "w") as f:
        for r, rail_seed, obs, ans in pairs():
            if max_samples is not None and k >= max_samples:
                break
            row = {"id": k}
            if obs["image"] is not None:
                row["image"] = f"images/{name}_{k:07d}.png"
                Image.fromarray(obs["image"]).save(os.path.join(out_dir, row["image"]))
                human = "<image>\n" + obs["prompt"]
            else:                             # language-only (V-IRL-L style) data: no image tag
                human = obs["prompt"]
            row["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": ans}]
            row.update(route_idx=r, rail_seed=rail_seed)
            f.write(json.dumps(row) + "\n")
            k += 1
    meta = {name: {"root": os.path.abspath(out_dir), "annotation": os.path.abspath(ann_path), "repeat_time": 1,
                   "length": k}}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def tokenizer_corpus(env_cfg, num_routes: int = 24) -> list[str]:
    """Text a small navigation tokenizer (the `tiny` model's) is trained on: expert prompts/answers with both
    action spaces, the retry messages and the chat template (byte-level BPE, so any other text still encodes)."""
    from recogdrive_jax.data import template as tmpl
    kw = nav.env_kwargs(env_cfg)
    kw.pop("route_file", None)
    kw.update(n_train_routes=min(num_routes, int(env_cfg.n_train_routes)), view_size=8)
    texts = []
    for split in ("in_distribution", "rule_ood"):
        env = nav.make_env(split, seed=0, **kw)
        for r in range(len(env.routes)):
            for obs, ans in expert_rollout(env, r, rail_seed=r):
                texts += [obs["prompt"], ans]
    texts += [nav.FAILED_PREFIX + m for m in (nav.MSG_WRONG_ACTION, nav.MSG_AT_INTERSECTION,
                                              nav.MSG_NOT_AT_INTERSECTION)]
    texts += [tmpl.INTERNVL2_5_SYSTEM] * 20 + list(tmpl.ROLE_PREFIX.values()) * 20
    return texts


def write_from_config(config, out_dir: str, each_process: bool = False) -> str:
    """The expert SFT set of a V-IRL config (`config.env` + `config.virl_sft`) in `out_dir`, written once
    (data/generate_once.py; `each_process`: a per-process local copy, see there); returns its meta JSON path."""
    from recogdrive_jax.data.generate_once import generate_once
    s = config.virl_sft

    def build() -> dict:
        env = nav.make_env_from_config(str(config.env.get("train_split", "in_distribution")), config.env,
                                       seed=int(s.seed))
        n = int(s.num_routes) or len(env.routes)
        meta = write_sft_dataset(env, out_dir, name="virl_sft", rail_redraws=int(s.rail_redraws),
                                 route_indices=list(range(min(n, len(env.routes)))), seed=int(s.seed))
        return {"length": meta["virl_sft"]["length"]}

    generate_once(out_dir, {"env": config.env.to_dict(), "virl_sft": s.to_dict()}, build, barrier="virl_sft_data",
                  each_process=each_process)
    return os.path.join(out_dir, "meta.json")
