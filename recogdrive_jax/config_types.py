"""Typed, frozen config blocks: every key's type, default and valid range in one place, checked once at start-up.

Config files stay `ml_collections` files (the README commands and `--config.a.b=v` overrides read them); `typed()`
turns one into a `RunConfig` of frozen dataclass blocks (`config.train` → `TrainConfig`, ...) before anything is
built. `from_mapping` is the one conversion every block goes through: an unknown key, a wrong type or a value out of
range is a `ConfigError` naming the full key (`config.optim.lr: expected a float >= 0 (0 keeps the weights), got -1`), a missing key takes
the field's default. Code below the stages reads attributes of the typed blocks; an unknown attribute raises. The
builders in configs.py / stage_configs.py take their defaults from these dataclasses (`defaults(...)`), so no
default is written twice.

Each key means one thing in every stage that has it; a stage that does not honour a key rejects a non-default
value (`UNSUPPORTED`), e.g. `optim.grad_accum` in `rl` (no accumulation there) or in `ppo` (whose accumulation is
per minibatch: `ppo.minibatch_grad_accum`). Values a stage derives at run time (SFT's steps and accumulation) come
from pure functions (`derive_steps_and_accum`) and are recorded under `derived` in config.json, never written back.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, ClassVar, Mapping

import ml_collections

from recogdrive_jax.errors import UserError
from recogdrive_jax.host_memory import MALLOC_POLICIES


class ConfigError(UserError):
    """A config value is invalid; the message names the key."""


# ------------------------------------------------------------------------------------------------ the machinery

class Block:
    """Base of the typed blocks: frozen dataclass fields, read as attributes. `keys()`/`[key]`/`to_dict()` make a
    block a read-only mapping for library code outside the stages; `get(key)` answers only a known key (an unknown
    one raises: there is no silent default)."""
    KEY: ClassVar[str] = ""  # the block's key in the config (error messages)

    def checks(self) -> list[tuple[bool, str, str]]:
        """(ok, field, message) range checks; `from_mapping` raises on the first failure, naming the key."""
        return []

    def __post_init__(self):
        for ok, field, msg in self.checks():
            if not ok:
                raise ConfigError(f"config.{self.KEY}.{field}: {msg}")

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(f"config.{self.KEY}.{key}: unknown key; allowed: {self.keys()}")
        return getattr(self, key)

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def get(self, key: str, default: Any = None):  # noqa: ARG002 - a known key always has its value
        return self[key]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_dict(self) -> dict:
        return {k: _plain(v) for k, v in self.items()}


def _plain(v):
    if isinstance(v, (Block, Namespace)):
        return v.to_dict()
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def _as_dict(mapping) -> dict:
    if mapping is None:
        return {}
    if hasattr(mapping, "to_dict"):
        return dict(mapping.to_dict())
    return dict(mapping)


def _type_error(key: str, want: str, value) -> ConfigError:
    return ConfigError(f"config.{key}: expected {want}, got {value!r} ({type(value).__name__})")


def _convert(key: str, typ, value):
    """`value` checked against the annotation `typ` (int, float, bool, str, tuple, dict or a Block class)."""
    if isinstance(typ, type) and issubclass(typ, Block):
        return from_mapping(typ, value, key)
    if typ is bool:
        if not isinstance(value, bool):
            raise _type_error(key, "a bool", value)
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, "an int", value)
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(key, "a float", value)
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise _type_error(key, "a string", value)
        return value
    if typ is tuple:
        if isinstance(value, str) or not isinstance(value, (tuple, list)):
            raise _type_error(key, "a tuple", value)
        return tuple(value)
    if typ is dict:
        if value is None:
            return types.MappingProxyType({})
        if not (isinstance(value, Mapping) or hasattr(value, "to_dict")):
            raise _type_error(key, "a mapping", value)
        return types.MappingProxyType(_as_dict(value))
    raise TypeError(f"config_types: unsupported field type {typ!r} of config.{key}")


def from_mapping(cls, mapping, key: str | None = None):
    """The frozen `cls` block from `mapping` (a ConfigDict, dict or an instance of `cls`): unknown keys, wrong
    types and out-of-range values raise a ConfigError naming `config.<key>.<field>`; missing keys take the
    dataclass defaults."""
    own = getattr(cls, "KEY", "")
    key = key or own
    if isinstance(mapping, cls):
        return mapping
    if mapping is not None and not (isinstance(mapping, (Mapping, Block, Namespace)) or hasattr(mapping, "to_dict")):
        raise ConfigError(f"config.{key}: expected a block of keys, got {mapping!r}")
    d = _as_dict(mapping)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"config.{key}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {name: _convert(f"{key}.{name}", hints[name], d[name]) for name in names if name in d}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if own and key != own:  # the same block class under another key
            raise ConfigError(str(e).replace(f"config.{own}.", f"config.{key}.", 1)) from None
        raise


def defaults(cls, exclude: tuple[str, ...] = ()) -> dict:
    """{field: default} of a block, as the ml_collections builders want it (nested blocks as dicts)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        v = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = v.to_dict() if isinstance(v, Block) else dict(v) if isinstance(v, Mapping) else v
    return out


def default_block(cls, exclude: tuple[str, ...] = (), **overrides):
    """A block's defaults (minus `exclude`) with `overrides`, as the `ml_collections.ConfigDict` a config file edits."""
    d = defaults(cls, exclude)
    d.update(overrides)
    return ml_collections.ConfigDict(d)


