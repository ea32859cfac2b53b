"""V-IRL-VL route-following environment over the offline procedural city (spec/virl.md §1, §3, §4).

This replicates `gym_virl/envs/navigation_environment.py` of LeslieTrue/SFTvsRL @5a6ea55: the rail (ground-truth
trajectory) is rebuilt at every reset from the route record, the agent answers in text, only a correct answer
advances, each waypoint allows `verify_iter` scored attempts and the next call ends the episode. Differences
from the official code, all documented where they happen:

* relative turn words wrap the heading difference to (−180, 180] (`wrap_relative=True`; the code does not);
* the prompt-layout view headings [h, h+90, h+180, h+270] are the default (`view_layout="reference"` gives the
  code's [h−135, h−45, h+45, h+135]);
* a non-string JSON field in the model output is stringified instead of crashing the reward function;
* `full_oracle=True` checks the observation against the full oracle string (the intended check).

The policy-visible part of an observation is `image` + `prompt` (or `messages` for the multi-turn retry
conversation); the `oracle` dict is for SFT data, evaluation and tests only.
"""
from __future__ import annotations

import json
import os
import random
import re
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from recogdrive_jax.envs.city import City, cached_city, compass_word, load_city_meta, load_route_infos, make_routes
from recogdrive_jax.envs.render import Renderer
from recogdrive_jax.envs.styles import TRAIN_STYLE, VISUAL_OOD_STYLES

# ---------------------------------------------------------------------------------------------------------------
# Verbatim prompt / response / action-space text (prompt_lib/prompts.py, utils_rl.py; typos included)
# ---------------------------------------------------------------------------------------------------------------
Q_VIRL_VL = """
[Task Description]
You are an expert in navigation. You will receive a sequence of instructions to follow while observing your surrounding stree tviews. You
are also provided with your observation and action history in text. Your goal is to first analyze the instruction and identify the next sentence to be executed. 
Then, you need to provide the action to be taken based on the current observation and instruction.

[Instruction]
{instruction}

[Observation format]
You observe a 2x2 grid of streetview images with the following headings:
[front, right
 back, left]
You need to identify if any of the landmarks in the instruction are visible in the street view grid.

[Action space]
{action_space}

[Observations and actions sequence]
{obs_act_seq}

[Output]
{{
  "current observation": latest observation from the street view grid,
  "current instruction": analyze the full instruction and identify the sentence to be executed,
  "action": the action to be taken chosen from the action space,
}}
"""

RESPONSE_VIRL = """
{{
  "current observation": "{current_observation}",
  "current instruction": "{current_instruction}",
  "action": "{action}",
}}
"""

ACTION_SPACE_ABSOLUTE = """"forward()": indicates moving forward one step
"turn_direction(x)": indicates adjust the ego agent direction towards x direction. x could be any following 8 directions ['north', 'northeast', 'east', 'southeast', 'south', 'southwest', 'west', 'northwest']
"stop()": indicates the navigation is finished."""

ACTION_SPACE_RELATIVE = """"forward()": indicates moving forward one step
"turn_direction(x)": indicates adjust the ego agent direction towards x direction. x could be any following ['left', 'right', 'slightly left', 'slightly right']
"stop()": indicates the navigation is finished."""

REWARD_FN_VIRL = {"CORRECT_ACTION": 1.0, "INCORRECT_ACTION": -1.0, "INCORRECT_OBS": -1.5,
                  "INCORRECT_INSTRUCTION": -1.75}   # the last one is never emitted (spec §1.5)

# Never .format()ted in the original, hence the literal double braces in the feedback text.
_FORMAT_TOKEN = """
[Output]
{{
  "current observation": latest observation from the streetview grid,
  "current instruction": analyze the full instruction and identify the sentence to be executed,
  "action": the action to be taken chosen from the action space,
}}"""
MSG_NOT_AT_INTERSECTION = ("you are not at any intersection. Please avoid this observation and try again in the "
                           "same format:" + _FORMAT_TOKEN)
