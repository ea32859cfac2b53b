"""Typed config blocks: built and validated once, frozen, unknown keys/attributes rejected, one meaning per key, no
`.get(key, default)` on configs below the start-up point, derived values computed purely."""
import ast
import dataclasses
import glob
import os

import ml_collections
import pytest

from recogdrive_jax import config_types as ct
from recogdrive_jax import configs, stage_configs
from recogdrive_jax.rl import grpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _il():
    return configs.planner_stage_config("il", variant="tiny")


def test_unknown_attribute_raises_and_blocks_are_frozen():
    cfg = ct.typed(_il())
    assert isinstance(cfg.train, ct.TrainConfig) and isinstance(cfg.eval, ct.PlannerEvalConfig)
    with pytest.raises(AttributeError):
        cfg.train.num_step  # noqa: B018 - a typo
    with pytest.raises(AttributeError, match="config.planner.nope"):
        cfg.planner.nope  # noqa: B018 - a Namespace block
    with pytest.raises(AttributeError, match="config.rl"):
        cfg.rl  # noqa: B018 - no such block in an il config
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.num_steps = 3
    with pytest.raises(KeyError, match="config.train.nope"):
        cfg.train.get("nope")  # no silent default for an unknown key


@pytest.mark.parametrize("key,value,match", [
    ("optim.lr", -1.0, r"config\.optim\.lr: expected a float >= 0 \(0 keeps the weights\), got -1"),
    ("optim.lr", "fast", r"config\.optim\.lr: expected a float, got 'fast'"),
    ("train.num_steps", 2.5, r"config\.train\.num_steps: expected an int, got 2\.5"),
    ("train.tensorboard", 1, r"config\.train\.tensorboard: expected a bool"),
    ("mesh.fsdp", 0, r"config\.mesh\.fsdp: expected -1 or a positive int"),
    ("parallel.rules.embed", 3, r"config\.parallel\.rules\.embed: expected a string"),
    ("eval.pdm_regulariser", "jerk", r"config\.eval\.pdm_regulariser: unknown 'jerk'; allowed: \['navsim', 'nuplan'\]"),
    ("data.vl_features", "noise", r"config\.data\.vl_features: unknown 'noise'"),
])
def test_type_and_range_errors_name_the_full_key(key, value, match):
    c = _il()
    block, field = key.rsplit(".", 1)
    node = c
    for p in block.split("."):
        node = node[p]
    with node.ignore_type():
        node[field] = value
    with pytest.raises(configs.ConfigError, match=match):
        configs.validate_common(c)


def test_unknown_keys_and_blocks_are_rejected_naming_them():
    c = _il()
    c.optim.lr_decay = 0.5
    with pytest.raises(configs.ConfigError, match=r"config\.optim: unknown key\(s\) \['lr_decay'\]"):
        configs.validate_common(c)
    c = _il()
    c.cache = ml_collections.ConfigDict(dict(layout="compact"))  # a block of another stage
    with pytest.raises(configs.ConfigError, match=r"config\.cache: unknown key for the il stage"):
        configs.validate_common(c)
    with pytest.raises(ValueError, match=r"config\.rl: unknown key\(s\) \['grup_size'\]"):
        grpo.GRPOConfig.from_mapping({"grup_size": 4})


def test_grad_accum_is_rejected_where_it_means_nothing():
    c = configs.load_config_file(os.path.join(ROOT, "configs", "recogdrive_2b", "rl.py")).get_config()
    c.optim.grad_accum = 2
    with pytest.raises(configs.ConfigError, match=r"config\.optim\.grad_accum=2: not supported by the rl stage"):
        configs.validate_common(c)
    p = configs.load_config_file(os.path.join(ROOT, "configs", "virl", "ppo.py")).get_config("tiny")
    assert p.ppo.minibatch_grad_accum == 2 and p.optim.grad_accum == 1  # migrated: the old meaning's new key
    p.optim.grad_accum = 2
    with pytest.raises(configs.ConfigError, match=r"config\.optim\.grad_accum=2: .*config\.ppo\.minibatch_grad_accum"):
        configs.validate_common(p)
    j = stage_configs.il_joint_stage_config()
    j.model.freeze_llm = True  # il_joint's trainable parts are config.joint.train_*
    with pytest.raises(configs.ConfigError, match=r"config\.model\.freeze_llm=True: not supported by the il_joint .*"
                       r"config\.joint\.train_llm"):
        ct.typed(j)
    s = stage_configs.sft_stage_config()
    s.train.ema_decay = 0.9
    with pytest.raises(configs.ConfigError, match=r"config\.train\.ema_decay=0\.9: not supported by the sft stage"):
        configs.validate_common(s)