class Namespace:
    """A block without a schema here (validated where it is used, e.g. `config.rl` by rl/grpo.GRPOConfig, the
    planner block by models/planner.PlannerConfig): frozen, attribute access, an unknown attribute raises."""

    def __init__(self, mapping, key: str):
        d = {}
        for k, v in _as_dict(mapping).items():
            if isinstance(v, Mapping):
                v = Namespace(v, f"{key}.{k}")
            elif isinstance(v, list):
                v = tuple(v)
            d[k] = v
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_values", d)

    def __getattr__(self, name):
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"config.{self._key}.{name}: unknown key; allowed: {sorted(values)}")

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"config.{self._key} is frozen")

    def __getitem__(self, name):
        try:
            return self.__getattr__(name)
        except AttributeError as e:
            raise KeyError(str(e)) from None

    def __contains__(self, name) -> bool:
        return name in self._values

    def keys(self):
        return list(self._values)

    def items(self):
        return list(self._values.items())

    def get(self, key: str, default: Any = None):  # for libraries below the stages reading optional keys
        return self._values[key] if key in self._values else default

    def to_dict(self) -> dict:
        return {k: _plain(v) for k, v in self._values.items()}

    def __repr__(self):
        return f"Namespace(config.{self._key}={self.to_dict()!r})"


def _dotted_replace(block, path: list[str], value, key: str):
    name, rest = path[0], path[1:]
    if isinstance(block, Namespace):
        d = block.to_dict()
        node = d
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        return Namespace(d, key)
    if name not in block.keys():
        raise ConfigError(f"config.{key}.{name}: unknown key; allowed: {block.keys()}")
    new = _dotted_replace(getattr(block, name), rest, value, f"{key}.{name}") if rest else value
    hints = typing.get_type_hints(type(block))
    return dataclasses.replace(block, **{name: _convert(f"{key}.{name}", hints[name], new)})


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One stage's whole config, typed: `stage`, `seed` and the blocks (`config.train`, `config.data`, ...)."""
    stage: str
    seed: int
    blocks: Mapping[str, Any]

    def __getattr__(self, name):
        blocks = object.__getattribute__(self, "blocks")
        if name in blocks:
            return blocks[name]
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"config.{name}: the {self.stage} config has no such block; it has {sorted(blocks)}")

    def __contains__(self, name) -> bool:
        return name in ("stage", "seed") or name in self.blocks

    def __getitem__(self, name):
        return getattr(self, name)

    def keys(self):
        return ["stage", "seed", *self.blocks]

    def to_dict(self) -> dict:
        return {"stage": self.stage, "seed": self.seed, **{k: _plain(v) for k, v in self.blocks.items()}}

    def to_json_best_effort(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), default=str, **kwargs)

    def with_values(self, values: Mapping[str, Any]) -> "RunConfig":
        """A new RunConfig with {'train.num_steps': 3000, ...} applied (typed and checked); self is unchanged."""
        blocks = dict(self.blocks)
        for dotted, value in values.items():
            name, *path = dotted.split(".")
            if name not in blocks or not path:
                raise ConfigError(f"config.{dotted}: not a key of the {self.stage} config")
            blocks[name] = _dotted_replace(blocks[name], path, value, name)
        out = RunConfig(self.stage, self.seed, types.MappingProxyType(blocks))
        check_cross(out)
        return out


# ------------------------------------------------------------------------------------------------ common blocks

@dataclasses.dataclass(frozen=True)
class MeshConfig(Block):
    """`config.mesh`: mesh axes ('data', 'fsdp', 'tensor'); -1 fills with the remaining devices."""
    KEY: ClassVar[str] = "mesh"
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def checks(self):
        return [(v == -1 or v >= 1, k, f"expected -1 or a positive int, got {v!r}")
                for k, v in (("data", self.data), ("fsdp", self.fsdp), ("tensor", self.tensor))]


@dataclasses.dataclass(frozen=True)
class RulesConfig(Block):
    """`config.parallel.rules`: logical axis name -> mesh axes ('tensor', 'data,fsdp', '' = replicated); the
    defaults equal parallel/sharding.LOGICAL_RULES (a test keeps them equal), e.g. --config.parallel.rules.embed=tensor."""
    KEY: ClassVar[str] = "parallel.rules"
    batch: str = "data,fsdp"
    embed: str = ""
    mlp: str = "tensor"
    heads: str = "tensor"
    kv: str = "tensor"
    head_dim: str = ""
    vocab: str = "tensor"
    layers: str = ""
    norm: str = ""
    time: str = ""
    seq: str = ""


@dataclasses.dataclass(frozen=True)
class ParallelConfig(Block):
    """`config.parallel`: zero1 = Adam moments sharded over `data` (upstream's DeepSpeed ZeRO-1); params stay
    replicated there. `rules`: RulesConfig."""
    KEY: ClassVar[str] = "parallel"
    zero1: bool = True
    rules: RulesConfig = dataclasses.field(default_factory=RulesConfig)


@dataclasses.dataclass(frozen=True)
class DistributedConfig(Block):
    """`config.distributed` (multi-host): empty values fall back to JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID; auto = SLURM/K8s auto-detection."""
    KEY: ClassVar[str] = "distributed"
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    auto: bool = False
    timeout_s: int = 300


