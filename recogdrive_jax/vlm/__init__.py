"""The VLM library below the stages: which InternVL to load (checkpoint resolution, tokenizer), its LM loss and
QA batches (sft), its hidden states of driving prompts (cache), the HF export, chat encoding, KV-cache
generation and the navigation policy / V-IRL evaluation (ppo, eval_nav). Stages compose these; nothing here
imports a stage. Submodules are imported explicitly (this file imports nothing)."""