MSG_AT_INTERSECTION = "you are at an intersection. Please avoid this observation and try again in the same format:" \
                      + _FORMAT_TOKEN
MSG_WRONG_ACTION = "you make incorrect action. Please avoid this action and try again in the same format:" \
                   + _FORMAT_TOKEN
MSG_EXHAUSTED = "Exceed maximum verify steps"
FAILED_PREFIX = "You failed this trial because "

_RE_PATTERNS = {"action": r'"action": "(.*?)"', "current observation": r'"current observation": "(.*?)"',
                "current instruction": r'"current instruction": "(.*?)"'}
SPLITS = ("in_distribution", "rule_ood", "visual_ood", "heldout_id")


# ---------------------------------------------------------------------------------------------------------------
# Parsing and reward (utils_general.re_match, utils_rl.step_rewards_virl)
# ---------------------------------------------------------------------------------------------------------------
def re_match(text: Any, key: str) -> str:
    """`json.loads(text)[key]`, else the regex `"key": "(.*?)"`, else the string "None". Never raises."""
    if not isinstance(text, str):
        return "None"
    try:
        pred = json.loads(text)[key]
        return pred if isinstance(pred, str) else json.dumps(pred)
    except Exception:  # noqa: BLE001 - any malformed output is a scored outcome
        m = re.search(_RE_PATTERNS[key], text)
        return m.group(1) if m else "None"


def step_reward(raw_output: str, gt_action: str, gt_obs: str) -> tuple[float, str]:
    """(reward, verify message) exactly as `step_rewards_virl` (messages joined with ', ' and a final '.')."""
    action = re_match(raw_output, "action")
    obs = re_match(raw_output, "current observation")
    if action == gt_action:
        return REWARD_FN_VIRL["CORRECT_ACTION"], "Correct action."
    if "intersection" in obs and "intersection" not in gt_obs:
        return REWARD_FN_VIRL["INCORRECT_OBS"], MSG_NOT_AT_INTERSECTION + "."
    if "intersection" not in obs and "intersection" in gt_obs:
        return REWARD_FN_VIRL["INCORRECT_OBS"], MSG_AT_INTERSECTION + "."
    return REWARD_FN_VIRL["INCORRECT_ACTION"], MSG_WRONG_ACTION + "."


def parse_navigation_string(text: str) -> list[dict[str, str]]:
    """`milestone_info` → list of dicts (utils_general.parse_navigation_string, same quirks)."""
    result = []
    for block in (b.strip() for b in text.split("}") if b.strip()):
        block = block.lstrip("{").strip()
        cur = {}
        for line in (ln.strip() for ln in block.split("\n") if ln.strip()):
            line = line.rstrip(",")
            parts = line.split(":", 1)
            if len(parts) != 2:
                continue
            cur[parts[0].strip().strip("\"'")] = parts[1].strip().strip("\"'")
        if cur:
            result.append(cur)
    return result


def relative_word(delta: float, wrap: bool = True) -> str:
    """Turn word for a heading change. `wrap=False` is the official code (no wrap, so 350→10 reads 'left')."""
    if wrap:
        delta = delta % 360.0
        if delta > 180.0:
            delta -= 360.0
    if delta < -45:
        return "left"
    if delta > 45:
        return "right"
    if delta <= 0:
        return "slightly left"
    return "slightly right"


def expert_answer(obs_or_info: dict) -> str:
    """Ground-truth answer in the `ResponseVIRL` format (oracle observation, gt sentence, gt action).

    Accepts an observation dict (reads `obs["oracle"]`) or the oracle dict itself.
    """
    o = obs_or_info.get("oracle", obs_or_info)
    return RESPONSE_VIRL.format(current_observation=o["observation"], current_instruction=o["instruction"],
                                action=o["action"])