@dataclasses.dataclass(frozen=True)
class HostConfig(Block):
    """`config.host` (process-wide, applied at start-up): malloc = 'system' (glibc's defaults) or 'reuse', which
    keeps freed host memory in the process for the next step (XLA CPU's per-step temporaries are not faulted in
    again: faster for big steps such as SFT at real widths, slower for small multi-threaded ones: host_memory.py)."""
    KEY: ClassVar[str] = "host"
    malloc: str = "system"

    def checks(self):
        return [(self.malloc in MALLOC_POLICIES, "malloc",
                 f"unknown {self.malloc!r}; allowed: {list(MALLOC_POLICIES)}")]


@dataclasses.dataclass(frozen=True)
class TrainConfig(Block):
    """`config.train`: the loop's knobs (train/loop.py)."""
    KEY: ClassVar[str] = "train"
    num_steps: int = 100
    batch_size: int = 8  # global batch (all processes together)
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 50  # 0: only at the end
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    tensorboard: bool = True
    init_from: str = ""  # parameter checkpoint dir or another run's workdir
    ema_decay: float = 0.0  # EMA of the params (planner stages: il, rl, il_joint); 0 = none

    def checks(self):
        out = [(v >= 1, k, f"expected an int >= 1, got {v!r}") for k, v in
               (("num_steps", self.num_steps), ("batch_size", self.batch_size), ("log_every", self.log_every),
                ("keep_checkpoints", self.keep_checkpoints))]
        out += [(v >= 0, k, f"expected an int >= 0, got {v!r}") for k, v in
                (("eval_every", self.eval_every), ("checkpoint_every", self.checkpoint_every))]
        out.append((0.0 <= self.ema_decay < 1.0, "ema_decay", f"expected a float in [0, 1), got {self.ema_decay!r}"))
        return out


SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig(Block):
    """`config.optim`: AdamW + linear warmup + cosine/constant + global-norm clip + freeze masks (train/optim.py).

    grad_accum: micro-batches per optimizer step, the batch split into that many scanned micro-batches (`sft`,
    `il`, `il_joint`); `rl` and `ppo` reject a value other than 1 (PPO: `ppo.minibatch_grad_accum`)."""
    KEY: ClassVar[str] = "optim"
    lr: float = 1e-4
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # > 0 wins over warmup_ratio
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0  # 0 disables
    grad_accum: int = 1
    freeze: tuple = ()  # regexes of parameter paths that get no update and no moments
    cosine_steps: int = 0  # the cosine period; 0 = the run length (PPO: T_max=20 over 15 updates)
    optimizer_steps_per_step: int = 1  # > 1: the LR holds for that many optimizer updates per loop step (PPO)

    def checks(self):
        return [
            (self.lr >= 0, "lr", f"expected a float >= 0 (0 keeps the weights), got {self.lr!r}"),
            (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"expected a float in [0, 1), got {self.warmup_ratio!r}"),
            (self.warmup_steps >= 0, "warmup_steps", f"expected an int >= 0, got {self.warmup_steps!r}"),
            (self.schedule in SCHEDULES, "schedule", f"unknown {self.schedule!r}; allowed: {list(SCHEDULES)}"),
            (self.min_lr_ratio >= 0, "min_lr_ratio", f"expected a float >= 0, got {self.min_lr_ratio!r}"),
            (self.weight_decay >= 0, "weight_decay", f"expected a float >= 0, got {self.weight_decay!r}"),
            (self.eps > 0, "eps", f"expected a float > 0, got {self.eps!r}"),
            (self.clip_norm >= 0, "clip_norm", f"expected a float >= 0 (0 disables), got {self.clip_norm!r}"),
            (self.grad_accum >= 1, "grad_accum", f"expected an int >= 1, got {self.grad_accum!r}"),
            (all(isinstance(p, str) for p in self.freeze), "freeze", f"expected regex strings, got {self.freeze!r}"),
            (self.cosine_steps >= 0, "cosine_steps", f"expected an int >= 0, got {self.cosine_steps!r}"),
            (self.optimizer_steps_per_step >= 1, "optimizer_steps_per_step",
             f"expected an int >= 1, got {self.optimizer_steps_per_step!r}"),
        ]


# ------------------------------------------------------------------------------------------------ planner stages

PLANNER_SOURCES = ("synthetic", "navsim")
VL_FEATURES = ("real", "shuffled", "zeros")
VL_NORMALIZE = ("none", "standardize", "whiten")  # = data/planner_data.VL_NORMALIZE
PDM_REGULARISERS = ("navsim", "nuplan")


