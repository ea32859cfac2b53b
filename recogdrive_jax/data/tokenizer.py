"""A small byte-level BPE tokenizer with InternVL's special tokens, for tests and the demo (no downloads).

Real runs load the model's own tokenizer with `load_tokenizer(dir)` (`AutoTokenizer`). The small one is trained
on a generated driving/QA corpus and saved as a `PreTrainedTokenizerFast` directory. Its special tokens take the
first ids, in the order of `SPECIAL_TOKENS`, which the `tiny` InternVL config relies on
(pad 0, <|im_start|> 1, <|im_end|> 2, <img> 3, </img> 4, <IMG_CONTEXT> 5).
"""
from __future__ import annotations

import os
import random

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                  "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"

_WORDS = ("the ego vehicle car truck pedestrian cyclist lane road junction traffic light red green yellow stop "
          "sign turn left right straight keep go slow down accelerate brake follow route ahead behind front "
          "camera image scene describe what is there any should do next trajectory waypoint meters seconds "
          "speed velocity heading x y h PT answer question drive safely obstacle parked crossing because "
          "system user assistant you are a helpful driving agent navigation command day night fog rain").split()


def generated_corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-QA lines with numbers, punctuation, chat-template text and some CJK."""
    rnd = random.Random(seed)
    lines = []
    for k in range(n_lines):
        words = [rnd.choice(_WORDS) for _ in range(rnd.randint(4, 16))]
        if k % 3 == 0:
            words.append(f"[PT, ({rnd.uniform(-20, 20):.2f}, {rnd.uniform(-5, 5):.2f}, {rnd.uniform(-1, 1):.2f})]")
        if k % 7 == 0:
            words.append("你是书生·万象，英文名是InternVL。")
        lines.append(" ".join(words) + rnd.choice((".", "?", "!", ",", ":")) + "\n")
    lines += ["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"] * 50
    return lines


def build_tokenizer(out_dir: str | None = None, *, vocab_size: int = 512, corpus: list[str] | None = None,
                    model_max_length: int = 4096):
    """Trains the small tokenizer; saves it to `out_dir` (loadable by `AutoTokenizer`) when given.

    Returns a `PreTrainedTokenizerFast` with pad `<|endoftext|>`, eos `<|im_end|>` and no BOS (as Qwen2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or generated_corpus(), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   model_max_length=model_max_length)
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path: str):
    """`AutoTokenizer` from a local directory (never the hub); checks the InternVL special tokens exist."""
    from transformers import AutoTokenizer
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer: {path} is not a directory")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    vocab = tok.get_vocab()
    missing = [t for t in ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>") if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer {path}: missing special tokens {missing}")
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer {path}: no pad token")
    return tok