# ---------------------------------------------------------------------------------------------------------------
# Rail
# ---------------------------------------------------------------------------------------------------------------
def build_instructions(route: dict, init_heading: int, wrap_relative: bool = True):
    """(str_instruction, sentences, abs actions, rel actions, heading_list, landmark_list) from a route record."""
    blocks = parse_navigation_string(route["milestone_info"])
    if not blocks:
        raise ValueError(f"route {route.get('route_id')}: milestone_info holds no dict blocks")
    sentences, abs_actions, rel_actions, landmarks = [], [], [], []
    headings = [init_heading]
    prev = init_heading
    for idx, blk in enumerate(blocks):
        lm = blk.get("landmarks", "No landmark nearby")
        landmarks.append(lm)
        raw = blk.get("to_next_intersection_heading")
        if raw is None or "(" not in raw:
            raise ValueError(f"route {route.get('route_id')}: milestone {idx} lacks 'to_next_intersection_heading'"
                             f" like '177 (south)'")
        word = raw.split("(")[1].split(")")[0]
        deg = int(raw.split("(")[0].strip())
        headings.append(deg)
        rel = relative_word(deg - prev, wrap_relative)
        prev = deg
        abs_actions.append(f"turn_direction({word})")
        rel_actions.append(f"turn_direction({rel})")
        if idx == len(blocks) - 1:
            sentences.append(f"Turn {rel} to face {word}.")
            sentences.append(f"Move forward until you reach destination where {lm}.")
        else:
            first = "First, turn" if idx == 0 else "Turn"
            sentences.append(f"{first} {rel} to face {word}.")
            sentences.append("Move forward until you reach next intersection." if lm == "No landmark nearby"
                             else f"Move forward until you reach next intersection where {lm}.")
    text = "".join(f"{i + 1}. {s}\n" for i, s in enumerate(sentences))
    return text, sentences, abs_actions, rel_actions, headings, landmarks


def build_rail(city: City, route: dict, init_heading: int, rng: random.Random, *, absolute_action: bool = True,
               drop_rate: float = 0.5, straight_line_length: int = 5, relocation_radius: float = 20.0,
               wrap_relative: bool = True) -> tuple[str, list[str], list[dict]]:
    """Ground-truth rail, `_parse_instruction_and_rail` with relocation on (spec §1.2)."""
    text, sentences, abs_a, rel_a, headings, landmarks = build_instructions(route, init_heading, wrap_relative)
    landmarks = ["No landmarks nearby"] + landmarks
    abs_a, rel_a = abs_a + ["stop()"], rel_a + ["stop()"]

    def relocate(geo):
        p = city.gps_to_pano(geo, relocation_radius)
        return (None, None) if p is None else (city.pano_geocode(p), p)

    start_geo, start_pano = relocate(route["start_place"]["relocated_geocode"])
    if start_geo is None:
        raise ValueError(f"route {route.get('route_id')}: start is > {relocation_radius} m from any panorama")
    rail: list[dict] = []
    prev = start_geo
    ins = 0
    waypoints = [start_geo] + list(route["route_results"]["geocode_list"])
    if len(waypoints) != len(abs_a):
        raise ValueError(f"route {route.get('route_id')}: {len(waypoints) - 1} geocodes for {len(abs_a) - 1} "
                         f"milestone blocks")
    for idx, geo in enumerate(waypoints):
        distance = city.distance(prev, geo)
        geo, pano = relocate(geo)
        if geo is None:
            raise ValueError(f"route {route.get('route_id')}: waypoint {idx} is > {relocation_radius} m from any "
                             f"panorama")
        if distance > 5:
            for i in range(straight_line_length):
                if rng.random() < drop_rate:
                    continue
                w = (i + 1) / straight_line_length
                interp = [prev[0] * (1 - w) + geo[0] * w, prev[1] * (1 - w) + geo[1] * w]
                g, p = relocate(interp)
                if g is None:
                    continue
                if city.distance(prev, g) > 8 and city.distance(geo, g) > 8:
                    rail.append({"geocode": g, "pano": p, "heading": headings[idx], "gt_action": "forward()",
                                 "relative_action": "forward()", "observation": "No landmarks nearby",
                                 "intersection_observation": "", "instruction": sentences[ins],
                                 "instruction_idx": ins + 1})
            ins += 1
        if abs_a[idx] == "stop()":          # stop() and the last forward() share the same instruction
            ins -= 1
        rail.append({"geocode": geo, "pano": pano, "heading": headings[idx],
                     "gt_action": abs_a[idx] if absolute_action else rel_a[idx], "relative_action": rel_a[idx],
                     "observation": landmarks[idx],
                     "intersection_observation": "You observe an intersection" if idx != 0 else "",
                     "instruction": sentences[ins], "instruction_idx": ins + 1})
        ins += 1
        prev = geo
    return text, sentences, rail


# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------
class NavigationEnv(gym.Env):
    """Text-action navigation env. `step(text)` → (obs, reward, terminated, truncated, info).

    obs = {"image": uint8 [2R+5, 2R+5, 3] or None, "prompt": str, "messages": chat turns for this attempt,
           "instruction", "obs_act_seq", "action_space": str, "attempt": int (0-based),
           "oracle": {"action", "observation", "instruction", "instruction_idx", "landmark_observation"}}.
    `messages` = [{"role": "user", "content": prompt, "image": True}] at a fresh waypoint; after a failed attempt
    it grows by [{"role": "assistant", "content": output}, {"role": "user", "content": "You failed this trial
    because …"}] (the trainer's payload in llama_trainer.formulate_prompt).
    """

    metadata = {"render_modes": []}

    def __init__(self, city: City, routes: list[dict], *, absolute_action: bool = True, verify_iter: int = 2,
                 drop_rate: float = 0.5, straight_line_length: int = 5, view_size: int = 224,
                 view_layout: str = "prompt", language_only: bool = False, full_oracle: bool = False,
                 wrap_relative: bool = True, max_episode_steps: int = 300, episode_plan: list[int] | None = None,
                 seed: int | None = None, name: str = "virl"):
        if not routes:
            raise ValueError("NavigationEnv needs at least one route")
        if verify_iter < 1:
            raise ValueError(f"verify_iter must be >= 1, got {verify_iter}")
        self.city, self.routes, self.name = city, routes, name
        self.absolute_action, self.verify_iter = absolute_action, verify_iter
        self.drop_rate, self.straight_line_length = drop_rate, straight_line_length
        self.language_only, self.full_oracle, self.wrap_relative = language_only, full_oracle, wrap_relative
        self.max_episode_steps = max_episode_steps
        self.action_space_text = ACTION_SPACE_ABSOLUTE if absolute_action else ACTION_SPACE_RELATIVE
        self.renderer = None if language_only else Renderer(city, view_size=view_size, layout=view_layout)
        side = 2 * view_size + 5
        self.observation_space = spaces.Dict({"image": spaces.Box(0, 255, (side, side, 3), np.uint8),
                                              "prompt": spaces.Text(100_000)})
        self.action_space = spaces.Text(100_000)          # free text; parsed by re_match
        # Frozen evaluation order: route indices to pass as reset(options={"route_idx": i}).
        self.episode_plan = list(range(len(routes))) if episode_plan is None else list(episode_plan)
        self._rng = random.Random(seed)
        self.rail: list[dict] = []

    # ---- gym API ----------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = random.Random(seed)
        if options is not None and "route_idx" in options:
            idx = int(options["route_idx"])
            if not 0 <= idx < len(self.routes):
                raise ValueError(f"route_idx {idx} out of range [0, {len(self.routes)})")
        else:
            idx = self._rng.randrange(len(self.routes))
        self.route_idx, self.route = idx, self.routes[idx]
        heading = int(self.route.get("init_heading", 0) or 0)
        if heading == 0:
            heading = self._rng.randint(0, 359)
        self.init_heading = heading
        self.instruction, self.sentences, self.rail = build_rail(
            self.city, self.route, heading, self._rng, absolute_action=self.absolute_action,
            drop_rate=self.drop_rate, straight_line_length=self.straight_line_length,
            wrap_relative=self.wrap_relative)
        self.step_cnt = 0
        self.remaining = self.verify_iter
        self.action_list: list[str] = []
        self.observation_list = [self._oracle_obs()]
        self.is_success = True
        self.episode_steps = 0
        self.episode_correct = 0
        self._messages = None
        self._done = False
        obs = self._make_obs(fresh=True)
        return obs, self._info(None)

    def step(self, action: str):
        if not self.rail or self._done:
            raise RuntimeError("step() called before reset() or after the episode ended; call reset()")
        self.episode_steps += 1
        self.remaining -= 1
        if self.remaining == -1:                         # attempts exhausted: -1, truncated, episode failed
            return self._terminate(action)
        wp = self.rail[self.step_cnt]
        gt_obs = self._oracle_obs() if self.full_oracle else wp["observation"]
        reward, msg = step_reward(action, wp["gt_action"], gt_obs)
        terminated = False
        if reward == REWARD_FN_VIRL["CORRECT_ACTION"]:
            self.episode_correct += 1
            if wp["gt_action"] == "stop()":
                terminated = True
            else:
                self._move_on_rail(wp["gt_action"])
            obs = self._make_obs(fresh=True)
        else:
            obs = self._make_obs(fresh=False, last_output=action, feedback=msg)
        truncated = (not terminated) and self.episode_steps >= self.max_episode_steps
        if truncated:
            self.is_success = False
        self._done = terminated or truncated
        return obs, reward, terminated, truncated, self._info(msg)

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _terminate(self, action: str):
        """The (verify_iter+1)-th call. Replicates `_terminate_step`: at the destination it reports
        terminated=True *and* truncated=True, elsewhere terminated=False, truncated=True (and moves one
        waypoint on without recording it)."""
        self.is_success = False
        at_stop = self.rail[self.step_cnt]["gt_action"] == "stop()"
        if not at_stop:
            self.step_cnt += 1
        obs = self._make_obs(fresh=True)
        self._done = True
        return obs, REWARD_FN_VIRL["INCORRECT_ACTION"], at_stop, True, self._info(MSG_EXHAUSTED)

    def _move_on_rail(self, action: str) -> None:
        self.step_cnt += 1
        self.remaining = self.verify_iter
        self.action_list.append(action)
        self.observation_list.append(self._oracle_obs())

    def _oracle_obs(self) -> str:
        wp = self.rail[self.step_cnt]
        inter = "" if wp["gt_action"] == "stop()" else wp["intersection_observation"]
        return wp["observation"] + "; " + inter

    def obs_act_seq(self) -> str:
        out = ""
        for i, (a, o) in enumerate(zip(self.action_list, self.observation_list)):
            out += f"O_{i + 1}: {o}\nA_{i + 1}: {a}\n"
        n = len(self.observation_list)
        if n > len(self.action_list):
            if not self.language_only:
                inter = "You observe an intersection" if "You observe an intersection" in \
                    self.observation_list[-1] else ""
                out += f"O_{n}: You observe an image of 4 views; {inter}\nA_{n}: \n"
            else:
                out += f"O_{n}: {self.observation_list[-1]}\nA_{n}: \n"
        return out

    def _make_obs(self, fresh: bool, last_output: str | None = None, feedback: str | None = None) -> dict:
        wp = self.rail[self.step_cnt]
        seq = self.obs_act_seq()
        prompt = Q_VIRL_VL.format(instruction=self.instruction, action_space=self.action_space_text, obs_act_seq=seq)
        if fresh or self._messages is None:
            self._messages = [{"role": "user", "content": prompt, "image": not self.language_only}]
        else:
            self._messages = self._messages + [
                {"role": "assistant", "content": last_output if isinstance(last_output, str) else str(last_output)},
                {"role": "user", "content": FAILED_PREFIX + feedback}]
        image = None if self.renderer is None else self.renderer.grid(wp["pano"], wp["heading"])
        return {"image": image, "prompt": prompt, "messages": list(self._messages), "instruction": self.instruction,
                "obs_act_seq": seq, "action_space": self.action_space_text, "attempt": self.verify_iter -
                self.remaining if self.remaining >= 0 else self.verify_iter,
                "oracle": {"action": wp["gt_action"], "observation": self._oracle_obs(),
                           "landmark_observation": wp["observation"], "instruction": wp["instruction"],
                           "instruction_idx": wp["instruction_idx"], "heading": wp["heading"], "pano": wp["pano"]}}

    def _info(self, verify_message: str | None) -> dict:
        wp = self.rail[self.step_cnt]
        return {"global_instruction": self.instruction, "current_instruction": wp["instruction"],
                "instruction_idx": wp["instruction_idx"], "gt_action": wp["gt_action"],
                "current_obs": self._oracle_obs(), "obs_act_seq": self.obs_act_seq(), "Verify Info": verify_message,
                "is_success": self.is_success, "route_idx": self.route_idx, "episode_steps": self.episode_steps,
                "episode_correct": self.episode_correct, "rail_length": len(self.rail)}