@dataclasses.dataclass(frozen=True)
class PlannerDataConfig(Block):
    """`config.data` of the planner stages and `cache` (data/planner_data.py)."""
    KEY: ClassVar[str] = "data"
    source: str = "synthetic"  # 'synthetic' (the world in sim/world.py) | 'navsim' (converted NAVSIM logs)
    navsim_dir: str = ""  # source='navsim': output root of `convert navsim-logs` (<split>/samples.npz per split)
    navsim_metric_cache: str = ""  # source='navsim': PDM inputs, a `convert navsim-metric-cache` .npz or folder
    cache_dir: str = ""  # hidden-state cache (from the `cache` stage); empty = synthetic world + fixed scene tokens
    vl_pad_to: int = 0  # static VL length read from a compact cache (0 = the cache's max_len)
    vl_features: str = "real"  # control: 'real' | 'shuffled' (another scene's states, fixed derangement) | 'zeros'
    vl_shuffle_seed: int = 0  # the derangement of vl_features='shuffled'
    # read the cache split whole into host memory once (stored dtype) instead of per batch; bitwise the same batches
    vl_in_memory: bool = False
    # normalise the cached states by the cache's train split (its first 512 scenes' tokens) in every split, before
    # the vl_features control: 'none' = upstream (raw states) | 'standardize' (per channel) | 'whiten' (ZCA). The
    # planner's eval / rl on the same cache must set it too: the statistics are not part of the checkpoint
    vl_normalize: str = "none"
    num_train_scenes: int = 2000
    num_eval_scenes: int = 128
    scene_seed: int = 0
    token_seed: int = 0

    def checks(self):
        return [
            (self.source in PLANNER_SOURCES, "source", f"unknown {self.source!r}; allowed: {list(PLANNER_SOURCES)}"),
            (self.vl_features in VL_FEATURES, "vl_features",
             f"unknown {self.vl_features!r}; allowed: {list(VL_FEATURES)}"),
            (self.vl_normalize in VL_NORMALIZE, "vl_normalize",
             f"unknown {self.vl_normalize!r}; allowed: {list(VL_NORMALIZE)}"),
            (self.vl_pad_to >= 0, "vl_pad_to", f"expected an int >= 0, got {self.vl_pad_to!r}"),
            (self.num_train_scenes >= 0, "num_train_scenes", f"expected an int >= 0, got {self.num_train_scenes!r}"),
            (self.num_eval_scenes >= 0, "num_eval_scenes", f"expected an int >= 0, got {self.num_eval_scenes!r}"),
        ]


@dataclasses.dataclass(frozen=True)
class PlannerEvalConfig(Block):
    """`config.eval` of the planner stages (eval/planner_eval.py)."""
    KEY: ClassVar[str] = "eval"
    split: str = "eval"
    # 'deterministic' (DDIM eta 0) | 'upstream' (the agent's stochastic eta = 1 sampling, seeded) | a comma list,
    # e.g. 'upstream,deterministic': the eval stage scores each, the first is the headline and the one il/rl
    # evaluate with (eval/planner_eval.py PROTOCOLS)
    protocol: str = "deterministic"
    batch_size: int = 64
    num_plots: int = 6
    baseline: str = ""  # 'constant_velocity' scores the baseline instead of a checkpoint (eval stage)
    checkpoint: str = ""  # eval stage: a run workdir or parameter checkpoint to score
    use_ema: bool = True
    # The PDM scorer (sim/pdm.py): the LQR velocity-fit regulariser, 'navsim' (what NAVSIM's code computes) or
    # 'nuplan' (nuPlan's jerk penalty); used by every held-out score and, in `rl`, by the reward too.
    pdm_regulariser: str = "navsim"
    # Score held-out plans in float64 (NAVSIM's precision, scoped jax.enable_x64). Evaluation only: the `rl`
    # reward is computed inside the jitted update, which stays float32 whatever this says.
    pdm_float64: bool = False

    def checks(self):
        return [
            (self.batch_size >= 1, "batch_size", f"expected an int >= 1, got {self.batch_size!r}"),
            (self.num_plots >= 0, "num_plots", f"expected an int >= 0, got {self.num_plots!r}"),
            (self.pdm_regulariser in PDM_REGULARISERS, "pdm_regulariser",
             f"unknown {self.pdm_regulariser!r}; allowed: {list(PDM_REGULARISERS)}"),
        ]

    @property
    def pdm_kwargs(self) -> dict:
        """The keyword arguments of sim/pdm.pdm_score (and eval/planner_eval.score_plans) these keys select."""
        return {"lqr_regulariser": self.pdm_regulariser, "float64": self.pdm_float64}


# ------------------------------------------------------------------------------------------------ VLM stages

DTYPES = ("bfloat16", "float32")
# the model's run options (models/layers.REMAT_POLICIES, parallel/kernels.ATTENTION_IMPLS; repeated here so config
# code imports no model: tests/test_attention_remat.py checks they agree)
REMAT_POLICIES = ("full", "dots_saveable", "dots_with_no_batch_dims_saveable", "save_attention_out")
ATTENTION_IMPLS = ("auto", "xla", "jax_nn", "cudnn", "chunked", "per_head")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Block):
    """`config.model`: which InternVL and how it is computed (`sft`, `cache`, `il_joint`, `ppo`, `eval_nav`)."""
    KEY: ClassVar[str] = "model"
    variant: str = "tiny"  # random init only: models/internvl.VARIANTS
    init_from: str = ""  # HF dir | Orbax dir from `convert internvl --from-hf` | an sft workdir; '' = random init
    tokenizer: str = ""  # tokenizer dir; '' = init_from's (HF dir / sft workdir), else WORKDIR's, else generated
    dtype: str = "bfloat16"  # compute dtype; params stay fp32
    remat: bool = True  # gradient checkpointing per layer (both towers)
    remat_policy: str = "full"  # what a checkpointed layer keeps: models/layers.REMAT_POLICIES
    attention_impl: str = "auto"  # 'auto' (parallel/kernels.attention_impl) | 'xla' | 'jax_nn' | 'cudnn' | 'chunked'
    #                               | 'per_head'
    drop_path_rate: float = -1.0  # ViT drop path; < 0 keeps the checkpoint's / variant's value
    freeze_vision: bool = False  # upstream freeze_backbone
    freeze_llm: bool = False
    freeze_mlp: bool = False
    loss_chunk: int = 2048  # tokens per logits chunk (the [T, vocab] logits are never materialised at once)
    llm: dict = dataclasses.field(default_factory=dict)  # random-init LLM config field overrides (checked by name)
    vit: dict = dataclasses.field(default_factory=dict)  # random-init ViT config field overrides

    def checks(self):
        return [(self.dtype in DTYPES, "dtype", f"expected one of {list(DTYPES)}, got {self.dtype!r}"),
                (self.loss_chunk >= 1, "loss_chunk", f"expected an int >= 1, got {self.loss_chunk!r}"),
                (self.remat_policy in REMAT_POLICIES, "remat_policy",
                 f"expected one of {list(REMAT_POLICIES)}, got {self.remat_policy!r}"),
                (self.attention_impl in ATTENTION_IMPLS, "attention_impl",
                 f"expected one of {list(ATTENTION_IMPLS)}, got {self.attention_impl!r}")]


