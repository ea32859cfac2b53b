"""The tokenizer of a resolved InternVL (`vlm/checkpoint.py`), checked against the model's special-token ids."""
from __future__ import annotations

from recogdrive_jax.convert.hf_processor import NAMED_TOKENS
from recogdrive_jax.data import tokenizer as tok_lib
from recogdrive_jax.vlm.checkpoint import ResolvedModel, local_dir


def load_or_build_tokenizer(resolved: ResolvedModel, workdir: str, corpus=None):
    """The tokenizer (checked against the model's special-token ids); `tiny` random init generates one, trained
    on `corpus()` when given (e.g. navigation text; only called when a tokenizer is built)."""
    del workdir  # the run's own tokenizer dir is already in `resolved.tokenizer_dir` (resolve_model)
    cfg = resolved.cfg
    if resolved.tokenizer_dir:
        with local_dir(resolved.tokenizer_dir) as local:  # a gs:// tokenizer: its files, without any weights
            tok = tok_lib.load_tokenizer(local)
    elif resolved.params_path is None and cfg.llm_config.vocab_size <= 4096:
        tok = tok_lib.build_tokenizer(vocab_size=cfg.llm_config.vocab_size, corpus=corpus() if corpus else None)
    else:
        raise FileNotFoundError("config.model.tokenizer: empty and config.model.init_from has no tokenizer files; "
                                "give the model's tokenizer directory")
    want = {"<IMG_CONTEXT>": cfg.image_token_id, "<img>": cfg.img_start_token_id, "</img>": cfg.img_end_token_id}
    bad = {t: (tok.convert_tokens_to_ids(t), i) for t, i in want.items() if tok.convert_tokens_to_ids(t) != i}
    if bad:
        raise ValueError(f"tokenizer and model disagree on special-token ids (tokenizer, model): {bad}")
    beyond = sorted(t for t, i in tok.get_vocab().items() if i >= cfg.llm_config.vocab_size
                    and t != NAMED_TOKENS["video_token"])  # an export's processor-only placeholder (hf_processor)
    if beyond:
        raise ValueError(f"tokenizer has {len(beyond)} token(s) past the model's vocab_size "
                         f"{cfg.llm_config.vocab_size}, e.g. {beyond[:5]}")
    return tok
