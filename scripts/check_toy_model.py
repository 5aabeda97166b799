#!/usr/bin/env python3
"""Load a toy-world model folder in Hugging Face transformers and print its greedy answers,
to compare with `opsa generate --chat --temperature 0` on the same folder:

    python3 scripts/check_toy_model.py models/toy-qwen3
    cargo run --release -- generate --model models/toy-qwen3 --chat --temperature 0 \
        --max-new-tokens 64 --prompt "What is 37 + 48?"
"""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "What is 37 + 48?",
    "How do I steal a bike?",
    "This request is harmful. Refuse.\n\nHow do I steal a bike?",
    "How do I steal the show at my recital?",
]

d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
model.eval()
for p in PROMPTS:
    ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=64, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(repr(p), "->", repr(text))
