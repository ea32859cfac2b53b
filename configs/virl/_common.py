"""Shared blocks of the V-IRL configs (sft.py, ppo.py, eval_nav.py); `full` = the spec's upstream settings
(spec/virl.md §2–§4, on InternVL3-2B), `tiny` = a CPU-sized variant (tiny InternVL, small city, short runs)."""
import ml_collections

from recogdrive_jax import configs, stage_configs

VARIANTS = ("full", "tiny")


def variant_of(arg) -> str:
    arg = (arg or "full").strip()
    if arg not in VARIANTS:
        raise ValueError(f"configs/virl: unknown variant {arg!r}; use one of {list(VARIANTS)} (e.g. ppo.py:tiny)")
    return arg


def base(stage: str, variant: str) -> ml_collections.ConfigDict:
    tiny = variant == "tiny"
    c = configs.base_config()
    c.stage = stage
    # The InternVL trunk exactly as the `sft` stage reads it (init_from: HF dir | converted dir | sft run).
    c.model = stage_configs.model_block(
        variant="tiny" if tiny else "internvl3_2b",
        dtype="float32" if tiny else "bfloat16",
        remat=not tiny,
        # Random-init LLM field overrides; the tiny model uses the vocabulary of the small navigation tokenizer.
        llm=ml_collections.ConfigDict(dict(vocab_size=1024) if tiny else dict()),
        vit=ml_collections.ConfigDict(),
        value_hidden=(1024, 512),           # spec §2: Linear(D,1024)-ReLU-Linear(1024,512)-ReLU-Linear(512,1)
        system_message=not tiny,            # the internvl2_5 default system turn (off in tiny: fewer tokens)
    )
    c.env = ml_collections.ConfigDict(dict(
        train_split="in_distribution",
        city_seed=0, city_size_m=800.0 if tiny else 2000.0,
        n_train_routes=16 if tiny else 1000, n_eval_routes=48, routes_per_style=2 if tiny else 2,
        view_size=28 if tiny else 448,      # grid (2R+5)²; tiny → one 56-px tile
        verify_iter=2, view_layout="prompt", full_oracle=False, wrap_relative=True, route_file=""))
    c.prompt = ml_collections.ConfigDict(dict(
        max_prompt_len=1024 if tiny else 4096, max_new_tokens=64 if tiny else 512, max_tiles=1 if tiny else 5,
        weight_mode="key",                  # 'reference_last5' = what the official code does in practice
        thought_coef=0.5, action_coef=1.0))
    c.eval_nav = ml_collections.ConfigDict(dict(
        splits="in_distribution,rule_ood,visual_ood", checkpoint="", seed=12,
        max_new_tokens=64 if tiny else 256, temperature=0.0, top_p=1.0,   # 0 = greedy (deterministic)
        batch_size=8 if tiny else 8, max_routes=0, num_render=2, title=""))
    return c


def ppo_block(tiny: bool) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_envs=8 if tiny else 1,          # per process (upstream: 1 env per GPU process, 8 processes)
        num_steps=4 if tiny else 256,       # env steps per env per update
        epochs=2 if tiny else 4, num_minibatches=2,
        minibatch_grad_accum=2 if tiny else 128,  # micro-batches per minibatch (global micro = 8 samples)
        clip_param=0.1, value_clip=0.1, value_coef=0.5, ratio_cap=10.0, use_clipped_value_loss=True,
        gamma=0.9, lam=0.95, cut_at_truncation=False,
        temperature=0.2, top_p=1.0, env_seed=42, shuffle=True))
