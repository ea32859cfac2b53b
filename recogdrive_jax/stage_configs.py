"""Default configs of the stages whose defaults are not the planner's (`configs.planner_stage_config`): `sft`,
`cache`, `navsim_convert`, and the InternVL `config.model` block the VLM stages share with the V-IRL configs. The
one place their keys and defaults are written; config files (configs/*.py, recipes.py) start from these."""
from __future__ import annotations

import ml_collections

from recogdrive_jax import config_types as ct
from recogdrive_jax import configs


def model_block(**overrides) -> ml_collections.ConfigDict:
    """`config.model`: which InternVL and how it is computed (shared by `sft`, `cache`, `il_joint`, `ppo`,
    `eval_nav`); keys: config_types.ModelConfig (`llm`/`vit` field overrides only where a config gives them)."""
    return ct.default_block(ct.ModelConfig, exclude=("llm", "vit"), **overrides)


def data_block(**overrides) -> ml_collections.ConfigDict:
    """`config.data` of the sft stage; keys: config_types.SFTDataConfig."""
    return ct.default_block(ct.SFTDataConfig, **overrides)


def sft_stage_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """Common keys + model/data/export blocks with upstream's InternVL3 fine-tune recipe (seed 000)."""
    c = configs.base_config()
    c.stage = "sft"
    c.model = model_block(variant=variant)
    c.data = data_block()
    c.export = ct.default_block(ct.ExportConfig)
    c.eval = ct.default_block(ct.SFTEvalConfig)
    c.optim.update(dict(lr=4e-5, warmup_ratio=0.1, schedule="cosine", weight_decay=0.05, b1=0.9, b2=0.999,
                        eps=1e-8, clip_norm=1.0))
    return c


def cache_stage_config() -> ml_collections.ConfigDict:
    c = configs.base_config()
    c.stage = "cache"
    for key in ("train", "optim"):  # not a training stage
        del c[key]
    c.model = model_block(init_from="", remat=False)
    c.data = configs.planner_data_block()  # which scenes: the same keys the planner stages read
    c.cache = ct.default_block(ct.CacheConfig)
    return c


def il_joint_stage_config(variant: str = "tiny", planner_variant: str = "tiny") -> ml_collections.ConfigDict:
    """`il_joint`: the planner stages' planner/data/eval blocks + the InternVL `model` block + the driving prompt
    (`prompt`, the cache block's prompt keys: run `cache` with the same values) + what trains (`joint`)."""
    c = configs.planner_stage_config("il_joint", variant=planner_variant)
    c.planner.vl_dim = 0  # 0 = the VLM's hidden size
    c.train.ema_decay = 0.0  # an EMA would copy the whole VLM
    c.model = model_block(variant=variant)
    c.prompt = ct.default_block(ct.PromptConfig)  # keys: config_types.PromptConfig
    c.joint = ct.default_block(ct.JointConfig)  # keys: config_types.JointConfig
    c.export = ml_collections.ConfigDict(dict(at_end=True, layout="native", dtype="bfloat16", max_shard_size="5GB"))
    return c


def navsim_convert_config() -> ml_collections.ConfigDict:
    c = configs.base_config()
    c.stage = "navsim_convert"
    for key in ("train", "optim"):
        del c[key]
    c.navsim = ml_collections.ConfigDict(dict(
        fake=False,  # write a fake split from the synthetic world first (CI / the README's one-line run)
        fake_logs=2, fake_scenes_per_log=4, fake_seed=0,
        logs_dir="",  # NAVSIM navsim_logs root (one folder per NAVSIM split)
        sensor_blobs_dir="",  # NAVSIM sensor_blobs root
        split_dirs="train:trainval,eval:test,test:test",  # project split -> NAVSIM split folder
        metric_cache="",  # converted metric cache(s): .npz for every split, or a folder with <split>.npz
        num_history_frames=4, num_future_frames=10, frame_interval=0,  # NAVSIM SceneFilter (0 = chunk length)
    ))
    return c