def action_kind(gt_action: str) -> str:
    """'forward' | 'turn' | 'stop': what a step asks for (only `stop()` vs `forward()` needs vision, spec §1.3)."""
    return "forward" if gt_action == "forward()" else "stop" if gt_action == "stop()" else "turn"


class NavMetrics:
    """Per-step accuracy (#reward==+1 / #step calls, retries and forced calls included) and route success; with
    the gt action of each step also the accuracy per kind of step (forward / turn / stop)."""

    def __init__(self):
        self.steps = self.correct = self.episodes = self.successes = 0
        self.kind_steps: dict[str, int] = {}
        self.kind_correct: dict[str, int] = {}

    def update(self, reward: float, terminated: bool, truncated: bool, info: dict,
               gt_action: str | None = None) -> None:
        ok = int(reward == REWARD_FN_VIRL["CORRECT_ACTION"])
        self.steps += 1
        self.correct += ok
        if gt_action is not None:
            k = action_kind(gt_action)
            self.kind_steps[k] = self.kind_steps.get(k, 0) + 1
            self.kind_correct[k] = self.kind_correct.get(k, 0) + ok
        if terminated or truncated:
            self.episodes += 1
            self.successes += int(bool(info["is_success"]) and terminated and not truncated)

    def summary(self) -> dict:
        out = {"per_step_accuracy": self.correct / max(self.steps, 1),
               "success_rate": self.successes / max(self.episodes, 1), "episodes": float(self.episodes),
               "steps": float(self.steps)}
        if self.kind_steps:
            out["accuracy_by_action"] = {k: self.kind_correct[k] / n for k, n in sorted(self.kind_steps.items())}
            out["steps_by_action"] = dict(sorted(self.kind_steps.items()))
        return out