@dataclasses.dataclass(frozen=True)
class NavModelConfig(ModelConfig):
    """`config.model` of the V-IRL configs: the InternVL trunk + the PPO value head."""
    value_hidden: tuple = (1024, 512)  # Linear(D,1024)-ReLU-Linear(1024,512)-ReLU-Linear(512,1)
    system_message: bool = True  # the internvl2_5 default system turn

    def checks(self):
        return super().checks() + [(all(isinstance(h, int) and h >= 1 for h in self.value_hidden), "value_hidden",
                                    f"expected positive ints, got {self.value_hidden!r}")]


def model_config(model_cfg) -> ModelConfig:
    """`config.model` typed: a NavModelConfig when it has the value-head keys (the V-IRL configs), else a
    ModelConfig (library entry points call this, so a partial mapping gets the defaults)."""
    if isinstance(model_cfg, ModelConfig):
        return model_cfg
    nav = model_cfg is not None and any(k in model_cfg for k in ("value_hidden", "system_message"))
    return from_mapping(NavModelConfig if nav else ModelConfig, model_cfg, "model")


def nav_model_config(model_cfg) -> NavModelConfig:
    """`config.model` of the navigation policy (NavModelConfig; a plain ModelConfig gets the value-head defaults)."""
    if isinstance(model_cfg, NavModelConfig):
        return model_cfg
    return from_mapping(NavModelConfig, model_cfg, "model")


@dataclasses.dataclass(frozen=True)
class SFTDataConfig(Block):
    """`config.data` of the sft stage."""
    KEY: ClassVar[str] = "data"
    meta_path: str = ""  # meta JSON {name: {root, annotation, repeat_time, length}}; '' = synthetic QA
    eval_meta_path: str = ""  # held-out mixture for the eval loss; '' = none (synthetic: generated)
    synthetic_scenes: int = 0  # with meta_path '': scenes of the synthetic world turned into QA (WORKDIR/qa)
    synthetic_eval_scenes: int = 0
    synthetic_seed: int = 0  # = the planner stages' data.scene_seed: train QA from the planner's train scenes
    skip_bad_rows: bool = False  # drop (and count) malformed rows and undecodable images instead of failing
    max_seq_length: int = 12288
    max_dynamic_patch: int = 16  # ReCogDrive: up to 16 tiles (+ thumbnail)
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    system_message: str = "__default__"  # '__default__' = the internvl2_5 system message
    length_buckets: tuple = ()  # padded lengths; () = powers of two from 256 up to max_seq_length
    tile_buckets: tuple = ()  # tiles per row; () = (1, 2, 4, ..., max_dynamic_patch + thumbnail)
    # real tiles of a tile group (the rows one device holds in one micro-batch, packed flat for the ViT:
    # data/length_grouping.py); () = 1, 2, 3, 4, 6, 8, 12, ... up to the group's rows x max(tile_buckets)
    group_tile_buckets: tuple = ()
    pack: bool = False  # pack several samples per row (segment-masked attention)
    per_device_batch_size: int = 0  # > 0: the accumulation is train.batch_size / (this x devices), as upstream
    num_epochs: int = 0  # > 0: the run is epochs x batches per epoch steps (upstream trains 3 epochs)
    num_workers: int = 2  # Grain reader threads
    prefetch: int = 4

    def checks(self):
        buckets = self.length_buckets
        return [
            (self.max_seq_length >= 16, "max_seq_length", f"expected an int >= 16, got {self.max_seq_length!r}"),
            (1 <= self.min_dynamic_patch <= self.max_dynamic_patch, "max_dynamic_patch",
             f"need 1 <= min_dynamic_patch <= max_dynamic_patch, got {self.min_dynamic_patch}, "
             f"{self.max_dynamic_patch}"),
            (all(isinstance(b, int) and b > 0 for b in buckets), "length_buckets",
             f"expected positive ints, got {buckets}"),
            (not buckets or max(buckets) <= self.max_seq_length, "length_buckets",
             f"largest bucket {max(buckets) if buckets else 0} exceeds data.max_seq_length={self.max_seq_length}"),
            (all(isinstance(b, int) and b > 0 for b in self.tile_buckets), "tile_buckets",
             f"expected positive ints, got {self.tile_buckets}"),
            (all(isinstance(b, int) and b > 0 for b in self.group_tile_buckets), "group_tile_buckets",
             f"expected positive ints, got {self.group_tile_buckets}"),
            (self.per_device_batch_size >= 0, "per_device_batch_size",
             f"expected an int >= 0, got {self.per_device_batch_size!r}"),
            (self.num_epochs >= 0, "num_epochs", f"expected an int >= 0, got {self.num_epochs!r}"),
        ]


