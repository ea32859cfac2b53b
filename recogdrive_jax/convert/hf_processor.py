"""The files of a transformers InternVL directory besides the weights and config.json, so that
`AutoProcessor.from_pretrained(export)` + `apply_chat_template` give the prompt and tiles this project builds itself
(data/template.chat_prompt, data/tiling.load_image) and `generate` stops where ours does.

Written (transformers 5 layout): the tokenizer with InternVL's named image tokens (the processor reads
`tokenizer.start_image_token` etc.) and the `internvl2_5` chat template (chat_template.jinja),
preprocessor_config.json (GotOcr2 tiling: the same grid rule, ImageNet mean/std, thumbnail when > 1 tile),
processor_config.json (`image_seq_length` = tokens per tile) and generation_config.json (stop at `<|im_end|>`).
"""
from __future__ import annotations

import json
import logging
import os

from recogdrive_jax.data.template import INTERNVL2_5_SYSTEM
from recogdrive_jax.data.tiling import IMAGENET_MEAN, IMAGENET_STD
from recogdrive_jax.errors import UserError

# InternVLProcessor reads these tokenizer attributes. It also insists on a video token; no InternVL vocabulary has
# one, so "<video>" is added when missing: the processor replaces it by image tokens before tokenizing, so its id
# (past the embedding) never reaches the model.
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}

# `internvl2_5` (IV/conversation.py): the default system message unless the first message is a system one; an image
# content item becomes the processor's placeholder + "\n" before the text, as `chat()` prepends '<image>\n'.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system_message = messages[0]['content'] -%}"
    "{%- else -%}{%- set system_message = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = '" + INTERNVL2_5_SYSTEM + "' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' -}}"
    "{%- for message in loop_messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif content['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- elif content['type'] == 'text' -%}{{- content['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ExportError(UserError):
    """The export cannot be made complete (no tokenizer, a tokenizer that disagrees with the model)."""


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def copy_tokenizer(src_dir: str, out_dir: str) -> None:
    """The tokenizer of `src_dir` saved again into `out_dir` (what `convert --from-hf` keeps for `--to-hf`)."""
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(src_dir, local_files_only=True, trust_remote_code=False).save_pretrained(out_dir)


def write_processor_files(out_dir: str, cfg, tokenizer) -> None:
    """Tokenizer (an object or a directory), chat template and processor / preprocessor / generation configs."""
    from transformers import AutoTokenizer
    if isinstance(tokenizer, str):
        if not has_tokenizer(tokenizer):
            raise ExportError(f"tokenizer: {tokenizer} has no {' or '.join(TOKENIZER_FILES)}")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True, trust_remote_code=False)
    tokenizer.save_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True, trust_remote_code=False,
                                        model_specific_special_tokens=dict(NAMED_TOKENS))
    want = {"<IMG_CONTEXT>": cfg.image_token_id, "<img>": cfg.img_start_token_id, "</img>": cfg.img_end_token_id}
    bad = {t: (tok.convert_tokens_to_ids(t), i) for t, i in want.items() if tok.convert_tokens_to_ids(t) != i}
    if bad:
        raise ExportError(f"export to {out_dir}: the tokenizer and the model disagree on special-token ids "
                          f"(tokenizer, model): {bad}")
    if cfg.template == "internvl2_5":
        tok.chat_template = CHAT_TEMPLATE
    else:
        logging.warning("export to %s: no chat template for template %r (only internvl2_5)", out_dir, cfg.template)
    tok.save_pretrained(out_dir)
    if not cfg.use_thumbnail:
        logging.warning("export to %s: transformers' InternVL image processor always adds a thumbnail to > 1 tile; "
                        "this model was configured without one", out_dir)
    s = cfg.force_image_size
    files = {
        "preprocessor_config.json": dict(
            image_processor_type="GotOcr2ImageProcessor", processor_class="InternVLProcessor",
            crop_to_patches=bool(cfg.dynamic_image_size), min_patches=int(cfg.min_dynamic_patch),
            max_patches=int(cfg.max_dynamic_patch), size={"height": s, "width": s}, do_resize=True,
            resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD), do_convert_rgb=True),  # resample 3 = PIL BICUBIC
        "processor_config.json": dict(processor_class="InternVLProcessor", image_seq_length=int(cfg.num_image_token)),
        "generation_config.json": dict(eos_token_id=int(cfg.eos_token_id), pad_token_id=int(cfg.pad_token_id)),
    }
    for name, d in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(d, f, indent=2)
