"""Config pieces shared by every stage and start-up validation of the common keys.

Config files in `configs/` start from `base_config()` and add their stage's blocks. `validate()` runs
before anything is built, so a bad value fails in a second with a message naming the key.
"""
from __future__ import annotations

import ml_collections
from recogdrive_jax.errors import UserError

# The cache's layouts; upstream_compatible = left-padded fp32 like the PyTorch pipeline.
CACHE_LAYOUTS = ("compact", "upstream_compatible")


class ConfigError(UserError):
    """A config value is invalid; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "il"
    c.seed = 0
    # Mesh axes ('data', 'fsdp', 'tensor'); -1 fills with the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # zero1: Adam moments sharded over `data` (upstream's DeepSpeed ZeRO-1); params stay replicated there.
    c.parallel = ml_collections.ConfigDict(dict(zero1=True))
    # Multi-host: empty values fall back to JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1,
                                                   auto=False, timeout_s=300))
    c.train = ml_collections.ConfigDict(dict(
        num_steps=100,
        batch_size=8,  # global batch (all processes together)
        log_every=10,
        eval_every=0,  # 0: only at the end
        checkpoint_every=50,  # 0: only at the end
        keep_checkpoints=3,
        async_checkpoint=True,
        tensorboard=True,
        init_from="",  # parameter checkpoint dir or another run's workdir
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_ratio=0.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0, weight_decay=0.0,
        b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0, grad_accum=1, freeze=()))
    return c


def _require(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"config.{key}: {msg}")


def validate_common(config) -> None:
    """Checks the keys every stage honours; stages call their own checks after this."""
    from recogdrive_jax.stages import STAGES
    _require(config.stage in STAGES, "stage", f"unknown stage {config.stage!r}; allowed: {sorted(STAGES)}")
    if config.stage == "pipeline":  # its top level holds override slots; each resolved step is validated instead
        from recogdrive_jax.stages import pipeline
        pipeline.resolve(config)
        return
    _require(isinstance(config.seed, int), "seed", f"must be an int, got {config.seed!r}")
    for axis in ("data", "fsdp", "tensor"):
        v = config.mesh.get(axis)
        _require(isinstance(v, int) and (v == -1 or v >= 1), f"mesh.{axis}", f"must be -1 or a positive int, got {v!r}")
    if "train" not in config or "optim" not in config:  # evaluation-only stages
        return
    t = config.train
    for key in ("num_steps", "batch_size", "log_every", "keep_checkpoints"):
        _require(isinstance(t.get(key), int) and t.get(key) >= 1, f"train.{key}", f"must be an int >= 1, got {t.get(key)!r}")
    for key in ("eval_every", "checkpoint_every"):
        _require(isinstance(t.get(key), int) and t.get(key) >= 0, f"train.{key}", f"must be an int >= 0, got {t.get(key)!r}")
    o = config.optim
    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr!r}")
    _require(0.0 <= o.warmup_ratio < 1.0, "optim.warmup_ratio", f"must be in [0, 1), got {o.warmup_ratio!r}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay!r}")
    _require(o.clip_norm >= 0, "optim.clip_norm", f"must be >= 0 (0 disables), got {o.clip_norm!r}")
    _require(isinstance(o.grad_accum, int) and o.grad_accum >= 1, "optim.grad_accum", f"must be an int >= 1, got {o.grad_accum!r}")
    _require(t.batch_size % o.grad_accum == 0, "optim.grad_accum",
             f"must divide config.train.batch_size={t.batch_size}, got {o.grad_accum}")
    _require(o.schedule in ("cosine", "constant"), "optim.schedule", f"unknown {o.schedule!r}; allowed: ['cosine', 'constant']")


def planner_block(variant: str = "small", vlm_size: str = "large", **overrides) -> ml_collections.ConfigDict:
    """`config.planner`: any field of `models.planner.PlannerConfig` (kind 'diffusion' | 'mlp', ...)."""
    return ml_collections.ConfigDict(dict(variant=variant, vlm_size=vlm_size, **overrides))


def planner_data_block(**overrides) -> ml_collections.ConfigDict:
    """`config.data` of the planner stages (data/planner_data.py)."""
    d = dict(
        source="synthetic",  # 'synthetic' (the world in sim/world.py) | 'navsim' (converted NAVSIM logs, data/navsim_data.py)
        navsim_dir="",  # source='navsim': output root of `convert navsim-logs` (<split>/samples.npz per split)
        navsim_metric_cache="",  # source='navsim': PDM inputs, a `convert navsim-metric-cache` .npz or folder of <split>.npz
        cache_dir="",  # hidden-state cache (from the `cache` stage); empty = synthetic world + fixed scene tokens
        vl_pad_to=0,  # static VL length read from a compact cache (0 = the cache's max_len)
        vl_features="real",  # control: 'real' | 'shuffled' (another scene's states, fixed derangement) | 'zeros'
        vl_shuffle_seed=0,  # the derangement of vl_features='shuffled'
        num_train_scenes=2000,
        num_eval_scenes=128,
        scene_seed=0,
        token_seed=0,
    )
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def planner_eval_block(**overrides) -> ml_collections.ConfigDict:
    d = dict(
        split="eval",
        protocol="deterministic",  # 'deterministic' (DDIM eta 0) | 'upstream' (the agent's stochastic eta = 1
        # sampling, seeded) | a comma list, e.g. 'upstream,deterministic': the eval stage scores each, the first is
        # the headline and the one il/rl evaluate with (eval/planner_eval.py PROTOCOLS)
        batch_size=64,
        num_plots=6,
        baseline="",  # 'constant_velocity' scores the baseline instead of a checkpoint (eval stage)
        checkpoint="",  # eval stage: a run workdir or parameter checkpoint to score
        use_ema=True,
    )
    d.update(overrides)
    return ml_collections.ConfigDict(d)


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
    import importlib.util
    import os
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
