"""recogdrive-jax: the ReCogDrive training system (VLM SFT, hidden-state cache, diffusion-planner IL, DiffGRPO)
in JAX/Flax, plus VLM-PPO with a value head and a regression planner head."""
try:  # absent where only a converter runs (inside a NAVSIM environment: convert/navsim_logs.py needs numpy only)
    import flax
except ImportError:  # the model code imports flax itself and fails there with the real error
    flax = None

# Parameters carry *logical* axis names as metadata (`nnx.with_partitioning`); they are mapped to the mesh in
# one place (`parallel/sharding.py`). Flax >= 0.12 would otherwise try to shard eagerly at creation time,
# which needs a mesh inside model code.
if flax is not None:
    flax.config.update("flax_always_shard_variable", False)
