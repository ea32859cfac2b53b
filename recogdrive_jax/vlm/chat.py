"""Chat encoding for InternVL policies: env observations ↔ fixed-shape token arrays (prompt left-padded to P,
answer right-padded to A), the static layout the PPO scoring pass and the KV-cache sampler share."""
from __future__ import annotations

import dataclasses

import numpy as np

from recogdrive_jax.data import template as tmpl
from recogdrive_jax.data.tiling import load_image
from recogdrive_jax.errors import UserError
from recogdrive_jax.models import internvl as ivl
from recogdrive_jax.rl import ppo_loss

@dataclasses.dataclass
class PromptLayout:
    """Static sizes of model inputs: P prompt tokens, A answer tokens, `max_tiles` image tiles per sample."""
    prompt_len: int
    answer_len: int
    max_tiles: int = 1
    system_message: str | None = tmpl.INTERNVL2_5_SYSTEM

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.answer_len


class PromptTooLong(UserError):
    pass


class ChatEncoder:
    """Env observations ↔ token arrays: the InternVL chat from `obs['messages']` (image first in the first user
    turn), left-padded to P; generated tokens → the text the env scores + the log-prob weights."""

    def __init__(self, tokenizer, cfg: ivl.InternVLConfig, layout: PromptLayout, weight_mode: str = "key",
                 thought_coef: float = 0.5, action_coef: float = 1.0):
        self.tok, self.cfg, self.layout = tokenizer, cfg, layout
        self.weight_mode, self.thought_coef, self.action_coef = weight_mode, thought_coef, action_coef
        self.pad_id, self.eos_id = int(cfg.pad_token_id), int(cfg.eos_token_id)
        self._pieces: dict[int, str] = {}
        vocab = len(tokenizer)
        if vocab > cfg.llm_config.vocab_size:
            raise ValueError(f"tokenizer has {vocab} tokens but config.model.llm.vocab_size is "
                             f"{cfg.llm_config.vocab_size}")

    # ---- prompt ----
    def tiles(self, image: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
        """[max_tiles, S, S, 3] float32 (zero-padded), flags [max_tiles], number of real tiles."""
        s, nt = self.cfg.force_image_size, self.layout.max_tiles
        out = np.zeros((nt, s, s, 3), np.float32)
        flags = np.zeros(nt, np.int32)
        if image is None:
            return out, flags, 0
        t = load_image(image, image_size=s, max_num=self.cfg.max_dynamic_patch, min_num=self.cfg.min_dynamic_patch,
                       use_thumbnail=self.cfg.use_thumbnail, dynamic=self.cfg.dynamic_image_size)
        if t.shape[0] > nt:
            raise ValueError(f"image gives {t.shape[0]} tiles but config.prompt.max_tiles is {nt}")
        out[:t.shape[0]], flags[:t.shape[0]] = t, 1
        return out, flags, t.shape[0]

    def prompt_text(self, messages: list[dict], num_tiles: int) -> str:
        turns = [dict(m) for m in messages]
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("messages must end with a user turn")
        if num_tiles:
            turns[0]["content"] = tmpl.IMAGE_PLACEHOLDER + "\n" + turns[0]["content"]
        history = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 1, 2)]
        return tmpl.chat_prompt(turns[-1]["content"], [num_tiles] if num_tiles else [],
                                num_image_token=self.cfg.num_image_token,
                                system_message=self.layout.system_message, history=history)

    def encode_prompt(self, obs: dict) -> dict:
        """obs → {'prompt_ids' [P] (left-padded), 'prompt_mask' [P], 'pixel_values', 'image_flags'}.

        A retry conversation that would not fit in P keeps its structure but shortens the earlier assistant
        outputs (the model's own, possibly malformed, text) before giving up with PromptTooLong."""
        pv, flags, nt = self.tiles(obs.get("image"))
        messages = obs["messages"]
        ids = self.tok(self.prompt_text(messages, nt), add_special_tokens=False).input_ids
        cut = 400
        while len(ids) > self.layout.prompt_len and cut >= 25 and len(messages) > 1:
            short = [dict(m, content=m["content"][:cut]) if m["role"] == "assistant" else m for m in messages]
            ids = self.tok(self.prompt_text(short, nt), add_special_tokens=False).input_ids
            cut //= 2
        if len(ids) > self.layout.prompt_len:
            raise PromptTooLong(f"prompt of {len(ids)} tokens exceeds config.prompt.max_prompt_len="
                                f"{self.layout.prompt_len}")
        p = self.layout.prompt_len
        prompt = np.full(p, self.pad_id, np.int32)
        mask = np.zeros(p, np.int32)
        prompt[p - len(ids):], mask[p - len(ids):] = ids, 1
        return {"prompt_ids": prompt, "prompt_mask": mask, "pixel_values": pv, "image_flags": flags}

    # ---- answer ----
    def piece(self, t: int) -> str:
        if t not in self._pieces:
            self._pieces[t] = self.tok.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return self._pieces[t]

    def answer_length(self, out: np.ndarray) -> int:
        """Tokens up to and including the first EOS (all A when none)."""
        hit = np.nonzero(out == self.eos_id)[0]
        return int(hit[0]) + 1 if hit.size else len(out)

    def decode_answer(self, out: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
        """Generated ids [A] → (text for env.step, weights [A], answer mask [A])."""
        n = self.answer_length(out)
        ids = [int(t) for t in out[:n]]
        text = self.tok.decode([t for t in ids if t != self.eos_id], skip_special_tokens=True,
                               clean_up_tokenization_spaces=False)
        pieces = [self.piece(t) for t in ids]
        w = ppo_loss.answer_token_weights("".join(pieces), ppo_loss.offsets_from_pieces(pieces), ids,
                                          mode=self.weight_mode, thought_coef=self.thought_coef,
                                          action_coef=self.action_coef, length=len(out))
        mask = np.zeros(len(out), np.int32)
        mask[:n] = 1
        return text, w, mask

    def encode_answer(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Target text (SFT) → ids [A] ending in EOS, right-padded, and the loss mask [A]."""
        ids = self.tok(text, add_special_tokens=False).input_ids + [self.eos_id]
        a = self.layout.answer_len
        if len(ids) > a:
            raise PromptTooLong(f"answer of {len(ids)} tokens exceeds config.prompt.max_new_tokens={a}")
        out = np.full(a, self.pad_id, np.int32)
        mask = np.zeros(a, np.int32)
        out[:len(ids)], mask[:len(ids)] = ids, 1
        return out, mask


def join_sequences(prompts: dict, answers: np.ndarray, answer_mask: np.ndarray) -> dict:
    """Stacked prompt dicts + answers [B, A] → the model-input part of a batch."""
    return {"input_ids": np.concatenate([prompts["prompt_ids"], answers], 1).astype(np.int32),
            "attention_mask": np.concatenate([prompts["prompt_mask"], answer_mask], 1).astype(np.int32),
            "pixel_values": prompts["pixel_values"], "image_flags": prompts["image_flags"]}


def stack(dicts: list[dict]) -> dict:
    return {k: np.stack([d[k] for d in dicts]) for k in dicts[0]}


def local_rows(x) -> np.ndarray:
    """This process's rows of a batch-sharded global array (all rows in a single process)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    shards = {}
    for s in x.addressable_shards:
        shards.setdefault(s.index[0].start or 0, np.asarray(s.data))
    return np.concatenate([shards[k] for k in sorted(shards)])