# ---------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------
def env_kwargs(env_cfg) -> dict:
    """`config.env` (configs/virl) → keyword arguments of `make_env`."""
    kw = dict(city_seed=int(env_cfg.city_seed), city_size_m=float(env_cfg.city_size_m),
              n_train_routes=int(env_cfg.n_train_routes), n_eval_routes=int(env_cfg.n_eval_routes),
              routes_per_style=int(env_cfg.routes_per_style), view_size=int(env_cfg.view_size),
              verify_iter=int(env_cfg.verify_iter), view_layout=str(env_cfg.view_layout),
              full_oracle=bool(env_cfg.full_oracle), wrap_relative=bool(env_cfg.wrap_relative))
    if env_cfg.get("route_file"):
        if not os.path.exists(env_cfg.route_file):
            raise FileNotFoundError(f"config.env.route_file={env_cfg.route_file!r} does not exist")
        kw["route_file"] = str(env_cfg.route_file)
    return kw


def make_env_from_config(split: str, env_cfg, seed: int = 0) -> "NavigationEnv | MultiCityEnv":
    return make_env(split, seed=seed, **env_kwargs(env_cfg))


def make_env(split: str, seed: int = 0, *, city_seed: int = 0, city_size_m: float = 2000.0,
             n_train_routes: int = 1000, n_eval_routes: int = 48, routes_per_style: int = 2,
             n_heldout_routes: int = 200, route_file: str | None = None, **env_kwargs) -> NavigationEnv:
    """Build the env for a split (spec §3).

    * `in_distribution`: style A (`nyc`) city `city_seed`, the `n_train_routes` training routes; `episode_plan`
      = `n_eval_routes` indices drawn with `random.Random(12).choice` (rails/headings re-randomised per reset).
      Train on this env with `reset()` (random route each episode).
    * `rule_ood`: the same routes and plan with the relative action space.
    * `visual_ood`: VLN-mini replica, `routes_per_style` routes on a new map for each of the 9 styles in fixed
      order (2 → 18 routes; 20 → the 9 × 20 set), absolute actions.
    * `heldout_id`: `n_heldout_routes` new routes on the training city (never in the training file).
    `route_file` loads a saved `route_infos.json` (+ `city_meta.json`) instead of generating.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if split == "rule_ood":
        env_kwargs.setdefault("absolute_action", False)
    if route_file is not None:
        city, routes = load_city_meta(route_file), load_route_infos(route_file)
        return NavigationEnv(city, routes, seed=seed, name=split, **env_kwargs)
    if split in ("in_distribution", "rule_ood", "heldout_id"):
        city = cached_city(city_seed, TRAIN_STYLE, city_size_m)
        if split == "heldout_id":
            routes = make_routes(city, n_heldout_routes, seed=10_000 + city_seed)
            return NavigationEnv(city, routes, seed=seed, name=split, **env_kwargs)
        routes = make_routes(city, n_train_routes, seed=city_seed)
        pick = random.Random(12)
        plan = [pick.choice(range(len(routes))) for _ in range(n_eval_routes)]
        return NavigationEnv(city, routes, seed=seed, episode_plan=plan, name=split, **env_kwargs)
    return MultiCityEnv([NavigationEnv(cached_city(1000 + k, style, city_size_m),
                                       make_routes(cached_city(1000 + k, style, city_size_m), routes_per_style,
                                                   seed=2000 + k), seed=seed, name=f"visual_ood/{style}",
                                       **env_kwargs)
                         for k, style in enumerate(VISUAL_OOD_STYLES)], seed=seed)


class MultiCityEnv(gym.Env):
    """Several cities behind one env (visual OOD): route index i is global over the concatenated route lists."""

    metadata = {"render_modes": []}

    def __init__(self, envs: list[NavigationEnv], seed: int | None = None):
        self.envs = envs
        self.offsets = np.cumsum([0] + [len(e.routes) for e in envs])
        self.routes = [r for e in envs for r in e.routes]
        self.episode_plan = list(range(len(self.routes)))
        self.observation_space, self.action_space = envs[0].observation_space, envs[0].action_space
        self._rng = random.Random(seed)
        self.active = envs[0]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = random.Random(seed)
        gidx = int(options["route_idx"]) if options and "route_idx" in options else \
            self._rng.randrange(len(self.routes))
        if not 0 <= gidx < len(self.routes):
            raise ValueError(f"route_idx {gidx} out of range [0, {len(self.routes)})")
        k = int(np.searchsorted(self.offsets, gidx, side="right") - 1)
        self.active = self.envs[k]
        sub_seed = seed if seed is not None else self._rng.randrange(2 ** 31)
        obs, info = self.active.reset(seed=sub_seed, options={"route_idx": gidx - int(self.offsets[k])})
        info["city"] = self.active.name
        return obs, info

    def step(self, action: str):
        obs, r, term, trunc, info = self.active.step(action)
        info["city"] = self.active.name
        return obs, r, term, trunc, info


__all__ = ["Q_VIRL_VL", "RESPONSE_VIRL", "ACTION_SPACE_ABSOLUTE", "ACTION_SPACE_RELATIVE", "REWARD_FN_VIRL",
           "NavigationEnv", "MultiCityEnv", "NavMetrics", "make_env", "expert_answer", "re_match", "step_reward",
           "parse_navigation_string", "build_rail", "build_instructions", "relative_word", "compass_word", "SPLITS"]
