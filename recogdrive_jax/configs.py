"""Config pieces shared by every stage and start-up validation of the common keys.

Config files in `configs/` start from `base_config()` and add their stage's blocks. `validate()` runs
before anything is built, so a bad value fails in a second with a message naming the key.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping, Sequence

import ml_collections
from ml_collections.config_dict import placeholder

from recogdrive_jax import config_types as ct
from recogdrive_jax.config_types import ConfigError  # noqa: F401 (re-exported: configs.ConfigError)

# `config.stage` values: the registry in stages/__init__.py maps each to its module (checked by a test).
STAGE_NAMES = ("pipeline", "sft", "cache", "il", "il_joint", "rl", "eval", "ppo", "eval_nav", "navsim_convert")

# The cache's layouts; upstream_compatible = left-padded fp32 like the PyTorch pipeline.
CACHE_LAYOUTS = ct.CACHE_LAYOUTS




def base_config() -> ml_collections.ConfigDict:
    """`stage`, `seed` and the blocks every stage has; types, defaults and their meaning: config_types.py."""
    c = ml_collections.ConfigDict()
    c.stage = "il"
    c.seed = 0
    c.mesh = ct.default_block(ct.MeshConfig)
    c.parallel = ct.default_block(ct.ParallelConfig)
    c.distributed = ct.default_block(ct.DistributedConfig)
    c.host = ct.default_block(ct.HostConfig)
    c.train = ct.default_block(ct.TrainConfig, exclude=("ema_decay",))  # planner stages add it
    c.optim = ct.default_block(ct.OptimConfig, exclude=("cosine_steps", "optimizer_steps_per_step"))
    return c


def _require(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"config.{key}: {msg}")


def validate_common(config) -> ct.RunConfig:
    """Types and checks the whole config once (config_types.typed: unknown keys, types, ranges, keys the stage does
    not honour) and returns the typed RunConfig; stages call their own checks after this."""
    _require(config.stage in STAGE_NAMES, "stage", f"unknown stage {config.stage!r}; allowed: {sorted(STAGE_NAMES)}")
    if config.stage == "pipeline":  # its top level holds override slots; each resolved step is validated instead
        resolve(config)
        return None
    return ct.typed(config)


# How the planner's DiT runs (the variant-independent PlannerConfig fields, so `--config.planner.<key>` reaches
# them on a locked config; their defaults are PlannerConfig's: tests/test_attention_remat.py checks).
PLANNER_RUN_OPTIONS = dict(kind="diffusion", attention_impl="auto", scan_layers=False, remat=False, remat_policy="full")


def planner_block(variant: str = "small", vlm_size: str = "large", **overrides) -> ml_collections.ConfigDict:
    """`config.planner`: any field of `models.planner.PlannerConfig` (kind 'diffusion' | 'mlp', ...)."""
    return ml_collections.ConfigDict(dict(variant=variant, vlm_size=vlm_size, **{**PLANNER_RUN_OPTIONS, **overrides}))


def planner_data_block(**overrides) -> ml_collections.ConfigDict:
    """`config.data` of the planner stages (data/planner_data.py); keys: config_types.PlannerDataConfig."""
    return ct.default_block(ct.PlannerDataConfig, **overrides)


def planner_eval_block(**overrides) -> ml_collections.ConfigDict:
    """`config.eval` of the planner stages; keys: config_types.PlannerEvalConfig."""
    return ct.default_block(ct.PlannerEvalConfig, **overrides)


def planner_stage_config(stage: str, variant: str = "small", vlm_size: str = "large") -> ml_collections.ConfigDict:
    """Common keys + planner/data/eval blocks, with upstream's IL optimiser (DESIGN §8.1)."""
    c = base_config()
    c.stage = stage
    c.planner = planner_block(variant, vlm_size)
    c.data = planner_data_block()
    c.eval = planner_eval_block()
    c.train.ema_decay = 0.999
    c.optim.update(dict(lr=1e-4, weight_decay=1e-4, b1=0.9, b2=0.95, clip_norm=1.0, min_lr_ratio=0.01))
    return c


def load_config_file(path: str, relative_to: str | None = None):
    """Imports a config file as a module (config files are not a package), e.g. a sibling's shared pieces:
    `load_config_file('_common.py', relative_to=__file__)`."""
    if relative_to is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    name = "recogdrive_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def set_dotted(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Applies {'train.num_steps': 2, ...} to `config` in place (as `--config.train.num_steps=2` would)."""
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return config


# ------------------------------------------------------------------------------------------ pipeline configs
# A pipeline config (the `pipeline` stage, stages/pipeline.py) holds each step's full config plus an override slot
# at the top level for every key any step has; see stages/pipeline.py's docstring for the rules.

# Top-level keys that are not override slots: what the pipeline itself is, and the process-wide start-up block.
NOT_SLOTS = ("stage", "pipeline")
PROCESS_WIDE = ("distributed", "host")
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
        raise ConfigError(f"config.{path}={value!r}: {where} has {path}={old!r} of another type ({e})") \
            from None


def pipeline_config(steps: Sequence[str], step_configs: Mapping[str, ml_collections.ConfigDict],
                    source: str = "pipeline") -> ml_collections.ConfigDict:
    """The config of a pipeline running `steps` (names in `step_configs`; `name:stage` allowed), with an unset
    override slot at the top level for every key of every step config (see the module docstring)."""
    steps = [s for s in steps if s]
    unknown = [s for s in steps if s.split(":")[0] not in step_configs]
    if unknown or not steps:
        raise ConfigError(f"{source}: unknown step(s) {unknown or steps}; allowed: {list(step_configs)}")
    c = ml_collections.ConfigDict()
    c.stage = "pipeline"
    c.pipeline = ml_collections.ConfigDict()
    c.pipeline.steps = ",".join(steps)
    c.pipeline.configs = ml_collections.ConfigDict({k: ml_collections.ConfigDict(v.to_dict())
                                                    for k, v in step_configs.items()})
    c.pipeline[_MARK] = "override_slots"
    for key in PROCESS_WIDE:
        c[key] = base_config()[key]
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
        raise ConfigError("config: a pipeline config must be built with "
                                  "recogdrive_jax.configs.pipeline_config() (its top level holds the "
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
        raise ConfigError(f"config.pipeline.configs.{name}: missing; config.pipeline.steps names it")
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
            raise ConfigError(
                f"config.{path}: no step of this pipeline ({', '.join(n for n, _ in subs)}) has this key"
                + (f"; steps that do: {has}" if has else ""))
        for name, sub in subs:
            if name in hit:
                _set(sub, path, value, f"pipeline step {name!r}")
    for name, sub in subs:
        if workdir is not None:
            _fill_workdir(sub, workdir)
        try:
            validate_common(sub)
        except ConfigError as e:
            raise ConfigError(f"pipeline step {name!r}: {e}") from None
    return subs
