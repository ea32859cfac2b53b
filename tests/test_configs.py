"""Every shipped config file loads and passes start-up validation (a broken recipe fails here, not on a pod)."""
import glob
import importlib.util
import os

import pytest

from recogdrive_jax import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f for f in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
               if not os.path.basename(f).startswith("_"))


def _load(path):
    spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_loads_and_validates(path):
    config = _load(path).get_config()
    configs.validate_common(config)
    if config.stage == "pipeline":
        from recogdrive_jax.stages.pipeline import step_config
        for name in config.pipeline.steps.split(","):
            configs.validate_common(step_config(config, name))


def test_demo_chains_its_steps():
    demo = _load(os.path.join(ROOT, "configs", "demo.py")).get_config()
    assert demo.pipeline.steps == "sft,cache,il_vlm,il,rl,eval"
    steps = demo.pipeline.configs
    assert steps.cache.model.init_from == "{workdir}/sft"
    assert steps.il_vlm.data.cache_dir == "{workdir}/cache"
    assert steps.rl.train.init_from == "{workdir}/il"
    assert steps.eval.eval.checkpoint == "{workdir}/rl"
    with pytest.raises(ValueError, match="unknown step"):
        _load(os.path.join(ROOT, "configs", "demo.py")).get_config("il,nope")
