"""The `internvl2_5` chat template, image-token expansion and label masking (spec §3, `preprocess_internvl2_5`).

Each turn is tokenized on its own and the pieces concatenated, exactly as upstream:
system/user turns are all -100; in an assistant turn the `<|im_start|>assistant\\n` prefix and the final `\\n`
are -100, so the loss covers the answer plus `<|im_end|>`. Every `<image>` placeholder becomes
`<img>` + `<IMG_CONTEXT>` × num_image_token·tiles + `</img>`. Then truncation to `max_seq_length` and right padding.

`build_sample` is the per-row transform of the QA pipeline (data/qa.py): conversations + images → arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from recogdrive_jax.data.tiling import load_image
from recogdrive_jax.errors import UserError

IGNORE_INDEX = -100
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"
# Default system message of the internvl2_5 template (IV/conversation.py).
INTERNVL2_5_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                      "多模态大语言模型。")
ROLE_PREFIX = {"system": "<|im_start|>system\n", "human": "<|im_start|>user\n", "gpt": "<|im_start|>assistant\n"}
TURN_END = "<|im_end|>\n"


class SampleError(UserError):
    """A row that cannot become a training sample (the QA pipeline reports or skips it)."""


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """What `build_sample` needs; `sample_config()` builds it from a ConfigDict/dict/InternVLConfig."""

    max_seq_length: int = 4096
    image_size: int = 448
    num_image_token: int = 256
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    system_message: str | None = INTERNVL2_5_SYSTEM  # None = no system turn
    pad_to_max_length: bool = True


def sample_config(cfg: Any = None, **overrides) -> SampleConfig:
    """Reads SampleConfig fields from `cfg` (SampleConfig, InternVLConfig, ConfigDict or dict), then overrides."""
    if isinstance(cfg, SampleConfig):
        return dataclasses.replace(cfg, **overrides)
    vals: dict = {}
    if cfg is not None and hasattr(cfg, "vision_config") and hasattr(cfg, "num_image_token"):  # InternVLConfig
        vals.update(image_size=cfg.vision_config.image_size, num_image_token=cfg.num_image_token,
                    min_dynamic_patch=cfg.min_dynamic_patch, max_dynamic_patch=cfg.max_dynamic_patch,
                    use_thumbnail=cfg.use_thumbnail, dynamic_image_size=cfg.dynamic_image_size)
    elif cfg is not None:
        names = [f.name for f in dataclasses.fields(SampleConfig)]
        get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
        vals.update({k: get(k) for k in names if get(k, None) is not None})
        if get("system_message", "__absent__") is None:
            vals["system_message"] = None
    vals.update(overrides)
    return SampleConfig(**vals)


def image_tokens(num_tiles: int, num_image_token: int) -> str:
    return IMG_START + IMG_CONTEXT * (num_image_token * num_tiles) + IMG_END


def _role(turn: dict, k: int) -> str:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise SampleError(f"conversations[{k}]: expected {{'from': ..., 'value': ...}}, got {turn!r:.80}")
    role = turn["from"]
    if role not in ROLE_PREFIX:
        raise SampleError(f"conversations[{k}]: 'from' is {role!r}; expected 'system', 'human' or 'gpt'")
    if not isinstance(turn["value"], str):
        raise SampleError(f"conversations[{k}]: 'value' must be a string")
    return role


def expand_images(conversations: Sequence[dict], tiles_per_image: Sequence[int], num_image_token: int) -> list[dict]:
    """Replaces the `<image>` placeholders of human turns, in order, by image token strings."""
    out, used = [], 0
    for k, turn in enumerate(conversations):
        role = _role(turn, k)
        value = turn["value"]
        if role == "human":
            for _ in range(value.count(IMAGE_PLACEHOLDER)):
                if used == len(tiles_per_image):
                    break
                value = value.replace(IMAGE_PLACEHOLDER, image_tokens(tiles_per_image[used], num_image_token), 1)
                used += 1
        out.append({"from": role, "value": value})
    if used != len(tiles_per_image):
        raise SampleError(f"conversations: {len(tiles_per_image)} image(s) but {used} '<image>' placeholder(s)")
    return out


def tokenize_conversation(conversations: Sequence[dict], tokenizer, *, system_message: str | None,
                          max_seq_length: int | None = None, pad_to_max_length: bool = False) -> dict:
    """Already-expanded turns → input_ids, labels, attention_mask (int32 numpy [T])."""
    turns = list(conversations)
    if turns and turns[0]["from"] == "system":
        system_message, turns = turns[0]["value"], turns[1:]
    pieces, roles = [], []
    if system_message is not None:
        pieces.append(f"{ROLE_PREFIX['system']}{system_message}{TURN_END}")
        roles.append("system")
    for k, turn in enumerate(turns):
        role = _role(turn, k)
        if role == "system":
            raise SampleError(f"conversations[{k}]: a system turn is only allowed first")
        pieces.append(f"{ROLE_PREFIX[role]}{turn['value']}{TURN_END}")
        roles.append(role)
    if "gpt" not in roles:
        raise SampleError("conversations: no 'gpt' turn, so there is nothing to learn")
    ids = tokenizer(pieces, add_special_tokens=False).input_ids
    ignore_len = len(tokenizer(ROLE_PREFIX["gpt"], add_special_tokens=False).input_ids)
    all_ids, all_labels = [], []
    for role, piece in zip(roles, ids):
        piece = np.asarray(piece, np.int32)
        label = np.full_like(piece, IGNORE_INDEX)
        if role == "gpt":
            label[ignore_len:-1] = piece[ignore_len:-1]
        all_ids.append(piece)
        all_labels.append(label)
    input_ids, labels = np.concatenate(all_ids), np.concatenate(all_labels)
    if max_seq_length is not None:
        input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
    attention_mask = np.ones_like(input_ids)
    if pad_to_max_length and max_seq_length is not None and len(input_ids) < max_seq_length:
        n = max_seq_length - len(input_ids)
        input_ids = np.concatenate([input_ids, np.full(n, tokenizer.pad_token_id, np.int32)])
        labels = np.concatenate([labels, np.full(n, IGNORE_INDEX, np.int32)])
        attention_mask = np.concatenate([attention_mask, np.zeros(n, np.int32)])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def build_sample(conversations: Sequence[dict], images: Sequence[Any], tokenizer, cfg: Any = None) -> dict:
    """One training sample: InternVL chat turns + images (PIL / uint8 array / path) → numpy arrays.

    Returns input_ids, labels, attention_mask [T] int32 (T = max_seq_length when padding), pixel_values
    [N, S, S, 3] float32 (all tiles of all images; one zero dummy tile for text-only rows), image_flags [N]
    int32 (0 for the dummy) and num_tiles [n_images] int32. Raises SampleError for bad rows, including a
    truncation that would cut an image's tokens.
    """
    c = sample_config(cfg)
    tiles = [load_image(im, image_size=c.image_size, max_num=c.max_dynamic_patch, min_num=c.min_dynamic_patch,
                        use_thumbnail=c.use_thumbnail, dynamic=c.dynamic_image_size) for im in images]
    num_tiles = [t.shape[0] for t in tiles]
    turns = expand_images(conversations, num_tiles, c.num_image_token)
    out = tokenize_conversation(turns, tokenizer, system_message=c.system_message,
                                max_seq_length=c.max_seq_length, pad_to_max_length=c.pad_to_max_length)
    ctx_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    n_ctx = int(np.sum(out["input_ids"] == ctx_id))
    if n_ctx != c.num_image_token * sum(num_tiles):
        raise SampleError(f"max_seq_length {c.max_seq_length} truncates the image tokens "
                          f"({n_ctx} of {c.num_image_token * sum(num_tiles)} kept); raise it or use fewer tiles")
    if tiles:
        out["pixel_values"] = np.concatenate(tiles).astype(np.float32)
        out["image_flags"] = np.ones(sum(num_tiles), np.int32)
    else:
        out["pixel_values"] = np.zeros((1, c.image_size, c.image_size, 3), np.float32)
        out["image_flags"] = np.zeros(1, np.int32)
    out["num_tiles"] = np.asarray(num_tiles, np.int32)
    return out


def chat_prompt(question: str, num_tiles: Sequence[int], *, num_image_token: int,
                system_message: str | None = INTERNVL2_5_SYSTEM, history: Sequence[tuple[str, str]] = ()) -> str:
    """Inference prompt as `InternVLChatModel.chat`: '<image>\\n' is prepended when images are given and the
    question has no placeholder; ends with the assistant prefix."""
    if num_tiles and IMAGE_PLACEHOLDER not in question and not any(IMAGE_PLACEHOLDER in q for q, _ in history):
        question = IMAGE_PLACEHOLDER + "\n" + question
    text = f"{ROLE_PREFIX['system']}{system_message}{TURN_END}" if system_message is not None else ""
    for q, a in history:
        text += f"{ROLE_PREFIX['human']}{q}{TURN_END}{ROLE_PREFIX['gpt']}{a}{TURN_END}"
    text += f"{ROLE_PREFIX['human']}{question}{TURN_END}{ROLE_PREFIX['gpt']}"
    for n in num_tiles:
        if IMAGE_PLACEHOLDER not in text:
            raise SampleError(f"chat_prompt: {len(num_tiles)} image(s) but fewer '<image>' placeholders")
        text = text.replace(IMAGE_PLACEHOLDER, image_tokens(n, num_image_token), 1)
    return text