@dataclasses.dataclass(frozen=True)
class SFTEvalConfig(Block):
    KEY: ClassVar[str] = "eval"
    max_batches: int = 0  # 0 = the whole eval mixture
    # text-waypoint ADE (vlm/trajectory_eval.py): greedy answers to the driving prompt on this many held-out scenes
    # (the planner's eval split of data.synthetic_seed) vs constant velocity; 0 = off
    trajectory_scenes: int = 0
    trajectory_batch_size: int = 16  # prompts per greedy generation (one compilation)

    def checks(self):
        return [(self.max_batches >= 0, "max_batches", f"expected an int >= 0, got {self.max_batches!r}"),
                (self.trajectory_scenes >= 0, "trajectory_scenes",
                 f"expected an int >= 0 (0 = off), got {self.trajectory_scenes!r}"),
                (self.trajectory_batch_size >= 1, "trajectory_batch_size",
                 f"expected an int >= 1, got {self.trajectory_batch_size!r}")]


EXPORT_LAYOUTS = ("native", "remote")


@dataclasses.dataclass(frozen=True)
class ExportConfig(Block):
    """`config.export`: the transformers-loadable directory written at the end (vlm/hf_export.py)."""
    KEY: ClassVar[str] = "export"
    at_end: bool = True
    each_eval: bool = False  # sft: also an export at every eval (WORKDIR/hf_export_step_N)
    layout: str = "native"  # 'native' (transformers' InternVL) | 'remote' (OpenGVLab remote code)
    dtype: str = "bfloat16"
    max_shard_size: str = "5GB"

    def checks(self):
        return [(self.layout in EXPORT_LAYOUTS, "layout", f"expected one of {list(EXPORT_LAYOUTS)}, got {self.layout!r}")]


CACHE_LAYOUTS = ("compact", "upstream_compatible")
CACHE_TOKENS = ("all", "image")
EGO_STATUS_TEXT = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class CacheConfig(Block):
    """`config.cache` of the cache stage."""
    KEY: ClassVar[str] = "cache"
    splits: str = "train,eval"
    layout: str = "compact"  # or 'upstream_compatible' (left-padded fp32 like the PyTorch pipeline)
    max_len: int = 0  # stored length; 0 = longest prompt (compact) / 2800 (upstream_compatible)
    batch_size: int = 8  # per process, per forward
    max_dynamic_patch: int = 12  # upstream caches with load_image(max_num=12)
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    system_message: str = "__driving__"  # '__driving__' = data/driving_prompt.DRIVING_SYSTEM
    # the ego-status line in the prompt: 'auto' = on (the upstream NAVSIM prompt; the synthetic SFT trajectory QA
    # asks it too, data/scene_qa.py); 'off' for a VLM fine-tuned without it
    ego_status_text: str = "auto"
    # which prompt positions are stored (the planner's memory): 'all' = every token of the prompt, as upstream;
    # 'image' = only the <IMG_CONTEXT> positions (the camera; the text repeats the history, status and command the
    # planner gets as inputs anyway): 28 of ~460 tokens on the tiny demo VLM, so an IL step costs a fraction
    tokens: str = "all"

    def checks(self):
        return [
            (self.layout in CACHE_LAYOUTS, "layout", f"unknown {self.layout!r}; allowed: {list(CACHE_LAYOUTS)}"),
            (self.tokens in CACHE_TOKENS, "tokens", f"unknown {self.tokens!r}; allowed: {list(CACHE_TOKENS)}"),
            (self.ego_status_text in EGO_STATUS_TEXT, "ego_status_text",
             f"must be 'auto', 'on' or 'off', got {self.ego_status_text!r}"),
            (self.batch_size >= 1, "batch_size", f"expected an int >= 1, got {self.batch_size!r}"),
            (self.max_len >= 0, "max_len", f"expected an int >= 0, got {self.max_len!r}"),
        ]


JOINT_HEADS = ("dit", "opentrackvla")
JOINT_TRAIN_LLM = ("all", "last_n", "none")
PROMPT_EGO_STATUS = ("on", "off")


def _square(v: int) -> bool:
    return v >= 1 and int(v ** 0.5 + 0.5) ** 2 == v