def test_defaults_live_in_the_dataclasses():
    c = configs.base_config()
    assert c.train.to_dict() == ct.defaults(ct.TrainConfig, exclude=("ema_decay",))
    assert c.optim.to_dict() == ct.defaults(ct.OptimConfig, exclude=("cosine_steps", "optimizer_steps_per_step"))
    assert configs.planner_eval_block().to_dict() == ct.defaults(ct.PlannerEvalConfig)
    assert stage_configs.cache_stage_config().cache.to_dict() == ct.defaults(ct.CacheConfig)
    j = stage_configs.il_joint_stage_config()
    assert j.joint.to_dict() == ct.defaults(ct.JointConfig) and j.prompt.to_dict() == ct.defaults(ct.PromptConfig)
    from recogdrive_jax.parallel import runtime
    assert ct.defaults(ct.RulesConfig) == runtime.rules_block()


def test_pdm_keys_select_the_scorer_options():
    e = ct.typed(_il()).eval
    assert e.pdm_kwargs == {"lqr_regulariser": "navsim", "float64": False}
    c = _il()
    c.eval.pdm_regulariser, c.eval.pdm_float64 = "nuplan", True
    assert ct.typed(c).eval.pdm_kwargs == {"lqr_regulariser": "nuplan", "float64": True}


def test_derived_values_are_pure_and_typed():
    c = configs.load_config_file(os.path.join(ROOT, "configs", "recogdrive_2b", "sft.py")).get_config()
    cfg = ct.typed(c)
    derived = ct.derive_steps_and_accum(cfg, batches_per_epoch=1000, num_devices=64)
    assert derived == {"train.num_steps": 3000, "optim.grad_accum": 2}
    assert cfg.optim.grad_accum == c.optim.grad_accum and cfg.train.num_steps == c.train.num_steps  # untouched
    run = cfg.with_values(derived)
    assert run.train.num_steps == 3000 and run.optim.grad_accum == 2 and cfg.train.num_steps != 3000
    with pytest.raises(configs.ConfigError, match="does not divide"):
        ct.derive_steps_and_accum(cfg, batches_per_epoch=10, num_devices=3)


# ------------------------------------------------------------------------------------ no defaults below start-up

CHECKED = ("stages", "train", "rl", "vlm", "eval")


def _root_name(node):
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else ""


def _is_config_expr(node) -> bool:
    """`config...`, `cfg`, `tcfg`, `model_cfg.x`, `...config.optim`: an expression reading a config."""
    text = ast.unparse(node)
    root = _root_name(node)
    return (root in ("config", "cfg") or root.endswith(("_cfg", "_config")) or "config." in text
            or text.endswith((".config", "cfg")))


def _offenders(path: str) -> list[str]:
    tree = ast.parse(open(path).read())
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "get" and _is_config_expr(f.value):
            out.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(f, ast.Name) and f.id == "getattr" and len(node.args) == 3 and _is_config_expr(node.args[0]):
            out.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_get_with_default_on_configs_below_start_up():
    files = [f for d in CHECKED for f in glob.glob(os.path.join(ROOT, "recogdrive_jax", d, "*.py"))]
    assert len(files) > 20
    bad = [o for f in sorted(files) for o in _offenders(f)]
    assert not bad, "read the typed block's attribute instead (config_types.py):\n" + "\n".join(bad)


def test_the_ast_check_sees_the_patterns(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("a = config.train.get('x', 1)\nb = model_cfg.get('y')\nc = getattr(cfg, 'z', 0)\n"
                 "d = result.get('pdms', 0.0)\n")
    assert len(_offenders(str(p))) == 3
