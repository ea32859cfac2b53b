"""V-IRL navigation env: determinism, hand-checked rail/instructions, rewards, verify_iter, parsing, SFT data."""
import json
import random

import numpy as np
import pytest

from recogdrive_jax.envs import city as city_mod
from recogdrive_jax.envs.city import City, generate_city, load_route_infos, make_routes, save_route_infos
from recogdrive_jax.envs.navigation import (ACTION_SPACE_ABSOLUTE, ACTION_SPACE_RELATIVE, FAILED_PREFIX,
                                            MSG_WRONG_ACTION, NavigationEnv, NavMetrics, Q_VIRL_VL, build_rail,
                                            expert_answer, make_env, parse_navigation_string, re_match,
                                            relative_word, step_reward)
from recogdrive_jax.envs.sft_data import write_sft_dataset
from recogdrive_jax.envs.styles import STYLES, TRAIN_STYLE, VISUAL_OOD_STYLES

SMALL = dict(city_size_m=800.0, n_train_routes=6)


def _tiny_city() -> City:
    """L-shaped road (0,0)→(0,100)→(100,100) with panos every 10 m; no buildings."""
    nodes = np.array([[0.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    panos = [nodes[0], nodes[1], nodes[2]] + [np.array([0.0, y]) for y in range(10, 100, 10)] + \
        [np.array([x, 100.0]) for x in range(10, 100, 10)]
    return City(seed=0, style=STYLES["nyc"], size_m=100.0, nodes=nodes, edges=np.array([[0, 1], [1, 2]]),
                edge_kind=["avenue", "street"], panos=np.array(panos), pano_edge=np.array([-1] * 3 + [0] * 9 + [1] * 9),
                pano_node=np.array([0, 1, 2] + [-1] * 18), buildings=np.zeros((0, 4, 2)),
                building_height=np.zeros(0), building_color=np.zeros((0, 3), np.uint8),
                building_poi=np.zeros(0, np.int64), pois=[], adjacency=[[0], [0, 1], [1]])


def _tiny_route(c: City, init_heading: int = 200) -> dict:
    g = c.to_geocode
    return {"start_place": {"name": "s", "geocode": g((0, 30)), "relocated_geocode": g((0, 30))},
            "dest_place": {"name": "Foo Cafe", "geocode": g((100, 115))}, "init_heading": init_heading,
            "milestone_info": '{\n    "to_next_intersection_heading": "0 (north)",\n    "landmarks": "Bar Bank is on '
                              'your left front"\n}\n{\n    "to_next_intersection_heading": "90 (east)",\n    '
                              '"landmarks": "The destination Foo Cafe is on your right"\n}',
            "route_results": {"geocode_list": [g((0, 100)), g((100, 100))], "landmark_list": []}}


def test_hand_checked_rail_and_instructions():
    c = _tiny_city()
    text, sentences, rail = build_rail(c, _tiny_route(c), 200, random.Random(0), drop_rate=0.0)
    # 0 − 200 = −200 → wrapped +160 → "right" (the unwrapped official code would say "left").
    assert text == ("1. First, turn right to face north.\n"
                    "2. Move forward until you reach next intersection where Bar Bank is on your left front.\n"
                    "3. Turn right to face east.\n"
                    "4. Move forward until you reach destination where The destination Foo Cafe is on your right.\n")
    # Forward candidates at 1/5..5/5 snap to panos and are kept only > 8 m from both ends.
    ys = [round(c.to_xy(w["geocode"])[1]) for w in rail[1:5]]
    xs = [round(c.to_xy(w["geocode"])[0]) for w in rail[6:10]]
    assert ys == [40, 60, 70, 90] and xs == [20, 40, 60, 80]
    assert len(rail) == 11
    assert [w["gt_action"] for w in rail] == ["turn_direction(north)"] + ["forward()"] * 4 + \
        ["turn_direction(east)"] + ["forward()"] * 4 + ["stop()"]
    assert [w["relative_action"] for w in rail][:6:5] == ["turn_direction(right)", "turn_direction(right)"]
    assert [w["instruction_idx"] for w in rail] == [1, 2, 2, 2, 2, 3, 4, 4, 4, 4, 4]
    assert [w["heading"] for w in rail] == [200, 0, 0, 0, 0, 0, 90, 90, 90, 90, 90]
    assert rail[5]["observation"] == "Bar Bank is on your left front"
    assert rail[5]["intersection_observation"] == "You observe an intersection"
    assert rail[10]["observation"] == "The destination Foo Cafe is on your right"
    assert rail[0]["observation"] == rail[1]["observation"] == "No landmarks nearby"
    assert build_rail(c, _tiny_route(c), 200, random.Random(0), drop_rate=0.0, wrap_relative=False)[1][0] == \
        "First, turn left to face north."


def test_env_prompt_obs_sequence_and_expert_episode():
    c = _tiny_city()
    env = NavigationEnv(c, [_tiny_route(c)], language_only=False, view_size=8, drop_rate=0.0, seed=0)
    obs, info = env.reset(seed=1)
    assert obs["image"].shape == (2 * 8 + 5, 2 * 8 + 5, 3) and obs["image"].dtype == np.uint8
    assert obs["prompt"] == Q_VIRL_VL.format(instruction=info["global_instruction"],
                                             action_space=ACTION_SPACE_ABSOLUTE,
                                             obs_act_seq="O_1: You observe an image of 4 views; \nA_1: \n")
    assert expert_answer(obs) == ('\n{\n  "current observation": "No landmarks nearby; ",\n  "current instruction": '
                                  '"First, turn right to face north.",\n  "action": "turn_direction(north)",\n}\n')
    rewards = []
    for _ in range(5):
        obs, r, te, tr, info = env.step(expert_answer(obs))
        rewards.append(r)
    assert obs["oracle"]["observation"] == "Bar Bank is on your left front; You observe an intersection"
    assert obs["obs_act_seq"].endswith("O_5: No landmarks nearby; \nA_5: forward()\n"
                                       "O_6: You observe an image of 4 views; You observe an intersection\nA_6: \n")
    while not (te or tr):
        obs, r, te, tr, info = env.step(expert_answer(obs))
        rewards.append(r)
    assert rewards == [1.0] * 11 and te and not tr and info["is_success"]
    assert obs["oracle"]["observation"] == "The destination Foo Cafe is on your right; "


def test_determinism_per_seed():
    a = make_env("in_distribution", seed=0, language_only=True, **SMALL)
    b = make_env("in_distribution", seed=0, language_only=True, **SMALL)
    for s in (3, 4):
        oa, ia = a.reset(seed=s)
        ob, ib = b.reset(seed=s)
        assert oa["prompt"] == ob["prompt"] and a.rail == b.rail
    other = {a.reset(seed=s)[0]["prompt"] for s in range(6)}
    assert len(other) > 1
    # Rendering is deterministic too.
    r1 = make_env("in_distribution", seed=0, view_size=12, **SMALL).reset(seed=2)[0]["image"]
    r2 = make_env("in_distribution", seed=0, view_size=12, **SMALL).reset(seed=2)[0]["image"]
    assert np.array_equal(r1, r2) and r1.std() > 0


def test_rewards_verify_iter_and_truncation():
    c = _tiny_city()
    env = NavigationEnv(c, [_tiny_route(c)], language_only=True, drop_rate=0.0, verify_iter=2, seed=0)
    obs, _ = env.reset(seed=0)
    wrong = '{"current observation": "No landmarks nearby", "action": "forward()"}'
    obs, r, te, tr, info = env.step(wrong)
    assert (r, te, tr) == (-1.0, False, False) and info["Verify Info"] == MSG_WRONG_ACTION + "."
    assert [m["role"] for m in obs["messages"]] == ["user", "assistant", "user"]
    assert obs["messages"][2]["content"] == FAILED_PREFIX + MSG_WRONG_ACTION + "."
    assert "{{" in obs["messages"][2]["content"]          # literal double braces, never .format()ted
    # Wrong action + "intersection" in the output observation but not in the landmark-only gt obs → −1.5.
    obs, r, te, tr, info = env.step('{"current observation": "You observe an intersection", "action": "stop()"}')
    assert (r, te, tr) == (-1.5, False, False) and info["Verify Info"].startswith("you are not at any intersection")
    # Third call: ignored output, −1, truncated, failed.
    obs, r, te, tr, info = env.step(expert_answer(obs))
    assert (r, te, tr) == (-1.0, False, True) and info["is_success"] is False
    with pytest.raises(RuntimeError):
        env.step("x")
    # A correct answer resets the attempt budget; success still requires every waypoint in ≤ 2 attempts.
    obs, _ = env.reset(seed=0)
    m = NavMetrics()
    obs, r, te, tr, info = env.step("nonsense")
    m.update(r, te, tr, info)
    while True:
        obs, r, te, tr, info = env.step(expert_answer(obs))
        m.update(r, te, tr, info)
        if te or tr:
            break
    assert te and info["is_success"]
    s = m.summary()
    assert s["success_rate"] == 1.0 and s["per_step_accuracy"] == pytest.approx(11 / 12)
    # Exhaustion at the destination: terminated and truncated both set (official _terminate_step).
    obs, _ = env.reset(seed=0)
    while obs["oracle"]["action"] != "stop()":
        obs, *_ = env.step(expert_answer(obs))
    for _ in range(2):
        obs, r, te, tr, info = env.step("bad")
    obs, r, te, tr, info = env.step("bad")
    assert (r, te, tr, info["is_success"]) == (-1.0, True, True, False)


def test_full_oracle_flag():
    c = _tiny_city()
    env = NavigationEnv(c, [_tiny_route(c)], language_only=True, drop_rate=0.0, full_oracle=True, seed=0)
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        obs, *_ = env.step(expert_answer(obs))
    # At the turn the full oracle obs contains "intersection": a wrong action without it scores −1.5.
    _, r, *_ = env.step('{"current observation": "nothing", "action": "forward()"}')
    assert r == -1.5


@pytest.mark.parametrize("text,expected", [
    ('{"action": "stop()"}', "stop()"),
    ('\n{\n  "current observation": "a",\n  "action": "stop()",\n}\n', "stop()"),    # trailing comma → regex
    ('"action":"stop()"', "None"),                     # regex needs exactly one space after the colon
    ("I think we should go north", "None"),
    ('{"action": 3}', "3"),                            # non-string JSON value → stringified, no crash
    ('[1, 2]', "None"),
    ("", "None"),
])
def test_re_match_malformed(text, expected):
    assert re_match(text, "action") == expected


def test_step_reward_table_and_no_crash_on_garbage():
    assert step_reward('{"action": "forward()"}', "forward()", "No landmarks nearby")[0] == 1.0
    assert step_reward('{"action": "stop()"}', "forward()", "No landmarks nearby")[0] == -1.0
    assert step_reward('{"current observation": "an intersection", "action": "stop()"}', "forward()",
                       "No landmarks nearby")[0] == -1.5
    assert step_reward('{"current observation": "x", "action": "stop()"}', "forward()",
                       "Y; You observe an intersection")[0] == -1.5
    env = make_env("in_distribution", seed=0, language_only=True, **SMALL)
    obs, _ = env.reset(seed=0)
    for junk in ["", "}{", None, 12, '{"action": ["forward()"]}']:
        obs, r, te, tr, info = env.step(junk)
        assert r in (-1.0, -1.5)
        if te or tr:
            obs, _ = env.reset(seed=1)


def test_relative_words_and_rule_ood_action_space():
    assert [relative_word(d) for d in (-90, -45, 0, 1, 45, 46, 350 - 10)] == \
        ["left", "slightly left", "slightly left", "slightly right", "slightly right", "right", "slightly left"]
    assert relative_word(340, wrap=False) == "right" and relative_word(340) == "slightly left"
    env = make_env("rule_ood", seed=0, language_only=True, **SMALL)
    obs, _ = env.reset(seed=0)
    assert ACTION_SPACE_RELATIVE in obs["prompt"]
    acts = set()
    while True:
        acts.add(obs["oracle"]["action"])
        obs, r, te, tr, _ = env.step(expert_answer(obs))
        assert r == 1.0
        if te or tr:
            break
    assert acts <= {"forward()", "stop()", "turn_direction(left)", "turn_direction(right)",
                    "turn_direction(slightly left)", "turn_direction(slightly right)"}
    idd = make_env("in_distribution", seed=0, language_only=True, **SMALL)
    assert idd.episode_plan == env.episode_plan and len(idd.episode_plan) == 48


def test_generated_routes_schema_roundtrip(tmp_path):
    c = city_mod.cached_city(0, TRAIN_STYLE, 800.0)
    routes = make_routes(c, 8, seed=0)
    path = str(tmp_path / "r" / "route_infos.json")
    save_route_infos(path, routes, c)
    raw = json.load(open(path))
    assert raw[1] == 8 and len(raw[0]) == 8
    assert load_route_infos(path) == routes
    for r in routes:
        blocks = parse_navigation_string(r["milestone_info"])
        assert 3 <= len(blocks) <= 7 and len(r["route_results"]["geocode_list"]) == len(blocks)
        assert all(b["to_next_intersection_heading"].split("(")[1][:-1] in city_mod.COMPASS_WORDS for b in blocks)
        assert blocks[-1]["landmarks"].startswith("The destination ")
    env = make_env("in_distribution", route_file=path, language_only=True)
    assert len(env.routes) == 8
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[{"start_place": {}}], 1]))
    with pytest.raises(ValueError, match="route 0"):
        load_route_infos(str(bad))