@dataclasses.dataclass(frozen=True)
class JointConfig(Block):
    """`config.joint` of the il_joint stage (vlm/joint.py): which head, what of the VLM trains, the OpenTrackVLA
    frame tokens. `history_frames`' upper bound (the world's past poses) is checked by joint.validate."""
    KEY: ClassVar[str] = "joint"
    head: str = "dit"  # 'dit': config.planner on the prompt's hidden states | 'opentrackvla': seed 002's recipe
    train_llm: str = "all"  # 'all' | 'last_n' (the last joint.last_n decoder layers + final norm) | 'none'
    last_n: int = 2
    train_vision: bool = False  # the InternViT (the seed's frame features are precomputed: frozen)
    train_projector: bool = True  # mlp1 (the seed's CrossModalityProjector)
    lm_loss_weight: float = 0.0  # > 0: + weight x next-token CE on the trajectory answer (driving QA), dit head only
    history_frames: int = 3  # opentrackvla: past front-camera frames (world.past_scene at -1.5, -1.0, -0.5 s)
    coarse_tokens: int = 4  # opentrackvla: pooled tokens per history frame
    fine_tokens: int = 64  # opentrackvla: pooled tokens of the current frame
    alpha_xy: float = -1.0  # opentrackvla head: tanh x alpha_xy; -1 = the training futures' 95th percentile
    memo_mb: float = 1024.0  # rendered/tiled samples kept in memory (later epochs skip rendering)
    prefetch: int = 4  # training batches made ahead on host threads (each holds its camera frames in fp32)

    def checks(self):
        return [
            (self.head in JOINT_HEADS, "head", f"unknown {self.head!r}; allowed: {list(JOINT_HEADS)}"),
            (self.train_llm in JOINT_TRAIN_LLM, "train_llm",
             f"unknown {self.train_llm!r}; allowed: {list(JOINT_TRAIN_LLM)}"),
            (self.last_n >= 1, "last_n", f"must be an int >= 1, got {self.last_n!r}"),
            (self.lm_loss_weight >= 0, "lm_loss_weight", f"must be a number >= 0, got {self.lm_loss_weight!r}"),
            (not (self.head == "opentrackvla" and self.lm_loss_weight > 0), "lm_loss_weight",
             "the OpenTrackVLA head has no LM loss (its LLM reads continuous embeddings); use 0"),
            (self.history_frames >= 0, "history_frames", f"must be an int >= 0, got {self.history_frames!r}"),
            (_square(self.coarse_tokens), "coarse_tokens", f"must be a square int >= 1, got {self.coarse_tokens!r}"),
            (_square(self.fine_tokens), "fine_tokens", f"must be a square int >= 1, got {self.fine_tokens!r}"),
            (self.alpha_xy == -1 or self.alpha_xy > 0, "alpha_xy",
             f"must be > 0, or -1 for the training futures' 95th percentile, got {self.alpha_xy!r}"),
            (self.memo_mb >= 0, "memo_mb", f"must be a number >= 0, got {self.memo_mb!r}"),
            (self.prefetch >= 1, "prefetch", f"must be an int >= 1, got {self.prefetch!r}"),
        ]


@dataclasses.dataclass(frozen=True)
class PromptConfig(Block):
    """`config.prompt` of the il_joint stage: the driving prompt (the cache block's prompt keys: run `cache` with
    the same values to read the joint VLM's states)."""
    KEY: ClassVar[str] = "prompt"
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    system_message: str = "__driving__"  # '__driving__' = data/driving_prompt.DRIVING_SYSTEM, '' = none
    ego_status_text: str = "on"  # the ego-status line (the SFT trajectory QA and the cache's 'auto' ask it)

    def checks(self):
        return [
            (1 <= self.min_dynamic_patch <= self.max_dynamic_patch, "max_dynamic_patch",
             f"need 1 <= min_dynamic_patch <= max_dynamic_patch, got {self.min_dynamic_patch}, "
             f"{self.max_dynamic_patch}"),
            (self.ego_status_text in PROMPT_EGO_STATUS, "ego_status_text",
             f"must be 'on' or 'off', got {self.ego_status_text!r}"),
        ]


@dataclasses.dataclass(frozen=True)
class PPOConfig(Block):
    """`config.ppo` (stage `ppo`, rl/ppo.py)."""
    KEY: ClassVar[str] = "ppo"
    num_envs: int = 1  # per process (upstream: 1 env per GPU process, 8 processes)
    num_steps: int = 256  # env steps per env per update
    epochs: int = 4
    num_minibatches: int = 2
    # micro-batches each minibatch is accumulated from (upstream: 128 samples per minibatch per process, one at a
    # time); what `optim.grad_accum` meant in ppo before it got one meaning everywhere
    minibatch_grad_accum: int = 1
    clip_param: float = 0.1
    value_clip: float = 0.1
    value_coef: float = 0.5
    ratio_cap: float = 10.0
    use_clipped_value_loss: bool = True
    gamma: float = 0.9
    lam: float = 0.95
    cut_at_truncation: bool = False
    temperature: float = 0.2
    top_p: float = 1.0
    env_seed: int = 42
    shuffle: bool = True

    def checks(self):
        return [
            (self.num_envs >= 1, "num_envs", f"expected an int >= 1, got {self.num_envs!r}"),
            (self.num_steps >= 1, "num_steps", f"expected an int >= 1, got {self.num_steps!r}"),
            (self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs!r}"),
            (self.num_minibatches >= 1, "num_minibatches", f"expected an int >= 1, got {self.num_minibatches!r}"),
            (self.minibatch_grad_accum >= 1, "minibatch_grad_accum",
             f"expected an int >= 1, got {self.minibatch_grad_accum!r}"),
            (self.temperature > 0, "temperature", f"must be > 0 (sampling), got {self.temperature!r}"),
        ]


# ------------------------------------------------------------------------------------------------ per stage

COMMON_BLOCKS: dict[str, Any] = {"mesh": MeshConfig, "parallel": ParallelConfig, "distributed": DistributedConfig,
                                 "host": HostConfig, "train": TrainConfig, "optim": OptimConfig}
_PLANNER = {"data": PlannerDataConfig, "eval": PlannerEvalConfig, "planner": None}
_VIRL = {"env": None, "prompt": None, "eval_nav": None}
# stage -> {block: its class, or None = a Namespace validated where it is used}
STAGE_BLOCKS: dict[str, dict[str, Any]] = {
    "il": _PLANNER,
    "eval": _PLANNER,
    "rl": {**_PLANNER, "rl": None},
    "il_joint": {**_PLANNER, "model": ModelConfig, "prompt": PromptConfig, "joint": JointConfig,
                 "export": ExportConfig},
    "sft": {"model": ModelConfig, "data": SFTDataConfig, "eval": SFTEvalConfig, "export": ExportConfig,
            **_VIRL, "virl_sft": None},
    "cache": {"model": ModelConfig, "data": PlannerDataConfig, "cache": CacheConfig},
    "ppo": {"model": NavModelConfig, "ppo": PPOConfig, **_VIRL},
    "eval_nav": {"model": NavModelConfig, **_VIRL},
    "navsim_convert": {"navsim": None},
}

# stage -> {key: (the only value it accepts, why)}: keys a stage has (from the shared blocks) but does not honour.
UNSUPPORTED: dict[str, dict[str, tuple[Any, str]]] = {
    "rl": {"optim.grad_accum": (1, "the rl stage does not accumulate gradients (one update per step on "
                                   "train.batch_size scenes x rl.group_size chains; rl.algo='grpo_clip' splits it "
                                   "into rl.num_minibatches)")},
    "ppo": {"optim.grad_accum": (1, "ppo accumulates micro-batches per minibatch: set config.ppo.minibatch_grad_accum"),
            "train.ema_decay": (0.0, "the ppo stage keeps no EMA")},
    "sft": {"train.ema_decay": (0.0, "the sft stage keeps no EMA")},
    "il_joint": {
        "data.source": ("synthetic", "il_joint renders the synthetic world's cameras"),
        "data.cache_dir": ("", "il_joint computes the VLM's states itself (no cache)"),
        "data.vl_features": ("real", "il_joint has no cached features to shuffle or zero"),
        "data.vl_normalize": ("none", "il_joint has no cached features to normalise"),
        "eval.protocol": ("deterministic", "il_joint evaluates with deterministic sampling only"),
        "model.freeze_vision": (False, "il_joint's trainable parts are config.joint.train_vision / train_projector "
                                       "/ train_llm"),
        "model.freeze_llm": (False, "il_joint's trainable parts are config.joint.train_llm"),
        "model.freeze_mlp": (False, "il_joint's trainable parts are config.joint.train_projector"),
        "export.each_eval": (False, "il_joint exports once, at the end (export.at_end)"),
    },
}


def _value(blocks: Mapping[str, Any], dotted: str):
    name, field = dotted.split(".", 1)
    return getattr(blocks[name], field) if name in blocks else None


def check_cross(cfg: RunConfig) -> None:
    """Checks spanning keys or blocks, and the stage's unsupported keys."""
    for key, (want, why) in UNSUPPORTED.get(cfg.stage, {}).items():
        got = _value(cfg.blocks, key)
        if got is not None and got != want:
            raise ConfigError(f"config.{key}={got!r}: not supported by the {cfg.stage} stage ({why}); leave it at "
                              f"{want!r}")
    if "train" in cfg.blocks and "optim" in cfg.blocks:
        bs, acc = cfg.train.batch_size, cfg.optim.grad_accum
        if bs % acc:
            raise ConfigError(f"config.optim.grad_accum: must divide config.train.batch_size={bs}, got {acc}")


def block_types(stage: str, names) -> dict[str, Any]:
    """{block: class | None} of `stage`'s config with the blocks `names`."""
    out = dict(COMMON_BLOCKS)
    out.update(STAGE_BLOCKS.get(stage, {}))
    if stage == "sft" and "env" in names:  # the V-IRL SFT baseline: the nav model block
        out["model"] = NavModelConfig
    return out


def typed(config) -> RunConfig:
    """The typed RunConfig of one stage's config (a ConfigDict, a mapping, or already a RunConfig)."""
    if isinstance(config, RunConfig):
        return config
    d = _as_dict(config)
    stage = d.pop("stage", None)
    if not isinstance(stage, str):
        raise ConfigError(f"config.stage: expected a stage name, got {stage!r}")
    seed = d.pop("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"config.seed: must be an int, got {seed!r}")
    known = block_types(stage, d)
    blocks = {}
    for name, value in d.items():
        if name not in known:
            raise ConfigError(f"config.{name}: unknown key for the {stage} stage; its blocks are "
                              f"{sorted(set(known) & set(d)) or sorted(known)}")
        cls = known[name]
        if cls is None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"config.{name}: expected a block of keys, got {value!r}")
            blocks[name] = Namespace(value, name)
        else:
            blocks[name] = from_mapping(cls, value, name)
    out = RunConfig(stage, seed, types.MappingProxyType(blocks))
    check_cross(out)
    return out


# ------------------------------------------------------------------------------------------------ derived values

def derive_steps_and_accum(cfg: RunConfig, batches_per_epoch: int, num_devices: int) -> dict[str, int]:
    """SFT's run-time values, as {dotted key: value} for `RunConfig.with_values` and config.json's `derived`:
    `data.num_epochs` > 0 → train.num_steps = epochs × batches per epoch; `data.per_device_batch_size` > 0 →
    optim.grad_accum = train.batch_size / (per_device_batch_size × devices) (upstream's GRADIENT_ACC =
    BATCH_SIZE / PER_DEVICE_BATCH_SIZE / GPUS). Pure: the config is not touched."""
    d, out = cfg.data, {}
    if d.num_epochs:
        out["train.num_steps"] = int(d.num_epochs) * int(batches_per_epoch)
    pdb = int(d.per_device_batch_size)
    if pdb:
        gbs, per_step = int(cfg.train.batch_size), pdb * num_devices
        if gbs % per_step:
            raise ConfigError(f"config.data.per_device_batch_size={pdb}: {pdb} x {num_devices} devices does not "
                              f"divide config.train.batch_size={gbs}")
        out["optim.grad_accum"] = gbs // per_step
    return out