def test_visual_ood_split_styles_and_vocab():
    env = make_env("visual_ood", seed=0, language_only=True, city_size_m=800.0)
    assert len(env.routes) == 18 and [e.name for e in env.envs] == [f"visual_ood/{s}" for s in VISUAL_OOD_STYLES]
    obs, info = env.reset(seed=0, options={"route_idx": 17})
    assert info["city"] == "visual_ood/sf"
    train = set(STYLES[TRAIN_STYLE].name_words)
    for s in VISUAL_OOD_STYLES:
        assert not train & set(STYLES[s].name_words), s


def test_destination_sign_visible_in_matching_view():
    """At the destination the sign colour shows up in the view its spatial word names."""
    c = generate_city(0, "nyc", 800.0)
    env = NavigationEnv(c, make_routes(c, 2, seed=0), view_size=48, seed=0)
    obs, _ = env.reset(seed=0, options={"route_idx": 0})
    while obs["oracle"]["action"] != "stop()":
        obs, *_ = env.step(expert_answer(obs))
    word = obs["oracle"]["landmark_observation"].rsplit("on your ", 1)[1]
    view = {"front": 0, "right": 1, "behind": 2, "left": 3}[word]
    # Paint the destination's sign texture a unique colour and re-render the destination grid.
    k = next(i for i, p in enumerate(c.pois) if p.name == env.route["dest_place"]["name"])
    env.renderer._atlas[k] = np.full((8, 32, 3), (255, 0, 255), np.uint8)
    env.renderer._cache.clear()
    grid = env.renderer.grid(obs["oracle"]["pano"], obs["oracle"]["heading"])
    R = 48
    tiles = [grid[(i // 2) * (R + 5):(i // 2) * (R + 5) + R, (i % 2) * (R + 5):(i % 2) * (R + 5) + R]
             for i in range(4)]
    counts = [int((np.abs(t.astype(int) - (255, 0, 255)).sum(-1) < 60).sum()) for t in tiles]
    assert counts[view] > 0.03 * R * R and sum(counts) == counts[view], counts


def test_sft_writer(tmp_path):
    env = make_env("in_distribution", seed=0, view_size=8, **SMALL)
    meta = write_sft_dataset(env, str(tmp_path), name="virl", rail_redraws=1, route_indices=[0, 1])
    m = meta["virl"]
    assert m["repeat_time"] == 1 and json.load(open(tmp_path / "meta.json")) == meta
    rows = [json.loads(x) for x in open(m["annotation"])]
    assert len(rows) == m["length"] > 4
    r0 = rows[0]
    assert r0["conversations"][0]["from"] == "human" and r0["conversations"][0]["value"].startswith(
        "<image>\n\n[Task Description]")
    assert r0["conversations"][1]["from"] == "gpt" and re_match(r0["conversations"][1]["value"], "action") \
        .startswith("turn_direction(")
    assert (tmp_path / r0["image"]).exists()
    assert sum(re_match(r["conversations"][1]["value"], "action") == "stop()" for r in rows) == 2


def test_nav_metrics_accuracy_by_action_kind():
    m = NavMetrics()
    info = {"is_success": False}
    m.update(1.0, False, False, info, gt_action="turn_direction(north)")
    m.update(-1.0, False, False, info, gt_action="forward()")
    m.update(1.0, False, False, info, gt_action="forward()")
    m.update(-1.5, False, True, info, gt_action="stop()")
    s = m.summary()
    assert s["per_step_accuracy"] == 0.5 and s["success_rate"] == 0.0
    assert s["accuracy_by_action"] == {"forward": 0.5, "stop": 0.0, "turn": 1.0}
    assert s["steps_by_action"] == {"forward": 2, "stop": 1, "turn": 1}
    assert "accuracy_by_action" not in NavMetrics().summary()
